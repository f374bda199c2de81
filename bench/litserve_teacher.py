"""The bundled teacher's ONNX file served by LitServe with its own dynamic batching, for bench/serve_throughput.py:
the same preprocessing (reskd.preprocess) and the same onnxruntime session settings as `reskd serve`, so the
comparison is between the servers.

    python bench/litserve_teacher.py --port 8010 [--max-batch-size 64] [--batch-timeout 0.002] [--workers 1]

POST /predict with a multipart `file` part (as `reskd serve`'s /v1) -> {"class_id": ..., "label": ...}.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import litserve as ls
import numpy as np

from reskd.device import Device
from reskd.manifest import ModelRepository
from reskd.preprocess import preprocess

MODELS = Path(__file__).resolve().parents[1] / "models"


class TeacherAPI(ls.LitAPI):
    def setup(self, device):
        path, self.manifest = ModelRepository(MODELS).load("fashion-mnist-teacher")
        self.session = Device.cpu(threads=os.cpu_count() or 1).session(str(path / self.manifest.stages[0].file))

    def decode_request(self, request):
        return preprocess(request["file"].file.read(), self.manifest.input)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, batch):
        return self.session.run(["logits"], {"images": batch})[0].argmax(-1)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"class_id": int(output), "label": self.manifest.labels[int(output)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8010)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-timeout", type=float, default=0.002)
    ap.add_argument("--workers", type=int, default=1, help="inference worker processes (workers_per_device)")
    args = ap.parse_args()
    api = TeacherAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers).run(host="127.0.0.1", port=args.port, log_level="warning",
                                                                   generate_client_file=False)


if __name__ == "__main__":
    main()
