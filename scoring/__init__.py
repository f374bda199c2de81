"""Batch scoring (`reskd score`): every input image through the cascade runtime, one output row per input with the
same per-sample compute accounting as the server.

- inputs.py   INPUTS arguments -> the ordered list of image paths; the --labels file
- batch.py    the per-batch work both engines share: read + decode (a bad file becomes an error, never an
              exception), then normalise + run the cascade
- local.py    the local engine: decode worker processes feeding the runtime at large batch sizes
- ray_engine.py  the Ray Data engine: the same two steps as map_batches tasks and an actor pool
- audit.py    --audit: the audit model's answer for the answers given before the last stage, the OOD score, and
              the summary's audit and drift lines against the manifest's validation figures
- output.py   output schema, shards committed atomically (resume), final JSONL / CSV / Parquet file
- job.py      the job: inputs -> engine -> shards -> output, progress bar and summary
"""

from .errors import ScoreError
from .job import ScoreOptions, Summary, score

__all__ = ["ScoreError", "ScoreOptions", "Summary", "score"]
