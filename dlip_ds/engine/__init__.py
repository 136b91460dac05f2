"""Training on DeepSpeed: the loop (`trainer`), how a run is built (`build`), the frozen teacher,
checkpoints, metrics and monitoring, evaluation during training, the process group.

A step's forward is a task's (`dlip_ds.tasks`); functions named `*_all_ranks` / `*_over_ranks` run
collectives, so every rank must call them together.
"""
