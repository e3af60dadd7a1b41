"""Bad input, swept: every public argument gets a wrong-type case and, where it has a range, an
out-of-range case. Each case asserts the exact error type and that the message names the argument.

One table per API surface: (argument, kind, bad value, error, message fragment). `kind` is "type"
(wrong kind of value) or "range" (right kind, not allowed; for transforms: not a usable transform).
Booleans and callables have only "type" cases. `test_every_public_argument_has_its_cases` keeps the
tables complete: an argument added to the API without a row here fails it.
"""

from __future__ import annotations

import argparse
import inspect
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import keras
import pytest
import tensorflow as tf

import hvdclip
import hvdclip.keras
from hvdclip.launch import Host, LaunchSettings, main
from hvdclip.launch.cli import _parser
from support import make_data, make_mlp

REPO = Path(__file__).resolve().parents[2]


class Case(NamedTuple):
    argument: str  # The parameter, as in the signature.
    kind: str  # "type" or "range".
    bad: Any
    error: type[Exception]
    fragment: str  # A regular expression the message must contain.
    named: str  # How the message names the argument (a CLI flag for launcher settings).


def table(*rows: tuple) -> list:
    """pytest params from (argument, kind, bad, error, fragment[, named]) rows, with readable ids."""
    params = []
    for row in rows:
        case = Case(*row) if len(row) == 6 else Case(*row, named=row[0])
        params.append(pytest.param(case, id=f"{case.argument}-{case.kind}"))
    return params


def assert_rejected(call, case: Case) -> None:
    with pytest.raises(Exception) as caught:
        call()
    message = str(caught.value)
    assert type(caught.value) is case.error, f"{type(caught.value).__name__}: {message}"
    assert re.search(case.fragment, message), message
    named = re.escape(case.named)
    assert re.search(rf"`{named}`|(?<![\w-]){named}[=\[]", message), f"the message does not name {case.named}: {message}"


def bad_value(case: Case) -> Any:
    """The case's bad value; a function in the table builds it (a model, an optimizer) when needed."""
    return case.bad() if inspect.isfunction(case.bad) else case.bad


def sweep(surfaces: dict) -> list:
    """(surface, case) params from {surface: (valid arguments, table)}; a case replaces one argument."""
    return [pytest.param(s, *p.values, id=f"{s.__name__}-{p.id}") for s, (_, params) in surfaces.items() for p in params]


X, Y = make_data(seed=0, n=8)
BATCHES = tf.data.Dataset.from_tensor_slices((X, Y)).batch(4)
EMPTY = BATCHES.take(0)
X_ONLY = tf.data.Dataset.from_tensor_slices(X).batch(4)


def frozen_mlp() -> keras.Model:
    model = make_mlp(seed=1, name="frozen")
    model.trainable = False
    return model


# A GradientTransform is a NamedTuple, so it can be built with anything in it.
BROKEN_TRANSFORM = hvdclip.GradientTransform(init=1.0, update=None)

# ------------------------------------------------------------------------------------ trainer

# Valid arguments of each surface sit beside its table; a case replaces one of them.
TRAINER_ARGS = {"model": make_mlp(seed=1), "optimizer": keras.optimizers.Adam(), "loss_fn": keras.losses.MeanSquaredError()}
TRAINER = table(
    ("model", "type", "not a model", TypeError, r"`model` must be a keras.Model \(Keras 3\)\. Received: model='not a model'$"),
    ("model", "range", frozen_mlp, ValueError, r"`model` has no trainable variables .*Received: model='frozen'$"),
    ("optimizer", "type", object(), TypeError, r"`optimizer` must be a Keras 3 optimizer .*Received: optimizer=<object"),
    ("optimizer", "range", lambda: keras.optimizers.Adam(clipnorm=1.0), ValueError, r"`optimizer` clips by itself \(clipnorm=1\.0\)"),
    ("loss_fn", "type", 3, TypeError, r"`loss_fn` must be callable\. Received: loss_fn=3$"),
    ("clip", "type", 1.0, TypeError, r"`clip` must be a GradientTransform .*, or None\. Received: clip=1\.0$"),
    ("clip", "range", BROKEN_TRANSFORM, TypeError, r"`clip` must be a GradientTransform .*Received: clip=GradientTransform\(init=1\.0"),
    ("skip_nonfinite", "type", "yes", TypeError, r"`skip_nonfinite` must be True or False\. Received: skip_nonfinite='yes'$"),
    ("abort_after_skips", "type", 2.5, TypeError, r"`abort_after_skips` must be an integer >= 1\. Received: abort_after_skips=2\.5$"),
    ("abort_after_skips", "range", 0, ValueError, r"`abort_after_skips` must be an integer >= 1\. Received: abort_after_skips=0$"),
    ("reduction", "type", "fp16", TypeError, r"`reduction` must be an hvdclip.Reduction, .*Received: reduction='fp16'$"),
    ("reduction", "range", lambda: hvdclip.keras.DistributedOptimizer(keras.optimizers.SGD()), TypeError,
     r"`reduction` must be an hvdclip.Reduction, .*Received: reduction=<"),
    ("accumulation_steps", "type", 2.0, TypeError, r"`accumulation_steps` must be an integer >= 1\. Received: accumulation_steps=2\.0$"),
    ("accumulation_steps", "range", 0, ValueError, r"`accumulation_steps` must be an integer >= 1\. Received: accumulation_steps=0$"),
    ("check_consistency_every", "type", "5", TypeError, r"`check_consistency_every` must be an integer >= 1\. Received: check_consistency_every='5'$"),
    ("check_consistency_every", "range", -1, ValueError, r"`check_consistency_every` must be an integer >= 1\. Received: check_consistency_every=-1$"),
    ("metrics", "type", ["accuracy"], TypeError, r"`metrics` must be a list of keras.metrics.Metric objects.*Received: metrics=\['accuracy'\]$"),
    ("metrics", "range", lambda: [keras.metrics.Mean(name="m"), keras.metrics.Mean(name="m")], ValueError,
     r"`metrics` must have distinct names other than 'loss'\. Received: names \['m', 'm'\]$"),
)  # fmt: skip


FIT = table(
    ("dataset", "type", [(1, 2)], TypeError, r"`dataset` must be a tf.data.Dataset of \(x, y\) or \(x, y, sample_weight\) batches\. Received: dataset=\[\(1, 2\)\]$"),
    ("dataset", "range", X_ONLY, ValueError, r"`dataset` must be a tf.data.Dataset of \(x, y\) or \(x, y, sample_weight\) batches\. Received: dataset=<"),
    ("dataset", "range", EMPTY, ValueError, r"`dataset` must not be empty\. Received: dataset=<"),
    ("epochs", "type", "2", TypeError, r"`epochs` must be an integer >= 1\. Received: epochs='2'$"),
    ("epochs", "range", 0, ValueError, r"`epochs` must be an integer >= 1\. Received: epochs=0$"),
    ("steps_per_epoch", "type", 1.5, TypeError, r"`steps_per_epoch` must be an integer >= 1\. Received: steps_per_epoch=1\.5$"),
    ("steps_per_epoch", "range", 0, ValueError, r"`steps_per_epoch` must be an integer >= 1\. Received: steps_per_epoch=0$"),
    ("batch_size", "type", "4", TypeError, r"`batch_size` must be an integer >= 1\. Received: batch_size='4'$"),
    ("batch_size", "range", 0, ValueError, r"`batch_size` must be an integer >= 1\. Received: batch_size=0$"),
    ("shuffle_buffer", "type", 2.5, TypeError, r"`shuffle_buffer` must be an integer >= 1\. Received: shuffle_buffer=2\.5$"),
    ("shuffle_buffer", "range", 0, ValueError, r"`shuffle_buffer` must be an integer >= 1\. Received: shuffle_buffer=0$"),
    ("shard", "type", 1, TypeError, r"`shard` must be 'auto', 'files', 'elements' or False \(True means 'elements'\)\. Received: shard=1$"),
    ("shard", "range", "yes", ValueError, r"`shard` must be 'auto', 'files', 'elements' or False \(True means 'elements'\)\. Received: shard='yes'$"),
    ("validation_data", "type", [1], TypeError, r"`validation_data` must be a tf.data.Dataset of \(x, y\) or \(x, y, sample_weight\) batches\. Received: validation_data=\[1\]$"),
    ("validation_data", "range", EMPTY, ValueError, r"`validation_data` must not be empty\. Received: validation_data=<"),
    ("validation_metrics", "type", ["mae"], TypeError, r"`validation_metrics` must be a list of keras.metrics.Metric objects.*Received: validation_metrics=\['mae'\]$"),
    ("validation_metrics", "range", lambda: [keras.metrics.Mean(name="loss")], ValueError,
     r"`validation_metrics` must have distinct names other than 'loss'\. Received: names \['loss'\]$"),
    ("callbacks", "type", "x", TypeError, r"`callbacks` must be a list of Keras callbacks or hvdclip.Callback objects\. Received: callbacks='x'$"),
    ("class_weight", "type", [1.0], TypeError, r"`class_weight` must be a dict from class index .*Received: class_weight=\[1\.0\]$"),
    ("class_weight", "range", {0: -2.0}, ValueError, r"`class_weight\[0\]` must be a number >= 0\. Received: class_weight\[0\]=-2\.0$", "class_weight[0]"),
    ("verbose", "type", "1", TypeError, r"`verbose` must be an integer >= 0 and <= 2\. Received: verbose='1'$"),
    ("verbose", "range", 3, ValueError, r"`verbose` must be an integer >= 0 and <= 2\. Received: verbose=3$"),
    ("elastic", "type", "yes", TypeError, r"`elastic` must be an hvdclip.Elastic\(\.\.\.\), True, False or None\. Received: elastic='yes'$"),
)  # fmt: skip


