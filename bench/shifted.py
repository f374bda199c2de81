"""Shifted 28x28 image sets built from what this machine has, for the audit and drift benchmark (bench/audit.py):
inputs a Fashion-MNIST server may meet that are unlike its training data. Each keeps the source image's index, so
the sets built from test images keep their true labels.

- inverted: the test images with black and white swapped (a scanner or camera set up the other way round);
- rot90: the test images turned a quarter (a sensor mounted sideways);
- noise: the test images with Gaussian noise, sigma 64 of 255 (a noisy sensor);
- digits: printed digits 0-9 in the DejaVu fonts, white on black, sized, stroked and turned at random, drawn the way
  MNIST centres its digits (another 28x28 set; no label of Fashion-MNIST applies).
"""

from __future__ import annotations

import glob

import numpy as np

SETS = ("inverted", "rot90", "noise", "digits")
FONTS = "/usr/share/fonts/truetype/dejavu/*.ttf"


def shifted(name: str, pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 [N, 28, 28] -> the shifted set `name` of the same size."""
    rng = np.random.default_rng(seed)
    if name == "inverted":
        return 255 - pixels
    if name == "rot90":
        return np.ascontiguousarray(np.rot90(pixels, 1, axes=(1, 2)))
    if name == "noise":
        return np.clip(pixels + rng.normal(0, 64, pixels.shape), 0, 255).astype(np.uint8)
    if name == "digits":
        return digits(len(pixels), rng)
    raise ValueError(f"unknown set {name!r}; one of {', '.join(SETS)}")


def digits(n: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(glob.glob(FONTS))
    if not fonts:
        raise SystemExit(f"no fonts at {FONTS} (apt-get install fonts-dejavu-core)")
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(18, 26)))
        img = Image.new("L", (56, 56))
        ImageDraw.Draw(img).text((28, 28), str(rng.integers(10)), fill=255, font=font, anchor="mm",
                                 stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR).resize((28, 28), Image.BILINEAR)
        out[i] = np.asarray(img)
    return out
