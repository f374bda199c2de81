"""Regenerate the Python code of the vendored protocol (grpcio-tools, a dev dependency):

    python -m reskd.service.rpc.protocol.generate      (or: make grpc-protocol)

protoc writes `import model_config_pb2` for the proto's own import; within this package that import is relative.
tests/test_serve_grpc.py checks that the committed modules are what this writes."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("grpc_service.proto", "model_config.proto")
MODULES = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py")


def generate() -> dict[str, str]:
    """-> {module file name: its text}, generated from the .proto files beside this script."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}",
                            *(str(HERE / p) for p in PROTOS)])
        if code != 0:
            raise RuntimeError(f"protoc failed with status {code}")
        return {name: re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", (Path(out) / name).read_text(),
                             flags=re.M) for name in MODULES}


def main() -> int:
    for name, text in generate().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
