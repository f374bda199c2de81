"""The Python packages `reskd device-train` needs beyond what the GPU host has (torch, numpy, Pillow; see
shared/device/README.md), pinned to the versions of this environment: `make device-pack` downloads their Python
3.12 wheels into .device/wheels."""

from importlib.metadata import version

# pydantic (recipes), tqdm (progress), matplotlib (the report's plot) and what they import.
PACKAGES = ["pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection", "tqdm",
            "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "tzdata",
            "packaging"]

if __name__ == "__main__":
    print("\n".join(f"{name}=={version(name)}" for name in PACKAGES))
