"""The training layer: the train loop, optimizer, checkpoints, evaluation, metrics.

Builds on the model, the kNN backends and the data pipeline; the tools (cli,
sweep, plots) are built on top of it.
"""
