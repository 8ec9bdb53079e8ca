"""Tensor image operations that must give Pillow's bytes (inference.device_image), run on CPU tensors.

The same integer arithmetic runs on a GPU; bench/gpu.sh checks it there against Pillow again.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from devkit import photos
from inference import device_image
from inference.device_image import pillow_pass_order, resize, resize_like_host, to_device, transpose
from inference.geometry import resize_out_on_device, resize_rgb

_PIL_FILTERS = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def test_the_installed_pillows_pass_order_is_known() -> None:
    # None would mean a Pillow whose two-pass resize is neither of the two known orders: the device
    # resizes could then differ from the host's by a level, and this test says so first.
    assert pillow_pass_order() is not None


@pytest.mark.parametrize("kind", ["box", "bilinear"])
def test_resize_gives_pillows_bytes(kind: Literal["box", "bilinear"]) -> None:
    rng = np.random.default_rng(7)
    sizes = [tuple(int(v) for v in rng.integers(1, 90, 4)) for _ in range(120)]
    sizes += [(8, 8, 8, 3), (5, 40, 2, 39), (40, 5, 39, 2), (30, 30, 30, 31), (1, 1, 7, 5), (9, 20, 3, 31)]
    for h, w, oh, ow in sizes:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(rgb).resize((ow, oh), _PIL_FILTERS[kind]))
        got = resize(_chw(rgb), oh, ow, kind).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{kind} {h}×{w} → {oh}×{ow}")


@pytest.mark.parametrize(("h", "w"), [(720, 960), (768, 1024), (300, 200), (512, 512), (1200, 300)])
def test_resize_like_host_is_resize_rgb_on_a_photo(h: int, w: int) -> None:
    rgb = photos.one_face_1024x768()
    np.testing.assert_array_equal(
        resize_like_host(_chw(rgb), h, w).permute(1, 2, 0).numpy(), resize_rgb(rgb, h, w)
    )


def test_device_resize_out_is_the_host_one() -> None:
    rgb = np.ascontiguousarray(photos.astronaut()[:333, :500])
    for size in [(333, 500), (200, 300), (700, 1051), (300, 700)]:
        host, kept = resize_out_on_device(_chw(rgb), *size, keep=True)
        np.testing.assert_array_equal(host, resize_rgb(rgb, *size))
        assert host.flags.c_contiguous and kept is not None and tuple(kept.shape) == (3, *size)
        assert resize_out_on_device(_chw(rgb), *size, keep=False)[1] is None


def test_width_first_order_never_goes_height_first() -> None:
    # What Pillow 12 and older do: width, then height, whatever the sizes.
    assert not device_image._vertical_first("width-first", (100, 100), 10, 99)
    assert device_image._vertical_first("more-rows-removed-first", (100, 100), 10, 99)
    assert not device_image._vertical_first("more-rows-removed-first", (100, 100), 80, 90)  # a tie


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
        resize(torch.zeros(3, 4, 4), 2, 2, "box")
    with pytest.raises(ValueError, match="positive"):
        resize(torch.zeros(3, 4, 4, dtype=torch.uint8), 0, 2, "box")
