"""Video uploads to frames and frames back to a video, with PyAV (FFmpeg inside its wheels).

A video job turns a clip into a cartoon clip frame by frame. This module is the codec side of it:

- :func:`probe_video` checks an upload without decoding more than its first frame and says what it is
  (:class:`VideoInfo`), or refuses it with a :class:`VideoError`;
- :func:`read_frames` yields its frames upright, as (H, W, 3) uint8 RGB, from any frame on;
- :class:`VideoWriter` encodes frames to H.264 in MP4, keeping each frame's timestamp and the input's
  rotation; :func:`join_segments` joins segments written apart (a resumed job, several replicas) by
  copying their packets, and puts the input's audio beside them.

Uploads come from anyone, so, as for photos (:mod:`serving.images`), every byte is hostile: the
container is decided by its content (never the file's name), only real video containers are opened
(:data:`DEMUXERS`: an HLS playlist or an ffconcat list would make FFmpeg open files and URLs named
inside the upload), the declared picture size is checked before any picture is decoded (and every
decoder is told the most pixels it may allocate), and no PyAV exception escapes: what we refuse raises

- :class:`NotAVideoError`: not a video (a photo, a text, random bytes), or a file without a video
  stream (audio only), or video in a codec FFmpeg cannot decode;
- :class:`VideoTooLargeError`: over :class:`VideoLimits` (duration, frames, pixels a frame);
- :class:`CorruptVideoError`: empty, truncated or damaged.

Writing fails with :class:`VideoEncodeError` (the service's fault or its disk's, never the upload's).

Everything here is synchronous; an object is used by one thread at a time (a :class:`VideoWriter`
guards itself with a lock), and nothing is shared between objects.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal, TypeAlias

import av
import av.error
import numpy as np
from av.audio.stream import AudioStream
from av.container import InputContainer, OutputContainer
from av.packet import Packet
from av.stream import Disposition, Stream
from av.video.reformatter import Colorspace
from av.video.stream import VideoStream

from inference.errors import ToonserveError

# -- limits -------------------------------------------------------------------------------------------

#: Five minutes: a portrait clip, a short, a story. The models run once per frame, so a video is as
#: much work as that many photos; longer films belong to a batch tool, not to a shared service.
DEFAULT_MAX_VIDEO_SECONDS: Final = 300.0
#: 300 s at 30 fps. Counted apart from the duration because a clip can be short and dense (a 240 fps
#: slow-motion clip has 8× the frames of its duration at 30 fps), and the work is per frame.
DEFAULT_MAX_VIDEO_FRAMES: Final = 9000
#: 1080p (stored 1920×1080 or 1080×1920): a frame is 6 MB as RGB, and the pipeline works at its
#: processing size anyway. 4K (8.3 MP) would quadruple decode, encode and frame memory for detail the
#: cartoon does not keep; a 4K phone clip is refused with a message saying so (the setting raises it).
DEFAULT_MAX_VIDEO_PIXELS: Final = 1920 * 1080
#: 512 MiB: five minutes of 1080p at 14 Mbit/s, more than a phone writes for a clip that long.
DEFAULT_MAX_VIDEO_BYTES: Final = 512 * 1024 * 1024

#: Default video quality (1–100, read like JPEG's): crf 18, visually transparent (:func:`crf_for`).
DEFAULT_VIDEO_QUALITY: Final = 90
MIN_VIDEO_QUALITY: Final = 1
#: Lossless: H.264 4:4:4 RGB at qp 0 (libx264rgb); decoded frames are the written RGB, bit for bit.
MAX_VIDEO_QUALITY: Final = 100

#: x264's speed/size trade-off (at a given crf the quality barely moves, the size and the time do).
#: Measured at quality 90 on 60 frames of a posterised 1080p photo panning (a cartoon's flat colours),
#: 2 busy cores, RGB→YUV included: veryfast 55 fps 740 KiB, faster 47 fps 816 KiB, fast 25 fps
#: 560 KiB, medium (x264's default) 17 fps 573 KiB. "fast" is as small as medium, 1.4× faster.
X264_PRESET: Final = "fast"


@dataclass(frozen=True)
class VideoLimits:
    """What a video upload may be; each limit is a setting (named in the messages)."""

    max_duration_s: float = DEFAULT_MAX_VIDEO_SECONDS
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    #: Pixels of one frame as stored (rotation does not change it).
    max_pixels: int = DEFAULT_MAX_VIDEO_PIXELS


DEFAULT_LIMITS: Final = VideoLimits()

# -- errors -------------------------------------------------------------------------------------------


class VideoError(ToonserveError):
    """An uploaded video that :func:`probe_video` or :func:`read_frames` refuses."""


class NotAVideoError(VideoError):
    """Not a video (decided by content), no video stream in it, or a video codec we cannot decode."""


class VideoTooLargeError(VideoError):
    """Over a :class:`VideoLimits` limit: duration, frame count or pixels a frame."""


class CorruptVideoError(VideoError):
    """Empty, truncated or damaged: the container is recognised but does not read through."""


class VideoEncodeError(ToonserveError):
    """Writing or joining failed: the encoder, the disk, or segments that do not belong together."""


# -- what a video is ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video upload."""

    #: FFmpeg's demuxer name: "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "gif", …
    format: str
    #: FFmpeg's name of the video codec: "h264", "hevc", "vp9", "gif", …
    codec: str
    #: Frame size as stored (before rotation).
    width: int
    height: int
    #: Degrees to turn a stored frame clockwise to show it upright: 0, 90, 180 or 270.
    rotation: int
    #: Frames in the video stream (what :func:`read_frames` yields), counted from its packets.
    frames: int
    #: Average frame rate: frames over the span of their timestamps.
    fps: Fraction
    #: The video stream's time base: a frame's time is ``pts * time_base`` seconds.
    time_base: Fraction
    #: From the first frame's start to the last frame's end.
    duration_s: float
    #: Frame durations differ (beyond the rounding of the time base): a phone's or a GIF's timing.
    variable_rate: bool
    has_audio: bool
    #: FFmpeg's name of the (first) audio stream's codec, None without audio.
    audio_codec: str | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: the stored size, its sides swapped for 90 and 270."""
        if self.rotation in (90, 270):
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class VideoFrame:
    """A decoded frame. ``index``: its place in display order (0 is the first frame); ``pts``: its
    timestamp in the stream's time base (None where the container has none); ``time_s``: its time in
    seconds (``pts × time_base``, or ``index / fps`` without pts); ``rgb``: (H, W, 3) uint8 RGB,
    upright (the rotation applied), C-contiguous; ``duration``: how long it shows, in the time base,
    as the container says (None: unknown); hand it to :meth:`VideoWriter.write` so the last frame
    lasts as long as the input's."""

    index: int
    pts: int | None
    time_s: float
    rgb: np.ndarray
    duration: int | None = None


