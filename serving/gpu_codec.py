"""JPEG decode and encode on a CUDA device (nvJPEG, through torchvision), with Pillow as the fallback.

:class:`GpuCodec` exists only where the engine's device is CUDA, ``torchvision.io`` imports, and a
self-test (a small JPEG decoded and encoded on the device) passes: :meth:`GpuCodec.create` returns
None otherwise, and the flow (:mod:`serving.flow`) then decodes and encodes with Pillow exactly as
before. Nothing here runs, or is imported, on a CPU service.

**Decode.** An upload goes to the GPU only if it is a JPEG nvJPEG decodes the way :func:`decode`
would (:func:`refusal` says why not, read from the header alone, before any decoding):

* baseline (SOF0), 8-bit, three components coded as YCbCr (not Adobe's RGB coding), with chroma
  sampled 1×1 and luma 1×1, 2×1, 1×2 or 2×2 (4:4:4, 4:2:2, 4:4:0, 4:2:0);
* a single picture (no MPO index), ending with its EOI marker (a truncated file goes to Pillow,
  which refuses it), the same size in its SOF as in Pillow's reading of the header;
* no colour profile that :func:`decode` would convert to sRGB (an sRGB one is fine).

Everything else goes to Pillow: progressive, arithmetic-coded, lossless or hierarchical JPEGs,
12-bit samples, greyscale, CMYK/YCCK, odd sampling, other formats. The EXIF orientation is applied
on the device (:func:`inference.device_image.transpose`, Pillow's turns), and the pixel limits are
checked from the header as for every upload. If nvJPEG fails anyway, the upload goes to Pillow
(which refuses damaged files with the usual message).

On the device the picture is decoded at full size (nvJPEG has no reduced-scale decode, so the
flow's 1/2–1/8 DCT-scaled decode does not apply), turned upright, and brought to the processing
size with the host's arithmetic (OpenCV's, :func:`inference.device_image.resize_like_host`); the pixels stay
on the device for the pipeline. They differ from the Pillow path's by the two decoders' IDCT and
chroma upsampling, and by the reduced-scale decode the Pillow path may use: ``bench/gpu.sh``
measures it.

**Encode.** A JPEG result the pipeline kept on the device (``Options.device_result``) is encoded by
nvJPEG; any failure falls back to Pillow. The bytes differ from Pillow's (another encoder);
``bench/gpu.sh`` compares their sizes and their fidelity to the image.

Streams: decodes and encodes run on a stream of the calling (codec) thread, so that the worker,
which runs the models on the default stream and waits only for it, never waits for them. A decode
waits for its stream before handing the pixels over and marks them as used on the default stream,
where the worker reads them; an encode first waits for the default stream, where the image was made.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from inference.device_image import resize_like_host, transpose
from serving.encoding import MAX_QUALITY, MIN_QUALITY
from serving.images import ImageError, header_facts

log = logging.getLogger(__name__)

#: Start-of-frame markers by the coding they announce (JPEG's SOFn, n = marker - 0xC0).
_SOF_KINDS: Final = {
    0xC0: "baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "hierarchical sequential",
    0xC6: "hierarchical progressive",
    0xC7: "hierarchical lossless",
    0xC9: "arithmetic-coded sequential",
    0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless",
    0xCD: "arithmetic-coded hierarchical sequential",
    0xCE: "arithmetic-coded hierarchical progressive",
    0xCF: "arithmetic-coded hierarchical lossless",
}
_SOS: Final = 0xDA
_DAC: Final = 0xCC  # arithmetic-coding conditioning tables
_APP2: Final = 0xE2
_APP14: Final = 0xEE
#: Luma sampling factors (h, v) nvJPEG and libjpeg both handle alike, with chroma at (1, 1).
_LUMA_SAMPLING: Final = frozenset({(1, 1), (2, 1), (1, 2), (2, 2)})
#: Component ids of a JPEG coded as RGB ('R', 'G', 'B'), which libjpeg does not colour-convert.
_RGB_IDS: Final = (0x52, 0x47, 0x42)


@dataclass(frozen=True)
class JpegLayout:
    """What a JPEG's marker segments say about its coding (up to its first scan)."""

    #: The start-of-frame marker (0xC0 baseline, 0xC2 progressive, …).
    sof: int
    precision: int
    height: int
    width: int
    #: (id, horizontal, vertical) sampling of each component.
    components: tuple[tuple[int, int, int], ...]
    #: The Adobe APP14 colour transform (0 none/RGB, 1 YCbCr, 2 YCCK), None without that segment.
    adobe_transform: int | None
    #: A DAC segment (arithmetic-coding tables).
    arithmetic_tables: bool
    #: An APP2 "MPF" segment: a multi-picture file (MPO), several JPEGs back to back.
    multi_picture: bool
    #: The file ends with the EOI marker.
    ends_with_eoi: bool


