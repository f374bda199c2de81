"""The KServe v2 inference protocol with Triton's binary tensor data extension: parsing a request body into
tensors and encoding outputs, JSON or binary. Nothing here knows about models; v2.py does the serving."""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import zlib
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reskd.validation import describe

from ..serving.errors import bad_request, too_large, unsupported
from ..serving.pipeline import InputTensor
from ..serving.wire import (DTYPES, INT64_MAX, MAX_DIMS, byte_elements, check_shape, clip, count, from_raw, numpy_dtype,
                            to_raw)

HEADER_LENGTH = "inference-header-content-length"


# What the schemas below document beyond their types is checked by parse_request, with its own messages.
class TensorIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
                                                "maxItems": MAX_DIMS})
    datatype: str = Field(json_schema_extra={"enum": [*DTYPES, "BYTES"]})
    parameters: dict[str, Any] = Field({}, json_schema_extra={"properties": {"binary_data_size": {
        "type": "integer", "minimum": 0,
        "description": "bytes of this tensor in the binary data after the JSON header (instead of 'data')"}}})
    data: Any = Field(None, description="the elements in row-major order, flat or nested along the shape; "
                                        "BYTES elements as base64 strings")


class OutputRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] = Field({}, json_schema_extra={"properties": {"binary_data": {
        "type": "boolean", "description": "send this output as binary data (default: binary_data_output)"}}})


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] = Field({}, json_schema_extra={"properties": {"binary_data_output": {
        "type": "boolean", "description": "send every output as binary data unless it says otherwise"}}})
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[OutputRequest] | None = None


