"""The shadow audit and the drift signal, measured through a real `reskd serve` on loopback (issue targets in
docs/serving.md, "Monitoring"). Two parts:

signals: a server with RESKD_AUDIT_FRACTION=1 (every answer given before the last stage is audited; the compute cap
  raised so none is dropped) gets the real Fashion-MNIST test images, then each shifted set of bench/shifted.py,
  as v2 binary requests of 100 images, version by version. From the metrics' increases per set: the agreement with
  the audit model (Wilson 95% interval) against the validation reference the manifest stores for the same answers
  (reskd_audit_expected_agreements_total), and the share of images whose stage-0 energy is above the validation
  99th percentile (with its interval) against the in-distribution share. The served answers' accuracy against the
  true labels (where a set has them) says what the audit is standing in for.
cost: the same server settings with the audit off (RESKD_AUDIT_FRACTION=0) and at the default fraction, in
  alternating rounds of the same run: closed-loop capacity (v2 binary 256-image requests, bench/loadgen.py) and,
  at half that capacity, open-loop Poisson arrivals of 64-image requests: p50/p99 latency and the audits done.

Prints tables and writes --out JSON. Pause any background training first (kill -STOP): it competes for the cores.

  .venv/bin/python bench/audit.py --part signals --out docs/benchmarks/audit-signals.json
  .venv/bin/python bench/audit.py --part cost --rounds 3 --out docs/benchmarks/audit-cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FASHION_MNIST, MODELS, idx, machine  # noqa: E402
from loadgen import run_load  # noqa: E402
from shifted import SETS, shifted  # noqa: E402

from reskd.manifest import ModelRepository  # noqa: E402
from reskd.preprocess import normalise  # noqa: E402
from reskd.stats import wilson  # noqa: E402

VERSIONS = ("fashion-mnist:2", "fashion-mnist-fallback:1")
TEACHERS = ("fashion-mnist-teacher:2",)
PER_REQUEST = 100


# --- a server --------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, repo: Path, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESKD_")}
        env.update({f"RESKD_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "reskd.cli", "serve", "--repo", str(repo), "--port",
                                      str(self.port), "--device", "cpu", "--workers", "1"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.2)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self.log.name)


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def make_repo(folder: Path) -> Path:
    for ref in (*VERSIONS, *TEACHERS):
        name, version = ref.split(":")
        (folder / name).mkdir(exist_ok=True)
        (folder / name / version).symlink_to(MODELS / name / version)
    return folder


# --- bodies ----------------------------------------------------------------------------------------------------------
def v2_body(images: np.ndarray) -> tuple[bytes, dict]:
    """A Triton binary-tensor request of normalised images asking for class_id and exit_stage as binary outputs."""
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                     "parameters": {"binary_data_size": images.nbytes}}],
                         "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                     for n in ("class_id", "exit_stage")]}).encode()
    return header + np.ascontiguousarray(images, np.float32).tobytes(), {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def parse(r: httpx.Response) -> dict[str, np.ndarray]:
    n = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:n])
    out, offset = {}, n
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(r.content[offset:offset + size], np.int64 if o["datatype"] == "INT64"
                                       else np.int32)
        offset += size
    return out


def wilson_pct(k: float, n: float) -> tuple[float, float]:
    """reskd.stats.wilson in percent, z = 1.96 as these figures were always computed."""
    lo, hi = wilson(k, n, z=1.96)
    return 100 * lo, 100 * hi


# --- signals ---------------------------------------------------------------------------------------------------------
def settle(server: Server, name: str, want: float, limit: float = 600) -> dict:
    """Scrape until the audit has accounted for `want` audits of `name` (audited or dropped)."""
    deadline = time.monotonic() + limit
    while True:
        m = server.metrics()
        done = total(m, "reskd_audit_images_total", model=name) + total(m, "reskd_audit_dropped_total", model=name)
        if done >= want or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def signals(args, sets: dict[str, tuple[np.ndarray, np.ndarray | None]], spec) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(make_repo(Path(tmp)), audit_fraction=1, audit_max_compute_pct=10000, degrade="false")
        try:
            with httpx.Client(timeout=120) as client:
                for ref in VERSIONS:
                    name, version = ref.split(":")
                    last = len(ModelRepository(MODELS).load(name, int(version))[1].stages) - 1
                    lbl = {"model": name, "version": version}
                    for set_name, (pixels, labels) in sets.items():
                        before = server.metrics()
                        images = normalise(pixels[:, None], spec).astype(np.float32)
                        t0 = time.perf_counter()
                        classes, stages = [], []
                        accounted = total(before, "reskd_audit_images_total", **lbl) + \
                            total(before, "reskd_audit_dropped_total", **lbl)
                        for s in range(0, len(images), PER_REQUEST):
                            body, headers = v2_body(images[s:s + PER_REQUEST])
                            r = client.post(f"{server.url}/v2/models/{name}/versions/{version}/infer", content=body,
                                            headers=headers)
                            r.raise_for_status()
                            got = parse(r)
                            classes.append(got["class_id"])
                            stages.append(got["exit_stage"])
                            # the audit runs on spare capacity only: the next request waits for this one's
                            accounted += int((got["exit_stage"] < last).sum())
                            after = settle(server, name, accounted)
                        classes, stages = np.concatenate(classes), np.concatenate(stages)
                        early = int((stages < last).sum())
                        d = {k: total(after, k, **lbl) - total(before, k, **lbl) for k in (
                            "reskd_audit_images_total", "reskd_audit_agreements_total",
                            "reskd_audit_expected_agreements_total", "reskd_audit_dropped_total",
                            "reskd_ood_images_total", "reskd_images_total")}
                        n, k = d["reskd_audit_images_total"], d["reskd_audit_agreements_total"]
                        images_n, ood = d["reskd_images_total"], d["reskd_ood_images_total"]
                        row = {
                            "images": int(images_n), "early": early, "audited": int(n),
                            "dropped": int(d["reskd_audit_dropped_total"]),
                            "agreement_pct": 100 * k / n if n else None, "agreement_ci95": wilson_pct(k, n),
                            "reference_pct": 100 * d["reskd_audit_expected_agreements_total"] / n if n else None,
                            "ood_pct": 100 * ood / images_n, "ood_ci95": wilson_pct(ood, images_n),
                            "exit0_pct": 100 * float((stages == 0).mean()),
                            "accuracy_pct": 100 * float((classes == labels).mean()) if labels is not None else None,
                            "seconds": time.perf_counter() - t0}
                        row["gap_pt"] = row["agreement_pct"] - row["reference_pct"] if n else None
                        out.setdefault(ref, {})[set_name] = row
                        print(f"{ref:<26} {set_name:<9} {brief(row)}", flush=True)
        finally:
            server.stop()
    for ref, rows in out.items():  # the targets
        base = rows["test"]
        for set_name, row in rows.items():
            row["ood_ratio"] = row["ood_pct"] / base["ood_pct"] if base["ood_pct"] else None
            if set_name == "test":
                row["target"] = row["audited"] >= 2000 and abs(row["gap_pt"]) <= 1.0
            else:
                row["target"] = (row["gap_pt"] is not None and row["gap_pt"] <= -5.0
                                 and row["ood_ratio"] is not None and row["ood_ratio"] >= 5.0)
    return out


def brief(row: dict) -> str:
    lo, hi = row["agreement_ci95"]
    olo, ohi = row["ood_ci95"]
    acc = f"{row['accuracy_pct']:.1f}%" if row["accuracy_pct"] is not None else "-"
    return (f"audited {row['audited']:>5} agreement {row['agreement_pct']:6.2f}% [{lo:.2f}, {hi:.2f}] reference "
            f"{row['reference_pct']:6.2f}% gap {row['gap_pt']:+6.2f} pt | OOD {row['ood_pct']:5.2f}% [{olo:.2f}, "
            f"{ohi:.2f}] | exit0 {row['exit0_pct']:.0f}% accuracy {acc}")


# --- cost ------------------------------------------------------------------------------------------------------------
async def open_loop(url: str, bodies: list[tuple[bytes, dict]], rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals of the bodies in turn at `rate` requests/s for `seconds`: latency percentiles and errors."""
    import aiohttp

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, int(rate * seconds * 1.5) + 10)
    due = np.cumsum(gaps)
    due = due[due < seconds]
    latencies, errors = [], {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        start = time.perf_counter()

        async def one(i: int, at: float):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            body, headers = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1

        await asyncio.gather(*(one(i, at) for i, at in enumerate(due)))
    lat = np.asarray(latencies)
    return {"requests": len(due), "answered": len(lat), "errors": errors,
            "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000)}


def cost(args, images: np.ndarray) -> dict:
    ref = args.cost_version
    name, version = ref.split(":")
    url_path = f"/v2/models/{name}/versions/{version}/infer"
    big = [v2_body(images[s:s + 256]) for s in range(0, 2048, 256)]
    small = [v2_body(images[s:s + 64]) for s in range(0, 4096, 64)]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp))
        for r in range(args.rounds):
            for mode, fraction in (("off", 0.0), ("default", None)) if r % 2 == 0 else \
                    (("default", None), ("off", 0.0)):
                settings = {"degrade": "false"}
                if fraction is not None:
                    settings["audit_fraction"] = fraction
                server = Server(repo, **settings)
                try:
                    closed = run_load(server.url + url_path, big[0][0], big[0][1], concurrency=args.concurrency,
                                      duration=args.seconds, images=256, processes=2)
                    before = server.metrics()
                    rate = args.open_share * closed["requests_per_s"] * 256 / 64
                    opened = asyncio.run(open_loop(server.url + url_path, small, rate, args.seconds, seed=r))
                    time.sleep(1.0)
                    after = server.metrics()
                    lbl = {"model": name, "version": version}
                    audited = {k: total(after, k, **lbl) for k in ("reskd_audit_images_total",
                                                                    "reskd_audit_dropped_total")}
                    dropped = {reason: total(after, "reskd_audit_dropped_total", reason=reason, **lbl)
                               - total(before, "reskd_audit_dropped_total", reason=reason, **lbl)
                               for reason in ("budget", "busy", "unloaded", "no_reference", "failed")}
                    row = {"round": r, "mode": mode, "closed_images_per_s": closed["images_per_s"],
                           "closed_p99_ms": closed["p99_ms"], "closed_errors": closed["errors"],
                           "open_rate_rps": rate, **{f"open_{k}": v for k, v in opened.items()},
                           "audited_total": audited["reskd_audit_images_total"],
                           "audited_open": total(after, "reskd_audit_images_total", **lbl)
                           - total(before, "reskd_audit_images_total", **lbl),
                           "dropped_open": dropped,
                           "images_open": total(after, "reskd_images_total", **lbl)
                           - total(before, "reskd_images_total", **lbl)}
                finally:
                    server.stop()
                rounds.append(row)
                print(f"round {r} {mode:<8} closed {row['closed_images_per_s']:7.0f} images/s p99 "
                      f"{row['closed_p99_ms']:6.1f} ms | open {rate:5.1f} req/s p50 {row['open_p50_ms']:6.1f} p99 "
                      f"{row['open_p99_ms']:6.1f} ms errors {row['open_errors']} | audited {row['audited_open']:.0f} "
                      f"of {row['images_open']:.0f} images, dropped {dropped}", flush=True)
    med = {mode: {k: float(np.median([r[k] for r in rounds if r["mode"] == mode]))
                  for k in ("closed_images_per_s", "closed_p99_ms", "open_p50_ms", "open_p99_ms", "audited_open")}
           for mode in ("off", "default")}
    change = {"throughput_pct": 100 * (med["default"]["closed_images_per_s"] / med["off"]["closed_images_per_s"] - 1),
              "closed_p99_pct": 100 * (med["default"]["closed_p99_ms"] / med["off"]["closed_p99_ms"] - 1),
              "open_p99_pct": 100 * (med["default"]["open_p99_ms"] / med["off"]["open_p99_ms"] - 1)}
    print(f"medians: {json.dumps(med)}\nchange with the audit at the default fraction: {json.dumps(change)}")
    return {"version": ref, "rounds": rounds, "median": med, "change": change,
            "target": change["throughput_pct"] >= -2.0 and abs(change["open_p99_pct"]) <= 5.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("signals", "cost", "both"), default="both")
    p.add_argument("--images", type=int, default=3000, help="images of each shifted set (the test set: all 10,000)")
    p.add_argument("--rounds", type=int, default=3, help="cost: rounds of each mode, alternating")
    p.add_argument("--seconds", type=float, default=20.0, help="cost: seconds of each load")
    p.add_argument("--concurrency", type=int, default=4, help="cost: closed-loop connections")
    p.add_argument("--open-share", type=float, default=0.5, help="cost: open-loop rate as a share of the capacity")
    p.add_argument("--cost-version", default="fashion-mnist:2")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    pixels = idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    spec = ModelRepository(MODELS).load("fashion-mnist")[1].input
    result = {"machine": machine(), "command": " ".join(sys.argv), "python": sys.version.split()[0]}
    if args.part in ("signals", "both"):
        n = args.images
        sets = {"test": (pixels, labels)}
        for name in SETS:
            sets[name] = (shifted(name, pixels[:n], seed=1), None if name == "digits" else labels[:n])
        result["signals"] = signals(args, sets, spec)
    if args.part in ("cost", "both"):
        result["cost"] = cost(args, normalise(pixels[:, None], spec).astype(np.float32))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
