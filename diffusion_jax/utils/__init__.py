"""What every driver uses to write: paths as the library hands them on, atomic writes and the
metrics log (`outputs`), and the progress lines of long loops (`progress`)."""
