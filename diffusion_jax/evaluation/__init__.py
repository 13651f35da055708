"""Using a trained model: a checkpoint's parameters and the `Sampler` (`inference`), the
evaluation modes of the command line (`modes`), and the measures (`metrics`: FID, Inception
Score, the digits measures)."""
