"""The Python packages the GPU host lacks, pinned to the versions of this environment. `make device-pack` downloads
the Python 3.12 wheels of `train` (for `reskd device-train`) into .device/wheels; `make device-pack-run` those of
`serve` (for `bench/device_run.py`) into .device-run/wheels, small enough to travel beside the last part of
onnxruntime-gpu.

The list is not kept by hand: it is reskd's own requirements (the core and the named extra, as this environment's
installed metadata declares them) and everything they require in turn, evaluated for Linux and Python 3.12, less
the packages in HOST. A hand-kept list once left out orjson, and the first served GPU run died on its import.

    python bench/device_deps.py train|serve
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# On the GPU host already, and large or bound to its CUDA build (device/KINDS.md lists the host's packages): never
# carried, and not followed further. onnxruntime travels on its own (onnxruntime-gpu, docs/device.md).
HOST = {"torch", "torchvision", "numpy", "pillow", "onnx", "onnxscript", "onnx-ir", "protobuf", "ml-dtypes",
        "onnxruntime", "pyarrow", "prometheus-client", "httpx", "httpcore", "certifi", "triton", "sympy", "networkx",
        "jinja2", "markupsafe", "filelock", "fsspec", "setuptools"}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET, "extra": e}) for e in extras or {""})


def closure(extra: str) -> dict[str, str]:
    """name -> installed version of every package reskd[extra] needs on Linux/Python 3.12, less HOST."""
    found: dict[str, str] = {}
    todo = [(req, set(req.extras)) for req in map(Requirement, requires("reskd") or [])
            if _wanted(req, {extra})]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in HOST or name == "reskd" or name in found:
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            sys.exit(f"{name} (needed by reskd[{extra}]) is not installed here: run `make setup-{extra}` first")
        todo += [(r, set(r.extras)) for r in map(Requirement, requires(name) or []) if _wanted(r, extras)]
    return dict(sorted(found.items()))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "train"
    if which not in ("train", "serve"):
        sys.exit("usage: python bench/device_deps.py train|serve")
    print("\n".join(f"{name}=={v}" for name, v in closure(which).items()))
