"""Upload decoding and response encoding (serving.images): formats decided by content, limits and
decompression bombs, damaged files, EXIF orientation, pixel modes and colour, metadata stripping.

Every test image is made in memory, with Pillow or (16-bit RGB, bomb headers) by hand.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, PngImagePlugin

from devkit import photos
from inference.errors import ToonserveError
from serving.encoding import MEDIA_TYPES, OUTPUT_FORMATS, EncodeOptionsError, encode
from serving.images import (
    ALLOWED_FORMATS,
    DECODER_COPIES,
    DEFAULT_MAX_PIXELS,
    MAX_COUNTED_PAGES,
    CorruptImageError,
    DecodedImage,
    DecodePlan,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode,
    plan_decode,
    probe,
)

# Pillow warns about the damaged metadata some tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning", "ignore:Truncated File Read")

# Pillow's name for each of our input formats, and save options that keep the test fast and the
# comparison meaningful.
PILLOW_SAVE: dict[str, tuple[str, dict[str, Any]]] = {
    "jpeg": ("JPEG", {"quality": 95}),
    "png": ("PNG", {}),
    "webp": ("WEBP", {"quality": 95}),
    "bmp": ("BMP", {}),
    "tiff": ("TIFF", {}),
    "gif": ("GIF", {}),
}
LOSSY = {"jpeg", "webp"}


def save(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def decode_ok(data: bytes, **kwargs: Any) -> DecodedImage:
    kwargs.setdefault("max_pixels", DEFAULT_MAX_PIXELS)
    return decode(data, **kwargs)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, *, bit_depth: int, colour_type: int, samples: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB; bombs need a lying header).
    ``samples`` are the raw rows (filter type 0 is added); they need not match the declared size."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    rows = max(1, min(height, 64))
    row_len = len(samples) // rows
    raw = b"".join(b"\0" + samples[r * row_len : (r + 1) * row_len] for r in range(rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo, 96×128 (H×W) RGB: non-square so a swapped height and width shows."""
    small = Image.fromarray(photos.astronaut()).resize((128, 128), Image.Resampling.BOX)
    return np.ascontiguousarray(np.asarray(small)[16:112])


# -- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_each_allowed_format_round_trips(photo: np.ndarray, fmt: str) -> None:
    pillow_name, params = PILLOW_SAVE[fmt]
    source = Image.fromarray(photo)
    if fmt == "gif":
        source = source.convert("P")  # what a GIF can hold; compare with the quantised image
    expected = np.asarray(source.convert("RGB"))

    out = decode_ok(save(source, pillow_name, **params))

    assert out.format == fmt
    assert out.original_size == (96, 128)
    assert out.pixels.shape == (96, 128, 3) and out.pixels.dtype == np.uint8
    assert out.pixels.flags.c_contiguous and out.pixels.flags.writeable
    assert out.frames == 1
    assert out.mode == ("P" if fmt == "gif" else "RGB")
    diff = np.abs(out.pixels.astype(np.int16) - expected.astype(np.int16))
    if fmt in LOSSY:
        assert diff.mean() < 3.0
    else:
        assert diff.max() == 0


@pytest.mark.parametrize(
    ("pillow_name", "fmt", "params"),
    [
        ("GIF", "gif", {}),
        ("PNG", "png", {}),  # APNG
        ("WEBP", "webp", {"lossless": True}),
        ("TIFF", "tiff", {}),  # multi-page
        ("MPO", "jpeg", {"quality": 95}),  # what phones write: a JPEG with more pictures after it
    ],
)
def test_multi_frame_files_give_the_first_frame_and_the_count(
    pillow_name: str, fmt: str, params: dict[str, Any]
) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 8), c) for c in colours]
    data = save(frames[0], pillow_name, save_all=True, append_images=frames[1:], duration=40, **params)

    out = decode_ok(data)

    assert out.format == fmt
    assert out.frames == 3
    assert out.pixels.shape == (8, 16, 3)
    assert np.abs(out.pixels.astype(np.int16) - np.array(colours[0])).max() <= 2


