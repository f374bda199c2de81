"""Served throughput, measured with wrk on loopback: `reskd serve` with each scheduler, for the adaptive cascade and
for the teacher, and LitServe serving the same teacher ONNX with its own dynamic batching.

    python bench/serve_throughput.py [--duration 8] [--schedulers stage,request,none] [--threshold T] \
        [--cascade fashion-mnist:1] [--teacher fashion-mnist-teacher:1] [--litserve] [--json FILE]

Loads: single-image requests at concurrency 1, 16 and 64, and 32-image requests at concurrency 16; every body a
multipart POST (`file` parts, as a browser or curl -F sends), cycling through distinct real Fashion-MNIST test
images so the cascade's images exit where they really would; and `v2 256 binary c8`: KServe v2 / Triton infer
requests of 256 normalised test images each (FP32 `images` in the binary tensor extension, binary outputs), at
concurrency 8, beside the same cascade and teacher run in this process at batch 256 (no HTTP: the ceiling). A
fresh server per scheduler (default settings: max batch 64, delay 2 ms); wrk -t2 (-t1 at concurrency 1) on the
same machine. --threshold sends more images to later stages (one threshold for every exit; v1 only), where
per-stage re-batching has survivors to merge. --cascade / --teacher pin the versions measured (requests name
them); the server serves the tests' pinned repository of first versions (tests/models) when both are version 1,
the bundled repository otherwise.

The protocol comparison (KServe v2 over HTTP/1.1 and over gRPC, one server serving both ports, h2load for both so
the load generator is the same; bench/h2load.py): `h2load v2 256 binary c8` (256 normalised test images a request,
8 in flight: HTTP on 8 connections, gRPC on 1 connection x 8 streams and on 8 connections x 1) and `h2load v2 single
c64` (one image a request, 64 in flight: HTTP on 64 connections, gRPC 1 x 64 and 4 x 16). Each run is checked
against the server's own reskd_requests_total (h2load counts any HTTP 200 as a success, whatever a gRPC status
says). --rounds alternates the protocols and reports the median round. Needs h2load (apt-get install
nghttp2-client); the other loads need wrk (apt-get install wrk).

    python bench/serve_throughput.py --loads "h2load v2 256 binary c8,h2load v2 single c64" --schedulers stage \
        --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h2load
import httpx
import numpy as np

from common import MODELS, ROOT, machine, pinned, test_set
from reskd.manifest import ModelRepository

sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, children_of, free_port, metric, scrape  # noqa: E402

BOUNDARY = "reskd-bench-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
LOADS = {"single c1": (1, 1), "single c16": (1, 16), "single c64": (1, 64), "32-image c16": (32, 16),
         "v2 256 binary c8": (256, 8), "h2load v2 256 binary c8": (256, 8), "h2load v2 single c64": (1, 64)}
V2_LOADS = {"v2 256 binary c8"}  # POST /v2/models/{name}/infer, FP32 `images` in Triton's binary tensor extension
# The protocol comparison, h2load for both: per load, its runs as (protocol, connections, requests in flight on each).
# HTTP/1.1 has one request in flight per connection; a gRPC client's channel multiplexes its calls over one
# connection (1 x N), and a pool of channels spreads them over several (the workers share the port: the kernel
# gives each connection to one worker).
H2LOAD_LOADS = {"h2load v2 256 binary c8": [("http", 8, 1), ("grpc", 1, 8), ("grpc", 8, 1)],
                "h2load v2 single c64": [("http", 64, 1), ("grpc", 1, 64), ("grpc", 4, 16)]}
HTTP_INFER = "/v2/models/{name}/versions/{version}/infer"  # the route template: reskd_requests_total's endpoint


def multipart(blobs: list[bytes]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n" for i, blob in enumerate(blobs)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def write_bodies(folder: Path, pngs: list[bytes], per_request: int, count: int) -> Path:
    paths = []
    for i in range(count):
        start = (i * per_request) % (len(pngs) - per_request)
        p = folder / f"body-{per_request}-{i}.bin"
        p.write_bytes(multipart(pngs[start:start + per_request]))
        paths.append(str(p))
    listing = folder / f"bodies-{per_request}.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def write_v2_bodies(folder: Path, images: np.ndarray, per_request: int, count: int) -> tuple[Path, int]:
    """Triton binary-tensor bodies of `per_request` normalised images each, asking for binary outputs; -> (listing,
    JSON header length, the same for every body)."""
    paths = []
    for i in range(count):
        start = (i * per_request) % (len(images) - per_request)
        p = folder / f"v2-{per_request}-{i}.bin"
        body, header_length = h2load.v2_binary_body(images[start:start + per_request])
        p.write_bytes(body)
        paths.append(str(p))
    listing = folder / f"v2-bodies-{per_request}.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing, header_length


def run_wrk(url: str, listing: Path, concurrency: int, duration: int, images: int, content_type: str = CONTENT_TYPE,
            extra_header: str = "") -> dict:
    threads = 1 if concurrency == 1 else 2
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s", "-s",
                          str(ROOT / "bench/wrk/post_images.lua"), url], capture_output=True, text=True,
                         env=dict(os.environ, IMAGE_LIST=str(listing), CONTENT_TYPE=content_type,
                                  EXTRA_HEADER=extra_header),
                         timeout=duration + 60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    r = json.loads(lines[-1])
    r["requests_per_s"] = r["requests"] / r["duration_s"]
    r["images_per_s"] = r["requests_per_s"] * images
    if r["errors"]:
        kinds = ", ".join(f"{n} {k}" for k, n in r.get("error_kinds", {}).items() if n)
        r["note"] = f"{r['errors']} non-2xx or failed requests ({kinds})"
    return r


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process and its children (the workers, RESKD_WORKERS) have used, all their
    threads (/proc/PID/stat)."""
    return sum(cpu_by_process(pid).values())


