"""Training: the train state and one data-parallel update (`step`), the loop (`loop`), checkpoints
(`checkpoints`), stopping on signals, time limits and lost processes (`stopping`) and one run per
workdir (`workdir_lock`)."""