def test_tiff_pages_are_counted_up_to_a_cap() -> None:
    # Pillow's own page count walks every page in quadratic time; a file of many tiny pages is a DoS.
    pages = [Image.new("L", (1, 1), i) for i in range(MAX_COUNTED_PAGES + 20)]
    out = decode_ok(save(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert out.frames == MAX_COUNTED_PAGES
    assert out.pixels[0, 0, 0] == 0


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (save(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO"), "ICO"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
        (b"Hello, this is a plain text file, not a picture.\n", "type of file"),
        (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10" fill="red"/></svg>',
            "SVG",
        ),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "AVIF"),
        (b"8BPS\x00\x01" + bytes(64), "PSD"),
        # Formats Pillow reads but we do not allow.
        (save(Image.new("RGB", (8, 8)), "PPM"), "type of file"),
        (save(Image.new("RGB", (8, 8)), "TGA"), "type of file"),
        (save(Image.new("RGB", (8, 8)), "PCX"), "type of file"),
    ],
    ids=["ico", "pdf", "text", "svg", "heic", "avif", "psd", "ppm", "tga", "pcx"],
)
def test_formats_outside_the_allow_list_are_unsupported(data: bytes, named: str) -> None:
    with pytest.raises(UnsupportedImageError) as info:
        decode_ok(data)
    message = str(info.value)
    assert named in message
    assert "send JPEG, PNG, WebP, BMP, TIFF or GIF" in message


def test_the_format_comes_from_the_content() -> None:
    # A PNG is a PNG whatever it is called; decode is never told a name or content type.
    png = save(Image.new("RGB", (4, 4)), "PNG")
    assert decode_ok(png).format == "png"
    with pytest.raises(UnsupportedImageError):
        decode_ok(b"GIF" + png)  # "GIF" alone is not a GIF signature


# -- limits and bombs -----------------------------------------------------------------------------


def test_a_huge_declared_size_is_refused_before_any_pixel_is_decoded() -> None:
    # 50 MP declared, a few bytes of pixel data. Had it been decoded it would fail as truncated;
    # ImageTooLargeError with the declared size proves the header check came first.
    data = handmade_png(10_000, 5_000, bit_depth=8, colour_type=2, samples=bytes(300))
    with pytest.raises(ImageTooLargeError) as info:
        decode_ok(data, max_pixels=1_000_000)
    assert str(info.value) == "image is 10000×5000 = 50.0 MP; the limit is 1.0 MP"


def test_a_100000_squared_png_bomb_is_refused() -> None:
    data = handmade_png(100_000, 100_000, bit_depth=8, colour_type=2, samples=bytes(300))
    assert len(data) < 100
    with pytest.raises(ImageTooLargeError, match=r"the limit is 40\.0 MP"):
        decode_ok(data)
    # Pillow's own decompression-bomb guard still stands when our limit is set higher.
    with pytest.raises(ImageTooLargeError):
        decode_ok(data, max_pixels=10**12)


def test_pillows_bomb_warning_is_refused_without_touching_global_state() -> None:
    # 100 MP: over Image.MAX_IMAGE_PIXELS (89.5 MP, where Pillow warns) but under twice it (error).
    data = handmade_png(10_000, 10_000, bit_depth=8, colour_type=2, samples=bytes(300))
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match=r"more than 89\.5 MP"):
        decode_ok(data, max_pixels=200_000_000)
    assert warnings.filters == filters_before
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_a_webp_canvas_is_checked_before_libwebp_allocates_it() -> None:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (20_000 - 1).to_bytes(3, "little") * 2
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    with pytest.raises(ImageTooLargeError) as info:
        decode_ok(data)
    assert str(info.value) == "image is 20000×20000 = 400.0 MP; the limit is 40.0 MP"