def cpu_by_process(pid: int) -> dict[int, float]:
    """process_cpu_s per process: {pid: CPU seconds} of the process and each of its children."""
    out = {}
    for p in (pid, *children_of(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def variant(protocol: str, clients: int, streams: int) -> str:
    """A run's name: protocol, connections x requests in flight on each."""
    return f"{protocol} {clients}x{streams}"


def answered(server: ServerProcess, endpoint: str, model: str, version: int) -> dict[str, float]:
    """The server's reskd_requests_total for one endpoint and model version, by status code."""
    with server.client() as c:
        m = scrape(c)
    out: dict[str, float] = {}
    for (name, labels), value in m.items():
        lbl = dict(labels)
        if name == "reskd_requests_total" and lbl.get("endpoint") == endpoint and lbl.get("model") == model \
                and lbl.get("version") == str(version):
            out[lbl["code"]] = out.get(lbl["code"], 0) + value
    return out


def exits(server: ServerProcess, model: str, version: int) -> dict[str, float]:
    """reskd_exits_total of a model version by stage."""
    with server.client() as c:
        m = scrape(c)
    return {dict(labels)["stage"]: value for (name, labels), value in m.items() if name == "reskd_exits_total"
            and dict(labels).get("model") == model and dict(labels).get("version") == str(version)}


def settle(server: ServerProcess, endpoint: str, model: str, version: int, before: dict, started: int,
           quiet_s: float = 1.0, timeout: float = 15) -> dict[str, int]:
    """Wait until the server has counted the requests an h2load run started -> the run's counts by status code.
    Those in flight when its time ran out h2load abandons: the server answers them anyway, or counts them 499 (a
    client gone); a gRPC stream h2load opened but had not sent in full never becomes a call. So: until the count
    reaches h2load's, or stays the same for quiet_s."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        now = answered(server, endpoint, model, version)
        delta = {code: int(now.get(code, 0) - before.get(code, 0)) for code in now}
        delta = {code: n for code, n in delta.items() if n}
        total = sum(delta.values())
        if total != last:
            last, since = total, time.monotonic()
        if total >= started or time.monotonic() - since >= quiet_s or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


def h2load_check(r: dict, counts: dict[str, int]) -> str:
    """'' when h2load saw only successes and the server answered every completed request 200 and nothing else
    (499 only for requests h2load left in flight when it stopped); otherwise what went wrong."""
    problems = []
    if r["failed"] or r["errored"] or r["timeout"]:
        problems.append(f"h2load: {r['failed']} failed, {r['errored']} errored, {r['timeout']} timed out")
    if any(n for k, n in r["status"].items() if k != "2xx"):
        problems.append(f"h2load status codes {r['status']}")
    abandoned = r["started"] - r["done"]
    others = {code: n for code, n in counts.items() if code not in ("200", "499")}
    if others:
        problems.append(f"server answered {others}")
    if counts.get("499", 0) > abandoned:
        problems.append(f"server counted {counts['499']} x 499 for {abandoned} requests left in flight")
    if counts.get("200", 0) < r["succeeded"]:
        problems.append(f"server answered {counts.get('200', 0)} x 200 for {r['succeeded']} h2load successes")
    if sum(counts.values()) > r["started"]:
        problems.append(f"server counted {sum(counts.values())} requests, h2load started {r['started']}")
    return "; ".join(problems)


def h2load_run(server: ServerProcess, folder: Path, model: str, version: int, images: np.ndarray, protocol: str,
               clients: int, streams: int, duration: int, warmup: int) -> dict:
    """One h2load run of `images` per request against `server` (after an unmeasured one of `warmup` seconds, on
    fresh connections), checked against the server's counts; its figures, the server's CPU per request."""
    name = variant(protocol, clients, streams).replace(" ", "-")
    if protocol == "http":
        body, header_length = h2load.v2_binary_body(images)
        url = f"{server.url}/v2/models/{model}/versions/{version}/infer"
        headers = ["Content-Type: application/octet-stream", f"Inference-Header-Content-Length: {header_length}"]
        endpoint = HTTP_INFER
    else:
        body = h2load.grpc_infer_body(model, version, images)
        url = f"http://{server.grpc}{h2load.GRPC_PATH}"
        headers = ["content-type: application/grpc", "te: trailers"]
        endpoint = h2load.GRPC_PATH
    path = folder / f"{model}-{len(images)}-{name}.bin"
    path.write_bytes(body)
    log = folder / f"{model}-{len(images)}-{name}.log"
    if warmup:
        before = answered(server, endpoint, model, version)
        w = h2load.run(url, path, headers, clients, streams, warmup, protocol == "http", log)
        settle(server, endpoint, model, version, before, w["started"])
    before, exits_before = answered(server, endpoint, model, version), exits(server, model, version)
    cpu_before = cpu_by_process(server.proc.pid)
    r = h2load.run(url, path, headers, clients, streams, duration, protocol == "http", log)
    # Per process (the supervisor, then the workers): how the load spread over the workers.
    by_process = [round(t - cpu_before.get(p, 0.0), 2) for p, t in cpu_by_process(server.proc.pid).items()]
    cpu = sum(by_process)
    counts = settle(server, endpoint, model, version, before, r["started"])
    # Where the run's images left the cascade (every image the server classified, abandoned requests included).
    r["exits"] = {stage: int(n - exits_before.get(stage, 0))
                  for stage, n in sorted(exits(server, model, version).items())}
    r.update(protocol=protocol, clients=clients, streams=streams, body_bytes=len(body), images_per_request=len(images),
             images_per_s=r["requests_per_s"] * len(images), server_answered=counts,
             server_cpu_s=cpu, server_cpu_s_by_process=by_process, server_cpu_ms_per_request=1000 * cpu / max(r["succeeded"], 1),
             h2load_cpu_ms_per_request=1000 * r["h2load_cpu_s"] / max(r["succeeded"], 1))
    problem = h2load_check(r, counts)
    if problem:
        r["note"] = problem
    return r


def h2load_load(server: ServerProcess, folder: Path, model: str, version: int, images: np.ndarray, load: str,
                duration: int, warmup: int, rounds: int) -> dict:
    """Every run of an h2load load, alternated `rounds` times (the order reversed every other round) -> {run name:
    the round with the median requests/s, and every round's requests/s}."""
    runs = H2LOAD_LOADS[load]
    per_run: dict[str, list[dict]] = {variant(*v): [] for v in runs}
    for i in range(rounds):
        for protocol, clients, streams in (runs if i % 2 == 0 else runs[::-1]):
            r = h2load_run(server, folder, model, version, images, protocol, clients, streams, duration, warmup)
            per_run[variant(protocol, clients, streams)].append(r)
            print(json.dumps({"model": model, "load": load, "run": variant(protocol, clients, streams), "round": i,
                              **{k: v for k, v in r.items() if k != "command"}}), flush=True)
    out = {}
    for name, rs in per_run.items():
        ordered = sorted(rs, key=lambda r: r["requests_per_s"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["rounds_requests_per_s"] = [r["requests_per_s"] for r in rs]
        notes = [r["note"] for r in rs if "note" in r]
        if notes:
            median["note"] = " | ".join(notes)
        out[name] = median
    return out


def encode_pngs(n: int) -> list[bytes]:
    import io

    from PIL import Image

    pixels, _, _ = test_set()
    out = []
    for img in pixels[:n]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def litserve_run(listings: dict, duration: int, python: str = sys.executable, options: tuple = ()) -> dict:
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([python, str(ROOT / "bench/litserve_teacher.py"), "--port", str(port), *options],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).text == "ok":
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"LitServe did not start:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        images, conc = LOADS["single c64"]
        return {"single c64": run_wrk(f"http://127.0.0.1:{port}/predict", listings[images], conc, duration, images)}
    finally:  # LitServe's inference workers are processes of its own: the whole session goes
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived their parent
        except ProcessLookupError:
            pass


def inprocess_rate(images: np.ndarray, batch: int, seconds: float, versions: dict[str, int]) -> dict:
    """images/s of the adaptive cascade and of the teacher through the runtime at `batch`, as bench/
    inprocess_throughput.py measures them (one shared pool of a thread per core, best of 3)."""
    from inprocess_throughput import rate

    from reskd.device import Device
    from reskd.runtime import CascadeRuntime

    device = Device.resolve("cpu", shared_pool=True)
    out = {}
    for model, version in versions.items():
        rt = CascadeRuntime(MODELS / model / str(version), device=device)
        out[model] = rate(rt.run, images, batch, seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--schedulers", default="stage,request,none")
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--cascade", default="fashion-mnist:1", help="NAME:VERSION")
    ap.add_argument("--teacher", default="fashion-mnist-teacher:1", help="NAME:VERSION")
    ap.add_argument("--litserve", action="store_true", help="also LitServe serving the teacher (pip install litserve)")
    ap.add_argument("--litserve-python", default=sys.executable,
                    help="the Python whose environment has litserve (and reskd[serve]); default this one")
    ap.add_argument("--litserve-options", default="", help="bench/litserve_teacher.py options, e.g. "
                                                           "'--max-batch-size 16 --batch-timeout 0.001'")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting (RESKD_NAME) for the servers started here; repeatable")
    ap.add_argument("--rounds", type=int, default=1,
                    help="h2load loads: run every protocol this many times, alternating; the median round is reported")
    ap.add_argument("--h2load-warmup", type=int, default=1, metavar="SECONDS",
                    help="h2load loads: an unmeasured run of this many seconds before each measured one (0: none)")
    ap.add_argument("--json")
    args = ap.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    loads = args.loads.split(",")
    unknown = [k for k in loads if k not in LOADS]
    if unknown:
        sys.exit(f"unknown loads {unknown}; known: {', '.join(LOADS)}")
    if any(k not in H2LOAD_LOADS for k in loads) and not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    if any(k in H2LOAD_LOADS for k in loads) and not h2load.available():
        sys.exit("h2load is not installed (apt-get install nghttp2-client)")
    query = "" if args.threshold is None else f"?threshold={args.threshold}"
    (cascade, cascade_version), (teacher, teacher_version) = pinned(args.cascade), pinned(args.teacher)
    versions = {cascade: cascade_version, teacher: teacher_version}
    stages = len(ModelRepository(MODELS).load(cascade, versions[cascade])[1].stages)
    repo = {} if set(versions.values()) == {1} else {"repo": MODELS}
    results = {"machine": machine(), "duration_s": args.duration, "threshold": args.threshold,
               "models": {"cascade": cascade, "teacher": teacher}, "versions": versions, "reskd": {},
               "generators": sorted({"h2load" if k in H2LOAD_LOADS else "wrk" for k in loads})}
    if any(k in H2LOAD_LOADS for k in loads):
        results["h2load"] = {"version": subprocess.run(["h2load", "--version"], capture_output=True,
                                                       text=True).stdout.strip(),
                             "rounds": args.rounds, "warmup_s": args.h2load_warmup,
                             "runs": {k: [variant(*v) for v in H2LOAD_LOADS[k]] for k in loads if k in H2LOAD_LOADS}}
    pngs = encode_pngs(2000)
    with tempfile.TemporaryDirectory() as tmp:
        listings = {n: write_bodies(Path(tmp), pngs, n, 60)
                    for n in {LOADS[k][0] for k in loads if k not in V2_LOADS and k not in H2LOAD_LOADS}}
        normalised = test_set()[1][:2000]
        v2 = {k: write_v2_bodies(Path(tmp), normalised, LOADS[k][0], 20) for k in loads if k in V2_LOADS}
        for scheduler in args.schedulers.split(","):
            # Throughput at a fixed concurrency: the wait-based admission is off (a refusal would count as a fast
            # answer); bench/overload.py measures the server with it.
            # The v2 load keeps 8 x 256 images in flight: the queue bound is raised over that.
            # The thread budget and the workers are the server's own defaults (the tests' helper pins one
            # onnxruntime thread and one process). gRPC is served beside HTTP when an h2load load compares them.
            with ServerProcess(grpc=any(k in H2LOAD_LOADS for k in loads),
                               **{"scheduler": scheduler, "log_level": "warning", "max_queue_wait_ms": 0,
                                  "max_queue_images": 4096, "intra_op_threads": 0, "workers": 0,
                                  **repo, **settings}) as server:
                for model in (cascade, teacher):
                    path = f"models/{model}/versions/{versions[model]}"
                    url = f"{server.url}/v1/{path}/classify{query if model == cascade else ''}"
                    for load in loads:
                        images, conc = LOADS[load]
                        if load in H2LOAD_LOADS:  # one body per run (h2load repeats it): the first test images
                            r = h2load_load(server, Path(tmp), model, versions[model], normalised[:images], load,
                                            args.duration, args.h2load_warmup, args.rounds)
                            results["reskd"].setdefault(scheduler, {}).setdefault(model, {})[load] = r
                            continue
                        cpu_before = process_cpu_s(server.proc.pid)
                        if load in V2_LOADS:
                            listing, header_length = v2[load]
                            r = run_wrk(f"{server.url}/v2/{path}/infer", listing, conc, args.duration,
                                        images, "application/octet-stream",
                                        f"Inference-Header-Content-Length: {header_length}")
                        else:
                            r = run_wrk(url, listings[images], conc, args.duration, images)
                        # The server's CPU (every thread) per request: what bounds a load the model does not.
                        r["server_cpu_ms_per_request"] = 1000 * (process_cpu_s(server.proc.pid) - cpu_before) \
                            / max(r["requests"], 1)
                        results["reskd"].setdefault(scheduler, {}).setdefault(model, {})[load] = r
                        print(json.dumps({"scheduler": scheduler, "model": model, "load": load, **r}), flush=True)
                with server.client() as c:
                    m = scrape(c)
                labels = {"model": cascade, "version": str(versions[cascade])}
                results["reskd"][scheduler]["mean_batch"] = {
                    str(s): metric(m, "reskd_batch_size_sum", stage=str(s), **labels)
                    / max(1.0, metric(m, "reskd_batch_size_count", stage=str(s), **labels)) for s in range(stages)}
                results["reskd"][scheduler]["exits"] = [metric(m, "reskd_exits_total", stage=str(s), **labels)
                                                        for s in range(stages)]
        if v2 or "h2load v2 256 binary c8" in loads:  # the same cascade in this process, no HTTP: the ceiling
            results["inprocess_256"] = inprocess_rate(normalised, 256, args.duration, versions)
            print(json.dumps({"inprocess_256": results["inprocess_256"]}), flush=True)
        if args.litserve and 1 in listings:
            results["litserve_teacher"] = litserve_run(listings, args.duration, args.litserve_python,
                                                       tuple(args.litserve_options.split()))
            print(json.dumps({"litserve_teacher": results["litserve_teacher"]}), flush=True)
    report(results, loads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def workers_cpu(by_process: list[float]) -> str:
    """CPU seconds of each worker (the children that used any), or of the one process when it has none."""
    workers = [t for t in by_process[1:] if t >= 0.1] or by_process[:1]
    return "/".join(f"{t:.1f}" for t in workers)


def report_h2load(results: dict, loads: list[str]) -> None:
    """The protocol comparison: every h2load run, then gRPC / HTTP per load."""
    CASCADE, TEACHER = results["models"]["cascade"], results["models"]["teacher"]  # noqa: N806
    h = results["h2load"]
    print(f"\nKServe v2 over HTTP/1.1 and over gRPC, one server process (both ports), load generator {h['version']} "
          f"-t1 for both, sharing the machine's {os.cpu_count()} cores with the server; each run "
          f"{results['duration_s']} s after a {h['warmup_s']} s unmeasured one, {h['rounds']} round(s) alternating "
          f"the protocols (the median round shown); one body per run, repeated: the first 256 test images, or the "
          f"first test image; runs named protocol connections x requests in flight on each; latency: mean and max "
          f"from h2load's summary, p50 / p99 from its per-request log (requests answered 200); 'check': the "
          f"server's reskd_requests_total agrees with h2load (every completed request answered 200, nothing else "
          f"but 499 for requests left in flight when h2load stopped)")
    print(f"{'scheduler':<9} {'model':<22} {'load':<23} {'run':<10} {'req/s':>8} {'img/s':>8} {'mean ms':>8} "
          f"{'max ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU ms/req':>15} {'h2load CPU ms/req':>18} "
          f"{'worker CPU s':<16} check")
    for scheduler, per_model in results["reskd"].items():
        for model in (CASCADE, TEACHER):
            for load in loads:
                for name, r in per_model[model][load].items():
                    print(f"{scheduler:<9} {model:<22} {load:<23} {name:<10} {r['requests_per_s']:>8.0f} "
                          f"{r['images_per_s']:>8.0f} {r.get('mean_ms', 0):>8.1f} {r.get('max_ms', 0):>8.1f} "
                          f"{r.get('p50_ms', 0):>8.1f} {r.get('p99_ms', 0):>8.1f} "
                          f"{r['server_cpu_ms_per_request']:>15.2f} {r['h2load_cpu_ms_per_request']:>18.2f} "
                          f"{workers_cpu(r['server_cpu_s_by_process']):<16} "
                          f"{'ERRORS: ' + r['note'] if 'note' in r else 'ok'}")
    print("\ngRPC / HTTP (h2load, same server, same run):")
    for scheduler, per_model in results["reskd"].items():
        for model in (CASCADE, TEACHER):
            for load in loads:
                runs = per_model[model][load]
                http = next(r for r in runs.values() if r["protocol"] == "http")
                line = ", ".join(f"{name} {r['requests_per_s'] / http['requests_per_s']:.2f}x "
                                 f"({r['requests_per_s']:.0f} vs {http['requests_per_s']:.0f} req/s)"
                                 for name, r in runs.items() if r["protocol"] == "grpc")
                print(f"  {scheduler:<9} {model:<22} {load:<23} {line}")


def report(results: dict, loads: list[str]) -> None:
    CASCADE, TEACHER = results["models"]["cascade"], results["models"]["teacher"]  # noqa: N806
    h2 = [k for k in loads if k in H2LOAD_LOADS]
    loads = [k for k in loads if k not in H2LOAD_LOADS]
    print(f"\nmachine: {results['machine']}; {' and '.join(results['generators'])} on loopback, on the same "
          f"{os.cpu_count()} cores as the server; {results['duration_s']} s per run; "
          f"threshold {results['threshold'] or 'calibrated'}; versions {results['versions']}")
    if loads:
        print(f"{'scheduler':<9} {'model':<22} {'load':<13} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'server CPU ms/req':>18}")
    for scheduler, per_model in results["reskd"].items():
        for model in (CASCADE, TEACHER):
            for load in loads:
                r = per_model[model][load]
                print(f"{scheduler:<9} {model:<22} {load:<13} {r['requests_per_s']:>8.0f} {r['images_per_s']:>8.0f} "
                      f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r.get('server_cpu_ms_per_request', 0):>18.2f}"
                      f"{'  ' + r['note'] if 'note' in r else ''}")
    if h2:
        report_h2load(results, h2)
    print("\nratios (images/s):")
    stage = results["reskd"].get("stage")
    for load in loads:
        if stage:
            c, t = stage[CASCADE][load]["images_per_s"], stage[TEACHER][load]["images_per_s"]
            line = f"  {load:<13} cascade / teacher (stage scheduler) {c / t:5.2f}x"
            for other in ("request", "none"):
                if other in results["reskd"]:
                    line += f"; stage / {other} (cascade) {c / results['reskd'][other][CASCADE][load]['images_per_s']:5.2f}x"
            print(line)
    if "inprocess_256" in results and stage:
        inproc = results["inprocess_256"]
        for load in loads + h2:
            if load in V2_LOADS or (load in h2 and LOADS[load][0] == 256):
                if load in h2:  # the best of the runs
                    load_runs = stage[CASCADE][load].values()
                    served = max(r["images_per_s"] for r in load_runs)
                else:
                    served = stage[CASCADE][load]["images_per_s"]
                print(f"  {load:<13} served cascade / in-process cascade at batch 256 {served / inproc[CASCADE]:5.2f}x "
                      f"({served:.0f} vs {inproc[CASCADE]:.0f} images/s; in-process cascade / teacher "
                      f"{inproc[CASCADE] / inproc[TEACHER]:.2f}x)")
    if "litserve_teacher" in results and stage and "single c64" in stage[TEACHER]:
        lit = results["litserve_teacher"]["single c64"]["requests_per_s"]
        ours = stage[TEACHER]["single c64"]["requests_per_s"]
        print(f"  single c64    reskd serve teacher / LitServe teacher {ours / lit:5.2f}x ({ours:.0f} vs {lit:.0f} req/s)")


if __name__ == "__main__":
    main()
