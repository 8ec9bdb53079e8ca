"""Generator backends: the ONNX Runtime runner against eager float32, its graph cache, and how ``auto``
decides (with fake candidates and a fake clock, so that no test depends on wall-clock times)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from devkit.reference_graphs import ReferenceModelDir
from inference import backends, ort
from inference.backends import (
    FP32_MIN_IDENTICAL,
    MEASURE_BUDGET_S,
    MEASURE_ROUNDS,
    WIN_MARGIN,
    Accuracy,
    BackendDecision,
    Candidate,
    build_runners,
    check_setting,
    choose,
    compare,
    decide,
    unavailable,
)
from inference.dctnet import GeneratorRunner, load_generator
from inference.errors import ConfigurationError, InputShapeError
from inference.export import check_image
from inference.models import ModelStore, choose_dtype
from inference.weights import StyleWeights

CPU = torch.device("cpu")
ONNX_RUNTIME = ort.missing_runtime() is None and ort.missing_exporter() is None
needs_ort = pytest.mark.skipif(not ONNX_RUNTIME, reason="needs the onnx and onnxruntime extras")


#: Tests that export the graph or time real passes (seconds each): `make test`, not `make check`; the
#: decision logic's tests with fake candidates stay in the fast loop.
_SLOW = pytest.mark.slow


@pytest.fixture(autouse=True)
def _measure_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without what auto measured before in this process (and leaves nothing: a
    test that hides ONNX Runtime must not decide for the tests after it)."""
    monkeypatch.setattr(backends, "_measured", {})


def _bgr(h: int, w: int, n: int = 1, seed: int = 0) -> Tensor:
    """(n, 3, h, w) uint8 BGR, photo-like (smooth areas, edges, noise)."""
    images = [torch.from_numpy(check_image(h, w, seed + k)).permute(2, 0, 1) for k in range(n)]
    return torch.stack(images).to(torch.uint8)


# --- The ONNX Runtime runner --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_runners(style_weights: StyleWeights) -> dict[str, ort.OnnxRuntimeRunner]:
    """Both generators exported in memory (the process traces once, about 3–5 s on 2 cores)."""
    if not ONNX_RUNTIME:
        pytest.skip("needs the onnx and onnxruntime extras")
    return {
        role: ort.OnnxRuntimeRunner(ort.graph(path, cache=False)[0])
        for role, path in (("head", style_weights.head), ("bg", style_weights.bg))
    }


@_SLOW
@needs_ort
@pytest.mark.parametrize(
    ("role", "h", "w", "n"), [("bg", 288, 288, 1), ("bg", 96, 160, 2), ("head", 288, 288, 2)]
)
def test_onnxruntime_gives_eager_float32_within_one_level(
    ort_runners: dict[str, ort.OnnxRuntimeRunner],
    style_weights: StyleWeights,
    role: str,
    h: int,
    w: int,
    n: int,
) -> None:
    runner = ort_runners[role]
    assert (runner.backend, runner.device, runner.dtype) == ("onnxruntime", CPU, torch.float32)
    eager = GeneratorRunner(load_generator(getattr(style_weights, role)), backend="eager")
    bgr = _bgr(h, w, n)
    # The pipeline feeds the background uint8 and the head crops float32: both are taken.
    for x in (bgr, bgr.float()):
        out = runner(x)
        ref = eager(bgr)
        assert out.shape == (n, 3, h, w) and out.dtype == torch.uint8
        accuracy = compare([out], [ref])
        assert accuracy.max_levels <= 1 and accuracy.identical >= FP32_MIN_IDENTICAL, accuracy.describe()
        assert float(ref.float().std()) > 10  # two flat images would pass anything
        assert int(out.max()) <= 254


@_SLOW
@needs_ort
def test_onnxruntime_refuses_sizes_the_graph_refuses(ort_runners: dict[str, ort.OnnxRuntimeRunner]) -> None:
    with pytest.raises(InputShapeError, match="multiples of 4"):
        ort_runners["bg"](torch.zeros((1, 3, 30, 32), dtype=torch.uint8))


