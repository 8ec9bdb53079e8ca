"""The result cache: what the models made of a photo, finished again at other options with the bytes a
full run gives, kept per client, bounded, shared with the same photo's work in flight."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from inference.errors import OptionsError
from inference.pipeline import Cartoonizer, NoFaceError, Options, Stages, finish_stages
from serving.flow import Flow, Limits, Outcome
from serving.options import RequestOptions, ResolvedOptions
from serving.result_cache import CacheKey, ResultCache
from serving.scheduler import Scheduler
from serving.tickets import Client
from tests.serving.engines import bare_engine

DEFAULTS = ResolvedOptions(style="anime", processing_size=256, format="png", quality=90)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _stages(side: int, cartoon: bool = True) -> Stages:
    pixels = np.zeros((side, side, 3), np.uint8)
    return Stages(
        pixels, pixels.copy() if cartoon else None, (), 0, (side, side), "anime", "cpu", "float32", "demo"
    )


def _key(client: str = "a", photo: str = "p") -> CacheKey:
    return CacheKey(client, photo, "anime", "v1", 720, "cpu", "float32")


def test_the_cache_keeps_the_most_recently_used_within_its_bytes() -> None:
    entry = _stages(10).nbytes  # 600 bytes: photo and cartoon
    cache = ResultCache(3 * entry)
    for name in "abc":
        cache.put(_key(photo=name), _stages(10))
    assert cache.get(_key(photo="a")) is not None  # a is now the most recent: b goes first
    cache.put(_key(photo="d"), _stages(10))
    assert cache.get(_key(photo="b")) is None
    assert all(cache.get(_key(photo=name)) is not None for name in "acd")
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions, stats.capacity) == (3, 3 * entry, 1, 3 * entry)
    cache.put(_key(photo="huge"), _stages(100))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(_key(photo="huge")) is None and cache.stats().evictions == 1
    cache.put(_key(photo="a"), _stages(10))  # replacing an entry does not count it twice
    assert cache.stats().bytes == 3 * entry
    cache.discard(_key(photo="a"))
    assert cache.stats().entries == 2 and cache.stats().bytes == 2 * entry


def test_one_clients_entry_is_not_another_clients() -> None:
    cache = ResultCache(10**6)
    cache.put(_key(client="alice"), _stages(10))
    assert cache.get(_key(client="alice")) is not None
    assert cache.get(_key(client="bob")) is None


def test_a_cache_of_zero_bytes_holds_nothing() -> None:
    cache = ResultCache(0)
    cache.put(_key(), _stages(1))
    assert not cache.enabled and cache.get(_key()) is None
    with pytest.raises(ValueError):
        ResultCache(-1)


@pytest.mark.parametrize(
    "options",
    [
        Options(processing_size=256, strength=0.37),
        Options(processing_size=256, output_size=(123, 77)),
        Options(processing_size=256, strength=0.5, resize_later=True, output_size=(300, 300)),
        # In the full suite only (make check stays under a minute).
        pytest.param(Options(processing_size=256, strength=0.0), marks=pytest.mark.slow),
        # One side grows, the other shrinks.
        pytest.param(Options(processing_size=256, output_size=(600, 200)), marks=pytest.mark.slow),
    ],
)
def test_finishing_kept_stages_gives_the_bytes_of_a_full_run(
    cartoonizer: Cartoonizer, options: Options
) -> None:
    photo = photos.astronaut()
    kept = cartoonizer.run(photo, Options(processing_size=256, keep_stages=True))
    assert kept.stages is not None and kept.stages.stylized == 1
    again = finish_stages(kept.stages, options)
    full = cartoonizer.run(photo, options)
    assert np.array_equal(again.image, full.image)
    assert again.output_size == full.output_size and again.faces == full.faces
    assert again.timings_ms["background"] == 0 and again.timings_ms["head"] == 0


def test_stages_without_a_background_pass_say_what_they_cannot_serve(cartoonizer: Cartoonizer) -> None:
    coffee = photos.coffee()  # no face
    kept = cartoonizer.run(coffee, Options(processing_size=256, no_face="passthrough", keep_stages=True))
    assert kept.stages is not None and kept.stages.cartoon is None
    assert kept.stages.serves("passthrough") and kept.stages.serves("error")
    assert not kept.stages.serves("background")
    with pytest.raises(NoFaceError):
        finish_stages(kept.stages, Options(processing_size=256, no_face="error"))
    with pytest.raises(OptionsError):
        finish_stages(kept.stages, Options(processing_size=256, no_face="background"))
    passthrough = finish_stages(kept.stages, Options(processing_size=256, no_face="passthrough"))
    assert np.array_equal(passthrough.image, kept.image)


@pytest.fixture
def flow(cartoonizer: Cartoonizer) -> Iterator[Flow]:
    scheduler = Scheduler({"anime": cartoonizer}, name="test")
    scheduler.start()
    flow = Flow(
        bare_engine(cartoonizer, scheduler),
        DEFAULTS,
        limits=Limits(),
        timeout_s=120,
        codec_threads=1,
        cache=ResultCache(64 * 2**20),
    )
    yield flow
    flow.close()
    scheduler.close()


def _run(flow: Flow, data: bytes, client: Client | None = None, **options: Any) -> Outcome:
    return asyncio.run(flow.run(data, flow.options(RequestOptions(**options)), client=client))


def test_a_photo_seen_before_skips_the_models_and_gives_the_same_bytes(flow: Flow) -> None:
    data = _png(photos.grace_hopper())
    first = _run(flow, data, strength=1.0)
    second = _run(flow, data, strength=0.6, format="jpeg", quality=70, output_size=200)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.timings_ms["background"] == 0 and second.timings_ms["decode"] == 0
    assert second.timings_ms["encode"] > 0 and second.photo_sha256 == first.photo_sha256
    flow.cache.clear()
    fresh = _run(flow, data, strength=0.6, format="jpeg", quality=70, output_size=200)
    assert fresh.cache == "miss" and fresh.data == second.data
    stats = flow.cache.stats()
    assert (stats.hits, stats.misses) == (1, 2)


@pytest.mark.slow
def test_another_client_or_processing_size_is_a_miss(flow: Flow) -> None:
    data = _png(photos.grace_hopper())
    assert _run(flow, data, client=Client("alice", "alice")).cache == "miss"
    assert _run(flow, data, client=Client("bob", "bob")).cache == "miss"
    assert _run(flow, data, client=Client("alice", "alice"), processing_size=200).cache == "miss"
    assert _run(flow, data, client=Client("alice", "alice"), strength=0.5).cache == "hit"


def test_the_same_photo_twice_in_one_request_runs_once(flow: Flow) -> None:
    data = _png(photos.grace_hopper())
    other = _png(photos.astronaut())

    async def run() -> list[Any]:
        return await flow.run_many([data, other, data], flow.options(RequestOptions()))

    outcomes = asyncio.run(run())
    assert [o.cache for o in outcomes] == ["miss", "miss", "hit"]
    assert outcomes[0].data == outcomes[2].data
    assert not flow._inflight  # nothing left waiting


@pytest.mark.slow
def test_two_requests_at_once_share_the_work_without_a_cache(cartoonizer: Cartoonizer) -> None:
    scheduler = Scheduler({"anime": cartoonizer}, name="test")
    scheduler.start()
    flow = Flow(
        bare_engine(cartoonizer, scheduler), DEFAULTS, limits=Limits(), timeout_s=120, codec_threads=1
    )
    data = _png(photos.grace_hopper())
    try:

        async def run() -> tuple[Outcome, Outcome]:
            params = flow.options(RequestOptions())
            a, b = await asyncio.gather(
                flow.run(data, params), flow.run(data, params.model_copy(update={"strength": 0.5}))
            )
            return a, b

        a, b = asyncio.run(run())
        assert {a.cache, b.cache} == {"miss", "hit"}
        assert not flow.cache.enabled and flow.cache.stats().entries == 0
        assert _run(flow, data).cache == "miss"  # nothing kept once done
    finally:
        flow.close()
        scheduler.close()


def test_a_failed_leader_leaves_its_followers_to_do_the_work(flow: Flow) -> None:
    data = _png(photos.coffee())  # no face: no_face=error fails, passthrough does not

    async def run() -> tuple[Any, Any]:
        failing = flow.options(RequestOptions(no_face="error"))
        passing = flow.options(RequestOptions(no_face="passthrough"))
        return await asyncio.gather(flow.run(data, failing), flow.run(data, passing), return_exceptions=True)

    failed, passed = asyncio.run(run())
    assert isinstance(failed, NoFaceError)
    assert isinstance(passed, Outcome) and passed.result.no_face == "passthrough"
    assert not flow._inflight


def test_tags_change_with_every_input(flow: Flow) -> None:
    params = flow.options(RequestOptions())
    tag = flow.tag(params, "a" * 64, "image")
    assert len(tag) == 32 and tag == flow.tag(params, "a" * 64, "image")
    assert tag != flow.tag(params, "b" * 64, "image")
    assert tag != flow.tag(params.model_copy(update={"strength": 0.5}), "a" * 64, "image")
    assert tag != flow.tag(params.model_copy(update={"quality": 89}), "a" * 64, "image")
    flow.tag_salt = "after the update"
    assert tag != flow.tag(params, "a" * 64, "image")
