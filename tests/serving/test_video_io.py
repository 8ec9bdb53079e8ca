"""Video in and out (serving.video): probing by content, limits and damaged files, frames upright in
display order from any index, lossless round trips, timestamps (variable rate too), rotation, audio
copied or transcoded, odd sizes, and segments joined by copying packets.

Clips are tiny (64×48, 8–30 frames), written by :mod:`devkit.clips` (PyAV set up apart from the
writer under test) at quality 100 unless said: H.264 4:4:4 RGB at qp 0, decoded bit for bit.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from devkit.clips import pattern_frames, write_test_clip
from inference.errors import ToonserveError
from serving import video
from serving.video import (
    MAX_VIDEO_QUALITY,
    CorruptVideoError,
    NotAVideoError,
    VideoEncodeError,
    VideoError,
    VideoInfo,
    VideoLimits,
    VideoTooLargeError,
    VideoWriter,
    crf_for,
    join_segments,
    probe_video,
    read_frames,
)

FRAMES = pattern_frames(16)
#: Frame times of a phone-like variable rate: gaps, a burst, a stall.
VFR_TIMES = [0.0, 0.033, 0.066, 0.1, 0.2, 0.21, 0.22, 0.3, 0.5, 0.533, 0.566, 0.6, 0.7, 0.75, 0.8, 1.2]


def _read(path: Path, start: int = 0) -> list[tuple[int, int | None, float, np.ndarray]]:
    return [(f.index, f.pts, f.time_s, f.rgb) for f in read_frames(path, start)]


def _copy(
    source: Path,
    out: Path,
    info: VideoInfo,
    *,
    quality: int = MAX_VIDEO_QUALITY,
    copy_audio_from: Path | None = None,
) -> Path:
    """``source`` read and written again by :class:`VideoWriter`, every timestamp and duration kept."""
    with VideoWriter(out, info, quality=quality, copy_audio_from=copy_audio_from) as writer:
        for frame in read_frames(source):
            writer.write(frame.rgb, frame.pts, info.time_base, frame.duration)
    return out


def _audio_packets(path: Path) -> tuple[int, int, str]:
    """(packets, bytes, codec) of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        return len(packets), sum(p.size for p in packets), stream.codec_context.codec.canonical_name


