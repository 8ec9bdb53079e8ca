"""PNG results (serving.encoding): written by libvips with one row filter, the same pixels as Pillow's
PNG at every level, no more than a few per cent more bytes than Pillow's zlib level of that number
wrote, nothing but the pixels in the file, and Pillow's writer when libvips cannot be loaded.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from serving import encoding
from serving.encoding import MAX_PNG_COMPRESSION, MIN_PNG_COMPRESSION, PNG_WRITES, encode

LEVELS = range(MIN_PNG_COMPRESSION, MAX_PNG_COMPRESSION + 1)


@pytest.fixture(scope="module")
def pictures() -> dict[str, np.ndarray]:
    """A photo and a flat, cartoon-like picture (the photo's colours posterised, edges kept)."""
    photo = photos.one_face_1024x768()[::2, ::2].copy()
    flat = (photo // 48 * 48 + 24).astype(np.uint8)
    return {"photo": photo, "flat": flat}


def _pillow_png(rgb: np.ndarray, level: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "PNG", compress_level=level)
    return out.getvalue()


def _chunk_types(data: bytes) -> list[bytes]:
    types, at = [], 8
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        types.append(data[at + 4 : at + 8])
        at += 12 + length
    return types


def test_every_level_has_a_way_to_be_written() -> None:
    assert set(PNG_WRITES) == set(LEVELS)
    for zlib_level, row_filter in PNG_WRITES.values():
        assert 0 <= zlib_level <= 9 and row_filter in {"none", "sub", "up", "avg", "paeth", "all"}


@pytest.mark.parametrize("level", LEVELS)
def test_png_pixels_are_exact_and_the_file_holds_nothing_else(
    pictures: dict[str, np.ndarray], level: int
) -> None:
    for rgb in pictures.values():
        data = encode(rgb, "png", png_compression=level)
        types = _chunk_types(data)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert types[0] == b"IHDR" and types[-1] == b"IEND" and set(types) == {b"IHDR", b"IDAT", b"IEND"}
        with Image.open(io.BytesIO(data)) as back:
            assert back.mode == "RGB" and not back.info
            np.testing.assert_array_equal(np.asarray(back), rgb)


@pytest.mark.skipif(encoding._vips() is None, reason="libvips cannot be loaded here")
@pytest.mark.parametrize("level", [1, 4, 6])
def test_png_is_no_larger_than_pillows_level_of_that_number(
    pictures: dict[str, np.ndarray], level: int
) -> None:
    """The levels keep their meaning in bytes (PNG_WRITES was chosen so): within 3 % of what Pillow
    wrote at that zlib level."""
    for name, rgb in pictures.items():
        ours, pillows = len(encode(rgb, "png", png_compression=level)), len(_pillow_png(rgb, level))
        assert ours <= 1.03 * pillows, (name, level, ours, pillows)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 257, 3), (300, 1, 3), (17, 13, 3)])
def test_png_of_odd_shapes(shape: tuple[int, int, int]) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for level in (0, 1, 9):
        with Image.open(io.BytesIO(encode(rgb, "png", png_compression=level))) as back:
            np.testing.assert_array_equal(np.asarray(back), rgb)


def test_pillow_writes_pngs_without_libvips(
    pictures: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoding, "_vips", lambda: None)
    rgb = pictures["flat"]
    assert encode(rgb, "png", png_compression=1) == _pillow_png(rgb, 1)


def test_a_non_png_from_libvips_is_an_error() -> None:
    with pytest.raises(ValueError, match="did not write a PNG"):
        encoding._png_only_pixels(b"GIF89a")


@pytest.mark.skipif(encoding._vips() is None, reason="libvips cannot be loaded here")
def test_pillow_writes_pngs_that_libvips_refuses(
    pictures: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    vips = encoding._vips()

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise vips.Error("unknown option keep")

    monkeypatch.setattr(vips.Image, "pngsave_buffer", refuse)
    rgb = pictures["flat"]
    assert encode(rgb, "png", png_compression=1) == _pillow_png(rgb, 1)
