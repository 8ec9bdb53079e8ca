"""int8 generators (``TOONSERVE_DTYPE=int8``, inference/quantize.py): the graph rewrites, the
deviation of the quantized generators from float32 on real photos, their cache beside the weights,
the errors without what they need, and ``auto``'s rule (never int8 unless under one level and faster).

Tests that quantize or run the generators at photo sizes are ``slow`` (seconds each on 2 cores); the
module's fixture quantizes the demo weights once and the others reuse its cache."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from devkit.reference_graphs import ReferenceModelDir
from inference import backends, models, ort, quantize
from inference.backends import (
    INT8_MAX_MEAN,
    REDUCED_MAX_LEVELS,
    WIN_MARGIN,
    build_runners,
    check_setting,
    unavailable,
)
from inference.errors import ConfigurationError, InputShapeError
from inference.export import check_image
from inference.models import (
    DTYPES,
    DtypeSetting,
    Int8Evidence,
    ModelStore,
    choose_dtype,
    describe_dtypes,
    int8_unconsidered,
)
from inference.quantize import CALIBRATION_PHOTOS, Deviation, QuantizationError
from inference.weights import StyleWeights

CPU = torch.device("cpu")
ONNX_RUNTIME = ort.missing_runtime() is None and ort.missing_exporter() is None
needs_ort = pytest.mark.skipif(not ONNX_RUNTIME, reason="needs the onnx and onnxruntime extras")
_SLOW = pytest.mark.slow


@pytest.fixture(autouse=True)
def _measure_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_measured", {})


def _copy_weights(style_weights: StyleWeights, folder: Path) -> StyleWeights:
    folder.mkdir(parents=True, exist_ok=True)
    for path in (style_weights.head, style_weights.bg, style_weights.mask):
        shutil.copyfile(path, folder / path.name)
    return StyleWeights(
        "anime", folder / "head.safetensors", folder / "bg.safetensors", folder / "alpha.jpg", "copy"
    )


@pytest.fixture(scope="module")
def int8_weights(style_weights: StyleWeights, tmp_path_factory: pytest.TempPathFactory) -> StyleWeights:
    """The demo weights (head seed 1, background seed 2) with both int8 graphs made beside them."""
    if not ONNX_RUNTIME:
        pytest.skip("needs the onnx and onnxruntime extras")
    weights = _copy_weights(style_weights, tmp_path_factory.mktemp("int8"))
    for path in (weights.head, weights.bg):
        data, origin = quantize.int8_graph(path)
        assert origin == "quantized" and quantize.int8_path(path).read_bytes() == data
    return weights


# --- The setting ----------------------------------------------------------------------------------------


def test_int8_is_a_dtype_like_the_others() -> None:
    """Named once: the setting's choices, its description (and so the README table's source, the
    CLI's --dtype choices and the Kubernetes check) come from inference.models."""
    assert DTYPES["int8"] == torch.int8
    assert get_args(DtypeSetting) == ("auto", *DTYPES)
    assert all(f"{name}:" in describe_dtypes() for name in get_args(DtypeSetting))
    from service.settings import Settings

    assert Settings(dtype="int8").dtype == "int8"
    assert describe_dtypes() in (Settings.model_fields["dtype"].description or "")
    choice = choose_dtype("int8", CPU)
    assert choice.dtype == torch.int8 and choice.name == "int8" and "TOONSERVE_DTYPE" in choice.reason


def test_int8_runs_on_onnxruntime_on_the_cpu_only() -> None:
    with pytest.raises(ConfigurationError, match="CPU only"):
        choose_dtype("int8", torch.device("cuda"))
    for name in ("onednn", "eager"):
        assert "ONNX Runtime's quantized graph only" in str(unavailable(name, CPU, torch.int8))
        with pytest.raises(ConfigurationError, match=f"TOONSERVE_BACKEND={name} cannot run int8"):
            check_setting(name, CPU, torch.int8)


