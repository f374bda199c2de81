"""Tensors as bytes, the same for every protocol: KServe v2's datatypes, the checks a declared shape must pass, and
the raw layout of Triton's binary tensor data (HTTP, service/rest/kserve.py) and of gRPC's raw_input_contents and
raw_output_contents (service/rpc): elements little-endian in row-major order; BYTES elements each with a 4-byte
little-endian length before it."""

from __future__ import annotations

import math
import struct

import numpy as np

from .errors import bad_request

INT64_MAX = 2**63 - 1
MAX_DIMS = 32  # numpy's limit on an array's dimensions (32 before numpy 2, 64 since)
DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "u1"}


def check_shape(name: str, shape: list[int], datatype: str) -> None:
    """Every dimension, the element count and the byte size fit int64 (what the protocol's shapes are), and an
    array can have that many dimensions: counts below are exact Python integers, never wrapped."""
    if len(shape) > MAX_DIMS:
        raise bad_request(f"input {name!r}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported")
    for i, d in enumerate(shape):
        if d < 0:
            raise bad_request(f"input {name!r}: dimension {i} of the shape ({clip(d)}) is negative")
        if d > INT64_MAX:
            raise bad_request(f"input {name!r}: dimension {i} of the shape ({clip(d)}) is beyond int64 (at most "
                              f"2**63 - 1)")
    span = math.prod(d for d in shape if d)  # what numpy sizes an array by, even one with no elements
    if span > INT64_MAX:
        raise bad_request(f"input {name!r}: the dimensions of shape {shape} multiply to more than int64 can count")
    if datatype in DTYPES and span * np.dtype(DTYPES[datatype]).itemsize > INT64_MAX:
        raise bad_request(f"input {name!r}: shape {shape} of {datatype} needs more bytes than int64 can count")


def count(shape: list[int]) -> int:
    return math.prod(shape)  # exact: the shape was checked, so the count fits int64


def numpy_dtype(name: str, datatype: str) -> str:
    if datatype not in DTYPES:
        raise bad_request(f"input {name!r}: datatype {datatype!r} is not one of {sorted(DTYPES)} or BYTES")
    return DTYPES[datatype]


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes, what: str = "binary_data_size is") -> \
        np.ndarray | list[bytes]:
    """A checked shape's tensor from its raw bytes. what: how the protocol names the bytes' length (messages)."""
    if datatype == "BYTES":
        items, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise bad_request(f"input {name!r}: BYTES data ends inside a 4-byte length prefix")
            (n,) = struct.unpack_from("<I", raw, i)
            if i + 4 + n > len(raw):
                raise bad_request(f"input {name!r}: a BYTES element of {n} bytes runs past the tensor's data")
            items.append(raw[i + 4:i + 4 + n])
            i += 4 + n
        if len(items) != count(shape):
            raise bad_request(f"input {name!r}: shape {shape} needs {count(shape)} BYTES elements, the binary data "
                              f"holds {len(items)}")
        return items
    dtype = numpy_dtype(name, datatype)
    want = count(shape) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise bad_request(f"input {name!r}: shape {shape} of {datatype} needs {want} bytes, {what} {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def byte_elements(arr) -> tuple[list[int], list[bytes]]:
    """A BYTES output (a list of str, or an object array of str of any shape) -> (shape, its elements as UTF-8)."""
    shape = list(arr.shape) if isinstance(arr, np.ndarray) else [len(arr)]
    flat = arr.reshape(-1).tolist() if isinstance(arr, np.ndarray) else arr
    return shape, [v.encode() if isinstance(v, str) else bytes(v) for v in flat]


def to_raw(datatype: str, arr) -> tuple[list[int], bytes]:
    """An output -> (shape, raw bytes)."""
    if datatype == "BYTES":
        shape, values = byte_elements(arr)
        return shape, b"".join(struct.pack("<I", len(v)) + v for v in values)
    arr = np.ascontiguousarray(arr, dtype=DTYPES[datatype])
    return list(arr.shape), arr.tobytes()


def clip(value, width: int = 40):
    """A value from the request, shortened for an error message when its text is long."""
    text = str(value)
    return value if len(text) <= width else f"{text[:width]}... ({len(text)} characters)"