@_SLOW
@needs_ort
def test_the_graph_is_cached_beside_the_weights_and_used_again(
    style_weights: StyleWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "bg.safetensors"
    shutil.copyfile(style_weights.bg, weights)
    data, origin = ort.graph(weights)
    path = ort.graph_path(weights)
    assert origin == "exported" and path.read_bytes() == data
    assert path.parent == weights.parent and path.name.startswith("bg.") and path.suffix == ".onnx"

    def no_export(_: Path) -> bytes:
        raise AssertionError("exported again")

    monkeypatch.setattr(ort, "export_graph", no_export)
    again, origin = ort.graph(weights)
    assert again == data and origin == f"cached {path}"

    # Other weights (here the head's, under the same name) are another graph; the old one goes.
    monkeypatch.undo()
    shutil.copyfile(style_weights.head, weights)
    assert ort.graph_path(weights) != path
    assert ort.graph(weights)[1] == "exported"
    assert not path.exists() and ort.graph_path(weights).is_file()


@_SLOW
@needs_ort
def test_a_graph_that_cannot_be_cached_is_still_served(
    style_weights: StyleWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "head.safetensors"
    shutil.copyfile(style_weights.head, weights)
    write_bytes = Path.write_bytes

    def read_only(path: Path, data: bytes) -> int:  # a read-only volume (root may write anywhere)
        if path.parent == tmp_path:
            raise PermissionError(13, "Read-only file system", str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    data, origin = ort.graph(weights)
    assert origin == "exported" and data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors"]


def _copy_weights(style_weights: StyleWeights, tmp_path: Path) -> StyleWeights:
    for path in (style_weights.head, style_weights.bg, style_weights.mask):
        shutil.copyfile(path, tmp_path / path.name)
    return StyleWeights(
        "anime",
        tmp_path / style_weights.head.name,
        tmp_path / style_weights.bg.name,
        tmp_path / "alpha.jpg",
        "copy",
    )


@_SLOW
@needs_ort
def test_a_cached_graph_that_does_not_load_is_exported_again(
    style_weights: StyleWeights, tmp_path: Path
) -> None:
    weights = _copy_weights(style_weights, tmp_path)
    broken = ort.graph_path(weights.bg)
    broken.write_bytes(b"not an ONNX graph")
    runners = build_runners(weights, CPU, torch.float32, "onnxruntime")
    assert runners.decision.backend == "onnxruntime" and runners.decision.reason == "set by TOONSERVE_BACKEND"
    assert broken.read_bytes() != b"not an ONNX graph"  # exported again, in its place
    assert runners.decision.accuracy["onnxruntime"].failure(torch.float32) is None


@_SLOW
@needs_ort
def test_explicit_onnxruntime_off_the_bound_is_refused_and_its_graph_forgotten(
    style_weights: StyleWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = _copy_weights(style_weights, tmp_path)
    monkeypatch.setattr(backends, "_check", lambda *_: Accuracy(0.97, 0.03, 3))
    with pytest.raises(ConfigurationError, match="TOONSERVE_BACKEND=onnxruntime: the ONNX graph is too far"):
        build_runners(weights, CPU, torch.float32, "onnxruntime")
    assert not list(tmp_path.glob("*.onnx"))


# --- What is not a candidate ----------------------------------------------------------------------------


def test_explicit_onnxruntime_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import fails, as when not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'toonserve\[onnxruntime\]'"):
        check_setting("onnxruntime", CPU, torch.float32)
    why = unavailable("onnxruntime", CPU, torch.float32)
    assert why is not None and "toonserve[onnxruntime]" in why


def test_the_service_refuses_to_start_on_onnxruntime_without_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.factory import build_engine
    from service.settings import Settings

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    settings = Settings(backend="onnxruntime", device="cpu", cache_dir=tmp_path, allow_download=False)
    with pytest.raises(ConfigurationError, match=r"TOONSERVE_BACKEND=onnxruntime .*toonserve\[onnxruntime\]"):
        build_engine(settings)


def test_exporting_without_the_onnx_extra_says_what_to_install(
    style_weights: StyleWeights, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    weights = tmp_path / "bg.safetensors"
    shutil.copyfile(style_weights.bg, weights)  # no graph cached beside these
    with pytest.raises(ConfigurationError, match=r"pip install 'toonserve\[onnx\]'"):
        ort.graph(weights)


def test_onnxruntime_runs_float32_on_the_cpu_only() -> None:
    for device, dtype in ((CPU, torch.bfloat16), (CPU, torch.float16), (torch.device("cuda"), torch.float32)):
        why = unavailable("onnxruntime", device, dtype)
        assert why is not None
        with pytest.raises(ConfigurationError, match="TOONSERVE_BACKEND=onnxruntime"):
            check_setting("onnxruntime", device, dtype)
    assert "bfloat16 kernels" in str(unavailable("onnxruntime", CPU, torch.bfloat16))
    assert unavailable("onednn", torch.device("cuda"), torch.float32) == "oneDNN runs on the CPU only"
    # A precision left to auto becomes float32 for ONNX Runtime.
    assert choose_dtype("auto", CPU, "onnxruntime").dtype == torch.float32


@_SLOW
def test_auto_without_onnxruntime_measures_the_others(
    style_weights: StyleWeights, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    runners = build_runners(style_weights, CPU, torch.float32, "auto", version="without-ort")
    decision = runners.decision
    assert "toonserve[onnxruntime]" in decision.excluded["onnxruntime"]
    assert decision.backend in ("onednn", "eager") and runners.bg.backend == decision.backend
    expected = {"eager", "onednn"} if unavailable("onednn", CPU, torch.float32) is None else set()
    assert set(decision.times_ms) == expected
    assert decision.size == (288, 288) and decision.cost_ms > 0


# --- How auto decides -----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _FakeRunner:
    """Costs ``ms`` on the clock per call; gives the reference output, with ``off`` levels added to
    the first ``share`` of the values, or (``fail``) raises."""

    def __init__(self, name: str, clock: _Clock, ms: float, off: int, share: float, fail: bool) -> None:
        self.device, self.dtype, self.backend = CPU, torch.float32, name
        self.clock, self.ms, self.off, self.share, self.fail = clock, ms, off, share, fail
        self.calls = 0

    def __call__(self, bgr: Tensor) -> Tensor:
        self.calls += 1
        self.clock.now += self.ms / 1000
        if self.fail:
            raise RuntimeError("device fault")
        out = (bgr.float() * 0.5 + 20).to(torch.uint8).flatten()
        out[: int(self.share * out.numel())] += self.off
        return out.reshape(bgr.shape)


def _candidate(
    name: str, clock: _Clock, ms: float, off: int = 0, share: float = 0.0, fail: bool = False
) -> Candidate:
    head, bg = (_FakeRunner(name, clock, ms, off, share, fail) for _ in range(2))
    return Candidate(name, head, bg)  # type: ignore[arg-type]


def _choose(
    clock: _Clock,
    *candidates: Candidate,
    dtype: torch.dtype = torch.float32,
    reference: Candidate | None = None,
) -> BackendDecision:
    """``choose`` on a small image; the reference is the candidate named eager unless given."""
    reference = reference or next(c for c in candidates if c.name == "eager")
    image = torch.arange(3 * 16 * 16, dtype=torch.int64).reshape(1, 3, 16, 16).remainder(256).to(torch.uint8)
    chosen, decision = choose(candidates, reference, dtype, image=image, clock=clock, excluded={"x": "why"})
    assert chosen.name == decision.backend
    return decision


def test_auto_keeps_the_fastest_candidate() -> None:
    clock = _Clock()
    decision = _choose(
        clock,
        _candidate("onednn", clock, 100),
        _candidate("eager", clock, 120),
        _candidate("onnxruntime", clock, 80),
    )
    assert decision.backend == "onnxruntime"
    assert decision.times_ms == {"onednn": 100.0, "eager": 120.0, "onnxruntime": 80.0}
    assert "20% faster than onednn" in decision.reason
    assert decision.excluded == {"x": "why"} and set(decision.accuracy) == {"onednn", "eager", "onnxruntime"}


def test_auto_times_each_candidate_the_same_number_of_rounds() -> None:
    clock = _Clock()
    candidates = [_candidate(n, clock, ms) for n, ms in (("onednn", 100), ("eager", 90))]
    _choose(clock, *candidates)
    for candidate in candidates:
        assert candidate.bg.calls == 1 + MEASURE_ROUNDS  # type: ignore[attr-defined]
        assert candidate.head.calls == 1  # type: ignore[attr-defined]


def test_auto_stops_timing_when_its_budget_is_spent() -> None:
    clock = _Clock()
    slow = MEASURE_BUDGET_S * 1000 / 2  # one round of two candidates spends the budget
    candidates = [_candidate(n, clock, ms) for n, ms in (("onednn", slow), ("eager", slow * 1.2))]
    decision = _choose(clock, *candidates)
    assert candidates[0].bg.calls == 2  # type: ignore[attr-defined]  # the accuracy run and one round
    assert decision.times_ms == {"onednn": slow, "eager": slow * 1.2} and decision.backend == "onednn"


def test_auto_keeps_the_first_candidate_unless_another_wins_by_the_margin() -> None:
    clock = _Clock()
    just_under = 100 * (1 - WIN_MARGIN) + 1
    decision = _choose(
        clock,
        _candidate("onednn", clock, 100),
        _candidate("eager", clock, 101),
        _candidate("onnxruntime", clock, just_under),
    )
    assert decision.backend == "onednn"
    assert "onednn is kept" in decision.reason and decision.times_ms["onnxruntime"] < 100


def test_a_candidate_off_the_float32_bound_is_excluded_however_fast() -> None:
    clock = _Clock()
    decision = _choose(
        clock,
        _candidate("onednn", clock, 100),
        _candidate("eager", clock, 120),
        _candidate("onnxruntime", clock, 10, off=1, share=0.01),  # 1 % of the values one level off
    )
    assert decision.backend == "onednn" and "onnxruntime" not in decision.times_ms
    assert decision.excluded["onnxruntime"].startswith("too far from eager float32: 99.")
    accuracy = decision.accuracy["onnxruntime"]
    assert accuracy.max_levels == 1 and 0.98 < accuracy.identical < FP32_MIN_IDENTICAL


def test_a_candidate_that_fails_is_excluded() -> None:
    clock = _Clock()
    decision = _choose(clock, _candidate("onednn", clock, 10, fail=True), _candidate("eager", clock, 120))
    assert decision.backend == "eager" and decision.times_ms == {}
    assert decision.excluded["onednn"] == "failed: RuntimeError: device fault"
    assert "the only candidate" in decision.reason


def test_the_reduced_precisions_bound_is_the_fast_modes() -> None:
    clock = _Clock()
    decision = _choose(
        clock,
        _candidate("onednn", clock, 50, off=2, share=0.4),  # mean 0.8: within the bfloat16 bound
        _candidate("eager", clock, 60, off=3, share=0.5),  # mean 1.5: not
        dtype=torch.bfloat16,
        reference=_candidate("eager", clock, 200),  # eager float32
    )
    assert decision.backend == "onednn" and "mean ≤ 1" in decision.excluded["eager"]
    assert Accuracy(0.5, 0.9, 16).failure(torch.bfloat16) is None
    assert Accuracy(0.5, 0.9, 17).failure(torch.bfloat16) is not None
    assert Accuracy(0.9995, 0.0005, 1).failure(torch.float32) is None
    assert Accuracy(0.9995, 0.001, 2).failure(torch.float32) is not None


def test_without_a_candidate_within_the_bound_the_closest_serves() -> None:
    """The precision was chosen before the backend: a bound no backend meets is reported, not fatal."""
    clock = _Clock()
    decision = _choose(
        clock,
        _candidate("onednn", clock, 10, off=40, share=1.0),
        _candidate("eager", clock, 10, off=20, share=1.0),
        dtype=torch.bfloat16,
        reference=_candidate("eager", clock, 10),
    )
    assert decision.backend == "eager" and decision.times_ms == {}
    assert (
        "no candidate met the bfloat16 accuracy bound" in decision.reason
        and "float32 is exact" in decision.reason
    )
    assert set(decision.excluded) == {"x", "onednn", "eager"}


def test_when_no_candidate_runs_the_error_says_why() -> None:
    clock = _Clock()
    reference = _candidate("eager", clock, 10)
    broken = _candidate("onednn", clock, 10, fail=True)
    image = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(
        ConfigurationError, match="no generator backend runs here: onednn: failed: RuntimeError"
    ):
        choose([broken], reference, torch.float32, image=image, clock=clock)


@pytest.mark.parametrize(
    ("times", "winner"),
    [
        ({"onednn": 100.0, "eager": 99.0}, "onednn"),
        ({"onednn": 100.0, "eager": 94.0}, "eager"),
        ({"onednn": 90.0, "eager": 120.0, "onnxruntime": 80.0}, "onnxruntime"),
        ({"onednn": 90.0, "onnxruntime": 88.0}, "onednn"),
    ],
)
def test_decide(times: dict[str, float], winner: str) -> None:
    assert decide(times, "onednn")[0] == winner


@_SLOW
def test_auto_times_once_per_process_and_checks_each_styles_accuracy(
    style_weights: StyleWeights, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # keep it to the quick torch candidates
    first = build_runners(style_weights, CPU, torch.float32, "auto", version="style-a")
    measured = backends.choose

    def no_measuring(*_: object, **__: object) -> object:
        raise AssertionError("measured again")

    monkeypatch.setattr(backends, "choose", no_measuring)
    # The same weights again: the same decision, nothing run.
    again = build_runners(style_weights, CPU, torch.float32, "auto", version="style-a")
    assert again.decision is first.decision and again.bg is not first.bg
    # Another style's weights: the same backend and times, its own accuracy checked.
    other = build_runners(style_weights, CPU, torch.float32, "auto", version="style-b")
    assert other.decision.backend == first.decision.backend
    assert other.decision.times_ms == first.decision.times_ms
    assert set(other.decision.accuracy) == {first.decision.backend}
    assert "timed when style anime loaded" in other.decision.reason

    # Weights the chosen backend misses the bound on are measured in full.
    monkeypatch.setattr(backends, "_check", lambda *_: Accuracy(0.5, 2.0, 9))
    monkeypatch.setattr(backends, "choose", measured)
    third = build_runners(style_weights, CPU, torch.float32, "auto", version="style-c")
    assert third.decision is not first.decision and set(third.decision.accuracy) >= {"eager"}


def test_explicit_torch_backends_are_not_measured(style_weights: StyleWeights) -> None:
    runners = build_runners(style_weights, CPU, torch.float32, "eager")
    assert runners.decision == BackendDecision("eager", "set by TOONSERVE_BACKEND")
    assert runners.bg.backend == runners.head.backend == "eager"


@_SLOW
def test_the_store_records_each_styles_decision(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    store = ModelStore(CPU, torch.float32, tmp_path, model_dir.path.parent, False, backend="auto")
    loaded = store.load("anime")
    decision = loaded.backend
    assert decision is not None and decision.backend == loaded.bg.backend == loaded.head.backend
    assert decision.reason.startswith("auto: ")
    assert decision.backend in decision.times_ms or not decision.times_ms
    expected = {"onednn", "eager", "onnxruntime"} - set(decision.excluded)
    assert set(decision.times_ms) in (expected, set())
