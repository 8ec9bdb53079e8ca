"""Video clips with known content, for tests and benchmarks (written with PyAV, not with
:mod:`serving.video`, so that reading is checked against an encoder set up independently).

:func:`write_test_clip` writes frames given upright as (H, W, 3) uint8 RGB into MP4, MOV, MKV, WebM
or GIF, with a sine tone as audio, a rotation, and frame times of its choosing (variable frame rate).
At ``quality=100`` MP4, MOV and MKV hold H.264 4:4:4 RGB at qp 0 (libx264rgb) and WebM holds lossless
VP9 in RGB (gbrp): decoding gives the frames back bit for bit. A GIF frame keeps its colours exactly
when it has at most 256 of them (each frame gets its own palette); one with more is quantised by Pillow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Final, Literal

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import OutputContainer
from PIL import Image

from serving.video import crf_for

ClipContainer = Literal["mp4", "mov", "mkv", "webm", "gif"]

#: FFmpeg's muxer for each container.
MUXERS: Final[dict[ClipContainer, str]] = {
    "mp4": "mp4",
    "mov": "mov",
    "mkv": "matroska",
    "webm": "webm",
    "gif": "gif",
}
#: The time base each container keeps timestamps in (Matroska's default millisecond, GIF's centisecond).
TIME_BASES: Final[dict[ClipContainer, Fraction]] = {
    "mp4": Fraction(1, 90_000),
    "mov": Fraction(1, 90_000),
    "mkv": Fraction(1, 1000),
    "webm": Fraction(1, 1000),
    "gif": Fraction(1, 100),
}
#: The audio codec a container gets unless told otherwise.
AUDIO_CODECS: Final[dict[ClipContainer, str]] = {"mp4": "aac", "mov": "aac", "mkv": "aac", "webm": "libopus"}
AUDIO_RATE: Final = 48_000


def pattern_frames(count: int, width: int = 64, height: int = 48, seed: int = 0) -> list[np.ndarray]:
    """``count`` frames of noise on a moving gradient: every pixel differs from frame to frame, so a
    frame out of place or a lossy step shows. (H, W, 3) uint8 RGB."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        base = (xs * 3 + ys * 2 + i * 7) % 256
        noise = rng.integers(0, 64, (height, width, 3))
        frames.append(((base[..., None] + noise) % 256).astype(np.uint8))
    return frames