# -- opening uploads ----------------------------------------------------------------------------------

#: The demuxers an upload may be read by (FFmpeg's names; one matches "mov,mp4,m4a,3gp,3g2,mj2").
#: A whitelist, not FFmpeg's "anything it opens": its hls, dash and concat demuxers open files and URLs
#: named inside the upload (an uploaded .m3u8 listing file:///… was read through), and its image
#: demuxers (image2, *_pipe) and tty (any text file) are not videos.
DEMUXERS: Final = ("mov", "matroska", "gif", "avi", "flv", "mpegts", "mpeg", "ogg", "asf")
_OPEN_OPTIONS: Final = {"format_whitelist": ",".join(DEMUXERS), "protocol_whitelist": "file"}
_DEMUXER_NAMES: Final = frozenset(DEMUXERS)

#: Extra pixels each side a decoder may allocate beyond the declared size: decoders check the limit on
#: their aligned buffers (a 65-pixel-wide frame is allocated 128 wide), not on the picture.
_DECODER_SLACK: Final = 256
#: Bytes read at the start of a file to tell what it is.
_HEAD_BYTES: Final = 4096
#: The Python file buffer FFmpeg reads an upload through.
_IO_BUFFER: Final = 256 * 1024

# Signatures of the containers we read: when FFmpeg cannot open a file that starts like one, the file
# is damaged (CorruptVideoError), not something else (NotAVideoError). (offset, bytes, name)
_CONTAINER_SIGNATURES: Final[tuple[tuple[int, bytes, str], ...]] = (
    (0, b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"),
    (0, b"GIF87a", "a GIF"),
    (0, b"GIF89a", "a GIF"),
    (0, b"FLV\x01", "an FLV video"),
    (0, b"OggS", "an Ogg file"),
    (0, b"\x00\x00\x01\xba", "an MPEG program stream"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "an ASF/WMV video"),
    (4, b"moov", "a QuickTime video"),
    (4, b"mdat", "a QuickTime video"),
    (4, b"wide", "a QuickTime video"),
    (4, b"free", "a QuickTime video"),
    (4, b"skip", "a QuickTime video"),
)
# Still images and other files people send, refused before FFmpeg sees them (FFmpeg would open a JPEG
# as a one-frame video, decoding whatever size it declares), named in the message.
_STILL_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF file"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"PK\x03\x04", "a ZIP archive"),
)
_STILL_BRANDS: Final = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_SEND_VIDEO: Final = "send an MP4, MOV, WebM, MKV, AVI or animated GIF video"

# What PyAV raises on a bad file besides its FFmpegError family (its own checks, and the Python file
# underneath). OSError covers a file that went away mid-read.
_READ_FAILURES: Final[tuple[type[Exception], ...]] = (av.error.FFmpegError, OSError, ValueError, EOFError)


def _sniff(head: bytes, limits: VideoLimits) -> str | None:
    """What a file's first bytes say it is: the name of a container we read (then FFmpeg failing on it
    means damage), None for anything else FFmpeg may still recognise. Refuses still images at once, and
    a GIF whose declared canvas is over the pixel limit before FFmpeg allocates it."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _STILL_BRANDS:
            raise NotAVideoError(f"a HEIF/HEIC image is not a video; send it as a photo, or {_SEND_VIDEO}")
        if brand in _AVIF_BRANDS:
            raise NotAVideoError(f"an AVIF image is not a video; send it as a photo, or {_SEND_VIDEO}")
        return "an MP4/MOV video"
    if head[:4] == b"RIFF":
        if head[8:12] == b"AVI ":
            return "an AVI video"
        if head[8:12] == b"WEBP":
            raise NotAVideoError(f"a WebP image is not a video; send it as a photo, or {_SEND_VIDEO}")
    for signature, what in _STILL_SIGNATURES:
        if head.startswith(signature):
            raise NotAVideoError(f"{what} is not a video; {_SEND_VIDEO}")
    for offset, signature, what in _CONTAINER_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            if what == "a GIF" and len(head) >= 10:
                width, height = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
                _check_pixels(width, height, limits.max_pixels, "GIF")
            return what
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:
        return "an MPEG transport stream"
    return None


def _check_pixels(width: int, height: int, max_pixels: int, what: str = "video") -> None:
    if width * height > max_pixels:
        raise VideoTooLargeError(
            f"the {what}'s frames are {width}×{height} ({_mp(width * height)}); the limit is "
            f"{_mp(max_pixels)} a frame (TOONSERVE_MAX_VIDEO_PIXELS); scale the video down and send it again"
        )


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _reason(exc: BaseException) -> str:
    """FFmpeg's words for a failure, without the file name PyAV appends."""
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return exc.strerror.rstrip(".")
    return str(exc) or type(exc).__name__


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(_HEAD_BYTES)


@contextlib.contextmanager
def _opened(path: Path, max_pixels: int, like: str | None) -> Iterator[InputContainer]:
    """The upload opened by FFmpeg through a Python file (so the format comes from the content, never
    the name), only by :data:`DEMUXERS`, with every decoder FFmpeg runs while opening (it decodes a
    few frames to learn the stream's parameters) bounded to about ``max_pixels``. Failing to open is
    :class:`CorruptVideoError` for a file that starts like a container we read, else
    :class:`NotAVideoError`."""
    file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed below, after the container that reads it
    try:
        options = {**_OPEN_OPTIONS, "max_pixels": str(_decoder_pixels_for(max_pixels))}
        try:
            container = av.open(file, "r", options=options, buffer_size=_IO_BUFFER)
        except _READ_FAILURES as exc:
            if like is not None:
                raise CorruptVideoError(
                    f"the file starts like {like} but cannot be read: {_reason(exc)}"
                ) from exc
            raise NotAVideoError(f"this type of file is not a video we can read; {_SEND_VIDEO}") from exc
        try:
            names = set(container.format.name.split(","))
            if not names & _DEMUXER_NAMES:  # the whitelist did this already; never trust it blindly
                raise NotAVideoError(f"{container.format.name} files are not supported; {_SEND_VIDEO}")
            yield container
        finally:
            container.close()
    finally:
        file.close()


