"""Whether PyAV's FFmpeg can decode and encode H.264 on an NVIDIA GPU (NVDEC ``h264_cuvid``, NVENC
``h264_nvenc``): which of its CUDA codecs this build lists, and whether the two open and work.

Run as a child process by the ``video`` section (``python -m bench.gpu.avprobe``; imports only PyAV
and NumPy), so that a driver library that crashes or hangs on loading takes the probe down, not the
run. Prints one JSON object. A codec that is listed needs the driver's ``libcuda``,
``libnvcuvid`` and ``libnvidia-encode`` at run time; containers often leave the last two out
(``NVIDIA_DRIVER_CAPABILITIES`` without ``video``), so being listed says little: the probe opens
each one on a 256×256 clip and says what FFmpeg answered.
"""

from __future__ import annotations

import io
import json
import sys
from fractions import Fraction
from typing import Any

import av
import numpy as np

SIDE = 256
FRAMES = 8


def _frames() -> list[av.VideoFrame]:
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    out = []
    for i in range(FRAMES):
        rgb = np.stack([(xs + 8 * i) % 256, (ys + 4 * i) % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out.append(frame)
    return out


def _encode(codec: str) -> list[Any]:
    ctx = av.CodecContext.create(codec, "w")
    assert isinstance(ctx, av.VideoCodecContext)
    ctx.width = ctx.height = SIDE
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, 25)
    ctx.framerate = Fraction(25)
    packets: list[Any] = []
    for frame in _frames():
        packets += ctx.encode(frame)
    packets += ctx.encode(None)
    return packets


def _mp4(frames: int = FRAMES) -> bytes:
    """An H.264 (yuv420p) MP4 from the CPU encoder, as a clip upload would come."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        for frame in _frames()[:frames]:
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _decode(codec: str, mp4: bytes) -> int:
    """Frames ``codec`` decodes from the MP4's packets (the stream's extradata handed over, as
    FFmpeg does when a decoder is chosen by name)."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        ctx = av.CodecContext.create(codec, "r")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.extradata = stream.codec_context.extradata
        frames = 0
        for packet in container.demux(stream):
            frames += len(ctx.decode(packet if packet.size else None))
    return frames


def _try(fn: Any, unit: str) -> str:
    """``works (N unit)`` when ``fn`` returns a positive count, else what went wrong."""
    try:
        count = fn()
    except Exception as exc:
        return f"fails: {type(exc).__name__}: {exc}"[:300]
    return f"works ({count} {unit})" if count else f"fails: no {unit} came out"


def probe() -> dict[str, Any]:
    names = av.codecs_available
    result: dict[str, Any] = dict(
        pyav=av.__version__,
        libavcodec=".".join(map(str, av.library_versions.get("libavcodec", ()))),
        cuda_decoders_listed=sorted(n for n in names if n.endswith("_cuvid")),
        cuda_encoders_listed=sorted(n for n in names if n.endswith("_nvenc")),
    )
    if "h264_nvenc" in names:
        result["h264_nvenc"] = _try(lambda: len(_encode("h264_nvenc")), f"packets for {FRAMES} frames")
    else:
        result["h264_nvenc"] = "not in this build"
    if "h264_cuvid" in names:
        try:
            mp4 = _mp4()
        except Exception as exc:
            result["h264_cuvid"] = f"not tried: libx264 failed ({type(exc).__name__}: {exc})"[:300]
        else:
            result["h264_cuvid"] = _try(lambda: _decode("h264_cuvid", mp4), f"of {FRAMES} frames")
    else:
        result["h264_cuvid"] = "not in this build"
    result["usable"] = {name: str(result[name]).startswith("works") for name in ("h264_cuvid", "h264_nvenc")}
    return result


if __name__ == "__main__":
    av.logging.set_level(av.logging.ERROR)
    json.dump(probe(), sys.stdout)
    sys.stdout.write("\n")
