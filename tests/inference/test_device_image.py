"""Tensor image operations that must give the host's bytes (inference.device_image), run on CPU tensors.

The host resizes with OpenCV; the same integer and float32 arithmetic runs on a GPU, where
bench/gpu.sh checks it against OpenCV again.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from devkit import photos
from inference import device_image
from inference.device_image import (
    opencv_agrees,
    opencv_resize,
    resize_array,
    resize_like_host,
    resize_steps,
    to_device,
    transpose,
)
from inference.geometry import resize_out_on_device, resize_rgb

Sizes = tuple[int, int, int, int]


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def _assert_opencvs_bytes(cases: list[Sizes], channels: int = 3, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    for h, w, oh, ow in cases:
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        expected = resize_array(pixels, oh, ow)
        got = opencv_resize(_chw(pixels), oh, ow).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{channels} channels, {h}×{w} → {oh}×{ow}")


def _random_cases(kind: str, count: int, seed: int, most: int = 90) -> list[Sizes]:
    """(h, w, out_h, out_w) of one kind: whole factors, other shrinks, enlargements, mixed."""
    rng = np.random.default_rng(seed)
    cases: list[Sizes] = []
    while len(cases) < count:
        h, w, oh, ow = (int(v) for v in rng.integers(1, most, 4))
        if kind == "whole":
            fy, fx = (int(v) for v in rng.integers(1, 5, 2))
            h, w = oh * fy, ow * fx
        elif kind == "shrink":
            oh, ow = min(h, oh), min(w, ow)
        elif kind == "enlarge":
            oh, ow = max(h, oh), max(w, ow)
        elif (oh - h) * (ow - w) >= 0:  # mixed: one side shrinks while the other grows
            continue
        if (h, w) != (oh, ow):
            cases.append((h, w, oh, ow))
    return cases


def test_the_installed_opencv_computes_what_the_device_does() -> None:
    # False would mean an OpenCV build whose resizes differ from this arithmetic: device resizes would
    # then go through the host (same bytes, slower), and this test says so first.
    assert opencv_agrees()


@pytest.mark.parametrize("kind", ["whole", "shrink", "enlarge", "mixed"])
def test_resize_gives_opencvs_bytes(kind: str) -> None:
    _assert_opencvs_bytes(_random_cases(kind, 40, seed=len(kind)))


def test_resize_gives_opencvs_bytes_at_the_edges() -> None:
    cases: list[Sizes] = [
        (2, 2, 1, 1),  # 2×2 blocks: (sum + 2) >> 2
        (6, 6, 3, 2),  # 2×3 blocks: sum · (1/6) in float32, half to even
        (8, 8, 1, 1),
        (1, 1, 7, 5),  # one pixel everywhere
        (1, 9, 1, 4),  # a single row, shrunk
        (1, 9, 1, 23),  # a single row, enlarged
        (9, 1, 23, 1),
        (1, 9, 5, 3),  # a single row to several: mixed
        (5, 40, 2, 39),
        (40, 5, 39, 2),
        (30, 30, 30, 31),  # one side unchanged
        (31, 30, 30, 30),
        (9, 20, 3, 31),
        (7, 11, 14, 22),  # exact doubling
        (5, 7, 15, 21),
        (17, 23, 7, 11),
    ]
    _assert_opencvs_bytes(cases)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_resize_gives_opencvs_bytes_for_other_channel_counts(channels: int) -> None:
    cases = [(8, 8, 4, 4), (9, 15, 3, 5), (17, 23, 7, 11), (9, 13, 20, 31), (20, 9, 7, 15)]
    _assert_opencvs_bytes(cases, channels=channels)


def test_resize_steps_give_each_side_its_filter() -> None:
    assert resize_steps((720, 960), 720, 960) == ()
    assert resize_steps((768, 1024), 720, 960) == (("area", 720, 960),)
    assert resize_steps((720, 960), 768, 1024) == (("linear", 768, 1024),)
    assert resize_steps((720, 960), 720, 1024) == (("linear", 720, 1024),)
    assert resize_steps((720, 960), 500, 1200) == (("area", 500, 960), ("linear", 500, 1200))
    assert resize_steps((720, 960), 800, 600) == (("area", 720, 600), ("linear", 800, 600))


def test_resize_rgb_is_opencvs_area_filter_and_bilinear() -> None:
    rgb = photos.one_face_1024x768()
    np.testing.assert_array_equal(
        resize_rgb(rgb, 720, 960), cv2.resize(rgb, (960, 720), interpolation=cv2.INTER_AREA)
    )
    small = resize_rgb(rgb, 720, 960)
    np.testing.assert_array_equal(
        resize_rgb(small, 768, 1024), cv2.resize(small, (1024, 768), interpolation=cv2.INTER_LINEAR)
    )
    assert resize_rgb(rgb, 768, 1024) is rgb


@pytest.mark.parametrize(
    ("h", "w"), [(720, 960), (768, 1024), (300, 200), (512, 512), (1200, 300), (500, 1100)]
)
def test_resize_like_host_is_resize_rgb_on_a_photo(h: int, w: int) -> None:
    rgb = photos.one_face_1024x768()
    np.testing.assert_array_equal(
        resize_like_host(_chw(rgb), h, w).permute(1, 2, 0).numpy(), resize_rgb(rgb, h, w)
    )


def test_resize_like_host_goes_through_the_host_where_opencv_computes_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device_image, "opencv_agrees", lambda: False)
    rgb = np.ascontiguousarray(photos.astronaut()[:101, :77])
    for size in [(50, 40), (203, 155), (60, 100), (101, 77)]:
        got = resize_like_host(_chw(rgb), *size)
        assert got.dtype == torch.uint8 and tuple(got.shape) == (3, *size)
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), resize_rgb(rgb, *size))


def test_device_resize_out_is_the_host_one() -> None:
    rgb = np.ascontiguousarray(photos.astronaut()[:333, :500])
    for size in [(333, 500), (200, 300), (700, 1051), (300, 700)]:
        host, kept = resize_out_on_device(_chw(rgb), *size, keep=True)
        np.testing.assert_array_equal(host, resize_rgb(rgb, *size))
        assert host.flags.c_contiguous and kept is not None and tuple(kept.shape) == (3, *size)
        assert resize_out_on_device(_chw(rgb), *size, keep=False)[1] is None


@pytest.mark.slow
def test_resize_gives_opencvs_bytes_at_photo_sizes_and_many_others() -> None:
    # Real sizes: a 12 MP photo to the processing size (factor 4.2: up to 6 taps a side), a reduced
    # JPEG decode to it, a result back up to the photo's size, and long strips.
    real: list[Sizes] = [
        (3024, 4032, 720, 960),
        (1512, 2016, 720, 960),
        (720, 960, 3024, 4032),
        (720, 1080, 768, 1152),
        (30, 4000, 121, 16000),
        (4000, 300, 1000, 75),
    ]
    _assert_opencvs_bytes(real)
    for kind in ("whole", "shrink", "enlarge", "mixed"):
        _assert_opencvs_bytes(_random_cases(kind, 150, seed=100 + len(kind), most=400), seed=len(kind))


@pytest.mark.parametrize("method", list(Image.Transpose))
def test_transpose_is_pillows(method: Image.Transpose) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).transpose(method))
    np.testing.assert_array_equal(transpose(_chw(rgb), method).permute(1, 2, 0).numpy(), expected)


def test_to_device_on_the_cpu_does_not_copy() -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    tensor = to_device(array, torch.device("cpu"))
    array[0, 0] = 99
    assert tensor[0, 0] == 99


def test_resize_refuses_what_is_not_a_chw_uint8_image() -> None:
    with pytest.raises(ValueError, match="uint8"):
        opencv_resize(torch.zeros(3, 4, 4), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        opencv_resize(torch.zeros(3, 4, 4, dtype=torch.uint8), 0, 2)
