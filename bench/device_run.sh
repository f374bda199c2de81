#!/usr/bin/env bash
# `make device-run`, on the GPU host (docs/device.md): the whole GPU measurement (bench/device_run.py) from a copy
# of this checkout that carries .device-run/ (made by `make device-pack-run`), with onnxruntime-gpu installed in ORT_SITE
# (default /tmp/site) by the calls that carried it. Results go to $OUT/device-run.json as they are measured.
#   OUT=/path/to/bring/back bash bench/device_run.sh [--device cpu] [--tiny] [--duration S]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
site=${RESKD_DEVICE_SITE:-/tmp/reskd-site}
if [ ! -d "$site/fastapi" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .device-run/wheels/*.whl
fi
# The checkout as the installed `reskd` package: its core plus the top-level folders an install maps into it, as
# links, so the server processes this script starts import it the same way.
pkg=$(mktemp -d)/reskd
mkdir -p "$pkg"
ln -s "$PWD"/reskd/* "$pkg"/
for d in training export service scoring; do ln -s "$PWD/$d" "$pkg/$d"; done
export PYTHONPATH="$(dirname "$pkg"):${ORT_SITE:-/tmp/site}:$site${PYTHONPATH:+:$PYTHONPATH}"
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.device-run/data}
python3 bench/device_run.py --out "$OUT/device-run.json" "$@"
