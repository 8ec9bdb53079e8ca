"""The pipeline's last stages on the CPU (inference.pipeline): the model's output written straight into
an (h, w, 3) array gives the values of the channel flip, rounding and cast it replaces, at every
strength, and the result and the kept stages come out contiguous (no transposing copy left to do).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devkit import photos
from inference.pipeline import Cartoonizer, Options, _Work


@pytest.mark.parametrize("strength", [1.0, 0.6, 0.0])
def test_finish_on_the_cpu_gives_the_values_of_the_float_path(
    cartoonizer: Cartoonizer, strength: float
) -> None:
    options = Options(processing_size=256, strength=strength, keep_stages=True, resize_later=True)
    work = _Work(photos.astronaut(), options)
    with torch.inference_mode():
        cartoonizer.resize(work)
        cartoonizer.detect(work)
        cartoonizer.background([work])
        cartoonizer.align(work)
        cartoonizer.head([work])
        cartoonizer.blend(work)
        assert work.result_t is not None and work.photo_t is not None and work.chosen
        cartoon = work.result_t.flip(0).round().clamp(0, 255).to(torch.uint8)  # what it replaces
        photo = work.photo_t.clone()
        result = cartoonizer.finish(work)
        expected = (
            torch.lerp(photo.float(), cartoon.float(), strength).round_().clamp_(0, 255).to(torch.uint8)
        )
    if strength == 1.0:
        expected = cartoon
    elif strength == 0.0:
        expected = photo
    np.testing.assert_array_equal(result.image, expected.permute(1, 2, 0).numpy())
    assert result.image.flags.c_contiguous and result.image.shape == (*result.processing_size, 3)
    assert result.stages is not None and result.stages.cartoon is not None
    assert result.stages.cartoon.flags.c_contiguous and result.stages.photo.flags.c_contiguous
    np.testing.assert_array_equal(result.stages.cartoon, cartoon.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(result.stages.photo, photo.permute(1, 2, 0).numpy())
