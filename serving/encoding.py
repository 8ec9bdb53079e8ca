"""Results to bytes: PNG, JPEG or WebP, written from a fresh image, so nothing of the upload's metadata
(EXIF, GPS, XMP, ICC, text chunks) can leak into a response. The output formats are one table
(:data:`OUTPUTS`): adding one is one entry there and its name in :data:`OutputFormat`.

PNGs are written with one row filter (:data:`PNG_WRITES`), not by Pillow, whose adaptive filter
(every filter tried on every row) was most of its time, and the pixels are the same, PNG being
lossless. The levels that filter by ``up`` (or not at all), the default among them, are written here
(:func:`_png_striped`): the rows are filtered with numpy and deflated by zlib-ng in horizontal stripes
side by side, on up to ``png_threads`` threads, each stripe starting from the 32 KiB of rows before it
as its dictionary, so the file is one ordinary zlib stream of about the size one pass writes (a few
hundred bytes more). At the default level a 1024×768 result takes 8–11 ms on two threads, where
libvips took 17–19 and Pillow 44. The ``paeth`` levels are written by libvips (libpng and zlib-ng, from
the ``pyvips-binary`` wheel): numpy's Paeth filter alone costs as much as libvips's whole write.
Without zlib-ng, libvips writes every level; without libvips, Pillow.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
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
#: (stored) 31 ms but 2306 KiB. Each level is now written in less time and no more bytes
#: (:data:`PNG_WRITES`): level 1 in stripes 2.7–10.1 ms on two threads, 4.6–18.3 on one, for
#: 151–994 KiB (a posterised photo, the demo result, the photo), where libvips took 7.5–20.4 ms. Over a
#: slow link, or for archives, raise it (or ask for JPEG/WebP, 2–3 ms and 67–170 KiB at quality 90).
DEFAULT_PNG_COMPRESSION: Final = 1

MIN_PNG_COMPRESSION: Final = 0

MAX_PNG_COMPRESSION: Final = 9

#: How each PNG compression level is written: (zlib level, row filter), the fastest pair measured
#: that writes at most about the bytes Pillow's zlib level of that number wrote (what the levels meant
#: before), on a 1024×768 demo result, a cartoon-like picture and a photo. libpng's zlib-ng level 1
#: with any filter writes 40–50 % more than Pillow's level 1 did, so level 1 is zlib 2 with the "up"
#: filter: 17 / 15 / 21 ms for 696 / 610 / 995 KiB, where Pillow took 44 / 38 / 55 ms for 710 / 638 /
#: 1048 KiB. From level 4 on, "paeth" packs tighter: level 4 38–66 ms for 558–942 KiB (Pillow 56–85 ms,
#: 570–972), level 6 111–168 ms for 534–909 KiB (Pillow 130–228 ms, 543–934), level 9 0.35–0.9 s for
#: 514–905 KiB (Pillow 0.8–2.2 s, 516–903). Level 0 stores the rows unfiltered, as Pillow's did.
#: (Those times are libvips's, which chose the pairs; levels 0–3 are now deflated in stripes by
#: zlib-ng, :func:`_png_striped`, in 0.36–0.58× libvips's time on two threads, no more bytes.
#: The "up" filter in stripes at zlib 5 beats "paeth" in time, but writes 4–5 % more than Pillow's
#: level 4 for the demo result.) ``python -m bench.request`` prints ours and Pillow's side by side.
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
    #: (ignored where lossless), a PNG compression level and the threads a PNG may be deflated on
    #: (both ignored by the others).
    write: Callable[[np.ndarray, int, int, int], bytes]


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


#: Most threads one PNG is deflated on (the ``png_threads`` setting's bound).
MAX_PNG_THREADS: Final = 16


def default_png_threads() -> int:
    """The cores, 1 to 4: a PNG's stripes run on the cores the models leave idle while it is written."""
    return max(1, min(4, os.cpu_count() or 1))


#: Filtered bytes a stripe holds at least, and most stripes per PNG. The stripes depend on the image
#: alone, never on the threads, so that a result's bytes (and ETag) are the same on every replica: a
#: 1024×768 result (2.4 MB filtered) is 9 stripes, a 256×256 one a single stream. Each seam costs a
#: sync flush and new Huffman tables, well under 0.1 % of the file.
MIN_STRIPE_BYTES: Final = 256 * 1024
MAX_STRIPES: Final = 16

#: Filtered bytes made at a time within a stripe, so that no filtered copy of a whole image is held.
_FILTER_BLOCK_BYTES: Final = 256 * 1024

#: deflate's window: each stripe starts with this much of the filtered bytes before it as dictionary.
_DEFLATE_WINDOW: Final = 32 * 1024

#: The filter type byte PNG writes before each row, for the row filters :func:`_png_striped` applies.
_ROW_FILTER_TYPES: Final[Mapping[str, int]] = MappingProxyType({"none": 0, "up": 2})

#: Adler-32's modulus (RFC 1950).
_ADLER_BASE: Final = 65521


