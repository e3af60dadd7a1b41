"""Every private name of TensorFlow, Keras and Horovod that hvdclip uses, in one place.

hvdclip reuses what its dependencies already do right instead of copying it, and a few of those
pieces are not public API. Each is reached through a function here, so a release that moves one
breaks in this module, at import, with a message saying what to do, not deep inside a traced step.
Importing this module loads nothing heavy (the launcher imports it on head nodes without
TensorFlow); each function imports what it needs.

| private name | owner | why hvdclip uses it |
|---|---|---|
| `horovod.tensorflow._make_allreduce_grads_fn` | Horovod | the reduction `hvd.DistributedGradientTape` and `hvd.DistributedOptimizer` are built on, reused as is |
| `Optimizer._learning_rate` | Keras | the schedule or variable behind `learning_rate` (the public property returns its current value) |
| `RMSprop._momentums` | Keras | the momentum buffers that Horovod's learning-rate callbacks' momentum correction scales |
| `Layer._flatten_layers` | Keras | every nested layer, as Keras itself walks them (BatchNorm statistics, seed generators) |
| `keras.src.models.functional.Functional` | Keras | `clone_model` dispatches on it (SyncBatchNormalization's conversion) |
| `BatchNormalization._moments` | Keras | the hook SyncBatchNormalization overrides to average batch moments over ranks |
| `_AutoShardDataset` | TensorFlow | tf.distribute's by-file sharding rewrite, for `shard="files"` |
| `DatasetV2._as_serialized_graph` | TensorFlow | whether a dataset reads files (its graph's reader ops) |
| `control_flow_util.GraphOrParentsInXlaContext` | TensorFlow | whether a step is being traced for XLA (`tf.function(jit_compile=True)`) |
| `keras.src.trainers.trainer.Trainer.compile` (wrapped) | Keras | the `jit_compile` a model was compiled with *before* Keras resolved "auto" |
| `horovod.runner.launch.{mpi_built,gloo_built}` | Horovod | horovodrun's slow build checks answered from a cache |
| `horovod.runner.util.remote.SSH_COMMAND_PREFIX`, `horovod.runner.launch.mpi_run` (wrapped), `horovod.runner.mpi_run.is_open_mpi` | Horovod | every ssh option and keepalive in every ssh horovodrun runs, its mpirun's included |
| `horovod.runner.launch._check_all_hosts_ssh_successful`, `.gloo_run`, `.gloo_run_elastic`, `.driver_service`, `.network` | Horovod | `hvdclip-run --dry-run` prints what horovodrun would run instead of running it |
| `_distutils_hack` (setuptools) | setuptools | horovodrun's `distutils` import served by the standard library (Python <= 3.11) |

`check_versions()` runs at import: hvdclip was written for the versions in `WRITTEN_FOR`.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping
from typing import Any

from hvdclip.errors import HvdClipError

__all__ = [
    "WRITTEN_FOR",
    "ForeignVersionError",
    "check_versions",
    "installed_version",
    "make_allreduce_grads_fn",
    "learning_rate_object",
    "flatten_layers",
    "rmsprop_momentums",
    "functional_model_class",
    "auto_shard_by_file",
    "serialized_dataset_graph",
    "require_batch_norm_moments_hook",
    "in_xla_context",
    "record_compile_arguments",
    "requested_jit_compile",
    "horovodrun",
    "answer_horovodrun_build_checks",
    "add_horovodrun_ssh_options",
    "give_horovodrun_mpirun_every_ssh_option",
    "print_instead_of_running_horovodrun",
    "skip_setuptools_distutils",
]

# Package -> (distributions that provide it, the release series hvdclip was written for). A series
# "X.Y" admits X.Y.*; Horovod's is exact (0.28.1 is its last release, and hvdclip patches its build).
WRITTEN_FOR = {
    "horovod": (("horovod",), "0.28.1"),
    "tensorflow": (("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel"), "2.21"),
    "keras": (("keras",), "3"),
}
_FIX = (
    "Install the versions in versions.env (`make install` in the hvdclip repository builds Horovod "
    "0.28.1 against TensorFlow 2.21), or, after checking {module} still has {names}, set "
    "HVDCLIP_FOREIGN_VERSIONS=any to skip this check."
)


class ForeignVersionError(HvdClipError, ImportError):
    """An installed TensorFlow, Keras or Horovod is not the release hvdclip's private uses were written for."""


def installed_version(package: str) -> str | None:
    """The installed version of `package` ("horovod", "tensorflow" or "keras"); None if absent."""
    for distribution in WRITTEN_FOR[package][0]:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _fits(version: str, series: str) -> bool:
    parts, wanted = version.split("+")[0].split("."), series.split(".")
    return parts[: len(wanted)] == wanted


