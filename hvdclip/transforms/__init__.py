"""Gradient transforms that run on the reduced gradient: protocol, combinators and clipping."""

from hvdclip.transforms.base import GradientTransform, chain, identity
from hvdclip.transforms.clipping import clip_by_global_norm, clip_by_norm, clip_by_value

__all__ = [
    "GradientTransform",
    "chain",
    "identity",
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
]
