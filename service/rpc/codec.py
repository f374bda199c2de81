"""gRPC messages <-> the serving layer's terms: a ModelInferRequest's tensors (raw_input_contents as stock clients
send them, or typed contents) and parameters, a ModelInferResponse (raw_output_contents, as Triton answers), and
the metadata, configuration, statistics and repository messages from the dicts HTTP answers with."""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format

from ..serving.errors import bad_request
from ..serving.pipeline import EXIT_PARAMETERS, Answer, InputTensor, Wanted, wanted_outputs
from ..serving.wire import DTYPES, check_shape, clip, count, from_raw, to_raw
from .protocol import grpc_service_pb2 as pb
from .protocol import model_config_pb2 as config_pb

# Typed contents (InferTensorContents) by datatype: the field and the numpy type its values become.
CONTENTS = {"FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"), "INT64": ("int64_contents", "<i8"),
            "INT32": ("int_contents", "<i4"), "UINT8": ("uint_contents", "u1"), "BYTES": ("bytes_contents", None)}


def parameter(p: pb.InferParameter) -> Any:
    """An InferParameter's value (bool, int, float or str); None when none of its fields is set."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _as(key: str, value: Any, kind: type) -> Any:
    """A parameter as the type the serving layer checks for. Stock clients send numbers as int64, double or string
    parameters and booleans as bool or string ones: each is taken when it means a value of the type (a string
    "0.9" threshold, an integral double max_stage, "true"); anything else is left for the serving layer to refuse
    with its message."""
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                return {"true": True, "false": False}.get(text.lower(), value)
            if kind is int:
                return int(text)
            return float(text) if kind is float else value
        except ValueError:
            return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def infer_parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    params = {key: parameter(p) for key, p in request.parameters.items()}
    return {key: _as(key, value, EXIT_PARAMETERS[key]) if key in EXIT_PARAMETERS else value
            for key, value in params.items()}


def requested_outputs(request: pb.ModelInferRequest) -> list[Wanted]:
    requested = []
    for o in request.outputs:
        k = parameter(o.parameters["classification"]) if "classification" in o.parameters else None
        requested.append((o.name, _as("classification", k, int) if k is not None else None))
    return wanted_outputs(requested)


def input_tensors(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The request's inputs: from raw_input_contents (one entry per input, in order) or each input's typed contents.
    Shapes are checked as HTTP's are (service/serving/wire.py); a count or size that does not match is a 400."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one per "
                          f"input, in the order of `inputs`, or none (typed contents)")
    tensors = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        check_shape(t.name, shape, t.datatype)
        if raw:
            value = from_raw(t.name, t.datatype, shape, raw[i], what=f"raw_input_contents[{i}] holds")
        else:
            value = _from_contents(t, shape)
        tensors.append(InputTensor(t.name, t.datatype, shape, value))
    return tensors


def _from_contents(t: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> np.ndarray | list[bytes]:
    if t.datatype not in CONTENTS:
        raise bad_request(f"input {clip(t.name)!r}: datatype {clip(t.datatype)!r} is not one of {sorted(DTYPES)} or "
                          f"BYTES")
    field, dtype = CONTENTS[t.datatype]
    if not t.HasField("contents"):
        raise bad_request(f"input {clip(t.name)!r} has no data: send raw_input_contents or its contents.{field}")
    values = getattr(t.contents, field)
    if len(values) != count(shape):
        raise bad_request(f"input {clip(t.name)!r}: shape {shape} needs {count(shape)} values, contents.{field} has "
                          f"{len(values)}")
    if dtype is None:
        return list(values)
    try:
        return np.asarray(values, dtype=np.float64 if dtype.startswith("<f") else np.int64).astype(dtype).reshape(shape)
    except OverflowError:
        raise bad_request(f"input {clip(t.name)!r}: a value of contents.{field} is out of range for {t.datatype}") from None


def _set(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def infer_response(name: str, version: int, request_id: str, answer: Answer) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request_id)
    for key, value in answer.parameters.items():
        _set(response.parameters[key], value)
    for out_name, datatype, value in answer.outputs:
        shape, raw = to_raw(datatype, value)
        response.outputs.add(name=out_name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


def model_metadata(meta: dict) -> pb.ModelMetadataResponse:
    """KServe v2's part of the HTTP metadata (the message has no room for reskd's additions: they are in the
    configuration's parameters and the HTTP metadata)."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
        outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])


def model_config(config: dict) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, config_pb.ModelConfig()))


def model_statistics(stats: dict) -> pb.ModelStatisticsResponse:
    """Triton's statistics; reskd's `stage_stats` (not in the message) are left out, HTTP has them."""
    return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)


def repository_index(rows: list[dict]) -> pb.RepositoryIndexResponse:
    entry = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(models=[entry(name=r["name"], version=r["version"], state=r["state"],
                                                    reason=r["reason"]) for r in rows])