def check_versions(environ: dict | None = None) -> None:
    """Raises `ForeignVersionError` if an installed Horovod, TensorFlow or Keras is not the one written for.

    A package that is not installed passes (the launcher runs on head nodes without TensorFlow).
    """
    import os

    environ = os.environ if environ is None else environ
    if environ.get("HVDCLIP_FOREIGN_VERSIONS") == "any":
        return
    for package, (_, series) in WRITTEN_FOR.items():
        version = installed_version(package)
        if version is not None and not _fits(version, series):
            raise ForeignVersionError(
                f"hvdclip uses private parts of {package} {series}{'.*' if package != 'horovod' else ''}, "
                f"but {package} {version} is installed. "
                + _FIX.format(module=package, names="the names listed in hvdclip/foreign.py")
            )


def _require(owner: Any, name: str, where: str) -> Any:
    value = getattr(owner, name, None)
    if value is None:
        raise ForeignVersionError(
            f"{where}.{name} is gone: this {where.split('.')[0]} is not the release hvdclip was written for. "
            + _FIX.format(module=where, names=name)
        )
    return value


# ---------------------------------------------------------------------------------------- Horovod


def make_allreduce_grads_fn(device_dense: str, device_sparse: str, compression: Any, sparse_as_dense: bool, op: Any,
                            gradient_predivide_factor: float, groups: Any, process_set: Any):  # fmt: skip
    """The function `hvd.DistributedGradientTape(tape, **options)` builds to reduce its gradients.

    Called as `fn(grads, variables, use_generic_names)`; `variables` must be `tf.Variable`s
    aligned with `grads` (Horovod reads their names only for `groups` given as variable lists).
    """
    import horovod.tensorflow as hvd

    make = _require(hvd, "_make_allreduce_grads_fn", "horovod.tensorflow")
    return make("DistributedGradientTape", device_dense, device_sparse, compression, sparse_as_dense, op,
                gradient_predivide_factor, groups, process_set)  # fmt: skip


def skip_setuptools_distutils() -> None:
    """Lets `import distutils` find the standard library's copy, where there still is one (Python <= 3.11).

    horovodrun imports `distutils.spawn`; setuptools' shim turns that into an import of setuptools
    and pkg_resources (0.4 s).
    """
    if sys.version_info < (3, 12) and "distutils" not in sys.modules:
        sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_distutils_hack")]


def horovodrun():
    """horovodrun's entry point (`horovod.runner.launch.run_commandline`), imported without its slow extras.

    Its `distutils.spawn` import is served by the standard library (`skip_setuptools_distutils`).
    """
    return _require(_horovodrun_module("launch"), "run_commandline", "horovod.runner.launch")


def _horovodrun_module(name: str) -> Any:
    import importlib
    import warnings

    skip_setuptools_distutils()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # The standard library's distutils says it is going.
        return importlib.import_module(f"horovod.runner.{name}")




def answer_horovodrun_build_checks(flags: dict[str, bool]) -> None:
    """Horovod 0.28.1: `horovod.runner.launch.mpi_built` and `.gloo_built`, the names horovodrun's
    module imported from `horovod.common.util` and calls with a `verbose` argument."""
    launch = _horovodrun_module("launch")
    _require(launch, "mpi_built", "horovod.runner.launch")
    _require(launch, "gloo_built", "horovod.runner.launch")
    launch.mpi_built = lambda verbose=False: flags["mpi"]
    launch.gloo_built = lambda verbose=False: flags["gloo"]


def add_horovodrun_ssh_options(ssh_options: Mapping[str, str]) -> None:
    """Horovod 0.28.1: `horovod.runner.util.remote.SSH_COMMAND_PREFIX` (`ssh -o ...`), the start of
    every ssh command horovodrun runs itself (`get_ssh_command` joins it into a shell string).

    The options go right after `ssh`, before Horovod's own `PasswordAuthentication=no` and
    `StrictHostKeyChecking=no`, because ssh keeps the first value of each setting: the user's win.
    """
    import shlex

    remote = _horovodrun_module("util.remote")
    program, _, horovods = _require(remote, "SSH_COMMAND_PREFIX", "horovod.runner.util.remote").partition(" ")
    words = [f"-o {shlex.quote(f'{key}={value}')}" for key, value in ssh_options.items()]
    remote.SSH_COMMAND_PREFIX = " ".join([program, *words, horovods]).strip()