def _decoder_pixels_for(max_pixels: int) -> int:
    """A decoder's allocation bound for pictures of at most ``max_pixels`` (any shape)."""
    side = math.isqrt(max_pixels)
    return min(2**31 - 1, max_pixels + 2 * _DECODER_SLACK * (side + _DECODER_SLACK))


def _decoder_pixels(width: int, height: int) -> int:
    return (width + _DECODER_SLACK) * (height + _DECODER_SLACK)


def _video_stream(container: InputContainer) -> VideoStream:
    """The first video stream that is a moving picture (an MP3's or an M4A's cover art is a one-picture
    video stream marked attached_pic: not a video)."""
    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            if stream.codec_context is None:  # a codec FFmpeg does not know at all
                raise NotAVideoError(f"the video is in a codec we cannot decode; {_SEND_VIDEO}")
            return stream
    kinds = {s.type for s in container.streams}
    if "audio" in kinds:
        raise NotAVideoError(f"the file has sound but no video; {_SEND_VIDEO}")
    raise NotAVideoError(f"the file has no video stream; {_SEND_VIDEO}")


def _audio_stream(container: InputContainer) -> AudioStream | None:
    for stream in container.streams.audio:
        if stream.codec_context is not None:
            return stream
    return None


def _codec_name(stream: Stream) -> str:
    """The codec's own name ("mp3"), not its decoder's ("mp3float")."""
    return stream.codec_context.codec.canonical_name


def _time_base(stream: Stream) -> Fraction:
    """The stream's time base (MP4's 1/90000 where a broken file has none)."""
    return stream.time_base or Fraction(1, 90_000)


def _prepare_decoder(stream: VideoStream, width: int, height: int) -> None:
    """Bound the decoder's pictures to the declared size (plus alignment) and let it use threads
    (FFmpeg's own count, at most 16; frame threads hold one frame each)."""
    stream.codec_context.options = {"max_pixels": str(_decoder_pixels(width, height))}
    stream.codec_context.thread_type = "AUTO"


# -- probing ------------------------------------------------------------------------------------------


@dataclass
class _Packet:
    """A video packet's timing, as the demuxer gives it (no payload)."""

    pts: int | None
    dts: int | None
    duration: int
    key: bool


@dataclass
class _Scan:
    """The video stream's packets in decode order, without their payloads."""

    packets: list[_Packet] = field(default_factory=list)
    #: Packets the demuxer marks to be dropped after decoding (frames an MP4 edit list cuts).
    discarded: int = 0

    @property
    def timed(self) -> bool:
        return all(p.pts is not None for p in self.packets)

    def display_pts(self) -> list[int]:
        """Every frame's pts in display order (only when :attr:`timed`)."""
        return sorted(p.pts for p in self.packets if p.pts is not None)


def _scan(container: InputContainer, stream: VideoStream, limits: VideoLimits | None) -> _Scan:
    """Demux the video stream once, keeping each packet's timing (no decoding). Stops as soon as a
    limit is passed. A packet that FFmpeg marks discard (an edit list cuts its frame) is not a frame."""
    scan = _Scan()
    tb = _time_base(stream)
    first: int | None = None
    for packet in container.demux(stream):
        if packet.size == 0:  # PyAV's flush packet at the end
            continue
        if packet.is_discard:
            scan.discarded += 1
            continue
        pts = packet.pts
        scan.packets.append(_Packet(pts, packet.dts, packet.duration or 0, packet.is_keyframe))
        if limits is None:
            continue
        if len(scan.packets) > limits.max_frames:
            raise VideoTooLargeError(_frames_message(None, limits))
        if pts is not None:
            first = pts if first is None else min(first, pts)
            if float((pts - first) * tb) > limits.max_duration_s:
                raise VideoTooLargeError(_duration_message(None, limits))
    return scan


def _frames_message(frames: int | None, limits: VideoLimits) -> str:
    has = f"has {frames} frames" if frames is not None else "has more frames than that"
    return (
        f"the video {has}; the limit is {limits.max_frames} (TOONSERVE_MAX_VIDEO_FRAMES); "
        "cut it shorter or lower its frame rate"
    )


def _duration_message(seconds: float | None, limits: VideoLimits) -> str:
    lasts = f"lasts {seconds:.1f} s" if seconds is not None else "lasts longer than that"
    return (
        f"the video {lasts}; the limit is {limits.max_duration_s:g} s (TOONSERVE_MAX_VIDEO_SECONDS); "
        "cut it shorter"
    )


def probe_video(path: Path, limits: VideoLimits = DEFAULT_LIMITS) -> VideoInfo:
    """Check a video upload and say what it is; see :class:`VideoInfo`.

    The kind of file is decided by its content. The declared frame size is checked against
    ``limits.max_pixels`` before anything is decoded, and the duration and frame count the header
    declares before the file is read through. Then the video stream is demuxed once (packets only,
    no decoding: this counts the frames exactly, finds their timestamps and a truncated file), and the
    first frame is decoded (the codec works; the rotation is side data of decoded frames).

    Raises :class:`NotAVideoError`, :class:`VideoTooLargeError` or :class:`CorruptVideoError`, never a
    PyAV exception. ``OSError`` if ``path`` cannot be opened at all (the caller's file, not the upload).
    """
    head = _read_head(path)
    if not head:
        raise CorruptVideoError("the file is empty")
    like = _sniff(head, limits)
    with _opened(path, limits.max_pixels, like) as container:
        try:
            stream = _video_stream(container)
            fmt = container.format.name
            codec = _codec_name(stream)
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0:
                raise CorruptVideoError(f"the {codec} video stream declares no picture size")
            _check_pixels(width, height, limits.max_pixels)
            time_base = _time_base(stream)
            _check_declared(container, stream, time_base, limits)
            audio = _audio_stream(container)
            audio_codec = _codec_name(audio) if audio is not None else None
            _prepare_decoder(stream, width, height)
            rotation = _first_frame_rotation(container, stream, codec)
        except VideoError:
            raise
        except _READ_FAILURES as exc:
            raise CorruptVideoError(f"the video is damaged: {_reason(exc)}") from exc
    with _opened(path, limits.max_pixels, like) as container:
        stream = _video_stream(container)
        declared = stream.frames
        try:
            scan = _scan(container, stream, limits)
        except VideoError:
            raise
        except _READ_FAILURES as exc:
            raise CorruptVideoError(f"the video is truncated or damaged: {_reason(exc)}") from exc
        average_rate = stream.average_rate or stream.guessed_rate
    frames = len(scan.packets)
    if frames == 0:
        raise CorruptVideoError("the video stream has no frames")
    if declared > 0 and frames + scan.discarded < declared:
        raise CorruptVideoError(
            f"the video is truncated: its header declares {declared} frames, the file holds {frames}"
        )
    if frames == 1 and fmt == "gif":
        raise NotAVideoError(f"a still GIF is not a video; send it as a photo, or {_SEND_VIDEO}")
    fps, duration_s, variable = _timing(scan, time_base, average_rate)
    if frames > limits.max_frames:
        raise VideoTooLargeError(_frames_message(frames, limits))
    if duration_s > limits.max_duration_s:
        raise VideoTooLargeError(_duration_message(duration_s, limits))
    return VideoInfo(
        format=fmt,
        codec=codec,
        width=width,
        height=height,
        rotation=rotation,
        frames=frames,
        fps=fps,
        time_base=time_base,
        duration_s=duration_s,
        variable_rate=variable,
        has_audio=audio_codec is not None,
        audio_codec=audio_codec,
    )


