"""The GPU measurement, in one call of a few minutes (`make device-run` on a GPU host; docs/device.md):

    python bench/device_run.py --out device-run.json [--device cuda] [--duration 3] [--tiny]

1. In process, per model version (every bundled version of fashion-mnist, fashion-mnist-teacher and
   fashion-mnist-independent: stage inputs and both cascade kinds; the newest of each, which the targets name,
   first, the older ones after step 2, so a run cut off keeps the targets' figures) and per engine (bound
   with CUDA graphs, bound without, host): the 10k Fashion-MNIST test images through CascadeRuntime.run at batch
   256 (accuracy, mean FLOPs, exits: the same on every engine), then images/s at batch 1, 32 and 256 and
   single-image latency p50/p99.
2. Served (`reskd serve` on loopback, default settings but the scheduler): per scheduler (auto, stage, request,
   and auto with CUDA graphs off), and auto with two worker processes on the GPU, for the cascade, the teacher and
   a no-op model (one tiny stage: the HTTP ceiling, served the same way): single images at concurrency 1
   (p50/p99), 256-image v2 binary requests at concurrency 8, 32-image PNG multipart requests at concurrency 16;
   the server's own per-stage counters.
Every figure is written to --out as soon as it is measured, so a cut-off run keeps what it finished. --tiny: a
rehearsal of every step in seconds (the test suite runs it on CPU); --device cpu measures the CPU the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from reskd.files import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import test_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CASCADE, TEACHER, NOOP = "fashion-mnist", "fashion-mnist-teacher", "noop"
INDEPENDENT = "fashion-mnist-independent"


class Results:
    """Everything measured, rewritten to `path` after each figure."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def put(self, keys: list[str], value) -> None:
        node = self.data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        print(json.dumps({"/".join(keys): value}), flush=True)
        write_atomic(self.path, json.dumps(self.data, indent=1))

    def attempt(self, keys: list[str], fn) -> None:
        """Run one measurement; a failure is recorded under its key and the next measurement goes on."""
        try:
            self.put(keys, fn())
        except Exception as err:  # noqa: BLE001 - the rest of the run must go on
            self.put(keys, {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]})


def versions() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(first, later): first the versions the targets name (the newest of the cascade, the teacher and the
    independent-models cascade: what the server serves by default), measured before the served part; later every
    older bundled version, after it, so a run cut off by the device's time limit has the targets' figures."""
    from reskd.manifest import ModelRepository

    repo = ModelRepository(MODELS)
    first = [(name, max(repo.versions(name))) for name in (CASCADE, TEACHER, INDEPENDENT)]
    later = [(name, v) for name in (CASCADE, TEACHER, INDEPENDENT) for v in repo.versions(name)
             if (name, v) not in first]
    return first, later


def engines(device: str) -> dict:
    from reskd.engine import EngineSpec

    if device == "cuda":
        return {"bound+graphs": EngineSpec("bound", graphs=True), "bound": EngineSpec("bound", graphs=False),
                "host": EngineSpec("host")}
    return {"host": EngineSpec("host"), "bound": EngineSpec("bound")}


def rate(fn, seconds: float) -> tuple[float, list[float]]:
    """Calls per second of fn over about `seconds`, and each call's latency."""
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return len(times) / (time.perf_counter() - start), times


def in_process(device, name: str, version: int, spec, images, labels, seconds: float) -> dict:
    from reskd.runtime import CascadeRuntime

    rt = CascadeRuntime(MODELS / name / str(version), device=device, engine=spec)
    start = time.perf_counter()
    rt.engine.warm_up([1, 32, 256])
    out = {"warm_up_s": round(time.perf_counter() - start, 2), "on_cuda": rt.on_cuda}
    results = [rt.run(images[i:i + 256]) for i in range(0, len(images), 256)]
    classes = np.concatenate([r.class_id for r in results])
    exits = np.concatenate([r.exit_stage for r in results])
    flops = np.concatenate([r.flops for r in results])
    out.update(accuracy=float((classes == labels).mean()), images=len(labels),
               pct_teacher_flops=round(100 * float(flops.mean()) / rt.manifest.teacher.flops, 3),
               exits=np.bincount(exits, minlength=rt.num_stages).tolist())
    for batch in (1, 32, 256):
        x = images[:batch]
        calls, times = rate(lambda: rt.run(x), seconds)
        out[f"b{batch}_images_per_s"] = round(calls * batch, 1)
        if batch == 1:
            out["b1_p50_ms"] = round(1000 * float(np.percentile(times, 50)), 3)
            out["b1_p99_ms"] = round(1000 * float(np.percentile(times, 99)), 3)
    return out