def give_horovodrun_mpirun_every_ssh_option(ssh_options: Mapping[str, str]) -> None:
    """Horovod 0.28.1: `horovod.runner.launch.mpi_run`, the name horovodrun's module imported from
    `horovod.runner.mpi_run` and calls as `mpi_run(settings, nics, env, command)`; the `ssh_port`,
    `ssh_identity_file` and `extra_mpi_args` attributes of its `Settings`; and
    `horovod.runner.mpi_run.is_open_mpi(env)`.

    Horovod's `mpi_run` builds `-mca plm_rsh_args "-p PORT -i KEY"` from the settings' port and key
    alone. Here it gets a copy of the settings without them (so it adds no `plm_rsh_args`: Open MPI
    refuses a parameter given twice) whose `extra_mpi_args` carry `-mca plm_rsh_args` with the port,
    the key, every ssh option and the words of `OMPI_MCA_plm_rsh_args`, which the command-line
    parameter replaces. `extra_mpi_args` is pasted into the shell command Horovod runs, so the value
    is quoted for that shell. Other MPIs (Intel MPI, MPICH) are left as Horovod starts them.
    """
    import copy
    import shlex

    from hvdclip.launch.commands import ssh_arguments

    launch, mpi_run_module = _horovodrun_module("launch"), _horovodrun_module("mpi_run")
    horovods_mpi_run = _require(launch, "mpi_run", "horovod.runner.launch")
    _require(mpi_run_module, "is_open_mpi", "horovod.runner.mpi_run")

    def mpi_run(settings, nics, env, command, stdout=None, stderr=None):
        words = ssh_arguments(settings.ssh_port, settings.ssh_identity_file, ssh_options, env or {})
        if words and mpi_run_module.is_open_mpi(env):
            settings = copy.copy(settings)
            settings.ssh_port = settings.ssh_identity_file = None
            ssh = f"-mca plm_rsh_args {shlex.quote(' '.join(words))}"
            settings.extra_mpi_args = f"{settings.extra_mpi_args} {ssh}" if settings.extra_mpi_args else ssh
        return horovods_mpi_run(settings, nics, env, command, stdout=stdout, stderr=stderr)

    launch.mpi_run = mpi_run


def print_instead_of_running_horovodrun() -> None:
    """`--dry-run`: horovodrun's start-up runs, and each command it would start is printed instead.

    Horovod 0.28.1: `horovod.runner.launch._check_all_hosts_ssh_successful(host_addresses,
    ssh_port, ssh_identity_file, fn_cache=...)` and `launch.SSH_CONNECT_TIMEOUT_S`;
    `horovod.runner.driver.driver_service.get_common_interfaces(settings, all_host_names,
    remote_host_names, fn_cache)`; `launch.gloo_run(settings, nics, env, server_ip, command)` and
    `launch.gloo_run_elastic(settings, env, command, executable)`; `launch.network.get_driver_ip(nics)`
    (`horovod.runner.util.network`); and `mpi_run`'s last step,
    `os.execve("/bin/sh", ["/bin/sh", "-c", MPIRUN_COMMAND], env)`, replaced for this process.
    """

    import os

    launch, remote = _horovodrun_module("launch"), _horovodrun_module("util.remote")
    for name in ("_check_all_hosts_ssh_successful", "driver_service", "network", "gloo_run", "gloo_run_elastic"):
        _require(launch, name, "horovod.runner.launch")

    def check_ssh(host_addresses, ssh_port=None, ssh_identity_file=None, fn_cache=None):
        print("# horovodrun checks ssh to each remote host (its other ssh commands take the same options):")
        for host in host_addresses:
            print(remote.get_remote_command("true", host, ssh_port, ssh_identity_file, launch.SSH_CONNECT_TIMEOUT_S))
        return True

    find_interfaces = launch.driver_service.get_common_interfaces

    def common_interfaces(settings, all_host_names, remote_host_names=None, fn_cache=None):
        if remote_host_names and not settings.nics:
            print("# horovodrun then finds the network interfaces all hosts share, over the same ssh; NICS below stands for them")
            return ["NICS"]
        return find_interfaces(settings, all_host_names, remote_host_names, fn_cache)

    def gloo_ranks(settings, nics, env, server_ip, command):
        names = [host.rsplit(":", 1)[0] for host in settings.hosts.split(",")]
        remote_hosts = launch.network.filter_local_addresses(names)
        print(f"# horovodrun starts each rank itself (Gloo){'; on a remote host over ssh:' if remote_hosts else ', all on this host'}")
        for host in remote_hosts:
            print(remote.get_remote_command("RANK-COMMAND", host, settings.ssh_port, settings.ssh_identity_file))

    def elastic_ranks(settings, env, command, executable):
        print("# horovodrun's elastic driver runs the discovery script and starts each rank on a host it names; on a remote host over ssh:")
        print(remote.get_remote_command("RANK-COMMAND", "HOST", settings.ssh_port, settings.ssh_identity_file))

    def print_mpirun(path, args, env):
        print("# horovodrun starts the ranks with:")
        print(args[-1])

    launch._check_all_hosts_ssh_successful = check_ssh
    launch.driver_service.get_common_interfaces = common_interfaces
    launch.network.get_driver_ip = lambda nics: "DRIVER-IP"  # Gloo's rendezvous address; NICS may stand in for nics
    launch.gloo_run = gloo_ranks
    launch.gloo_run_elastic = elastic_ranks
    os.execve = print_mpirun