TRAIN_STEP = table(
    ("x", "type", "abc", TypeError, r"`x` must be a batch: a numeric tensor or NumPy array .*Received: x='abc'$"),
    ("x", "range", X[:3], ValueError, r"`x`, `y` \(and `sample_weight`\) must hold the same number of examples .*Received: x with 3 rows, y with 8 rows$"),
    ("x", "range", X[:0], ValueError, r"`x` must hold at least one example\. Received: x and y with 0 rows$"),
    ("y", "type", None, TypeError, r"`y` must be a batch: .*Received: y=None$"),
    ("y", "range", Y[:5], ValueError, r"`x`, `y` \(and `sample_weight`\) must hold the same number of examples .*Received: x with 8 rows, y with 5 rows$"),
    ("sample_weight", "type", "w", TypeError, r"`sample_weight` must be a batch: .*Received: sample_weight='w'$"),
    ("sample_weight", "range", Y[:3, 0], ValueError, r"must hold the same number of examples .*sample_weight with 3 rows$"),
)  # fmt: skip


EVALUATE = table(
    ("dataset", "type", [1], TypeError, r"`dataset` must be a tf.data.Dataset of \(x, y\) or \(x, y, sample_weight\) batches\. Received: dataset=\[1\]$"),
    ("dataset", "range", X_ONLY, ValueError, r"`dataset` must be a tf.data.Dataset of \(x, y\) or \(x, y, sample_weight\) batches\. Received: dataset=<"),
    ("metrics", "type", "acc", TypeError, r"`metrics` must be a list of keras.metrics.Metric objects.*Received: metrics='acc'$"),
    ("metrics", "range", lambda: [keras.metrics.Mean(name="m"), keras.metrics.Mean(name="m")], ValueError,
     r"`metrics` must have distinct names other than 'loss'\. Received: names \['m', 'm'\]$"),
    ("batch_size", "type", 1.0, TypeError, r"`batch_size` must be an integer >= 1\. Received: batch_size=1\.0$"),
    ("batch_size", "range", 0, ValueError, r"`batch_size` must be an integer >= 1\. Received: batch_size=0$"),
    ("shard", "type", 1, TypeError, r"`shard` must be 'auto', 'files', 'elements' or False \(True means 'elements'\)\. Received: shard=1$"),
    ("shard", "range", "files ", ValueError, r"`shard` must be 'auto', 'files', 'elements' or False \(True means 'elements'\)\. Received: shard='files '$"),
)  # fmt: skip


RESTORE = table(
    ("path", "type", None, TypeError, r"`path` must be a checkpoint directory or prefix\. Received: path=None$"),
    ("path", "range", "", ValueError, r"`path` must be a checkpoint directory or prefix, not empty\. Received: path=''$"),
    ("missing_ok", "type", 1, TypeError, r"`missing_ok` must be True or False\. Received: missing_ok=1$"),
)  # fmt: skip


SAVE = table(
    ("path", "type", 3, TypeError, r"`path` must be a file name ending in '.keras'\. Received: path=3$"),
    ("path", "range", "model.h5", ValueError, r"`path` must be a file name ending in '.keras'\. Received: path='model.h5'$"),
)  # fmt: skip


METHODS = {
    hvdclip.HvdClipTrainer.fit: ({"dataset": BATCHES, "verbose": 0}, FIT),
    hvdclip.HvdClipTrainer.train_step: ({"x": X, "y": Y}, TRAIN_STEP),
    hvdclip.HvdClipTrainer.evaluate: ({"dataset": BATCHES}, EVALUATE),
    hvdclip.HvdClipTrainer.restore: ({"path": "ckpts"}, RESTORE),
    hvdclip.HvdClipTrainer.save: ({"path": "model.keras"}, SAVE),
}


@pytest.mark.parametrize("method, case", sweep(METHODS))
def test_trainer_methods(method, case):
    trainer = hvdclip.HvdClipTrainer(make_mlp(seed=1), keras.optimizers.Adam(), keras.losses.MeanSquaredError())
    args = {**METHODS[method][0], case.argument: bad_value(case)}
    if getattr(args[case.argument], "shape", (1,))[0] == 0:
        args["y"] = Y[:0]  # An empty batch: y too, or the complaint would be that they differ.
    assert_rejected(lambda: method(trainer, **args), case)
    assert trainer.broadcast_count == 0, "rejected before the start-up broadcast, so before any tracing"


# --------------------------------------------------------------------------------- transforms

TRANSFORMS = {
    hvdclip.clip_by_value: ({"clip_value": 1.0}, table(
        ("clip_value", "type", True, TypeError, r"`clip_value` must be a number > 0\. Received: clip_value=True$"),
        ("clip_value", "range", 0.0, ValueError, r"`clip_value` must be a number > 0\. Received: clip_value=0\.0$"),
        ("clip_value", "range", float("inf"), ValueError, r"`clip_value` must be a number > 0\. Received: clip_value=inf$"),
    )),
    hvdclip.clip_by_norm: ({"max_norm": 1.0}, table(
        ("max_norm", "type", None, TypeError, r"`max_norm` must be a number > 0\. Received: max_norm=None$"),
        ("max_norm", "range", -2, ValueError, r"`max_norm` must be a number > 0\. Received: max_norm=-2$"),
    )),
    hvdclip.clip_by_global_norm: ({"max_norm": 1.0}, table(
        ("max_norm", "type", "1.0", TypeError, r"`max_norm` must be a number > 0\. Received: max_norm='1\.0'$"),
        ("max_norm", "range", float("nan"), ValueError, r"`max_norm` must be a number > 0\. Received: max_norm=nan$"),
    )),
    hvdclip.adaptive_grad_clip: ({}, table(
        ("clipping", "type", "0.01", TypeError, r"`clipping` must be a number > 0\. Received: clipping='0\.01'$"),
        ("clipping", "range", 0, ValueError, r"`clipping` must be a number > 0\. Received: clipping=0$"),
        ("eps", "type", [1e-3], TypeError, r"`eps` must be a number > 0\. Received: eps=\[0\.001\]$"),
        ("eps", "range", -1e-3, ValueError, r"`eps` must be a number > 0\. Received: eps=-0\.001$"),
        ("exclude", "type", "logits", TypeError, r"`exclude` must be a tuple or list of str \(regular expressions\)\. Received: exclude='logits'$"),
        ("exclude", "range", ["dense_(1"], ValueError, r"`exclude` must be .*; exclude\[0\] is not one .*Received: exclude=\['dense_\(1'\]$"),
    )),
    hvdclip.autoclip: ({}, table(
        ("percentile", "type", "10", TypeError, r"`percentile` must be a number > 0 and <= 100\. Received: percentile='10'$"),
        ("percentile", "range", 100.5, ValueError, r"`percentile` must be a number > 0 and <= 100\. Received: percentile=100\.5$"),
        ("history", "type", 10.0, TypeError, r"`history` must be an integer >= 1\. Received: history=10\.0$"),
        ("history", "range", 0, ValueError, r"`history` must be an integer >= 1\. Received: history=0$"),
    )),
    hvdclip.zclip: ({}, table(
        ("alpha", "type", "0.9", TypeError, r"`alpha` must be a number > 0 and < 1\. Received: alpha='0\.9'$"),
        ("alpha", "range", 1.0, ValueError, r"`alpha` must be a number > 0 and < 1\. Received: alpha=1\.0$"),
        ("z_threshold", "type", None, TypeError, r"`z_threshold` must be a number > 0\. Received: z_threshold=None$"),
        ("z_threshold", "range", -1, ValueError, r"`z_threshold` must be a number > 0\. Received: z_threshold=-1$"),
        ("warmup_steps", "type", 1.0, TypeError, r"`warmup_steps` must be an integer >= 1\. Received: warmup_steps=1\.0$"),
        ("warmup_steps", "range", 0, ValueError, r"`warmup_steps` must be an integer >= 1\. Received: warmup_steps=0$"),
    )),
    hvdclip.zero_nonfinite: ({"inner": hvdclip.autoclip()}, table(
        ("inner", "type", 1.0, TypeError, r"`inner` must be a GradientTransform .*Received: inner=1\.0$"),
        ("inner", "range", BROKEN_TRANSFORM, TypeError, r"`inner` must be a GradientTransform .*Received: inner=GradientTransform\("),
        ("max_consecutive_skips", "type", 1.5, TypeError, r"`max_consecutive_skips` must be an integer >= 1\. Received: max_consecutive_skips=1\.5$"),
        ("max_consecutive_skips", "range", 0, ValueError, r"`max_consecutive_skips` must be an integer >= 1\. Received: max_consecutive_skips=0$"),
    )),
    hvdclip.chain: ({}, table(
        ("transforms", "type", 1.0, TypeError, r"`transforms\[1\]` must be a GradientTransform .*Received: transforms\[1\]=1\.0$", "transforms[1]"),
        ("transforms", "range", BROKEN_TRANSFORM, TypeError, r"`transforms\[1\]` must be a GradientTransform .*Received: transforms\[1\]=GradientTransform\(",
         "transforms[1]"),
    )),
}  # fmt: skip


