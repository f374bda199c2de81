"""Image bytes -> the float32 tensor a model expects, per the manifest's `input` section. The one place where
images are prepared: HTTP requests and batch scoring both come through here.

Steps: read the header (format sniffed from the bytes) and refuse decompression bombs (`open_image`), decode the
first frame (`load_image`), reduce a much larger image with a box filter (`shrink`), bring any mode to the
manifest's colour (16-bit scaled, not clipped; palette and alpha composited onto black, the
background of the training images; CMYK converted), resize to height x width per `resize`, scale to [0, 1],
then (x - mean) / std per channel.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .manifest import InputSpec

DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """The bytes are not an image this service can read; the message says why."""


class ImageTooLarge(ImageError):
    """Decoding would exceed the pixel limit (a decompression bomb, or simply too large)."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image's header read, nothing decoded yet: its size is checked against max_pixels (and Pillow's
    decompression-bomb guard), so a bomb is refused before any pixel is decoded."""
    if not data:
        raise ImageError("empty image: the body or part has no bytes")
    with _read_errors():
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    return img


def load_image(img: Image.Image) -> Image.Image:
    """Decode an image from open_image (its first frame)."""
    with _read_errors():
        img.seek(0)
        img.load()
    return img


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    return load_image(open_image(data, max_pixels))


@contextlib.contextmanager
def _read_errors():
    """Pillow's errors while reading an image, as ImageError (ImageTooLarge for a decompression bomb)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot identify an image in the bytes (PNG, JPEG, WebP, BMP and GIF are read)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image data is corrupt or truncated: {err}") from None


def to_mode(img: Image.Image, color: str) -> Image.Image:
    """Convert any PIL mode to 'L' or 'RGB'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert(color)


def resize(img: Image.Image, height: int, width: int, how: str) -> Image.Image:
    if img.size == (width, height):
        return img
    if how == "fit-center":
        scale = max(width / img.width, height / img.height)
        w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - width) // 2, (h - height) // 2
        return img.crop((left, top, left + width, top + height))
    return img.resize((width, height), Image.Resampling.BILINEAR)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 [C, H, W] (or [N, C, H, W]) -> float32 (x/255 - mean) / std."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    shape = (-1, 1, 1)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(spec.std, dtype=np.float32).reshape(shape)
    return (x - mean) / std


# Modes whose pixels a box filter can average (grey or colour values; Pillow premultiplies LA and RGBA by alpha).
REDUCIBLE = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}


def shrink(img: Image.Image, height: int, width: int) -> Image.Image:
    """An image many times larger than height x width is first box-filtered down, keeping its aspect, to twice
    that size, so the bilinear resize after it still sees every pixel and the mode conversions run on the small
    image: the same pixels within a few grey levels, at a fraction of the memory (a 6324 x 6324 RGBA image took
    about 800 MB to convert at full size). Twice the target in both sides is twice what resize() makes, with either
    `resize`."""
    factor = min(img.width / (2 * width), img.height / (2 * height))
    if factor >= 2 and img.mode in REDUCIBLE:
        return img.resize((round(img.width / factor), round(img.height / factor)), Image.Resampling.BOX)
    return img


def image_to_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    img = resize(to_mode(shrink(img, spec.height, spec.width), spec.color), spec.height, spec.width, spec.resize)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_pixels(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 [C, H, W] at the manifest's size and colour, not yet normalised (a quarter of
    the float32 bytes: batch scoring ships these between processes and normalises whole batches)."""
    return opened_to_pixels(open_image(data, max_pixels), spec)


def opened_to_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """An image from open_image -> uint8 [C, H, W], as decode_pixels."""
    img = load_image(img)
    try:
        return image_to_pixels(img, spec)
    except (OSError, ValueError) as err:
        raise ImageError(f"image data is corrupt or truncated: {err}") from None


def preprocess(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> float32 [C, H, W], ready for the cascade."""
    return normalise(decode_pixels(data, spec, max_pixels), spec)