def jpeg_layout(data: bytes) -> JpegLayout | str:
    """Walk the marker segments up to the first scan; the layout, or why it cannot be read."""
    if not data.startswith(b"\xff\xd8"):
        return "not a JPEG"
    pos, end = 2, len(data)
    sof: tuple[int, bytes] | None = None
    adobe: int | None = None
    dac = mpf = False
    while True:
        if pos + 4 > end:
            return "the headers end before the first scan"
        if data[pos] != 0xFF:
            return "damaged marker structure"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return "damaged segment length"
        if marker == _SOS:
            break
        if marker in _SOF_KINDS:
            if sof is not None:
                return "more than one frame header"
            sof = (marker, segment)
        elif marker == _DAC:
            dac = True
        elif marker == _APP2 and segment.startswith(b"MPF\0"):
            mpf = True
        elif marker == _APP14 and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe = segment[11]
        pos += 2 + length
    if sof is None:
        return "no frame header"
    marker, frame = sof
    if len(frame) < 6 or len(frame) < 6 + 3 * frame[5]:
        return "damaged frame header"
    components = tuple(
        (frame[6 + 3 * i], frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 0x0F) for i in range(frame[5])
    )
    return JpegLayout(
        sof=marker,
        precision=frame[0],
        height=int.from_bytes(frame[1:3], "big"),
        width=int.from_bytes(frame[3:5], "big"),
        components=components,
        adobe_transform=adobe,
        arithmetic_tables=dac,
        multi_picture=mpf,
        ends_with_eoi=data.endswith(b"\xff\xd9"),
    )


@dataclass(frozen=True)
class DecodePlan:
    """How a JPEG that may be decoded on the GPU is made upright."""

    turn: Image.Transpose | None


def plan(data: bytes, *, max_pixels: int) -> DecodePlan | str:
    """A :class:`DecodePlan` when nvJPEG would decode ``data`` as :func:`~serving.images.decode`
    does (module docstring), or the reason it goes to Pillow."""
    layout = jpeg_layout(data)
    if isinstance(layout, str):
        return layout
    if layout.sof != 0xC0:
        return f"{_SOF_KINDS[layout.sof]} JPEG"
    if layout.precision != 8:
        return f"{layout.precision}-bit samples"
    if len(layout.components) != 3:
        return {1: "greyscale", 4: "CMYK or YCCK"}.get(len(layout.components), "unusual components")
    if layout.adobe_transform == 0 or tuple(c[0] for c in layout.components) == _RGB_IDS:
        return "coded as RGB, not YCbCr"
    luma, *chroma = ((h, v) for _, h, v in layout.components)
    if luma not in _LUMA_SAMPLING or any(c != (1, 1) for c in chroma):
        return "unusual chroma sampling"
    if layout.arithmetic_tables:
        return "arithmetic-coding tables"
    if layout.multi_picture:
        return "multi-picture (MPO) file"
    if not layout.ends_with_eoi:
        return "no EOI marker at the end (truncated, or data after the picture)"
    try:
        facts = header_facts(data, max_pixels=max_pixels)
    except ImageError as exc:
        return f"Pillow refuses the header ({exc})"
    if facts.pillow_format != "JPEG" or facts.mode != "RGB":
        return f"Pillow reads it as {facts.pillow_format} {facts.mode}"
    if facts.stored_size != (layout.width, layout.height):
        return "the frame header and Pillow disagree on the size"
    if facts.converts_colours:
        return "a colour profile to convert to sRGB"
    return DecodePlan(facts.transpose)


#: Side of the self-test's image: small, but not so small that a decoder backend might refuse it.
_PROBE_SIDE: Final = 64


