"""Click-through prediction with embeddings: sparse gradients, clipped by their global norm.

    hvdclip-run -np 2 -- python examples/recsys.py                 # this CPU
    hvdclip-run -np 8 -- python examples/recsys.py --users 200000 --items 50000 --impressions 20000000

The recommender the seed's author describes: users and items as learned vectors, a click's logit
their dot product plus an item bias. `keras.layers.Embedding` gives `tf.IndexedSlices` gradients
(only the rows a batch touched); Horovod allgathers those rows instead of allreducing the whole
table, and hvdclip sums rows that two ranks both touched before it takes the global norm and clips.

Data: impressions generated from a hidden click model (popular items shown more often), the same
on every rank (a fixed seed); `fit` shards them. Rank 0 prints one line per epoch and the held-out
AUC next to the AUC of the hidden model itself, the best any model can reach on this data.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

import hvdclip

CLIPS = {
    "global_norm": lambda limit: hvdclip.clip_by_global_norm(limit),
    "norm": lambda limit: hvdclip.clip_by_norm(limit),
    "value": lambda limit: hvdclip.clip_by_value(limit),
    "none": lambda limit: None,
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = parser.add_argument_group("data")
    data.add_argument("--users", type=int, default=500)
    data.add_argument("--items", type=int, default=200)
    data.add_argument("--impressions", type=int, default=200_000, help="10%% of them are held out")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=5)
    training.add_argument("--batch-size", type=int, default=256, help="per rank")
    training.add_argument("--lr", type=float, default=1e-2)
    training.add_argument("--dim", type=int, default=8, help="embedding size")
    training.add_argument("--sparse-as-dense", action="store_true", help="allreduce whole embedding tables instead of rows")
    clipping = parser.add_argument_group("clipping")
    clipping.add_argument("--clip", choices=sorted(CLIPS), default="global_norm")
    clipping.add_argument("--clip-threshold", type=float, default=0.05, help="max norm, or max |value| for --clip value")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2)
    return parser.parse_args()


def generate_clicks(users: int, items: int, impressions: int, seed: int = 0):
    """Impressions (user, item) and clicks drawn from a hidden logistic click model."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(users, 8)) * 0.6
    traits = rng.normal(size=(items, 8)) * 0.6
    appeal = rng.normal(-1.0, 0.5, size=items)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8  # Zipf-like: a few items are shown a lot.
    user = rng.integers(0, users, impressions).astype("int32")
    item = rng.choice(items, impressions, p=popularity / popularity.sum()).astype("int32")
    logit = np.sum(taste[user] * traits[item], axis=1) + appeal[item]
    click = (rng.random(impressions) < 1 / (1 + np.exp(-logit))).astype("float32")
    return user, item, click, logit


def build_model(users: int, items: int, dim: int) -> keras.Model:
    user = keras.Input((), dtype="int32", name="user")
    item = keras.Input((), dtype="int32", name="item")
    user_vector = keras.layers.Embedding(users, dim, name="user_embedding")(user)
    item_vector = keras.layers.Embedding(items, dim, name="item_embedding")(item)
    item_bias = keras.layers.Embedding(items, 1, name="item_bias")(item)
    logit = keras.layers.Add(name="logit")([keras.layers.Dot(axes=1)([user_vector, item_vector]), item_bias])
    return keras.Model({"user": user, "item": item}, logit, name="recommender")


def main():
    args = parse_args()
    hvdclip.init()
    rank, size = hvdclip.rank(), hvdclip.size()
    keras.utils.set_random_seed(1234)

    user, item, click, true_logit = generate_clicks(args.users, args.items, args.impressions)
    split = int(0.9 * len(user))
    examples = tf.data.Dataset.from_tensor_slices(({"user": user, "item": item}, click[:, None]))
    train, held_out = examples.take(split), examples.skip(split)

    trainer = hvdclip.HvdClipTrainer(
        build_model(args.users, args.items, args.dim),
        keras.optimizers.Adam(args.lr),
        keras.losses.BinaryCrossentropy(from_logits=True),
        clip=CLIPS[args.clip](args.clip_threshold),
        reduction=hvdclip.Reduction(sparse_as_dense=args.sparse_as_dense),
    )
    trainer.fit(
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle_buffer=split // size,
        validation_data=held_out,
        validation_metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
        verbose=args.verbose,
    )
    results = trainer.evaluate(held_out, batch_size=4096, metrics=[keras.metrics.AUC(from_logits=True, name="auc")])
    if rank == 0:
        best = roc_auc_score(click[split:], true_logit[split:])
        print(
            f"held-out AUC {results['auc']:.3f} on {len(user) - split} impressions ({size} ranks); "
            f"the hidden click model scores {best:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
