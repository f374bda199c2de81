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

import httpx
import numpy as np

from common import MODELS, ROOT, machine, pinned, test_set
from reskd.manifest import ModelRepository

sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, children_of, free_port, metric, scrape  # noqa: E402

BOUNDARY = "reskd-bench-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
LOADS = {"single c1": (1, 1), "single c16": (1, 16), "single c64": (1, 64), "32-image c16": (32, 16),
         "v2 256 binary c8": (256, 8)}
V2_LOADS = {"v2 256 binary c8"}  # POST /v2/models/{name}/infer, FP32 `images` in Triton's binary tensor extension


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
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [per_request, *images.shape[1:]],
                                     "parameters": {"binary_data_size": per_request * int(np.prod(images.shape[1:]))
                                                    * 4}}],
                         "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                     for n in ("class_id", "exit_stage", "flops")]}).encode()
    paths = []
    for i in range(count):
        start = (i * per_request) % (len(images) - per_request)
        p = folder / f"v2-{per_request}-{i}.bin"
        p.write_bytes(header + np.ascontiguousarray(images[start:start + per_request], np.float32).tobytes())
        paths.append(str(p))
    listing = folder / f"v2-bodies-{per_request}.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing, len(header)


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
    total = 0.0
    for p in (pid, *children_of(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    ap.add_argument("--json")
    args = ap.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    loads = args.loads.split(",")
    query = "" if args.threshold is None else f"?threshold={args.threshold}"
    (cascade, cascade_version), (teacher, teacher_version) = pinned(args.cascade), pinned(args.teacher)
    versions = {cascade: cascade_version, teacher: teacher_version}
    stages = len(ModelRepository(MODELS).load(cascade, versions[cascade])[1].stages)
    repo = {} if set(versions.values()) == {1} else {"repo": MODELS}
    results = {"machine": machine(), "duration_s": args.duration, "threshold": args.threshold,
               "models": {"cascade": cascade, "teacher": teacher}, "versions": versions, "reskd": {}}
    pngs = encode_pngs(2000)
    with tempfile.TemporaryDirectory() as tmp:
        listings = {n: write_bodies(Path(tmp), pngs, n, 60) for n in {LOADS[k][0] for k in loads if k not in V2_LOADS}}
        normalised = test_set()[1][:2000]
        v2 = {k: write_v2_bodies(Path(tmp), normalised, LOADS[k][0], 20) for k in loads if k in V2_LOADS}
        for scheduler in args.schedulers.split(","):
            # Throughput at a fixed concurrency: the wait-based admission is off (a refusal would count as a fast
            # answer); bench/overload.py measures the server with it.
            # The v2 load keeps 8 x 256 images in flight: the queue bound is raised over that.
            # The thread budget and the workers are the server's own defaults (the tests' helper pins one
            # onnxruntime thread and one process).
            with ServerProcess(**{"scheduler": scheduler, "log_level": "warning", "max_queue_wait_ms": 0,
                                  "max_queue_images": 4096, "intra_op_threads": 0, "workers": 0,
                                  **repo, **settings}) as server:
                for model in (cascade, teacher):
                    path = f"models/{model}/versions/{versions[model]}"
                    url = f"{server.url}/v1/{path}/classify{query if model == cascade else ''}"
                    for load in loads:
                        images, conc = LOADS[load]
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
        if v2:  # the same cascade in this process, no HTTP: what the served figure is a share of
            results["inprocess_256"] = inprocess_rate(normalised, 256, args.duration, versions)
            print(json.dumps({"inprocess_256": results["inprocess_256"]}), flush=True)
        if args.litserve and 1 in listings:
            results["litserve_teacher"] = litserve_run(listings, args.duration, args.litserve_python,
                                                       tuple(args.litserve_options.split()))
            print(json.dumps({"litserve_teacher": results["litserve_teacher"]}), flush=True)
    report(results, loads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(results: dict, loads: list[str]) -> None:
    CASCADE, TEACHER = results["models"]["cascade"], results["models"]["teacher"]  # noqa: N806
    print(f"\nmachine: {results['machine']}; wrk on loopback, {results['duration_s']} s per run; "
          f"threshold {results['threshold'] or 'calibrated'}; versions {results['versions']}")
    print(f"{'scheduler':<9} {'model':<22} {'load':<13} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU ms/req':>18}")
    for scheduler, per_model in results["reskd"].items():
        for model in (CASCADE, TEACHER):
            for load in loads:
                r = per_model[model][load]
                print(f"{scheduler:<9} {model:<22} {load:<13} {r['requests_per_s']:>8.0f} {r['images_per_s']:>8.0f} "
                      f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r.get('server_cpu_ms_per_request', 0):>18.2f}"
                      f"{'  ' + r['note'] if 'note' in r else ''}")
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
        for load in loads:
            if load in V2_LOADS:
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
