"""Image bytes -> model input, per the manifest: every mode a user may send, and the limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reskd.manifest import InputSpec
from reskd.preprocess import ImageError, ImageTooLarge, decode, preprocess

GRAY = InputSpec(channels=1, height=8, width=8, color="L", mean=[0.5], std=[0.25])
RGB = InputSpec(channels=3, height=8, width=8, color="RGB", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_gray_png_is_normalised_exactly():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    x = preprocess(encode(Image.fromarray(pixels), "PNG"), GRAY)
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[0], (pixels / 255 - 0.5) / 0.25, atol=1e-6)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_formats_are_sniffed_from_the_bytes(fmt):
    img = Image.new("RGB", (8, 8), (200, 30, 90))
    x = preprocess(encode(img, fmt), RGB)
    assert x.shape == (3, 8, 8)
    assert np.allclose(x[:, 4, 4], (np.array([200, 30, 90]) / 255 - 0.5) / 0.5, atol=0.1)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    x = preprocess(encode(img, "PNG"), GRAY)
    assert np.allclose(x, (128 / 255 - 0.5) / 0.25, atol=1e-6)


def test_palette_alpha_and_cmyk():
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    assert np.allclose(preprocess(encode(pal, "PNG"), GRAY), (1.0 - 0.5) / 0.25)
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # fully transparent white: the black background shows
    assert np.allclose(preprocess(encode(rgba, "PNG"), GRAY), (0.0 - 0.5) / 0.25)
    half = Image.new("LA", (8, 8), (255, 128))
    assert np.allclose(preprocess(encode(half, "PNG"), GRAY), (128 / 255 - 0.5) / 0.25, atol=0.01)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    assert np.allclose(preprocess(encode(cmyk, "JPEG"), RGB), (1.0 - 0.5) / 0.5, atol=0.02)


def test_gif_first_frame():
    frames = [Image.new("L", (8, 8), v) for v in (10, 240)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.allclose(preprocess(data, GRAY), (10 / 255 - 0.5) / 0.25, atol=0.01)


def test_other_sizes_are_resized():
    big = Image.new("L", (40, 20), 255)
    assert preprocess(encode(big, "PNG"), GRAY).shape == (1, 8, 8)
    fit = InputSpec(**{**GRAY.model_dump(), "resize": "fit-center"})
    wide = Image.new("L", (32, 16))
    wide.paste(255, (12, 0, 20, 16))  # a white band in the middle survives the centre crop
    x = preprocess(encode(wide, "PNG"), fit)
    assert x.shape == (1, 8, 8) and x[0, :, 0].max() < 0 and x[0, 4, 4] > 1.5


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
@pytest.mark.parametrize("how", ["bilinear", "fit-center"])
def test_a_much_larger_image_is_reduced_first_with_the_same_pixels_within_rounding(mode, how):
    """shrink() box-filters before the colour conversion and the bilinear resize: for a smooth image the result is
    the full-size path's within a few grey levels (alpha composited onto black either way)."""
    from reskd.preprocess import image_to_pixels, resize, shrink, to_mode

    spec = InputSpec(**{**(GRAY if mode in ("L", "LA") else RGB).model_dump(), "resize": how})
    grad = Image.linear_gradient("L").resize((300, 260))
    bands = {"L": [grad], "LA": [grad, grad.transpose(Image.Transpose.ROTATE_180)],
             "RGB": [grad, grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grad.transpose(Image.Transpose.ROTATE_180)],
             "RGBA": [grad, grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grad,
                      grad.transpose(Image.Transpose.ROTATE_180)]}[mode]
    img = Image.merge(mode, bands)
    assert shrink(img, spec.height, spec.width).size == (18, 16)  # by 16.25 (260 / 16): twice 8 x 8, same aspect
    got = image_to_pixels(img, spec).astype(int)
    full = np.asarray(resize(to_mode(img, spec.color), spec.height, spec.width, how), dtype=int)
    full = full[None] if full.ndim == 2 else full.transpose(2, 0, 1)
    assert np.abs(got - full).max() <= 3, np.abs(got - full).max()


def test_bad_bytes_are_refused_clearly():
    with pytest.raises(ImageError, match="empty image"):
        preprocess(b"", GRAY)
    with pytest.raises(ImageError, match="cannot identify an image"):
        preprocess(b"%PDF-1.4 not an image", GRAY)
    png = encode(Image.new("L", (64, 64), 7), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        preprocess(png[: len(png) // 2], GRAY)


def test_decompression_bombs_are_refused_before_decoding():
    img = Image.new("L", (3000, 3000))
    data = encode(img, "PNG")  # 9 MP of zeros compress to a few kB
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="over the limit of 1,000,000"):
        decode(data, max_pixels=1_000_000)
    assert decode(data, max_pixels=10_000_000).size == (3000, 3000)
