# The two entry points of README.md: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_DIR ?= runs/fashion-mnist-cpu

.PHONY: run test setup-train setup-test data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup-train: $(BIN)/python
	$(BIN)/pip install -q -e '.[train]'

setup-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'

# Real Fashion-MNIST from Debian's package (the official 60k/10k IDX files).
data:
	@if [ -f $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'." >&2; \
		echo "Without it, tests on real data skip (and fail under CI=true); training on it cannot run." >&2; \
	fi

# The main job until the server lands: the CPU recipe end to end (about an hour on 2 cores).
run: setup-train data
	$(BIN)/reskd train --recipe fashion-mnist-cpu --out $(RUN_DIR) --resume

test: setup-test data
	$(BIN)/python -m pytest -q
