"""h2load (nghttp2-client) as the one load generator for comparing KServe v2 over HTTP/1.1 and over gRPC against
the same server: request bodies for both protocols, a timed run, and its figures parsed.

h2load posts one body file (-d) for every request of a run, so a run repeats one request. HTTP runs use --h1 (with
-d, one request in flight per connection); gRPC runs use h2c (HTTP/2 with prior knowledge), each body a gRPC
message frame (a zero compression byte, a 4-byte big-endian length, a serialised ModelInferRequest). h2load counts
an HTTP 200 as a success whatever the grpc-status trailer says, so a caller checks the server's own counts of what
it answered (bench/serve_throughput.py reads reskd_requests_total).
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
OUTPUTS = ("class_id", "exit_stage", "flops")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def available() -> bool:
    return shutil.which("h2load") is not None


def v2_binary_body(images: np.ndarray) -> tuple[bytes, int]:
    """A KServe v2 HTTP infer body of `images` (normalised FP32, [N, 1, 28, 28]) in Triton's binary tensor extension,
    asking for binary outputs -> (body, JSON header length, the Inference-Header-Content-Length value)."""
    data = np.ascontiguousarray(images, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                     "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in OUTPUTS]}).encode()
    return header + data, len(header)


def grpc_infer_body(model: str, version: int, images: np.ndarray) -> bytes:
    """One gRPC message frame holding a ModelInferRequest for `images` (FP32 `images` in raw_input_contents, the
    outputs class_id, exit_stage and flops, which gRPC always returns raw)."""
    from reskd.service.rpc.protocol import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, model_version=str(version))
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "images", "FP32"
    tensor.shape.extend(images.shape)
    for name in OUTPUTS:
        request.outputs.add().name = name
    request.raw_input_contents.append(np.ascontiguousarray(images, np.float32).tobytes())
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse(stdout: str) -> dict:
    """h2load's summary -> its counts and the `time for request` figures (ms)."""
    out: dict = {}
    m = re.search(r"finished in ([\d.]+(?:us|ms|s)), ([\d.]+) req/s", stdout)
    if not m:
        raise ValueError("no 'finished in' line")
    out["duration_s"] = _ms(m.group(1)) / 1000
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", stdout)
    if not m:
        raise ValueError("no 'requests:' line")
    for key, value in zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"), m.groups()):
        out[key] = int(value)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout)
    out["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()))) if m else {}
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", stdout)
    if m:
        out["min_ms"], out["max_ms"], out["mean_ms"], out["sd_ms"] = map(_ms, m.groups())
    m = re.search(r"Application protocol: (\S+)", stdout)
    out["protocol"] = m.group(1) if m else ""
    return out


def percentiles(log: Path) -> dict:
    """p50 / p99 (ms) of the requests that got a 200, from h2load's per-request log (--log-file: start time, status,
    microseconds until the end of the response)."""
    times = [int(fields[2]) / 1000 for fields in (line.split("\t") for line in log.read_text().splitlines())
             if len(fields) >= 3 and fields[1] == "200"]
    if not times:
        return {}
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def run(url: str, body: Path, headers: list[str], clients: int, streams: int, duration: int, h1: bool,
        log: Path) -> dict:
    """One timed h2load run (-t1, -D duration) posting `body` to `url` from `clients` connections, `streams`
    requests in flight on each (h2c; --h1 allows one per connection) -> parse()'s figures, percentiles(), the
    command, h2load's own CPU seconds, and requests/s (successes over the measured time)."""
    cmd = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{duration}", "-d", str(body),
           "--log-file", str(log), *(["--h1"] if h1 else []), *(a for h in headers for a in ("-H", h)), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise RuntimeError(f"h2load failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    try:
        r = parse(out.stdout)
    except ValueError as err:
        raise RuntimeError(f"h2load's output not understood ({err}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    r.update(percentiles(log))
    r["command"] = " ".join(cmd)
    r["h2load_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    r["requests"] = r["succeeded"]
    r["requests_per_s"] = r["succeeded"] / r["duration_s"]
    return r