def test_int8_without_onnxruntime_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import fails, as when not installed
    for setting in ("auto", "onnxruntime"):
        with pytest.raises(ConfigurationError, match=r"int8 .*pip install 'toonserve\[onnxruntime\]'"):
            check_setting(setting, CPU, torch.int8)
    from service.factory import build_engine
    from service.settings import Settings

    settings = Settings(dtype="int8", backend="auto", device="cpu", cache_dir=tmp_path, allow_download=False)
    with pytest.raises(ConfigurationError, match=r"TOONSERVE_DTYPE=int8 .*toonserve\[onnxruntime\]"):
        build_engine(settings)


def test_missing_calibration_photos_say_what_to_install(
    style_weights: StyleWeights, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(quantize.CalibrationPhoto, "locate", lambda self: None)
    why = quantize.missing_photos()
    assert why is not None and "pip install matplotlib scikit-image" in why
    weights = _copy_weights(style_weights, tmp_path)  # nothing cached beside these
    with pytest.raises(QuantizationError, match="pip install matplotlib scikit-image"):
        quantize.calibration_inputs("bg")
    if ONNX_RUNTIME:
        monkeypatch.setattr(ort, "graph", lambda *_, **__: (b"", "exported"))  # not the part under test
        with pytest.raises(ConfigurationError, match="TOONSERVE_DTYPE=int8: making the int8 graphs needs"):
            backends.build("onnxruntime", weights, CPU, torch.int8)


# --- auto's rule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "int8_ms", "picked"),
    [
        (0.4, 300.0, True),
        (INT8_MAX_MEAN - 1e-3, 300.0, True),
        (INT8_MAX_MEAN, 300.0, False),  # not under one level: never, however fast
        (1.7, 100.0, False),
        (0.4, 570.0 * (1 - WIN_MARGIN) + 1, False),  # not faster by the margin
    ],
)
def test_auto_picks_int8_only_under_one_level_and_faster(mean: float, int8_ms: float, picked: bool) -> None:
    evidence = Int8Evidence(mean, int8_ms, 570.0, "the test")
    choice = choose_dtype("auto", CPU, "auto", evidence)
    assert (choice.dtype == torch.int8) is picked
    if not picked:
        assert choice.dtype == choose_dtype("auto", CPU).dtype and "int8 not picked" in choice.reason


def test_auto_without_a_measurement_of_int8_never_picks_it() -> None:
    assert choose_dtype("auto", CPU).dtype != torch.int8
    evidence = Int8Evidence(0.1, 10.0, 570.0)
    assert choose_dtype("auto", CPU, "onednn", evidence).dtype != torch.int8  # torch runs no int8
    assert choose_dtype("float32", CPU, "auto", evidence).dtype == torch.float32  # set, not auto


