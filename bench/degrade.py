"""Degrading under load against shedding: goodput, objective attainment and accuracy of a `reskd serve` that moves
down its operating-point curve under load (RESKD_DEGRADE=true), beside the shed-only server (503 + Retry-After) and
a server run statically at the cheapest point.

    .venv/bin/python bench/degrade.py                     # ~30 min on 2 cores: 3 rounds
    .venv/bin/python bench/degrade.py --quick             # smoke run: short phases, 1 round (~10 min)
    .venv/bin/python bench/degrade.py --rounds 5 --slo-ms 500 --json out.json

What is served: fashion-mnist-fallback:1 (a 3-stage cascade with stored operating points; a temporary repository
holds only it). Three modes, one `reskd serve` process each (RESKD_WORKERS=1: one controller), the same
RESKD_MAX_QUEUE_WAIT_MS and RESKD_LATENCY_SLO_MS (--server-slo-ms) for all:
- shed: RESKD_DEGRADE=false, requests carry nothing (the top point, "default"; 503 past the queue-wait limit);
- static: RESKD_DEGRADE=false, every request asks for the cheapest point within --max-drop-pt (1.0) of the top's
  validation accuracy (read from the manifest, as the server builds its ladder: budget-14);
- adaptive: RESKD_DEGRADE=true, requests carry nothing (the server chooses the point).

Two workloads, both labelled Fashion-MNIST test images, so every answer is scored:
- v2 (model-bound): POST /v2/models/fashion-mnist-fallback/infer, Triton's binary tensor extension, 256 normalised
  FP32 images a request (39 distinct bodies cut from the 10k test set, built once with tritonclient);
- v1 (HTTP-bound): POST /v1/models/fashion-mnist-fallback/classify, one PNG a request (every test image).

Steps:
1. R: the in-process speed ratio (CascadeRuntime, batch 256 over the test set, best of 5 alternated passes) of the
   cheapest point within --max-drop-pt of the top point over the top point.
2. Capacity, per workload: the highest Poisson rate at which the shed-only server answers >= 99% of the requests
   within the objective (--slo-ms, end to end) with < 0.1% 503s; doubling, then bisection, --trial-s trials; the
   rate found must pass again on another Poisson draw (else 5% lower until it does).
3. --rounds rounds; in each, the modes alternate (shed, static, adaptive), each on a fresh server, and each runs
   for each workload: open-loop Poisson at 1x, 2x and 4x the capacity (--phase-s each; v1 --v1-phase-s), then a
   step 1x -> 4x -> 1x (--step-s: 10 + 10 + 15 s; v1 --v1-step-s: 8 + 8 + 12 s). Every phase of a workload draws
   the same arrival times and bodies in every mode and round (seeded); the adaptive server is back at its top point
   before each phase starts; before each mode the machine is let go quiet (--quiet-wait-s).

Every server gets RESKD_MAX_QUEUE_IMAGES --max-queue-images (8192): at the default (1024) a 256-image request is
refused on queue size once ~4 requests wait (~130 ms of work here), before either the wait limit or the degrade
trigger (half the objective) is reached, so neither mode's own policy would be measured.

The load is open loop: request start times are drawn from a Poisson process and requests are sent then, whatever
the answers (asyncio + aiohttp in this process, uvloop when installed; bodies built beforehand). Latency counts from
the scheduled start, so a client that falls behind is charged to the latency, not hidden. The client shares the
cores with the server: its CPU seconds, and those of other processes on the machine, are printed per phase.

Measures (per phase): goodput (correct images of the requests answered within the objective, per second of the
phase), attainment (share of the requests offered answered within the objective) and the share of admitted
(200) requests within it, accuracy of the images answered (Wilson 95% interval), 503 rate, p50/p99 of admitted
latency, server CPU seconds per image answered (/proc utime+stime), images answered at each point (from the
responses), time at each point (/metrics reskd_operating_point every 0.5 s); for the step: switches
(reskd_point_switches_total), seconds from the step up to the first move down, and from the step back to the top
point again (reskd_degrade_level 0).

Targets (issue "degrade under load", same-run ratios, medians over rounds): at 2x model-bound load the adaptive
goodput >= 0.85 x min(R, 2) x the shed-only server's (per round, then the median), >= 99% of its admitted requests
within the objective, accuracy of its answered images within 1.0 pt of the top point's (in process, on the same
images); at 1x the top point held (no switch, level 0 throughout), accuracy equal to the shed-only (top-point)
server's (every image answered at the top point: then each answer is the one the shed-only server gives, the
requests being the same) and latency equal (p50 and p99 within 20% or 10 ms of the shed-only server's); after the
step back to 1x the top point again within 10 s, at most 2 switches per step. v1 (HTTP-bound): the gain of
adaptive over shed-only at 2x, "no gain" when under 1.1x.

The server is told an objective (--server-slo-ms, RESKD_LATENCY_SLO_MS = RESKD_MAX_QUEUE_WAIT_MS) of 0.8 x the
scored one by default: a request admitted at the wait limit still has room for its own work, the shed-only
server's fairest setting; the adaptive server then moves down at an expected wait of 0.4 x the scored objective.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import MODELS, ROOT, machine, pinned, test_set
from reskd.stats import wilson

sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess, children_of  # noqa: E402

MODES = ("shed", "static", "adaptive")
V2_IMAGES = 256
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRAPE_S = 0.5
BUSY_TRIAL_CORES = 0.15  # a failed capacity trial during which other processes used more CPU is run again
WANTED = ("reskd_operating_point", "reskd_degrade_level", "reskd_point_switches_total", "reskd_requests_total",
          "reskd_exit_reasons_total")


# --- in process ----------------------------------------------------------------------------------------------------
def ladder_ends(manifest, max_drop_pt: float) -> tuple[str, str]:
    """(top point id, the cheapest point within max_drop_pt of the top's validation accuracy), as the server's
    ladder (service/serving/degrade.py) reads the manifest."""
    points = manifest.operating_points
    top = points.point(points.default)
    within = [p for p in points.points if p.mean_flops < top.mean_flops and p.accuracy < top.accuracy
              and 100 * (top.accuracy - p.accuracy) <= max_drop_pt + 1e-9]
    cheapest = min(within, key=lambda p: p.mean_flops) if within else top
    return top.id, cheapest.id


def in_process(ref: str, images: np.ndarray, labels: np.ndarray, max_drop_pt: float) -> dict:
    """R and each end's accuracy on the test images (what the served answers are compared with)."""
    from reskd.device import Device
    from reskd.runtime import CascadeRuntime

    name, version = pinned(ref)
    rt = CascadeRuntime(MODELS / name / str(version), device=Device.resolve("cpu", shared_pool=True))
    top, cheapest = ladder_ends(rt.manifest, max_drop_pt)
    out = {"top": top, "cheapest": cheapest, "points": {}}
    n = len(images) - len(images) % V2_IMAGES
    best = {top: 0.0, cheapest: 0.0}
    for point in (top, cheapest):
        rt.run(images[:n], point=point)  # warm
    for _ in range(5):  # passes alternate between the two points, so a busy spell slows both alike; best of 5
        for point in (top, cheapest):
            t0 = time.perf_counter()
            for s in range(0, n, V2_IMAGES):
                rt.run(images[s:s + V2_IMAGES], point=point)
            best[point] = max(best[point], n / (time.perf_counter() - t0))
    for point in (top, cheapest):
        result = rt.run(images, point=point)
        p = rt.manifest.operating_points.point(point)
        out["points"][point] = {"images_per_s": best[point], "class_id": result.class_id,
                                "test_accuracy": 100 * float((result.class_id == labels).mean()),
                                "val_accuracy": 100 * p.accuracy, "pct_teacher_flops": p.pct_teacher_flops}
    out["R"] = out["points"][cheapest]["images_per_s"] / out["points"][top]["images_per_s"]
    return out


# --- requests ------------------------------------------------------------------------------------------------------
@dataclass
class Body:
    content: bytes
    headers: dict
    labels: np.ndarray  # the true class of each image it holds
    index: np.ndarray  # which test images


@dataclass
class Workload:
    name: str
    path: str
    bodies: list[Body]
    images: int  # per request
    query: str = ""


def v2_bodies(images: np.ndarray, labels: np.ndarray, point: str | None) -> list[Body]:
    import tritonclient.http as triton

    out = []
    params = {"operating_point": point} if point else None
    for s in range(0, len(images) - V2_IMAGES + 1, V2_IMAGES):
        x = triton.InferInput("images", [V2_IMAGES, *images.shape[1:]], "FP32")
        x.set_data_from_numpy(np.ascontiguousarray(images[s:s + V2_IMAGES]), binary_data=True)
        body, json_size = triton.InferenceServerClient.generate_request_body(
            [x], outputs=[triton.InferRequestedOutput("class_id", binary_data=True)], parameters=params)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        out.append(Body(bytes(body), headers, labels[s:s + V2_IMAGES], np.arange(s, s + V2_IMAGES)))
    return out


BOUNDARY = "reskd-degrade-boundary"


def v1_bodies(pixels: np.ndarray, labels: np.ndarray) -> list[Body]:
    from PIL import Image

    out = []
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for i in range(len(pixels)):
        buf = io.BytesIO()
        Image.fromarray(pixels[i], "L").save(buf, "PNG")
        content = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
                   f"Content-Type: image/png\r\n\r\n".encode() + buf.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode())
        out.append(Body(content, headers, labels[i:i + 1], np.array([i])))
    return out


