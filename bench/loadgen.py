"""A closed-loop HTTP load generator for machines without wrk: `concurrency` connections spread over worker
processes (one GIL each), each sending the same request back to back for `duration` seconds. Prints nothing;
`run_load` returns requests/s, images/s, latency percentiles and the count of each non-200 status. wrk (bench/wrk/)
is preferred where installed."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections import Counter

import httpx
import numpy as np


def _worker(url: str, content: bytes, headers: dict, threads: int, duration: float, out) -> None:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def loop():
        mine, bad = [], Counter()
        with httpx.Client(timeout=60) as client:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                r = client.post(url, content=content, headers=headers)
                if r.status_code == 200:
                    mine.append(time.perf_counter() - start)
                else:
                    bad[str(r.status_code)] += 1
        with lock:
            latencies.extend(mine)
            errors.update(bad)

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((latencies, errors))


def run_load(url: str, content: bytes, headers: dict, *, concurrency: int, duration: float, images: int,
             processes: int = 8) -> dict:
    processes = max(1, min(processes, concurrency))
    per = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, content, headers, n, duration, out)) for n in per]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - start
    lat = np.array([x for r in results for x in r[0]])
    statuses = sum((bad for _, bad in results), Counter())
    # Spawning takes a moment: rates use the loop's own duration, not the wall time with start-up.
    return {"requests_per_s": len(lat) / duration, "images_per_s": len(lat) * images / duration,
            "p50_ms": float(np.percentile(lat, 50) * 1000) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99) * 1000) if len(lat) else None,
            "errors": sum(statuses.values()), "error_statuses": dict(sorted(statuses.items())),
            "requests": int(len(lat)), "wall_s": wall}
