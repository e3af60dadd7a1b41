"""The core step every door runs (`Clipper`) and door 1, `DistributedGradientTape`."""

from hvdclip.core.step import Clipped, Clipper
from hvdclip.core.tape import DistributedGradientTape

__all__ = ["Clipped", "Clipper", "DistributedGradientTape"]
