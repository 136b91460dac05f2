"""Training on DeepSpeed: the frozen teacher, the sharded student loop, checkpoints, monitoring.

`step.py` is one step's forward (StepModule); `trainer.py` runs steps; the other modules serve it.
"""
