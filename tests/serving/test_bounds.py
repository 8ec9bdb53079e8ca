"""What one request may cost: processing pixels, output size, decoded pixels in flight, admission."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from inference.errors import OptionsError
from inference.geometry import processing_shape, resize_rgb
from inference.pipeline import Cartoonizer, Options
from serving.cost import CostModel
from serving.engine import Engine
from serving.flow import Flow, Limits, _PixelBudget
from serving.images import ImageTooLargeError, decode, probe, reduction
from serving.options import RequestOptions, ResolvedOptions
from serving.scheduler import Scheduler
from serving.tickets import QueueFullError
from tests.serving.engines import bare_engine

#: The service defaults of these tests (as the settings would make them).
DEFAULTS = ResolvedOptions(style="anime", processing_size=720, format="png", quality=90)


def _jpeg(rgb: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def test_processing_is_capped_whatever_the_aspect_ratio() -> None:
    budget = 1536 * 1536
    assert processing_shape(1000, 40000, 2048, budget) == (242, 9714)
    h, w = processing_shape(4000, 3000, 2048, budget)
    assert h * w <= budget and abs(h / w - 4 / 3) < 0.01
    assert processing_shape(768, 1024, 720, budget) == (720, 960)  # the default case is untouched
    assert (
        Options(processing_size=2048, max_processing_pixels=budget).processing_shape((3000, 4000))[0] < 2048
    )


def test_a_strip_runs_within_the_budget(cartoonizer: Cartoonizer) -> None:
    strip = np.tile(photos.coffee()[:100], (1, 20, 1))  # 100 × 12000
    result = cartoonizer.run(strip, Options(processing_size=2048, max_processing_pixels=256 * 256))
    h, w = result.processing_size
    assert h * w <= 256 * 256 and result.output_size == (100, 12000)


def test_jpeg_is_decoded_at_a_reduced_scale_when_enough() -> None:
    big = np.asarray(Image.fromarray(photos.astronaut()).resize((2048, 1536)))
    data = _jpeg(big)
    full = decode(data, max_pixels=10**8)
    quarter = decode(data, max_pixels=10**8, needed=(360, 480))
    assert full.pixels.shape == (1536, 2048, 3) and quarter.original_size == (1536, 2048)
    assert quarter.pixels.shape == (384, 512, 3)  # 1/4: the largest scale still ≥ 360 × 480
    assert (
        reduction("jpeg", (1536, 2048), (360, 480)) == 4 and reduction("png", (1536, 2048), (360, 480)) == 1
    )
    # Decoded at 1/2 (twice the size needed, as the flow asks), brought to 360 × 480: within about
    # a level of the full decode's.
    half = decode(data, max_pixels=10**8, needed=(720, 960))
    assert half.pixels.shape == (768, 1024, 3)
    a = np.asarray(Image.fromarray(full.pixels).resize((480, 360), Image.Resampling.BOX), dtype=float)
    b = np.asarray(Image.fromarray(half.pixels).resize((480, 360), Image.Resampling.BOX), dtype=float)
    assert np.abs(a - b).mean() < 1.5


def test_reduced_decode_keeps_the_exif_orientation() -> None:
    tall = np.asarray(Image.fromarray(photos.astronaut()).resize((1600, 800)))  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: upright it is portrait
    data = _jpeg(tall, exif=exif.tobytes())
    info = probe(data, max_pixels=10**8)
    assert (info.width, info.height) == (800, 1600)
    image = decode(data, max_pixels=10**8, needed=(400, 200))
    assert image.original_size == (1600, 800) and image.pixels.shape == (400, 200, 3)


def test_pixel_budget_makes_decodes_take_turns() -> None:
    budget = _PixelBudget(100)
    order: list[str] = []

    async def hold(name: str, pixels: int, seconds: float) -> None:
        async with budget.hold(pixels):
            order.append(f"+{name}")
            await asyncio.sleep(seconds)
            order.append(f"-{name}")

    async def main() -> None:
        await asyncio.gather(hold("a", 60, 0.05), hold("b", 60, 0.01), hold("c", 30, 0.01))

    asyncio.run(main())
    assert order.index("-a") < order.index("+b")  # b waited for a; c fitted beside a
    assert order.index("+c") < order.index("-a")


def test_outputs_over_the_limits_are_refused(cartoonizer: Cartoonizer) -> None:
    engine = Engine.__new__(Engine)  # only check() is used by params(): a loaded style
    engine.check = lambda style: None  # type: ignore[method-assign]
    flow = Flow(
        engine,
        DEFAULTS,
        limits=Limits(max_output_pixels=4_000_000, max_upscale=4.0),
        timeout_s=60,
        codec_threads=1,
    )
    try:
        tiny = probe(_png(np.zeros((1, 1, 3), np.uint8)), max_pixels=100)
        with pytest.raises(OptionsError, match=r"enlarge a 1×1 photo 64\.0 times; at most 4 times"):
            flow.check_output(flow.options(RequestOptions(output_size=64)), tiny)
        with pytest.raises(OptionsError, match=r"enlarge a 1×1 photo 8192\.0 times"):
            flow.check_output(flow.options(RequestOptions(output_size=8192)), tiny)
        photo = probe(_jpeg(photos.astronaut()), max_pixels=10**6)
        flow.check_output(flow.options(RequestOptions(output_size=1900)), photo)  # 3.7×, 3.6 MP: allowed
        with pytest.raises(OptionsError, match=r"the limit is 4\.0 MP"):
            flow.check_output(flow.options(RequestOptions(output_size=2047)), photo)
        flow.check_output(flow.options(RequestOptions()), photo)  # the photo's own size always passes
    finally:
        flow.close()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_admission_refuses_at_once_what_cannot_meet_its_deadline(cartoonizer: Cartoonizer) -> None:
    outcomes: list[str] = []
    # 10 s per megapixel, as measured by a slow device.
    slow = CostModel(per_image_s=0.0, per_pixel_s=1e-5)
    sched = Scheduler(
        {"anime": cartoonizer},
        queue_size=8,
        name="test",
        on_outcome=lambda outcome, _client: outcomes.append(outcome),
        cost=slow,
    )
    now = time.monotonic()
    held = sched.admit([500_000], now + 60)  # 5 s of work: fits a 60 s deadline
    with pytest.raises(QueueFullError, match="before its deadline") as info:
        sched.admit([500_000, 500_000], now + 12)  # 5 s ahead + 10 s of its own > 12 s
    assert info.value.retry_after >= 5 and outcomes == ["rejected", "rejected"]
    with pytest.raises(QueueFullError, match="do not fit the queue"):
        sched.admit([1] * 8, now + 600)
    sched.release(held)
    assert len(sched.admit([1] * 8, now + 600).slots) == 8
    sched.close(drain=False)


def _flow(cartoonizer: Cartoonizer, **limits: Any) -> tuple[Flow, Scheduler]:
    engine = bare_engine(cartoonizer, Scheduler({"anime": cartoonizer}, name="test"))
    engine.scheduler.start()
    flow = Flow(
        engine,
        DEFAULTS,
        limits=Limits(**limits),
        timeout_s=60,
        codec_threads=1,
    )
    return flow, engine.scheduler


def test_a_decode_counts_every_copy_its_decoder_makes(cartoonizer: Cartoonizer) -> None:
    """A 16-bit PNG goes through Pillow in full (3 copies); an 8-bit one of the same size is shrunk by
    libvips while it is decoded, and fits a budget the first does not."""
    flow, sched = _flow(cartoonizer, max_inflight_pixels=2_000_000, max_pixels=10**7)
    try:
        rgb = np.asarray(Image.fromarray(photos.astronaut()).resize((1000, 1000)))
        eight = _png(rgb)
        sixteen = io.BytesIO()
        Image.fromarray(rgb[:, :, 0]).convert("I;16").save(sixteen, "PNG")
        params = flow.options(RequestOptions(processing_size=128))
        decoded = asyncio.run(flow.decode(eight, params))
        assert decoded.pixels.shape == (128, 128, 3) and decoded.input_size == (1000, 1000)
        with pytest.raises(ImageTooLargeError, match=r"holds 3\.0 MP at once; the limit .* is 2\.0 MP"):
            asyncio.run(flow.decode(sixteen.getvalue(), params))
    finally:
        flow.close()
        sched.close()


@pytest.mark.slow
def test_the_output_is_resized_with_the_encoding_and_let_go_once_encoded(cartoonizer: Cartoonizer) -> None:
    """On the CPU the worker hands back the processing-size image; the resize to the output size is
    codec work, timed as resize_out; the outcome keeps the report and the bytes, not the pixels."""
    flow, sched = _flow(cartoonizer)
    try:
        photo = np.asarray(Image.fromarray(photos.astronaut()).resize((1024, 1024)))

        async def run() -> Any:
            return await flow.run(
                _png(photo), flow.options(RequestOptions(processing_size=256, output_size=2000))
            )

        outcome = asyncio.run(run())
        assert Image.open(io.BytesIO(outcome.data)).size == (2000, 2000)
        assert outcome.result.output_size == (2000, 2000) and outcome.result.image.size == 0
        assert outcome.timings_ms["resize_out"] > 0
    finally:
        flow.close()
        sched.close()


def test_the_pipeline_can_leave_the_output_resize_to_its_caller(cartoonizer: Cartoonizer) -> None:
    photo = np.asarray(Image.fromarray(photos.astronaut()).resize((400, 400)))
    later = cartoonizer.run(photo, Options(processing_size=200, resize_later=True, no_face="passthrough"))
    now = cartoonizer.run(photo, Options(processing_size=200, no_face="passthrough"))
    assert later.image.shape == (200, 200, 3) and later.output_size == (400, 400)
    assert now.image.shape == (400, 400, 3)
    assert np.array_equal(resize_rgb(later.image, 400, 400), now.image)
