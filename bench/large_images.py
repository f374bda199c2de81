"""Large images: one client's huge decode against everyone else's small requests, and the memory it leaves.

Against a `reskd serve` started here (settings with --set NAME=VALUE), two scenarios, each on a fresh server:
- "grey": one request of --grey flat greyscale PNGs of --side x --side pixels (under the 40 M per-image limit),
  and 0.5 s after it starts, a one-image request: the status and time of each.
- "rgba": one request of --rgba such RGBA PNGs: its status and time, the server's RSS before, at its peak
  (sampled every 50 ms from /proc) and 3 s after the answer.
The defaults are the requests the reliability issue reproduced (256 grey and 100 RGBA images of 6324 x 6324).

    .venv/bin/python bench/large_images.py
    .venv/bin/python bench/large_images.py --set max_request_pixels=20000000000   # decode them all
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

from overload import rss_mb  # noqa: E402

CLASSIFY = "/v1/models/fashion-mnist/classify"


def png(side: int, mode: str) -> bytes:
    img = Image.linear_gradient("L").resize((side, side))
    if mode == "RGBA":
        img = Image.merge("RGBA", [img, img.transpose(Image.Transpose.ROTATE_90), img, img])
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def post(url: str, blob: bytes, n: int) -> dict:
    t0 = time.perf_counter()
    r = httpx.post(url + CLASSIFY, files=[("file", (f"{i}.png", blob, "image/png")) for i in range(n)], timeout=600)
    out = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 3), "body_mb": None}
    if r.status_code != 200:
        out["error"] = r.json().get("error", r.text)[:200]
    return out


def grey(settings: dict, side: int, n: int) -> dict:
    blob = png(side, "L")
    small = png(28, "L")
    with ServerProcess(log_level="warning", **settings) as s:
        result: dict = {}
        big = threading.Thread(target=lambda: result.setdefault("large", post(s.url, blob, n)))
        big.start()
        time.sleep(0.5)
        result["small"] = post(s.url, small, 1)
        big.join()
    result["large"]["body_mb"] = round(n * len(blob) / 2**20, 1)
    return result


def rgba(settings: dict, side: int, n: int) -> dict:
    blob = png(side, "RGBA")
    with ServerProcess(log_level="warning", **settings) as s:
        pid = s.proc.pid
        before = rss_mb(pid)
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak.append(rss_mb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        result = post(s.url, blob, n)
        done.set()
        sampler.join()
        time.sleep(3)
        after = rss_mb(pid)
    result["body_mb"] = round(n * len(blob) / 2**20, 1)
    return {"request": result, "rss_mb": {"before": round(before), "peak": round(max(peak)), "after": round(after)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=6324)
    p.add_argument("--grey", type=int, default=256, help="images in the greyscale request")
    p.add_argument("--rgba", type=int, default=100, help="images in the RGBA request")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a server setting; repeatable")
    args = p.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    settings.setdefault("max_body_bytes", str(64 * 2**20))  # these bodies are ~10-16 MB: the pixels are the test
    out = {"settings": settings, "grey": grey(settings, args.side, args.grey),
           "rgba": rgba(settings, args.side, args.rgba)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