@functools.cache
def _zlib_ng() -> Any:
    """The zlib-ng binding (``zlib-ng`` wheel), or None where it is not installed (libvips then
    writes every level)."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return None
    return zlib_ng


_stripe_pool: ThreadPoolExecutor | None = None
_stripe_pool_lock = threading.Lock()


def _stripe_workers() -> ThreadPoolExecutor:
    """The threads other stripes than the caller's own are deflated on (made on first use; zlib
    releases the GIL while it works)."""
    global _stripe_pool
    with _stripe_pool_lock:
        if _stripe_pool is None:
            _stripe_pool = ThreadPoolExecutor(MAX_PNG_THREADS - 1, thread_name_prefix="png-stripe")
        return _stripe_pool


def _filtered(rows: np.ndarray, start: int, stop: int, row_filter: str) -> np.ndarray:
    """Rows ``[start, stop)`` of ``rows`` ((H, 3W) uint8) as PNG writes them: each behind its filter
    type byte, filtered by ``none`` or ``up`` (the difference from the row above, modulo 256; the row
    above the first is zeros)."""
    out = np.empty((stop - start, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = _ROW_FILTER_TYPES[row_filter]
    if row_filter == "none":
        out[:, 1:] = rows[start:stop]
        return out
    first = start
    if start == 0:
        out[0, 1:] = rows[0]
        first = 1
    np.subtract(rows[first:stop], rows[first - 1 : stop - 1], out=out[first - start :, 1:])
    return out


def _adler32_joined(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings one after the other, from each one's and the second's length.

    Adler-32 is ``A = 1 + Σ bytes`` and ``B = Σ A after each byte`` (mod 65521), so the second string
    adds ``A₂ - 1`` to ``A``, and to ``B`` its own ``B₂`` plus ``(A₁ - 1)`` for each of its bytes.
    """
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % _ADLER_BASE
    b = (b1 + b2 + second_length * (a1 - 1)) % _ADLER_BASE
    return (b << 16) | a


@dataclass
class _Stripe:
    """One stripe deflated: its raw deflate blocks, the Adler-32 and length of its filtered bytes,
    and the CRC of ``IDAT`` and its blocks so far."""

    blocks: list[bytes]
    adler: int
    length: int
    crc: int


