"""Results to bytes: PNG, JPEG or WebP, written from a fresh image, so nothing of the upload's metadata
(EXIF, GPS, XMP, ICC, text chunks) can leak into a response. The output formats are one table
(:data:`OUTPUTS`): adding one is one entry there and its name in :data:`OutputFormat`."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, get_args

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

#: zlib level for PNG (0 none … 9 smallest), by default the fastest level that compresses. Measured on
#: a 1024×768 cartoon and photo with Pillow's zlib-ng on this project's CPU (bench/request.py prints
#: it again): level 1 took 58–62 ms for 710 / 1048 KiB, level 4 (the previous default) 92–103 ms for
#: 589 / 972 KiB, level 6 235–247 ms, level 9 0.9–2.7 s; level 0 (stored) 31 ms but 2306 KiB. So 1
#: trades 7–20 % more bytes for a third less encode time — the better deal on a LAN; over a slow link,
#: or for archives, raise it (or ask for JPEG/WebP, 2–3 ms and 67–170 KiB at quality 90).
DEFAULT_PNG_COMPRESSION: Final = 1

MIN_PNG_COMPRESSION: Final = 0

MAX_PNG_COMPRESSION: Final = 9

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
    #: Writes a fresh (metadata-free) image to a stream at a quality (ignored where lossless) and a
    #: PNG compression level (ignored by the others).
    save: Callable[[Image.Image, io.BytesIO, int, int], None]


#: The output formats: adding one means one entry here and its name in :data:`OutputFormat`.
OUTPUTS: Final[Mapping[OutputFormat, OutputSpec]] = MappingProxyType(
    {
        "png": OutputSpec(
            "image/png", "png", lambda im, out, _q, level: im.save(out, "PNG", compress_level=level)
        ),
        "jpeg": OutputSpec(
            "image/jpeg", "jpg", lambda im, out, q, _l: im.save(out, "JPEG", quality=q, optimize=False)
        ),
        "webp": OutputSpec(
            "image/webp", "webp", lambda im, out, q, _l: im.save(out, "WEBP", quality=q, method=WEBP_METHOD)
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
    is PNG's zlib level.
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
    # A fresh image has an empty `info`, so the encoders write no EXIF, XMP, ICC or text.
    im = Image.fromarray(np.ascontiguousarray(rgb))
    out = io.BytesIO()
    if not MIN_PNG_COMPRESSION <= png_compression <= MAX_PNG_COMPRESSION:
        raise EncodeOptionsError(f"PNG compression must be in [0, 9], got {png_compression}")
    OUTPUTS[fmt].save(im, out, quality, png_compression)
    return out.getvalue()


assert set(OUTPUTS) == set(OUTPUT_FORMATS), "OutputFormat and OUTPUTS must list the same formats"
