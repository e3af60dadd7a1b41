"""The core step every door runs (`Clipper`), door 1 (`DistributedGradientTape`), and the loop helper
that keeps every rank's data in step (`Lockstep`)."""

from hvdclip.core.lockstep import Lockstep
from hvdclip.core.step import Clipper, Prepared
from hvdclip.core.tape import DistributedGradientTape

__all__ = ["Clipper", "DistributedGradientTape", "Lockstep", "Prepared"]