def parse_v2(data: bytes, headers) -> tuple[np.ndarray, str | None]:
    n = int(headers.get("Inference-Header-Content-Length", len(data)))
    head = json.loads(data[:n])
    offset, class_id = n, None
    for o in head.get("outputs", []):
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:  # a JSON tensor
            if o["name"] == "class_id":
                class_id = np.asarray(o["data"], np.int64)
            continue
        if o["name"] == "class_id":
            class_id = np.frombuffer(data[offset:offset + size], np.int64)
        offset += size
    return class_id, head.get("parameters", {}).get("operating_point")


def parse_v1(data: bytes, headers) -> tuple[np.ndarray, str | None]:
    head = json.loads(data)
    return (np.array([p["class_id"] for p in head["predictions"]], np.int64),
            (head.get("operating_point") or {}).get("id"))


# --- the load ------------------------------------------------------------------------------------------------------
def arrivals(segments: list[tuple[float, float]], seed: int, bodies: int) -> list[tuple[float, int]]:
    """Poisson arrival times over consecutive (seconds, rate/s) segments, each with a body drawn at random."""
    rng = np.random.default_rng(seed)
    out, start = [], 0.0
    for seconds, rate in segments:
        t = start
        while rate > 0:
            t += rng.exponential(1 / rate)
            if t >= start + seconds:
                break
            out.append((t, int(rng.integers(bodies))))
        start += seconds
    return out


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of pid and its children."""
    total = 0.0
    for p in [pid, *children_of(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            pass
    return total


def machine_cpu() -> float:
    """CPU seconds all processes spent (busy time of every core) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = list(map(int, fields))
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


async def wait_quiet(limit_s: float, log, busy_cores: float = 0.25) -> float:
    """Wait (at most limit_s) until the machine is quiet: under busy_cores of CPU used by everything over 2 s (other
    processes share these cores: their CPU seconds are printed per phase too). -> seconds waited."""
    t0 = time.perf_counter()
    while True:
        c0 = machine_cpu()
        await asyncio.sleep(2.0)
        busy = (machine_cpu() - c0) / 2.0
        waited = time.perf_counter() - t0
        if busy < busy_cores or waited >= limit_s:
            if waited > 2.5 or busy >= busy_cores:
                log(f"  waited {waited:.0f} s for a quiet machine (now {busy:.2f} cores busy)")
            return waited