def test_auto_weighs_int8_only_where_it_can_run_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store weighs int8 (makes and measures it as a style loads) only for ``auto`` on a CPU with
    8-bit dot products, the backend left to ``auto`` and ONNX Runtime installed; otherwise it says why."""
    assert int8_unconsidered("bfloat16", CPU, "auto") == "TOONSERVE_DTYPE=bfloat16"
    assert int8_unconsidered("auto", torch.device("cuda"), "auto") == "int8 runs on the CPU only"
    assert int8_unconsidered("auto", CPU, "onednn") == "TOONSERVE_BACKEND=onednn"
    assert int8_unconsidered("auto", CPU, "onnxruntime") == "TOONSERVE_BACKEND=onnxruntime"
    monkeypatch.setattr(models, "int8_cpu", lambda: True)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import fails, as when not installed
    assert "pip install 'toonserve[onnxruntime]'" in str(int8_unconsidered("auto", CPU, "auto"))
    monkeypatch.setattr(models, "int8_cpu", lambda: False)
    assert "no VNNI or AMX-INT8" in str(int8_unconsidered("auto", CPU, "auto"))


def test_a_service_left_to_auto_says_why_it_does_not_weigh_int8(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.factory import build_engine
    from service.settings import Settings

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    engine = build_engine(Settings(backend="auto", device="cpu", cache_dir=tmp_path, allow_download=False))
    assert not engine.store.consider_int8
    assert engine.store.dtype_reason.endswith("; int8 not considered: " + str(ort.missing_runtime()))
    pinned = build_engine(Settings(backend="onednn", device="cpu", cache_dir=tmp_path, allow_download=False))
    assert not pinned.store.consider_int8 and "int8" not in pinned.store.dtype_reason


# --- The rewrites -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "block", "cin", "cout"), [(7, 2, 3, 32), (7, 4, 32, 3), (3, 2, 4, 5)])
def test_an_output_blocked_convolution_is_the_convolution(k: int, block: int, cin: int, cout: int) -> None:
    """The rewrite of the first and last convolutions: a block×block tile per position with stride
    block, then depth to space in channels-last order, gives the convolution's output."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(cout, cin, k, k, generator=gen)
    bias = torch.randn(cout, generator=gen)
    x = torch.randn(1, cin, 4 * block, 6 * block, generator=gen)
    blocked_w, blocked_b = quantize._blocked_weights(weight.numpy(), bias.numpy(), block)
    tiles = F.conv2d(
        x, torch.from_numpy(blocked_w), torch.from_numpy(blocked_b), stride=block, padding=k // 2
    )
    n, _, h, w = tiles.shape
    nhwc = tiles.permute(0, 2, 3, 1).reshape(n, h, w, block, block, cout).permute(0, 1, 3, 2, 4, 5)
    out = nhwc.reshape(n, h * block, w * block, cout).permute(0, 3, 1, 2)
    expected = F.conv2d(x, weight, bias, padding=k // 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@_SLOW
@needs_ort
def test_the_prepared_graph_computes_the_exported_one(style_weights: StyleWeights) -> None:
    import onnx

    exported = ort.graph(style_weights.bg, cache=False)[0]
    prepared = quantize.prepare(onnx.load_from_string(exported))
    names = set(quantize.unet_nodes(prepared))
    assert {"q.first.conv", "q.last.conv"} <= names and not any("Conv_9" in n for n in names)
    assert len([n for n in prepared.graph.node if n.op_type == "Conv" and n.name in names]) == 18
    image = quantize.background_input(CALIBRATION_PHOTOS[0].read(), 256)
    a, b = (
        ort.session(g).run(None, {"input_image": image})[0] for g in (exported, prepared.SerializeToString())
    )
    dev = Deviation.of([a], [b])
    assert dev.max <= 1 and dev.identical >= 0.999


# --- The int8 generators ------------------------------------------------------------------------------------


@_SLOW
@needs_ort
def test_int8_stays_within_its_bound_of_float32_on_real_photos(int8_weights: StyleWeights) -> None:
    """Measured on the demo weights (docs/int8.md: bg mean 0.37, head 0.44, max 3): the bound
    auto holds int8 to (a mean under one level) with room, and nothing far off anywhere."""
    measured = quantize.measure(int8_weights, torch.bfloat16, rounds=1, side=360)
    assert measured.photos == len(CALIBRATION_PHOTOS) and measured.crops == 4
    for dev in (measured.bg, measured.head):
        assert dev.mean < 0.6 and dev.p99 <= 3 and dev.max <= 8
    assert measured.both.mean < INT8_MAX_MEAN and measured.both.max <= REDUCED_MAX_LEVELS
    evidence = measured.evidence()
    assert evidence.mean_levels == measured.both.mean and evidence.int8_ms > 0 and evidence.other_ms > 0


@_SLOW
@needs_ort
def test_int8_takes_every_size_the_graph_takes(int8_weights: StyleWeights) -> None:
    """The blocked convolutions (strides 2 and 4) keep the official size rule: any multiple of 4,
    from 4×4 up; batches run one image at a time, head crops come as float."""
    runners = backends.build("onnxruntime", int8_weights, CPU, torch.int8)
    for h, w in ((4, 4), (8, 12), (100, 68), (36, 44)):
        image = torch.from_numpy(check_image(h, w)).permute(2, 0, 1)[None]
        out = runners.bg(image.to(torch.uint8))
        assert out.shape == (1, 3, h, w) and out.dtype == torch.uint8
        heads = runners.head(torch.cat([image, image]))
        assert heads.shape == (2, 3, h, w) and torch.equal(heads[0], heads[1])
    with pytest.raises(InputShapeError, match="multiples of 4"):
        runners.bg(torch.zeros((1, 3, 30, 32), dtype=torch.uint8))


@_SLOW
@needs_ort
def test_the_int8_graph_is_cached_beside_the_weights_and_used_again(
    int8_weights: StyleWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = quantize.int8_path(int8_weights.bg)
    assert (
        path.parent == int8_weights.bg.parent
        and path.name.startswith("bg.")
        and path.name.endswith(".int8.onnx")
    )
    # Beside the float32 graph, which is kept: each kind replaces only its own older files.
    assert ort.graph_path(int8_weights.bg).is_file()

    def no_quantizing(*_: object) -> bytes:
        raise AssertionError("quantized again")

    monkeypatch.setattr(quantize, "quantize_graph", no_quantizing)
    data, origin = quantize.int8_graph(int8_weights.bg)
    assert origin == f"cached {path}" and data == path.read_bytes()
    runners = build_runners(int8_weights, CPU, torch.int8, "onnxruntime")
    assert runners.bg.dtype == runners.head.dtype == torch.int8 and runners.bg.backend == "onnxruntime"
    accuracy = runners.decision.accuracy["onnxruntime"]
    assert accuracy.failure(torch.int8) is None

    # Another recipe or other calibration photos are another file: an old one is never used.
    monkeypatch.setattr(quantize, "QUANT_VERSION", "toonserve-int8-test")
    assert quantize.int8_path(int8_weights.bg) != path
    monkeypatch.undo()
    monkeypatch.setattr(quantize, "_calibration_digest", lambda _: b"other photos")
    assert quantize.int8_path(int8_weights.bg) != path


@_SLOW
@needs_ort
def test_a_cached_int8_graph_that_does_not_load_is_made_again(
    int8_weights: StyleWeights, tmp_path: Path
) -> None:
    weights = _copy_weights(int8_weights, tmp_path)
    for path in (int8_weights.head, int8_weights.bg):  # the good graphs, then one broken
        shutil.copyfile(quantize.int8_path(path), quantize.int8_path(tmp_path / path.name))
    broken = quantize.int8_path(weights.head)
    broken.write_bytes(b"not an ONNX graph")
    runners = build_runners(weights, CPU, torch.int8, "auto")
    assert runners.decision.backend == "onnxruntime" and broken.read_bytes().startswith(b"\x08")
    assert "only candidate that runs int8" in runners.decision.reason
    assert set(runners.decision.excluded) == {"onednn", "eager"}


@_SLOW
@needs_ort
def test_calibration_is_deterministic(int8_weights: StyleWeights) -> None:
    import onnx

    exported = ort.graph(int8_weights.head)[0]
    model = quantize.prepare(onnx.load_from_string(exported))
    inputs = quantize.calibration_inputs("head")
    assert len(inputs) == 4 and all(x.shape == (288, 288, 3) for x in inputs)
    assert quantize.calibrate(model, inputs) == quantize.calibrate(model, inputs)
    again = quantize.calibration_inputs("head")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again, inputs, strict=True))
    # The same bytes as the cached graph: another start, or another replica, makes the same file.
    assert quantize.quantize_graph(exported, again) == quantize.int8_path(int8_weights.head).read_bytes()


