# The two entry points of README.md: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_DIR ?= runs/fashion-mnist-cpu

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run train train-reference train-reference-split bundle-reference test test-fast setup-serve setup-train setup-test data docker-tools docker docker-gpu docker-standin \
	k8s-rules grpc-protocol device-pack device-pack-run device-train device-run

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Each install runs again only when pyproject.toml changes (the package is installed editable: code changes need
# no reinstall); the stamps live in the venv, so a new venv installs afresh.
setup-serve: $(VENV)/.installed-serve
setup-train: $(VENV)/.installed-train
setup-test: $(VENV)/.installed-test

$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[serve]'
	touch $@

$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

# Real Fashion-MNIST (the official 60k/10k IDX files) and Prometheus (the tests scrape the server with it), from
# Debian's packages.
# $(call install_missing,WHAT FAILS WITHOUT THEM): the Debian packages the recipe put in the shell variable
# `missing`, installed when root, else named with what goes without them.
define install_missing
if [ -z "$$missing" ]; then exit 0; fi; \
if [ "$$(id -u)" = 0 ]; then \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
else \
	echo "Missing Debian packages: run 'sudo apt-get install $${missing# }'." >&2; \
	echo "Without them, $(1)." >&2; \
fi
endef

data:
	@missing=""; [ -f $(FMNIST) ] || missing="dataset-fashion-mnist"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	$(call install_missing,tests that need them skip (and fail under CI=true); training on the data cannot run)

# The Docker tests (tests/test_docker.py): Debian's engine, and debootstrap to stand in for the Dockerfile's base
# image where no registry can be reached. The tests start dockerd themselves when none is running.
DOCKER_TOOLS := dockerd:docker.io containerd:containerd runc:runc iptables:iptables debootstrap:debootstrap
docker-tools:
	@missing=""; for tool in $(DOCKER_TOOLS); do \
		command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool#*:}"; done; \
	$(call install_missing,the Docker tests skip (and fail under CI=true))

# The serving image (Dockerfile; docs/deploy.md). Where this machine trusts extra CAs (a TLS proxy), pip inside the
# build gets the CA bundle as a BuildKit secret, never stored in the image. DOCKER: a CLI with BuildKit (Debian's
# docker.io has it built in; a newer one needs the buildx plugin).
IMAGE ?= reskd
DOCKER ?= $(firstword $(wildcard /usr/bin/docker) docker)
BASE := $(shell sed -n 's/^ARG BASE=//p' Dockerfile)
CA_SECRET := --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt
DOCKER_BUILD := DOCKER_BUILDKIT=1 $(DOCKER) build --network=host \
	$(if $(wildcard /usr/local/share/ca-certificates/*.crt),$(CA_SECRET))

docker:
	$(DOCKER_BUILD) -t $(IMAGE) .

# The GPU image (onnxruntime-gpu with NVIDIA's CUDA/cuDNN wheels, a few GB): on demand, not in the tests.
docker-gpu:
	$(DOCKER_BUILD) --target gpu -t $(IMAGE):gpu .

# Where no registry can be reached: the Dockerfile's base image made from the Debian mirror (debootstrap), once.
docker-standin:
	$(DOCKER) image inspect $(BASE) >/dev/null 2>&1 || DOCKER=$(DOCKER) bash tests/standin_base.sh $(BASE)

# The PrometheusRule of deploy/k8s, generated from deploy/prometheus's rule files: run after editing those (the
# tests fail while it is out of date).
k8s-rules:
	$(PYTHON) deploy/k8s/components/monitoring/prometheusrule.py

# The gRPC protocol's Python modules from the vendored .proto files (grpcio-tools, in the test install).
grpc-protocol: setup-test
	$(BIN)/python -m reskd.service.rpc.protocol.generate

# The main job: the server on the bundled models (no torch in this install).
run: setup-serve
	$(BIN)/reskd serve --host $(HOST) --port $(PORT)

# The CPU recipe end to end (about an hour on 2 cores), the job that made the bundled model.
train: setup-train data
	$(BIN)/reskd train --recipe fashion-mnist-cpu --out $(RUN_DIR) --resume

# The converged CPU reference (training/sweeps/fashion-mnist-reference.toml: the recipe's teacher once, every later
# stage at its epochs and at twice them; about 7 h 30 min on 2 idle cores): started or resumed (inside a stage too)
# in REFERENCE_DIR, outside the work tree, at the lowest priority so that other work on the machine goes first.
# Started in a session of its own (setsid, a detached terminal), Linux's autogroup scheduling would still give it
# half the machine whatever its nice value: then also `echo 19 > /proc/PID/autogroup` (docs/reference.md).
# Pause it for timings: kill -STOP / kill -CONT its process.
REFERENCE_DIR ?= $(HOME)/reskd-runs/reference
train-reference: setup-train data
	nice -n 19 $(BIN)/reskd sweep --sweep training/sweeps/fashion-mnist-reference.toml --out $(REFERENCE_DIR) \
		--device cpu

# The same sweep after its teacher, as two processes of one thread each (kd30 variants, kd60 variants) sharing the
# teacher (`reskd sweep --only`): 1.2-2x the epochs per second of one two-thread process on 2 cores (docs/reference.md),
# then one pass that writes the whole summary. Refused before the teacher is trained (both would train it).
train-reference-split: setup-train data
	@test -f $(REFERENCE_DIR)/kd30_head30/checkpoints/teacher.pt || \
		{ echo "the reference teacher is not trained yet: make train-reference first"; exit 2; }
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/reskd sweep --sweep training/sweeps/fashion-mnist-reference.toml \
		--out $(REFERENCE_DIR) --device cpu --only kd30_head30,kd30_head60 & \
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/reskd sweep --sweep training/sweeps/fashion-mnist-reference.toml \
		--out $(REFERENCE_DIR) --device cpu --only kd60_head30,kd60_head60 & \
	wait
	nice -n 19 $(BIN)/reskd sweep --sweep training/sweeps/fashion-mnist-reference.toml --out $(REFERENCE_DIR) \
		--device cpu

# The finished reference into models/ (export/reference.py): the variant the doubling pairs chose, as
# fashion-mnist/3 with the teacher as its fallback stage (+ fashion-mnist-teacher/3) and the independent cascade with
# the same fallback as fashion-mnist-independent/2. Refused until every pair is measured; never overwrites.
bundle-reference: setup-train data
	$(BIN)/python -m reskd.export.reference --sweep-dir $(REFERENCE_DIR) --repo models

# Every test, the 25 slowest named at the end of the log.
test: setup-test data docker-tools
	$(BIN)/python -m pytest -q --durations=25

# The everyday loop: every lane but the slow ones (tests/lanes.py): no servers, Prometheus, Docker, training
# rehearsals or soaks. `make test` and CI still run everything.
test-fast: setup-test data
	$(BIN)/python -m pytest -q --durations=10 -m "not (server or prometheus or docker or rehearsal or soak)"

# The reference cascade on a GPU host (docs/device.md). Here: everything that host lacks, into the git-ignored
# .device/ the device tool carries: Python 3.12 wheels of the training extra's pure dependencies (the host has torch
# and numpy) and the Fashion-MNIST files.
device-pack: setup-train data
	rm -rf .device && mkdir -p .device/wheels .device/data
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .device/wheels $$($(BIN)/python bench/device_deps.py train)
	cp $(dir $(FMNIST))*-ubyte.gz .device/data/
	@du -sh .device

# For the GPU measurement (make device-run): the server's wheels and the test split, into the git-ignored
# .device-run/ (a few MB: it travels beside the last part of onnxruntime-gpu, docs/device.md).
device-pack-run: setup-test data
	rm -rf .device-run && mkdir -p .device-run/wheels .device-run/data
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .device-run/wheels $$($(BIN)/python bench/device_deps.py serve)
	cp $(dir $(FMNIST))t10k-*-ubyte.gz .device-run/data/
	@du -sh .device-run

# There: train the plan in resumable steps, packing the run into $(OUT) after each (bench/device_train.sh).
device-train:
	bash bench/device_train.sh

# There: the GPU measurement (in process and served, each engine and scheduler) into $(OUT)/device-run.json.
device-run:
	bash bench/device_run.sh