def code_fingerprint() -> str:
    """The server code a process started now runs: the git commit and a hash of every .py file under service/ and
    reskd/ as they are on disk (work in progress included), so rounds run against different code show."""
    import hashlib
    import subprocess

    h = hashlib.sha256()
    for path in sorted([*(ROOT / "service").rglob("*.py"), *(ROOT / "reskd").rglob("*.py")]):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return f"{commit}+{h.hexdigest()[:10]}"


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """The few series this benchmark reads, parsed by hand (cheap: it runs every 0.5 s beside the load)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith(WANTED):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = []
        for item in labels.rstrip("}").split('",'):
            if "=" in item:
                k, _, v = item.partition("=")
                pairs.append((k.strip(), v.strip().strip('"')))
        try:
            out[name, frozenset(pairs)] = float(value)
        except ValueError:
            pass
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def current_point(samples: dict) -> tuple[str | None, int | None]:
    point = next((dict(lbl)["point"] for (n, lbl), v in samples.items() if n == "reskd_operating_point" and v == 1),
                 None)
    levels = [v for (n, _), v in samples.items() if n == "reskd_degrade_level"]
    return point, int(max(levels)) if levels else None


@dataclass
class Phase:
    """What one phase recorded: per request (scheduled start, latency s, status, images, correct, point)."""
    seconds: float
    requests: list[tuple] = field(default_factory=list)
    scrapes: list[tuple[float, str | None, int | None]] = field(default_factory=list)
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    other_cpu: float = 0.0
    lag_p99_ms: float = 0.0  # how late the client sent, 99th percentile
    errors: dict = field(default_factory=dict)


class Client:
    def __init__(self, url: str, pid: int):
        import aiohttp

        self.url, self.pid = url, pid
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=15))  # an answer later than this is as lost as none

    async def close(self) -> None:
        await self.session.close()

    async def metrics(self) -> dict:
        async with self.session.get(self.url + "/metrics") as r:
            return parse_metrics(await r.text())

    async def one(self, work: Workload, body: Body, due: float, offset: float, parse, out: list,
                  errors: dict) -> None:
        """Send one request at `due` (perf_counter; `offset` seconds into the phase); record (offset, latency from
        due, status, images, correct, operating point)."""
        try:
            async with self.session.post(self.url + work.path + work.query, data=body.content,
                                         headers=body.headers) as r:
                data = await r.read()
                status, headers = r.status, r.headers
        except Exception as err:  # noqa: BLE001 - every failure is counted, by kind
            key = type(err).__name__
            errors[key] = errors.get(key, 0) + 1
            out.append((offset, time.perf_counter() - due, None, len(body.labels), 0, None))
            return
        latency = time.perf_counter() - due
        correct, point = 0, None
        if status == 200:
            try:
                class_id, point = parse(data, headers)
                correct = int((class_id == body.labels).sum())
            except Exception as err:  # noqa: BLE001
                key = f"unparsable: {type(err).__name__}"
                errors[key] = errors.get(key, 0) + 1
        elif status == 503:  # which limit refused it
            key = "503 wait" if b"would take about" in data else "503 queue images" if b"images queued" in data \
                else f"503 other: {data[:80]!r}"
            errors[key] = errors.get(key, 0) + 1
        else:
            key = f"{status}: {data[:120]!r}"
            errors[key] = errors.get(key, 0) + 1
        out.append((offset, latency, status, len(body.labels), correct, point))

    async def phase(self, work: Workload, schedule: list[tuple[float, int]], seconds: float, parse,
                    scrape: bool = True) -> Phase:
        ph = Phase(seconds)
        ph.metrics_before = await self.metrics()
        cpu0, me0, all0 = proc_cpu(self.pid), time.process_time(), machine_cpu()
        start = time.perf_counter() + 0.05
        tasks, lags = [], []
        stop = asyncio.Event()

        async def scraper():
            while not stop.is_set():
                try:
                    point, level = current_point(await self.metrics())
                    ph.scrapes.append((time.perf_counter() - start, point, level))
                except Exception:  # noqa: BLE001 - a missed scrape is a missing sample
                    pass
                try:
                    await asyncio.wait_for(stop.wait(), SCRAPE_S)
                except asyncio.TimeoutError:
                    pass

        watcher = asyncio.ensure_future(scraper()) if scrape else None
        for t, b in schedule:
            due = start + t
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            lags.append(time.perf_counter() - due)
            tasks.append(asyncio.ensure_future(self.one(work, work.bodies[b], due, t, parse, ph.requests,
                                                      ph.errors)))
        now = time.perf_counter()
        if start + seconds > now:
            await asyncio.sleep(start + seconds - now)
        if tasks:
            await asyncio.wait(tasks)
        stop.set()
        if watcher:
            await watcher
        ph.server_cpu = proc_cpu(self.pid) - cpu0
        ph.client_cpu = time.process_time() - me0
        ph.other_cpu = max(0.0, machine_cpu() - all0 - ph.server_cpu - ph.client_cpu)
        ph.metrics_after = await self.metrics()
        ph.lag_p99_ms = 1000 * float(np.percentile(lags, 99)) if lags else 0.0
        return ph

    async def settle(self, top: str | None, limit: float = 30.0) -> float:
        """Wait until the server is idle and (adaptive) back at its top point; -> seconds waited."""
        t0 = time.perf_counter()
        await asyncio.sleep(1.0)
        while time.perf_counter() - t0 < limit:
            m = await self.metrics()
            point, level = current_point(m)
            if not level:
                break
            await asyncio.sleep(0.5)
        return time.perf_counter() - t0


# --- figures -------------------------------------------------------------------------------------------------------
def wilson_pct(k: float, n: float) -> tuple[float, float]:
    """reskd.stats.wilson in percent, z = 1.96 as these figures were always computed."""
    lo, hi = wilson(k, n, z=1.96)
    return 100 * lo, 100 * hi


def summary(ph: Phase, objective: float, window: tuple[float, float] | None = None) -> dict:
    lo, hi = window or (0.0, ph.seconds)
    reqs = [r for r in ph.requests if lo <= r[0] < hi]
    n = len(reqs)
    ok = [r for r in reqs if r[2] == 200]
    within = [r for r in ok if r[1] <= objective]
    images_ok = sum(r[3] for r in ok)
    correct_ok = sum(r[4] for r in ok)
    lat = [r[1] for r in ok]
    points: dict[str, int] = {}
    for r in ok:
        points[r[5] or "?"] = points.get(r[5] or "?", 0) + r[3]
    seconds = hi - lo
    return {
        "requests": n, "offered_per_s": n / seconds,
        "goodput": sum(r[4] for r in within) / seconds,
        "answered_images_per_s": images_ok / seconds,
        "attainment": 100 * len(within) / n if n else math.nan,
        "admitted_within": 100 * len(within) / len(ok) if ok else math.nan,
        "accuracy": 100 * correct_ok / images_ok if images_ok else math.nan,
        "accuracy_ci95": wilson_pct(correct_ok, images_ok),
        "rate_503": 100 * sum(r[2] == 503 for r in reqs) / n if n else math.nan,
        "other_failures": sum(r[2] not in (200, 503) for r in reqs),
        "p50_ms": 1000 * float(np.percentile(lat, 50)) if lat else math.nan,
        "p99_ms": 1000 * float(np.percentile(lat, 99)) if lat else math.nan,
        "images_at_point": points,
    }


def phase_figures(ph: Phase, objective: float, modes_top: str, step: tuple[float, float, float] | None) -> dict:
    out = summary(ph, objective)
    images = sum(r[3] for r in ph.requests if r[2] == 200)
    out["cpu_s_per_image"] = ph.server_cpu / images if images else math.nan
    out["server_cpu_s"], out["client_cpu_s"], out["other_cpu_s"] = ph.server_cpu, ph.client_cpu, ph.other_cpu
    out["client_lag_p99_ms"] = ph.lag_p99_ms
    out["errors"] = ph.errors
    at: dict[str, int] = {}
    for _, point, _ in ph.scrapes:
        at[point or "?"] = at.get(point or "?", 0) + 1
    k = max(1, len(ph.scrapes))
    out["time_at_point"] = {p: round(100 * c / k, 1) for p, c in sorted(at.items())}
    levels = [lv for _, _, lv in ph.scrapes if lv is not None]
    out["max_level"] = max(levels) if levels else None
    sw = {d: total(ph.metrics_after, "reskd_point_switches_total", direction=d)
          - total(ph.metrics_before, "reskd_point_switches_total", direction=d) for d in ("down", "up")}
    out["switches"] = {d: int(v) for d, v in sw.items()}
    out["load_exits"] = int(total(ph.metrics_after, "reskd_exit_reasons_total", reason="load")
                            - total(ph.metrics_before, "reskd_exit_reasons_total", reason="load"))
    if step is not None:
        a, b, c = step
        out["segments"] = {"1x": summary(ph, objective, (0, a)), "4x": summary(ph, objective, (a, a + b)),
                           "1x again": summary(ph, objective, (a + b, a + b + c))}
        before = [lv for t, _, lv in ph.scrapes if t < a and lv is not None]
        out["level_at_step_up"] = before[-1] if before else None
        down = next((t for t, _, lv in ph.scrapes if t >= a and lv and lv > (out["level_at_step_up"] or 0)), None)
        out["down_after_s"] = None if down is None else down - a  # None: no move down after the step up
        if levels and max(levels) > 0:
            back = None
            for t, _, lv in ph.scrapes:
                if t >= a + b and lv == 0:
                    back = t - (a + b)
                    break
            out["top_again_after_s"] = back  # None: not within the phase
        else:
            out["top_again_after_s"] = 0.0 if levels else None
        out["levels"] = [(round(t, 1), lv) for t, _, lv in ph.scrapes]
    return out


# --- capacity ------------------------------------------------------------------------------------------------------
async def capacity(client: Client, work: Workload, parse, objective: float, first: float, trial_s: float,
                   bisect: int, seed: int, log) -> tuple[float, list[dict]]:
    """The highest Poisson rate (requests/s) at which the shed-only server answers >= 99% of the requests within
    the objective with < 0.1% 503s."""
    trials = []

    async def passes(rate: float, draw: int = seed) -> bool:
        sched = arrivals([(trial_s, rate)], draw, len(work.bodies))
        for attempt in range(3):  # a trial other processes took CPU from is run again (a failure would be theirs)
            ph = await client.phase(work, sched, trial_s, parse, scrape=False)
            s = summary(ph, objective)
            ok = s["attainment"] >= 99.0 and s["rate_503"] < 0.1
            busy = ph.other_cpu / trial_s
            log(f"  capacity {work.name}: {rate:7.2f} req/s -> within {s['attainment']:6.2f}%, 503 "
                f"{s['rate_503']:5.2f}%, p99 {s['p99_ms']:7.1f} ms: {'pass' if ok else 'fail'}"
                + (f" (other processes used {busy:.2f} cores meanwhile)" if busy > 0.05 else ""))
            await client.settle(None)
            if ok or busy <= BUSY_TRIAL_CORES or attempt == 2:
                break
            await wait_quiet(120, log)
        trials.append({"rate": rate, "attainment": s["attainment"], "rate_503": s["rate_503"],
                       "p99_ms": s["p99_ms"], "pass": ok, "other_cores": busy})
        return ok

    good, bad = None, None
    rate = first
    if await passes(rate):
        good = rate
        while bad is None:
            rate *= 2
            if await passes(rate):
                good = rate
            else:
                bad = rate
    else:
        bad = rate
        while good is None:
            rate /= 2
            if await passes(rate):
                good = rate
            else:
                bad = rate
            if rate < 0.05:
                raise SystemExit(f"no rate passes for {work.name}: is the server working?")
    for _ in range(bisect):
        mid = (good + bad) / 2
        if await passes(mid):
            good = mid
        else:
            bad = mid
    # One pass can be luck near the edge: the capacity must pass again on another Poisson draw (5% lower until it
    # does, at most 4 times), so 1x is a load the shed-only server really carries.
    for _ in range(4):
        if await passes(good, seed + 1):
            break
        good *= 0.95
    return good, trials


# --- the run -------------------------------------------------------------------------------------------------------
def server_settings(mode: str, repo: Path, args) -> dict:
    settings = {"repo": repo, "workers": 1, "log_level": "warning",
                "degrade": "true" if mode == "adaptive" else "false",
                "max_queue_wait_ms": args.server_slo_ms, "latency_slo_ms": args.server_slo_ms,
                "degrade_hold_s": args.hold_s, "degrade_max_drop_pt": args.max_drop_pt}
    if args.max_queue_images:
        settings["max_queue_images"] = args.max_queue_images
    return settings


def workloads(mode: str, pixels, images, labels, cheapest: str, which: list[str], cache: dict) -> list[Workload]:
    point = cheapest if mode == "static" else None
    out = []
    if "v2" in which:
        key = ("v2", point)
        if key not in cache:
            cache[key] = v2_bodies(images, labels, point)
        out.append(Workload("v2", "/v2/models/fashion-mnist-fallback/infer", cache[key], V2_IMAGES))
    if "v1" in which:
        if "v1" not in cache:
            cache["v1"] = v1_bodies(pixels, labels)
        out.append(Workload("v1", "/v1/models/fashion-mnist-fallback/classify", cache["v1"], 1,
                            f"?operating_point={cheapest}" if point else ""))
    return out


PARSERS = {"v2": parse_v2, "v1": parse_v1}


async def run_mode(mode: str, repo: Path, args, works: list[Workload], caps: dict, top: str, log) -> dict:
    out = {}
    with ServerProcess(**server_settings(mode, repo, args)) as server:
        client = Client(server.url, server.proc.pid)
        try:
            for w in works:
                parse, cap = PARSERS[w.name], caps[w.name]
                phase_s, step_s = (args.phase_s, args.step_s) if w.name == "v2" else (args.v1_phase_s, args.v1_step_s)
                res = {}
                # warm-up, not measured: connections, the server's rate estimate
                await client.phase(w, arrivals([(args.warmup_s, cap)], 7, len(w.bodies)), args.warmup_s, parse,
                                   scrape=False)
                await client.settle(top)
                for k, mult in enumerate(args.loads):
                    sched = arrivals([(phase_s, mult * cap)], 100 + k, len(w.bodies))
                    ph = await client.phase(w, sched, phase_s, parse)
                    res[f"{mult:g}x"] = phase_figures(ph, args.slo_ms / 1000, top, None)
                    res[f"{mult:g}x"]["settle_s"] = await client.settle(top)
                    log(f"  {mode:8s} {w.name} {mult:g}x: " + brief(res[f"{mult:g}x"]))
                a, b, c = step_s
                sched = arrivals([(a, cap), (b, 4 * cap), (c, cap)], 200, len(w.bodies))
                ph = await client.phase(w, sched, a + b + c, parse)
                res["step"] = phase_figures(ph, args.slo_ms / 1000, top, (a, b, c))
                res["step"]["settle_s"] = await client.settle(top)
                log(f"  {mode:8s} {w.name} step: " + brief(res["step"])
                    + f", down after {fmt(res['step']['down_after_s'])} s, top again after "
                      f"{fmt(res['step']['top_again_after_s'])} s")
                out[w.name] = res
        finally:
            await client.close()
    return out


def brief(f: dict) -> str:
    return (f"goodput {f['goodput']:7.0f} img/s, within {f['attainment']:5.1f}% "
            f"(admitted {f['admitted_within']:5.1f}%), "
            f"acc {f['accuracy']:.2f}%, 503 {f['rate_503']:5.1f}%, p50/p99 {f['p50_ms']:.0f}/{f['p99_ms']:.0f} ms, "
            f"switches {f['switches']['down']}/{f['switches']['up']}, images at {f['images_at_point']}")


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.{digits}f}"


def median(values: list) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


# --- report --------------------------------------------------------------------------------------------------------
COLUMNS = [("goodput", "goodput", 0), ("answered_images_per_s", "answered/s", 0), ("attainment", "within%", 2),
           ("admitted_within", "adm.within%", 2), ("accuracy", "acc%", 2), ("rate_503", "503%", 2),
           ("p50_ms", "p50 ms", 0), ("p99_ms", "p99 ms", 0), ("cpu_s_per_image", "CPU ms/img", 3)]


def table(rounds: list[dict], work: str, phases: list[str], modes: list[str]) -> list[str]:
    lines = []
    head = (f"{'phase':<6} {'mode':<9}" + "".join(f" {h:>11}" for _, h, _ in COLUMNS)
            + "  acc 95% CI        images at each point (%)")
    lines.append(head)
    for phase in phases:
        for mode in modes:
            figs = [r[mode][work][phase] for r in rounds if mode in r and work in r[mode]]
            if not figs:
                continue
            row = f"{phase:<6} {mode:<9}"
            for key, _, d in COLUMNS:
                v = median([f[key] for f in figs])
                row += f" {fmt(v * 1000 if key == 'cpu_s_per_image' and v is not None else v, d):>11}"
            ci = (median([f["accuracy_ci95"][0] for f in figs]), median([f["accuracy_ci95"][1] for f in figs]))
            points: dict[str, list[float]] = {}
            ids = set().union(*(f["images_at_point"] for f in figs))
            for f in figs:
                answered = max(1, sum(f["images_at_point"].values()))
                for p in ids:
                    points.setdefault(p, []).append(100 * f["images_at_point"].get(p, 0) / answered)
            pts = ", ".join(f"{p} {median(v):.0f}" for p, v in sorted(points.items(), key=lambda kv: -median(kv[1]))
                            if median(v) >= 0.5)
            row += f"  [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]  {pts}"
            lines.append(row)
    return lines


def per_round(rounds: list[dict], work: str, phases: list[str], modes: list[str]) -> list[str]:
    lines = [f"{'round':<5} {'phase':<6} {'mode':<9} {'goodput':>8} {'within%':>8} {'adm.within%':>11} "
             f"{'acc%':>6} {'503%':>6} {'p50':>5} {'p99':>5} {'srv CPU s':>9} {'cli CPU s':>9} {'other CPU s':>11} "
             f"{'lag p99':>7} sw d/u"]
    for i, r in enumerate(rounds):
        for phase in phases:
            for mode in modes:
                if mode not in r or work not in r[mode]:
                    continue
                f = r[mode][work][phase]
                lines.append(f"{i + 1:<5} {phase:<6} {mode:<9} {f['goodput']:8.0f} {f['attainment']:8.2f} "
                             f"{fmt(f['admitted_within'], 2):>11} {fmt(f['accuracy'], 2):>6} {f['rate_503']:6.2f} "
                             f"{fmt(f['p50_ms'], 0):>5} {fmt(f['p99_ms'], 0):>5} {f['server_cpu_s']:9.1f} "
                             f"{f['client_cpu_s']:9.1f} {f['other_cpu_s']:11.1f} {f['client_lag_p99_ms']:7.1f} "
                             f"{f['switches']['down']}/{f['switches']['up']}"
                             + (f"  time at point % {f['time_at_point']}" if mode == "adaptive" else "")
                             + (f"  {f['errors']}" if f["errors"] else ""))
    return lines


def step_table(rounds: list[dict], work: str, modes: list[str]) -> list[str]:
    lines = [f"{'round':<5} {'mode':<9} {'within% 1x/4x/1x':>22} {'503% 1x/4x/1x':>20} {'goodput 1x/4x/1x':>20} "
             f"{'level@up':>8} {'down after s':>12} {'top again s':>11} {'switches d/u':>12}  level every 0.5 s "
             "(adaptive; 0 = top)"]
    for i, r in enumerate(rounds):
        for mode in modes:
            if mode not in r or work not in r[mode]:
                continue
            f = r[mode][work]["step"]
            seg = f["segments"]
            w = "/".join(f"{seg[k]['attainment']:.1f}" for k in ("1x", "4x", "1x again"))
            e = "/".join(f"{seg[k]['rate_503']:.1f}" for k in ("1x", "4x", "1x again"))
            g = "/".join(f"{seg[k]['goodput']:.0f}" for k in ("1x", "4x", "1x again"))
            levels = "".join(str(lv) if lv is not None else "?" for _, lv in f["levels"]) if mode == "adaptive" \
                else ""
            lines.append(f"{i + 1:<5} {mode:<9} {w:>22} {e:>20} {g:>20} {fmt(f['level_at_step_up'], 0):>8} "
                         f"{fmt(f['down_after_s']):>12} "
                         f"{fmt(f['top_again_after_s']):>11} {f['switches']['down']}/{f['switches']['up']:<10}"
                         f"  {levels}")
    return lines


def targets(rounds: list[dict], R: float, top: str, top_acc: float,
            modes: list[str]) -> list[tuple[str, str, bool | None]]:
    out = []
    need = 0.85 * min(R, 2.0)

    def have(*ms):
        return all(m in modes for m in ms) and rounds and all("v2" in r.get(m, {}) for r in rounds for m in ms)

    if have("adaptive", "shed"):
        ratios = [r["adaptive"]["v2"]["2x"]["goodput"] / r["shed"]["v2"]["2x"]["goodput"]
                  if r["shed"]["v2"]["2x"]["goodput"] > 0 else math.inf for r in rounds]
        m = median(ratios)
        out.append(("2x v2: adaptive goodput / shed-only goodput >= 0.85 x min(R, 2) = " f"{need:.2f}",
                    f"median {m:.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})", m >= need))
    if have("adaptive"):
        adm = [r["adaptive"]["v2"]["2x"]["admitted_within"] for r in rounds]
        out.append(("2x v2: >= 99% of the adaptive server's admitted requests within the objective",
                    f"median {median(adm):.2f}% (rounds {', '.join(f'{x:.2f}' for x in adm)})", median(adm) >= 99.0))
        acc = [r["adaptive"]["v2"]["2x"]["accuracy"] for r in rounds]
        drop = top_acc - median(acc)
        out.append((f"2x v2: accuracy of the answered images within 1.0 pt of the top point's ({top_acc:.2f}% in "
                    f"process on the same images)", f"median {median(acc):.2f}% ({drop:.2f} pt below; rounds "
                    f"{', '.join(f'{x:.2f}' for x in acc)})", drop <= 1.0))
        held = [r["adaptive"]["v2"]["1x"]["max_level"] == 0 and sum(r["adaptive"]["v2"]["1x"]["switches"].values()) == 0
                for r in rounds]
        out.append(("1x v2: the top point held (level 0 at every scrape, no switch)",
                    f"{sum(held)}/{len(held)} rounds", all(held)))
    if have("adaptive", "shed"):
        same_acc, same_lat, notes = [], [], []
        for r in rounds:
            a, s = r["adaptive"]["v2"]["1x"], r["shed"]["v2"]["1x"]
            # every image answered at the top point: each answer is the shed-only server's for that image
            same_acc.append(set(a["images_at_point"]) <= {top} and a["images_at_point"].get(top, 0) > 0)
            ok = all(abs(a[k] - s[k]) <= max(0.2 * s[k], 10.0) for k in ("p50_ms", "p99_ms"))
            same_lat.append(ok)
            notes.append(f"acc {a['accuracy']:.2f}/{s['accuracy']:.2f}, p50 {a['p50_ms']:.0f}/{s['p50_ms']:.0f}, "
                         f"p99 {a['p99_ms']:.0f}/{s['p99_ms']:.0f}")
        out.append(("1x v2: accuracy equal to the shed-only (top-point) server's (every image answered at the top "
                    "point, so each answer is the one the shed-only server gives)",
                    f"{sum(same_acc)}/{len(same_acc)} rounds (adaptive/shed: {'; '.join(notes)})", all(same_acc)))
        out.append(("1x v2: latency equal (p50 and p99 within 20% or 10 ms of the shed-only server's)",
                    f"{sum(same_lat)}/{len(same_lat)} rounds", all(same_lat)))
    if have("adaptive"):
        back = [r["adaptive"]["v2"]["step"]["top_again_after_s"] for r in rounds]
        ok = [b is not None and b <= 10.0 for b in back]
        out.append(("step v2: the top point again within 10 s of the step back to 1x",
                    ", ".join(f"{b:.1f} s" if b is not None else "not within the phase" for b in back), all(ok)))
        sw = [sum(r["adaptive"]["v2"]["step"]["switches"].values()) for r in rounds]
        out.append(("step v2: at most 2 switches per step", f"{', '.join(map(str, sw))}", all(s <= 2 for s in sw)))
    if have("adaptive", "shed") and all("v1" in r["adaptive"] and "v1" in r["shed"] for r in rounds):
        ratios = [r["adaptive"]["v1"]["2x"]["goodput"] / r["shed"]["v1"]["2x"]["goodput"]
                  if r["shed"]["v1"]["2x"]["goodput"] > 0 else math.inf for r in rounds]
        m = median(ratios)
        shares = []
        for r in rounds:
            at = r["adaptive"]["v1"]["2x"]["images_at_point"]
            shares.append(100 * at.get(top, 0) / max(1, sum(at.values())))
        verdict = "no gain" if m < 1.1 else "gain"
        if min(shares) >= 99.5 and m >= 1.1:
            verdict = "no gain from degrading (every image at the top point: the difference is run-to-run noise)"
        out.append(("2x v1 (HTTP-bound): gain of adaptive over shed-only goodput (reported; 'no gain' under 1.1x)",
                    f"median {m:.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)}), images at the top point "
                    f"{', '.join(f'{x:.1f}%' for x in shares)}: {verdict}", None))
    return out


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


async def main_async(args) -> dict:
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    pixels, images, labels = test_set()
    n = len(images) - len(images) % V2_IMAGES
    log(f"machine: {machine()}; {len(labels)} test images ({n} in {n // V2_IMAGES} v2 bodies)")
    ip = in_process(args.model, images[:n], labels[:n], args.max_drop_pt)
    top, cheapest, R = ip["top"], ip["cheapest"], ip["R"]
    pt, pc = ip["points"][top], ip["points"][cheapest]
    log(f"in process (batch {V2_IMAGES}, best of 5): top {top} {pt['images_per_s']:.0f} img/s, test acc "
        f"{pt['test_accuracy']:.2f}% (val {pt['val_accuracy']:.2f}%, {pt['pct_teacher_flops']:.1f}% FLOPs); cheapest "
        f"within {args.max_drop_pt} pt: {cheapest} {pc['images_per_s']:.0f} img/s, test acc {pc['test_accuracy']:.2f}% "
        f"(val {pc['val_accuracy']:.2f}%, {pc['pct_teacher_flops']:.1f}% FLOPs); R = {R:.2f}")
    name, version = pinned(args.model)
    cache: dict = {}
    result = {"machine": machine(), "code": code_fingerprint(),
              "args": {k: v for k, v in vars(args).items() if k != "json"},
              "in_process": {"top": top, "cheapest": cheapest, "R": R,
                             "points": {p: {k: v for k, v in f.items() if k != "class_id"}
                                        for p, f in ip["points"].items()}}}
    with tempfile.TemporaryDirectory(prefix="reskd-degrade-") as tmp:
        repo = Path(tmp)
        (repo / name).mkdir()
        (repo / name / str(version)).symlink_to(MODELS / name / str(version))
        # capacity, against the shed-only server, per workload
        caps, cap_trials = {}, {}
        await wait_quiet(args.quiet_wait_s, log)
        with ServerProcess(**server_settings("shed", repo, args)) as server:
            client = Client(server.url, server.proc.pid)
            try:
                for w in workloads("shed", pixels, images[:n], labels[:n], cheapest, args.workloads, cache):
                    first = args.first_rate.get(w.name) or (
                        0.5 * pt["images_per_s"] / w.images if w.name == "v2" else 50.0)
                    await client.phase(w, arrivals([(args.warmup_s, first)], 7, len(w.bodies)), args.warmup_s,
                                       PARSERS[w.name], scrape=False)
                    await client.settle(None)
                    caps[w.name], cap_trials[w.name] = await capacity(
                        client, w, PARSERS[w.name], args.slo_ms / 1000, first, args.trial_s, args.bisect, 1, log)
                    log(f"capacity {w.name}: {caps[w.name]:.2f} requests/s = {caps[w.name] * w.images:.0f} images/s")
            finally:
                await client.close()
        result["capacity"] = {w: {"requests_per_s": c, "trials": cap_trials[w]} for w, c in caps.items()}
        rounds = []
        for i in range(args.rounds):
            rnd = {}
            for mode in args.modes:
                works = workloads(mode, pixels, images[:n], labels[:n], cheapest, args.workloads, cache)
                await wait_quiet(args.quiet_wait_s, log)
                log(f"round {i + 1}/{args.rounds}, mode {mode}")
                code = code_fingerprint()
                if code.split("+")[1] != result["code"].split("+")[1]:  # a commit of the same files changes nothing
                    log(f"  the server code changed on disk since the run started: {result['code']} -> {code}")
                rnd[mode] = await run_mode(mode, repo, args, works, caps, top, log)
                rnd[mode]["code"] = code
            rounds.append(rnd)
    result["rounds"] = rounds
    result["wall_s"] = time.perf_counter() - t_start
    # the top point's accuracy in process, on the images the v2 bodies hold
    top_acc = pt["test_accuracy"]
    result["targets"] = [{"target": t, "measured": m, "pass": p}
                         for t, m, p in targets(rounds, R, top, top_acc, args.modes)]
    report(result, args, caps, ip)
    return result


def report(result: dict, args, caps: dict, ip: dict) -> None:
    rounds = result["rounds"]
    top, cheapest = ip["top"], ip["cheapest"]
    print()
    print(f"machine: {result['machine']}; model {args.model}; objective {args.slo_ms:g} ms end to end; server "
          f"RESKD_MAX_QUEUE_WAIT_MS = RESKD_LATENCY_SLO_MS = {args.server_slo_ms:g}, RESKD_DEGRADE_HOLD_S "
          f"{args.hold_s:g}, RESKD_DEGRADE_MAX_DROP_PT {args.max_drop_pt:g}, RESKD_WORKERS 1")
    print(f"R = {ip['R']:.2f} (in process, batch {V2_IMAGES}, best of 5: {top} "
          f"{ip['points'][top]['images_per_s']:.0f} img/s, "
          f"{cheapest} {ip['points'][cheapest]['images_per_s']:.0f} img/s); test accuracy {top} "
          f"{ip['points'][top]['test_accuracy']:.2f}%, {cheapest} {ip['points'][cheapest]['test_accuracy']:.2f}%")
    for w, c in caps.items():
        imgs = V2_IMAGES if w == "v2" else 1
        print(f"capacity {w}: {c:.2f} requests/s ({c * imgs:.0f} images/s) against the shed-only server")
    print(f"{len(rounds)} round(s); phases {args.phase_s:g} s (v1 {args.v1_phase_s:g} s); step "
          f"{'+'.join(f'{s:g}' for s in args.step_s)} s (v1 {'+'.join(f'{s:g}' for s in args.v1_step_s)} s); "
          f"wall {result['wall_s'] / 60:.1f} min")
    codes = {r[m]["code"].split("+")[1] for r in rounds for m in r}
    print(f"server code (commit + hash of service/ and reskd/ on disk): at the start {result['code']}; "
          + "; ".join(f"round {i + 1}: " + ", ".join(f"{m} {r[m]['code']}" for m in r) for i, r in enumerate(rounds)))
    if len(codes | {result["code"].split("+")[1]}) > 1:
        print("WARNING: the server code changed on disk during the run: rounds and modes above ran different code")
    phases = [f"{m:g}x" for m in args.loads] + ["step"]
    for w in args.workloads:
        desc = "256 FP32 images a request, model-bound" if w == "v2" else "one PNG a request, HTTP-bound"
        print(f"\n== {w} ({desc}): medians over rounds (goodput and answered in images/s; CPU ms/img: server CPU "
              "per image answered)")
        for line in table(rounds, w, phases, args.modes):
            print(line)
        print(f"\n-- {w}: each round (CPU s: server, this client, other processes during the phase; lag p99: how late "
              "the client sent, ms)")
        for line in per_round(rounds, w, phases, args.modes):
            print(line)
        print(f"\n-- {w}: the step 1x -> 4x -> 1x")
        for line in step_table(rounds, w, args.modes):
            print(line)
    print("\n== targets")
    for t in result["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "info"}[t["pass"]]
        print(f"{verdict:<4}  {t['target']}: {t['measured']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fashion-mnist-fallback:1", help="NAME:VERSION (with stored operating points)")
    p.add_argument("--slo-ms", type=float, default=500, help="the objective, end to end per request (scored)")
    p.add_argument("--server-slo-ms", type=float, help="RESKD_MAX_QUEUE_WAIT_MS and RESKD_LATENCY_SLO_MS of every "
                   "server (default: 0.8 x --slo-ms, leaving a request admitted at the limit room for its own work)")
    p.add_argument("--max-queue-images", type=int, default=8192, help="RESKD_MAX_QUEUE_IMAGES of every server (0: "
                   "the server's default, 1024, which refuses 256-image requests on queue size, ~130 ms of work here, "
                   "before the wait-based limits act)")
    p.add_argument("--hold-s", type=float, default=5, help="RESKD_DEGRADE_HOLD_S")
    p.add_argument("--max-drop-pt", type=float, default=1.0, help="RESKD_DEGRADE_MAX_DROP_PT (and the static point)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    p.add_argument("--workloads", default="v2,v1", help="comma-separated: v2 (model-bound), v1 (HTTP-bound)")
    p.add_argument("--loads", default="1,2,4", help="offered loads, multiples of the capacity")
    p.add_argument("--phase-s", type=float, default=10, help="seconds of each constant-rate phase (v2)")
    p.add_argument("--step-s", default="10,10,15", help="seconds of the step's 1x, 4x and 1x again (v2)")
    p.add_argument("--v1-phase-s", type=float, default=8, help="seconds of each constant-rate phase (v1)")
    p.add_argument("--v1-step-s", default="8,8,12", help="seconds of the step's 1x, 4x and 1x again (v1)")
    p.add_argument("--warmup-s", type=float, default=3, help="unmeasured seconds at 1x on each fresh server")
    p.add_argument("--trial-s", type=float, default=10, help="seconds of each capacity trial")
    p.add_argument("--bisect", type=int, default=3, help="bisection steps of the capacity search")
    p.add_argument("--first-rate", default="", help="first capacity trial, e.g. v2=20,v1=100 (requests/s)")
    p.add_argument("--quiet-wait-s", type=float, default=120, help="before the capacity search and each mode, wait "
                   "at most this long for other processes to leave the cores idle")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 6 s phases (v1 5 s), 5+5+12 s step (v1 "
                   "4+4+8 s), 5 s capacity trials")
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.phase_s, args.step_s, args.trial_s, args.bisect = 1, 6, "5,5,12", 5, 2
        args.v1_phase_s, args.v1_step_s = 5, "4,4,8"
    args.server_slo_ms = args.server_slo_ms or 0.8 * args.slo_ms
    args.modes = [m for m in args.modes.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.loads = [float(x) for x in args.loads.split(",")]
    args.step_s = tuple(float(x) for x in str(args.step_s).split(","))
    args.v1_step_s = tuple(float(x) for x in str(args.v1_step_s).split(","))
    args.first_rate = {k: float(v) for k, v in (kv.split("=") for kv in args.first_rate.split(",") if kv)}
    if bad := set(args.modes) - set(MODES):
        p.error(f"unknown mode(s) {bad}")
    if bad := set(args.workloads) - set(PARSERS):
        p.error(f"unknown workload(s) {bad}")
    if 2.0 not in args.loads or 1.0 not in args.loads:
        p.error("--loads must hold 1 and 2 (the targets are read there)")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(jsonable(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