def write_test_clip(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: int | Fraction = 25,
    *,
    container: ClipContainer = "mp4",
    audio: bool = False,
    audio_codec: str | None = None,
    rotation: int = 0,
    vfr_times: Sequence[float] | None = None,
    quality: int = 100,
    gop: int | None = None,
) -> Path:
    """Write upright RGB ``frames`` as a clip; returns ``path``.

    ``fps``: the frame rate, unless ``vfr_times`` gives each frame's time in seconds (increasing).
    ``rotation``: degrees clockwise a player turns the stored frames to show them (0, 90, 180, 270;
    MP4 and MOV only): the frames are stored turned back, with the rotation as display-matrix metadata.
    ``audio``: a 440 Hz tone as long as the video, in ``audio_codec`` (default AAC, Opus in WebM;
    "vorbis" is FFmpeg's experimental encoder). ``quality``: 100 lossless (see the module), else the
    service's crf mapping (:func:`serving.video.crf_for`) for H.264 (with B-frames) or VP9.
    ``gop``: frames between keyframes (the encoder's default, 250 for H.264, when None).
    """
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, got {rotation}")
    if rotation and container not in ("mp4", "mov"):
        raise ValueError("rotation metadata is written to MP4 and MOV only")
    if audio and container == "gif":
        raise ValueError("a GIF has no audio")
    time_base = TIME_BASES[container]
    frame_list = list(frames)
    if not frame_list:
        raise ValueError("no frames")
    if vfr_times is not None and len(vfr_times) != len(frame_list):
        raise ValueError(f"{len(vfr_times)} times for {len(frame_list)} frames")
    times: list[float | Fraction] = (
        list(vfr_times) if vfr_times is not None else [i / Fraction(fps) for i in range(len(frame_list))]
    )
    stored = [np.ascontiguousarray(np.rot90(f, k=rotation // 90)) for f in frame_list]
    height, width = stored[0].shape[:2]
    with av.open(str(path), "w", format=MUXERS[container]) as output:
        video, pix_fmt = _video_stream(output, container, quality, fps)
        video.width, video.height = width, height
        if gop is not None:
            video.codec_context.gop_size = gop
        video.codec_context.time_base = time_base
        video.time_base = time_base
        if rotation:
            video.set_display_rotation(-rotation)  # FFmpeg's angle is counter-clockwise
        sound = _audio_stream(output, audio_codec or AUDIO_CODECS[container]) if audio else None
        for pixels, time in zip(stored, times, strict=True):
            if pix_fmt == "pal8":
                # PyAV takes pal8 as (indices, palette); its stub knows only arrays.
                frame = av.VideoFrame.from_ndarray(_palettised(pixels), format="pal8")  # type: ignore[arg-type]
            else:
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pix_fmt not in ("rgb24", "pal8"):
                frame = frame.reformat(format=pix_fmt)
            frame.pts = round(Fraction(time) / time_base)
            frame.time_base = time_base
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
        if sound is not None:
            last = float(times[-1]) + (float(times[-1] - times[-2]) if len(times) > 1 else 1 / float(fps))
            for packet in _tone(sound, last):
                output.mux(packet)
    return path


def damage_packet(path: Path, index: int, out: Path, seed: int = 0) -> Path:
    """A copy of the clip at ``path`` whose video packet ``index`` (in decode order) has its payload
    overwritten with noise, written to ``out``; returns ``out``. The container is intact (its index,
    every packet's place, size and time), so reading the packets finds nothing wrong; decoding fails
    at that frame, as it does for an upload damaged in transit or on disk."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size) for p in container.demux(stream) if p.size and p.pos is not None]
    if not 0 <= index < len(packets):
        raise ValueError(f"the clip has {len(packets)} video packets; there is no packet {index}")
    pos, size = packets[index]
    data = bytearray(path.read_bytes())
    data[pos : pos + size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))
    return out


def _video_stream(
    output: OutputContainer, container: ClipContainer, quality: int, fps: int | Fraction
) -> tuple[av.VideoStream, str]:
    if container == "gif":
        stream = output.add_stream("gif", rate=fps)
        stream.pix_fmt = "pal8"
        return stream, "pal8"
    if container == "webm":
        if quality == 100:
            stream = output.add_stream("libvpx-vp9", rate=fps, options={"lossless": "1"})
            stream.pix_fmt = "gbrp"
            return stream, "gbrp"
        options = {"crf": f"{round(crf_for(quality) * 63 / 51)}", "b": "0"}
        stream = output.add_stream("libvpx-vp9", rate=fps, options=options)
        stream.pix_fmt = "yuv420p"
        return stream, "yuv420p"
    if quality == 100:
        stream = output.add_stream("libx264rgb", rate=fps, options={"qp": "0", "preset": "ultrafast"})
        stream.pix_fmt = "rgb24"
        return stream, "rgb24"
    stream = output.add_stream("libx264", rate=fps, options={"crf": f"{crf_for(quality):g}"})
    stream.pix_fmt = "yuv420p"
    return stream, "yuv420p"


def _palettised(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices (H, W) uint8, palette (256, 4) uint8 ARGB) of an RGB frame: its own colours when there
    are at most 256, else Pillow's median-cut palette (no dithering)."""
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colours) > 256:
        quantised = Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE)
        colours = np.asarray(quantised.getpalette() or [], np.uint8).reshape(-1, 3)[:256]
        inverse = np.asarray(quantised).reshape(-1)
    palette = np.zeros((256, 4), np.uint8)
    palette[:, 0] = 255
    palette[: len(colours), 1:] = colours
    return inverse.reshape(rgb.shape[:2]).astype(np.uint8), palette


def _audio_stream(output: OutputContainer, codec: str) -> AudioStream:
    stream = output.add_stream(codec, rate=AUDIO_RATE)
    if not isinstance(stream, AudioStream):
        raise ValueError(f"{codec} is not an audio codec")
    stream.layout = "stereo"
    if codec == "vorbis":
        stream.codec_context.options = {"strict": "experimental"}
    return stream


def _tone(stream: AudioStream, seconds: float) -> Iterator[av.Packet[AudioStream]]:
    """A 440 Hz stereo tone of ``seconds``, encoded in the encoder's frame size."""
    samples = round(seconds * AUDIO_RATE)
    t = np.arange(samples) / AUDIO_RATE
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
    frame.rate = AUDIO_RATE
    frame.pts = 0
    frame.time_base = Fraction(1, AUDIO_RATE)
    size = stream.codec_context.frame_size or 1024
    resampler = av.AudioResampler(
        format=stream.codec_context.format, layout="stereo", rate=AUDIO_RATE, frame_size=size
    )
    for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
        yield from stream.encode(chunk)
    yield from stream.encode(None)
