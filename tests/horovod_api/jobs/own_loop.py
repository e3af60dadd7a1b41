"""A training loop of one's own in `horovod.tensorflow`'s idiom, on Keras 3: `import hvdclip.tensorflow as hvd`.

Two ranks. Each rank starts from its own random weights, so only the broadcasts make them agree.

1. The first-batch broadcast at the top of the compiled step (before the first gradient), the
   gradient averaged over ranks and clipped after the reduction: equals one process on the
   combined batch from rank 0's weights.
2. Horovod's example's placement: the broadcast after the first `apply_gradients`, which creates
   the optimizer's variables inside the traced step. Ranks end bit-identical.
3. Every other collective of `horovod.tensorflow` once, each with an answer known in advance.
"""

import keras
import numpy as np
import tensorflow as tf

import hvdclip
import hvdclip.tensorflow as hvd

hvd.init()

from harness import checksum, gathered, make_data, max_abs_difference, report  # noqa: E402

BATCH = 16
STEPS = 12
MAX_NORM = 1.0
LR = 1e-2
x, y = make_data(seed=31, n=STEPS * 2 * BATCH)
loss_fn = keras.losses.MeanSquaredError()


def rows(step: int) -> slice:
    """This rank's part of step `step`'s combined batch."""
    start = step * hvd.size() * BATCH + hvd.rank() * BATCH
    return slice(start, start + BATCH)


def make_model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )


def averaged_and_clipped(tape: tf.GradientTape, loss, variables) -> list:
    # Horovod's idiom plus one argument: the gradient averaged over ranks, then clipped.
    tape = hvd.DistributedGradientTape(tape, clip=hvdclip.clip_by_global_norm(MAX_NORM))
    return tape.gradient(loss, variables), tape.report  # The report: what the step measured, for the logs.


# ------------------------------------------------------------------ 1. broadcast before the first step

keras.utils.set_random_seed(100 + hvd.rank())
model = make_model()
opt = keras.optimizers.Adam(LR)
opt.build(model.trainable_variables)  # Keras 3 creates an optimizer's variables when it is built.
started_apart = len({tuple(row) for row in gathered(hvd, checksum(model.variables))}) == hvd.size()
rank0_start = hvd.broadcast_object([v.numpy() for v in model.variables], root_rank=0)  # For the reference only.


@tf.function
def training_step(images, labels, first_batch):
    if first_batch:
        hvd.broadcast_variables(model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    grads, measured = averaged_and_clipped(tape, loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss, measured


logged = [training_step(x[rows(step)], y[rows(step)], tf.constant(step == 0))[1] for step in range(STEPS)]
clip_rate = sum(bool(m["clip_active"]) for m in logged) / STEPS
norms_agree = gathered(hvd, [float(m["grad_norm"]) for m in logged])

# One process on the combined batch, from rank 0's weights: a plain tape, the clip, the optimizer.
reference = make_model()
reference.set_weights(rank0_start)
reference_opt = keras.optimizers.Adam(LR)
for step in range(STEPS):
    combined = slice(step * hvd.size() * BATCH, (step + 1) * hvd.size() * BATCH)
    with tf.GradientTape() as tape:
        loss = loss_fn(y[combined], reference(x[combined], training=True))
    grads = tape.gradient(loss, reference.trainable_variables)
    reference_opt.apply_gradients(zip(tf.clip_by_global_norm(grads, MAX_NORM)[0], reference.trainable_variables))
error = max_abs_difference(
    [v.numpy() for v in model.variables + opt.variables], [v.numpy() for v in reference.variables + reference_opt.variables]
)
first = gathered(hvd, checksum(model.variables + opt.variables))

# ------------------------------------------------------------------ 2. Horovod's placement: after the first apply

keras.utils.set_random_seed(200 + hvd.rank())
model2 = make_model()
opt2 = keras.optimizers.Adam(LR)  # Not built: its first apply_gradients, inside the step, builds it.
second_started_apart = len({tuple(row) for row in gathered(hvd, checksum(model2.variables))}) == hvd.size()


@tf.function
def horovod_training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model2(images, training=True))
    grads, _ = averaged_and_clipped(tape, loss, model2.trainable_variables)
    opt2.apply_gradients(zip(grads, model2.trainable_variables))
    if first_batch:
        hvd.broadcast_variables(model2.variables, root_rank=0)
        hvd.broadcast_variables(opt2.variables, root_rank=0)
    return loss


for step in range(STEPS):
    horovod_training_step(x[rows(step)], y[rows(step)], step == 0)  # A Python bool, as in Horovod's example.
second = gathered(hvd, checksum(model2.variables + opt2.variables))

# ------------------------------------------------------------------ 3. the other collectives, answers known

r, n = hvd.rank(), hvd.size()
checks = {
    "allreduce_sum": float(hvd.allreduce(tf.constant(r + 1.0), op=hvd.Sum)) == n * (n + 1) / 2,
    "allreduce_average": float(hvd.allreduce(tf.constant(r + 1.0))) == (n + 1) / 2,
    "allreduce_min_max_product": [
        float(hvd.allreduce(tf.constant(r + 2.0), op=op)) for op in (hvd.Min, hvd.Max, hvd.Product)
    ] == [2.0, n + 1.0, float(np.prod(np.arange(2, n + 2)))],
    "allreduce_fp16": float(hvd.allreduce(tf.constant(r + 0.5), op=hvd.Sum, compression=hvd.Compression.fp16)) == n * n / 2,
    "allreduce_keras_variable": float(hvd.allreduce(keras.Variable(r + 1.0), op=hvd.Sum)) == n * (n + 1) / 2,
    "allreduce_indexed_slices": np.array_equal(
        tf.convert_to_tensor(hvd.allreduce(tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([r]), tf.constant([n, 1])), op=hvd.Sum)).numpy(),
        np.ones((n, 1), np.float32),
    ),
    "grouped_allreduce": [float(t) for t in hvd.grouped_allreduce([tf.constant(1.0), tf.constant(r * 1.0)], op=hvd.Sum)]
    == [float(n), n * (n - 1) / 2],
    "allgather": hvd.allgather(tf.constant([r])).numpy().tolist() == list(range(n)),
    "grouped_allgather": [t.numpy().tolist() for t in hvd.grouped_allgather([tf.constant([r]), tf.constant([-r])])]
    == [list(range(n)), [-i for i in range(n)]],
    "broadcast": int(hvd.broadcast(tf.constant(r), root_rank=n - 1)) == n - 1,
    "broadcast_object": hvd.broadcast_object({"from": r}, root_rank=n - 1) == {"from": n - 1},
    "allgather_object": hvd.allgather_object(("rank", r)) == [("rank", i) for i in range(n)],
    "alltoall": hvd.alltoall(tf.constant([10 * r + i for i in range(n)])).numpy().tolist() == [10 * i + r for i in range(n)],
    "reducescatter": hvd.reducescatter(tf.ones([n, 2]) * (r + 1), op=hvd.Sum).numpy().tolist() == [[n * (n + 1) / 2] * 2],
    "grouped_reducescatter": [t.numpy().tolist() for t in hvd.grouped_reducescatter([tf.ones([n, 1])], op=hvd.Sum)]
    == [[[float(n)]]],
    "ops": [int(hvd.rank_op()), int(hvd.size_op()), int(hvd.local_rank_op()), int(hvd.local_size_op()), int(hvd.process_set_included_op())]
    == [r, n, hvd.local_rank(), hvd.local_size(), 1],
    "queries": (hvd.is_initialized(), hvd.cross_size(), hvd.cross_rank(), hvd.is_homogeneous()) == (True, 1, 0, True)
    and all(isinstance(q(), bool) for q in (hvd.mpi_enabled, hvd.mpi_built, hvd.gloo_enabled, hvd.gloo_built,
            hvd.ddl_built, hvd.ccl_built, hvd.cuda_built, hvd.rocm_built))
    and isinstance(hvd.nccl_built(), int)  # NCCL's version number, 0 without it.
    and hvd.gloo_enabled() != hvd.mpi_enabled()
    and (not hvd.mpi_enabled() or isinstance(hvd.mpi_threads_supported(), bool)),
}

