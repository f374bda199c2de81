"""The Python packages the GPU host lacks (it has torch, numpy, Pillow, onnx, httpx, prometheus_client; see
shared/device/README.md), pinned to the versions of this environment. `make device-pack` downloads the Python 3.12
wheels of `train` (for `reskd device-train`) into .device/wheels; `make device-pack-run` those of `serve` (for
`bench/device_run.py`) into .device-run/wheels, small enough to travel beside the last part of onnxruntime-gpu.

    python bench/device_deps.py train|serve
"""

import sys
from importlib.metadata import version

PYDANTIC = ["pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection"]
PACKAGES = {
    # pydantic (recipes), tqdm (progress), matplotlib (the report's plot) and what they import
    "train": [*PYDANTIC, "tqdm", "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing",
              "python-dateutil", "tzdata", "packaging"],
    # the server (reskd serve) and what it imports
    "serve": [*PYDANTIC, "fastapi", "annotated-doc", "opentelemetry-api", "starlette", "anyio", "idna", "uvicorn",
              "click", "h11", "pydantic-settings", "python-dotenv", "python-multipart", "python-json-logger"],
}

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "train"
    print("\n".join(f"{name}=={version(name)}" for name in PACKAGES[which]))
