"""Steady frames: flicker blended away along the motion, nothing ghosting where the motion fails,
cuts starting afresh, and the warping error that measures it."""

from __future__ import annotations

import numpy as np

from devkit import photos
from inference.temporal import Steadier, is_cut, warp, warping_error

SIDE = 128


def _scene(shift: int = 0) -> np.ndarray:
    """A textured picture, moved ``shift`` pixels left (a camera panning right)."""
    big = photos.astronaut()[100 : 100 + SIDE, 100 : 100 + SIDE + 64]
    return np.ascontiguousarray(big[:, shift : shift + SIDE])


def _flicker(image: np.ndarray, rng: np.random.Generator, sigma: float = 6.0) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def _truth(n: int, step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    flow = np.zeros((SIDE, SIDE, 2), np.float32)
    flow[..., 0] = step
    valid = np.zeros((SIDE, SIDE), bool)
    valid[4:-4, 4 : SIDE - 4 - step] = True
    return [flow] * (n - 1), [valid] * (n - 1)


def test_the_warping_error_of_a_known_motion() -> None:
    frames = [_scene(2 * i) for i in range(5)]
    flows, valid = _truth(5, 2)
    assert warping_error(frames, flows, valid) == 0.0  # moved exactly as the flow says
    still_flows, still_valid = _truth(5, 0)
    assert warping_error(frames, still_flows, still_valid) > 5  # a pan measured as a still shot
    shifted = warp(frames[0], flows[0])
    assert np.array_equal(shifted[:, : SIDE - 2], frames[0][:, 2:])


def test_flicker_is_blended_away_along_the_motion_and_frames_stay_close() -> None:
    rng = np.random.default_rng(0)
    for step in (0, 2):
        photos_ = [_scene(step * i) for i in range(16)]
        cartoons = [_flicker(p, rng) for p in photos_]
        steadier = Steadier()
        steady = [steadier(p, c) for p, c in zip(photos_, cartoons, strict=True)]
        flows, valid = _truth(16, step)
        assert warping_error(steady, flows, valid) < 0.6 * warping_error(cartoons, flows, valid), step
        apart = [np.abs(s.astype(int) - c.astype(int)).mean() for s, c in zip(steady, cartoons, strict=True)]
        assert max(apart) < 6.0  # within the flicker itself
        assert steady[0] is cartoons[0]  # the first frame is taken as it is


def test_what_appears_or_changes_is_not_blended() -> None:
    still = _scene()
    steadier = Steadier()
    steadier(still, still)
    # A dark square appears in the middle: the motion cannot explain it from what was there, so the
    # cartoon shows there (at most a few levels from it), with no ghost of the picture before.
    changed = still.copy()
    changed[40:80, 40:80] = 0
    cartoon = changed.copy()
    out = steadier(changed, cartoon).astype(int)
    inside = (slice(48, 72), slice(48, 72))
    assert np.abs(out[inside] - cartoon[inside]).mean() < 3
    assert np.abs(out[inside] - still[inside]).mean() > 30
    assert 0 < steadier.blended < 1


def test_a_cut_starts_afresh() -> None:
    first, other = _scene(), np.ascontiguousarray(photos.coffee()[:SIDE, :SIDE])
    assert not is_cut(first, _scene(2)) and is_cut(first, other)
    steadier = Steadier()
    steadier(first, first)
    out = steadier(other, other)
    assert out is other and steadier.blended == 0.0
    steadier.reset()
    assert steadier(first, first) is first


def test_priming_continues_a_clip_made_elsewhere() -> None:
    rng = np.random.default_rng(1)
    frames = [_scene() for _ in range(3)]
    cartoons = [_flicker(f, rng) for f in frames]
    whole = Steadier()
    outs = [whole(f, c) for f, c in zip(frames, cartoons, strict=True)]
    resumed = Steadier()
    resumed.prime(frames[1], outs[1])
    assert np.array_equal(resumed(frames[2], cartoons[2]), outs[2])
