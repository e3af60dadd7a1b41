"""hvdclip's exception types.

Argument mistakes raise the built-in `ValueError` / `TypeError` with a message that names the
argument and what was received. Problems with the environment (Horovod not initialised, a missing
launcher, ranks that disagree) raise a subclass of `HvdClipError` whose message says how to fix it.
"""

__all__ = [
    "HvdClipError",
    "NotInitializedError",
    "LauncherError",
    "RankMismatchError",
    "NonFiniteGradientError",
    "CheckpointError",
    "OutputDirectoryError",
    "ElasticResetError",
]


class HvdClipError(RuntimeError):
    """Base class for environment and runtime problems detected by hvdclip."""

    # AutoGraph re-raises an error from a traced function as its own type only if that type takes
    # just a message through `Exception.__init__`; otherwise users get a `StagingError` instead.
    __init__ = Exception.__init__


class NotInitializedError(HvdClipError):
    """Horovod has not been initialised in this process."""


class LauncherError(HvdClipError):
    """A launch command cannot be built or run (missing binary, bad host list, ...)."""


class RankMismatchError(HvdClipError):
    """Ranks disagree on something that must be identical (model structure, weights)."""


class NonFiniteGradientError(HvdClipError):
    """Too many consecutive steps had a non-finite reduced gradient."""


class CheckpointError(HvdClipError):
    """A checkpoint cannot be restored: none found, unreadable, or saved from a different trainer."""


class OutputDirectoryError(HvdClipError):
    """A directory hvdclip writes to (checkpoints, TensorBoard logs, an exported model) is not writable."""


class ElasticResetError(HvdClipError):
    """An elastic job's failure came back after resets with no commit in between: not a lost peer."""
