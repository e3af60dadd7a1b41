"""Static checks of the Docker images; they need no Docker engine (the build machine has none).

The Dockerfiles must agree with versions.env, copy only files that exist and get through
.dockerignore, install Horovod through docker/install_python.sh as `make install` does (with --gpu in
the GPU image, whose path sets HOROVOD_GPU_OPERATIONS=NCCL and requires NCCL in
`horovodrun --check-build`), and start their commands in exec form. Each check returns a list of
problems, and the tests at the end feed it a deliberately broken Dockerfile to show it can fail.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
INSTALL_SCRIPT = "docker/install_python.sh"
SHELL_OPERATORS = {"&&", "||", ";", "|"}


def read_versions(text: str) -> dict[str, str]:
    """versions.env as a dict: KEY=VALUE lines, `#` comments."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


VERSIONS = read_versions((ROOT / "versions.env").read_text())
SCRIPT_TEXT = (ROOT / INSTALL_SCRIPT).read_text()


def parse(text: str) -> list[dict]:
    """The Dockerfile's instructions without comments, values as written (no ARG substitution)."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def stages(instructions: list[dict]) -> list[list[dict]]:
    """Instructions grouped by build stage, each group starting with its FROM."""
    groups: list[list[dict]] = []
    for instruction in instructions:
        if instruction["instruction"] == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(instruction)
    return groups


def stage_name(stage: list[dict]) -> str:
    words = stage[0]["value"].split()
    return words[2] if len(words) == 3 and words[1].lower() == "as" else words[0]


def flags_and_words(value: str) -> tuple[dict[str, str], list[str]]:
    """Split `--from=x --chmod=0755 a b c` into its flags and the remaining words (JSON form too)."""
    words = json.loads(value) if value.lstrip().startswith("[") else shlex.split(value)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    return flags, [w for w in words if not w.startswith("--")]


def copies(instructions: list[dict]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context, i.e. without --from."""
    result = []
    for instruction in instructions:
        if instruction["instruction"] in ("COPY", "ADD"):
            flags, words = flags_and_words(instruction["value"])
            if "from" not in flags:
                result.append((words[:-1], words[-1]))
    return result


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, simplified: the last pattern matching the path or one of its
    parent directories decides, and `!` re-includes. `*` stays within one path element."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def read_dockerignore(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def arg_problems(instructions: list[dict], versions: dict[str, str]) -> list[str]:
    """Every ARG is a versions.env key and has a default somewhere, equal to versions.env's value
    (a stage may redeclare a global ARG without one, to use it)."""
    problems, names, defaulted = [], [], set()
    for instruction in instructions:
        if instruction["instruction"] != "ARG":
            continue
        name, has_default, default = instruction["value"].partition("=")
        names.append(name)
        if name not in versions:
            problems.append(f"ARG {name} is not a versions.env key")
        elif has_default:
            defaulted.add(name)
            if default != versions[name]:
                problems.append(f"ARG {name} defaults to {default!r}, versions.env has {versions[name]!r}")
    undefaulted = [name for name in dict.fromkeys(names) if name in versions and name not in defaulted]
    return problems + [f"ARG {name} has no default" for name in undefaulted]


def copy_problems(instructions: list[dict], root: Path, ignore_patterns: list[str]) -> list[str]:
    problems = []
    for sources, _ in copies(instructions):
        for source in sources:
            if not (root / source).exists():
                problems.append(f"COPY source {source} does not exist in the repository")
            elif dockerignore_excludes(source, ignore_patterns):
                problems.append(f"COPY source {source} is excluded by .dockerignore")
    return problems


def script_calls(stage: list[dict], script_path: str) -> list[list[str]]:
    """The arguments of every call of `script_path` in the stage's RUN instructions."""
    calls = []
    for instruction in stage:
        if instruction["instruction"] != "RUN":
            continue
        words = shlex.split(instruction["value"])
        for i, word in enumerate(words):
            if word == script_path:
                args = []
                for arg in words[i + 1:]:
                    if arg in SHELL_OPERATORS:
                        break
                    args.append(arg)
                calls.append(args)
    return calls