# ---------------------------------------------------------------------------------------- Keras


def learning_rate_object(optimizer: Any) -> Any:
    """The schedule or variable an optimizer's learning rate is (a `LossScaleOptimizer`'s inner one's)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return _require(inner, "_learning_rate", "keras.optimizers.Optimizer")


def rmsprop_momentums(optimizer: Any) -> list:
    """An `RMSprop`'s momentum buffers (Keras keeps them under a private name; SGD's are public)."""
    return list(_require(optimizer, "_momentums", "keras.optimizers.RMSprop"))


def flatten_layers(layer: Any, include_self: bool = True) -> list:
    """Every layer nested in `layer` (recursively), as Keras walks them."""
    walk = _require(layer, "_flatten_layers", "keras.layers.Layer")
    return list(walk(include_self=include_self, recursive=True))


def functional_model_class() -> type:
    """Keras' `Functional` model class (what `keras.Model(inputs, outputs)` builds)."""
    from keras.src.models import functional

    return _require(functional, "Functional", "keras.src.models.functional")


# ---------------------------------------------------------------------------------------- TensorFlow


def auto_shard_by_file(dataset: Any, size: int, rank: int) -> Any:
    """`dataset` with tf.distribute's FILE auto-shard rewrite: this rank reads every `size`-th file."""
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops import distribute

    rewrite = _require(distribute, "_AutoShardDataset", "tensorflow.python.data.experimental.ops.distribute")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    return rewrite(dataset.with_options(options), size, rank)


def in_xla_context() -> bool:
    """Whether the function being traced is compiled with XLA (inside `tf.function(jit_compile=True)`)."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    check = _require(control_flow_util, "GraphOrParentsInXlaContext", "tensorflow.python.ops.control_flow_util")
    return bool(check(ops.get_default_graph()))


def serialized_dataset_graph(dataset: Any) -> bytes:
    """The serialized `GraphDef` of a `tf.data.Dataset`."""
    return _require(dataset, "_as_serialized_graph", "tf.data.Dataset")().numpy()


_REQUESTED_JIT = "_hvdclip_requested_jit_compile"
_AFTER_COMPILE: list = []


def record_compile_arguments(after: Any = None) -> None:
    """Makes every model remember the `jit_compile` given to `compile` ("auto" when none was), once per process.

    Keras resolves "auto" (True on a GPU when every layer supports XLA) and keeps only the result,
    so after `compile` an explicit True cannot be told from Keras' default. The wrapper records the
    argument, calls Keras' own `compile` unchanged, then each `after(model)` hook given here.
    """
    if after is not None and after not in _AFTER_COMPILE:
        _AFTER_COMPILE.append(after)
    import functools
    import inspect

    from keras.src.trainers import trainer

    original = _require(trainer.Trainer, "compile", "keras.src.trainers.trainer.Trainer")
    if getattr(original, _REQUESTED_JIT, False):
        return
    signature = inspect.signature(original)
    if "jit_compile" not in signature.parameters:
        raise ForeignVersionError(
            "keras Trainer.compile takes no `jit_compile`: this Keras is not the release hvdclip was written for. "
            + _FIX.format(module="keras", names="Trainer.compile(jit_compile=...)")
        )

    @functools.wraps(original)
    def compile(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        result = original(self, *args, **kwargs)
        object.__setattr__(self, _REQUESTED_JIT, bound.arguments["jit_compile"])
        for hook in _AFTER_COMPILE:
            hook(self)
        return result

    setattr(compile, _REQUESTED_JIT, True)
    trainer.Trainer.compile = compile


def requested_jit_compile(model: Any) -> Any:
    """The `jit_compile` `model.compile` was given (True, False or "auto"); None if compiled before recording began."""
    return getattr(model, _REQUESTED_JIT, None)


def require_batch_norm_moments_hook() -> None:
    """Checks that `BatchNormalization._moments`, which SyncBatchNormalization overrides, still exists.

    An override cannot be reached through a function; the subclass's module calls this at import.
    """
    import keras

    _require(keras.layers.BatchNormalization, "_moments", "keras.layers.BatchNormalization")


check_versions()