def _deflate_stripe(
    rows: np.ndarray, start: int, stop: int, zlib_level: int, row_filter: str, last: bool
) -> _Stripe:
    """Rows ``[start, stop)`` filtered and deflated; the first stripe's blocks begin with the zlib
    header, and every stripe but the last ends with a sync flush."""
    zng = _zlib_ng()
    options: dict[str, Any] = {}
    if start:
        # The filtered rows just before the stripe: what one deflate pass would still see in its window.
        before = _filtered(
            rows, max(0, start - (-(-_DEFLATE_WINDOW // (rows.shape[1] + 1)))), start, row_filter
        )
        options["zdict"] = before.tobytes()[-_DEFLATE_WINDOW:]
    # Raw deflate (negative window bits): the zlib header and checksum are the file's, written once.
    deflate = zng.compressobj(zlib_level, zng.DEFLATED, -zng.MAX_WBITS, **options)
    per_block = max(1, _FILTER_BLOCK_BYTES // (rows.shape[1] + 1))
    blocks, adler, length = [b"" if start else _zlib_header(zlib_level)], 1, 0
    for at in range(start, stop, per_block):
        filtered = _filtered(rows, at, min(stop, at + per_block), row_filter)
        blocks.append(deflate.compress(filtered))
        adler = zng.adler32(filtered, adler)
        length += filtered.size
    # A sync flush ends the stripe's blocks on a byte boundary, not final: the next stripe's follow.
    blocks.append(deflate.flush(zng.Z_FINISH if last else zng.Z_SYNC_FLUSH))
    crc = zng.crc32(b"IDAT")
    for block in blocks:
        crc = zng.crc32(block, crc)
    return _Stripe(blocks, adler, length, crc)


def _zlib_header(zlib_level: int) -> bytes:
    """RFC 1950's two bytes: deflate with a 32 KiB window, the level's class, and the check bits."""
    cmf = 0x78
    flg = (0 if zlib_level < 2 else 1 if zlib_level < 6 else 2 if zlib_level == 6 else 3) << 6
    flg |= (31 - (cmf * 256 + flg) % 31) % 31
    return bytes((cmf, flg))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _png_striped(rgb: np.ndarray, zlib_level: int, row_filter: str, threads: int) -> bytes:
    """A PNG of ``rgb`` whose rows are filtered by ``row_filter`` and deflated at ``zlib_level`` in
    horizontal stripes (:data:`MIN_STRIPE_BYTES`), one ``IDAT`` chunk each, deflated in runs of
    neighbouring stripes on up to ``threads`` threads (this one and the stripe workers).

    The stripes' deflate blocks, each stripe but the last ended by a sync flush, make one zlib stream;
    its Adler-32 is joined from the stripes'. A stripe starts with the 32 KiB before it as its
    dictionary, so it can refer back across the seam as one pass would.
    """
    height, width, _ = rgb.shape
    rows = rgb.reshape(height, width * 3)
    stripes = max(1, min(MAX_STRIPES, height, height * (width * 3 + 1) // MIN_STRIPE_BYTES))
    bounds = [height * i // stripes for i in range(stripes + 1)]
    runs = min(threads, stripes)

    def deflate(run: int) -> list[_Stripe]:
        return [
            _deflate_stripe(rows, bounds[i], bounds[i + 1], zlib_level, row_filter, i == stripes - 1)
            for i in range(stripes * run // runs, stripes * (run + 1) // runs)
        ]

    pool = _stripe_workers() if runs > 1 else None
    pending: list[Future[list[_Stripe]]] = [pool.submit(deflate, r) for r in range(runs - 1)] if pool else []
    own = deflate(runs - 1)
    # A run no worker has started yet (the workers busy with other PNGs) is deflated here.
    done = [
        s for r, future in enumerate(pending) for s in (deflate(r) if future.cancel() else future.result())
    ]
    done.extend(own)

    adler = done[0].adler
    for stripe in done[1:]:
        adler = _adler32_joined(adler, stripe.adler, stripe.length)
    trailer = struct.pack(">I", adler)
    done[-1].blocks.append(trailer)
    done[-1].crc = _zlib_ng().crc32(trailer, done[-1].crc)

    parts: list[bytes] = [
        _PNG_SIGNATURE,
        _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
    ]
    for stripe in done:
        parts.append(struct.pack(">I", sum(len(b) for b in stripe.blocks)) + b"IDAT")
        parts.extend(stripe.blocks)
        parts.append(struct.pack(">I", stripe.crc))
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def png_writer(level: int) -> str:
    """Which writer makes the PNGs of a compression level here: ``stripes`` (:func:`_png_striped`),
    ``libvips`` or ``pillow``. The same pixels either way, but not the same bytes: ETags name it."""
    if PNG_WRITES[level][1] in _ROW_FILTER_TYPES and _zlib_ng() is not None:
        return "stripes"
    return "libvips" if _vips() is not None else "pillow"


def write_png(rgb: np.ndarray, level: int, threads: int = 1, writer: str | None = None) -> bytes:
    """A PNG of ``rgb`` (contiguous (H, W, 3) uint8) at compression ``level``, by ``writer`` (default
    :func:`png_writer`'s; the benchmarks name one to compare them). libvips falls back to Pillow
    where it cannot write the level."""
    zlib_level, row_filter = PNG_WRITES[level]
    writer = writer or png_writer(level)
    if writer == "stripes":
        return _png_striped(rgb, zlib_level, row_filter, threads)
    vips = _vips()
    if writer == "pillow" or vips is None:
        return _pillow(rgb, "PNG", compress_level=level)
    try:
        image = vips.Image.new_from_array(rgb, interpretation="srgb")
        data = image.pngsave_buffer(compression=zlib_level, filter=row_filter, keep="none")
    except vips.Error:  # a libvips without these options (older than 8.15): Pillow writes it
        return _pillow(rgb, "PNG", compress_level=level)
    return _png_only_pixels(data)


#: The output formats: adding one means one entry here and its name in :data:`OutputFormat`.
OUTPUTS: Final[Mapping[OutputFormat, OutputSpec]] = MappingProxyType(
    {
        "png": OutputSpec("image/png", "png", lambda rgb, _q, level, threads: write_png(rgb, level, threads)),
        "jpeg": OutputSpec(
            "image/jpeg", "jpg", lambda rgb, q, _l, _t: _pillow(rgb, "JPEG", quality=q, optimize=False)
        ),
        "webp": OutputSpec(
            "image/webp", "webp", lambda rgb, q, _l, _t: _pillow(rgb, "WEBP", quality=q, method=WEBP_METHOD)
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
    png_threads: int = 1,
) -> bytes:
    """(H, W, 3) uint8 RGB → the bytes of a PNG, JPEG or WebP file, with no metadata at all.

    ``quality`` (1–100) applies to JPEG and WebP; PNG is lossless and ignores it (it is still
    validated, so a bad request fails the same way whatever the format). ``png_compression`` (0–9)
    is PNG's compression level, 0 stored to 9 smallest (how each is written: :data:`PNG_WRITES`);
    ``png_threads`` (1 to :data:`MAX_PNG_THREADS`) the most threads a large PNG is deflated on at once,
    this one included.
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
    if not 1 <= png_threads <= MAX_PNG_THREADS:
        raise ValueError(f"png_threads must be in [1, {MAX_PNG_THREADS}], got {png_threads}")
    return OUTPUTS[fmt].write(np.ascontiguousarray(rgb), quality, png_compression, png_threads)


assert set(OUTPUTS) == set(OUTPUT_FORMATS), "OutputFormat and OUTPUTS must list the same formats"