@pytest.mark.parametrize("factory, case", sweep(TRANSFORMS))
def test_transforms(factory, case):
    if factory is hvdclip.chain:  # Positional only: the bad one second, after a good one.
        call = lambda: hvdclip.chain(hvdclip.clip_by_norm(1.0), case.bad)  # noqa: E731
    else:
        call = lambda: factory(**{**TRANSFORMS[factory][0], case.argument: case.bad})  # noqa: E731
    assert_rejected(call, case)


# ------------------------------------------------------------------- schedules and callbacks

class _Subclassed(keras.Model):
    def call(self, x):
        return x


OTHERS = {
    hvdclip.sync_batch_norm: ({"model": make_mlp(seed=1)}, table(
        ("model", "type", lambda: keras.layers.Dense(3), TypeError, r"`model` must be a keras.Model \(Keras 3\)\. Received: model="),
        ("model", "range", lambda: _Subclassed(), ValueError, r"`model` is a subclassed keras.Model .*Received: model="),
    )),
    hvdclip.ScaledWarmup: ({"base_lr": 0.1, "steps_per_epoch": 10}, table(
        ("base_lr", "type", "fast", TypeError, r"`base_lr` must be a number > 0\. Received: base_lr='fast'$"),
        ("base_lr", "range", 0, ValueError, r"`base_lr` must be a number > 0\. Received: base_lr=0$"),
        ("steps_per_epoch", "type", "10", TypeError, r"`steps_per_epoch` must be an integer >= 1\. Received: steps_per_epoch='10'$"),
        ("steps_per_epoch", "range", 0, ValueError, r"`steps_per_epoch` must be an integer >= 1\. Received: steps_per_epoch=0$"),
        ("warmup_epochs", "type", "5", TypeError, r"`warmup_epochs` must be a number >= 0\. Received: warmup_epochs='5'$"),
        ("warmup_epochs", "range", -1, ValueError, r"`warmup_epochs` must be a number >= 0\. Received: warmup_epochs=-1$"),
        ("size", "type", 2.0, TypeError, r"`size` must be an integer >= 1\. Received: size=2\.0$"),
        ("size", "range", 0, ValueError, r"`size` must be an integer >= 1\. Received: size=0$"),
    )),
    hvdclip.Elastic: ({}, table(
        ("commit_every", "type", 2.0, TypeError, r"`commit_every` must be an integer >= 1\. Received: commit_every=2\.0$"),
        ("commit_every", "range", 0, ValueError, r"`commit_every` must be an integer >= 1\. Received: commit_every=0$"),
        ("learning_rate", "type", 0.1, TypeError, r"`learning_rate` must be one of \('scale', 'keep'\)\. Received: learning_rate=0\.1$"),
        ("learning_rate", "range", "linear", ValueError, r"`learning_rate` must be one of \('scale', 'keep'\)\. Received: learning_rate='linear'$"),
    )),
    hvdclip.TensorBoard: ({"log_dir": "logs"}, table(
        ("log_dir", "type", None, TypeError, r"`log_dir` must be a path\. Received: log_dir=None$"),
        ("log_dir", "range", "", ValueError, r"`log_dir` must be a path, not empty\. Received: log_dir=''$"),
        ("every_n_steps", "type", 1.5, TypeError, r"`every_n_steps` must be an integer >= 1\. Received: every_n_steps=1\.5$"),
        ("every_n_steps", "range", 0, ValueError, r"`every_n_steps` must be an integer >= 1\. Received: every_n_steps=0$"),
    )),
    hvdclip.CheckpointSaver: ({"directory": "ckpts"}, table(
        ("directory", "type", 3, TypeError, r"`directory` must be a path\. Received: directory=3$"),
        ("directory", "range", "", ValueError, r"`directory` must be a path, not empty\. Received: directory=''$"),
        ("every_n_steps", "type", "1", TypeError, r"`every_n_steps` must be an integer >= 1\. Received: every_n_steps='1'$"),
        ("every_n_steps", "range", 0, ValueError, r"`every_n_steps` must be an integer >= 1\. Received: every_n_steps=0$"),
        ("max_to_keep", "type", 1.0, TypeError, r"`max_to_keep` must be an integer >= 1\. Received: max_to_keep=1\.0$"),
        ("max_to_keep", "range", 0, ValueError, r"`max_to_keep` must be an integer >= 1\. Received: max_to_keep=0$"),
    )),
}  # fmt: skip


# -------------------------------------------------------------------------------------- doors

REDUCTION_ROWS = (
    # A choice among names and Horovod's constants: anything else, a number included, is not one of them.
    ("compression", "type", 3, ValueError, r"`compression` must be 'none', 'fp16', None, hvd.Compression.none or hvd.Compression.fp16\. Received: compression=3$"),
    ("compression", "range", "bf16", ValueError, r"`compression` must be .*Received: compression='bf16'$"),
    ("sparse_as_dense", "type", "no", TypeError, r"`sparse_as_dense` must be True or False\. Received: sparse_as_dense='no'$"),
    ("op", "type", 3, ValueError, r"`op` must be one of \['adasum', 'average', 'sum'\] or hvd.Average, hvd.Sum, hvd.Adasum\. Received: op=3$"),
    ("op", "range", "max", ValueError, r"`op` must be one of .*Received: op='max'$"),
    ("gradient_predivide_factor", "type", "2", TypeError,
     r"`gradient_predivide_factor` must be a number > 0\. Received: gradient_predivide_factor='2'$"),
    ("gradient_predivide_factor", "range", 0.0, ValueError,
     r"`gradient_predivide_factor` must be a number > 0\. Received: gradient_predivide_factor=0\.0$"),
    ("groups", "type", 1.5, TypeError, r"`groups` must be an integer >= 0\. Received: groups=1\.5$"),
    ("groups", "range", -1, ValueError, r"`groups` must be an integer >= 0\. Received: groups=-1$"),
    ("process_set", "type", 0, TypeError, r"`process_set` must be a Horovod ProcessSet or None\. Received: process_set=0$"),
    ("process_set", "range", "global", TypeError, r"`process_set` must be a Horovod ProcessSet or None\. Received: process_set='global'$"),
    ("device_dense", "type", 0, TypeError, r"`device_dense` must be a device name such as '/gpu:0', or ''\. Received: device_dense=0$"),
    ("device_dense", "range", None, TypeError, r"`device_dense` must be a device name .*Received: device_dense=None$"),
    ("device_sparse", "type", 0, TypeError, r"`device_sparse` must be a device name such as '/gpu:0', or ''\. Received: device_sparse=0$"),
    ("device_sparse", "range", None, TypeError, r"`device_sparse` must be a device name .*Received: device_sparse=None$"),
)
CLIPPER_ROWS = (
    ("optimizer", "type", object(), TypeError, r"`optimizer` must be a Keras 3 optimizer .*Received: optimizer=<object"),
    ("optimizer", "range", lambda: keras.optimizers.SGD(global_clipnorm=1.0), ValueError,
     r"`optimizer` clips by itself \(global_clipnorm=1\.0\), before the gradient is reduced"),
    ("clip", "type", 1.0, TypeError, r"`clip` must be a GradientTransform .*, or None\. Received: clip=1\.0$"),
    ("clip", "range", BROKEN_TRANSFORM, TypeError, r"`clip` must be a GradientTransform .*Received: clip=GradientTransform\(init=1\.0"),
    ("skip_nonfinite", "type", "yes", TypeError, r"`skip_nonfinite` must be True or False\. Received: skip_nonfinite='yes'$"),
    ("reduction", "type", "fp16", TypeError, r"`reduction` must be an hvdclip.Reduction.*Received: reduction='fp16'$"),
    ("reduction", "range", lambda: keras.optimizers.SGD(), TypeError, r"`reduction` must be an hvdclip.Reduction.*Received: reduction=<"),
)
ACCUMULATION_ROWS = (
    ("accumulation_steps", "type", 2.0, TypeError, r"`accumulation_steps` must be an integer >= 1\. Received: accumulation_steps=2\.0$"),
    ("accumulation_steps", "range", 0, ValueError, r"`accumulation_steps` must be an integer >= 1\. Received: accumulation_steps=0$"),
    ("average_accumulated", "type", 1, TypeError, r"`average_accumulated` must be True or False\. Received: average_accumulated=1$"),
)
# Horovod's arguments of hvdclip.keras.DistributedOptimizer (its reduction's, under Horovod's names).
HOROVOD_OPTIMIZER_ROWS = tuple(row for row in REDUCTION_ROWS if row[0] not in ("op", "groups", "process_set")) + (
    ("op", "type", 3, ValueError, r"`op` must be one of .*Received: op=3$"),
    ("op", "range", "adasum", ValueError, r"`op` must be hvd.Average or hvd.Sum, as for Horovod's DistributedOptimizer\. Received: op='adasum'$"),
    ("groups", "type", 1.5, TypeError, r"`groups` must be an integer >= 0\. Received: groups=1\.5$"),
    ("groups", "range", [3], TypeError, r"`groups` must be an int >= 0 or a list of non-empty lists of variables\. Received: groups=\[3\]$"),
    ("num_groups", "type", "2", TypeError, r"`num_groups` must be an integer >= 0\. Received: num_groups='2'$"),
    ("num_groups", "range", -1, ValueError, r"`num_groups` must be an integer >= 0\. Received: num_groups=-1$"),
    ("process_set", "type", 0, TypeError, r"`process_set` must be a Horovod ProcessSet or None\. Received: process_set=0$"),
    ("process_set", "range", "global", TypeError, r"`process_set` must be a Horovod ProcessSet or None\. Received: process_set='global'$"),
    ("backward_passes_per_step", "type", 2.0, TypeError,
     r"`backward_passes_per_step` must be an integer >= 1\. Received: backward_passes_per_step=2\.0$"),
    ("backward_passes_per_step", "range", 0, ValueError,
     r"`backward_passes_per_step` must be an integer >= 1\. Received: backward_passes_per_step=0$"),
    ("average_aggregated_gradients", "type", "yes", TypeError,
     r"`average_aggregated_gradients` must be True or False\. Received: average_aggregated_gradients='yes'$"),
    ("scale_local_gradients", "type", 0, TypeError, r"`scale_local_gradients` must be True or False\. Received: scale_local_gradients=0$"),
    ("name", "type", 3, TypeError, r"`name` must be a non-empty str or None\. Received: name=3$"),
    ("name", "range", "", ValueError, r"`name` must be a non-empty str or None\. Received: name=''$"),
)


