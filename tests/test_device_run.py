"""The GPU measurement (`make device-run`) rehearsed on CPU with --tiny, through the same shell entry the GPU host
runs: the checkout as the `reskd` package, every in-process engine, the server with the cascade, the teacher and
the no-op model, all figures in $OUT/device-run.json. Device time is never spent finding a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import real_fashion_mnist_or_fail


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real_data
@pytest.mark.rehearsal
@pytest.mark.server
def test_the_device_run_rehearses_every_step_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "FASHION_MNIST_DIR": str(real_fashion_mnist_or_fail()),
           "RESKD_DEVICE_SITE": sysconfig.get_paths()["purelib"],  # the wheels are installed here already
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh"), "--device", "cpu", "--tiny"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "device-run.json").read_text())
    assert got["machine"]["tiny"] and "wall_s" in got
    assert {"fashion-mnist/1", "fashion-mnist-teacher/1"} <= set(got["in_process"])
    # The newest version of each name, which the targets name, is measured before the served part; the rest after.
    from reskd.manifest import ModelRepository

    repo = ModelRepository(ROOT / "models")
    names = ("fashion-mnist", "fashion-mnist-teacher", "fashion-mnist-independent")
    newest = [f"{n}/{max(repo.versions(n))}" for n in names]
    assert list(got["in_process"])[:3] == newest
    assert set(got["in_process"]) == {f"{n}/{v}" for n in names for v in repo.versions(n)}
    assert 0 < got["served_by_s"] <= got["wall_s"]
    for version, by_engine in got["in_process"].items():
        assert set(by_engine) == {"host", "bound"}, by_engine
        answers = {(e["accuracy"], tuple(e["exits"])) for e in by_engine.values()}
        assert len(answers) == 1, by_engine  # every engine gives the same answers
        for e in by_engine.values():
            assert e["b1_images_per_s"] > 0 and e["b256_images_per_s"] > 0 and e["b1_p99_ms"] >= e["b1_p50_ms"]
    assert got["in_process"]["fashion-mnist/1"]["host"]["pct_teacher_flops"] < 50
    served = got["served"]["auto"]
    for model in ("fashion-mnist", "fashion-mnist-teacher", "noop"):
        for load in ("single c1", "v2 256-image binary c8"):
            assert served[model][load]["errors"] == 0 and served[model][load]["images_per_s"] > 0, served[model]
    assert served["metrics"]["reskd_images_total"] > 0


def test_the_device_wheels_cover_every_package_the_server_imports():
    """What `make device-pack-run` carries (bench/device_deps.py) plus what the GPU host has must hold every
    distribution the server and the measurement import: a hand-kept list once lacked orjson and the first served
    GPU run died on it. The imports are read from a fresh process that loads the server's whole module tree."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_deps
    finally:
        sys.path.remove(str(ROOT / "bench"))
    code = ("import json, sys, importlib.metadata as md\n"
            "import reskd.service.launch, reskd.service.supervisor, reskd.service.rest.app, reskd.cli\n"
            "dists = md.packages_distributions()\n"
            "names = {d for m in list(sys.modules) for d in dists.get(m.split('.')[0], [])}\n"
            "print(json.dumps(sorted(names)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    from packaging.utils import canonicalize_name

    # grpc's own __init__ imports grpc_tools where it is installed (the dev extra has it, for `make grpc-protocol`)
    # and goes on without it: nothing of the server needs it.
    imported = {canonicalize_name(n) for n in json.loads(done.stdout)} - {"reskd", "grpcio-tools"}
    carried = set(device_deps.closure("serve"))
    assert "fastapi" in imported and "orjson" in imported  # the probe sees the server's imports at all
    assert imported - carried - device_deps.HOST == set()
