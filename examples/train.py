"""Digit classification with hvdclip: the `make demo` job.

    hvdclip-run -np 2 -- python examples/train.py            # this CPU
    hvdclip-run -np 8 -- python examples/train.py --epochs 30  # a GPU node

Data: scikit-learn's 8x8 digits, shipped inside the package (no download). Each rank trains on
its own shard; rank 0 prints the loss and the reduced gradient's norm.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

import hvdclip

CLIPS = {
    "global_norm": lambda limit: hvdclip.clip_by_global_norm(limit),
    "norm": lambda limit: hvdclip.clip_by_norm(limit),
    "value": lambda limit: hvdclip.clip_by_value(limit),
    "none": lambda limit: None,
    # Adaptive methods take their papers' defaults, not --clip-threshold. AGC spares the
    # classifier (the layer named "logits"), as the NFNets paper does.
    "agc": lambda limit: hvdclip.adaptive_grad_clip(0.01, exclude=("logits/",)),
    "autoclip": lambda limit: hvdclip.autoclip(10),
    "zclip": lambda limit: hvdclip.zclip(),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", choices=sorted(CLIPS), default="global_norm")
    parser.add_argument(
        "--clip-threshold", type=float, default=1.0,
        help="max norm, or max |value| for --clip value; unused by agc, autoclip, zclip",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def main():
    args = parse_args()
    hvdclip.init()
    rank, size = hvdclip.rank(), hvdclip.size()
    keras.utils.set_random_seed(1234)  # Rank 0's initial weights win anyway: they are broadcast once.

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    shard = tf.data.Dataset.from_tensor_slices((x_train[rank::size], y_train[rank::size]))
    dataset = shard.shuffle(2048, seed=rank).batch(args.batch_size, drop_remainder=True)

    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, name="logits")]
    )
    trainer = hvdclip.HvdClipTrainer(
        model,
        keras.optimizers.Adam(args.lr),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip=CLIPS[args.clip](args.clip_threshold),
    )
    for epoch in range(args.epochs):
        metrics = trainer.fit(dataset, epochs=1).history
        if rank == 0:
            print(
                f"epoch {epoch + 1:3d}  loss {metrics['loss'][0]:.4f}  grad_norm {metrics['grad_norm'][0]:.4f}  "
                f"clipped {100 * metrics['clip_active'][0]:.0f}% of steps",
                flush=True,
            )
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
    if rank == 0:
        print(f"test accuracy {accuracy:.3f} on {len(x_test)} held-out digits ({size} ranks)", flush=True)


if __name__ == "__main__":
    main()
