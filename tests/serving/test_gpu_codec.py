"""The GPU JPEG codec's guards and fallbacks (serving.gpu_codec), and how the flow uses it, on the CPU.

nvJPEG cannot run here: the decoder's rules are checked on JPEGs made with Pillow, and the decode and
encode plumbing (orientation, the resize to the processing size, the flow's choice of codec, the
fallbacks) runs with a stand-in for ``torchvision.io`` that decodes and encodes with Pillow on the
CPU. bench/gpu.sh runs the real one on a GPU and compares it with Pillow.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from devkit import photos
from devkit.pillow_tvio import PillowTorchvisionIO
from inference.geometry import resize_rgb
from inference.pipeline import Cartoonizer, Result
from serving.encoding import encode
from serving.flow import Flow, Limits
from serving.gpu_codec import DecodePlan, GpuCodec, jpeg_layout, plan
from serving.images import decode
from serving.options import RequestOptions, ResolvedOptions
from serving.scheduler import Scheduler
from tests.serving.engines import bare_engine

#: The service defaults of these tests (as the settings would make them).
DEFAULTS = ResolvedOptions(style="anime", processing_size=720, format="png", quality=90)

MAX_PIXELS = 40_000_000


def jpeg(rgb: np.ndarray | Image.Image, **params: Any) -> bytes:
    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", **{"quality": 90, **params})
    return buffer.getvalue()


PHOTO = photos.grace_hopper()


def pillow_codec(fail: str | None = None) -> GpuCodec:
    return GpuCodec(torch.device("cpu"), PillowTorchvisionIO(fail), "stand-in")


# -- when there is no GPU codec ----------------------------------------------------------------------


def test_no_codec_on_a_cpu_device() -> None:
    assert GpuCodec.try_create(torch.device("cpu")) == (None, "the device is not CUDA")
    assert GpuCodec.create(torch.device("cpu")) is None


def test_no_codec_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    codec, why = GpuCodec.try_create(torch.device("cuda"))
    assert codec is None and why.startswith("torchvision does not import (ModuleNotFoundError")


def test_no_codec_when_torchvision_lacks_the_functions_or_the_self_test_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = types.ModuleType("torchvision")
    package.__version__ = "0.0-test"  # type: ignore[attr-defined]
    package.io = types.ModuleType("torchvision.io")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.io", package.io)
    codec, why = GpuCodec.try_create(torch.device("cuda"))
    assert codec is None and why == "torchvision 0.0-test has no JPEG decode/encode"

    package.io = PillowTorchvisionIO(fail="decode")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision.io", package.io)
    codec, why = GpuCodec.try_create(torch.device("cuda"))
    assert codec is None and why == "the nvJPEG self-test failed (RuntimeError: nvjpeg error (stand-in))"


def test_the_self_test_passes_with_a_codec_that_works() -> None:
    pillow_codec()._self_test()


# -- which files go to the GPU -------------------------------------------------------------------------


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_baseline_colour_jpegs_go_to_the_gpu(subsampling: int) -> None:
    assert plan(jpeg(PHOTO, subsampling=subsampling), max_pixels=MAX_PIXELS) == DecodePlan(None)


def test_an_srgb_profile_and_restart_markers_are_fine() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert plan(jpeg(PHOTO, icc_profile=srgb), max_pixels=MAX_PIXELS) == DecodePlan(None)
    assert plan(jpeg(PHOTO, restart_marker_blocks=4), max_pixels=MAX_PIXELS) == DecodePlan(None)


def test_the_orientation_is_planned_not_refused() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    assert plan(jpeg(PHOTO, exif=exif), max_pixels=MAX_PIXELS) == DecodePlan(Image.Transpose.ROTATE_270)


def _patched(data: bytes, marker: int, offset: int, value: int) -> bytes:
    """``data`` with one byte of the first ``marker`` segment's payload replaced."""
    at = data.index(bytes([0xFF, marker])) + 4 + offset
    return data[:at] + bytes([value]) + data[at + 1 :]