def _check_declared(
    container: InputContainer, stream: VideoStream, time_base: Fraction, limits: VideoLimits
) -> None:
    """Refuse at once what the header says is over a limit (a 3-hour film is not read through to be
    refused); the scan checks again what the packets say."""
    if stream.frames > limits.max_frames:
        raise VideoTooLargeError(_frames_message(stream.frames, limits))
    seconds: float | None = None
    if stream.duration is not None and stream.duration > 0:
        seconds = float(stream.duration * time_base)
    elif container.duration is not None and container.duration > 0:
        seconds = container.duration / av.time_base
    if seconds is not None and seconds > limits.max_duration_s:
        raise VideoTooLargeError(_duration_message(seconds, limits))


def _first_frame_rotation(container: InputContainer, stream: VideoStream, codec: str) -> int:
    """Decode up to the first frame: proves the codec decodes here, and gives the rotation (FFmpeg
    attaches the stream's display matrix to every decoded frame; PyAV exposes it nowhere else)."""
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                return _clockwise(frame.rotation)
    except av.error.DecoderNotFoundError as exc:
        raise NotAVideoError(f"video coded as {codec} cannot be decoded here; {_SEND_VIDEO}") from exc
    raise CorruptVideoError(f"no frame of the {codec} video stream decodes")


def _clockwise(rotation: float) -> int:
    """FFmpeg's rotation (counter-clockwise degrees, −180…180, as its display matrix rotates the
    picture) to the clockwise turn that shows a stored frame upright, to the nearest quarter turn.
    (ffmpeg's own autorotate: −90 → transpose=clock.) Mirroring in the matrix is not kept."""
    clockwise = (-round(rotation)) % 360
    return (round(clockwise / 90) % 4) * 90