def unbuilt_model() -> keras.Model:
    return keras.Sequential([keras.layers.Dense(1)], name="unbuilt")


def uncompiled_model() -> keras.Model:
    return make_mlp(seed=1, name="uncompiled")


DOORS = {
    hvdclip.Clipper: ({"optimizer": keras.optimizers.SGD()}, table(*CLIPPER_ROWS, *ACCUMULATION_ROWS)),
    hvdclip.Reduction: ({}, table(*REDUCTION_ROWS)),
    hvdclip.keras.DistributedOptimizer: ({"optimizer": keras.optimizers.SGD()}, table(
        *CLIPPER_ROWS, *HOROVOD_OPTIMIZER_ROWS,
        ("reduction", "range", lambda: hvdclip.Reduction(), ValueError,  # And Horovod's arguments too: one or the other.
         r"Pass the reduction either as `reduction=hvdclip.Reduction\(...\)` or as Horovod's arguments, not both\. Received: reduction=.* and sparse_as_dense$"),
    )),
    hvdclip.DistributedGradientTape: ({"tape": tf.GradientTape(), "clipper": hvdclip.Clipper(keras.optimizers.SGD())}, table(
        ("tape", "type", "tape", TypeError, r"`tape` must be a tf\.GradientTape\. Received: tape='tape'$"),
        ("clipper", "type", keras.optimizers.SGD(), TypeError, r"`clipper` must be an hvdclip\.Clipper made once outside the step.*Received: clipper=<"),
        ("has_data", "type", True, TypeError, r"`has_data` must be a bool scalar tensor .*Received: has_data=True$"),
        ("has_data", "range", lambda: tf.constant(1), TypeError, r"`has_data` must be a bool scalar tensor .*Received: has_data=<"),
    )),
    hvdclip.Lockstep: ({"batches": BATCHES, "clipper": hvdclip.Clipper(keras.optimizers.SGD())}, table(
        ("batches", "type", 3, TypeError, r"`batches` must be an iterable of batches, e.g. a tf.data.Dataset\. Received: batches=3$"),
        ("clipper", "type", "c", TypeError, r"`clipper` must be the hvdclip.Clipper that runs the steps\. Received: clipper='c'$"),
    )),
    hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback: ({}, table(
        ("root_rank", "type", "0", TypeError, r"`root_rank` must be an integer >= 0\. Received: root_rank='0'$"),
        ("root_rank", "range", 1, ValueError, r"`root_rank` must be 0: hvdclip starts every rank from rank 0.*Received: root_rank=1$"),
        ("device", "type", 0, TypeError, r"`device` must be a device name such as '/cpu:0', or ''\. Received: device=0$"),
        ("device", "range", None, TypeError, r"`device` must be a device name .*Received: device=None$"),
        ("local_variables", "type", 3, ValueError, r"`local_variables` must be None: hvdclip broadcasts every model variable.*Received: local_variables=3$"),
        ("local_variables", "range", lambda: [tf.Variable(1.0)], ValueError, r"`local_variables` must be None: .*Received: local_variables=\["),
    )),
    hvdclip.keras.callbacks.MetricAverageCallback: ({}, table(
        ("device", "type", 0, TypeError, r"`device` must be a device name such as '/cpu:0', or ''\. Received: device=0$"),
        ("device", "range", None, TypeError, r"`device` must be a device name .*Received: device=None$"),
    )),
    hvdclip.keras.broadcast_initial_state: ({"model": make_mlp(seed=1)}, table(
        ("model", "type", "m", TypeError, r"`model` must be a keras\.Model \(Keras 3\)\. Received: model='m'$"),
        ("model", "range", uncompiled_model, ValueError, r"`model` 'uncompiled' is not compiled: call model\.compile"),
    )),
    hvdclip.Clipper.broadcast_initial_state: ({"model": make_mlp(seed=1)}, table(
        ("model", "type", "m", TypeError, r"`model` must be a keras\.Model \(Keras 3\)\. Received: model='m'$"),
        ("model", "range", unbuilt_model, ValueError, r"`model` 'unbuilt' is not built yet .*model\.build\(input_shape\)"),
        ("extra", "type", 3, TypeError, r"`extra` must be a list of \(name, tf\.Variable\) pairs\. Received: extra=3$"),
        ("extra", "range", [("a", 1.0)], TypeError, r"`extra` must be a list of \(name, tf\.Variable\) pairs\. Received: extra=\[\('a', 1\.0\)\]$"),
    )),
}  # fmt: skip


@pytest.mark.parametrize("surface, case", sweep(DOORS))
def test_doors(surface, case):
    args = {**DOORS[surface][0], case.argument: bad_value(case)}
    if surface is hvdclip.keras.DistributedOptimizer and case.fragment.startswith("Pass the reduction"):
        args["sparse_as_dense"] = True
    if surface is hvdclip.Clipper.broadcast_initial_state:
        clipper = hvdclip.Clipper(keras.optimizers.SGD())
        assert_rejected(lambda: surface(clipper, **args), case)
        assert clipper.broadcast_count == 0
    else:
        assert_rejected(lambda: surface(**args), case)


# ----------------------------------------------------------------------------------- launcher

