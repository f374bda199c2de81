"""The test lanes (tests/lanes.py) hold together: `make test-fast` selects what lanes.FAST names, every lane is a
registered marker, the runtime check refuses an unmarked test that starts a server, and the fast lane collects no
test of a server module."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import lanes

ROOT = Path(__file__).resolve().parents[1]


def test_make_test_fast_deselects_exactly_the_lanes():
    target = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert target, "Makefile has no test-fast target"
    assert f'-m "{lanes.FAST}"' in target.group(1), target.group(1)


def test_every_lane_is_a_registered_marker(pytestconfig):
    registered = {m.split(":")[0] for m in pytestconfig.getini("markers")}
    assert set(lanes.LANES) <= registered
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in config["addopts"]  # a misspelt lane marker fails collection


class _Item:
    def __init__(self, *markers):
        self.nodeid = "tests/test_x.py::test_y"
        self.markers = set(markers)

    def get_closest_marker(self, name):
        return name if name in self.markers else None


def test_an_unmarked_test_that_starts_a_server_fails(monkeypatch):
    monkeypatch.setattr(lanes, "current", _Item("real_data"))
    with pytest.raises(lanes.LaneError, match="not marked `server`"):
        lanes.require("server", "a `reskd serve` process")
    monkeypatch.setattr(lanes, "current", _Item("server"))
    lanes.require("server", "a `reskd serve` process")  # marked: allowed


SLOW_MODULES = ("test_serve", "test_prometheus", "test_docker", "test_device_train")


def module_of(nodeid: str) -> str:
    return nodeid.split("::")[0].split("/")[-1]


def test_the_fast_lane_collects_no_server_docker_or_rehearsal_module():
    every = lanes.collected
    if {m for m in SLOW_MODULES if any(module_of(i).startswith(m) for i in every)} == set(SLOW_MODULES):
        # this session collected the whole suite (make test, make test-fast): its markers say what -m FAST keeps
        ids = [i for i, markers in every.items() if not markers & set(lanes.LANES)]
    else:  # run on its own: collect the suite in a process of its own, as make test-fast does
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", lanes.FAST, "-p",
                               "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and any(module_of(i) == "test_lanes.py" for i in ids)
    assert not [i for i in ids if module_of(i).startswith(SLOW_MODULES)]
