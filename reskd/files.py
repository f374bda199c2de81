"""Files written whole or not at all: a manifest, a checkpoint, a scoring shard or output is written under a
temporary name beside its final path, flushed to disk, then renamed over it (an atomic step on POSIX file
systems). A reader sees the old file or the new one, never a torn one; a crash leaves at most a stale
`.NAME.PID.tmp`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write; when the block ends, that file becomes `path`. If the block raises,
    the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    with replacing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