def _timing(scan: _Scan, time_base: Fraction, average_rate: Fraction | None) -> tuple[Fraction, float, bool]:
    """(average fps, duration in seconds, variable rate) from the packets' timestamps."""
    frames = len(scan.packets)
    fallback = average_rate if average_rate else Fraction(25)
    if not scan.timed:
        return fallback, float(frames / fallback), False
    pts = scan.display_pts()
    deltas = [b - a for a, b in itertools.pairwise(pts)]
    median = sorted(deltas)[len(deltas) // 2] if deltas else 0
    last = max(scan.packets, key=lambda p: p.pts or 0).duration or median
    span = pts[-1] - pts[0] + last
    if span <= 0:
        return fallback, float(frames / fallback), False
    fps = (Fraction(frames) / (span * time_base)).limit_denominator(1_001_000)
    # Frame durations that differ only by the time base's rounding (29.97 fps in milliseconds: 33, 34,
    # 33 …; 15 fps in a GIF's centiseconds: 7, 7, 6) are a constant rate.
    tolerance = max(1, median // 50)
    variable = any(abs(d - median) > tolerance for d in deltas)
    return fps, float(span * time_base), variable


# -- reading ------------------------------------------------------------------------------------------


def read_frames(path: Path, start: int = 0, *, limits: VideoLimits = DEFAULT_LIMITS) -> Iterator[VideoFrame]:
    """The video's frames in display order, from frame ``start`` on (see :class:`VideoFrame`).

    Frames are decoded one at a time as they are asked for (the decoder's threads hold a few more).
    With ``start`` > 0 the file is demuxed once (packets only) to find the last keyframe at or before
    that frame, decoding starts there and the frames before ``start`` are dropped unconverted: the
    frames are exactly those a full read yields from that index. Where the container cannot seek
    reliably (no index, no timestamps: GIF, raw streams) decoding starts from the first frame.

    A frame whose size differs from the stream's (a resolution change mid-stream) is scaled to the
    stream's size, so every frame has one size. ``limits``: only the pixel limit is checked here
    (:func:`probe_video` checks them all). Raises :class:`VideoError` subclasses, never a PyAV exception.
    """
    if start < 0:
        raise ValueError(f"start must be at least 0, got {start}")
    return _frames(path, start, limits)


def _frames(path: Path, start: int, limits: VideoLimits) -> Iterator[VideoFrame]:
    head = _read_head(path)
    if not head:
        raise CorruptVideoError("the file is empty")
    like = _sniff(head, limits)
    if start > 0:
        point = _seek_point(path, start, limits, like)
        if point is not None and point.target is None:
            return  # start is past the last frame
        if point is not None:
            try:
                yield from _decoded(path, like, limits, start, point)
                return
            except _SeekMissed:  # raised before any frame was yielded
                pass
    yield from _decoded(path, like, limits, start, None)


class _SeekMissed(Exception):
    """The demuxer did not land on (or before) the keyframe asked for: decode from the top instead."""


def _decoded(
    path: Path, like: str | None, limits: VideoLimits, start: int, point: _SeekPoint | None
) -> Iterator[VideoFrame]:
    """Frames from ``start``: decoding from ``point``'s keyframe and dropping frames shown before its
    target, or (``point`` None) from the first frame, dropping ``start`` frames unconverted."""
    with _opened(path, limits.max_pixels, like) as container:
        index = start if point is not None else 0
        try:
            stream = _video_stream(container)
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0:
                raise CorruptVideoError("the video stream declares no picture size")
            _check_pixels(width, height, limits.max_pixels)
            _prepare_decoder(stream, width, height)
            time_base = _time_base(stream)
            fps = stream.average_rate or stream.guessed_rate or Fraction(25)
            target = point.target if point is not None else None
            packets = _seeked(container, stream, point) if point is not None else container.demux(stream)
            rotation: int | None = None
            skip = start if point is None else 0
            for packet in packets:
                for frame in packet.decode():
                    if target is not None and frame.pts is not None and frame.pts < target:
                        continue
                    if skip > 0:
                        skip -= 1
                        index += 1
                        continue
                    if rotation is None:
                        rotation = _clockwise(frame.rotation)
                    rgb = _to_rgb(frame, width, height, rotation)
                    pts = frame.pts
                    time_s = float(pts * time_base) if pts is not None else float(index / fps)
                    yield VideoFrame(index, pts, time_s, rgb, frame.duration or None)
                    index += 1
        except VideoError:
            raise
        except av.error.DecoderNotFoundError as exc:
            raise NotAVideoError(f"this video's codec cannot be decoded here; {_SEND_VIDEO}") from exc
        except _READ_FAILURES as exc:
            raise CorruptVideoError(f"the video is damaged at frame {index}: {_reason(exc)}") from exc


@dataclass(frozen=True)
class _SeekPoint:
    """Where decoding starts for a read from frame ``start``: ``target`` is that frame's pts (None: the
    video has fewer frames), ``key`` the keyframe packet decoding starts at (its pts and dts)."""

    target: int | None
    key_pts: int = 0
    key_dts: int | None = None


def _seek_point(path: Path, start: int, limits: VideoLimits, like: str | None) -> _SeekPoint | None:
    """The keyframe to start decoding at for frame ``start``, from one demux pass (no decoding), or
    None where seeking cannot be trusted (the caller decodes from the first frame and skips)."""
    with _opened(path, limits.max_pixels, like) as container:
        try:
            stream = _video_stream(container)
            if len(stream.index_entries) == 0:  # nothing to seek by (GIF, raw streams)
                return None
            scan = _scan(container, stream, None)
        except VideoError:
            raise
        except _READ_FAILURES as exc:
            raise CorruptVideoError(f"the video is truncated or damaged: {_reason(exc)}") from exc
    if not scan.timed:
        return None
    display = scan.display_pts()
    if start >= len(display):
        return _SeekPoint(target=None)
    target = display[start]
    # The last keyframe, in decode order, shown at or before the target. Frames decoded after it that
    # are shown before it (an open GOP's leading pictures, which may miss references) come before the
    # target, and are dropped with the rest.
    key: _Packet | None = None
    for packet in scan.packets:
        if packet.key and packet.pts is not None and packet.pts <= target:
            key = packet
    if key is None or key is scan.packets[0]:
        return None
    assert key.pts is not None
    return _SeekPoint(target=target, key_pts=key.pts, key_dts=key.dts)


def _seeked(container: InputContainer, stream: VideoStream, point: _SeekPoint) -> Iterator[Packet[Any]]:
    """The video packets from the seek point's keyframe (or an earlier one) on. Demuxers seek by
    different clocks (MP4 by dts, Matroska by pts), so it seeks to the earlier of the keyframe's pts
    and dts, backwards; if the demuxer lands anywhere but on a keyframe at or before it, raises
    :class:`_SeekMissed` before yielding anything."""
    timestamp = point.key_pts if point.key_dts is None else min(point.key_pts, point.key_dts)
    container.seek(timestamp, backward=True, any_frame=False, stream=stream)
    packets = container.demux(stream)
    first = next(packets, None)
    if (
        first is None
        or first.size == 0
        or not first.is_keyframe
        or (first.dts is not None and point.key_dts is not None and first.dts > point.key_dts)
        or (first.pts is not None and first.pts > point.key_pts)
    ):
        raise _SeekMissed
    yield first
    yield from packets


# Our names for FFmpeg's colour matrices (AVColorSpace) that swscale converts with.
_MATRICES: Final = {
    1: Colorspace.ITU709,
    4: Colorspace.FCC,
    5: Colorspace.ITU601,
    6: Colorspace.ITU601,
    7: Colorspace.SMPTE240M,
    9: Colorspace.BT2020,
    10: Colorspace.BT2020,
}


def _to_rgb(frame: av.VideoFrame, width: int, height: int, rotation: int) -> np.ndarray:
    """A decoded frame as upright (H, W, 3) uint8 RGB: YUV converted with the frame's own matrix and
    range (untagged: BT.709 from 720 lines up, BT.601 below, as players guess), scaled to
    (``width``, ``height``) as stored if it differs, then turned ``rotation`` degrees clockwise."""
    kwargs: dict[str, Any] = {}
    if frame.width != width or frame.height != height:
        kwargs.update(width=width, height=height)
    fmt = frame.format
    if not fmt.is_rgb and not fmt.has_palette and fmt.name not in ("gray", "gray8", "ya8"):
        matrix = _MATRICES.get(frame.colorspace)
        if matrix is None:
            matrix = Colorspace.ITU709 if height >= 720 else Colorspace.ITU601
        kwargs.update(src_colorspace=matrix, dst_colorspace=matrix)
        if frame.color_range in (1, 2):
            kwargs.update(src_color_range=frame.color_range)
    rgb = np.asarray(frame.to_ndarray(format="rgb24", **kwargs))
    if rotation:
        rgb = np.rot90(rgb, k=-(rotation // 90))
    return np.ascontiguousarray(rgb)


# -- writing ------------------------------------------------------------------------------------------


def crf_for(quality: int) -> float:
    """x264's constant rate factor for a quality of 1–99 (100 is lossless, another encoder).

    A line through two anchors: quality 90 → crf 18, which FFmpeg's H.264 guide calls visually
    lossless or nearly so, and quality 1 → crf 51, x264's worst. Then 75 (JPEG's usual) → 23.6, about
    x264's own default 23; 50 → 32.8; 99 → 14.7. Each 6 crf steps about halve the bitrate. (Measured
    on a 320×240 crop of a photo through RGB → yuv420p → RGB: PSNR 30.2 dB at 50, 34.5 at 75, 36.6 at
    90, 37.4 at 99; 4:2:0 chroma caps it.)
    """
    if not MIN_VIDEO_QUALITY <= quality < MAX_VIDEO_QUALITY:
        raise ValueError(f"quality must be {MIN_VIDEO_QUALITY}–{MAX_VIDEO_QUALITY - 1}, got {quality}")
    return round(18 + (90 - quality) * 33 / 89, 1)


@dataclass(frozen=True)
class AudioOutcome:
    """What became of the input's audio in an output.

    ``action``: "none" (the input has none), "copied" (its packets as they are), or "transcoded"
    (its codec cannot go into MP4 and play widely: decoded and encoded to AAC); ``codec``: the output's
    audio codec; ``note``: a sentence for the job's report when it was not copied."""

    action: Literal["none", "copied", "transcoded"]
    codec: str | None = None
    source_codec: str | None = None
    note: str | None = None


#: Audio codecs copied into MP4 as they are: those the MP4 family registers and players (browsers,
#: phones) play from MP4. Anything else (Vorbis, PCM, MP2, AMR …) is transcoded to AAC: FFmpeg would
#: mux some of them, but into files most players refuse.
MP4_AUDIO: Final = frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"})
#: AAC sample rates; another rate is resampled to 48 kHz for the transcode.
_AAC_RATES: Final = frozenset(
    {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000}
)
#: AAC bit rate of a transcode, per channel (mono 96 kb/s, stereo 192 kb/s: generous for FFmpeg's AAC-LC).
_AAC_BITS_PER_CHANNEL: Final = 96_000

# H.264 tags for the frames we encode: RGB from the pipeline is sRGB, whose primaries and matrix
# convention are BT.709's; limited range is what every player expects of yuv420p.
_BT709: Final = 1
_LIMITED: Final = 1


class VideoWriter:
    """Encodes upright RGB frames into an MP4 (H.264, ``+faststart``) that shows like the input.

    ``info``: the input's :class:`VideoInfo` (time base, frame rate and rotation are kept). Frames come
    upright at the output display size: ``size`` (width, height) when given, else ``info.display_size``;
    each is turned back to the stored orientation and the input's rotation is written as metadata, so
    players show the output as they show the input.

    ``quality`` 1–99: H.264 High, yuv420p, crf :func:`crf_for`. yuv420p needs even sides: an odd width
    or height loses its last column or row (right or bottom, as shown); :attr:`size` says what is
    encoded, and the frame count never changes. ``quality`` 100: lossless, libx264rgb (H.264 High 4:4:4
    Predictive) at qp 0 on RGB: frames read back (PyAV, FFmpeg) are the written ones bit for bit, at
    any size, odd too; few players outside FFmpeg play it (browsers do not): it is for measuring.

    No B-frames: every packet's decode time is its presentation time, so segments written apart by
    writers with the same ``info``, ``quality`` and ``size`` join by copying packets
    (:func:`join_segments`); each segment starts with a keyframe (each writer is a new encoder).

    ``copy_audio_from``: the input; its audio is put beside the video when the writer closes
    (:func:`join_segments` with one segment; :attr:`audio` says what was done). Without it the output
    has no audio.

    If the ``with`` block raises, the output is removed (a half-written MP4 has no index). A crashed
    process leaves a file without its index: write segments to temporary names and rename them when
    :meth:`close` returns.
    """

    def __init__(
        self,
        path: Path,
        info: VideoInfo,
        *,
        quality: int = DEFAULT_VIDEO_QUALITY,
        size: tuple[int, int] | None = None,
        copy_audio_from: Path | None = None,
        preset: str = X264_PRESET,
    ) -> None:
        if not MIN_VIDEO_QUALITY <= quality <= MAX_VIDEO_QUALITY:
            raise ValueError(f"quality must be {MIN_VIDEO_QUALITY}–{MAX_VIDEO_QUALITY}, got {quality}")
        width, height = size if size is not None else info.display_size
        if width < 1 or height < 1:
            raise ValueError(f"size must be positive, got {width}×{height}")
        self.path = path
        self.info = info
        self.quality = quality
        self.lossless = quality == MAX_VIDEO_QUALITY
        #: (width, height) of the frames :meth:`write` takes.
        self.input_size = (width, height)
        if not self.lossless:
            width, height = width - width % 2, height - height % 2
            if width < 2 or height < 2:
                raise ValueError(f"H.264 4:2:0 needs at least 2×2 pixels, got {self.input_size}")
        #: (width, height) as shown of what is encoded (even sides but at quality 100).
        self.size = (width, height)
        #: What became of the input's audio, once closed with ``copy_audio_from``.
        self.audio: AudioOutcome | None = None
        #: Frames written so far.
        self.frames = 0
        #: Timestamps moved forward because they did not increase (a broken input's duplicates).
        self.retimed = 0
        self._source = copy_audio_from
        self._video_path = path.with_name(path.name + ".video.mp4") if copy_audio_from is not None else path
        self._time_base = info.time_base
        self._last_pts: int | None = None
        self._durations: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        stored = (height, width) if info.rotation in (90, 270) else (width, height)
        try:
            self._container: OutputContainer = av.open(
                str(self._video_path),
                "w",
                format="mp4",
                # faststart moves the index before the frames (play while downloading); a file that gets
                # its audio in a second pass does not need it until then.
                options={"movflags": "+faststart"} if copy_audio_from is None else {},
            )
        except _READ_FAILURES as exc:
            raise VideoEncodeError(f"cannot create {self._video_path.name}: {_reason(exc)}") from exc
        try:
            self._stream = self._add_stream(stored, preset)
        except BaseException:
            self._container.close()
            self._remove()
            raise

    def _add_stream(self, stored: tuple[int, int], preset: str) -> VideoStream:
        info = self.info
        if self.lossless:
            stream = self._container.add_stream("libx264rgb", options={"qp": "0", "preset": preset})
            stream.pix_fmt = "rgb24"
        else:
            options = {"crf": f"{crf_for(self.quality):g}", "preset": preset}
            stream = self._container.add_stream("libx264", options=options)
            stream.pix_fmt = "yuv420p"
            stream.codec_context.colorspace = _BT709
            stream.codec_context.color_primaries = _BT709
            stream.codec_context.color_trc = _BT709
            stream.codec_context.color_range = _LIMITED
        stream.width, stream.height = stored
        stream.codec_context.max_b_frames = 0  # dts == pts: segments join (see the class docstring)
        stream.codec_context.time_base = self._time_base
        stream.codec_context.framerate = info.fps
        stream.time_base = self._time_base
        if info.rotation:
            # PyAV takes FFmpeg's counter-clockwise angle (what a decoded frame's rotation reads).
            stream.set_display_rotation(-info.rotation)
        return stream

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(
        self,
        frame_rgb: np.ndarray,
        pts: int | None,
        time_base: Fraction | None = None,
        duration: int | None = None,
    ) -> None:
        """Encode one upright (H, W, 3) uint8 RGB frame of :attr:`input_size`.

        ``pts`` in ``time_base`` (the input's when None): the frame's timestamp, kept (rescaled to the
        input's time base if another is given); None numbers frames at ``info.fps``. A timestamp that
        does not increase is moved to one tick after the previous (counted in :attr:`retimed`).
        ``duration`` (same time base): how long the frame shows; MP4 keeps only the last frame's (the
        others last until the next), which is one frame at ``info.fps`` when not given."""
        width, height = self.input_size
        if frame_rgb.shape != (height, width, 3) or frame_rgb.dtype != np.uint8:
            raise ValueError(
                f"expected a ({height}, {width}, 3) uint8 frame, got {frame_rgb.shape} {frame_rgb.dtype}"
            )
        with self._lock:
            if self._closed:
                raise ValueError("the writer is closed")
            out_w, out_h = self.size
            pixels = frame_rgb[:out_h, :out_w]
            if self.info.rotation:
                pixels = np.rot90(pixels, k=self.info.rotation // 90)  # upright → stored
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if not self.lossless:
                frame = frame.reformat(
                    format="yuv420p",
                    src_colorspace=Colorspace.ITU709,
                    dst_colorspace=Colorspace.ITU709,
                    dst_color_range=_LIMITED,
                )
            frame.pts = self._next_pts(pts, time_base)
            frame.time_base = self._time_base
            if duration is not None and duration > 0:
                # x264 does not hand frame durations on to its packets: _mux puts them back.
                self._durations[frame.pts] = self._rescale(duration, time_base)
            try:
                self._mux(self._stream.encode(frame))
            except _READ_FAILURES as exc:
                raise VideoEncodeError(f"encoding frame {self.frames} failed: {_reason(exc)}") from exc
            self.frames += 1

    def _next_pts(self, pts: int | None, time_base: Fraction | None) -> int:
        value = (
            round(self.frames / self.info.fps / self._time_base)
            if pts is None
            else self._rescale(pts, time_base)
        )
        if self._last_pts is not None and value <= self._last_pts:
            value = self._last_pts + 1
            self.retimed += 1
        self._last_pts = value
        return value

    def _mux(self, packets: list[Packet[VideoStream]]) -> None:
        for packet in packets:
            if packet.pts is not None and (duration := self._durations.pop(packet.pts, None)):
                packet.duration = duration
        self._container.mux(packets)

    def _rescale(self, ticks: int, time_base: Fraction | None) -> int:
        if time_base is None or time_base == self._time_base:
            return ticks
        return round(ticks * time_base / self._time_base)

    def close(self) -> None:
        """Flush the encoder, finish the file and, with ``copy_audio_from``, add the audio."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                try:
                    self._mux(self._stream.encode(None))
                finally:
                    self._container.close()
            except _READ_FAILURES as exc:
                self._remove()
                raise VideoEncodeError(f"finishing {self.path.name} failed: {_reason(exc)}") from exc
            if self._source is not None:
                try:
                    self.audio = join_segments([self._video_path], self.path, self._source)
                finally:
                    self._video_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Stop without finishing: close what is open and remove the output."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(*_READ_FAILURES):
                self._container.close()
            self._remove()

    def _remove(self) -> None:
        self._video_path.unlink(missing_ok=True)
        if self._video_path != self.path:
            self.path.unlink(missing_ok=True)


# -- joining and audio --------------------------------------------------------------------------------


def join_segments(segments: Sequence[Path], out: Path, source: Path | None = None) -> AudioOutcome:
    """Join video segments written by :class:`VideoWriter` (same ``info``, ``quality`` and ``size``,
    consecutive frames) into one MP4 with ``+faststart``, by copying their packets (no re-encoding),
    with the audio of ``source`` (the input upload) beside them when it has some.

    The audio is copied packet for packet when its codec plays from MP4 (:data:`MP4_AUDIO`), else
    transcoded to AAC (the outcome says so). Only the first audio stream is kept; subtitles, data and
    further streams are not. Audio and video are interleaved by time.

    Raises :class:`VideoEncodeError` when the segments do not belong together (another codec, size or
    encoder set-up, overlapping timestamps) or cannot be read, :class:`VideoError` when ``source``
    cannot be read."""
    if not segments:
        raise ValueError("no segments to join")
    readers: list[tuple[BinaryIO, InputContainer]] = []
    try:
        for segment in segments:
            reader: BinaryIO = open(segment, "rb")  # noqa: SIM115 - closed in the finally below
            try:
                readers.append((reader, av.open(reader, "r")))
            except _READ_FAILURES as exc:
                reader.close()
                raise VideoEncodeError(f"segment {segment.name} cannot be read: {_reason(exc)}") from exc
        streams = [
            _segment_stream(container, segment)
            for (_, container), segment in zip(readers, segments, strict=True)
        ]
        _check_segments(streams, segments)
        try:
            output = av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"})
        except _READ_FAILURES as exc:
            raise VideoEncodeError(f"cannot create {out.name}: {_reason(exc)}") from exc
        try:
            video = output.add_stream_from_template(streams[0])
            with _audio_source(source) as audio_in:
                outcome, audio_packets = _audio_plan(output, audio_in)
                video_packets = _segment_packets(readers, streams, segments)
                merged = heapq.merge(video_packets, audio_packets, key=lambda item: item[0])
                for _, packet, target in merged:
                    packet.stream = video if target is None else target
                    output.mux(packet)
        except BaseException:
            with contextlib.suppress(*_READ_FAILURES):
                output.close()
            out.unlink(missing_ok=True)
            raise
        try:
            output.close()
        except _READ_FAILURES as exc:
            out.unlink(missing_ok=True)
            raise VideoEncodeError(f"finishing {out.name} failed: {_reason(exc)}") from exc
        return outcome
    except _READ_FAILURES as exc:
        raise VideoEncodeError(f"joining the segments failed: {_reason(exc)}") from exc
    finally:
        for file, container in readers:
            container.close()
            file.close()


def remux_with_audio(video_only: Path, source: Path, out: Path) -> AudioOutcome:
    """``video_only`` (a :class:`VideoWriter` output) with the audio of ``source``, into ``out``."""
    return join_segments([video_only], out, source)


def _segment_stream(container: InputContainer, segment: Path) -> VideoStream:
    if not container.streams.video:
        raise VideoEncodeError(f"segment {segment.name} has no video stream")
    return container.streams.video[0]


def _check_segments(streams: list[VideoStream], segments: Sequence[Path]) -> None:
    """Segments join only if a decoder can go from one to the next without noticing: same codec,
    size, pixel format, time base and parameter sets (the encoder's SPS/PPS, in the extradata)."""
    first = streams[0]

    def key(stream: VideoStream) -> tuple[object, ...]:
        context = stream.codec_context
        return (
            context.name,
            context.width,
            context.height,
            context.pix_fmt,
            stream.time_base,
            bytes(context.extradata or b""),
        )

    for stream, segment in zip(streams[1:], segments[1:], strict=True):
        if key(stream) != key(first):
            raise VideoEncodeError(
                f"segment {segment.name} was encoded differently from {segments[0].name} "
                "(codec, size, time base or encoder settings); write every segment with the same "
                "info, quality and size"
            )


#: A packet to mux, its time (dts in seconds) and its output stream (None: the video stream).
_Item: TypeAlias = "tuple[Fraction, Packet[Any], Stream | None]"


def _segment_packets(
    readers: list[tuple[BinaryIO, InputContainer]], streams: list[VideoStream], segments: Sequence[Path]
) -> Iterator[_Item]:
    """Every segment's video packets in order, keyed by time; timestamps must keep increasing."""
    last: Fraction | None = None
    for (_, container), stream, segment in zip(readers, streams, segments, strict=True):
        time_base = _time_base(stream)
        first_in_segment = True
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            dts = packet.dts if packet.dts is not None else packet.pts
            if dts is None:
                raise VideoEncodeError(f"segment {segment.name} has a packet without a timestamp")
            time = dts * time_base
            if last is not None and time <= last:
                raise VideoEncodeError(
                    f"segment {segment.name} overlaps the one before it (a frame at {float(time):.3f} s "
                    f"after one at {float(last):.3f} s); segments must hold consecutive frames"
                )
            if first_in_segment and not packet.is_keyframe:
                raise VideoEncodeError(f"segment {segment.name} does not start with a keyframe")
            first_in_segment = False
            last = time
            yield time, packet, None


@contextlib.contextmanager
def _audio_source(source: Path | None) -> Iterator[InputContainer | None]:
    """The upload opened for its audio (None without a source)."""
    if source is None:
        yield None
        return
    head = _read_head(source)
    if not head:
        raise CorruptVideoError("the file is empty")
    like = _sniff(head, VideoLimits(max_pixels=2**31 - 1))
    with _opened(source, DEFAULT_MAX_VIDEO_PIXELS, like) as container:
        yield container


def _audio_plan(
    output: OutputContainer, source: InputContainer | None
) -> tuple[AudioOutcome, Iterator[_Item]]:
    """The output's audio stream and the packets to put in it: copied, transcoded or none."""
    stream = _audio_stream(source) if source is not None else None
    if source is None or stream is None:
        return AudioOutcome("none"), iter(())
    codec = _codec_name(stream)
    if codec in MP4_AUDIO:
        target = output.add_stream_from_template(stream)
        return AudioOutcome("copied", codec, codec), _copied_audio(source, stream, target)
    rate = stream.codec_context.sample_rate if stream.codec_context.sample_rate in _AAC_RATES else 48000
    channels = stream.codec_context.channels
    layout = "mono" if channels == 1 else "stereo"
    target = output.add_stream("aac", rate=rate)
    target.layout = layout
    target.bit_rate = _AAC_BITS_PER_CHANNEL * (1 if channels == 1 else 2)
    note = f"the input's {codec} audio cannot go into MP4 as it is; it was encoded to AAC"
    if channels > 2:
        note += f" (its {channels} channels mixed down to stereo)"
    return AudioOutcome("transcoded", "aac", codec, note), _transcoded_audio(
        source, stream, target, rate, layout
    )


def _copied_audio(source: InputContainer, stream: AudioStream, target: Stream) -> Iterator[_Item]:
    time_base = stream.time_base or Fraction(1, stream.codec_context.sample_rate or 48000)
    last = Fraction(-(10**9))
    try:
        for packet in source.demux(stream):
            if packet.size == 0:
                continue
            ts = packet.dts if packet.dts is not None else packet.pts
            time = ts * time_base if ts is not None else last
            last = time
            yield time, packet, target
    except _READ_FAILURES as exc:
        raise CorruptVideoError(f"the input's audio is damaged: {_reason(exc)}") from exc


def _transcoded_audio(
    source: InputContainer, stream: AudioStream, target: AudioStream, rate: int, layout: str
) -> Iterator[_Item]:
    """The source's audio decoded, resampled to planar float at ``rate`` in 1024-sample frames (AAC's)
    and encoded to AAC; timestamps follow the source's."""
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate, frame_size=1024)
    time_base = Fraction(1, rate)

    def encoded(frame: av.AudioFrame | None) -> Iterator[_Item]:
        for packet in target.encode(frame):  # None flushes the encoder
            ts = packet.dts if packet.dts is not None else packet.pts
            yield (ts or 0) * (packet.time_base or time_base), packet, target

    try:
        for packet in source.demux(stream):
            for decoded in packet.decode():
                for frame in resampler.resample(decoded):
                    yield from encoded(frame)
        for frame in resampler.resample(None):
            yield from encoded(frame)
        yield from encoded(None)
    except _READ_FAILURES as exc:
        raise CorruptVideoError(f"the input's audio is damaged: {_reason(exc)}") from exc