SETTINGS_ARGS = {"num_proc": 2, "command": ("python", "t.py")}
SETTINGS = table(
    ("num_proc", "type", "2", TypeError, r"^`-np` must be an integer >= 1\. Received: -np='2'$", "-np"),
    ("num_proc", "range", 0, ValueError, r"^`-np` must be an integer >= 1\. Received: -np=0$", "-np"),
    ("command", "type", "python t.py", TypeError, r"^`command` must be a tuple of str, program first\. Received: command='python t.py'$"),
    ("command", "range", ("",), ValueError, r"^A command to run must follow `--`.*Received: command=\[''\]$"),
    ("backend", "type", 3, ValueError, r"^`--backend` must be one of horovodrun, mpirun, srun\. Received: --backend=3$", "--backend"),
    ("backend", "range", "jsrun", ValueError, r"^`--backend` must be one of .*Received: --backend=jsrun$", "--backend"),
    ("hosts", "type", "node1:4", TypeError, r"^`hosts` must be a tuple of Host, e\.g\. \(Host\('node1', 4\),\)\. Received: hosts='node1:4'$"),
    ("hosts", "range", (Host("a", 2), Host("a", 2)), ValueError, r"^Each host must be listed once.*Received: `a` at hosts\[0\] and at hosts\[1\]$"),
    ("controller", "type", 1, ValueError, r"^`controller` must be None, 'gloo' or 'mpi'\. Received: controller=1$"),
    ("controller", "range", "tcp", ValueError, r"^`controller` must be None, 'gloo' or 'mpi'\. Received: controller='tcp'$"),
    ("env", "type", "NCCL_DEBUG", TypeError, r"^`--env` must be a tuple or list of str\. Received: --env='NCCL_DEBUG'$", "--env"),
    ("env", "range", ("A=1",), ValueError, r"^`--env` takes a variable name such as NCCL_DEBUG\. Received: --env=A=1$", "--env"),
    ("network_interfaces", "type", "eth0", TypeError,
     r"^`--network-interface` must be a tuple or list of str\. Received: --network-interface='eth0'$", "--network-interface"),
    ("network_interfaces", "range", ("eth 0",), ValueError,
     r"^`--network-interface` takes interface names such as eth0\. Received: --network-interface='eth 0'$", "--network-interface"),
    ("fusion_threshold_mb", "type", 1.5, TypeError,
     r"^`--fusion-threshold-mb` must be an integer >= 0\. Received: --fusion-threshold-mb=1\.5$", "--fusion-threshold-mb"),
    ("fusion_threshold_mb", "range", -1, ValueError,
     r"^`--fusion-threshold-mb` must be an integer >= 0\. Received: --fusion-threshold-mb=-1$", "--fusion-threshold-mb"),
    ("cycle_time_ms", "type", "1", TypeError, r"^`--cycle-time-ms` must be a number >= 0\. Received: --cycle-time-ms='1'$", "--cycle-time-ms"),
    ("cycle_time_ms", "range", -1.0, ValueError, r"^`--cycle-time-ms` must be a number >= 0\. Received: --cycle-time-ms=-1\.0$", "--cycle-time-ms"),
    ("verbose", "type", "yes", TypeError, r"^`--verbose` must be True or False\. Received: --verbose='yes'$", "--verbose"),
    ("srun_mpi", "type", 3, TypeError, r"^`--srun-mpi` must be an MPI plugin name such as pmix\. Received: --srun-mpi=3$", "--srun-mpi"),
    ("srun_mpi", "range", "", ValueError, r"^`--srun-mpi` must be an MPI plugin name such as pmix\. Received: --srun-mpi=''$", "--srun-mpi"),
    ("ssh_port", "type", "22", TypeError, r"^`--ssh-port` must be an integer >= 1 and <= 65535\. Received: --ssh-port='22'$", "--ssh-port"),
    ("ssh_port", "range", 70000, ValueError, r"^`--ssh-port` must be an integer >= 1 and <= 65535\. Received: --ssh-port=70000$", "--ssh-port"),
    ("ssh_identity_file", "type", 3, TypeError,
     r"^`--ssh-identity-file` must be a path without whitespace\. Received: --ssh-identity-file=3$", "--ssh-identity-file"),
    ("ssh_identity_file", "range", "", ValueError,
     r"^`--ssh-identity-file` must be a path without whitespace\. Received: --ssh-identity-file=''$", "--ssh-identity-file"),
    ("ssh_options", "type", "Port=22", TypeError, r"^`--ssh-option` must be a tuple or list of str\. Received: --ssh-option='Port=22'$", "--ssh-option"),
    ("ssh_options", "range", ("Port",), ValueError,
     r"^`--ssh-option` takes KEY=VALUE without spaces, such as ServerAliveInterval=5\. Received: --ssh-option='Port'$", "--ssh-option"),
    ("mca", "type", "btl=tcp", TypeError, r"^`--mca` must be a tuple or list of str\. Received: --mca='btl=tcp'$", "--mca"),
    ("mca", "range", ("btl tcp",), ValueError, r"^`--mca` takes KEY=VALUE without spaces, such as btl_tcp_links=2\. Received: --mca='btl tcp'$", "--mca"),
    # mpirun hands these to each remote host's daemon through a shell, unescaped.
    ("ssh_identity_file", "range", "/keys/$USER/id", ValueError,
     r"^`--ssh-identity-file` cannot contain any of \" \$ ` \\: Open MPI passes it to each remote host's daemon through a shell, "
     r"unescaped\. Received: --ssh-identity-file='/keys/\$USER/id'$", "--ssh-identity-file"),
    ("ssh_options", "range", ('ProxyJump="bastion"',), ValueError,
     r"^`--ssh-option` cannot contain any of .*Received: --ssh-option='ProxyJump=\"bastion\"'$", "--ssh-option"),
    ("mca", "range", ("orte_tmpdir_base=/tmp/`id`",), ValueError, r"^`--mca` cannot contain any of .*Received: --mca='orte_tmpdir_base=/tmp/`id`'$", "--mca"),
    ("gloo_timeout_s", "type", 1.5, TypeError, r"^`--gloo-timeout` must be an integer >= 1\. Received: --gloo-timeout=1\.5$", "--gloo-timeout"),
    ("gloo_timeout_s", "range", 0, ValueError, r"^`--gloo-timeout` must be an integer >= 1\. Received: --gloo-timeout=0$", "--gloo-timeout"),
    ("step_timeout_s", "type", "60", TypeError, r"^`--step-timeout` must be a number > 0\. Received: --step-timeout='60'$", "--step-timeout"),
    ("step_timeout_s", "range", -1.0, ValueError, r"^`--step-timeout` must be a number > 0\. Received: --step-timeout=-1\.0$", "--step-timeout"),
    # The elastic settings: each value is checked on its own before `elastic=False` refuses it.
    ("elastic", "type", "yes", TypeError, r"^`--elastic` must be True or False\. Received: --elastic='yes'$", "--elastic"),
    ("min_num_proc", "type", "2", TypeError, r"^`--min-np` must be an integer >= 1\. Received: --min-np='2'$", "--min-np"),
    ("min_num_proc", "range", 0, ValueError, r"^`--min-np` must be an integer >= 1\. Received: --min-np=0$", "--min-np"),
    ("max_num_proc", "type", 4.0, TypeError, r"^`--max-np` must be an integer >= 1\. Received: --max-np=4\.0$", "--max-np"),
    ("max_num_proc", "range", -4, ValueError, r"^`--max-np` must be an integer >= 1\. Received: --max-np=-4$", "--max-np"),
    ("host_discovery_script", "type", 3, TypeError,
     r"^`--host-discovery-script` must be the path of an executable file that prints `host:slots` lines\. Received: --host-discovery-script=3$",
     "--host-discovery-script"),
    ("host_discovery_script", "range", "/no/such/discover.sh", ValueError,
     r"^`--host-discovery-script` must be the path of an existing file\. Received: --host-discovery-script=/no/such/discover\.sh \(no such file\)$",
     "--host-discovery-script"),
    ("slots_per_host", "type", "2", TypeError, r"^`--slots-per-host` must be an integer >= 1\. Received: --slots-per-host='2'$", "--slots-per-host"),
    ("slots_per_host", "range", 0, ValueError, r"^`--slots-per-host` must be an integer >= 1\. Received: --slots-per-host=0$", "--slots-per-host"),
    ("elastic_timeout_s", "type", 1.5, TypeError, r"^`--elastic-timeout` must be an integer >= 1\. Received: --elastic-timeout=1\.5$", "--elastic-timeout"),
    ("elastic_timeout_s", "range", 0, ValueError, r"^`--elastic-timeout` must be an integer >= 1\. Received: --elastic-timeout=0$", "--elastic-timeout"),
    ("reset_limit", "type", "3", TypeError, r"^`--reset-limit` must be an integer >= 0\. Received: --reset-limit='3'$", "--reset-limit"),
    ("reset_limit", "range", -1, ValueError, r"^`--reset-limit` must be an integer >= 0\. Received: --reset-limit=-1$", "--reset-limit"),
)  # fmt: skip


HOST = table(
    ("name", "type", 1, TypeError, r"^`name` must be a host name or address .*Received: name=1$"),
    ("name", "range", "node 1", ValueError, r"^`name` must be a host name or address .*Received: name='node 1'$"),
    ("slots", "type", "4", TypeError, r"^`slots` must be an integer >= 1\. Received: slots='4'$"),
    ("slots", "range", 0, ValueError, r"^`slots` must be an integer >= 1\. Received: slots=0$"),
)  # fmt: skip


# Every class: the trainer, the schedule, the callbacks, LaunchSettings and Host.
CONSTRUCTORS = {
    hvdclip.HvdClipTrainer: (TRAINER_ARGS, TRAINER),
    **OTHERS,
    LaunchSettings: (SETTINGS_ARGS, SETTINGS),
    Host: ({"name": "node1", "slots": 4}, HOST),
}


@pytest.mark.parametrize("cls, case", sweep(CONSTRUCTORS))
def test_constructors(cls, case):
    args = {**CONSTRUCTORS[cls][0], case.argument: bad_value(case)}
    assert_rejected(lambda: cls(**args), case)


class CliCase(NamedTuple):
    flag: str  # The parser's first option string, or "command".
    kind: str
    argv: list[str]  # Arguments that replace or add to `-np 2 ... --dry-run -- python t.py`.
    fragment: str


def cli_table(*rows: tuple) -> list:
    return [pytest.param(CliCase(*row), id=f"{row[0]}-{row[1]}") for row in rows]


