"""Horovod plumbing: start-up, the Keras 3 variable bridge, the gradient reduction, and every other
collective hvdclip runs (broadcasts, agreements, consistency checks, rank-0 work)."""

from hvdclip.distributed.runtime import init, is_initialized, local_rank, rank, require_initialized, size

__all__ = ["init", "is_initialized", "local_rank", "rank", "require_initialized", "size"]