# In place, and by position: rank 0's values reach every rank.
inplace = [tf.Variable(tf.fill([3], float(r))), keras.Variable(np.full(2, 10.0 + r, np.float32))]
values = hvd.broadcast_(inplace, root_rank=0)
checks["broadcast_"] = [v.numpy().tolist() for v in values] == [[0.0] * 3, [10.0] * 2] == [v.numpy().tolist() for v in inplace]

# A process set holding only the last rank: its broadcast runs there alone.
last = hvd.add_process_set([n - 1])
mine = tf.Variable([float(r)])
if last.included():
    hvd.broadcast_variables([mine], root_rank=n - 1, process_set=last)
hvd.remove_process_set(last)
checks["process_set"] = float(mine[0]) == r and hvd.global_process_set.size() == n and last.process_set_id is None

# Ranks passing lists of different structure: every rank raises, none waits for the others.
uneven = [tf.Variable(tf.zeros([3 + r]))]
try:
    hvd.broadcast_variables(uneven, root_rank=0)
    checks["structure_mismatch_raises"] = False
except Exception as mismatch:  # noqa: BLE001 - the type is the check
    checks["structure_mismatch_raises"] = type(mismatch).__name__ == "RankMismatchError"


@tf.function
def uneven_broadcast():
    hvd.broadcast_variables(uneven, root_rank=0)


try:
    uneven_broadcast()
    checks["structure_mismatch_raises_in_graph"] = False
except tf.errors.InvalidArgumentError as mismatch:
    checks["structure_mismatch_raises_in_graph"] = "different structure" in mismatch.message

try:
    hvd.broadcast_global_variables(0)
    checks["broadcast_global_variables_refuses"] = False
except RuntimeError as refusal:
    checks["broadcast_global_variables_refuses"] = "broadcast_variables" in str(refusal)

hvd.start_timeline(f"{__import__('tempfile').gettempdir()}/hvdclip-timeline-{r}-{__import__('os').getpid()}.json")
checks["timeline"] = float(hvd.allreduce(tf.constant(1.0), op=hvd.Sum)) == n
hvd.stop_timeline()
checks["join"] = int(hvd.join()) in range(n)

report(
    "own_loop",
    r,
    started_apart=started_apart and second_started_apart,
    error=error,
    first_identical=bool((first == first[0]).all()),
    second_identical=bool((second == second[0]).all()),
    clip_rate=clip_rate,
    norms_identical=bool((norms_agree == norms_agree[0]).all()),
    checks=checks,
)
hvd.shutdown()
assert not hvd.is_initialized()
