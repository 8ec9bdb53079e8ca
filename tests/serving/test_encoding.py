"""PNG results (serving.encoding): one row filter, written in deflate stripes (zlib-ng) or by libvips,
the same pixels as Pillow's PNG at every level, no more than a few per cent more bytes than Pillow's
zlib level of that number wrote, nothing but the pixels in the file, the same bytes whatever the
threads, one valid zlib stream across the stripes, and libvips or Pillow where zlib-ng or libvips
cannot be loaded.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from serving import encoding
from serving.encoding import (
    MAX_PNG_COMPRESSION,
    MAX_PNG_THREADS,
    MIN_PNG_COMPRESSION,
    MIN_STRIPE_BYTES,
    PNG_WRITES,
    encode,
    png_writer,
)

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


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk, every CRC checked."""
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack_from(">I", data, at + 8 + length)
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        at += 12 + length
    return chunks


def _chunk_types(data: bytes) -> list[bytes]:
    return [kind for kind, _ in _chunks(data)]


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


@pytest.mark.parametrize("level", [1, 2, 4, 6])
def test_png_is_no_larger_than_pillows_level_of_that_number(
    pictures: dict[str, np.ndarray], level: int
) -> None:
    """The levels keep their meaning in bytes (PNG_WRITES was chosen so): within 3 % of what Pillow
    wrote at that zlib level."""
    assert png_writer(level) != "pillow", "neither zlib-ng nor libvips could be loaded"
    for name, rgb in pictures.items():
        ours, pillows = len(encode(rgb, "png", png_compression=level)), len(_pillow_png(rgb, level))
        assert ours <= 1.03 * pillows, (name, level, ours, pillows)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 257, 3), (300, 1, 3), (17, 13, 3)])
def test_png_of_odd_shapes(shape: tuple[int, int, int]) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for level in (0, 1, 9):
        with Image.open(io.BytesIO(encode(rgb, "png", png_compression=level))) as back:
            np.testing.assert_array_equal(np.asarray(back), rgb)


def test_pillow_writes_pngs_without_zlib_ng_and_libvips(
    pictures: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoding, "_zlib_ng", lambda: None)
    monkeypatch.setattr(encoding, "_vips", lambda: None)
    rgb = pictures["flat"]
    assert png_writer(1) == "pillow"
    assert encode(rgb, "png", png_compression=1) == _pillow_png(rgb, 1)


@pytest.mark.skipif(encoding._vips() is None, reason="libvips cannot be loaded here")
def test_libvips_writes_every_level_without_zlib_ng(
    pictures: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    rgb = pictures["photo"]
    striped = encode(rgb, "png", png_compression=1)
    monkeypatch.setattr(encoding, "_zlib_ng", lambda: None)
    assert png_writer(1) == "libvips" and png_writer(4) == "libvips"
    data = encode(rgb, "png", png_compression=1)
    assert data != striped and _chunk_types(data).count(b"IDAT") >= 1
    with Image.open(io.BytesIO(data)) as back:
        np.testing.assert_array_equal(np.asarray(back), rgb)


def test_which_writer_writes_each_level() -> None:
    """Stripes for the levels that filter by up or not at all (the default among them), libvips for
    Paeth's."""
    assert encoding._zlib_ng() is not None, "zlib-ng is a dependency"
    for level, (_, row_filter) in PNG_WRITES.items():
        expected = "stripes" if row_filter in {"none", "up"} else "libvips"
        assert png_writer(level) == expected or (expected == "libvips" and encoding._vips() is None)


@pytest.mark.parametrize("level", [0, 1, 3])
def test_stripes_make_one_zlib_stream_and_the_same_bytes_whatever_the_threads(
    pictures: dict[str, np.ndarray], level: int
) -> None:
    """A result big enough for several stripes: one IDAT per stripe, whose joined data is one zlib
    stream (``zlib.decompress`` checks its Adler-32) holding every row behind its filter byte; the
    same file on 1, 2 and the most threads."""
    photo = photos.one_face_1024x768()
    files = {
        threads: encode(photo, "png", png_compression=level, png_threads=threads)
        for threads in (1, 2, MAX_PNG_THREADS)
    }
    assert files[1] == files[2] == files[MAX_PNG_THREADS]
    chunks = _chunks(files[1])
    idats = [body for kind, body in chunks if kind == b"IDAT"]
    filtered_bytes = 768 * (1024 * 3 + 1)
    assert len(idats) == min(encoding.MAX_STRIPES, filtered_bytes // MIN_STRIPE_BYTES) > 1
    raw = np.frombuffer(zlib.decompress(b"".join(idats)), dtype=np.uint8).reshape(768, 1024 * 3 + 1)
    row_filter = PNG_WRITES[level][1]
    assert set(raw[:, 0]) == {0 if row_filter == "none" else 2}
    with Image.open(io.BytesIO(files[1])) as back:
        np.testing.assert_array_equal(np.asarray(back), photo)


def test_adler32_of_joined_strings() -> None:
    rng = np.random.default_rng(3)
    pieces = [b"", b"\x00", b"\xff" * 70_000, rng.integers(0, 256, 100_003, dtype=np.uint8).tobytes(), b"abc"]
    for first in pieces:
        for second in pieces:
            joined = encoding._adler32_joined(zlib.adler32(first), zlib.adler32(second), len(second))
            assert joined == zlib.adler32(first + second)


def test_many_pngs_at_once_share_the_stripe_workers(pictures: dict[str, np.ndarray]) -> None:
    """More PNGs at once than there are workers free: a run that no worker has started is deflated by
    the thread that asked, and every file comes out whole and the same."""
    photo = photos.one_face_1024x768()
    expected = encode(photo, "png", png_threads=1)
    results: list[bytes] = []

    def write() -> None:
        results.append(encode(photo, "png", png_threads=MAX_PNG_THREADS))

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 6


@pytest.mark.parametrize("threads", [0, MAX_PNG_THREADS + 1])
def test_png_threads_out_of_range_is_an_error(pictures: dict[str, np.ndarray], threads: int) -> None:
    with pytest.raises(ValueError, match="png_threads"):
        encode(pictures["flat"], "png", png_threads=threads)


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
    assert png_writer(4) == "libvips"  # a Paeth level
    assert encode(rgb, "png", png_compression=4) == _pillow_png(rgb, 4)
