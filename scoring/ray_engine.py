"""The Ray Data engine: the same two steps as the local engine, distributed by Ray Data.

    from_items([{index, path}])  ->  map_batches(decode, tasks)  ->  map_batches(CascadeActor, actor pool)

The path list is read by the driver (INPUTS may be list files, directories, globs) and handed to Ray Data as
items; workers read the files themselves, so on a cluster the inputs must be on storage every node mounts at the
same path. Reading inside the decode step, rather than with read_binary_files, is what lets an unreadable file
become an error row instead of failing the whole dataset. Ray fuses the decode step into the actors when their
resources match (CPU actors): each actor then decodes and classifies its batches, and --actors scales both; GPU
actors reserve a GPU, so decoding stays in CPU tasks feeding them. The model travels with the actors (its files are
passed to their constructor), so workers need reskd installed but no copy of the model repository; with --audit
an audit version's files travel with them too.

Ray is used as found: `ray.init()` joins the cluster named by RAY_ADDRESS, or starts a local instance; a Ray
instance already initialised by the caller is used as it is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from reskd.manifest import MANIFEST, InputSpec, load_manifest

from .audit import AuditPlan, AuditRunner, version_files
from .batch import classify, decode_files
from .errors import ScoreError


def decode_batch(batch: dict[str, np.ndarray], spec: InputSpec) -> dict[str, np.ndarray]:
    pixels, errors = decode_files([str(p) for p in batch["path"]], spec)
    return {"index": batch["index"], "pixels": pixels, "error": np.asarray(errors, dtype=object)}


def _write(files: dict[str, bytes]) -> tempfile.TemporaryDirectory:
    folder = tempfile.TemporaryDirectory(prefix="reskd-model-")
    for name, data in files.items():
        (Path(folder.name) / name).write_bytes(data)
    return folder


class CascadeActor:
    """Holds one cascade runtime; `files` are the model version's files (name -> bytes). --audit: `audit`, and the
    audit version's files when it is another version."""

    def __init__(self, files: dict[str, bytes], device: str, threads: int, audit: AuditPlan | None = None,
                 audit_files: dict[str, bytes] | None = None):
        from reskd.runtime import CascadeRuntime

        from .local import scoring_device

        self._dir = _write(files)
        # One onnxruntime thread per CPU the actor reserved: actors on one node do not oversubscribe its cores.
        resolved = scoring_device(device, threads)
        self.runtime = CascadeRuntime(self._dir.name, device=resolved, check_folder_name=False)
        self.audit = None
        if audit is not None:
            self._audit_dir = _write(audit_files) if audit_files else None
            self.audit = AuditRunner(audit, self.runtime, resolved,
                                     model_dir=self._audit_dir.name if self._audit_dir else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return classify(self.runtime, batch["index"], batch["pixels"], batch["error"], self.audit)


class RayEngine:
    def __init__(self, version_dir: Path, *, batch_size: int = 512, actors: int = 1, gpus_per_actor: float = 0.0,
                 audit: AuditPlan | None = None):
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise ScoreError("--engine ray needs Ray Data: pip install 'reskd[ray]'") from None
        if actors < 1 or gpus_per_actor < 0:
            raise ScoreError("--actors must be >= 1 and --gpus-per-actor >= 0")
        manifest = load_manifest(version_dir)
        self.spec = manifest.input
        self.files = {name: (Path(version_dir) / name).read_bytes()
                      for name in [MANIFEST] + [s.file for s in manifest.stages]}
        self.audit = audit
        self.audit_files = None
        if audit is not None and audit.model_dir is not None:
            self.audit_files = {name: (Path(audit.model_dir) / name).read_bytes()
                                for name in version_files(audit.model_dir)}
        self.batch_size = batch_size
        self.actors = actors
        self.gpus_per_actor = gpus_per_actor

    def score(self, paths: list[str], indices: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Yield result batches (batch.classify's columns) covering `indices`, in any order."""
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(logging_level="WARNING", log_to_driver=False, include_dashboard=False)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the job has its own
            items = [{"index": int(i), "path": paths[i]} for i in indices]
            blocks = max(1, min(len(items) // self.batch_size, 4096))
            ds = ray.data.from_items(items, override_num_blocks=blocks)
            ds = ds.map_batches(decode_batch, fn_kwargs={"spec": self.spec}, batch_size=self.batch_size,
                                batch_format="numpy")
            ds = ds.map_batches(CascadeActor, batch_size=self.batch_size, batch_format="numpy",
                                fn_constructor_kwargs={"files": self.files,
                                                       "device": "cuda" if self.gpus_per_actor > 0 else "cpu",
                                                       "threads": 1, "audit": self.audit,
                                                       "audit_files": self.audit_files},
                                compute=ray.data.ActorPoolStrategy(size=self.actors),
                                num_gpus=self.gpus_per_actor or None)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield batch
        finally:
            if started_here:
                ray.shutdown()
