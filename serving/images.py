"""Uploads to pixels at the service boundary: decode and validate them (results go out through
:mod:`serving.encoding`).

Uploads come from anyone, so :func:`decode` treats every byte as hostile and never lets a Pillow
exception escape: the format is decided by the file's content (never its name or content type) and
restricted to :data:`ALLOWED_FORMATS`; the declared size is checked against the pixel limit before
any pixel is decoded; truncated and damaged files are refused rather than half-decoded. Everything it
refuses raises an :class:`ImageError`:

- :class:`UnsupportedImageError`: not one of the allowed formats (or a pixel format we cannot read);
- :class:`ImageTooLargeError`: over the byte or pixel limit, or a decompression bomb;
- :class:`CorruptImageError`: empty, truncated or damaged.

The result is what the pipeline wants: (H, W, 3) uint8 RGB, or (H, W, 4) uint8 RGBA when the image is
really transparent, upright (EXIF orientation applied), in sRGB (an embedded ICC profile is converted),
8 bits a channel (16-bit samples are scaled, not clipped): :mod:`serving.colour` does the conversions.

When the caller needs less than the whole image (``decode(needed=...)``), large files are decoded at
a reduced scale (:func:`plan_decode`): JPEGs by Pillow's DCT scaling (1/2, 1/4, 1/8), 8-bit PNGs and
WebPs by libvips (pyvips): libwebp scales while it decodes, and a PNG streams through a box shrink
row by row, so a 6300×6300 lossless WebP of 1.6 KB is never 160 MB of pixels. Every decode says
what it holds at its peak (:attr:`DecodePlan.held`), so a caller can budget decodes by what they
really allocate.

"""

from __future__ import annotations

import functools
import io
import struct
import threading
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, BinaryIO, Final, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from inference.errors import ToonserveError
from serving.colour import (
    UnsupportedPixelsError,
    converts_colours,
    drop_opaque_alpha,
    to_pixels,
)

InputFormat = Literal["jpeg", "png", "webp", "bmp", "tiff", "gif"]

#: Formats :func:`decode` accepts (decided by content).
ALLOWED_FORMATS: Final[tuple[InputFormat, ...]] = ("jpeg", "png", "webp", "bmp", "tiff", "gif")

#: Default limits for uploads: 40 MP decodes to 160 MB as RGBA; 20 MiB holds any sane photo.
DEFAULT_MAX_PIXELS: Final = 40_000_000
DEFAULT_MAX_BYTES: Final = 20 * 1024 * 1024
#: TIFF pages are counted up to this many (see :func:`_count_frames`); only the first is decoded.
MAX_COUNTED_PAGES: Final = 100
#: Bytes of a file on disk read to tell its format (signatures, WebP's first chunk, an SVG's start).
_HEAD_BYTES: Final = 4096


