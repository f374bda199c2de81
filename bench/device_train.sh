#!/usr/bin/env bash
# `make device-train`, on the GPU host (docs/device.md): from a copy of this checkout that carries .device/ (made
# by `make device-pack` on the development machine), install the carried wheels beside the host's torch, run the
# checkout as the `reskd` package without installing it, train the plan's steps (resuming what RUN_OUT holds), and
# after every step leave RUN_OUT packed in $OUT, the folder the device tool brings back.
#   OUT=/path/to/bring/back bash bench/device_train.sh [--steps teacher,cascade,baselines] [--tiny] [--device cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
site=${RESKD_DEVICE_SITE:-/tmp/reskd-site}
if [ ! -d "$site/pydantic" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .device/wheels/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
run_out=${RUN_OUT:-/tmp/reskd-device}
# A fresh machine after a cut-off call: the parts that call brought back, carried in .device/resume/, are the run
# to resume (docs/device.md). A warm machine keeps its own run_out, which is newer.
resume=${RESKD_DEVICE_RESUME:-.device/resume}
if [ ! -e "$run_out" ] && compgen -G "$resume/run.tar.part*" > /dev/null; then
  mkdir -p "$run_out" && cat "$resume"/run.tar.part* | tar -x -C "$run_out"
  echo "[device-train] resuming the run carried in $resume" >&2
fi
# The top-level folders (training/, export/, ...) are found as reskd.training, ... exactly as an install maps them.
python3 - device-train --data-root .device/data --out "$run_out" --pack "$OUT" --device cuda \
  "$@" <<'PY'
import sys
from pathlib import Path

root = Path.cwd()
sys.path.insert(0, str(root))
import reskd

reskd.__path__.append(str(root))
from reskd.cli import main

sys.argv[0] = "reskd"
sys.exit(main(sys.argv[1:]))
PY