def _video_times(path: Path) -> list[Fraction]:
    """Every frame's presentation time in seconds, exact, from the packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.time_base is not None
        return sorted(
            p.pts * stream.time_base for p in container.demux(stream) if p.size and p.pts is not None
        )


# -- reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["mp4", "mov", "mkv", "webm"])
def test_lossless_clips_read_back_exactly(tmp_path: Path, container: str) -> None:
    path = write_test_clip(tmp_path / f"clip.{container}", FRAMES, 25, container=container)  # type: ignore[arg-type]
    info = probe_video(path)
    assert (info.width, info.height, info.display_size, info.rotation) == (64, 48, (64, 48), 0)
    assert info.frames == len(FRAMES)
    assert info.fps == 25 and not info.variable_rate
    assert info.duration_s == pytest.approx(len(FRAMES) / 25)
    assert info.codec == ("vp9" if container == "webm" else "h264")
    frames = list(read_frames(path))
    assert [f.index for f in frames] == list(range(len(FRAMES)))
    assert [f.time_s for f in frames] == pytest.approx([i / 25 for i in range(len(FRAMES))])
    for frame, expected in zip(frames, FRAMES, strict=True):
        assert frame.rgb.dtype == np.uint8 and frame.rgb.flags.c_contiguous
        np.testing.assert_array_equal(frame.rgb, expected)


def test_animated_gif_is_read(tmp_path: Path) -> None:
    # At most 256 colours a frame: GIF's palette keeps them exactly.
    frames = [(f // 64 * 85).astype(np.uint8) for f in FRAMES[:10]]
    path = write_test_clip(tmp_path / "clip.gif", frames, 20, container="gif")
    info = probe_video(path)
    assert (info.format, info.codec, info.frames, info.has_audio) == ("gif", "gif", 10, False)
    assert info.time_base == Fraction(1, 100) and info.fps == 20
    read = list(read_frames(path))
    assert len(read) == 10
    for frame, expected in zip(read, frames, strict=True):
        np.testing.assert_array_equal(frame.rgb, expected)
    assert [f.time_s for f in list(read_frames(path, start=6))] == pytest.approx([0.3, 0.35, 0.4, 0.45])


@pytest.mark.parametrize(("container", "quality"), [("mp4", 100), ("mp4", 60), ("mkv", 60), ("webm", 60)])
def test_reading_from_a_frame_gives_the_tail_of_a_full_read(
    tmp_path: Path, container: str, quality: int
) -> None:
    """Seeking lands on a keyframe before the frame and decodes forward: the same frames (B-frames
    and several GOPs included) as a full read from that index, pixels and timestamps."""
    frames = pattern_frames(30)
    path = write_test_clip(
        tmp_path / f"clip.{container}",
        frames,
        container=container,  # type: ignore[arg-type]
        quality=quality,
        gop=6,
    )
    full = _read(path)
    assert len(full) == 30
    for start in (1, 5, 6, 13, 24, 29):
        tail = _read(path, start)
        assert [f[:3] for f in tail] == [f[:3] for f in full[start:]], start
        for got, expected in zip(tail, full[start:], strict=True):
            np.testing.assert_array_equal(got[3], expected[3])
    assert _read(path, 30) == [] and _read(path, 99) == []
    with pytest.raises(ValueError, match="start"):
        read_frames(path, -1)


def test_a_seek_lands_on_a_keyframe_or_decoding_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_test_clip(tmp_path / "clip.mkv", pattern_frames(30), container="mkv", quality=60, gop=6)
    full = _read(path)
    landed: list[int | None] = []
    seeked = video._seeked

    def spy(*args: Any) -> Iterator[Any]:
        packets = seeked(*args)
        first = next(packets)
        landed.append(first.pts)
        yield first
        yield from packets

    monkeypatch.setattr(video, "_seeked", spy)
    tail = _read(path, 20)
    assert landed and landed[0] is not None and 0 < landed[0] <= full[20][1]  # type: ignore[operator]
    assert [f[:3] for f in tail] == [f[:3] for f in full[20:]]

    # A demuxer that lands after the keyframe asked for (here: a keyframe before the first frame is
    # asked for) is caught before any frame is yielded, and decoding starts from the top.
    seek_point = video._seek_point

    def too_early(*args: Any) -> Any:
        point = seek_point(*args)
        assert point is not None
        return dataclasses.replace(point, key_pts=-(10**9), key_dts=-(10**9))

    monkeypatch.setattr(video, "_seek_point", too_early)
    monkeypatch.setattr(video, "_seeked", seeked)
    tail = _read(path, 20)
    assert [f[:3] for f in tail] == [f[:3] for f in full[20:]]
    for got, expected in zip(tail, full[20:], strict=True):
        np.testing.assert_array_equal(got[3], expected[3])


def test_variable_frame_rate_is_seen_and_every_timestamp_kept(tmp_path: Path) -> None:
    source = write_test_clip(tmp_path / "vfr.mkv", FRAMES, container="mkv", vfr_times=VFR_TIMES)
    info = probe_video(source)
    assert info.variable_rate and info.frames == 16
    assert info.time_base == Fraction(1, 1000)
    assert info.duration_s == pytest.approx(1.2 + 0.04)  # the clip writer's last frame lasts 1/25 s
    assert [f.time_s for f in read_frames(source)] == pytest.approx(VFR_TIMES)

    out = _copy(source, tmp_path / "out.mp4", info)
    assert _video_times(out) == _video_times(source)
    again = probe_video(out)
    assert (again.frames, again.variable_rate) == (16, True)
    assert again.duration_s == pytest.approx(info.duration_s)
    for got, expected in zip(read_frames(out), FRAMES, strict=True):
        np.testing.assert_array_equal(got.rgb, expected)


def test_constant_rate_with_rounded_timestamps_is_not_variable(tmp_path: Path) -> None:
    # 29.97 fps in Matroska's milliseconds: durations of 33 and 34 ms are one rate.
    path = write_test_clip(tmp_path / "ntsc.mkv", FRAMES, Fraction(30000, 1001), container="mkv")
    info = probe_video(path)
    assert not info.variable_rate
    assert float(info.fps) == pytest.approx(29.97, abs=0.05)


# -- rotation -----------------------------------------------------------------------------------------


def test_rotation_is_applied_on_read_and_kept_on_write(tmp_path: Path) -> None:
    """A phone's portrait clip: frames stored sideways with a display matrix. FFmpeg reads that
    matrix as −90 (counter-clockwise); players turn the stored frame 90° clockwise to show it."""
    source = write_test_clip(tmp_path / "portrait.mp4", FRAMES, rotation=90)
    info = probe_video(source)
    assert info.rotation == 90
    assert (info.width, info.height) == (48, 64)  # stored
    assert info.display_size == (64, 48)
    with av.open(str(source)) as container:
        stored = next(container.decode(video=0))
        assert stored.rotation == -90
        upright = np.rot90(stored.to_ndarray(format="rgb24"), k=-1)  # a clockwise quarter turn
    np.testing.assert_array_equal(upright, FRAMES[0])
    for got, expected in zip(read_frames(source), FRAMES, strict=True):
        np.testing.assert_array_equal(got.rgb, expected)

    out = _copy(source, tmp_path / "out.mp4", info)
    assert probe_video(out).rotation == 90
    for got, expected in zip(read_frames(out), FRAMES, strict=True):
        np.testing.assert_array_equal(got.rgb, expected)


# -- writing ------------------------------------------------------------------------------------------


def test_quality_100_is_lossless_and_others_are_h264_yuv420p(tmp_path: Path) -> None:
    source = write_test_clip(tmp_path / "in.mp4", FRAMES)
    info = probe_video(source)
    lossless = _copy(source, tmp_path / "lossless.mp4", info)
    for got, expected in zip(read_frames(lossless), FRAMES, strict=True):
        np.testing.assert_array_equal(got.rgb, expected)
    lossy = _copy(source, tmp_path / "lossy.mp4", info, quality=90)
    with av.open(str(lossy)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        packets = [p for p in container.demux(stream) if p.size]
        assert all(p.pts == p.dts for p in packets)  # no B-frames: segments join
    data = lossy.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart
    assert probe_video(lossy).frames == len(FRAMES)


def test_quality_maps_to_crf() -> None:
    assert crf_for(90) == 18
    assert crf_for(1) == 51
    assert 23 <= crf_for(75) <= 24
    assert crf_for(99) < crf_for(50) < crf_for(2)
    with pytest.raises(ValueError):
        crf_for(100)


@pytest.mark.parametrize("quality", [100, 90])
def test_odd_sizes(tmp_path: Path, quality: int) -> None:
    """4:2:0 needs even sides: the last column and row go (frame count kept); 4:4:4 keeps them."""
    frames = pattern_frames(8, width=65, height=49)
    source = write_test_clip(tmp_path / "odd.mp4", frames)
    info = probe_video(source)
    assert (info.width, info.height) == (65, 49)
    writer = VideoWriter(tmp_path / "out.mp4", info, quality=quality)
    with writer:
        for frame in read_frames(source):
            writer.write(frame.rgb, frame.pts)
    expected_size = (65, 49) if quality == 100 else (64, 48)
    assert writer.size == expected_size
    out = probe_video(tmp_path / "out.mp4")
    assert ((out.width, out.height), out.frames) == (expected_size, 8)
    if quality == 100:
        for got, expected in zip(read_frames(tmp_path / "out.mp4"), frames, strict=True):
            np.testing.assert_array_equal(got.rgb, expected)


def test_a_requested_size_and_wrong_frames(tmp_path: Path) -> None:
    source = write_test_clip(tmp_path / "in.mp4", FRAMES[:4])
    info = probe_video(source)
    with VideoWriter(tmp_path / "big.mp4", info, quality=90, size=(128, 96)) as writer:
        for frame in FRAMES[:4]:
            writer.write(np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1), None)
    big = probe_video(tmp_path / "big.mp4")
    assert (big.display_size, big.frames) == ((128, 96), 4)
    assert big.fps == 25
    with pytest.raises(ValueError, match="expected"):  # noqa: SIM117 - the error is the writer's
        with VideoWriter(tmp_path / "bad.mp4", info) as writer:
            writer.write(FRAMES[0][:, :32], 0)
    assert not (tmp_path / "bad.mp4").exists()  # a failed write leaves no half file


# -- audio --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("container", "codec"), [("mp4", "aac"), ("webm", "libopus"), ("mkv", "flac")])
def test_audio_is_copied_packet_for_packet(tmp_path: Path, container: str, codec: str) -> None:
    source = write_test_clip(
        tmp_path / f"in.{container}",
        FRAMES,
        container=container,  # type: ignore[arg-type]
        audio=True,
        audio_codec=codec,
        quality=60,
    )
    info = probe_video(source)
    assert info.has_audio
    writer = VideoWriter(tmp_path / "out.mp4", info, copy_audio_from=source)
    with writer:
        for frame in read_frames(source):
            writer.write(frame.rgb, frame.pts, duration=frame.duration)
    assert writer.audio is not None and writer.audio.action == "copied"
    assert _audio_packets(tmp_path / "out.mp4") == _audio_packets(source)
    assert probe_video(tmp_path / "out.mp4").audio_codec == info.audio_codec
    assert not list(tmp_path.glob("*.video.mp4"))  # the video-only file is gone


def test_audio_mp4_cannot_carry_is_transcoded_to_aac(tmp_path: Path) -> None:
    source = write_test_clip(tmp_path / "in.mkv", FRAMES, container="mkv", audio=True, audio_codec="vorbis")
    info = probe_video(source)
    assert info.audio_codec == "vorbis"
    writer = VideoWriter(tmp_path / "out.mp4", info, copy_audio_from=source)
    with writer:
        for frame in read_frames(source):
            writer.write(frame.rgb, frame.pts)
    assert writer.audio is not None
    audio = writer.audio
    assert (audio.action, audio.codec, audio.source_codec) == ("transcoded", "aac", "vorbis")
    assert writer.audio.note and "AAC" in writer.audio.note
    packets, size, codec = _audio_packets(tmp_path / "out.mp4")
    assert codec == "aac" and packets > 10 and size > 0


# -- segments -----------------------------------------------------------------------------------------


def test_segments_join_into_the_same_video_as_one_write(tmp_path: Path) -> None:
    source = write_test_clip(tmp_path / "in.mp4", FRAMES, audio=True, rotation=90, vfr_times=VFR_TIMES)
    info = probe_video(source)
    frames = list(read_frames(source))
    single = _copy(source, tmp_path / "single.mp4", info, copy_audio_from=source)
    segments = []
    for start, stop in ((0, 5), (5, 11), (11, 16)):
        segment = tmp_path / f"segment-{start}.mp4"
        with VideoWriter(segment, info, quality=MAX_VIDEO_QUALITY) as writer:
            for frame in frames[start:stop]:
                writer.write(frame.rgb, frame.pts, info.time_base, frame.duration)
        segments.append(segment)
    outcome = join_segments(segments, tmp_path / "joined.mp4", source)
    assert outcome.action == "copied"
    joined = probe_video(tmp_path / "joined.mp4")
    assert joined == probe_video(single)
    assert (joined.frames, joined.rotation, joined.variable_rate) == (16, 90, True)
    assert _video_times(tmp_path / "joined.mp4") == _video_times(source)
    assert _audio_packets(tmp_path / "joined.mp4") == _audio_packets(source)
    for got, expected in zip(read_frames(tmp_path / "joined.mp4"), FRAMES, strict=True):
        np.testing.assert_array_equal(got.rgb, expected)
    data = (tmp_path / "joined.mp4").read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")

    # Segments written differently, or out of order, are refused.
    other = tmp_path / "other.mp4"
    with VideoWriter(other, info, quality=80) as writer:
        writer.write(frames[5].rgb, frames[5].pts)
    with pytest.raises(VideoEncodeError, match="encoded differently"):
        join_segments([segments[0], other], tmp_path / "bad.mp4")
    with pytest.raises(VideoEncodeError, match="overlaps"):
        join_segments([segments[1], segments[0]], tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()


# -- refusals -----------------------------------------------------------------------------------------


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.rate = 48000
        for i in range(10):
            frame.pts = i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _not_videos(tmp_path: Path) -> dict[str, Path]:
    jpeg = tmp_path / "photo.mp4"  # the name says MP4: the content decides
    Image.fromarray(FRAMES[0]).save(jpeg, "JPEG")
    still = tmp_path / "still.gif"
    Image.fromarray(FRAMES[0]).save(still, "GIF")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(random.Random(0).randbytes(20_000))
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 200)
    # FFmpeg's HLS demuxer would open the file this playlist names (and any URL).
    playlist = tmp_path / "list.m3u8"
    clip = write_test_clip(tmp_path / "clip.mp4", FRAMES[:4])
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{clip}\n#EXT-X-ENDLIST\n")
    return {
        "jpeg": jpeg,
        "still gif": still,
        "noise": noise,
        "text": text,
        "playlist": playlist,
        "audio only": _audio_only(tmp_path / "sound.m4a"),
    }


def test_what_is_not_a_video_is_refused(tmp_path: Path) -> None:
    for name, path in _not_videos(tmp_path).items():
        with pytest.raises(NotAVideoError) as caught:
            probe_video(path)
        assert "video" in str(caught.value), name
        if name != "still gif":  # one frame of a GIF reads; only probing counts frames
            with pytest.raises(NotAVideoError):
                list(read_frames(path))
    assert issubclass(NotAVideoError, VideoError) and issubclass(VideoError, ToonserveError)


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    clip = write_test_clip(tmp_path / "clip.mp4", FRAMES, quality=60)
    data = clip.read_bytes()
    cases = {
        "empty": b"",
        # FFmpeg writes the index (moov) last: cut anywhere, there is none.
        "no index": data[: len(data) // 2],
    }
    # With +faststart the index comes first and declares frames the cut file no longer holds.
    faststart = tmp_path / "fs.mp4"
    info = probe_video(clip)
    _copy(clip, faststart, info, quality=60)
    fs = faststart.read_bytes()
    cases["truncated frames"] = fs[: fs.index(b"mdat") + (len(fs) - fs.index(b"mdat")) // 2]
    for name, content in cases.items():
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(content)
        with pytest.raises(CorruptVideoError):
            probe_video(path)


def test_damage_never_escapes_as_a_pyav_error(tmp_path: Path) -> None:
    sources = [
        write_test_clip(tmp_path / f"clip.{c}", FRAMES[:8], container=c, audio=c != "gif", quality=60)
        for c in ("mp4", "mkv", "webm", "gif")
    ]
    rng = random.Random(1)
    for i in range(60):
        source = sources[i % len(sources)]
        data = bytearray(source.read_bytes())
        if i % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 12)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"damaged{source.suffix}"
        path.write_bytes(bytes(data))
        try:
            probe_video(path)
            for _ in read_frames(path, start=3):
                pass
        except VideoError:
            pass


def test_limits_are_checked_and_named(tmp_path: Path) -> None:
    clip = write_test_clip(tmp_path / "clip.mp4", FRAMES)  # 16 frames, 0.64 s, 64×48
    assert probe_video(clip, VideoLimits(max_duration_s=0.64, max_frames=16, max_pixels=64 * 48)).frames == 16
    for limits, setting in (
        (VideoLimits(max_pixels=64 * 48 - 1), "TOONSERVE_MAX_VIDEO_PIXELS"),
        (VideoLimits(max_frames=15), "TOONSERVE_MAX_VIDEO_FRAMES"),
        (VideoLimits(max_duration_s=0.5), "TOONSERVE_MAX_VIDEO_SECONDS"),
    ):
        with pytest.raises(VideoTooLargeError, match=setting):
            probe_video(clip, limits)
    # Matroska declares no frame count: the count is found while demuxing, and stops at the limit.
    mkv = write_test_clip(tmp_path / "clip.mkv", FRAMES, container="mkv")
    with pytest.raises(VideoTooLargeError, match="TOONSERVE_MAX_VIDEO_FRAMES"):
        probe_video(mkv, VideoLimits(max_frames=10))


def test_huge_declared_frames_are_refused_before_decoding(tmp_path: Path) -> None:
    # A GIF declaring a 65535×65535 canvas: refused from its first 10 bytes, FFmpeg never opens it.
    bomb = tmp_path / "bomb.gif"
    bomb.write_bytes(b"GIF89a\xff\xff\xff\xff\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(VideoTooLargeError, match="65535×65535"):
        probe_video(bomb)
    # 1920×1088 (as a 1080p stream that forgot its crop) is over the 1920×1080 default.
    big = write_test_clip(tmp_path / "big.mp4", [np.zeros((1088, 1920, 3), np.uint8)] * 2)
    with pytest.raises(VideoTooLargeError, match="1920×1088"):
        probe_video(big)
    with pytest.raises(VideoTooLargeError):
        list(read_frames(big))
