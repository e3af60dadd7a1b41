"""Door 3: `HvdClipTrainer`, a facade over the core step with its `fit` loop, data plans,
evaluation, checkpoints and callbacks."""

from hvdclip.trainer.trainer import History, HvdClipTrainer

__all__ = ["HvdClipTrainer", "History"]
