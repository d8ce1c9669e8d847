"""diffperc.images, the one image loader: real files of each kind, written here with Pillow (or by hand)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffperc.images import UnreadableImageError, fit, fit_box, load_image, open_image, to_rgb8, to_tensor

RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 20) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("WEBP", ".webp")])
def test_lossless_rgb_formats_read_exactly(tmp_path, fmt, suffix):
    pixels = _rgb()
    path = tmp_path / f"x{suffix}"
    Image.fromarray(pixels).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    x = load_image(path)
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    x = load_image(path)
    assert x.shape == (3, 30, 10)  # displayed upright: portrait
    assert x[:, :5].mean() > 0.9 and x[:, -5:].mean() < 0.1  # the left band is now on top


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 30000], [45000, 60000, 65535]], np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # a real 16-bit PNG
    x = load_image(path)
    expected = torch.from_numpy(values.astype(np.float32) / 65535)
    torch.testing.assert_close(x, expected.expand(3, -1, -1))
    assert 0.44 < float(x[0, 0, 2]) < 0.47  # 30000: not white, as convert("RGB") made it


def test_float_tiff_kept_in_range_or_divided_by_max(tmp_path):
    inside = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    Image.fromarray(inside, mode="F").save(tmp_path / "f.tif")
    torch.testing.assert_close(load_image(tmp_path / "f.tif")[0], torch.from_numpy(inside))
    above = inside * 400
    Image.fromarray(above, mode="F").save(tmp_path / "g.tif")
    torch.testing.assert_close(load_image(tmp_path / "g.tif")[1], torch.from_numpy(inside))


def test_palette_la_rgba_cmyk_and_gif_first_frame(tmp_path):
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "p.png")
    torch.testing.assert_close(load_image(tmp_path / "p.png")[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    pal.save(tmp_path / "pt.png", transparency=1)  # index 1 transparent -> white background
    torch.testing.assert_close(load_image(tmp_path / "pt.png")[:, 0, 1], torch.ones(3))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black -> white
    rgba[0, 1] = (200, 0, 0, 255)
    rgba[1, 0] = (0, 0, 200, 128)  # half over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([200 / 255, 0.0, 0.0]))
    assert abs(float(x[0, 1, 0]) - 127 / 255) < 0.01 and abs(float(x[2, 1, 0]) - 228 / 255) < 0.01
    Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8).reshape(1, 2, 2), "LA").save(tmp_path / "la.png")
    y = load_image(tmp_path / "la.png")
    assert abs(float(y[0, 0, 0]) - 50 / 255) < 1e-6 and float(y[0, 0, 1]) == 1.0
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    z = load_image(tmp_path / "c.jpg")
    assert z.shape == (3, 2, 3) and z[0].min() > 0.9 and z[1:].max() < 0.1
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    g = load_image(tmp_path / "anim.gif")
    assert g[0].min() > 0.9 and g[2].max() < 0.1  # the first (red) frame


def test_disallowed_formats_are_refused_before_decoding(tmp_path):
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "x.ico", format="ICO")
    for name in ("x.eps", "x.ico"):
        with pytest.raises(UnreadableImageError, match="allowed format"):
            open_image(tmp_path / name)
    with pytest.raises(UnreadableImageError, match="allowed format"):
        open_image(b"not an image at all")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR chunk declaring width x height RGB, and a 4-byte IDAT: no real pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"\x78\x9c\x00\x00"))


def test_pixel_limit_is_checked_on_the_header(tmp_path):
    # No pixel data follows the header: decoding would fail as truncated, so the size error proves the check
    # ran on the header, before any decode.
    (tmp_path / "big.png").write_bytes(_png_header_only(9000, 9000))
    with pytest.raises(UnreadableImageError, match="81 MP exceeds the limit of 64 MP"):
        open_image(tmp_path / "big.png")
    (tmp_path / "small.png").write_bytes(_png_header_only(100, 100))
    with pytest.raises(UnreadableImageError, match="limit of 0 MP"):
        open_image(tmp_path / "small.png", max_pixels=99 * 99)
    with pytest.raises(UnreadableImageError, match="truncated or corrupt"):
        open_image(tmp_path / "small.png")


def test_truncated_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(_rgb(64, 64)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match="cut.jpg: truncated or corrupt"):
        open_image(path)
    with pytest.raises(FileNotFoundError, match="image .*nope.png does not exist"):
        open_image(tmp_path / "nope.png")


@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
def test_fit_modes(mode):
    im = Image.fromarray(np.full((20, 40, 3), 255, np.uint8))
    out = fit(im, 16, mode)
    assert out.size == (16, 16)
    x = to_tensor(out)
    if mode == "pad":  # 40x20 -> 16x8 pasted at rows 4..12, grey above and below
        assert fit_box(40, 20, 16, "pad") == ((16, 8), (0, 4, 16, 12))
        assert float(x[:, :4].max()) == pytest.approx(128 / 255) and float(x[:, 4:12].min()) == 1.0
    elif mode == "crop":
        assert fit_box(40, 20, 16, "crop") == ((32, 16), (8, 0, 24, 16)) and float(x.min()) == 1.0
    else:
        assert float(x.min()) == 1.0
    with pytest.raises(ValueError, match="--resize must be one of"):
        fit(im, 16, "squash")


def test_float_images_fit_and_rgb8(tmp_path):
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(values).save(tmp_path / "g16.png")
    im = open_image(tmp_path / "g16.png")
    assert im.mode == "F"
    assert fit(im, 4, "pad").mode == "F" and to_rgb8(im).mode == "RGB"
    assert np.asarray(to_rgb8(im))[7, 7, 0] == round(63000 / 65535 * 255)


def test_every_entry_point_uses_the_loader():
    """No module of the library opens user images with PIL itself except images.py (and label/depth maps)."""
    root = Path(__file__).resolve().parents[1] / "diffperc"
    callers = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if "Image.open(" in p.read_text()}
    user_image_modules = {"extract.py", "predict.py", "_commands.py", "cli/classify.py", "cli/correspond.py",
                          "zeroshot/classify_images.py", "zeroshot/correspond_images.py", "retrieval/embedder.py",
                          "retrieval/cli.py", "data/folder.py", "data/classification.py"}
    assert "images.py" in callers and not callers & user_image_modules, callers & user_image_modules
