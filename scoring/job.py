"""One scoring job: INPUTS -> engine -> shards -> OUT, with a progress bar and a summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reskd.manifest import ModelRepository, parse_model_ref, sha256_file

from .audit import AuditPlan, AuditTally, audit_plan
from .errors import ScoreError
from .inputs import collect_inputs, inputs_digest, path_key, read_labels
from .output import ShardStore, output_format, output_schema, rows_table

DEFAULT_SHARD_SIZE = 10_000


@dataclass
class ScoreOptions:
    repo: str
    model: str  # NAME or NAME:VERSION
    inputs: list[str]
    out: str
    engine: str = "local"  # local | ray
    resume: bool = False
    labels: str | None = None
    batch_size: int = 512
    shard_size: int = DEFAULT_SHARD_SIZE
    device: str = "auto"  # local engine: auto | cpu | cuda
    workers: int | None = None  # local engine: decode processes (0: decode in this process)
    threads: int | None = None  # local engine: onnxruntime intra-op threads
    actors: int = 1  # ray engine: actor pool size
    gpus_per_actor: float = 0.0  # ray engine
    progress: bool = True
    # Check every answer given before the last stage against the version's audit model and write the OOD score
    # (scoring/audit.py); audit_model (NAME[:VERSION]) names that model, for a version whose manifest names none.
    audit: bool = False
    audit_model: str | None = None


@dataclass
class Summary:
    model: str
    out: str
    stage_names: list[str]
    teacher_flops: int
    labels: dict[str, int] | None = field(default=None, repr=False)  # --labels: path_key -> true class id
    images: int = 0
    failures: int = 0
    exits: list[int] = field(default_factory=list)
    total_flops: int = 0  # over the images that were scored
    labelled: int = 0
    correct: int = 0
    scored_now: int = 0  # rows scored by this run; a resumed run found the others in committed shards
    seconds: float = 0.0
    audit: AuditTally | None = None  # --audit

    def add(self, table: pa.Table) -> None:
        """Tally a block of output rows."""
        ok = table.filter(pc.is_null(table.column("error")))
        self.images += len(table)
        self.failures += len(table) - len(ok)
        counts = np.bincount(ok.column("exit_stage").to_numpy(), minlength=len(self.stage_names))
        self.exits = (np.asarray(self.exits or [0] * len(self.stage_names)) + counts).tolist()
        self.total_flops += int(pc.sum(ok.column("flops")).as_py() or 0)
        if self.labels is not None:
            for p, class_id in zip(ok.column("path").to_pylist(), ok.column("class_id").to_pylist()):
                truth = self.labels.get(path_key(p))
                if truth is not None:
                    self.labelled += 1
                    self.correct += int(truth == class_id)
        if self.audit is not None:
            self.audit.add(ok)

    @property
    def mean_flops(self) -> float:
        ok = self.images - self.failures
        return self.total_flops / ok if ok else 0.0

    @property
    def pct_teacher_flops(self) -> float:
        return 100.0 * self.mean_flops / self.teacher_flops

    @property
    def accuracy(self) -> float | None:
        return 100.0 * self.correct / self.labelled if self.labelled else None

    def lines(self) -> list[str]:
        rate = self.scored_now / self.seconds if self.seconds > 0 else 0.0
        earlier = self.images - self.scored_now
        resumed = f"; {earlier} rows from the interrupted run" if earlier else ""
        out = [f"{self.model}: {self.images} images -> {self.out} ({self.failures} failed{resumed}); "
               f"{self.scored_now} scored in {self.seconds:.1f} s, {rate:.0f} images/s"]
        ok = self.images - self.failures
        if ok:
            out.append(f"mean compute {self.mean_flops / 1e6:.3f} MFLOPs per image = {self.pct_teacher_flops:.2f}% "
                       f"of the teacher's {self.teacher_flops / 1e6:.3f} (saved {100 - self.pct_teacher_flops:.2f}%)")
            out.append("exits per stage: " + ", ".join(f"{name} {n} ({100 * n / ok:.1f}%)"
                                                        for name, n in zip(self.stage_names, self.exits)))
        if self.labels is not None:
            acc = f"{self.accuracy:.2f}%" if self.labelled else "n/a"
            out.append(f"accuracy {acc} on {self.labelled} labelled images "
                       f"({ok - self.labelled} scored images had no label)")
        if self.audit is not None:
            out.extend(self.audit.lines())
        return out


def score(options: ScoreOptions) -> Summary:
    """Run a job; raises ScoreError when it cannot run as asked."""
    start = time.perf_counter()
    if options.engine not in ("local", "ray"):
        raise ScoreError(f"--engine must be local or ray, got {options.engine!r}")
    if options.batch_size < 1 or options.shard_size < 1:
        raise ScoreError("--batch-size and --shard-size must be >= 1")
    fmt = output_format(options.out)
    name, version = parse_model_ref(options.model)
    repo = ModelRepository(options.repo)
    version_dir, manifest = repo.load(name, version)
    audit = audit_plan(repo, manifest, options.audit_model) if options.audit or options.audit_model else None
    paths = collect_inputs(options.inputs)
    labels = read_labels(options.labels, manifest.labels) if options.labels else None
    out = Path(options.out)
    if out.is_dir():
        raise ScoreError(f"--out {out} is a directory; name a file (.jsonl, .csv or .parquet)")
    out.parent.mkdir(parents=True, exist_ok=True)

    job = {"model": f"{manifest.name}:{manifest.version}",
           "manifest_sha256": sha256_file(version_dir / "manifest.json"),
           "inputs_sha256": inputs_digest(paths),
           "audit": audit.job_record() if audit else None}  # no key in a job.json from before --audit: None
    store = ShardStore(out, job, len(paths), options.shard_size, options.resume, output_schema(audit is not None))
    todo = store.pending_indices()
    teacher_flops = manifest.teacher.flops
    if len(todo):
        engine = _engine(options, version_dir, audit)
        _run(engine, store, paths, todo, manifest.labels, teacher_flops, options.progress, audit)
    summary = Summary(model=job["model"], out=str(out), stage_names=[s.name for s in manifest.stages],
                      teacher_flops=teacher_flops, labels=labels, scored_now=len(todo),
                      audit=AuditTally(audit) if audit else None)
    store.finish(fmt, each=summary.add)
    summary.seconds = time.perf_counter() - start
    return summary


def _engine(options: ScoreOptions, version_dir: Path, audit: AuditPlan | None):
    if options.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(version_dir, batch_size=options.batch_size, actors=options.actors,
                         gpus_per_actor=options.gpus_per_actor, audit=audit)
    from .local import LocalEngine

    try:
        return LocalEngine(version_dir, batch_size=options.batch_size, workers=options.workers,
                           threads=options.threads, device=options.device, audit=audit)
    except RuntimeError as err:  # e.g. --device cuda without a CUDA onnxruntime
        raise ScoreError(str(err)) from None


def _run(engine, store: ShardStore, paths: list[str], todo: np.ndarray, class_names: list[str],
         teacher_flops: int, progress: bool, audit: AuditPlan | None = None) -> None:
    from tqdm import tqdm

    bar = tqdm(total=store.num_inputs, initial=store.num_inputs - len(todo), unit="img", desc="scoring",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    flops = scored = 0
    with bar:
        for result in engine.score(paths, todo):
            store.add(rows_table(result, paths, class_names, teacher_flops, audit))
            ok = result["class_id"] >= 0
            flops += int(result["flops"][ok].sum())
            scored += int(ok.sum())
            if scored:
                bar.set_postfix_str(f"compute saved {100 - 100 * flops / (scored * teacher_flops):.1f}% vs teacher",
                                    refresh=False)
            bar.update(len(result["index"]))
    if not store.complete:
        raise RuntimeError(f"the {type(engine).__name__} returned {len(store.done)} of {store.num_shards} shards")