# Text flags: "type" is a value that does not parse as the flag's kind (or is missing), "range"
# one that parses but is not allowed. Flags that take no value: "type" only (a value given to them).
# An elastic job that is right but for the case's own arguments; {tmp}/discover.sh is executable.
ELASTIC = ["--elastic", "--min-np", "2", "--max-np", "2", "--host-discovery-script", "{tmp}/discover.sh"]
CLI = cli_table(
    ("-np", "type", ["-np", "two"], r"`-np` must be an integer >= 1\. Received: -np=two$"),
    ("-np", "range", ["-np", "0"], r"`-np` must be an integer >= 1\. Received: -np=0$"),
    ("--backend", "type", ["--backend"], r"argument --backend: expected one argument$"),
    ("--backend", "range", ["--backend", "pbs"], r"argument --backend: invalid choice: 'pbs'"),
    ("--timeout", "type", ["--timeout", "1m"], r"`--timeout` must be a number of seconds > 0\. Received: --timeout=1m$"),
    ("--timeout", "range", ["--timeout", "-5"], r"`--timeout` must be a number of seconds > 0\. Received: --timeout=-5$"),
    ("--dry-run", "type", ["--dry-run=1"], r"argument --dry-run: ignored explicit argument '1'$"),
    ("--verbose", "type", ["--verbose=yes"], r"argument --verbose: ignored explicit argument 'yes'$"),
    ("-H", "type", ["-H", "node1"], r"`-H` entries must be `host:N` with N >= 1\. Received: -H=node1 \(entry 'node1'\)$"),
    ("-H", "range", ["-H", "node1:0"], r"`-H` entries must be `host:N` with N >= 1\. Received: -H=node1:0"),
    ("--hostfile", "type", ["--hostfile", "{tmp}"], r"`--hostfile` must be a readable file \(Is a directory\)\. Received: --hostfile="),
    ("--hostfile", "range", ["--hostfile", "{tmp}/hosts"], r"`--hostfile` lines must be `host slots=N` or `host:N` with N >= 1\. Received: .*hosts:1"),
    ("--gloo", "type", ["--gloo=1"], r"argument --gloo: ignored explicit argument '1'$"),
    ("--mpi", "type", ["--mpi=yes"], r"argument --mpi: ignored explicit argument 'yes'$"),
    ("--env", "type", ["--env", "A=1"], r"`--env` takes a variable name such as NCCL_DEBUG\. Received: --env=A=1$"),
    ("--env", "range", ["--env", "NOT_SET"], r"`--env` must name a variable that is set in this environment\. Received: --env=NOT_SET$"),
    ("--network-interface", "type", ["--network-interface"], r"argument --network-interface: expected one argument$"),
    ("--network-interface", "range", ["--network-interface", "eth 0"], r"`--network-interface` takes interface names .*Received: --network-interface='eth 0'$"),
    ("--fusion-threshold-mb", "type", ["--fusion-threshold-mb", "64MB"], r"`--fusion-threshold-mb` must be an integer >= 0\. Received: --fusion-threshold-mb=64MB$"),
    ("--fusion-threshold-mb", "range", ["--fusion-threshold-mb", "-1"], r"`--fusion-threshold-mb` must be an integer >= 0\. Received: --fusion-threshold-mb=-1$"),
    ("--cycle-time-ms", "type", ["--cycle-time-ms", "fast"], r"`--cycle-time-ms` must be a number >= 0\. Received: --cycle-time-ms=fast$"),
    ("--cycle-time-ms", "range", ["--cycle-time-ms", "-1"], r"`--cycle-time-ms` must be a number >= 0\. Received: --cycle-time-ms=-1\.0$"),
    ("--srun-mpi", "type", ["--srun-mpi"], r"argument --srun-mpi: expected one argument$"),
    ("--srun-mpi", "range", ["--srun-mpi", "pmi x", "--backend", "srun"], r"`--srun-mpi` must be an MPI plugin name .*Received: --srun-mpi='pmi x'$"),
    ("--ssh-port", "type", ["--ssh-port", "ssh"], r"`--ssh-port` must be an integer >= 1 and <= 65535\. Received: --ssh-port=ssh$"),
    ("--ssh-port", "range", ["--ssh-port", "0"], r"`--ssh-port` must be an integer >= 1 and <= 65535\. Received: --ssh-port=0$"),
    ("--ssh-identity-file", "type", ["--ssh-identity-file"], r"argument --ssh-identity-file: expected one argument$"),
    ("--ssh-identity-file", "range", ["--ssh-identity-file", "my key"], r"`--ssh-identity-file` must be a path without whitespace\. Received: --ssh-identity-file='my key'$"),
    ("--ssh-option", "type", ["--ssh-option"], r"argument --ssh-option: expected one argument$"),
    ("--ssh-option", "range", ["--ssh-option", "Port 22"], r"`--ssh-option` takes KEY=VALUE without spaces.*Received: --ssh-option='Port 22'$"),
    ("--ssh-option", "range", ["--ssh-option", "IdentityFile=C:\\keys\\id"], r"`--ssh-option` cannot contain any of \" \$ ` \\: .*Received: --ssh-option='IdentityFile=C:\\\\keys\\\\id'$"),
    ("--mca", "type", ["--mca"], r"argument --mca: expected one argument$"),
    ("--mca", "range", ["--mca", "btl"], r"`--mca` takes KEY=VALUE without spaces.*Received: --mca='btl'$"),
    ("--gloo-timeout", "type", ["--gloo-timeout", "30s"], r"`--gloo-timeout` must be an integer >= 1\. Received: --gloo-timeout=30s$"),
    ("--gloo-timeout", "range", ["--gloo-timeout", "0"], r"`--gloo-timeout` must be an integer >= 1\. Received: --gloo-timeout=0$"),
    ("--step-timeout", "type", ["--step-timeout", "never"], r"`--step-timeout` must be a number of seconds > 0 or `off`\. Received: --step-timeout=never$"),
    ("--step-timeout", "range", ["--step-timeout", "0"], r"`--step-timeout` must be a number > 0\. Received: --step-timeout=0\.0$"),
    # Elastic jobs: each flag on its own, then what does not fit together.
    ("-np", "range", [*ELASTIC, "-np", "3"], r"`-np` of an elastic job is the number of ranks to start with: between `--min-np` \(2\) "
     r"and `--max-np` \(2\), or left out to start with --min-np\. Received: -np=3$"),
    ("-H", "range", [*ELASTIC, "-H", "a:2,b:2"], r"`-H` cannot be used with `--elastic`, which takes its hosts from `--host-discovery-script`: "
     r"list the hosts in the discovery script instead, one `host:slots` per line\. Received: -H=a:2,b:2 with --elastic$"),
    ("--hostfile", "range", [*ELASTIC, "--hostfile", "{tmp}/hosts"], r"`--hostfile` cannot be used with `--elastic`, .*Received: --hostfile=.*/hosts with --elastic$"),
    ("--elastic", "type", ["--elastic=1"], r"argument --elastic: ignored explicit argument '1'$"),
    ("--elastic", "range", [*ELASTIC, "--mpi"], r"`--elastic` runs on Gloo, not MPI: drop `--mpi` \(`--elastic` implies `--gloo`\)\. Received: --elastic with --mpi$"),
    ("--elastic", "range", [*ELASTIC, "--backend", "mpirun"], r"`--elastic` needs `--backend horovodrun` \(elastic jobs run on horovodrun's Gloo driver\)\. "
     r"Received: --elastic with --backend=mpirun$"),
    ("--elastic", "range", [*ELASTIC, "--backend", "srun"], r"`--elastic` needs `--backend horovodrun` .*Received: --elastic with --backend=srun$"),
    ("--min-np", "type", [*ELASTIC, "--min-np", "two"], r"`--min-np` must be an integer >= 1\. Received: --min-np=two$"),
    ("--min-np", "range", [*ELASTIC, "--min-np", "0"], r"`--min-np` must be an integer >= 1\. Received: --min-np=0$"),
    ("--min-np", "range", ["--elastic", "--max-np", "2", "--host-discovery-script", "{tmp}/discover.sh"],
     r"`--elastic` needs `--min-np`, e\.g\. `hvdclip-run --elastic --min-np 2 .*`\. Received: --elastic without --min-np$"),
    ("--min-np", "range", ["--min-np", "2"], r"`--min-np` is for elastic jobs: add `--elastic`, or drop `--min-np`\. Received: --min-np=2 without --elastic$"),
    ("--max-np", "type", [*ELASTIC, "--max-np", "2.5"], r"`--max-np` must be an integer >= 1\. Received: --max-np=2\.5$"),
    ("--max-np", "range", [*ELASTIC, "--max-np", "1"], r"`--max-np` must be >= `--min-np` \(2\)\. Received: --max-np=1$"),
    ("--max-np", "range", ["--elastic", "--min-np", "2", "--host-discovery-script", "{tmp}/discover.sh"], r"`--elastic` needs `--max-np`, .*Received: --elastic without --max-np$"),
    ("--host-discovery-script", "type", ["--host-discovery-script"], r"argument --host-discovery-script: expected one argument$"),
    ("--host-discovery-script", "range", [*ELASTIC, "--host-discovery-script", "{tmp}/missing.sh"],
     r"`--host-discovery-script` must be the path of an existing file\. Received: --host-discovery-script=.*/missing\.sh \(no such file\)$"),
    ("--host-discovery-script", "range", [*ELASTIC, "--host-discovery-script", "{tmp}/hosts"],
     r"`--host-discovery-script` must be executable: run `chmod \+x .*/hosts`\. Received: --host-discovery-script=.*/hosts \(not executable\)$"),
    ("--host-discovery-script", "range", ["--elastic", "--min-np", "2", "--max-np", "2"],
     r"`--elastic` needs `--host-discovery-script`, .*Received: --elastic without --host-discovery-script$"),
    ("--slots-per-host", "type", [*ELASTIC, "--slots-per-host", "two"], r"`--slots-per-host` must be an integer >= 1\. Received: --slots-per-host=two$"),
    ("--slots-per-host", "range", [*ELASTIC, "--slots-per-host", "0"], r"`--slots-per-host` must be an integer >= 1\. Received: --slots-per-host=0$"),
    ("--elastic-timeout", "type", [*ELASTIC, "--elastic-timeout", "10m"], r"`--elastic-timeout` must be an integer >= 1\. Received: --elastic-timeout=10m$"),
    ("--elastic-timeout", "range", [*ELASTIC, "--elastic-timeout", "0"], r"`--elastic-timeout` must be an integer >= 1\. Received: --elastic-timeout=0$"),
    ("--elastic-timeout", "range", ["--elastic-timeout", "600"],
     r"`--elastic-timeout` is for elastic jobs: add `--elastic`, or drop `--elastic-timeout`\. Received: --elastic-timeout=600 without --elastic$"),
    ("--reset-limit", "type", [*ELASTIC, "--reset-limit", "many"], r"`--reset-limit` must be an integer >= 0\. Received: --reset-limit=many$"),
    ("--reset-limit", "range", [*ELASTIC, "--reset-limit", "-1"], r"`--reset-limit` must be an integer >= 0\. Received: --reset-limit=-1$"),
    ("command", "type", ["--"], r"A command to run must follow `--`.*Received: command=\[\]$"),
    ("command", "range", ["--", ""], r"A command to run must follow `--`.*Received: command=\[''\]$"),
)  # fmt: skip