def _swapped_profile() -> bytes:
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack_from(">I", profile, 128)
    tags = {struct.unpack_from(">4sII", profile, 132 + 12 * i)[0]: i for i in range(count)}
    r, g = tags[b"rXYZ"], tags[b"gXYZ"]
    r_entry, g_entry = (
        profile[132 + 12 * r + 4 : 132 + 12 * r + 12],
        profile[132 + 12 * g + 4 : 132 + 12 * g + 12],
    )
    profile[132 + 12 * r + 4 : 132 + 12 * r + 12], profile[132 + 12 * g + 4 : 132 + 12 * g + 12] = (
        g_entry,
        r_entry,
    )
    return bytes(profile).replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be"))


def _mpo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PHOTO).save(buffer, "MPO", save_all=True, append_images=[Image.fromarray(PHOTO[::-1])])
    return buffer.getvalue()


BASELINE = jpeg(PHOTO)
REFUSED = {
    "progressive JPEG": jpeg(PHOTO, progressive=True),
    "arithmetic-coded sequential JPEG": BASELINE.replace(b"\xff\xc0", b"\xff\xc9", 1),
    "12-bit samples": _patched(BASELINE, 0xC0, 0, 12),
    "greyscale": jpeg(Image.fromarray(PHOTO).convert("L")),
    "CMYK or YCCK": jpeg(Image.fromarray(PHOTO).convert("CMYK")),
    "coded as RGB, not YCbCr": jpeg(PHOTO, keep_rgb=True),
    "unusual chroma sampling": _patched(BASELINE, 0xC0, 10, 0x21),  # Cb sampled 2×1
    "multi-picture (MPO) file": _mpo(),
    "no EOI marker at the end (truncated, or data after the picture)": BASELINE[: len(BASELINE) // 2],
    "a colour profile to convert to sRGB": jpeg(PHOTO, icc_profile=_swapped_profile()),
    "not a JPEG": b"\x89PNG\r\n\x1a\n" + bytes(40),
}


@pytest.mark.parametrize("reason", list(REFUSED))
def test_what_goes_to_pillow_and_why(reason: str) -> None:
    assert plan(REFUSED[reason], max_pixels=MAX_PIXELS) == reason


def test_data_after_the_picture_and_the_pixel_limit_go_to_pillow() -> None:
    assert plan(BASELINE + b"trailer", max_pixels=MAX_PIXELS).startswith("no EOI marker")  # type: ignore[union-attr]
    refusal = plan(BASELINE, max_pixels=1000)
    assert isinstance(refusal, str) and refusal.startswith("Pillow refuses the header (image is 512×600")


def test_the_layout_reader_reports_damage_instead_of_raising() -> None:
    assert jpeg_layout(b"\xff\xd8\xff") == "the headers end before the first scan"
    assert jpeg_layout(b"\xff\xd8\x00\x00\x00\x00") == "damaged marker structure"
    assert jpeg_layout(b"\xff\xd8\xff\xe0\x00\x01\x00\x00") == "damaged segment length"
    sos_only = b"\xff\xd8\xff\xda\x00\x02\x00\x00"
    assert jpeg_layout(sos_only) == "no frame header"
    layout = jpeg_layout(BASELINE)
    assert not isinstance(layout, str)
    assert (layout.sof, layout.precision, layout.height, layout.width) == (0xC0, 8, 600, 512)
    assert layout.components == ((1, 2, 2), (2, 1, 1), (3, 1, 1)) and layout.ends_with_eoi


# -- decode and encode, with the Pillow stand-in ---------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("shape", [(600, 512), (300, 256), (700, 600)])
def test_decode_is_pillows_full_decode_turned_and_resized(orientation: int, shape: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(PHOTO, exif=exif)
    codec = pillow_codec()
    if orientation in (6, 8):
        shape = shape[::-1]
    pixels = codec.decode(data, shape, max_pixels=MAX_PIXELS)
    assert pixels is not None and pixels.dtype == torch.uint8
    expected = resize_rgb(decode(data, max_pixels=MAX_PIXELS).pixels, *shape)
    np.testing.assert_array_equal(pixels.numpy(), expected)
    assert codec.counts == {"gpu decode": 1}


def test_a_refused_file_and_a_failing_decoder_fall_back_to_pillow(caplog: pytest.LogCaptureFixture) -> None:
    codec = pillow_codec()
    assert codec.decode(REFUSED["progressive JPEG"], (600, 512), max_pixels=MAX_PIXELS) is None
    assert codec.counts == {"pillow decode: progressive JPEG": 1}
    failing = pillow_codec(fail="decode")
    with caplog.at_level(logging.WARNING, logger="serving.gpu_codec"):
        for _ in range(3):
            assert failing.decode(BASELINE, (600, 512), max_pixels=MAX_PIXELS) is None
    assert failing.counts == {"pillow decode: nvJPEG failed (RuntimeError)": 3}
    assert len(caplog.records) == 1  # once per kind of failure, not once per upload


def test_encode_and_its_fallbacks() -> None:
    image = torch.from_numpy(PHOTO.copy()).permute(2, 0, 1)
    codec = pillow_codec()
    data = codec.encode(image, 90)
    assert data is not None and data == jpeg(PHOTO, quality=90)
    assert codec.encode(image, 0) is None and codec.encode(image, True) is None  # Pillow's path refuses it
    assert pillow_codec(fail="encode").encode(image, 90) is None
    assert codec.counts == {"gpu encode": 1}


# -- the flow ----------------------------------------------------------------------------------------------


def _flow(cartoonizer: Cartoonizer, codec: GpuCodec | None) -> tuple[Flow, Scheduler]:
    scheduler = Scheduler({"anime": cartoonizer}, queue_size=4, name="test")
    engine = bare_engine(cartoonizer, scheduler)
    scheduler.start()
    flow = Flow(
        engine, DEFAULTS, limits=Limits(), timeout_s=120, codec_threads=1,
        gpu_codec=codec,
    )  # fmt: skip
    return flow, scheduler


@pytest.mark.slow
def test_the_flow_decodes_on_the_codec_and_gets_the_same_result(cartoonizer: Cartoonizer) -> None:
    data = jpeg(photos.one_face_1024x768())
    codec = pillow_codec()
    with_codec, sched_a = _flow(cartoonizer, codec)
    pillow_only, sched_b = _flow(cartoonizer, None)
    try:

        async def both() -> tuple[Any, Any, Any, Any]:
            params = with_codec.options(RequestOptions())
            on_device = await with_codec.decode(data, params)
            on_host = await pillow_only.decode(data, params)
            return on_device, on_host, await with_codec.run(data, params), await pillow_only.run(data, params)

        on_device, on_host, out_codec, out_pillow = asyncio.run(both())
    finally:
        for flow, sched in ((with_codec, sched_a), (pillow_only, sched_b)):
            flow.close()
            sched.close()
    assert isinstance(on_device.pixels, torch.Tensor) and isinstance(on_host.pixels, np.ndarray)
    np.testing.assert_array_equal(on_device.pixels.numpy(), on_host.pixels)
    assert out_codec.data == out_pillow.data  # PNG: the same pixels through the same pipeline
    assert codec.counts == {"gpu decode": 2}


def test_the_flow_asks_for_a_device_result_only_for_jpeg_with_a_codec(cartoonizer: Cartoonizer) -> None:
    pixels = np.zeros((64, 64, 3), np.uint8)
    for codec, fmt, expected in [
        (pillow_codec(), "jpeg", True),
        (pillow_codec(), "png", False),
        (None, "jpeg", False),
    ]:
        flow, sched = _flow(cartoonizer, codec)
        try:
            from serving.flow import Decoded

            ticket = flow.submit(
                flow.options(RequestOptions(format=fmt)), Decoded(pixels, (64, 64), 0.0), deadline=1e18
            )
            assert ticket.options.device_result is expected
            ticket.future.result(timeout=120)
        finally:
            flow.close()
            sched.close()


def test_the_flow_encodes_a_device_result_on_the_codec_and_falls_back(cartoonizer: Cartoonizer) -> None:
    image = np.ascontiguousarray(PHOTO[:64, :48])
    result = Result(image, "anime", [], (64, 48), (64, 48), (64, 48), "cuda", "float16", "background")
    result.device_image = torch.from_numpy(image.copy()).permute(2, 0, 1)
    for codec, via in [(pillow_codec(), "gpu encode"), (pillow_codec(fail="encode"), None)]:
        flow, sched = _flow(cartoonizer, codec)
        try:
            data, _ = asyncio.run(
                flow.encode(result, flow.options(RequestOptions(format="jpeg", quality=80)))
            )
        finally:
            flow.close()
            sched.close()
        assert data == encode(image, "jpeg", 80)  # the stand-in encodes as Pillow does
        assert codec.counts.get("gpu encode") == (1 if via else None)
