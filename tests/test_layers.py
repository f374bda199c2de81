"""The import structure: import-linter's contracts (pyproject.toml, [tool.importlinter]) hold, a new upward import
or cycle fails them wherever it hides (inside a function, under TYPE_CHECKING), and every module imports on its
own in a fresh process (an import cycle that only bites in some import order shows there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LINT = Path(sys.executable).parent / "lint-imports"


def stage(dest: Path) -> Path:
    """The package as an installed wheel lays it out (service/ as reskd/service/, ...; pyproject's package-dir):
    import-linter reads a package from one folder, which the editable install's path mapping is not."""
    setup = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    for package, folder in sorted(setup["package-dir"].items()):
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "plans", "recipes", "sweeps"))
    return dest


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), str(PYPROJECT), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage(tmp_path_factory.mktemp("staged"))


def test_the_import_contracts_hold(staged):
    result = lint(staged)
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout
    assert {c["id"] for c in contracts} >= {"service-layers", "serving-protocol-neutral", "serving-without-torch"}


@pytest.mark.parametrize("module,line,names", [
    # the cycle the layers replaced: the worker side importing the process that starts it, inside a function
    ("service/link.py", "def _late():\n    from .server import run_worker  # noqa\n",
     ("reskd.service.link -> reskd.service.server",)),
    # the serving layer reaching up to a process module, only while type checking
    ("service/serving/state.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..link import WorkerLink\n",
     ("reskd.service.serving.state -> reskd.service.link",)),
    # the protocol-neutral layer taking a web framework
    ("service/serving/pipeline.py", "def _req():\n    import starlette.requests  # noqa\n",
     ("reskd.service.serving.pipeline -> starlette",)),
    # the serving path taking torch
    ("scoring/batch.py", "def _t():\n    import torch  # noqa\n", ("reskd.scoring.batch -> torch",)),
])
def test_a_forbidden_import_anywhere_in_a_module_breaks_a_contract(tmp_path, module, line, names):
    root = stage(tmp_path)
    target = root / "reskd" / module
    target.write_text(target.read_text() + "\n\n" + line)
    result = lint(root)
    assert result.returncode != 0
    assert "0 broken" not in result.stdout
    for name in names:
        assert name in result.stdout, result.stdout


def modules() -> list[str]:
    setup = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    names = []
    for package, folder in setup["package-dir"].items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            names.append(".".join([package, *(p for p in rel.parts if p != "__init__")]))
    return sorted(names)


# Imports every module named on its command line (after the first argument) first in a process of its own, forked
# from one that has loaded the heavy third-party packages (the first argument, comma-separated) and nothing of
# reskd: a cycle inside reskd that bites in one import order still shows, without paying torch's import 70 times.
# Prints one JSON line per module: name, status, traceback tail.
FORK_EACH = r"""
import importlib, json, os, sys, traceback
for heavy in filter(None, sys.argv[1].split(",")):
    try:
        importlib.import_module(heavy)
    except Exception:
        pass
assert not [m for m in sys.modules if m == "reskd" or m.startswith("reskd.")], "reskd loaded before the fork"
for name in sys.argv[2:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code, msg = 0, b""
        except BaseException:
            code, msg = 1, traceback.format_exc()[-2000:].encode()
        os.write(w, msg)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    print(json.dumps([name, os.waitstatus_to_exitcode(status), err]), flush=True)
"""


HEAVY = "numpy,torch,torchvision,onnx,onnxruntime,fastapi,pydantic,prometheus_client,PIL,httpx,matplotlib,uvicorn"


def test_every_module_imports_on_its_own_in_a_fresh_process():
    names = modules()
    assert "reskd.service.serving.pipeline" in names and "reskd.training.loop" in names and len(names) > 60
    halves = [names[0::2], names[1::2]]  # one forking process per core here
    procs = [subprocess.Popen([sys.executable, "-c", FORK_EACH, HEAVY, *half], cwd="/", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for half in halves]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results += [json.loads(line) for line in out.splitlines()]
    assert sorted(n for n, _, _ in results) == names
    failed = [(n, err) for n, code, err in results if code != 0]
    assert not failed, "\n".join(f"{n}:\n{err}" for n, err in failed)


def test_the_fork_check_sees_a_module_that_cannot_import_on_its_own(tmp_path):
    """A module whose import fails is reported with its traceback, so the check above can fail."""
    (tmp_path / "broken_mod.py").write_text("import reskd.no_such_module\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", FORK_EACH, "", "json", "broken_mod"], cwd="/", capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {n: (code, err) for n, code, err in map(json.loads, r.stdout.splitlines())}
    assert results["json"][0] == 0
    assert results["broken_mod"][0] == 1 and "reskd.no_such_module" in results["broken_mod"][1]
