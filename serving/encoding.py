"""Results to bytes: PNG, JPEG or WebP, written from a fresh image, so nothing of the upload's metadata
(EXIF, GPS, XMP, ICC, text chunks) can leak into a response. The output formats are one table
(:data:`OUTPUTS`): adding one is one entry there and its name in :data:`OutputFormat`.

PNG is written by libvips (libpng and zlib-ng, from the ``pyvips-binary`` wheel) with one row filter,
not by Pillow, whose adaptive filter (every filter tried on every row) was most of its time: at the
default level a 1024×768 result takes 15–21 ms instead of 38–55, and a few per cent fewer bytes
(:data:`PNG_WRITES`). The pixels are the same, PNG being lossless. Without libvips, Pillow writes it.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

import numpy as np
from PIL import Image

from inference.errors import ToonserveError

OutputFormat = Literal["png", "jpeg", "webp"]

#: What a response is encoded as when the request does not say.
DEFAULT_OUTPUT_FORMAT: Final[OutputFormat] = "png"

#: Default encoder quality (JPEG, WebP) and its range.
DEFAULT_QUALITY: Final = 90

MIN_QUALITY: Final = 1

MAX_QUALITY: Final = 100

#: PNG compression level (0 none … 9 smallest), by default the fastest level that compresses. Measured
#: on a 1024×768 cartoon and photo when Pillow wrote PNGs (zlib-ng): level 1 took 58–62 ms for 710 /
#: 1048 KiB, level 4 92–103 ms for 589 / 972 KiB, level 6 235–247 ms, level 9 0.9–2.7 s; level 0
#: (stored) 31 ms but 2306 KiB. libvips now writes each level in less time and no more bytes
#: (:data:`PNG_WRITES`: level 1 15–21 ms for 610–995 KiB). Over a slow link, or for archives, raise it
#: (or ask for JPEG/WebP, 2–3 ms and 67–170 KiB at quality 90).
DEFAULT_PNG_COMPRESSION: Final = 1

MIN_PNG_COMPRESSION: Final = 0

MAX_PNG_COMPRESSION: Final = 9

#: How libvips writes each PNG compression level: (zlib level, row filter), the fastest pair measured
#: that writes at most about the bytes Pillow's zlib level of that number wrote (what the levels meant
#: before), on a 1024×768 demo result, a cartoon-like picture and a photo. libpng's zlib-ng level 1
#: with any filter writes 40–50 % more than Pillow's level 1 did, so level 1 is zlib 2 with the "up"
#: filter: 17 / 15 / 21 ms for 696 / 610 / 995 KiB, where Pillow took 44 / 38 / 55 ms for 710 / 638 /
#: 1048 KiB. From level 4 on, "paeth" packs tighter: level 4 38–66 ms for 558–942 KiB (Pillow 56–85 ms,
#: 570–972), level 6 111–168 ms for 534–909 KiB (Pillow 130–228 ms, 543–934), level 9 0.35–0.9 s for
#: 514–905 KiB (Pillow 0.8–2.2 s, 516–903). Level 0 stores the rows unfiltered, as Pillow's did.
#: ``python -m bench.request`` prints both side by side for its result.
PNG_WRITES: Final[Mapping[int, tuple[int, str]]] = MappingProxyType(
    {
        0: (0, "none"),
        1: (2, "up"),
        2: (3, "up"),
        3: (4, "up"),
        4: (5, "paeth"),
        5: (6, "paeth"),
        6: (7, "paeth"),
        7: (7, "paeth"),
        8: (8, "paeth"),
        9: (9, "paeth"),
    }
)

#: libwebp effort (0 fast … 6 small), libwebp's own default and the knee. Measured on the same images
#: at quality 90: methods 0–2 take half the time of 3–4, but need 3–5 % more bytes for the same PSNR
#: (methods ≥ 3 turn on rate-distortion optimisation); 3 and 4 cost the same; 5 saves 1–2 % for +15 %;
#: 6 saves 2–4 % for 2.5×.
WEBP_METHOD: Final = 4


@dataclass(frozen=True)
class OutputSpec:
    """How :func:`encode` writes one output format."""

    media_type: str
    #: File name suffix for saved results (ZIP entries, the CLI, downloads).
    suffix: str
    #: The file's bytes, with no metadata, of a contiguous (H, W, 3) uint8 RGB array, at a quality
    #: (ignored where lossless) and a PNG compression level (ignored by the others).
    write: Callable[[np.ndarray, int, int], bytes]


def _pillow(rgb: np.ndarray, fmt: str, **params: Any) -> bytes:
    # A fresh image has an empty `info`, so the encoders write no EXIF, XMP, ICC or text.
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt, **params)
    return out.getvalue()


@functools.cache
def _vips() -> Any:
    """pyvips with no operation cache (it would hold results' pixels), or None when libvips cannot be
    loaded (Pillow then writes PNGs)."""
    try:
        import pyvips
    except (ImportError, OSError):  # no wheel for this platform, or no libvips
        return None
    pyvips.cache_set_max(0)
    return pyvips


#: The chunks of a PNG written here: libvips adds pHYs (a resolution nobody gave), which goes.
_PNG_KEPT_CHUNKS: Final = frozenset({b"IHDR", b"IDAT", b"IEND"})
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def _png_only_pixels(data: bytes) -> bytes:
    """A PNG file without the chunks outside :data:`_PNG_KEPT_CHUNKS` (all ancillary here)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("libvips did not write a PNG")
    view = memoryview(data)
    parts: list[bytes | memoryview] = [_PNG_SIGNATURE]
    at = len(_PNG_SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        end = at + 12 + length  # length, type, data, CRC
        if data[at + 4 : at + 8] in _PNG_KEPT_CHUNKS:
            parts.append(view[at:end])
        at = end
    return b"".join(parts)


def _png(rgb: np.ndarray, level: int) -> bytes:
    vips = _vips()
    if vips is None:
        return _pillow(rgb, "PNG", compress_level=level)
    zlib_level, row_filter = PNG_WRITES[level]
    try:
        image = vips.Image.new_from_array(rgb, interpretation="srgb")
        data = image.pngsave_buffer(compression=zlib_level, filter=row_filter, keep="none")
    except vips.Error:  # a libvips without these options (older than 8.15): Pillow writes it
        return _pillow(rgb, "PNG", compress_level=level)
    return _png_only_pixels(data)


#: The output formats: adding one means one entry here and its name in :data:`OutputFormat`.
OUTPUTS: Final[Mapping[OutputFormat, OutputSpec]] = MappingProxyType(
    {
        "png": OutputSpec("image/png", "png", lambda rgb, _q, level: _png(rgb, level)),
        "jpeg": OutputSpec(
            "image/jpeg", "jpg", lambda rgb, q, _l: _pillow(rgb, "JPEG", quality=q, optimize=False)
        ),
        "webp": OutputSpec(
            "image/webp", "webp", lambda rgb, q, _l: _pillow(rgb, "WEBP", quality=q, method=WEBP_METHOD)
        ),
    }
)

OUTPUT_FORMATS: Final[tuple[OutputFormat, ...]] = get_args(OutputFormat)

MEDIA_TYPES: Final[Mapping[OutputFormat, str]] = MappingProxyType(
    {name: spec.media_type for name, spec in OUTPUTS.items()}
)


class EncodeOptionsError(ToonserveError, ValueError):
    """An output format or quality out of range (a request option, not a programming error)."""


def encode(
    rgb: np.ndarray,
    fmt: OutputFormat,
    quality: int = DEFAULT_QUALITY,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
) -> bytes:
    """(H, W, 3) uint8 RGB → the bytes of a PNG, JPEG or WebP file, with no metadata at all.

    ``quality`` (1–100) applies to JPEG and WebP; PNG is lossless and ignores it (it is still
    validated, so a bad request fails the same way whatever the format). ``png_compression`` (0–9)
    is PNG's compression level, 0 stored to 9 smallest (how each is written: :data:`PNG_WRITES`).
    """
    if fmt not in OUTPUT_FORMATS:
        raise EncodeOptionsError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    # bool is an int; a quality of True is a bug upstream, not 1.
    if isinstance(quality, bool) or not isinstance(quality, int) or not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise EncodeOptionsError(
            f"quality must be an integer in [{MIN_QUALITY}, {MAX_QUALITY}], got {quality!r}"
        )
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"encode needs an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    if not MIN_PNG_COMPRESSION <= png_compression <= MAX_PNG_COMPRESSION:
        raise EncodeOptionsError(f"PNG compression must be in [0, 9], got {png_compression}")
    return OUTPUTS[fmt].write(np.ascontiguousarray(rgb), quality, png_compression)


assert set(OUTPUTS) == set(OUTPUT_FORMATS), "OutputFormat and OUTPUTS must list the same formats"