def install_problems(instructions: list[dict], gpu: bool) -> list[str]:
    """Every stage installs Python packages by running the repository's install script, with --gpu
    exactly in the GPU image."""
    problems = []
    for stage in stages(instructions):
        name = stage_name(stage)
        paths = [dest + Path(INSTALL_SCRIPT).name if dest.endswith("/") else dest
                 for sources, dest in copies(stage) if INSTALL_SCRIPT in sources]
        calls = [call for path in paths for call in script_calls(stage, path)]
        if not calls:
            problems.append(f"stage {name} does not run {INSTALL_SCRIPT} (COPY it, then RUN it)")
        for call in calls:
            if ("--gpu" in call) != gpu:
                problems.append(f"stage {name} runs {INSTALL_SCRIPT} {shlex.join(call)}: "
                                f"{'--gpu is required' if gpu else '--gpu does not belong'} in this image")
    return problems


def script_sets_nccl(script_text: str) -> bool:
    """The script's --gpu path builds with NCCL and makes `horovodrun --check-build` require it."""
    code = [line for line in script_text.splitlines() if not line.lstrip().startswith("#")]
    builds = any("gpu" in line and "HOROVOD_GPU_OPERATIONS=NCCL" in line for line in code)
    requires = any("gpu" in line and re.search(r"need\+=\(.*NCCL", line) for line in code)
    checks = any("--check-build" in line for line in code)
    return builds and requires and checks


def nccl_problems(instructions: list[dict], script_text: str) -> list[str]:
    env = " ".join(i["value"] for i in instructions if i["instruction"] == "ENV")
    if re.search(r"\bHOROVOD_GPU_OPERATIONS=NCCL\b", env) or script_sets_nccl(script_text):
        return []
    return ["HOROVOD_GPU_OPERATIONS=NCCL is set neither by ENV nor by the install script's --gpu path"]


def exec_form_problems(instructions: list[dict]) -> list[str]:
    """No shell strings built from input: ENTRYPOINT/CMD in exec form, no `sh -c`/`eval` in RUN."""
    problems = []
    for instruction in instructions:
        kind, value = instruction["instruction"], instruction["value"]
        if kind in ("ENTRYPOINT", "CMD") and not value.lstrip().startswith("["):
            problems.append(f"{kind} line {instruction['startline'] + 1} is in shell form: use a JSON array")
        if kind == "RUN" and re.search(r"\b(ba)?sh\s+-c\b|\beval\b", value):
            problems.append(f"RUN line {instruction['startline'] + 1} runs a shell string")
    return problems