def cli_argv(case: CliCase, tmp: Path) -> list[str]:
    args = [arg.replace("{tmp}", str(tmp)) for arg in case.argv]
    if args[:1] == ["--"]:  # The case is the command itself.
        return ["-np", "2", "--dry-run", *args]
    # Flags expecting a value come last before `--dry-run`, which argparse then refuses as that value.
    return ["-np", "2", *args, "--dry-run", "--", "python", "t.py"]


def refuse_to_run(argv, env, timeout):
    raise AssertionError(f"a rejected command line was run: {argv}")


@pytest.mark.parametrize("case", CLI)
def test_cli_flags(case, tmp_path):
    (tmp_path / "hosts").write_text("node1 slots=0\n")
    (tmp_path / "discover.sh").write_text("#!/bin/sh\necho localhost:2\n")
    (tmp_path / "discover.sh").chmod(0o755)
    out, err = io.StringIO(), io.StringIO()
    environ = {"PATH": str(tmp_path), "SET": "1"}  # No launcher on PATH: --dry-run still prints.
    code = main(cli_argv(case, tmp_path), environ=environ, executor=refuse_to_run, stdout=out, stderr=err)
    line = err.getvalue()
    assert (code, out.getvalue()) == (2, ""), line
    assert line.startswith("hvdclip-run: error: ") and line.count("\n") == 1, line
    assert re.search(case.fragment, line.rstrip("\n")), line
    assert re.search(rf"(?<![\w-]){re.escape(case.flag)}(?![\w-])", line), f"the message does not name {case.flag}: {line}"


