"""Door 2: Keras `model.fit` with hvdclip, under Horovod's names (a find-and-replace away from
`horovod.tensorflow.keras`), plus the Keras parts hvdclip adds (learning-rate schedules)."""

from hvdclip.keras.schedules import ScaledWarmup

__all__ = ["ScaledWarmup"]