# Variables the official base images set with ENV, from their Dockerfiles (docker-library/python;
# NVIDIA's cuda base/runtime/cudnn/devel images, which also set dozens of NV_* names). Under
# buildah and podman a base image's ENV wins over a same-named ARG, so such an ARG silently takes
# the base's value (python's PYTHON_VERSION=3.11.x made `python${PYTHON_VERSION}` fail); BuildKit
# lets the ARG win. An ARG must therefore never have one of these names.
BASE_IMAGE_ENV = {
    "python": {"PATH", "LANG", "GPG_KEY", "PYTHON_VERSION", "PYTHON_SHA256", "PYTHON_PIP_VERSION",
               "PYTHON_SETUPTOOLS_VERSION", "PYTHON_GET_PIP_URL", "PYTHON_GET_PIP_SHA256"},
    "nvidia/cuda": {"PATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "NVARCH", "CUDA_VERSION", "NCCL_VERSION",
                    "NVIDIA_REQUIRE_CUDA", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"},
}
BASE_IMAGE_ENV_PREFIXES = {"python": (), "nvidia/cuda": ("NV_",)}


def base_env_problems(instructions: list[dict]) -> list[str]:
    """ARGs named like a variable that a stage's base image sets with ENV."""
    repos = [stage[0]["value"].split()[0].split(":")[0] for stage in stages(instructions)]
    unknown = [repo for repo in repos if repo not in BASE_IMAGE_ENV]
    assert not unknown, f"add the ENV names of base image {unknown[0]} to BASE_IMAGE_ENV"
    problems = []
    for instruction in instructions:
        if instruction["instruction"] != "ARG":
            continue
        name = instruction["value"].partition("=")[0]
        for repo in dict.fromkeys(repos):
            if name in BASE_IMAGE_ENV[repo] or name.startswith(BASE_IMAGE_ENV_PREFIXES[repo]):
                problems.append(f"ARG {name} is also an ENV of the base image {repo}: "
                                "buildah and podman would use the base's value")
    return list(dict.fromkeys(problems))


def base_images(instructions: list[dict], versions: dict[str, str]) -> list[str]:
    """Each stage's base image with the global ARGs replaced by versions.env values."""
    declared = {i["value"].partition("=")[0] for i in instructions[: next(
        n for n, i in enumerate(instructions) if i["instruction"] == "FROM")] if i["instruction"] == "ARG"}
    images = []
    for stage in stages(instructions):
        image = stage[0]["value"].split()[0]
        for name in re.findall(r"\$\{(\w+)\}", image):
            assert name in declared, f"FROM {image} uses {name}, which no ARG before the first FROM declares"
            image = image.replace("${%s}" % name, versions[name])
        images.append(image)
    return images


def make_build_args(target: str) -> dict[str, str]:
    """The --build-arg pairs `make TARGET` would pass to docker build (dry run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-n", "-s", target], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    [command] = [line for line in out.splitlines() if " build " in line]
    words = shlex.split(command)
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--build-arg")


# The real Dockerfiles.

@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def image(request):
    return request.param, parse(DOCKERFILES[request.param].read_text())


def test_build_args_are_versions_env_keys_with_its_values(image):
    _, instructions = image
    assert arg_problems(instructions, VERSIONS) == []


def test_make_passes_every_build_arg_from_versions_env(image):
    name, instructions = image
    declared = {i["value"].partition("=")[0] for i in instructions if i["instruction"] == "ARG"}
    assert make_build_args(f"docker-{name}") == {key: VERSIONS[key] for key in declared}


def test_every_copy_source_exists_and_reaches_the_build_context(image):
    _, instructions = image
    patterns = read_dockerignore((ROOT / ".dockerignore").read_text())
    assert copy_problems(instructions, ROOT, patterns) == []


def test_every_stage_installs_with_the_same_script_as_make_install(image):
    name, instructions = image
    assert install_problems(instructions, gpu=name == "gpu") == []
    makefile = (ROOT / "Makefile").read_text()
    # `make install` runs the script on the venv's python; `GPU=1` adds --gpu as the GPU image does.
    assert re.search(rf"^\tbash {re.escape(INSTALL_SCRIPT)} \$\(PY\)( \$\(if \$\(filter 1,\$\(GPU\)\),--gpu\))?$", makefile, re.M)


def test_gpu_image_builds_horovod_with_nccl_and_checks_the_build():
    assert nccl_problems(parse(DOCKERFILES["gpu"].read_text()), SCRIPT_TEXT) == []


def test_commands_are_exec_form_not_shell_strings(image):
    _, instructions = image
    assert exec_form_problems(instructions) == []


def test_base_images_follow_versions_env():
    v = VERSIONS
    assert base_images(parse(DOCKERFILES["gpu"].read_text()), v) == [
        f"nvidia/cuda:{v['CUDA_RELEASE']}-cudnn-devel-ubuntu{v['UBUNTU_VERSION']}",
        f"nvidia/cuda:{v['CUDA_RELEASE']}-base-ubuntu{v['UBUNTU_VERSION']}",
    ]
    assert v["CUDA_RELEASE"].startswith("12.")
    assert base_images(parse(DOCKERFILES["cpu"].read_text()), v) == [
        f"python:{v['PYTHON_SERIES']}-slim-{v['DEBIAN_RELEASE']}"] * 2


def test_no_arg_is_named_like_an_env_variable_of_the_base_image(image):
    _, instructions = image
    assert base_env_problems(instructions) == []


def test_dockerignore_keeps_the_venv_and_git_out():
    patterns = read_dockerignore((ROOT / ".dockerignore").read_text())
    assert dockerignore_excludes(".venv/bin/python", patterns)
    assert dockerignore_excludes(".git/HEAD", patterns)
    assert dockerignore_excludes("hvdclip/__pycache__/trainer.cpython-311.pyc", patterns)
    assert not dockerignore_excludes("hvdclip/trainer.py", patterns)


# The checks themselves, against broken Dockerfiles.

GOOD = f"""\
ARG PYTHON_SERIES={VERSIONS['PYTHON_SERIES']}
FROM python:${{PYTHON_SERIES}}-slim AS builder
COPY docker/install_python.sh /opt/hvdclip/docker/
RUN bash /opt/hvdclip/docker/install_python.sh /opt/venv/bin/python --gpu
FROM python:${{PYTHON_SERIES}}-slim AS runtime
COPY docker/install_python.sh /opt/hvdclip/docker/
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \\
    python -m venv /opt/venv && bash /opt/hvdclip/docker/install_python.sh /opt/venv/bin/python --gpu && true
ENTRYPOINT ["/usr/bin/tini", "--"]
"""


def test_the_good_example_passes_every_check():
    instructions = parse(GOOD)
    assert arg_problems(instructions, VERSIONS) == []
    assert copy_problems(instructions, ROOT, []) == []
    assert install_problems(instructions, gpu=True) == []
    assert exec_form_problems(instructions) == []


def test_arg_check_catches_drift_unknown_names_and_missing_defaults():
    text = "ARG CUDA_RELEASE=11.8.0\nARG FANCY_VERSION=1\nARG UBUNTU_VERSION\nFROM scratch\n"
    assert arg_problems(parse(text), VERSIONS) == [
        f"ARG CUDA_RELEASE defaults to '11.8.0', versions.env has {VERSIONS['CUDA_RELEASE']!r}",
        "ARG FANCY_VERSION is not a versions.env key",
        "ARG UBUNTU_VERSION has no default",
    ]


def test_copy_check_catches_missing_and_ignored_sources_but_not_other_stages():
    text = GOOD + "COPY docker/no_such_file.sh tests/ /opt/\nCOPY --from=builder /wheels /wheels\n"
    assert copy_problems(parse(text), ROOT, ["*", "!docker/"]) == [
        "COPY source docker/no_such_file.sh does not exist in the repository",
        "COPY source tests/ is excluded by .dockerignore",
    ]


def test_install_check_catches_a_stage_without_the_script_and_a_wrong_variant():
    runtime_without_script = GOOD.replace("bash /opt/hvdclip/docker/install_python.sh /opt/venv/bin/python --gpu &&", "")
    assert install_problems(parse(runtime_without_script), gpu=True) == [
        f"stage runtime does not run {INSTALL_SCRIPT} (COPY it, then RUN it)"]
    assert install_problems(parse(GOOD), gpu=False) == [
        f"stage {stage} runs {INSTALL_SCRIPT} /opt/venv/bin/python --gpu: --gpu does not belong in this image"
        for stage in ("builder", "runtime")]
    # A script of the same name that is not the repository's does not count.
    other_script = GOOD.replace("COPY docker/install_python.sh", "COPY docker/install_system.sh")
    assert len(install_problems(parse(other_script), gpu=True)) == 2


def test_nccl_check_accepts_env_or_the_script_gpu_path_and_nothing_else():
    without_nccl = SCRIPT_TEXT.replace("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_GPU_OPERATIONS=MPI")
    without_check = SCRIPT_TEXT.replace("--check-build", "--version")
    for broken in (without_nccl, without_check):
        assert nccl_problems(parse(GOOD), broken) == [
            "HOROVOD_GPU_OPERATIONS=NCCL is set neither by ENV nor by the install script's --gpu path"]
    assert nccl_problems(parse(GOOD + "ENV HOROVOD_GPU_OPERATIONS=NCCL\n"), without_nccl) == []


def test_exec_form_check_catches_shell_form_and_shell_strings():
    text = GOOD + 'RUN bash -c "pip install $PACKAGE"\nENTRYPOINT tini -- $COMMAND\nCMD run.sh --all\n'
    assert exec_form_problems(parse(text)) == [
        "RUN line 10 runs a shell string",
        "ENTRYPOINT line 11 is in shell form: use a JSON array",
        "CMD line 12 is in shell form: use a JSON array",
    ]


def test_base_image_check_needs_global_args():
    with pytest.raises(AssertionError, match="CUDA_RELEASE, which no ARG before the first FROM declares"):
        base_images(parse("FROM nvidia/cuda:${CUDA_RELEASE}-base-ubuntu22.04\nARG CUDA_RELEASE=1\n"), VERSIONS)


def test_base_env_check_catches_the_official_images_variables():
    text = ("ARG PYTHON_VERSION=3.11\nFROM python:${PYTHON_VERSION}-slim\nARG PYTHON_VERSION\n"
            "FROM nvidia/cuda:12.5.1-base-ubuntu22.04\nARG NCCL_VERSION=2.22.3\nARG NV_CUDNN_VERSION\n"
            "ARG CUDNN_MAJOR=9\n")
    assert base_env_problems(parse(text)) == [
        f"ARG {name} is also an ENV of the base image {repo}: buildah and podman would use the base's value"
        for name, repo in (("PYTHON_VERSION", "python"), ("NCCL_VERSION", "nvidia/cuda"),
                           ("NV_CUDNN_VERSION", "nvidia/cuda"))]
    with pytest.raises(AssertionError, match="add the ENV names of base image ubuntu"):
        base_env_problems(parse("FROM ubuntu:22.04\nARG X=1\n"))


# docker/cuda_toolkit.sh: which CUDA toolkit and NCCL the GPU build uses, with fake toolkits.

TOOLKIT_SCRIPT = ROOT / "docker" / "cuda_toolkit.sh"


def fake_toolkit(root: Path, cuda: str, nccl: bool = False) -> Path:
    """A directory that looks like a CUDA toolkit of version `cuda` ("12.5") to the script."""
    major, minor = cuda.split(".")
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    # nvcc reports its toolkit root in a dry run (the script asks it, as nvcc may be a wrapper).
    nvcc.write_text(f"#!/bin/sh\ncase \"$*\" in *--dryrun*) echo '#$ TOP={root}/bin/..' >&2;; "
                    f"*) echo 'Cuda compilation tools, release {cuda}, V{cuda}.1';; esac\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {int(major) * 1000 + int(minor) * 10}\n")
    if nccl:
        (root / "include" / "nccl.h").write_text("\n")
    return root


def fake_python(tmp_path: Path, site: Path) -> Path:
    """Stands in for the venv's python: the script only asks it for site-packages."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho {site}\n")
    python.chmod(0o755)
    return python


def wheel_nccl(site: Path) -> Path:
    nccl = site / "nvidia" / "nccl"
    (nccl / "include").mkdir(parents=True)
    (nccl / "lib").mkdir()
    (nccl / "include" / "nccl.h").write_text("\n")
    (nccl / "lib" / "libnccl.so.2").write_text("")
    return nccl


def run_toolkit(tmp_path: Path, python: Path, path_dirs: list[Path] = (), **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "HVDCLIP_CUDA_FROM_PYPI",
                                                                "HOROVOD_BUILD_CUDA_CC_LIST")}
    # Only the fake nvcc, if any, on PATH: the build machine has a CUDA 13 nvcc of its own.
    environ["PATH"] = ":".join([*map(str, path_dirs), "/usr/bin", "/bin"])
    environ["HVDCLIP_CUDA_CACHE"] = str(tmp_path / "cache")
    environ.update(env)
    return subprocess.run(["bash", str(TOOLKIT_SCRIPT), str(python)], env=environ, capture_output=True,
                          text=True, timeout=60)


