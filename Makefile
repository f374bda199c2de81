# The two entry points of README.md: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_DIR ?= runs/fashion-mnist-cpu

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run train test setup-serve setup-train setup-test data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup-serve: $(BIN)/python
	$(BIN)/pip install -q -e '.[serve]'

setup-train: $(BIN)/python
	$(BIN)/pip install -q -e '.[train]'

setup-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'

# Real Fashion-MNIST (the official 60k/10k IDX files) and Prometheus (the tests scrape the server with it), from
# Debian's packages.
data:
	@missing=""; [ -f $(FMNIST) ] || missing="dataset-fashion-mnist"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "Missing Debian packages: run 'sudo apt-get install $$missing'." >&2; \
		echo "Without them, tests that need them skip (and fail under CI=true); training on the data cannot run." >&2; \
	fi

# The main job: the server on the bundled models (no torch in this install).
run: setup-serve
	$(BIN)/reskd serve --host $(HOST) --port $(PORT)

# The CPU recipe end to end (about an hour on 2 cores), the job that made the bundled model.
train: setup-train data
	$(BIN)/reskd train --recipe fashion-mnist-cpu --out $(RUN_DIR) --resume

test: setup-test data
	$(BIN)/python -m pytest -q
