"""`horovod.tensorflow.keras`'s collectives of values (numbers, arrays, tensors), as Horovod has them.

Each turns its value into a tensor and runs Horovod's collective on it eagerly, touching no Keras
object, so Horovod's own functions work unchanged on Keras 3 and are re-exported (a Keras 3
variable is accepted as a value too). `broadcast_global_variables` is the refusal
`hvdclip.compat.collectives` explains.
"""

from horovod.tensorflow.keras import allgather, allreduce, broadcast, reducescatter

from hvdclip.compat.collectives import broadcast_global_variables

__all__ = ["allgather", "allreduce", "broadcast", "broadcast_global_variables", "reducescatter"]