def settings(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_toolkit_a_system_cuda_12_with_its_nccl_is_used_as_is(tmp_path):
    cuda = fake_toolkit(tmp_path / "cuda-12.5", "12.5", nccl=True)
    python = fake_python(tmp_path, tmp_path / "site")
    found = settings(run_toolkit(tmp_path, python, CUDA_HOME=str(cuda)))
    assert found == {
        "HOROVOD_CUDA_HOME": str(cuda),
        "HOROVOD_BUILD_CUDA_CC_LIST": VERSIONS["CUDA_CC_LIST"],
        "HOROVOD_NCCL_INCLUDE": str(cuda / "include"),
        "HVDCLIP_CUDA_ID": f"system-cuda12.5-nvcc12.5-sm{VERSIONS['CUDA_CC_LIST'].replace(',', '_')}-ncclsystem",
    }
    # The same toolkit found through nvcc on PATH, here a symlink elsewhere, as nvcc reports it.
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "nvcc").symlink_to(cuda / "bin" / "nvcc")
    assert settings(run_toolkit(tmp_path, python, [tmp_path / "path"]))["HOROVOD_CUDA_HOME"] == str(cuda)


def test_toolkit_nccl_from_the_wheel_is_linked_shared_with_an_rpath(tmp_path):
    cuda = fake_toolkit(tmp_path / "cuda", "12.4")
    site = tmp_path / "site"
    nccl = wheel_nccl(site)
    found = settings(run_toolkit(tmp_path, fake_python(tmp_path, site), CUDA_HOME=str(cuda),
                                 HOROVOD_BUILD_CUDA_CC_LIST="75,80"))
    assert found["HOROVOD_NCCL_INCLUDE"] == str(nccl / "include")
    assert found["HOROVOD_NCCL_LINK"] == "SHARED"
    assert found["HVDCLIP_NCCL_RPATH"] == "$ORIGIN/../../nvidia/nccl/lib"
    # The linker needs libnccl.so; the wheel has only libnccl.so.2.
    assert (Path(found["HOROVOD_NCCL_LIB"]) / "libnccl.so").resolve() == nccl / "lib" / "libnccl.so.2"
    assert found["HVDCLIP_CUDA_ID"] == "system-cuda12.4-nvcc12.4-sm75_80-ncclwheel"


