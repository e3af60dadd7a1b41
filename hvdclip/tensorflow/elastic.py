"""`horovod.tensorflow.elastic` on Keras 3: `run`, `TensorFlowKerasState` and `TensorFlowState`.

Re-exports only; `hvdclip.compat.elastic` says what each fixes.
"""

from hvdclip.compat.elastic import TensorFlowKerasState, TensorFlowState, run

__all__ = ["TensorFlowKerasState", "TensorFlowState", "run"]
