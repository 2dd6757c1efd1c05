"""The tools layer: the train/eval commands, sweeps and plots (the top of the package)."""