def noop_model(repo: Path) -> None:
    """A one-stage model that reads the image and does almost nothing with it (a mean and a 1x10 product): what
    serving costs when the model costs nothing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from reskd.manifest import ExitSpec, Manifest, StageSpec, TeacherSpec, load_manifest, sha256_file, write_manifest

    base = load_manifest(MODELS / TEACHER / "1")
    c, h, w = base.input.channels, base.input.height, base.input.width
    weight = numpy_helper.from_array(np.linspace(-1, 1, len(base.labels), dtype=np.float32)[None], "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Unsqueeze", ["m", "one"], ["m2"]),
         helper.make_node("MatMul", ["m2", "w"], ["logits"])],
        "noop", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(base.labels)])],
        [weight, numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = repo / NOOP / "1"
    folder.mkdir(parents=True)
    onnx.save(model, folder / "stage0-noop.onnx")
    write_manifest(folder, Manifest(
        name=NOOP, version=1, labels=base.labels, input=base.input,
        stages=[StageSpec(name="noop", file="stage0-noop.onnx", sha256=sha256_file(folder / "stage0-noop.onnx"),
                          flops=c * h * w + len(base.labels))],
        teacher=TeacherSpec(flops=base.teacher.flops, accuracy=None), exit=ExitSpec(measure="max_prob", thresholds=[])))


def served(results: Results, key: list[str], device: str, repo: Path, settings: dict, pixels, images,
           duration: float, tiny: bool) -> None:
    from gpu_check import Server, compute_counters, multipart, png, v2_binary
    from loadgen import run_load

    server = Server(device, repo=repo, log_level="warning", **settings)
    try:
        results.put([*key, "ready_s"], round(server.ready_s, 1))
        blobs = [png(p) for p in pixels[:32]]
        thirty_two, thirty_two_h = multipart(blobs)
        v2_body, v2_h = v2_binary(images[:256])
        loads = [("single c1", "classify", blobs[0], {"content-type": "image/png"}, 1, 1),
                 ("v2 256-image binary c8", "infer", v2_body, v2_h, 8, 256),
                 ("32-image c16", "classify", thirty_two, thirty_two_h, 16, 32)]
        if tiny:
            loads = loads[:2]
        for model in (CASCADE, TEACHER, NOOP):
            for label, kind, body, headers, concurrency, n in loads:
                path = f"/v1/models/{model}/classify" if kind == "classify" else f"/v2/models/{model}/infer"
                results.attempt([*key, model, label], lambda: run_load(
                    server.url + path, body, headers, concurrency=concurrency, duration=duration, images=n,
                    processes=min(8, concurrency)))
        results.attempt([*key, "metrics"], lambda: compute_counters(server.url))
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per served load")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per in-process rate")
    ap.add_argument("--tiny", action="store_true", help="a rehearsal of every step in seconds")
    args = ap.parse_args()
    if args.tiny:
        args.duration, args.seconds = 0.5, 0.1

    import onnxruntime as ort

    from reskd.device import Device

    results = Results(args.out)
    start = time.perf_counter()
    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30).stdout.strip() if smi else None
    results.put(["machine"], {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpu": gpu,
                              "python": platform.python_version(), "onnxruntime": ort.__version__,
                              "providers": ort.get_available_providers(), "tiny": args.tiny})
    device = Device.resolve(args.device)
    limit = 512 if args.tiny else None
    pixels, images, labels = (a[:limit] for a in test_set())

    def measure(which: list[tuple[str, int]]) -> None:
        for name, version in which:
            for label, spec in engines(args.device).items():
                results.attempt(["in_process", f"{name}/{version}", label],
                                lambda: in_process(device, name, version, spec, images, labels, args.seconds))

    first, later = versions()
    measure(first)
    repo = Path(tempfile.mkdtemp(prefix="reskd-device-run-"))
    try:
        for name in (CASCADE, TEACHER):
            shutil.copytree(MODELS / name, repo / name)
        noop_model(repo)
        configs = {"auto": {}, "stage": {"scheduler": "stage"}, "request": {"scheduler": "request"}}
        if args.device == "cuda":
            configs["auto, graphs off"] = {"cuda_graphs": "false"}
            # One worker per GPU is the default; two on one GPU: whether one event loop bounds the served rate there.
            configs["auto, 2 workers"] = {"workers": "2"}
        if args.tiny:
            configs = {"auto": {}}
        for label, settings in configs.items():
            try:
                served(results, ["served", label], args.device, repo, settings, pixels, images, args.duration,
                       args.tiny)
            except Exception as err:  # noqa: BLE001 - a server that did not start; the next config goes on
                results.put(["served", label, "error"], f"{type(err).__name__}: {err}")
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    results.put(["served_by_s"], round(time.perf_counter() - start, 1))
    measure(later)
    results.put(["wall_s"], round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
