"""The Python packages `reskd device-train` and `bench/device_run.py` need beyond what the GPU host has (torch,
numpy, Pillow, onnx, httpx, prometheus_client; see shared/device/README.md), pinned to the versions of this
environment: `make device-pack` downloads their Python 3.12 wheels into .device/wheels. onnxruntime-gpu is too big
for one call and travels on its own (docs/device.md)."""

from importlib.metadata import version

# pydantic (recipes), tqdm (progress), matplotlib (the report's plot) and what they import.
PACKAGES = ["pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection", "tqdm",
            "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "tzdata",
            "packaging",
            # the server (reskd serve) for the served half of the GPU measurement
            "fastapi", "annotated-doc", "opentelemetry-api", "starlette", "anyio", "idna", "uvicorn", "click", "h11",
            "pydantic-settings", "python-dotenv", "python-multipart", "python-json-logger"]

if __name__ == "__main__":
    print("\n".join(f"{name}=={version(name)}" for name in PACKAGES))
