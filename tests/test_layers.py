"""The import structure: import-linter's contracts (pyproject.toml, [tool.importlinter]) hold, a new upward import
or cycle fails them wherever it hides (inside a function, under TYPE_CHECKING), and every module imports on its
own in a fresh process (an import cycle that only bites in some import order shows there)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
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


def test_every_module_imports_on_its_own_in_a_fresh_process():
    names = modules()
    assert "reskd.service.serving.pipeline" in names and "reskd.training.loop" in names and len(names) > 60

    def load(name: str) -> tuple[str, int, str]:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd="/", capture_output=True, text=True,
                           timeout=300)
        return name, r.returncode, r.stderr[-2000:]

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        failed = [(n, err) for n, code, err in pool.map(load, names) if code != 0]
    assert not failed, "\n".join(f"{n}:\n{err}" for n, err in failed)
