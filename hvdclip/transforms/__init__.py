"""Gradient transforms that run on the reduced gradient: protocol, combinators, fixed and adaptive
clipping, and the non-finite wrapper."""

from hvdclip.transforms.adaptive import adaptive_grad_clip, autoclip, zclip
from hvdclip.transforms.base import GradientTransform, TransformResult, apply_transform, chain, identity
from hvdclip.transforms.report import ClipReport
from hvdclip.transforms.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from hvdclip.transforms.nonfinite import zero_nonfinite

__all__ = [
    "GradientTransform",
    "TransformResult",
    "ClipReport",
    "apply_transform",
    "chain",
    "identity",
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
    "adaptive_grad_clip",
    "autoclip",
    "zclip",
    "zero_nonfinite",
]
