"""Output rows, shards and the final file.

A job scores into OUT.parts/ next to OUT: job.json (what is being scored) and one Parquet shard per block of
`shard_size` consecutive inputs (shard k holds inputs k*shard_size ...). A shard is written to a temporary name,
flushed to disk, then renamed: it is there whole or not at all. When every shard is there, they are concatenated
in input order into a temporary file beside OUT, which is renamed to OUT, and OUT.parts/ is removed. So OUT is
never partial, and `--resume` rescores only the shards that are missing: no row lost, none duplicated.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from reskd.files import replacing, write_atomic

from .errors import ScoreError

if TYPE_CHECKING:
    from .audit import AuditPlan

# The output schema (docs/scoring.md). Nulls where `error` is set; `error` is null where the image was scored.
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("class_id", pa.int64()),
    ("confidence", pa.float64()),
    ("exit_stage", pa.int32()),
    ("flops", pa.int64()),
    ("flops_saved_vs_teacher", pa.int64()),
    ("error", pa.string()),
])
# --audit appends these (docs/scoring.md): the audit model's answer where the answer came before the last stage
# (null elsewhere), and the stage-0 energy score with the OOD flag (null where the manifest has no drift.p99).
AUDIT_FIELDS = [
    ("audit_label", pa.string()),
    ("audit_class_id", pa.int64()),
    ("audit_agrees", pa.bool_()),
    ("ood_score", pa.float64()),
    ("ood", pa.bool_()),
]
AUDIT_SCHEMA = pa.schema([*SCHEMA, *(pa.field(name, kind) for name, kind in AUDIT_FIELDS)])
SHARD_SCHEMA = SCHEMA.append(pa.field("index", pa.int64()))
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
JOB_FILE = "job.json"


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ScoreError(f"--out {path}: the format comes from the extension; use one of "
                         f"{', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


def output_schema(audit: bool) -> pa.Schema:
    return AUDIT_SCHEMA if audit else SCHEMA


def shard_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("index", pa.int64()))


def rows_table(result: dict[str, np.ndarray], paths: list[str], class_names: list[str],
               teacher_flops: int, audit: AuditPlan | None = None) -> pa.Table:
    """An engine's result batch -> output rows (plus `index`); with `audit`, AUDIT_SCHEMA's columns."""
    index = result["index"]
    errors = np.asarray(result["error"], dtype=object)
    failed = errors.astype(bool)
    class_id = result["class_id"]
    names = np.asarray(class_names, dtype=object)[np.where(failed, 0, class_id)]
    columns = {
        "path": pa.array([paths[i] for i in index], pa.string()),
        "label": pa.array(names, pa.string(), mask=failed),
        "class_id": pa.array(class_id, pa.int64(), mask=failed),
        "confidence": pa.array(result["confidence"], pa.float64(), mask=failed),
        "exit_stage": pa.array(result["exit_stage"], pa.int32(), mask=failed),
        "flops": pa.array(result["flops"], pa.int64(), mask=failed),
        "flops_saved_vs_teacher": pa.array(teacher_flops - result["flops"], pa.int64(), mask=failed),
        "error": pa.array(errors, pa.string(), mask=~failed),
    }
    if audit is not None:
        reference = result["audit_class_id"]
        unaudited = reference < 0
        score0 = result["score0"]
        columns.update({
            "audit_label": pa.array(np.asarray(class_names, dtype=object)[np.maximum(reference, 0)], pa.string(),
                                    mask=unaudited),
            "audit_class_id": pa.array(reference, pa.int64(), mask=unaudited),
            "audit_agrees": pa.array(reference == class_id, pa.bool_(), mask=unaudited),
            "ood_score": pa.array(score0, pa.float64(), mask=failed),
            "ood": pa.array(score0 > (audit.p99 if audit.p99 is not None else np.inf), pa.bool_(),
                            mask=failed | (audit.p99 is None)),
        })
    columns["index"] = pa.array(index, pa.int64())
    return pa.table(columns, schema=shard_schema(output_schema(audit is not None)))


class ShardStore:
    """OUT.parts/: job.json and the committed shards of one job."""

    def __init__(self, out: Path, job: dict, num_inputs: int, shard_size: int, resume: bool,
                 schema: pa.Schema = SCHEMA):
        # absolute: pyarrow reads a relative name with a colon ("o-fashion-mnist:2.parquet") as a URI scheme
        self.out = Path(out).absolute()
        self.schema = schema
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.num_inputs = num_inputs
        job = {**job, "inputs": num_inputs, "shard_size": shard_size}
        previous = self._previous_job()
        if previous is not None and not resume:
            done = len(self._committed(previous))
            if done:  # refuse to throw finished work away unasked
                raise ScoreError(f"{self.dir} holds an unfinished job ({done} shard(s) done): pass --resume to "
                                 f"continue it, or delete that folder to start over")
            shutil.rmtree(self.dir)
            previous = None
        if previous is not None:
            changed = [k for k in job if k != "shard_size" and previous.get(k) != job[k]]
            if changed:
                raise ScoreError(f"--resume: the unfinished job in {self.dir} scored different "
                                 f"{', '.join(changed)}; rerun it with the same model, INPUTS and --audit, or "
                                 f"delete that folder to start over")
            job["shard_size"] = previous["shard_size"]  # shards already committed fix it
        self.shard_size = job["shard_size"]
        self.num_shards = -(-num_inputs // self.shard_size)
        self.resumed = previous is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):
            stale.unlink()
        if previous is None:
            write_atomic(self.dir / JOB_FILE, json.dumps(job, indent=1) + "\n")
        self.done = self._committed(job)
        self._buffers: dict[int, list[pa.Table]] = {}
        self._counts: dict[int, int] = {}

    def _previous_job(self) -> dict | None:
        path = self.dir / JOB_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ScoreError(f"{path} is unreadable ({err}); delete {self.dir} to start over") from None

    def shard_path(self, k: int) -> Path:
        return self.dir / f"shard-{k:08d}.parquet"

    def shard_rows(self, k: int) -> int:
        return min(self.shard_size, self.num_inputs - k * self.shard_size)

    def _committed(self, job: dict) -> set[int]:
        size = job["shard_size"]
        done = set()
        for path in self.dir.glob("shard-*.parquet") if self.dir.is_dir() else []:
            k = int(path.stem.split("-")[1])
            expected = min(size, job["inputs"] - k * size)
            if pq.read_metadata(path).num_rows == expected:
                done.add(k)
        return done

    def pending_indices(self) -> np.ndarray:
        return np.concatenate([np.arange(k * self.shard_size, k * self.shard_size + self.shard_rows(k))
                               for k in range(self.num_shards) if k not in self.done] or [np.zeros(0, np.int64)])

    def add(self, rows: pa.Table) -> None:
        """Buffer rows (any order, any batch size); commit each shard as soon as all its rows are in."""
        shard = rows.column("index").to_numpy() // self.shard_size
        for k in np.unique(shard):
            k = int(k)
            part = rows.filter(pa.array(shard == k))
            self._buffers.setdefault(k, []).append(part)
            self._counts[k] = self._counts.get(k, 0) + len(part)
            if self._counts[k] == self.shard_rows(k):
                table = pa.concat_tables(self._buffers.pop(k)).sort_by("index")
                del self._counts[k]
                with replacing(self.shard_path(k)) as tmp:
                    pq.write_table(table, tmp)
                self.done.add(k)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.num_shards

    def tables(self) -> Iterator[pa.Table]:
        """Every committed row, in input order, checked to be one row per input."""
        for k in range(self.num_shards):
            table = pq.read_table(self.shard_path(k), schema=shard_schema(self.schema))
            start = k * self.shard_size
            if not np.array_equal(table.column("index").to_numpy(), np.arange(start, start + self.shard_rows(k))):
                raise ScoreError(f"{self.shard_path(k)} does not hold inputs {start}.. in order; delete "
                                 f"{self.dir} to start over")
            yield table.drop_columns(["index"])

    def finish(self, fmt: str, each: Callable[[pa.Table], None] = lambda table: None) -> None:
        """Write OUT from the shards (atomically), then remove OUT.parts/. each(table) sees every block of rows."""
        def tables() -> Iterator[pa.Table]:
            for table in self.tables():
                each(table)
                yield table

        with replacing(self.out) as tmp:
            write_table_stream(tables(), tmp, fmt, self.schema)
        shutil.rmtree(self.dir)


def write_table_stream(tables: Iterator[pa.Table], path: Path, fmt: str, schema: pa.Schema = SCHEMA) -> None:
    if fmt == "parquet":
        with pq.ParquetWriter(path, schema) as writer:
            for table in tables:
                writer.write_table(table)
    elif fmt == "csv":
        with pacsv.CSVWriter(path, schema) as writer:
            for table in tables:
                writer.write_table(table)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for table in tables:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist())


def read_output(path: str | Path) -> pa.Table:
    """A `reskd score` output file (any of the three formats) -> a table with SCHEMA, or AUDIT_SCHEMA when it was
    written with --audit."""
    path = Path(path).absolute()  # a relative name with a colon would be read as a URI
    fmt = output_format(path)
    schema = output_schema(_names(path, fmt)[len(SCHEMA):len(AUDIT_SCHEMA)] == AUDIT_SCHEMA.names[len(SCHEMA):])
    if fmt == "parquet":
        return pq.read_table(path, schema=schema)
    if fmt == "csv":
        options = pacsv.ConvertOptions(column_types=schema, strings_can_be_null=True)
        return pacsv.read_csv(path, convert_options=options).select(schema.names)
    if Path(path).stat().st_size == 0:
        return schema.empty_table()
    table = pajson.read_json(path, parse_options=pajson.ParseOptions(explicit_schema=schema))
    return table.select(schema.names)


def _names(path: str | Path, fmt: str) -> list[str]:
    """The column names of an output file (its first row's, for JSONL; none for an empty one)."""
    if fmt == "parquet":
        return pq.read_schema(path).names
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if fmt == "csv":
        return next(csv.reader([first]), [])
    return list(json.loads(first)) if first.strip() else []