def test_the_pixel_limit_is_inclusive() -> None:
    data = save(Image.new("RGB", (64, 64)), "PNG")
    assert decode_ok(data, max_pixels=64 * 64).pixels.shape == (64, 64, 3)
    with pytest.raises(ImageTooLargeError) as info:
        decode_ok(data, max_pixels=64 * 64 - 1)
    assert str(info.value) == "image is 64×64 = 4096 pixels; the limit is 4095 pixels"


def test_the_byte_limit() -> None:
    data = save(Image.new("RGB", (64, 64)), "BMP")
    assert decode_ok(data, max_bytes=len(data)).format == "bmp"
    with pytest.raises(ImageTooLargeError, match=r"the file is 12\.1 KiB; the limit is 10\.0 KiB"):
        decode_ok(data, max_bytes=10 * 1024)


# -- damaged files --------------------------------------------------------------------------------


def test_an_empty_body_is_corrupt() -> None:
    with pytest.raises(CorruptImageError, match="empty"):
        decode_ok(b"")


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_a_file_cut_in_the_middle_is_corrupt(photo: np.ndarray, fmt: str) -> None:
    pillow_name, params = PILLOW_SAVE[fmt]
    data = save(Image.fromarray(photo), pillow_name, **params)
    with pytest.raises(CorruptImageError):
        decode_ok(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # half images are never accepted silently


@pytest.mark.parametrize(
    "magic",
    [
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"BM",
        b"II*\x00",
        b"MM\x00*",
        b"RIFF\x00\x01\x00\x00WEBP",
    ],
    ids=["jpeg", "png", "gif", "bmp", "tiff-le", "tiff-be", "webp"],
)
@pytest.mark.filterwarnings("error")  # Pillow's warnings about it are no excuse for a 500 either
def test_garbage_after_a_valid_signature_is_corrupt(magic: bytes) -> None:
    garbage = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    with pytest.raises(CorruptImageError):
        decode_ok(magic + garbage)


def test_a_zero_size_image_is_corrupt() -> None:
    with pytest.raises(CorruptImageError):
        decode_ok(handmade_png(0, 10, bit_depth=8, colour_type=2, samples=bytes(30)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow comments on what it skips in damaged TIFF tags
def test_mangled_files_only_ever_raise_image_errors(photo: np.ndarray) -> None:
    """A small deterministic fuzz: byte flips, cuts and insertions into every format must either
    decode to a valid array or raise an ImageError, never anything else (that would be a 500)."""
    small = Image.fromarray(photo[:24, :32])
    seeds = [save(small, name, **params) for name, params in PILLOW_SAVE.values()]
    seeds += [
        save(small.convert("RGBA"), "PNG"),
        save(small, "TIFF", compression="tiff_deflate"),
        save(small, "JPEG", progressive=True),
        save(small.convert("P"), "GIF", save_all=True, append_images=[small.convert("P")]),
    ]
    rng = random.Random(0)
    outcomes = set()
    for _ in range(600):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            action = rng.random()
            if action < 0.6:
                data[at] = rng.randrange(256)
            elif action < 0.8:
                del data[at : at + rng.randint(1, 16)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
        try:
            out = decode_ok(bytes(data), max_pixels=1_000_000)
        except ImageError as exc:
            outcomes.add(type(exc))
            continue
        assert out.pixels.dtype == np.uint8 and out.pixels.ndim == 3 and out.pixels.shape[2] in (3, 4)
    assert CorruptImageError in outcomes


# -- orientation ----------------------------------------------------------------------------------

# How a viewer turns the stored pixels upright for each EXIF orientation (EXIF 2.32, tag 0x0112),
# written from the standard's definitions rather than from Pillow's table.
UPRIGHT_FROM_STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # 0th row at the top, 0th column on the right
    3: lambda a: a[::-1, ::-1],  # bottom, right
    4: lambda a: a[::-1],  # bottom, left
    5: lambda a: a.transpose(1, 0, 2),  # 0th row on the left, 0th column at the top
    6: lambda a: np.rot90(a, -1),  # right, top: turn 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # right, bottom
    8: lambda a: np.rot90(a, 1),  # left, bottom: turn 90° counter-clockwise
}
STORED_FROM_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    **UPRIGHT_FROM_STORED,
    6: lambda a: np.rot90(a, 1),
    8: lambda a: np.rot90(a, -1),
}


def upright_pattern() -> np.ndarray:
    """32×48 (H×W) grey, red block top-left, blue block top-right: no symmetry maps it onto itself."""
    img = np.full((32, 48, 3), 128, dtype=np.uint8)
    img[:16, :16] = (255, 0, 0)
    img[:16, 32:] = (0, 0, 255)
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    upright = upright_pattern()
    stored = np.ascontiguousarray(STORED_FROM_UPRIGHT[orientation](upright))
    np.testing.assert_array_equal(UPRIGHT_FROM_STORED[orientation](stored), upright)  # the tables agree
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}

    out = decode_ok(save(Image.fromarray(stored), fmt, exif=exif, **params))

    assert out.original_size == (32, 48)
    assert out.pixels.shape == (32, 48, 3)
    tolerance = 6 if fmt == "JPEG" else 0
    for rows, cols, colour in [
        (slice(2, 14), slice(2, 14), (255, 0, 0)),
        (slice(2, 14), slice(34, 46), (0, 0, 255)),
    ]:
        assert np.abs(out.pixels[rows, cols].astype(np.int16) - np.array(colour)).max() <= tolerance
    assert np.abs(out.pixels[20:, :].astype(np.int16) - 128).max() <= tolerance


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
def test_orientation_is_read_from_other_formats_too(fmt: str) -> None:
    stored = np.ascontiguousarray(STORED_FROM_UPRIGHT[6](upright_pattern()))
    exif = Image.Exif()
    exif[0x0112] = 6
    params: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_ok(save(Image.fromarray(stored), fmt, exif=exif, **params))
    np.testing.assert_array_equal(out.pixels, upright_pattern())


@pytest.mark.filterwarnings("error")  # even where Pillow's "Corrupt EXIF data" warning is an error
def test_unreadable_exif_is_ignored_not_refused() -> None:
    jpeg = save(Image.new("RGB", (16, 8), (10, 200, 30)), "JPEG", quality=95)
    broken_exif = b"Exif\x00\x00MM\x00*\xff\xff\xff\xff" + bytes(20)
    app1 = b"\xff\xe1" + struct.pack(">H", len(broken_exif) + 2) + broken_exif
    out = decode_ok(jpeg[:2] + app1 + jpeg[2:])
    assert out.pixels.shape == (8, 16, 3)


# -- pixel modes and colour -----------------------------------------------------------------------


def test_cmyk_jpeg_comes_out_in_the_right_colours() -> None:
    # Pillow writes (and reads) CMYK JPEGs with Adobe's inverted convention.
    data = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    out = decode_ok(data)
    assert out.mode == "CMYK"
    assert out.pixels.shape == (16, 16, 3)
    assert np.abs(out.pixels.astype(np.int16) - (255, 0, 0)).max() <= 8


def test_cmyk_tiff_comes_out_in_the_right_colours() -> None:
    out = decode_ok(save(Image.new("CMYK", (8, 8), (255, 0, 255, 0)), "TIFF"))
    assert out.mode == "CMYK"
    np.testing.assert_array_equal(out.pixels, np.full((8, 8, 3), (0, 255, 0), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grey_becomes_three_equal_channels(fmt: str) -> None:
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    out = decode_ok(save(Image.fromarray(grey), fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert out.mode == "L" and out.pixels.shape == (8, 16, 3)
    assert (out.pixels == out.pixels[:, :, :1]).all()
    assert np.abs(out.pixels[:, :, 0].astype(np.int16) - grey).max() <= (2 if fmt == "JPEG" else 0)


def test_grey_with_alpha() -> None:
    la = Image.fromarray(np.dstack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 50, np.uint8)]))
    out = decode_ok(save(la, "PNG"))
    assert out.mode == "LA"
    np.testing.assert_array_equal(out.pixels, np.full((4, 4, 4), (100, 100, 100, 50), dtype=np.uint8))

    opaque = decode_ok(save(Image.new("LA", (4, 4), (100, 255)), "PNG"))
    np.testing.assert_array_equal(opaque.pixels, np.full((4, 4, 3), 100, dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_a_transparent_index_gives_rgba(fmt: str) -> None:
    index = np.zeros((4, 6), dtype=np.uint8)
    index[:, 3:] = 1
    im = Image.frombytes("P", (6, 4), index.tobytes())
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    out = decode_ok(save(im, fmt, transparency=1))
    assert out.mode == "P"
    assert out.pixels.shape == (4, 6, 4)
    np.testing.assert_array_equal(out.pixels[:, :3], np.full((4, 3, 4), (255, 0, 0, 255), dtype=np.uint8))
    assert (out.pixels[:, 3:, 3] == 0).all()


def test_palette_without_transparency_gives_rgb() -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 12, 34, 56])
    out = decode_ok(save(im, "PNG"))
    np.testing.assert_array_equal(out.pixels, np.full((4, 4, 3), (12, 34, 56), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_one_bit_images_are_black_and_white(fmt: str) -> None:
    bits = np.zeros((8, 8), dtype=bool)
    bits[:, 4:] = True
    out = decode_ok(save(Image.fromarray(bits), fmt))
    assert out.mode == "1"
    assert out.pixels.shape == (8, 8, 3)
    assert (out.pixels[:, :4] == 0).all() and (out.pixels[:, 4:] == 255).all()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt: str) -> None:
    values = np.array([[0, 255, 256, 32767, 32768, 65535]], dtype=np.uint16)
    out = decode_ok(save(Image.fromarray(values), fmt))
    assert out.mode.startswith("I;16")
    np.testing.assert_array_equal(out.pixels[0, :, 0], [0, 1, 1, 127, 128, 255])
    assert (out.pixels == out.pixels[:, :, :1]).all()


def test_16_bit_grey_with_a_transparent_value() -> None:
    values = np.array([[1000, 700, 65535]], dtype=np.uint16)
    out = decode_ok(save(Image.fromarray(values), "PNG", transparency=700))
    np.testing.assert_array_equal(out.pixels[0, :, 3], [255, 0, 255])
    np.testing.assert_array_equal(out.pixels[0, :, 0], [4, 3, 255])


def test_16_bit_rgb_png() -> None:
    samples = np.array([[[65535, 32768, 0], [0x1234, 0xFFFF, 0x0101]]], dtype=">u2")
    data = handmade_png(2, 1, bit_depth=16, colour_type=2, samples=samples.tobytes())
    out = decode_ok(data)
    expected = np.rint(samples.astype(np.float64) * 255 / 65535)
    assert np.abs(out.pixels.astype(np.int16) - expected).max() <= 1  # Pillow keeps the high byte


def test_32_bit_int_and_float_tiffs() -> None:
    as_int = decode_ok(save(Image.fromarray(np.full((2, 2), 40_000, np.int32)), "TIFF"))
    assert as_int.mode == "I" and (as_int.pixels == 156).all()  # 16-bit range: 40000/65535·255
    as_float = decode_ok(save(Image.fromarray(np.full((2, 2), 0.5, np.float32)), "TIFF"))
    assert as_float.mode == "F" and (as_float.pixels == 128).all()  # 0..1 range


def test_ycbcr_and_lab_tiffs_are_converted_to_rgb() -> None:
    ycbcr = decode_ok(save(Image.new("RGB", (4, 4), (200, 30, 60)).convert("YCbCr"), "TIFF"))
    assert ycbcr.mode == "YCbCr"
    assert np.abs(ycbcr.pixels.astype(np.int16) - (200, 30, 60)).max() <= 3
    lab = decode_ok(save(Image.new("LAB", (4, 4), (128, 128, 128)), "TIFF"))  # L* 50, a* 0, b* 0
    assert lab.mode == "LAB"
    assert np.abs(lab.pixels.astype(np.int16) - 119).max() <= 2  # sRGB mid grey


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_real_transparency_gives_rgba(fmt: str) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[...] = (10, 20, 30, 255)
    rgba[0, 0] = (40, 50, 60, 0)
    rgba[1, 1] = (70, 80, 90, 128)
    params: dict[str, Any] = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    out = decode_ok(save(Image.fromarray(rgba), fmt, **params))
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(out.pixels, rgba)


def test_fully_opaque_rgba_gives_rgb() -> None:
    out = decode_ok(save(Image.new("RGBA", (4, 4), (10, 20, 30, 255)), "PNG"))
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(out.pixels, np.full((4, 4, 3), (10, 20, 30), dtype=np.uint8))


def test_rgb_with_a_transparent_colour_key() -> None:
    im = Image.new("RGB", (2, 1), (1, 2, 3))
    im.putpixel((1, 0), (4, 5, 6))
    out = decode_ok(save(im, "PNG", transparency=(1, 2, 3)))
    np.testing.assert_array_equal(out.pixels[0], [[1, 2, 3, 0], [4, 5, 6, 255]])


def srgb_profile_with_red_and_green_swapped() -> bytes:
    """Pillow's sRGB profile with the rXYZ and gXYZ tags swapped: what it calls red is sRGB green."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack_from(">I", profile, 128)
    entries = {}
    for i in range(count):
        signature, offset, size = struct.unpack_from(">4sII", profile, 132 + 12 * i)
        entries[signature] = (i, offset, size)
    (red_at, red_offset, red_size), (green_at, green_offset, green_size) = entries[b"rXYZ"], entries[b"gXYZ"]
    struct.pack_into(">4sII", profile, 132 + 12 * red_at, b"rXYZ", green_offset, green_size)
    struct.pack_into(">4sII", profile, 132 + 12 * green_at, b"gXYZ", red_offset, red_size)
    # Rename it (the description is UTF-16 in a v4 profile): a profile called sRGB is taken at its word.
    return bytes(profile).replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_an_embedded_icc_profile_is_converted_to_srgb(mode: str) -> None:
    colour = (255, 0, 0, 128)[: len(mode)]
    data = save(Image.new(mode, (4, 4), colour), "PNG", icc_profile=srgb_profile_with_red_and_green_swapped())
    out = decode_ok(data)
    expected = (0, 255, 0, 128)[: len(mode)]
    assert np.abs(out.pixels.astype(np.int16) - expected).max() <= 2


def test_srgb_and_unreadable_icc_profiles_leave_pixels_alone() -> None:
    im = Image.new("RGB", (4, 4), (200, 100, 50))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, b"not a profile" * 20):
        out = decode_ok(save(im, "PNG", icc_profile=icc))
        np.testing.assert_array_equal(out.pixels, np.full((4, 4, 3), (200, 100, 50), dtype=np.uint8))


# -- encode ---------------------------------------------------------------------------------------


def png_text(text: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", text)
    info.add_text("Comment", text, zip=True)
    info.add_itxt("XML:com.adobe.xmp", text)
    return info


SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encode_writes_the_format(photo: np.ndarray, fmt: Any) -> None:
    data = encode(photo, fmt)
    if fmt == "webp":
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    else:
        assert data.startswith(SIGNATURES[fmt])
    back = decode_ok(data)
    assert back.format == fmt and back.pixels.shape == photo.shape
    diff = np.abs(back.pixels.astype(np.int16) - photo)
    assert (diff.mean() < 5.0) if fmt != "png" else (diff.max() == 0)  # quality 90, 4:2:0 chroma
    assert MEDIA_TYPES[fmt] == f"image/{fmt}"


def test_encode_accepts_non_contiguous_arrays(photo: np.ndarray) -> None:
    mirrored = photo[:, ::-1]
    np.testing.assert_array_equal(decode_ok(encode(mirrored, "png")).pixels, mirrored)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_encode_quality_is_applied(photo: np.ndarray, fmt: Any) -> None:
    assert len(encode(photo, fmt, quality=20)) < len(encode(photo, fmt, quality=95))


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_no_metadata_survives_decode_then_encode(photo: np.ndarray, fmt: Any) -> None:
    secret = "SECRET-52.3702N-4.8952E"
    exif = Image.Exif()
    exif[0x010E] = secret  # ImageDescription
    exif[0x0131] = "SECRET-camera-software"
    exif[0x0112] = 1
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (52.0, 22.0, 12.0), "E", (4.0, 53.0, 42.0)
    xmp = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description>{secret}</rdf:Description></x:xmpmeta>'
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = Image.fromarray(photo)
    uploads = [
        save(source, "JPEG", exif=exif, icc_profile=icc, xmp=xmp.encode(), comment=secret, quality=95),
        save(source, "PNG", exif=exif, icc_profile=icc, pnginfo=png_text(secret)),
        save(source, "WEBP", exif=exif, icc_profile=icc, xmp=xmp.encode()),
    ]
    for upload in uploads:
        with Image.open(io.BytesIO(upload)) as original:  # the metadata really was there to leak
            assert original.getexif().get_ifd(0x8825)[1] == "N" and "icc_profile" in original.info
        assert secret.encode() in upload

        out = encode(decode_ok(upload).pixels, fmt)

        assert secret.encode() not in out and b"SECRET" not in out
        assert b"Exif" not in out and b"ICC_PROFILE" not in out and b"iCCP" not in out
        with Image.open(io.BytesIO(out)) as reopened:
            assert not reopened.getexif()
            leaked = {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "comment", "Description"}
            assert not leaked & set(reopened.info)
            if fmt == "png":
                assert not reopened.info  # no text chunks, no dpi, nothing
                assert isinstance(reopened, PngImagePlugin.PngImageFile) and not reopened.text


@pytest.mark.parametrize("quality", [0, 101, -5, True, 50.5])
def test_encode_rejects_quality_out_of_range(photo: np.ndarray, quality: Any) -> None:
    with pytest.raises(EncodeOptionsError, match=r"quality must be an integer in \[1, 100\]"):
        encode(photo, "jpeg", quality=quality)


def test_encode_rejects_other_formats_and_shapes(photo: np.ndarray) -> None:
    with pytest.raises(EncodeOptionsError, match="output format must be one of png, jpeg, webp"):
        encode(photo, "gif")  # type: ignore[arg-type]
    for bad in (photo[:, :, :2], photo.astype(np.float32), photo[:, :, 0], np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
            encode(bad, "png")


def test_error_classes() -> None:
    for cls in (UnsupportedImageError, ImageTooLargeError, CorruptImageError):
        assert issubclass(cls, ImageError) and issubclass(cls, ToonserveError)
    # A bad quality is a request option (422), and still a ValueError for callers that expect one.
    assert issubclass(EncodeOptionsError, ToonserveError) and issubclass(EncodeOptionsError, ValueError)
    assert not issubclass(EncodeOptionsError, ImageError)
    assert set(MEDIA_TYPES) == set(OUTPUT_FORMATS)


# -- reduced decode of large PNGs and WebPs (libvips) ------------------------------------------------


def _encoded(rgb: np.ndarray, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def _large(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((1200, 900)))


@pytest.mark.parametrize(("fmt", "kw"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_large_png_and_webp_are_decoded_reduced_by_libvips(photo: np.ndarray, fmt: str, kw: Any) -> None:
    rgb = _large(photo)
    data = _encoded(rgb, fmt, **kw)
    info = probe(data, max_pixels=10**8)
    plan = plan_decode(info, (300, 400))
    assert plan.decoder == "vips" and plan.factor == 3
    assert plan.held == 300 * 400 * DECODER_COPIES["vips"]
    reduced = decode(data, max_pixels=10**8, needed=(300, 400))
    assert reduced.pixels.shape == (300, 400, 3) and reduced.original_size == (900, 1200)
    box = np.asarray(Image.fromarray(rgb).resize((400, 300), Image.Resampling.BOX), dtype=float)
    assert np.abs(reduced.pixels.astype(float) - box).mean() < 1.0  # as Pillow's box filter does
    # Too small to be worth it, or not needed: Pillow, in full.
    assert plan_decode(info, (600, 800)).decoder == "pillow"
    assert plan_decode(info, None) == DecodePlan(1, "pillow", 900 * 1200 * DECODER_COPIES[
        "pillow-webp" if fmt == "WEBP" else "pillow"])  # fmt: skip


def test_reduced_decode_keeps_orientation_transparency_and_grey(photo: np.ndarray) -> None:
    rgb = _large(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    data = _encoded(rgb, "PNG", exif=exif.tobytes())
    turned = decode(data, max_pixels=10**8, needed=(200, 150))
    assert turned.original_size == (1200, 900) and turned.pixels.shape[:2] == (200, 150)
    upright = Image.fromarray(decode(data, max_pixels=10**8).pixels).resize((150, 200), Image.Resampling.BOX)
    assert np.abs(turned.pixels.astype(float) - np.asarray(upright, dtype=float)).mean() < 1.0
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :600, 3] = 0
    clear = decode(_encoded(rgba, "PNG"), max_pixels=10**8, needed=(300, 400))
    assert clear.pixels.shape == (300, 400, 4) and clear.pixels[:, :150, 3].max() == 0
    grey = decode(_encoded(rgb[:, :, 0], "PNG"), max_pixels=10**8, needed=(300, 400))
    assert grey.pixels.shape == (300, 400, 3) and (grey.pixels[..., 0] == grey.pixels[..., 2]).all()
    palette = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    assert decode(buf.getvalue(), max_pixels=10**8, needed=(300, 400)).pixels.shape == (300, 400, 3)


def test_what_libvips_does_not_take_goes_to_pillow(photo: np.ndarray) -> None:
    rgb = _large(photo)
    wide = np.asarray(Image.fromarray(rgb).convert("I;16"))
    sixteen = probe(_encoded(wide, "PNG"), max_pixels=10**8)
    assert plan_decode(sixteen, (300, 400)).decoder == "pillow"
    assert plan_decode(replace(sixteen, mode="RGB", converts_colours=True), (300, 400)).decoder == "pillow"
    jpeg = probe(_encoded(rgb, "JPEG"), max_pixels=10**8)
    assert plan_decode(jpeg, (300, 400)) == DecodePlan(2, "pillow", 450 * 600 * DECODER_COPIES["pillow"])


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_truncated_large_file_is_corrupt_in_the_reduced_decode_too(photo: np.ndarray, fmt: str) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), np.uint8)
    data = _encoded(noisy, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert plan_decode(probe(data, max_pixels=10**8), (300, 400)).decoder == "vips"
    with pytest.raises(CorruptImageError):
        decode(data[: len(data) * 2 // 3], max_pixels=10**8, needed=(300, 400))


def test_a_lossless_webp_bomb_decodes_reduced_in_little_memory() -> None:
    """A 1.6 KB lossless WebP of 6300×6300: through Pillow 4 copies of 40 MP (600 MB), through
    libvips an image of the size asked for."""
    bomb = _encoded(np.zeros((6300, 6300, 3), np.uint8), "WEBP", lossless=True, quality=100)
    assert len(bomb) < 4096
    plan = plan_decode(probe(bomb, max_pixels=40_000_000), (1440, 1440))
    assert plan.decoder == "vips" and plan.factor == 4 and plan.held < 40_000_000 // 4
    out = decode(bomb, max_pixels=40_000_000, needed=(1440, 1440))
    assert out.pixels.shape == (1575, 1575, 3) and out.original_size == (6300, 6300)
