"""What to score, and the true labels when given.

INPUTS, in the order given, each one of:
- a directory: every image file under it (recursive; suffixes in IMAGE_SUFFIXES; hidden names skipped), sorted;
- a list file (.txt/.lst: one path a line, blank lines and `#` comments skipped; .csv: a `path` column;
  .parquet/.pq: a `path` column). Relative paths in a list are relative to the list's folder. Listed paths are
  taken as they are: a missing or unreadable one becomes an error row, not a failed job;
- a glob pattern (`**` recursive), when no file of that exact name exists: each match as if given by itself;
- any other file: scored as an image whatever its name.

The order is deterministic, so a resumed job sees the same list (job.json checks it).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from pathlib import Path

from .errors import ScoreError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TEXT_LISTS = frozenset({".txt", ".lst"})
CSV_LISTS = frozenset({".csv"})
PARQUET_LISTS = frozenset({".parquet", ".pq"})
GLOB_CHARS = frozenset("*?[")


def collect_inputs(items: list[str]) -> list[str]:
    paths: list[str] = []
    for item in items:
        if os.path.lexists(item):
            paths.extend(_expand(item))
        elif GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ScoreError(f"input pattern {item!r} matches no files")
            for match in matches:
                paths.extend(_expand(match))
        else:
            raise ScoreError(f"input {item!r}: no such file or directory")
    if not paths:
        raise ScoreError(f"no images found in {' '.join(items)} (directories are searched for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
    return paths


def inputs_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _expand(path: str) -> list[str]:
    if os.path.isdir(path):
        return _walk(path)
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_LISTS | CSV_LISTS | PARQUET_LISTS:
        base = os.path.dirname(path)
        return [p if os.path.isabs(p) else os.path.join(base, p) for p in _read_list(path, suffix)]
    return [path]


def _walk(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, f) for f in sorted(files)
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return found


def _read_list(path: str, suffix: str) -> list[str]:
    try:
        if suffix in TEXT_LISTS:
            with open(path, encoding="utf-8") as f:
                lines = (line.strip() for line in f)
                return [line for line in lines if line and not line.startswith("#")]
        if suffix in CSV_LISTS:
            rows = _csv_rows(path, required=("path",))
            return [row["path"] for row in rows if row["path"]]
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise ScoreError(f"list {path}: a Parquet list needs a 'path' column; it has {table.column_names}")
        return [p for p in table.column("path").to_pylist() if p]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ScoreError(f"cannot read the list {path}: {err}") from None


def _csv_rows(path: str, required: tuple[str, ...]) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ScoreError(f"{path}: needs a header row with the column(s) {', '.join(required)}; "
                             f"its header is {reader.fieldnames}")
        return list(reader)


def path_key(path: str) -> str:
    """How a path in the labels file is matched to an input: absolute and normalised."""
    return os.path.normpath(os.path.abspath(path))


def read_labels(path: str, class_names: list[str]) -> dict[str, int]:
    """--labels: a CSV file with a header row and columns `path,label`; `label` is a class name of the model (as in
    its manifest) or a class id. Relative paths are relative to the CSV's folder. -> {path_key: class id}."""
    ids = {name: i for i, name in enumerate(class_names)}
    base = os.path.dirname(path)
    labels: dict[str, int] = {}
    try:
        rows = _csv_rows(path, required=("path", "label"))
    except (OSError, UnicodeDecodeError) as err:
        raise ScoreError(f"cannot read the labels file {path}: {err}") from None
    for line, row in enumerate(rows, start=2):
        value = (row["label"] or "").strip()
        if value in ids:
            class_id = ids[value]
        elif value.isdigit() and int(value) < len(class_names):
            class_id = int(value)
        else:
            raise ScoreError(f"{path}, line {line}: label {value!r} is neither a class name of the model "
                             f"({', '.join(class_names)}) nor a class id 0..{len(class_names) - 1}")
        p = row["path"]
        labels[path_key(p if os.path.isabs(p) else os.path.join(base, p))] = class_id
    return labels
