"""What a server and its models say about themselves, for every front end: KServe v2's server and model metadata and
Triton's model configuration (its JSON form, which is the protobuf's JSON mapping: the gRPC front end reads the same
dict into ModelConfig)."""

from __future__ import annotations

import reskd

from ..settings import ServeSettings
from .models import ServedModel
from .tensors import INPUTS, OUTPUTS

# The protocol extensions the server implements (both protocols; binary tensor data is gRPC's raw contents there).
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics",
              "reskd_early_exit"]


def server_metadata() -> dict:
    return {"name": "reskd", "version": reskd.__version__, "extensions": EXTENSIONS}


def model_metadata(model: ServedModel, versions: list[int]) -> dict:
    """KServe v2's model metadata, and reskd's additions (HTTP only: gRPC's message has no room for them)."""
    m = model.manifest
    cum = model.runtime.cum_flops.tolist()
    return {
        "name": model.name, "versions": [str(v) for v in versions], "platform": "reskd_cascade",
        "inputs": [t.metadata(model) for t in INPUTS.values()],
        "outputs": [t.metadata(model) for t in OUTPUTS.values()],
        # reskd's additions: what a client needs to reason about early exit and compute.
        "version": str(model.version),
        "labels": m.labels,
        "input": m.input.model_dump(),
        "stages": [{"stage": i, "name": s.name, "flops": s.flops, "cumulative_flops": cum[i],
                    "threshold": m.exit.thresholds[i] if i < len(m.exit.thresholds) else None,
                    # what the stage reads (the images, or an earlier stage's output the server carries for the
                    # samples that reach it) and the outputs it gives besides logits
                    "inputs": [{"name": x.name, "source": x.source} for x in s.inputs],
                    "outputs": [{"name": "logits", "shape": [len(m.labels)]},
                                *({"name": o.name, "shape": o.shape} for o in s.outputs)],
                    # how its logits make the running logits: added ("sum") or in their place ("replace")
                    "combine": kind}
                   for i, (s, kind) in enumerate(zip(m.stages, m.stage_combine))],
        "combine": m.combine,
        "exit_measure": m.exit.measure,
        "teacher_flops": m.teacher.flops,
        "teacher_model": m.teacher.model,
        "metrics": m.metrics.model_dump() if m.metrics else {},
        "operating_points": m.operating_points.model_dump() if m.operating_points else None,
    }


def model_config(model: ServedModel, s: ServeSettings) -> dict:
    """Triton's model configuration (JSON form), describing what this server really does."""
    return {
        "name": model.name, "platform": "reskd_cascade", "backend": "onnxruntime",
        "version_policy": {"all": {}},
        "max_batch_size": s.max_images,
        "input": [t.config(model) for t in INPUTS.values()],
        "output": [t.config(model) for t in OUTPUTS.values()],
        "dynamic_batching": {"max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
                             "preferred_batch_size": [s.max_batch_size],
                             "default_queue_policy": {"max_queue_size": s.max_queue_images}},
        "instance_group": [{"kind": "KIND_GPU" if model.device == "cuda" else "KIND_CPU", "count": 1}],
        "parameters": {"stages": {"string_value": str(model.runtime.num_stages)},
                       "scheduler": {"string_value": model.scheduler.policy},
                       "combine": {"string_value": model.manifest.combine},
                       "stage_combine": {"string_value": ",".join(model.manifest.stage_combine)},
                       "exit_measure": {"string_value": model.manifest.exit.measure},
                       **_points_parameters(model.manifest)},
    }


def _points_parameters(manifest) -> dict:
    """The operating points as Triton config parameters (string values): the default point's id and the whole
    curve as JSON. None for a version without them."""
    points = manifest.operating_points
    if points is None:
        return {}
    return {"default_operating_point": {"string_value": points.default},
            "operating_points": {"string_value": points.model_dump_json()}}