def test_toolkit_another_cuda_major_or_the_pypi_switch_takes_the_pypi_toolkit(tmp_path):
    cuda13 = fake_toolkit(tmp_path / "cuda-13.0", "13.0", nccl=True)
    cuda12 = fake_toolkit(tmp_path / "cuda-12.5", "12.5", nccl=True)
    v = VERSIONS
    # An assembled toolkit already in the cache (assembling one downloads from PyPI).
    key = f"nvcc{v['NVIDIA_CUDA_NVCC_VERSION']}-cudart{v['NVIDIA_CUDA_RUNTIME_CU12_VERSION']}-cccl{v['NVIDIA_CUDA_CCCL_CU12_VERSION']}"
    assembled = fake_toolkit(tmp_path / "cache" / key / "root", "12.9")
    (assembled.parent / ".complete").touch()
    site = tmp_path / "site"
    wheel_nccl(site)
    python = fake_python(tmp_path, site)
    for result in (run_toolkit(tmp_path, python, CUDA_HOME=str(cuda13)),
                   run_toolkit(tmp_path, python, CUDA_HOME=str(cuda12), HVDCLIP_CUDA_FROM_PYPI="1")):
        found = settings(result)
        assert found["HOROVOD_CUDA_HOME"] == str(assembled)
        assert found["HVDCLIP_CUDA_ID"].startswith("pypi-cuda12.9-")
        assert found["HOROVOD_NCCL_LINK"] == "SHARED"
    assert "is CUDA 13.0, TensorFlow's wheels are CUDA 12; assembling a toolkit from PyPI instead" in \
        run_toolkit(tmp_path, python, CUDA_HOME=str(cuda13)).stderr


def test_toolkit_without_any_nccl_fails_with_a_hint(tmp_path):
    cuda = fake_toolkit(tmp_path / "cuda", "12.5")
    result = run_toolkit(tmp_path, fake_python(tmp_path, tmp_path / "site"), CUDA_HOME=str(cuda))
    assert result.returncode != 0 and result.stdout == ""
    assert "no system NCCL (nccl.h) and no nvidia-nccl-cu12 wheel" in result.stderr
    assert "install tensorflow[and-cuda] first" in result.stderr
