"""Serving on the CUDA execution provider beside the CPU one, on the same machine.

    python bench/gpu_check.py --images PATH/t10k-images-idx3-ubyte.gz --labels PATH/t10k-labels-idx1-ubyte.gz \
        [--devices cuda,cpu] [--duration 8] [--out results.json]

1. Starts `reskd serve --device D` on the bundled models for each device (and, on CUDA, each scheduler).
2. Agreement: all 10,000 Fashion-MNIST test images as PNG files through POST /v1 (100 per request) on each server;
   classes and exit stages compared image by image, accuracy and mean FLOPs reported.
3. Throughput with bench/loadgen.py (closed loop): single-image requests at concurrency 1 and 64, 32-image
   requests at concurrency 16 (v1 multipart PNG), and 256-image v2 binary FP32 requests at concurrency 8; for
   the cascade and the teacher.
4. In process: CascadeRuntime.run at batch 256 for the cascade and the teacher on each provider.
Everything measured is printed as JSON (and written to --out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import idx  # noqa: E402
from loadgen import run_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def multipart(blobs: list[bytes]) -> tuple[bytes, dict]:
    req = httpx.Request("POST", "http://x/", files=[("file", (f"{i}.png", b)) for i, b in enumerate(blobs)])
    return req.read(), {"content-type": req.headers["content-type"]}


def v2_binary(images: np.ndarray) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                                   "parameters": {"binary_data_size": images.nbytes}}],
                       "outputs": [{"name": "class_id", "parameters": {"binary_data": True}},
                                   {"name": "exit_stage", "parameters": {"binary_data": True}}]}).encode()
    return head + images.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                                   "content-type": "application/octet-stream"}


class Server:
    def __init__(self, device: str, repo: Path = MODELS, **settings):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **{f"RESKD_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = open(f"/tmp/reskd-serve-{device}-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "reskd.cli", "serve", "--repo", str(repo),
                                      "--device", device, "--port", str(self.port)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd="/tmp")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.output())
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("not ready:\n" + self.output())
        self.ready_s = 300 - (deadline - time.monotonic())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def agreement(server: Server, blobs: list[bytes], labels: np.ndarray) -> dict:
    classes, stages, flops = [], [], []
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for i in range(0, len(blobs), 100):
            r = c.post("/v1/models/fashion-mnist/classify",
                       files=[("file", (f"{j}.png", b)) for j, b in enumerate(blobs[i:i + 100])])
            r.raise_for_status()
            for p in r.json()["predictions"]:
                classes.append(p["class_id"])
                stages.append(p["exit_stage"])
                flops.append(p["flops"])
        config = c.get("/v2/models/fashion-mnist/config").json()
    classes, stages = np.array(classes), np.array(stages)
    return {"classes": classes, "stages": stages, "accuracy": float((classes == labels).mean()),
            "mean_flops": float(np.mean(flops)), "exits": np.bincount(stages, minlength=3).tolist(),
            "instance": config["instance_group"][0]["kind"]}


def in_process(device: str, images: np.ndarray) -> dict:
    from reskd.device import Device
    from reskd.runtime import CascadeRuntime

    out = {}
    for name in ("fashion-mnist", "fashion-mnist-teacher"):
        rt = CascadeRuntime(MODELS / name / "1", device=Device.resolve(device))
        batch = images[:256]
        for _ in range(3):
            rt.run(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3:
            for i in range(0, len(images) - 255, 256):
                rt.run(images[i:i + 256])
                n += 256
        out[name] = n / (time.perf_counter() - start)
    return out


def compute_counters(url: str) -> dict:
    """Useful vs executed compute and per-stage time from the server's own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for smp in fam.samples:
            if smp.labels.get("model") != "fashion-mnist":
                continue
            if smp.name in ("reskd_flops_total", "reskd_teacher_flops_total", "reskd_images_total"):
                out[smp.name] = smp.value
            elif smp.name in ("reskd_padding_flops_total", "reskd_stage_duration_seconds_sum",
                              "reskd_stage_duration_seconds_count", "reskd_batch_size_sum", "reskd_batch_size_count"):
                out.setdefault(smp.name, {})[smp.labels["stage"]] = smp.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()

    import onnxruntime as ort
    if hasattr(ort, "preload_dlls") and "CUDAExecutionProvider" in ort.get_available_providers():
        ort.preload_dlls()
    pixels, labels = idx(args.images), idx(args.labels)
    blobs = [png(p) for p in pixels]
    from reskd.manifest import load_manifest
    from reskd.preprocess import normalise
    spec = load_manifest(MODELS / "fashion-mnist" / "1").input
    tensors = normalise(pixels[:, None], spec).astype(np.float32)

    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        results["machine"]["gpu"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    devices = args.devices.split(",")
    for d in devices:
        results.setdefault("in_process_batch256_images_per_s", {})[d] = in_process(d, tensors)
        print(json.dumps({d: results["in_process_batch256_images_per_s"][d]}), flush=True)

    single_h = {"content-type": "image/png"}
    thirty_two, thirty_two_h = multipart(blobs[:32])
    v2_body, v2_h = v2_binary(tensors[:256])
    loads = [("single c1", "classify", blobs[0], single_h, 1, 1), ("single c64", "classify", blobs[0], single_h, 64, 1),
             ("32-image c16", "classify", thirty_two, thirty_two_h, 16, 32),
             ("v2 256-image binary c8", "infer", v2_body, v2_h, 8, 256)]
    agree = {}
    configs = [(d, s) for d in devices for s in (("stage", "request") if d == "cuda" else ("stage",))]
    for device, scheduler in configs:
        key = f"{device}/{scheduler}"
        try:
            server = Server(device, scheduler=scheduler, max_batch_size=256, max_queue_images=8192,
                            log_level="warning")
        except RuntimeError as err:
            results.setdefault("serving", {})[key] = {"error": str(err)}
            print(json.dumps({key: {"error": str(err)}}), flush=True)
            continue
        try:
            entry = results.setdefault("serving", {}).setdefault(key, {"ready_s": round(server.ready_s, 1)})
            if scheduler == "stage":
                agree[device] = agreement(server, blobs, labels)
                a = agree[device]
                entry.update(accuracy=a["accuracy"], mean_flops=a["mean_flops"], exits=a["exits"],
                             instance=a["instance"])
            for model in ("fashion-mnist", "fashion-mnist-teacher"):
                for label, kind, body, headers, conc, n in loads:
                    path = f"/v1/models/{model}/classify" if kind == "classify" else f"/v2/models/{model}/infer"
                    r = run_load(server.url + path, body, headers, concurrency=conc, duration=args.duration,
                                 images=n, processes=args.processes)
                    entry.setdefault(model, {})[label] = r
                    print(json.dumps({key: {model: {label: r}}}), flush=True)
            entry["metrics"] = compute_counters(server.url)
            print(json.dumps({key: {"metrics": entry["metrics"]}}), flush=True)
        except Exception as err:  # keep what the other configurations measure
            entry["error"] = f"{type(err).__name__}: {err}\n{server.output()}"
            print(json.dumps({key: {"error": entry["error"]}}), flush=True)
        finally:
            server.stop()
    if len(agree) == 2:
        a, b = agree[devices[0]], agree[devices[1]]
        results["agreement"] = {"images": len(labels),
                                "same_class": int((a["classes"] == b["classes"]).sum()),
                                "same_exit_stage": int((a["stages"] == b["stages"]).sum())}
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