def test_cli_rejection_through_the_real_entry_point():
    command = [sys.executable, "-m", "hvdclip.launch", "-np", "2", "--cycle-time-ms", "-1", "--dry-run", "--", "python"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "hvdclip-run: error: `--cycle-time-ms` must be a number >= 0. Received: --cycle-time-ms=-1.0\n"


# ------------------------------------------------------------------------------- completeness

# Public callables whose arguments are not swept, and why.
NOT_SWEPT = {
    "GradientTransform": "a NamedTuple; checked where it is used (clip=, chain, inner), rows above",
    "TransformResult": "a NamedTuple `update` returns; checked by apply_transform (test_clip_report.py, test_clipping.py)",
    "ClipReport": "a NamedTuple a transform returns; checked where it is used (test_clip_report.py)",
    "History": "what fit returns, not built by users",
    "SyncBatchNormalization": "a Keras layer; its arguments are BatchNormalization's, checked by Keras",
    "Callback": "a base class without arguments; fit calls its hooks",
    **{name: "an exception: its argument is the message" for name in hvdclip.__all__ if name.endswith("Error")},
}
# Arguments with nothing to be out of range (booleans are found from their default).
NO_RANGE = {
    "loss_fn": "callable: only a non-callable is wrong",
    "callbacks": "a list of Callback objects",
    "tape": "any tf.GradientTape is usable",
    "clipper": "any Clipper is usable",
    "batches": "any iterable of batches",
    "elastic": "an hvdclip.Elastic (checked by its own row), True, False or None",
}

SURFACES = {surface: params for surface, (_, params) in {**CONSTRUCTORS, **METHODS, **TRANSFORMS, **DOORS}.items()}
# HvdClipTrainer methods that the fit loop calls with values it has already checked (none: the
# loop drives `trainer.engine`).
LOOP_PLUMBING: set[str] = set()
KERAS_DOOR = [
    hvdclip.keras.DistributedOptimizer,
    hvdclip.keras.broadcast_initial_state,
    hvdclip.keras.callbacks.BroadcastGlobalVariablesCallback,
    hvdclip.keras.callbacks.MetricAverageCallback,
    hvdclip.Clipper.broadcast_initial_state,
]


def test_every_public_argument_has_its_cases():
    public = [getattr(hvdclip, name) for name in hvdclip.__all__ if name not in NOT_SWEPT]
    methods = [
        m for name, m in vars(hvdclip.HvdClipTrainer).items()
        if inspect.isfunction(m) and not name.startswith("_") and name not in LOOP_PLUMBING
    ]
    missing = []
    for surface in public + methods + KERAS_DOOR + [LaunchSettings, Host]:
        parameters = [p for p in inspect.signature(surface).parameters.values() if p.name != "self"]
        if not parameters:
            continue
        assert surface in SURFACES, f"{surface.__qualname__} has arguments but no table"
        kinds = {(param.values[0].argument, param.values[0].kind) for param in SURFACES[surface]}
        for p in parameters:
            needed = ["type"] if isinstance(p.default, bool) or p.name in NO_RANGE else ["type", "range"]
            missing += [f"{surface.__qualname__}({p.name}): {kind}" for kind in needed if (p.name, kind) not in kinds]
    assert missing == []


def test_every_cli_flag_has_its_cases():
    covered = {(param.values[0].flag, param.values[0].kind) for param in CLI}
    missing = []
    for action in _parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        needed = ["type"] if action.nargs == 0 else ["type", "range"]
        missing += [f"{flag}: {kind}" for kind in needed if (flag, kind) not in covered]
    assert missing == []


# ------------------------------------------------------- Horovod's API: hvdclip.tensorflow, hvdclip.keras

import tempfile  # noqa: E402

import hvdclip.tensorflow  # noqa: E402
from horovod.tensorflow.compression import Compressor  # noqa: E402

# load_model checks its arguments before it reads the file: any existing file does for the valid case.
SAVED = tempfile.NamedTemporaryFile(suffix=".keras", delete=False).name


class OtherCompressor(Compressor):
    """A compressor Horovod would take but hvdclip's reduction does not know."""


def compiled_mlp() -> keras.Model:
    model = make_mlp(seed=1, name="compiled")
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    return model


VARIABLE_ROWS = (
    ("variables", "type", 3, TypeError, r"^`variables` must be a list of variables\. Received: variables=3$"),
    ("variables", "range", [1.0], TypeError, r"^`variables` must hold Keras 3 variables or tf\.Variables\. Received an item 1\.0$"),
    ("root_rank", "type", "0", TypeError, r"^`root_rank` must be an integer >= 0\. Received: root_rank='0'$"),
    ("root_rank", "range", -1, ValueError, r"^`root_rank` must be an integer >= 0\. Received: root_rank=-1$"),
    ("process_set", "type", "global", TypeError, r"^`process_set` must be a hvd\.ProcessSet\. Received: process_set='global'$"),
    ("process_set", "range", lambda: hvdclip.tensorflow.ProcessSet([0]), ValueError,
     r"^`process_set` has not been registered with Horovod: .*add_process_set.*Received: process_set=ProcessSet"),
)  # fmt: skip
STATE_ROWS = (
    ("model", "type", "m", TypeError, r"^`model` must be a keras\.Model \(Keras 3\)\. Received: model='m'$"),
    ("model", "range", unbuilt_model, ValueError, r"^`model` 'unbuilt' must be built first: run `model\.build\(input_shape\)`"),
    ("optimizer", "type", 3, TypeError, r"^`optimizer` must be a Keras 3 optimizer, or None with a compiled `model`\. Received: optimizer=3$"),
)
SCHEDULE_ROWS = (
    ("initial_lr", "type", "0.1", TypeError, r"^`initial_lr` must be a number > 0\. Received: initial_lr='0\.1'$"),
    ("initial_lr", "range", 0, ValueError, r"^`initial_lr` must be a number > 0\. Received: initial_lr=0$"),
    ("initial_lr", "range", None, ValueError, r"^Parameter `initial_lr` is required\. Received: initial_lr=None$"),
    ("momentum_correction", "type", "yes", TypeError, r"^`momentum_correction` must be True or False\. Received: momentum_correction='yes'$"),
    ("steps_per_epoch", "type", "4", TypeError, r"^`steps_per_epoch` must be an integer >= 1\. Received: steps_per_epoch='4'$"),
    ("steps_per_epoch", "range", 0, ValueError, r"^`steps_per_epoch` must be an integer >= 1\. Received: steps_per_epoch=0$"),
)
HOROVOD_API = {
    hvdclip.tensorflow.broadcast_variables: ({"variables": [tf.Variable(1.0)], "root_rank": 0}, table(
        *VARIABLE_ROWS,
        ("inplace", "type", "yes", TypeError, r"^`inplace` must be True or False\. Received: inplace='yes'$"),
    )),
    hvdclip.tensorflow.broadcast_: ({"variables": [tf.Variable(1.0)], "root_rank": 0}, table(
        *VARIABLE_ROWS,
        ("name", "type", 3, TypeError, r"^`name` must be a non-empty str or None\. Received: name=3$"),
        ("name", "range", "", ValueError, r"^`name` must be a non-empty str or None\. Received: name=''$"),
    )),
    hvdclip.tensorflow.broadcast_global_variables: ({"root_rank": 0}, table(*VARIABLE_ROWS[2:4])),
    hvdclip.keras.load_model: ({"filepath": SAVED}, table(
        ("filepath", "type", 3, TypeError, r"^`filepath` must be a path \(str or os\.PathLike\)\. Received: filepath=3$"),
        ("filepath", "range", "/nonexistent/model.keras", ValueError,
         r"^`filepath` must be a saved Keras model file, and there is no file there\. Received: filepath='/nonexistent/model\.keras'$"),
        ("custom_optimizers", "type", 3, TypeError,
         r"^`custom_optimizers` must be a list of keras\.optimizers\.Optimizer subclasses or None\. Received: custom_optimizers=3$"),
        ("custom_optimizers", "range", [int], TypeError,
         r"^`custom_optimizers` must be a list of keras\.optimizers\.Optimizer subclasses or None\. Received: custom_optimizers=\[<class 'int'>\]$"),
        ("custom_objects", "type", 3, TypeError, r"^`custom_objects` must be a dict of names to objects or None\. Received: custom_objects=3$"),
        ("compression", "type", 3, ValueError,
         r"^`compression` must be 'none', 'fp16', None, hvd\.Compression\.none or hvd\.Compression\.fp16\. Received: compression=3$"),
        ("compression", "range", OtherCompressor, ValueError,
         r"^`compression` must be 'none', 'fp16', None, hvd\.Compression\.none or hvd\.Compression\.fp16\. Received: compression=<class"),
        ("legacy_opts", "type", "yes", TypeError, r"^`legacy_opts` must be True or False\. Received: legacy_opts='yes'$"),
        ("legacy_opts", "range", True, ValueError, r"^`legacy_opts` must be False: Keras 3 has no keras\.optimizers\.legacy"),
    )),
    hvdclip.keras.callbacks.LearningRateScheduleCallback: ({"initial_lr": 0.1, "multiplier": 0.5}, table(
        *SCHEDULE_ROWS,
        ("multiplier", "type", "x", TypeError, r"^`multiplier` must be a number or a function of the epoch\. Received: multiplier='x'$"),
        ("start_epoch", "type", 1.5, TypeError, r"^`start_epoch` must be an integer >= 0\. Received: start_epoch=1\.5$"),
        ("start_epoch", "range", -1, ValueError, r"^`start_epoch` must be an integer >= 0\. Received: start_epoch=-1$"),
        ("end_epoch", "type", "3", TypeError, r"^`end_epoch` must be an integer >= 0\. Received: end_epoch='3'$"),
        ("end_epoch", "range", -1, ValueError, r"^`end_epoch` must be an integer >= 0\. Received: end_epoch=-1$"),
        ("staircase", "type", "yes", TypeError, r"^`staircase` must be True or False\. Received: staircase='yes'$"),
    )),
    hvdclip.keras.callbacks.LearningRateWarmupCallback: ({"initial_lr": 0.1}, table(
        *SCHEDULE_ROWS,
        ("warmup_epochs", "type", "5", TypeError, r"^`warmup_epochs` must be a number > 0\. Received: warmup_epochs='5'$"),
        ("warmup_epochs", "range", 0, ValueError, r"^`warmup_epochs` must be a number > 0\. Received: warmup_epochs=0$"),
        ("verbose", "type", "1", TypeError, r"^`verbose` must be an integer >= 0\. Received: verbose='1'$"),
        ("verbose", "range", -1, ValueError, r"^`verbose` must be an integer >= 0\. Received: verbose=-1$"),
    )),
    hvdclip.keras.callbacks.BestModelCheckpoint: ({}, table(
        ("monitor", "type", 3, TypeError, r"^`monitor` must be the name of a logged metric \(a non-empty str\)\. Received: monitor=3$"),
        ("monitor", "range", "", ValueError, r"^`monitor` must be the name of a logged metric \(a non-empty str\)\. Received: monitor=''$"),
        ("verbose", "type", "1", TypeError, r"^`verbose` must be an integer >= 0\. Received: verbose='1'$"),
        ("verbose", "range", -1, ValueError, r"^`verbose` must be an integer >= 0\. Received: verbose=-1$"),
        ("save_weights_only", "type", "yes", TypeError, r"^`save_weights_only` must be True or False\. Received: save_weights_only='yes'$"),
        ("mode", "type", 3, TypeError, r"^`mode` must be one of \('auto', 'min', 'max'\)\. Received: mode=3$"),
        ("mode", "range", "best", ValueError, r"^`mode` must be one of \('auto', 'min', 'max'\)\. Received: mode='best'$"),
        ("save_freq", "type", 1.5, TypeError, r"^`save_freq` must be 'epoch' or an integer >= 1\. Received: save_freq=1\.5$"),
        ("save_freq", "range", 0, ValueError, r"^`save_freq` must be an integer >= 1\. Received: save_freq=0$"),
        ("filepath", "type", 3, TypeError, r"^`filepath` must be a path \(str or os\.PathLike\) or None\. Received: filepath=3$"),
        ("filepath", "range", "best.txt", ValueError, r"^`filepath` must end in \.keras or \.h5 \(Keras 3's formats\)\. Received: filepath='best\.txt'$"),
    )),
    hvdclip.tensorflow.elastic.TensorFlowKerasState: ({"model": compiled_mlp()}, table(*STATE_ROWS)),
    hvdclip.keras.elastic.KerasState: ({"model": compiled_mlp()}, table(*STATE_ROWS)),
    hvdclip.tensorflow.elastic.TensorFlowState: ({"variables": [tf.Variable(1.0)]}, table(
        ("variables", "type", 3, TypeError, r"^`variables` must be a list of variables \(TensorFlow 2 keeps no global variables"),
        ("variables", "range", [1.0], TypeError, r"^`variables` must hold Keras 3 variables or tf\.Variables\. Received an item 1\.0$"),
        ("session", "type", "s", ValueError, r"^`session` must be None: TensorFlow 2 runs eagerly\. Received: session='s'$"),
        ("session", "range", object, ValueError, r"^`session` must be None: TensorFlow 2 runs eagerly\. Received: session=<class 'object'>$"),
    )),
    hvdclip.tensorflow.DistributedGradientTape: ({"gradtape": tf.GradientTape()}, table(
        ("gradtape", "type", "tape", TypeError, r"^`gradtape` must be a tf\.GradientTape\. Received: gradtape='tape'$"),
        ("gradtape", "range", lambda: tf.Variable(1.0), TypeError, r"^`gradtape` must be a tf\.GradientTape\. Received: gradtape=<"),
        *(row for row in REDUCTION_ROWS if row[0] not in ("process_set",)),
        ("process_set", "type", 0, TypeError, r"`process_set` must be a Horovod ProcessSet or None\. Received: process_set=0$"),
        ("process_set", "range", "global", TypeError, r"`process_set` must be a Horovod ProcessSet or None\. Received: process_set='global'$"),
        ("num_groups", "type", "2", TypeError, r"^`num_groups` must be an integer >= 0\. Received: num_groups='2'$"),
        ("num_groups", "range", -1, ValueError, r"^`num_groups` must be an integer >= 0\. Received: num_groups=-1$"),
        ("scale_local_gradients", "type", 0, TypeError, r"^`scale_local_gradients` must be True or False\. Received: scale_local_gradients=0$"),
        ("clip", "type", 1.0, TypeError, r"`clip` must be a GradientTransform .*, or None\. Received: clip=1\.0$"),
        ("clip", "range", BROKEN_TRANSFORM, TypeError, r"`clip` must be a GradientTransform .*Received: clip=GradientTransform\(init=1\.0"),
    )),
    hvdclip.tensorflow.elastic.run: ({}, table(
        ("func", "type", 3, TypeError, r"^`func` must be a function taking the state first\. Received: func=3$"),
    )),
}  # fmt: skip
# Arguments with nothing to be out of range, or not checked at all, and why.
HOROVOD_API_NO_RANGE = {
    "multiplier": "any number or function of the epoch",
    "custom_objects": "any dict: Keras looks names up in it",
    "optimizer": "a Keras 3 optimizer is the only usable value (anything else is the type case)",
    "func": "any callable",
}
HOROVOD_API_UNCHECKED = {"backend": "TensorFlow 1's Keras backend, accepted for Horovod's signature and ignored"}


@pytest.mark.parametrize("surface, case", sweep(HOROVOD_API))
def test_horovod_api(surface, case):
    args = {**HOROVOD_API[surface][0], case.argument: bad_value(case)}
    assert_rejected(lambda: surface(**args), case)


def test_every_argument_of_horovods_api_has_its_cases():
    missing = []
    for surface, (_, params) in HOROVOD_API.items():
        kinds = {(param.values[0].argument, param.values[0].kind) for param in params}
        for p in inspect.signature(surface).parameters.values():
            if p.name == "self" or p.kind is p.VAR_KEYWORD or p.name in HOROVOD_API_UNCHECKED:
                continue
            needed = ["type"] if isinstance(p.default, bool) or p.name in HOROVOD_API_NO_RANGE else ["type", "range"]
            missing += [f"{surface.__qualname__}({p.name}): {kind}" for kind in needed if (p.name, kind) not in kinds]
    assert missing == []
