"""Gradient transforms that run on the reduced gradient: protocol, combinators, fixed and adaptive
clipping, and the non-finite wrapper."""

from hvdclip.transforms.adaptive import adaptive_grad_clip, autoclip, zclip
from hvdclip.transforms.base import GradientTransform, chain, identity, reporting
from hvdclip.transforms.report import ClipReport
from hvdclip.transforms.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from hvdclip.transforms.nonfinite import skip_nonfinite

__all__ = [
    "GradientTransform",
    "ClipReport",
    "reporting",
    "chain",
    "identity",
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
    "adaptive_grad_clip",
    "autoclip",
    "zclip",
    "skip_nonfinite",
]