def _probe_jpeg() -> tuple[bytes, np.ndarray]:
    """A colour gradient as a baseline JPEG, and Pillow's decode of it (the self-test's)."""
    y, x = np.mgrid[0:_PROBE_SIDE, 0:_PROBE_SIDE] * 4
    buffer = io.BytesIO()
    Image.fromarray(np.stack([x, y, 255 - x], axis=2).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        return data, np.asarray(im.convert("RGB"))


class GpuCodec:
    """nvJPEG decode and encode on one CUDA device; build it with :meth:`create`.

    ``counts`` tallies what happened (``gpu decode``, ``gpu encode``, ``pillow: <reason>``, …).
    Thread-safe: decodes run on a stream per thread.
    """

    def __init__(self, device: torch.device, tvio: ModuleType, version: str) -> None:
        """Not for direct use outside tests (:meth:`create` checks the device and the module)."""
        self.device = device
        self.version = version
        self._io = tvio
        self._streams = threading.local()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.counts: Counter[str] = Counter()

    @classmethod
    def create(cls, device: torch.device) -> GpuCodec | None:
        """The codec for ``device``, or None (logged) where the flow should keep to Pillow."""
        codec, why = cls.try_create(device)
        if codec is None:
            if device.type == "cuda":
                log.info("JPEG decode and encode with Pillow on the CPU: %s", why)
            return None
        log.info("JPEG decode and encode with nvJPEG on %s (torchvision %s)", device, codec.version)
        return codec

    @classmethod
    def try_create(cls, device: torch.device) -> tuple[GpuCodec | None, str]:
        """The codec, or None and why not (:meth:`create` without the log line)."""
        if device.type != "cuda":
            return None, "the device is not CUDA"
        try:
            import torchvision
            import torchvision.io as tvio
        except Exception as exc:  # a torchvision built for another torch fails in many ways
            return None, f"torchvision does not import ({type(exc).__name__}: {exc})"
        if not all(hasattr(tvio, name) for name in ("decode_jpeg", "encode_jpeg", "ImageReadMode")):
            return None, f"torchvision {torchvision.__version__} has no JPEG decode/encode"
        codec = cls(device, tvio, str(torchvision.__version__))
        try:
            codec._self_test()
        except Exception as exc:
            return None, f"the nvJPEG self-test failed ({type(exc).__name__}: {exc})"
        return codec, ""

    def _self_test(self) -> None:
        data, pillow = _probe_jpeg()
        decoded = self._decode_full(data)
        expected = torch.from_numpy(pillow.copy()).permute(2, 0, 1)
        if tuple(decoded.shape) != (3, _PROBE_SIDE, _PROBE_SIDE):
            raise RuntimeError(
                f"decoded shape {tuple(decoded.shape)}, expected {(3, _PROBE_SIDE, _PROBE_SIDE)}"
            )
        if (decoded.cpu().int() - expected.int()).abs().float().mean() > 8:
            raise RuntimeError("decoded pixels far from Pillow's")
        data = self.encode_bytes(decoded, 90)
        with Image.open(io.BytesIO(data)) as back:
            if back.size != (_PROBE_SIDE, _PROBE_SIDE):
                raise RuntimeError(f"encoded image is {back.size}, expected {(_PROBE_SIDE, _PROBE_SIDE)}")

    # -- decode ------------------------------------------------------------------------------------

    def _stream(self) -> Any:
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return stream

    def _decode_full(self, data: bytes) -> Tensor:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out: Tensor = self._io.decode_jpeg(raw, mode=self._io.ImageReadMode.RGB, device=self.device)
        return out

    def decode(self, data: bytes, shape: tuple[int, int], *, max_pixels: int) -> Tensor | None:
        """``data`` as (height, width, 3) uint8 RGB on the device at ``shape`` (the processing size),
        or None when Pillow must decode it (:func:`plan`, or nvJPEG failed)."""
        how = plan(data, max_pixels=max_pixels)
        if isinstance(how, str):
            self._count(f"pillow decode: {how}")
            return None
        cuda = self.device.type == "cuda"
        try:
            stream = self._stream() if cuda else None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                image = self._decode_full(data)
                if how.turn is not None:
                    image = transpose(image, how.turn)
                pixels = resize_like_host(image, *shape).permute(1, 2, 0)
            if stream is not None:
                # Complete before it leaves this thread; and the allocator must not hand the memory
                # to this stream again while the worker's (default) stream may still read it.
                stream.synchronize()
                pixels.record_stream(torch.cuda.default_stream(self.device))
        except Exception as exc:
            self._failed("decode", exc)
            return None
        self._count("gpu decode")
        return pixels

    # -- encode ------------------------------------------------------------------------------------

    def encode_bytes(self, image: Tensor, quality: int) -> bytes:
        """(3, H, W) uint8 RGB on the device → JPEG bytes (raises on failure)."""
        if self.device.type != "cuda":
            return bytes(self._io.encode_jpeg(image.contiguous(), quality=quality).cpu().numpy().tobytes())
        stream = self._stream()
        stream.wait_stream(torch.cuda.default_stream(self.device))  # where the worker made the image
        with torch.cuda.stream(stream):
            image.record_stream(stream)
            encoded = self._io.encode_jpeg(image.contiguous(), quality=quality)
            data = encoded.cpu()  # waits for this stream only
        return bytes(data.numpy().tobytes())

    def encode(self, image: Tensor, quality: int) -> bytes | None:
        """:meth:`encode_bytes`, or None when Pillow must encode it (a quality out of range, which
        Pillow's path refuses with the usual error, or an nvJPEG failure)."""
        if isinstance(quality, bool) or not MIN_QUALITY <= quality <= MAX_QUALITY:
            return None
        try:
            data = self.encode_bytes(image, quality)
        except Exception as exc:
            self._failed("encode", exc)
            return None
        self._count("gpu encode")
        return data

    # -- bookkeeping -------------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _failed(self, what: str, exc: Exception) -> None:
        key = f"{what}: {type(exc).__name__}"
        self._count(f"pillow {what}: nvJPEG failed ({type(exc).__name__})")
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        if first:  # once per kind of failure: a bad upload must not flood the log
            log.warning("nvJPEG %s failed (%s: %s); Pillow takes over", what, type(exc).__name__, exc)