class TensorOut(BaseModel):
    """An output as encode_response writes it (for the API documentation)."""
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field({}, json_schema_extra={"properties": {"binary_data_size": {
        "type": "integer", "description": "bytes of this output in the binary data after the JSON header"}}})
    data: list[int | float] | list[str] | None = Field(None, description="the elements, flat in row-major order "
                                                       "(strings for BYTES; absent when the output is sent as binary "
                                                       "data)")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    parameters: dict[str, Any] = Field({}, json_schema_extra={"properties": {
        "operating_point": {"type": "string", "description": "the operating point the request ran at (custom: its "
                                                              "own threshold or max_stage)"},
        "operating_point_accuracy": {"type": "number", "description": "that point's validation accuracy, where "
                                                                       "the manifest has it"}}})
    outputs: list[TensorOut]


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Content-Encoding gzip or deflate (tritonclient's request_compression_algorithm), bounded by limit; the name
    is case-insensitive. gzip decodes every member as gzip.decompress does (zero padding between members
    included); anything else after the compressed data is refused."""
    coding = (encoding or "").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding == "x-gzip":  # the old name, which HTTP/1.1 says to treat as gzip
        coding = "gzip"
    if coding not in ("gzip", "deflate"):
        raise unsupported(f"Content-Encoding {clip(encoding)!r} is not supported (gzip, deflate or none)")
    view, pos, out, members = memoryview(body), 0, bytearray(), 0
    while pos < len(body):
        # One member (deflate: the one stream). Its input goes in slices that start small and double: the
        # decompressor copies what lies past a member's end, so a body of many tiny members costs linear time.
        d = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)
        start, step = pos, 256
        while not d.eof:
            if pos == len(body):
                raise bad_request(f"the {coding} data is truncated: the body ends before the compressed stream "
                                  f"does")
            piece = view[pos:pos + step]
            try:
                out += d.decompress(piece, limit + 1 - len(out))
            except zlib.error as err:
                where = (f"body is not valid {coding} data" if not members else
                         f"{len(body) - start} bytes after gzip member {members} are not a valid gzip member")
                raise bad_request(f"{where}: {err}") from None
            if len(out) > limit:
                raise too_large(f"decompressed body is over the limit of {limit:,} bytes")
            pos += len(piece) - len(d.unused_data)  # all of it was read: the output limit was not reached
            step = min(step * 2, 1 << 20)
        members += 1
        if coding == "deflate" and pos < len(body):
            raise bad_request(f"{len(body) - pos} bytes after the end of the deflate data; send one zlib stream")
        data = _NOT_ZERO.search(body, pos)
        pos = len(body) if data is None else data.start()
    return bytes(out)


_NOT_ZERO = re.compile(rb"[^\0]")


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[InputTensor]]:
    if header_length is not None:
        # ASCII digits only (str.isdigit also takes '²'), and few enough for int() and any real body.
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 19
                and int(header_length) <= len(body)):
            raise bad_request(f"Inference-Header-Content-Length {clip(header_length)!r} must be a byte count within "
                              f"the body ({len(body)} bytes)")
        split = int(header_length)
    else:
        split = len(body)
    try:
        raw = json.loads(body[:split])
    except RecursionError:
        raise bad_request("inference request header is nested too deeply to parse (JSON arrays and objects nest "
                          "a few hundred levels at most)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"inference request header is not valid JSON: {err}") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits())
        raise bad_request("inference request header holds a number too long to read (over "
                          f"{sys.get_int_max_str_digits()} digits)") from None
    try:
        req = InferRequest.model_validate(raw)
    except ValidationError as err:
        problems = describe(err)
        if len(problems) > 10:
            problems = [*problems[:10], f"and {len(problems) - 10} more"]
        problems = "; ".join(problems)
        raise bad_request(f"inference request does not follow the KServe v2 schema: {problems}") from None
    binary = memoryview(body)[split:]
    offset = 0
    tensors = []
    for t in req.inputs:
        check_shape(t.name, t.shape, t.datatype)
        size = t.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"input {t.name!r}: binary_data_size must be a byte count, got {clip(size)!r}")
            if offset + size > len(binary):
                raise bad_request(f"input {t.name!r}: binary_data_size {size!r} runs past the {len(binary)} bytes "
                                  f"of binary data after the JSON header")
            value = from_raw(t.name, t.datatype, t.shape, bytes(binary[offset:offset + size]))
            offset += size
        else:
            if t.data is None:
                raise bad_request(f"input {t.name!r} has neither 'data' nor a binary_data_size parameter")
            value = _from_json(t)
        tensors.append(InputTensor(t.name, t.datatype, t.shape, value))
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input "
                          f"(check binary_data_size and Inference-Header-Content-Length)")
    return req, tensors


def _from_json(t: TensorIn) -> np.ndarray | list[bytes]:
    if t.datatype == "BYTES":
        flat = _flatten(t)
        if len(flat) != count(t.shape) or not all(isinstance(x, str) for x in flat):
            raise bad_request(f"input {t.name!r}: shape {t.shape} needs {count(t.shape)} BYTES elements as "
                              f"strings, got {len(flat)}")
        try:
            return [base64.b64decode(x, validate=True) for x in flat]
        except (binascii.Error, ValueError):
            raise bad_request(f"input {t.name!r}: in JSON, BYTES elements must be base64 strings of the encoded "
                              f"images (or send them as binary tensor data)") from None
    dtype = numpy_dtype(t.name, t.datatype)
    try:
        arr = np.asarray(t.data, dtype=np.float64 if dtype.startswith("<f") else np.int64)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad_request(f"input {t.name!r}: 'data' must be a (possibly nested) list of numbers") from None
    if arr.size != count(t.shape):
        raise bad_request(f"input {t.name!r}: shape {t.shape} needs {count(t.shape)} values, 'data' has {arr.size}")
    return arr.astype(dtype).reshape(t.shape)


def _flatten(t: TensorIn) -> list:
    """'data' in row-major order, flat or nested along the shape: nesting deeper than the shape has dimensions
    is refused (without recursion, so any depth the JSON parser accepted is safe here)."""
    flat: list = []
    stack = [iter([t.data])]
    while stack:
        item = next(stack[-1], stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > max(len(t.shape), 1):
                raise bad_request(f"input {t.name!r}: 'data' nests deeper than shape {t.shape} has dimensions")
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def encode_response(head: dict, outputs: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """outputs: (name, datatype, array (for BYTES a list of str, or an object array of str of any shape), binary?).
    -> (body, JSON header length or None when all JSON)."""
    entries, blobs = [], []
    for name, datatype, arr, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype}
        if binary:
            entry["shape"], blob = to_raw(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":  # str elements as JSON strings
            entry["shape"], values = byte_elements(arr)
            entry["data"] = [v.decode() for v in values]
        else:
            arr = np.ascontiguousarray(arr, dtype=DTYPES[datatype])
            entry["shape"] = list(arr.shape)
            entry["data"] = arr.reshape(-1)  # orjson writes numpy arrays natively (shortest round-trip floats)
        entries.append(entry)
    header = orjson.dumps({**head, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
