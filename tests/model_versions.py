"""Model versions and live traffic for model-control tests and benchmarks: versions written into a repository the
way a rollout should (files first, the manifest last), each behaving distinctly, and clients classifying in a loop
that record every answer."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from server_process import MODELS

NAME = "fashion-mnist"
CLASSIFY = f"/v1/models/{NAME}/classify"
SOURCE = MODELS / NAME / "1"


def noise_pngs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


IMAGES = noise_pngs(8)


def write_version(repo: Path, version: int, *, prefix: str, thresholds: float | None,
                  break_it: str | None = None) -> Path:
    """REPO/fashion-mnist/VERSION from the bundled version 1: labels prefixed with `prefix`, every threshold set to
    `thresholds` (0: every image exits at stage 0; 1: practically every image runs every stage). The files go
    first and the manifest last (renamed into place), as a rollout should. break_it: "sha256" (a wrong hash),
    "truncated" (half the student's ONNX, with its real hash), "manifest" (a required field missing)."""
    folder = repo / NAME / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((SOURCE / "manifest.json").read_text())
    for stage in manifest["stages"]:
        shutil.copyfile(SOURCE / stage["file"], folder / stage["file"])
    manifest["version"] = version
    manifest["labels"] = [f"{prefix}{label}" for label in manifest["labels"]]
    if thresholds is not None:  # None: the calibrated ones
        manifest["exit"]["thresholds"] = [thresholds] * len(manifest["exit"]["thresholds"])
    if break_it == "sha256":
        manifest["stages"][1]["sha256"] = "0" * 64
    elif break_it == "truncated":
        student = folder / manifest["stages"][0]["file"]
        data = student.read_bytes()
        student.write_bytes(data[: len(data) // 2])
        manifest["stages"][0]["sha256"] = hashlib.sha256(data[: len(data) // 2]).hexdigest()
    elif break_it == "manifest":
        del manifest["teacher"]
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / "manifest.json")
    return folder


class Traffic:
    """Clients classifying IMAGES in a loop, each in its own thread, until stopped: every request and what it got,
    in each client's order."""

    def __init__(self, url: str, clients: int = 3, headers: dict | None = None, images: list[bytes] = IMAGES):
        self.url, self.headers, self.images = url, headers or {}, images
        self.results: list[list[tuple[int, dict]]] = [[] for _ in range(clients)]
        self.timings: list[list[tuple[float, float]]] = [[] for _ in range(clients)]  # (sent at, seconds)
        self.errors: list[BaseException] = []
        self.sent = [0] * clients
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        files = [("file", (f"{k}.png", b, "image/png")) for k, b in enumerate(self.images)]
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
            while not self._stop.is_set():
                self.sent[i] += 1
                start = time.perf_counter()
                try:
                    r = client.post(CLASSIFY, files=files)
                except BaseException as err:  # a request without an answer: the test fails on it
                    self.errors.append(err)
                    continue
                self.timings[i].append((start, time.perf_counter() - start))
                self.results[i].append((r.status_code, r.json()))

    def count(self) -> int:
        return sum(map(len, self.results))

    def wait_for(self, predicate, timeout: float = 30) -> None:
        """Until some response satisfies predicate(status, body)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(*r) for rs in self.results for r in list(rs)):
                return
            time.sleep(0.05)
        raise AssertionError(f"no such response within {timeout} s; last: {self.results[0][-1:]}")

    def wait_count(self, n: int, timeout: float = 30) -> None:
        """Until at least n requests were answered (or timeout: the caller's check then says how many)."""
        deadline = time.monotonic() + timeout
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> list[tuple[int, dict]]:
        self._stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, f"requests without an answer: {self.errors[:3]}"
        assert sum(self.sent) == self.count(), "a request was answered more or less than once"
        return [r for rs in self.results for r in rs]


