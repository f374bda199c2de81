"""Rolling versions out under live traffic: what a rollout costs the requests around it.

    python bench/model_rollout.py [--clients 4] [--steady 5] [--poll 1.0] [--images 8]

A real `reskd serve` with RESKD_MODEL_CONTROL=poll on a repository holding fashion-mnist version 1 (the bundled
one), and clients classifying real Fashion-MNIST test images in a loop (multipart PNGs). Events, each after
`--steady` seconds of traffic: version 2 appears (a copy with its own labels), version 2 changes in place, version
2's folder is removed (roll back). Printed: every request's status (all must be 200), how long each new version
took to load (verification, sessions, warm-up, output check: the server's log), how long after each event the
clients saw the change, and the request latency in the second after each event against the steady state.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, machine, test_set

sys.path.insert(0, str(ROOT / "tests"))
from model_versions import Traffic, write_version  # noqa: E402
from server_process import ServerProcess  # noqa: E402


def pngs(n: int) -> list[bytes]:
    pixels = test_set()[0][:n]
    out = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def latencies(traffic: Traffic, start: float, end: float) -> np.ndarray:
    return np.array([s for client in traffic.timings for t, s in client if start <= t < end]) * 1000


def describe(ms: np.ndarray) -> str:
    if not len(ms):
        return "no requests"
    return f"{len(ms)} requests, p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms, " \
           f"max {ms.max():.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady", type=float, default=5.0, help="seconds of traffic before each event")
    ap.add_argument("--poll", type=float, default=1.0, help="RESKD_REPOSITORY_POLL_S")
    ap.add_argument("--images", type=int, default=8, help="images per request")
    args = ap.parse_args()
    print(machine())
    repo = Path(tempfile.mkdtemp(prefix="reskd-rollout-"))
    write_version(repo, 1, prefix="", thresholds=None)
    try:
        with ServerProcess(repo=repo, model_control="poll", repository_poll_s=args.poll) as server:
            traffic = Traffic(server.url, clients=args.clients, images=pngs(args.images))
            events = []

            def event(what: str, change, prefix: str | None) -> None:
                time.sleep(args.steady)
                at = time.perf_counter()
                change()
                deadline = time.monotonic() + 60
                while True:  # until a request sent after the change got the new behaviour
                    seen = [(t, b) for client, times in zip(traffic.results, traffic.timings)
                            for (status, b), (t, _) in zip(client, times) if t >= at and status == 200]
                    if prefix is None and any(b["version"] == 1 for t, b in seen) or prefix is not None and any(
                            b["predictions"][0]["label"].startswith(prefix) for t, b in seen):
                        break
                    assert time.monotonic() < deadline, f"{what}: not seen after 60 s"
                    time.sleep(0.01)
                events.append((what, at, time.perf_counter() - at))

            event("version 2 appears", lambda: write_version(repo, 2, prefix="v2:", thresholds=None), "v2:")
            event("version 2 changes in place", lambda: write_version(repo, 2, prefix="v2b:", thresholds=None),
                  "v2b:")
            event("version 2 removed (roll back)", lambda: shutil.rmtree(repo / "fashion-mnist" / "2"), None)
            time.sleep(args.steady)
            responses = traffic.stop()
            log = server.output()
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    statuses = sorted({s for s, _ in responses})
    answered = sorted({(b["version"], b["predictions"][0]["label"].partition(":")[0] if ":" in
                        b["predictions"][0]["label"] else "bundled labels") for _, b in responses})
    print(f"{len(responses)} requests of {args.images} images from {args.clients} clients, statuses {statuses}, "
          f"answered by (version, labels) {answered}")
    loads = re.findall(r"fashion-mnist version (\d+) verified and warmed in ([0-9.]+) s", log)
    print("loads (verify + sessions + warm-up + output check):", ", ".join(f"version {v}: {s} s" for v, s in loads))
    first = min(t for client in traffic.timings for t, _ in client)
    print(f"steady (first {args.steady:g} s): {describe(latencies(traffic, first + 1, events[0][1]))}")
    for what, at, seen_after in events:
        print(f"{what}: clients saw it {seen_after:.2f} s later (poll every {args.poll:g} s); the second after the "
              f"scan picked it up: {describe(latencies(traffic, at + seen_after - 0.5, at + seen_after + 0.5))}")
    assert statuses == [200], "a request failed during a rollout"


if __name__ == "__main__":
    main()
