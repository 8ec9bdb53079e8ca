"""The worker's cost model: a fixed part per image plus a part per pixel, which odd images cannot poison."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.cost import BOUND_FACTOR, CostModel, cost_pixels

#: The "true" device of these tests: 20 ms an image plus 1.7 s per million pixels (this project's
#: CPU, float32).
A, B = 0.02, 1.7e-6
SMALL, LARGE = cost_pixels(64, 64), cost_pixels(512, 512)
PHOTO = cost_pixels(720, 960)


def _true(pixels: int) -> float:
    return A + B * pixels


def _calibrated() -> CostModel:
    model = CostModel()
    model.calibrate((SMALL, _true(SMALL)), (LARGE, _true(LARGE)))
    return model


def test_cost_pixels_are_the_padded_background_area() -> None:
    assert cost_pixels(1, 1) == 16 * 16
    assert cost_pixels(720, 960) == 720 * 960
    assert cost_pixels(30000, 2) == 30016 * 16  # both sides grow when either is off
    assert cost_pixels(0, 5) == 16 * 16


def test_calibration_sets_the_line_through_the_anchors() -> None:
    est = _calibrated().estimate
    assert est.per_image_s == pytest.approx(A, rel=1e-6)
    assert est.per_pixel_s == pytest.approx(B, rel=1e-6)
    with pytest.raises(ValueError, match="too close"):
        CostModel().calibrate((1000, 0.1), (1200, 0.12))


def test_a_flood_of_tiny_images_does_not_make_photos_look_expensive() -> None:
    """A 1×1 PNG takes 20 ms of fixed cost; divided by its pixels it once read as 80 µs a pixel, and
    every later photo as a thousand seconds of work."""
    model = _calibrated()
    for _ in range(200):
        model.observe(1, cost_pixels(1, 1), 0.025)
    assert model.seconds(PHOTO) == pytest.approx(_true(PHOTO), rel=0.1)
    assert model.seconds(cost_pixels(1, 1)) == pytest.approx(0.025, rel=0.2)


def test_it_follows_a_device_that_is_really_slower() -> None:
    model = _calibrated()
    sizes = [cost_pixels(s, s) for s in (100, 300, 500, 700, 900)]
    for k in range(100):
        pixels = sizes[k % len(sizes)]
        model.observe(1, pixels, 3 * _true(pixels))  # another tenant took two thirds of the cores
    assert model.seconds(PHOTO) == pytest.approx(3 * _true(PHOTO), rel=0.1)


def test_no_run_of_measurements_takes_it_out_of_bounds() -> None:
    model = _calibrated()
    for _ in range(100):
        model.observe(1, cost_pixels(4, 4), 1000.0)
        model.observe(1, PHOTO, 1e-9)
    est = model.estimate
    assert B / BOUND_FACTOR <= est.per_pixel_s <= B * BOUND_FACTOR
    assert 0 <= est.per_image_s <= A * BOUND_FACTOR + 0.25


def test_batches_count_per_image_and_nonsense_is_ignored() -> None:
    model = _calibrated()
    before = model.estimate
    model.observe(0, 100, 1.0)
    model.observe(1, 0, 1.0)
    model.observe(1, 100, 0.0)
    model.observe(1, 100, float("nan"))
    assert model.estimate == before
    model.observe(4, 4 * PHOTO, 4 * _true(PHOTO))  # four photos in one batch
    assert model.seconds(PHOTO) == pytest.approx(_true(PHOTO), rel=0.05)


_ODD_SIDES = st.sampled_from([1, 2, 3, 16, 17, 64, 100, 333, 720, 1080, 1536, 4000, 30000])


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(_ODD_SIDES, _ODD_SIDES), min_size=1, max_size=150),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_sizes_in_any_order_leave_a_photo_priced_sanely(shapes: list[tuple[int, int]], seed: int) -> None:
    """Whatever the sizes and their order, with 30 % timing noise and one measurement in ten off by
    up to 20 times, an ordinary photo stays priced within a factor of two of what it costs."""
    rng = random.Random(seed)
    model = _calibrated()
    for h, w in shapes:
        # The processing size caps the long side as the pipeline does (the short side at 720).
        scale = min(1.0, 720 / min(h, w), (1536 * 1536 / (h * w)) ** 0.5)
        pixels = cost_pixels(max(1, int(h * scale)), max(1, int(w * scale)))
        seconds = _true(pixels) * rng.uniform(0.7, 1.3)
        if rng.random() < 0.1:
            seconds *= rng.uniform(0.05, 20)
        model.observe(1, pixels, seconds)
    assert 0.5 * _true(PHOTO) <= model.seconds(PHOTO) <= 2 * _true(PHOTO)