# Our format names ↔ Pillow's. Pillow opens a JPEG with an MPO (multi-picture) index, as phones write
# them, as "MPO"; it is a JPEG whose first picture is the photo.
_PILLOW_NAMES: Final[Mapping[InputFormat, str]] = MappingProxyType(
    {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
)
_FROM_PILLOW: Final[Mapping[str, InputFormat]] = MappingProxyType(
    {**{pil: ours for ours, pil in _PILLOW_NAMES.items()}, "MPO": "jpeg"}
)
_DISPLAY_NAMES: Final[Mapping[InputFormat, str]] = MappingProxyType(
    {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
)
_ALLOWED_TEXT: Final = "JPEG, PNG, WebP, BMP, TIFF or GIF"

# Signatures of the allowed formats, at offset 0 (WebP: RIFF....WEBP, checked apart).
_SIGNATURES: Final[tuple[tuple[bytes, InputFormat], ...]] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
# Signatures of formats people do send but we refuse, only to name them in the message.
_KNOWN_REFUSED: Final[tuple[tuple[bytes, str], ...]] = (
    (b"%PDF", "a PDF file"),
    (b"%!PS", "a PostScript file"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"icns", "an ICNS icon"),
    (b"qoif", "a QOI image"),
    (b"DDS ", "a DDS texture"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xffO\xffQ", "a JPEG 2000 image"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
)
_HEIF_BRANDS: Final[Mapping[bytes, str]] = MappingProxyType(
    {
        **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"), "a HEIC image"),
        **dict.fromkeys((b"mif1", b"msf1"), "a HEIF image"),
        **dict.fromkeys((b"avif", b"avis"), "an AVIF image"),
    }
)

# What Pillow raises on damaged input, besides its DecompressionBomb* (handled apart). Pillow's own
# format probing treats SyntaxError, IndexError, TypeError and struct.error as "not this format"; the
# rest come out of decoders (OSError: truncated, decoder error), header parsers and zlib. Warning: on
# damaged metadata Pillow warns ("Corrupt EXIF data"); where warnings are errors (pytest -W error,
# python -W error) that warning is raised, and must still not become a 500.
_DECODE_FAILURES: Final[tuple[type[Exception], ...]] = (
    Warning,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
    zlib.error,
)

_TRANSPOSE_FOR_ORIENTATION: Final[Mapping[int, Image.Transpose]] = MappingProxyType(
    {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }
)
_EXIF_ORIENTATION: Final = 0x0112

# warnings.catch_warnings() swaps the process-wide filter list; two threads doing it at once can leave
# our filter installed for good. Decodes run on worker threads, so they take turns (only Image.open,
# which reads headers, runs under it).
_WARNINGS_LOCK: Final = threading.Lock()


class ImageError(ToonserveError):
    """An uploaded image that :func:`decode` refuses."""


class UnsupportedImageError(ImageError):
    """Not one of the allowed formats (decided by content), or a pixel format we cannot convert."""


class ImageTooLargeError(ImageError):
    """Over the byte or pixel limit, or a decompression bomb."""


class CorruptImageError(ImageError):
    """Empty, truncated or damaged: the format is recognised but the file does not decode."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload.

    ``pixels``: (H, W, 3) uint8 RGB, or (H, W, 4) uint8 RGBA (straight alpha) when the image has
    pixels that are not fully opaque; sRGB, upright, C-contiguous and writable.
    ``format``: the format found in the content (one of :data:`ALLOWED_FORMATS`).
    ``original_size``: (height, width) after the EXIF orientation: ``pixels.shape[:2]``, unless the
    image was decoded at a reduced scale (``decode(needed=...)``), when ``pixels`` is 1/2, 1/4 or 1/8 of it.
    ``mode``: Pillow's mode of the file as stored (e.g. "P", "CMYK", "I;16").
    ``frames``: frames (pages) in the file, TIFF pages counted up to :data:`MAX_COUNTED_PAGES`; only
    the first is decoded.
    """

    pixels: np.ndarray
    format: InputFormat
    original_size: tuple[int, int]
    mode: str
    frames: int


#: JPEG can be decoded at these fractions of its size, for a fraction of the work (DCT scaling).
JPEG_SCALES: Final = (8, 4, 2, 1)
#: Formats libvips decodes at a reduced scale when they are 8-bit and need no colour conversion.
VIPS_FORMATS: Final[frozenset[InputFormat]] = frozenset({"png", "webp"})
_VIPS_MODES: Final = frozenset({"L", "LA", "P", "PA", "RGB", "RGBA"})
#: Copies of the decoded image a decoder holds at its peak. Pillow: its image (4 bytes a pixel), the
#: bytes numpy is made from and the array; for WebP also libwebp's canvas (4 bytes a pixel; measured
#: with memray: 6300×6300 lossless WebP, 151 + 151 + 114 + 114 MB). libvips streams: the array and
#: what it is made from.
DECODER_COPIES: Final[Mapping[str, int]] = MappingProxyType({"pillow": 3, "pillow-webp": 4, "vips": 2})
#: The most copies any decode holds (the budget of decodes in flight must hold the largest photo).
MAX_DECODER_COPIES: Final = max(DECODER_COPIES.values())

Decoder = Literal["pillow", "vips"]


def reduction(format: InputFormat, size: tuple[int, int], needed: tuple[int, int] | None) -> int:
    """The factor Pillow divides a JPEG's sides by when only ``needed`` (height, width) is needed of
    an image of ``size`` (height, width): the largest JPEG scale that keeps both sides at least
    ``needed`` (Pillow's ``draft`` rule); 1 for other formats or when nothing smaller will do."""
    if format != "jpeg" or needed is None:
        return 1
    fit = min(size[0] // max(1, needed[0]), size[1] // max(1, needed[1]))
    return next(s for s in JPEG_SCALES if s <= max(1, fit))


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`decode` will decode a file for a caller that needs ``needed`` of it."""

    #: Sides divided by (1: full size).
    factor: int
    decoder: Decoder
    #: Pixels held at the decode's peak: the decoded pixels times the copies the decoder holds.
    held: int

    @property
    def reduced(self) -> bool:
        return self.factor > 1


def plan_decode(info: ImageInfo, needed: tuple[int, int] | None) -> DecodePlan:
    """The plan for a file of ``info``: a JPEG scaled by Pillow (:func:`reduction`); an 8-bit PNG or
    WebP with no colour profile to convert, at least twice as large as ``needed``, shrunk by libvips
    while decoding (by the largest whole factor that keeps ``needed``); anything else in full by
    Pillow."""
    size = (info.height, info.width)
    factor, decoder = reduction(info.format, size, needed), "pillow"
    if (
        needed is not None
        and info.format in VIPS_FORMATS
        and info.mode in _VIPS_MODES
        and not info.converts_colours
        and _vips() is not None
    ):
        fit = min(size[0] // max(1, needed[0]), size[1] // max(1, needed[1]))
        if fit >= 2:
            factor, decoder = fit, "vips"
    pixels = -(-size[0] // factor) * -(-size[1] // factor)
    copies = DECODER_COPIES["pillow-webp" if decoder == "pillow" and info.format == "webp" else decoder]
    return DecodePlan(factor, decoder, pixels * copies)  # type: ignore[arg-type]


@functools.cache
def _vips() -> Any:
    """pyvips, set up for decoding uploads (no operation cache: nothing decoded is kept), or None when
    libvips cannot be loaded (then Pillow decodes everything in full)."""
    try:
        import pyvips
    except (ImportError, OSError):  # no wheel for this platform, or no libvips
        return None
    pyvips.cache_set_max(0)
    return pyvips


def decode(
    data: bytes, *, max_pixels: int, max_bytes: int | None = None, needed: tuple[int, int] | None = None
) -> DecodedImage:
    """Decode an uploaded image (first frame) to uint8 RGB or RGBA; see :class:`DecodedImage`.

    ``needed``: the (height, width) the caller will use of the upright image at most; the file is
    then decoded at a reduced scale when it is large enough (:func:`plan_decode`: a JPEG at 1/2, 1/4 or
    1/8, an 8-bit PNG or WebP by libvips at any whole factor), which costs a fraction of the time
    and memory. ``original_size`` is the full size either way.

    Raises :class:`UnsupportedImageError`, :class:`ImageTooLargeError` or :class:`CorruptImageError`,
    never a Pillow or libvips exception. The pixel limit is checked against the size declared in the
    header, before any pixel is decoded. Pillow's own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, 89.5 MP by default) also applies, so a ``max_pixels`` above it is
    capped there.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(
            f"the file is {_bytes_text(len(data))}; the limit is {_bytes_text(max_bytes)}"
        )
    fmt, im = _open_checked(data, max_pixels)
    name = _DISPLAY_NAMES[fmt]
    try:
        detected = _FROM_PILLOW.get(im.format or "")
        if detected is None:  # cannot happen with `formats=` restricted, but never trust it blindly
            raise UnsupportedImageError(f"{im.format} images are not supported; send {_ALLOWED_TEXT}")
        mode = im.mode
        orientation = _orientation(im)
        turned = orientation in _SWAPS_SIDES
        original = (im.width, im.height) if turned else (im.height, im.width)
        plan = plan_decode(_info(detected, im, orientation), needed)
        try:
            frames = _count_frames(im)
            if plan.decoder == "pillow":
                if plan.reduced:
                    # Pillow's draft picks the largest DCT scale whose result is at least this size.
                    im.draft(im.mode, (im.width // plan.factor, im.height // plan.factor))
                im.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"the {name} image is too large to decode safely") from exc
        except _DECODE_FAILURES as exc:
            raise CorruptImageError(f"the {name} file is truncated or damaged: {_reason(exc)}") from exc
        if plan.decoder == "vips":
            pixels = _vips_pixels(data, detected, plan.factor, name)
            method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)
            if method is not None:
                pixels = np.array(Image.fromarray(pixels).transpose(method))
        else:
            upright = _apply_orientation(im)
            try:
                pixels = to_pixels(upright)
            except UnsupportedPixelsError as exc:
                raise UnsupportedImageError(str(exc)) from exc
            except _DECODE_FAILURES as exc:
                raise CorruptImageError(f"the {name} file is truncated or damaged: {_reason(exc)}") from exc
    finally:
        im.close()
    return DecodedImage(pixels=pixels, format=detected, original_size=original, mode=mode, frames=frames)


def _vips_pixels(data: bytes, fmt: InputFormat, factor: int, name: str) -> np.ndarray:
    """An 8-bit PNG or WebP decoded by libvips at 1/``factor`` of its size (as stored), as (h, w, 3)
    RGB or (h, w, 4) RGBA uint8. A WebP is scaled by libwebp while it decodes; a PNG streams through
    a box shrink (each output pixel the mean of factor × factor pixels, as Pillow's BOX filter)."""
    vips = _vips()
    try:
        if fmt == "webp":
            image = vips.Image.new_from_buffer(
                data, "", scale=1 / factor, access="sequential", fail_on="error"
            )
        else:
            image = vips.Image.new_from_buffer(data, "", access="sequential", fail_on="error")
            image = image.shrink(factor, factor)
        if image.format != "uchar" or not 1 <= image.bands <= 4:
            raise UnsupportedImageError(f"{name} images of this pixel format are not supported")
        pixels = np.asarray(image.numpy()).reshape(image.height, image.width, image.bands)
    except vips.Error as exc:
        detail = str(exc).strip().splitlines()
        reason = detail[1] if len(detail) > 1 else (detail[0] if detail else "damaged")
        raise CorruptImageError(f"the {name} file is truncated or damaged: {reason.strip()}") from exc
    bands = pixels.shape[2]
    if bands in (1, 2):  # grey (and alpha): to RGB (and alpha)
        pixels = np.concatenate([pixels[:, :, :1]] * 3 + ([pixels[:, :, 1:]] if bands == 2 else []), axis=2)
    return drop_opaque_alpha(np.ascontiguousarray(pixels))


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe` learns from a file's header: its format, its upright size, and what decides
    how it can be decoded (:func:`plan_decode`)."""

    format: InputFormat
    width: int
    height: int
    #: Pillow's mode of the file as stored ("RGB", "P", "I;16", …).
    mode: str = "RGB"
    #: It embeds a colour profile that decoding converts to sRGB (not an sRGB one).
    converts_colours: bool = False


def _info(fmt: InputFormat, im: Image.Image, orientation: int) -> ImageInfo:
    width, height = im.size
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return ImageInfo(fmt, width, height, im.mode, converts_colours(im))


def probe(data: bytes | BinaryIO, *, max_pixels: int) -> ImageInfo:
    """Check an upload without decoding its pixels: an allowed format (decided by content), a
    readable header, a declared size within ``max_pixels``. Raises the errors :func:`decode` raises
    for those; damage in the pixel data is only found by :func:`decode`. The size is upright (the
    EXIF orientation applied), as :func:`decode` will return it.

    ``data`` may be a seekable binary file, read from its start: then only the header is read (a
    photo on disk is never loaded whole to be checked), and the file is left at its start."""
    fmt, im = _open_checked(data, max_pixels)
    try:
        return _info(fmt, im, _orientation(im))
    finally:
        im.close()
        if not isinstance(data, bytes):
            data.seek(0)


@dataclass(frozen=True)
class HeaderFacts:
    """What an image's header says that decides how :func:`decode` turns it into pixels; lets another
    decoder (the GPU JPEG decoder, :mod:`serving.gpu_codec`) tell whether it would do the same."""

    #: Pillow's format name ("JPEG"; "MPO" for a JPEG with a multi-picture index, …).
    pillow_format: str
    #: Pillow's mode of the file as stored ("RGB" for a YCbCr or RGB JPEG, "L", "CMYK", …).
    mode: str
    #: (width, height) as stored, before the orientation is applied.
    stored_size: tuple[int, int]
    #: EXIF orientation, 1 when absent or unreadable.
    orientation: int
    #: An embedded colour profile that :func:`decode` converts to sRGB (not an sRGB one).
    converts_colours: bool

    @property
    def transpose(self) -> Image.Transpose | None:
        """The turn :func:`decode` applies for the orientation (None: upright already)."""
        return _TRANSPOSE_FOR_ORIENTATION.get(self.orientation)


def header_facts(data: bytes, *, max_pixels: int) -> HeaderFacts:
    """:class:`HeaderFacts` from the header alone; raises what :func:`probe` raises."""
    if not data:
        raise CorruptImageError("the file is empty")
    im = _open(data, _sniff(data), max_pixels)
    try:
        _check_pixels(im.width, im.height, max_pixels)
        converts = converts_colours(im)
        return HeaderFacts(im.format or "", im.mode, (im.width, im.height), _orientation(im), converts)
    finally:
        im.close()


# -- decoding steps ---------------------------------------------------------------------------------


def _sniff(data: bytes) -> InputFormat:
    """The allowed format the content starts like, or :class:`UnsupportedImageError` naming it."""
    for signature, fmt in _SIGNATURES:
        if data.startswith(signature):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise UnsupportedImageError(f"{_describe_refused(data)} is not supported; send {_ALLOWED_TEXT}")


def _describe_refused(data: bytes) -> str:
    for signature, what in _KNOWN_REFUSED:
        if data.startswith(signature):
            return what
    if data[4:8] == b"ftyp" and (brand := _HEIF_BRANDS.get(data[8:12])):
        return brand
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        return "an SVG file"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    return "this type of file"


def _webp_declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP's first chunk header (VP8X canvas, VP8 frame or VP8L), if readable."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


class _Borrowed:
    """A caller's file lent to Pillow: read and seek go through, close does not (Pillow closes the
    file of an image it closes, and the caller still needs it)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        pass


def _head(source: bytes | BinaryIO) -> bytes:
    """The first bytes of an upload (all of it when it is bytes), the file left at its start."""
    if isinstance(source, bytes):
        return source
    source.seek(0)
    head = source.read(_HEAD_BYTES)
    source.seek(0)
    return head


def _open_checked(source: bytes | BinaryIO, max_pixels: int) -> tuple[InputFormat, Image.Image]:
    """The upload's format (by content) and its image opened on the header only, its declared size
    checked against ``max_pixels`` before any pixel is decoded; the caller closes it."""
    head = _head(source)
    if not head:
        raise CorruptImageError("the file is empty")
    fmt = _sniff(head)
    if fmt == "webp":
        # libwebp allocates its canvas when Pillow opens the file: check the declared size first.
        declared = _webp_declared_size(head)
        if declared is not None:
            _check_pixels(*declared, max_pixels)
    im = _open(source, fmt, max_pixels)
    try:
        _check_pixels(im.width, im.height, max_pixels)
    except BaseException:
        im.close()
        raise
    return fmt, im


def _open(source: bytes | BinaryIO, fmt: InputFormat, max_pixels: int) -> Image.Image:
    """Image.open restricted to the sniffed format: reads the header only (size, mode, metadata)."""
    stream: Any = io.BytesIO(source) if isinstance(source, bytes) else _Borrowed(source)
    name = _DISPLAY_NAMES[fmt]
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Over Image.MAX_IMAGE_PIXELS Pillow only warns; refuse instead (the image is over our limit
            # too unless max_pixels was set above Pillow's).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream, formats=[_PILLOW_NAMES[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow checked the declared size before we could; its threshold is all we know of the size.
        over = Image.MAX_IMAGE_PIXELS or 0
        if isinstance(exc, Image.DecompressionBombError):
            over *= 2
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageTooLargeError(
            f"the {name} image declares more than {_pixels_text(over)}; the limit is {_pixels_text(limit)}"
        ) from exc
    except UnidentifiedImageError as exc:
        # The content starts like `fmt` (we sniffed it), so Pillow failing to read its header is damage.
        raise CorruptImageError(f"the file starts like a {name} image but its header is damaged") from exc
    except _DECODE_FAILURES as exc:
        raise CorruptImageError(
            f"the file starts like a {name} image but cannot be read: {_reason(exc)}"
        ) from exc


def _count_frames(im: Image.Image) -> int:
    """Frames (pages) in the file, from their headers; leaves the image on frame 0.

    GIF frames are counted by a linear walk over their headers, the other formats declare the count.
    TIFF pages are counted up to :data:`MAX_COUNTED_PAGES` only: Pillow's ``n_frames`` walks every
    page in quadratic time (50 000 tiny pages, 4 MB, take 10 s).
    """
    if im.format != "TIFF":
        return int(getattr(im, "n_frames", 1))
    count = 1
    try:
        while count < MAX_COUNTED_PAGES:
            im.seek(count)
            count += 1
    except EOFError:
        pass
    im.seek(0)
    return count


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise CorruptImageError(f"the image declares an empty size ({width}×{height})")
    if width * height > max_pixels:
        size = f"{width}×{height} = {_pixels_text(width * height)}"
        raise ImageTooLargeError(f"image is {size}; the limit is {_pixels_text(max_pixels)}")


#: EXIF orientations that turn the image a quarter: stored width and height swap.
_SWAPS_SIDES: Final = frozenset({5, 6, 7, 8})


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP, or TIFF tag) orientation, 1 when absent or unreadable (it is metadata: the
    pixels are fine without it)."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_FAILURES:
        return 1
    return orientation if isinstance(orientation, int) else 1


def _apply_orientation(im: Image.Image) -> Image.Image:
    """The loaded image turned upright by its orientation."""
    method = _TRANSPOSE_FOR_ORIENTATION.get(_orientation(im))
    return im if method is None else im.transpose(method)  # transpose keeps `info` (ICC, transparency)


# -- messages ---------------------------------------------------------------------------------------


def _pixels_text(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _bytes_text(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} bytes"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
