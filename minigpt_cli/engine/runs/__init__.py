"""Layer 5: the run directory has one owner: its file names, checkpoints, and opening a run."""
