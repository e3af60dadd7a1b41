"""Digit classification with hvdclip: the `make demo` job.

    hvdclip-run -np 2 -- python examples/train.py                              # this CPU
    hvdclip-run -np 2 -- python examples/train.py --checkpoint-dir ckpts --tensorboard-dir logs
    hvdclip-run -np 8 -- python examples/train.py --epochs 30 --scale-lr       # a GPU node

Data: scikit-learn's 8x8 digits, shipped inside the package (no download): 1,440 training and
357 held-out images. Every rank loads the same arrays and `fit` gives each rank its own shard.
Rank 0 prints one line per epoch and the held-out accuracy (about 0.98 after the default 15
epochs on 2 ranks). Re-running with the same `--checkpoint-dir` resumes where the last run stopped.
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
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=15)
    training.add_argument("--batch-size", type=int, default=32, help="per rank; the global batch is this times the ranks")
    training.add_argument("--lr", type=float, default=3e-3, help="learning rate for one rank's batch")
    training.add_argument(
        "--scale-lr", action="store_true",
        help="multiply the learning rate by the number of ranks, warming up over --warmup-epochs (Goyal et al. 2017)",
    )
    training.add_argument("--warmup-epochs", type=float, default=5)
    training.add_argument("--patience", type=int, default=None, help="stop when val_loss has not improved for this many epochs")
    clipping = parser.add_argument_group("clipping")
    clipping.add_argument("--clip", choices=sorted(CLIPS), default="global_norm")
    clipping.add_argument(
        "--clip-threshold", type=float, default=1.0,
        help="max norm, or max |value| for --clip value; unused by agc, autoclip, zclip",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--checkpoint-dir", help="save a checkpoint every epoch here, and resume from the latest one")
    output.add_argument("--tensorboard-dir", help="write TensorBoard scalars here")
    output.add_argument("--save", help="write the trained model to this .keras file")
    output.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2, help="0 silent, 1 progress bar, 2 a line per epoch")
    return parser.parse_args()


def load_data():
    """The same split on every rank: `fit` shards the training set, `evaluate` the held-out set."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = 1440  # 80%, rounded to a multiple of 8 so that up to 8 ranks get equal shards.
    train = tf.data.Dataset.from_tensor_slices((x[:split], y[:split]))
    test = tf.data.Dataset.from_tensor_slices((x[split:], y[split:]))
    return train, test, split, len(x) - split


def main():
    args = parse_args()
    hvdclip.init()
    rank, size = hvdclip.rank(), hvdclip.size()
    keras.utils.set_random_seed(1234)  # Rank 0's initial weights win anyway: they are broadcast once.
    train, test, n_train, n_test = load_data()

    learning_rate = args.lr
    if args.scale_lr:
        steps_per_epoch = n_train // size // args.batch_size
        learning_rate = hvdclip.ScaledWarmup(args.lr, steps_per_epoch, warmup_epochs=args.warmup_epochs)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, name="logits")]
    )
    trainer = hvdclip.HvdClipTrainer(
        model,
        keras.optimizers.Adam(learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        clip=CLIPS[args.clip](args.clip_threshold),
    )

    callbacks = []
    if args.checkpoint_dir:
        resumed_at = trainer.restore(args.checkpoint_dir, missing_ok=True)
        if rank == 0 and resumed_at:
            print(f"resuming from the checkpoint at step {resumed_at}", flush=True)
        callbacks.append(hvdclip.CheckpointSaver(args.checkpoint_dir))
    if args.tensorboard_dir:
        callbacks.append(hvdclip.TensorBoard(args.tensorboard_dir, every_n_steps=5))
    if args.patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping("val_loss", patience=args.patience))

    trainer.fit(
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle_buffer=n_train,
        validation_data=test,
        validation_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        callbacks=callbacks,
        verbose=args.verbose,
    )
    results = trainer.evaluate(test, batch_size=256, metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    if rank == 0:
        print(f"test accuracy {results['accuracy']:.3f} on {n_test} held-out digits ({size} ranks)", flush=True)
    if args.save:
        trainer.save(args.save)


if __name__ == "__main__":
    main()
