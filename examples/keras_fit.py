"""Keras `model.compile` + `model.fit` with hvdclip: door 2.

    hvdclip-run -np 2 -- python examples/keras_fit.py

A Horovod Keras script becomes an hvdclip one by a find-and-replace of `hvd.DistributedOptimizer`
and `hvd.callbacks` with `hvdclip.keras.DistributedOptimizer` and `hvdclip.keras.callbacks`, plus
`clip=`: the clip runs on the gradient averaged over ranks. Keras' own callbacks work as they are;
the ones that write files run on rank 0. Data: scikit-learn's 8x8 digits (shipped, no download).
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

import hvdclip
import hvdclip.keras

hvdclip.init()
rank, size = hvdclip.rank(), hvdclip.size()

digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target.astype("int32")
order = np.random.default_rng(0).permutation(len(x))  # The same split on every rank.
train, test = order[:1440], order[1440:]
mine = train[rank::size]  # Each rank fits its own shard.

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, name="logits")]
)
model.compile(
    optimizer=hvdclip.keras.DistributedOptimizer(keras.optimizers.Adam(3e-3), clip=hvdclip.clip_by_global_norm(1.0)),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],  # Keras' defaults otherwise: on a GPU node the step runs without XLA, noted once.
)
callbacks = [
    hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback(0),  # Once, before the first step.
    hvdclip.keras.callbacks.MetricAverageCallback(),  # Logs over ranks, plus grad_norm and clip_rate.
    keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2),
]
history = model.fit(x[mine], y[mine], batch_size=32, epochs=15, shuffle=False, callbacks=callbacks, verbose=0)

logs = {name: values[-1] for name, values in history.history.items()}
_, accuracy = model.evaluate(x[test], y[test], verbose=0)
if rank == 0:
    print(
        f"last epoch: loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.3f}, "
        f"grad_norm {logs['grad_norm']:.3f}, clip_rate {logs['clip_rate']:.2f}",
        flush=True,
    )
    print(f"test accuracy {accuracy:.3f} on {len(test)} held-out digits ({size} ranks)", flush=True)