def test_each_kind_of_cached_graph_replaces_only_its_own(tmp_path: Path) -> None:
    old_float, old_int8 = tmp_path / f"bg.{'1' * 16}.onnx", tmp_path / f"bg.{'2' * 16}.int8.onnx"
    head = tmp_path / f"head.{'3' * 16}.int8.onnx"
    for path in (old_float, old_int8, head):
        path.write_bytes(b"old")
    ort.store(tmp_path / f"bg.{'a' * 16}.onnx", b"new float32")
    assert not old_float.exists() and old_int8.exists() and head.exists()
    ort.store(tmp_path / f"bg.{'b' * 16}.int8.onnx", b"new int8")
    assert not old_int8.exists() and head.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"bg.{'a' * 16}.onnx", f"bg.{'b' * 16}.int8.onnx", head.name]
    )


# --- The service --------------------------------------------------------------------------------------------


@_SLOW
@needs_ort
def test_a_service_on_int8_says_so(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    """/readyz and /styles report the dtype in use, and the backend's accuracy against float32."""
    import time

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        dtype="int8", backend="auto", device="cpu", cache_dir=tmp_path, model_dir=model_dir.path.parent,
        allow_download=False, log_format="text",
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        ready = client.get("/readyz").json()
        assert ready["dtype"] == "int8" and ready["dtype_reason"].startswith("set by TOONSERVE_DTYPE")
        assert ready["styles"]["anime"]["backend"] == "onnxruntime"
        styles = client.get("/styles").json()
        assert styles["dtype"] == "int8"
        anime = next(s for s in styles["styles"] if s["name"] == "anime")
        assert (
            anime["backend"] == "onnxruntime" and "only candidate that runs int8" in anime["backend_reason"]
        )
    assert list(tmp_path.glob("converted/anime/*.int8.onnx"))


@_SLOW
@needs_ort
def test_auto_measures_int8_as_a_style_loads_and_keeps_the_measurement(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With int8 weighed, the style's int8 graphs are made and measured against float32 on the
    calibration photos as it loads; under one level and faster, it runs int8 and says what was
    measured. The deviation is kept beside the graphs and read at the next start; a deviation over
    the bound keeps the store's precision; a record that cannot be read is measured again."""
    monkeypatch.setattr(quantize, "_timed", {})

    def load() -> tuple[ModelStore, models.DtypeChoice]:
        store = ModelStore(
            CPU, torch.bfloat16, tmp_path, model_dir.path.parent, False, backend="auto",
            dtype_reason="auto: bfloat16 here", consider_int8=True,
        )  # fmt: skip
        store.load("anime")
        return store, store.precision_of("anime")

    store, first = load()
    assert first.dtype == torch.int8 and store.get("anime").bg.dtype == torch.int8
    assert first.reason.startswith("auto: int8 measured within 0.") and "faster than bfloat16" in first.reason
    assert "4 calibration photos at short side 720 and 4 face crops" in first.reason
    assert store.dtype == torch.bfloat16  # the store's precision, for styles that do not take int8
    records = list(tmp_path.glob(f"converted/anime/int8.*{quantize.DEVIATION_SUFFIX}"))
    assert len(records) == 1 and records[0] == quantize.deviation_path(store.get("anime").weights)
    record = json.loads(records[0].read_text())
    assert 0 < record["both"]["mean"] < INT8_MAX_MEAN and record["photos"] == 4 and record["crops"] == 4
    measured = record["both"]["mean"]
    mean = f"{measured:.2f}"
    assert f"within {mean} level" in first.reason

    _, again = load()  # read back, not measured again: the same mean
    assert again.dtype == torch.int8 and f"within {mean} level" in again.reason

    record["both"]["mean"] = 1.5  # as weights whose int8 graphs are too far off would measure
    records[0].write_text(json.dumps(record))
    store, kept = load()
    assert kept.dtype == torch.bfloat16 and store.get("anime").bg.dtype == torch.bfloat16
    assert kept.reason == (
        "auto: bfloat16 here; int8 not picked: mean deviation 1.50 level (4 calibration photos at short "
        "side 720 and 4 face crops; passes timed at 288×288), not under 1"
    )

    records[0].write_text("{not json")
    _, remeasured = load()
    assert remeasured.dtype == torch.int8 and f"within {mean} level" in remeasured.reason
    assert json.loads(records[0].read_text())["both"]["mean"] == pytest.approx(measured, abs=0.005)


def test_the_int8_store_measures_nothing_on_torch(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    """A store in int8 never loads a torch generator in int8 (torch runs none): its warm-up and the
    backends come from ONNX Runtime, or it says what is missing."""
    store = ModelStore(CPU, torch.int8, tmp_path, model_dir.path.parent, False, backend="onednn")
    with pytest.raises(ConfigurationError, match="TOONSERVE_BACKEND=onednn cannot run int8"):
        store.load("anime")
    assert "anime" not in store.styles
