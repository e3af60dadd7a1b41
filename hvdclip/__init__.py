"""hvdclip: Horovod data-parallel training for TensorFlow 2 / Keras 3, clipping the reduced gradient."""

from hvdclip.errors import HvdClipError, LauncherError, NonFiniteGradientError, NotInitializedError, RankMismatchError

__all__ = [
    "HvdClipError",
    "LauncherError",
    "NonFiniteGradientError",
    "NotInitializedError",
    "RankMismatchError",
]
