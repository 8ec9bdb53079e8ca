"""ONNX export (inference/export.py, ``toonserve export``): the official graphs' interface, and the
exported files against TensorFlow runs of the graphs they were converted from (docs/model.md §8)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
import pytest
from PIL import Image

from devkit import photos
from devkit.reference_graphs import TFGenerator, build_generator_pb, write_model_dir
from inference.convert import Role
from inference.export import (
    INPUT_NAME,
    MODEL_CARD,
    ONNX_NAMES,
    ONNX_OPSET,
    OUTPUT_NAME,
    ExportError,
    check_export,
    trace_onnx,
)
from inference.weights import CONVERTED_NAMES
from service.cli import main
from service.settings import get_settings

pytestmark = pytest.mark.tf

HEAD_SEED, BG_SEED = 1, 2
#: The head graph gets another eps than the background's 1e-2, so each file must carry its own.
HEAD_EPS = 5e-3


@dataclass(frozen=True)
class Exported:
    out: Path
    cache: Path
    code: int
    stdout: str
    pbs: dict[Role, bytes]


@contextlib.contextmanager
def _offline_settings(mp: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings that never ask the hub and have no model directory, for the CLI's own reading."""
    mp.setenv("TOONSERVE_ALLOW_DOWNLOAD", "false")
    mp.delenv("TOONSERVE_MODEL_DIR", raising=False)
    get_settings.cache_clear()
    try:
        yield
    finally:
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, bg_pb: bytes) -> Exported:
    """``toonserve export anime --format onnx`` run in-process on a cache holding TensorFlow-built
    graphs (head seed 1 with eps 5e-3, background seed 2 with eps 1e-2), as a person would run it."""
    root = tmp_path_factory.mktemp("export")
    pbs: dict[Role, bytes] = {"head": build_generator_pb(HEAD_SEED, eps=HEAD_EPS), "bg": bg_pb}
    write_model_dir(root / "cache" / "models" / "anime", head_pb=pbs["head"], bg_pb=pbs["bg"])
    out = root / "onnx"
    stdout = io.StringIO()
    argv = ["export", "anime", "--format", "onnx", "--output", str(out), "--cache-dir", str(root / "cache")]
    with pytest.MonkeyPatch.context() as mp, _offline_settings(mp), contextlib.redirect_stdout(stdout):
        code = main(argv)
    return Exported(out, root / "cache", code, stdout.getvalue(), pbs)


@pytest.fixture(scope="module")
def sessions(exported: Exported) -> dict[Role, ort.InferenceSession]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return {
        role: ort.InferenceSession(str(exported.out / name), options, providers=["CPUExecutionProvider"])
        for role, name in ONNX_NAMES.items()
    }


@pytest.fixture(scope="module")
def tf_graphs(exported: Exported) -> Iterator[dict[Role, TFGenerator]]:
    graphs: dict[Role, TFGenerator] = {role: TFGenerator(pb) for role, pb in exported.pbs.items()}
    yield graphs
    for graph in graphs.values():
        graph.close()


def photo_bgr(h: int, w: int, source: str) -> np.ndarray:
    """A real photo resized to h×w: (h, w, 3) float32 BGR 0..255, the graphs' input."""
    rgb = photos.grace_hopper() if source == "hopper" else photos.astronaut()
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(resized[:, :, ::-1], dtype=np.float32)


def test_the_cli_writes_both_graphs_and_a_model_card(exported: Exported) -> None:
    assert exported.code == 0
    for name in ("cartoon_bg.onnx", "cartoon_h.onnx", MODEL_CARD):
        assert (exported.out / name).is_file()
        assert str(exported.out / name) in exported.stdout
    # The export-time check ran with ONNX Runtime and said so.
    assert exported.stdout.count("values identical") == 2
    assert not list(exported.out.glob(".*"))  # no staging files left


def test_onnx_checker_passes(exported: Exported) -> None:
    for name in ONNX_NAMES.values():
        onnx.checker.check_model(str(exported.out / name), full_check=True)


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_interface_is_the_official_graphs(
    exported: Exported, sessions: dict[Role, ort.InferenceSession]
) -> None:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(exported.pbs["bg"])
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        tf_in = graph.get_tensor_by_name(f"{INPUT_NAME}:0")
        tf_out = graph.get_tensor_by_name(f"{OUTPUT_NAME}:0")
    assert (tf_in.dtype, tf_in.shape.as_list()) == (tf.float32, [None, None, 3])
    assert (tf_out.dtype, tf_out.shape.rank) == (tf.uint8, 3)

    for role, name in ONNX_NAMES.items():
        model = onnx.load(str(exported.out / name))
        assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [ONNX_OPSET]
        assert ONNX_OPSET >= 17
        (inp,), (out,) = model.graph.input, model.graph.output
        assert (inp.name, inp.type.tensor_type.elem_type) == (INPUT_NAME, onnx.TensorProto.FLOAT)
        assert (out.name, out.type.tensor_type.elem_type) == (OUTPUT_NAME, onnx.TensorProto.UINT8)
        assert _dims(inp) == _dims(out) == ["height", "width", 3]
        (s_in,), (s_out,) = sessions[role].get_inputs(), sessions[role].get_outputs()
        assert (s_in.name, s_in.type, s_in.shape) == (INPUT_NAME, "tensor(float)", ["height", "width", 3])
        assert (s_out.name, s_out.type, s_out.shape) == (OUTPUT_NAME, "tensor(uint8)", ["height", "width", 3])
        # The legacy bilinear upsampling is one Resize each time, with TF1's coordinate rule.
        resizes = [n for n in model.graph.node if n.op_type == "Resize"]
        assert len(resizes) == 2
        for node in resizes:
            attrs = {a.name: a.s.decode() for a in node.attribute if a.type == onnx.AttributeProto.STRING}
            assert attrs["coordinate_transformation_mode"] == "asymmetric" and attrs["mode"] == "linear"


@pytest.mark.parametrize(
    ("role", "h", "w"),
    [
        ("bg", 256, 256),
        ("bg", 200, 312),
        ("bg", 720, 540),
        ("bg", 204, 300),  # a multiple of 4 but of nothing larger
        ("head", 288, 288),
        ("head", 4, 4),  # the smallest size the graph takes
        ("head", 200, 312),
    ],
)
def test_matches_tensorflow(
    sessions: dict[Role, ort.InferenceSession], tf_graphs: dict[Role, TFGenerator], role: Role, h: int, w: int
) -> None:
    bgr = photo_bgr(h, w, "hopper" if role == "bg" else "astronaut")
    ref = tf_graphs[role](bgr)
    ours = sessions[role].run([OUTPUT_NAME], {INPUT_NAME: bgr})[0]
    assert ours.dtype == ref.dtype == np.uint8 and ours.shape == ref.shape == (h, w, 3)
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    identical = float((diff == 0).mean())
    assert diff.max() <= 1, f"max deviation {diff.max()} levels"
    assert identical >= 0.999, f"only {identical:.5%} identical"
    if h * w > 64:  # two flat images cannot pass
        assert ref.std() > 10
    assert int(ours.max()) <= 254


@pytest.mark.parametrize(("h", "w"), [(301, 437), (50, 70), (202, 300)])
def test_sizes_the_graph_refuses_are_refused(
    sessions: dict[Role, ort.InferenceSession], tf_graphs: dict[Role, TFGenerator], h: int, w: int
) -> None:
    """Not multiples of 4: TensorFlow's graph fails in a skip addition, and so does the export."""
    import tensorflow as tf
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail  # type: ignore[import-untyped]

    bgr = np.full((h, w, 3), 128.0, dtype=np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf_graphs["bg"](bgr)
    with pytest.raises(Fail):
        sessions["bg"].run([OUTPUT_NAME], {INPUT_NAME: bgr})


def test_each_file_carries_its_own_weights_and_eps(exported: Exported) -> None:
    from onnx import numpy_helper

    expected: dict[Role, float] = {"head": HEAD_EPS, "bg": 1e-2}
    for role, eps in expected.items():
        model = onnx.load(str(exported.out / ONNX_NAMES[role]))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        assert float(inits["eps"]) == pytest.approx(eps, rel=1e-6)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["role"] == role and meta["style"] == "anime"
        assert meta["source_sha256"] == hashlib.sha256(exported.pbs[role]).hexdigest()
        assert float(meta["guided_filter_eps"]) == pytest.approx(eps, rel=1e-6)
    heads = onnx.load(str(exported.out / ONNX_NAMES["head"])).graph.initializer
    bgs = onnx.load(str(exported.out / ONNX_NAMES["bg"])).graph.initializer
    conv = {i.name: i for i in heads}["generator.Conv.weight"]
    assert conv.raw_data != {i.name: i for i in bgs}["generator.Conv.weight"].raw_data


def test_model_card(exported: Exported) -> None:
    card = (exported.out / MODEL_CARD).read_text()
    for text in (
        "`anime`",
        "damo/cv_unet_person-image-cartoon_compound-models",
        "default revision",
        hashlib.sha256(exported.pbs["head"]).hexdigest(),
        hashlib.sha256(exported.pbs["bg"]).hexdigest(),
        hashlib.sha256((exported.out / "cartoon_bg.onnx").read_bytes()).hexdigest(),
        f"`{INPUT_NAME}`: float32 `[height, width, 3]`, **BGR**, values 0..255",
        f"`{OUTPUT_NAME}`: uint8 `[height, width, 3]`, **BGR**, values 0..254",
        "multiples of 4",
        f"ai.onnx {ONNX_OPSET}",
        "dynamo=True",
        "check_model",
        "ONNX Runtime",
        "## Licence of the weights",
        "Demo weights",  # the fixture's weights are marked demo, and the card says so first
    ):
        assert text in card, text


def test_the_check_refuses_a_wrong_graph(exported: Exported) -> None:
    """The export-time check has teeth: the background graph is not the head generator."""
    head = exported.cache / "converted" / "anime" / CONVERTED_NAMES["head"]
    with pytest.raises(ExportError, match="failed its check"):
        check_export(exported.out / ONNX_NAMES["bg"], head, (64, 64))


def test_missing_style_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "sketch", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "empty")]
    with _offline_settings(monkeypatch):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no weights for style 'sketch'") and "toonserve download sketch" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_download_format_onnx_downloads_converts_and_exports(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``download --format onnx`` hands the converted style to the same export as ``export`` (run end
    to end by the ``exported`` fixture); the hub is replaced by a copy of the model directory."""
    import shutil

    from inference.styles import Style
    from inference.weights import StyleWeights

    def fake_download(style: Style, cache_dir: Path, everything: bool = False) -> Path:
        target = cache_dir / "models" / style.name
        shutil.copytree(exported.cache / "models" / "anime", target)
        return target

    exports: list[tuple[StyleWeights, Path]] = []
    monkeypatch.setattr("service.cli.download", fake_download)
    monkeypatch.setattr("service.cli._export_onnx", lambda weights, out: exports.append((weights, out)))
    argv = ["download", "3d", "--format", "onnx", "--output", str(tmp_path / "out")]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    ((weights, out),) = exports
    assert (weights.style, out) == ("3d", tmp_path / "out")
    assert weights.head == tmp_path / "cache" / "converted" / "3d" / CONVERTED_NAMES["head"]

    assert main(["download", "anime", "--format", "onnx"]) == 2
    assert main(["download", "anime", "3d", "--format", "onnx", "--output", "x"]) == 2
    assert main(["download", "anime", "--output", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("--format onnx takes one STYLE and --output DIR") == 2
    assert "add --format onnx" in err
    assert len(exports) == 1


def test_without_the_onnx_extra_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, exported: Exported
) -> None:
    from inference.dctnet import DCTNetGenerator

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'toonserve\[onnx\]'"):
        trace_onnx(DCTNetGenerator())


def test_model_card_of_real_weights_states_the_licence_and_revision(tmp_path: Path) -> None:
    from inference.export import ExportedGraph, model_card
    from inference.styles import get_style

    graphs: dict[Role, ExportedGraph] = {
        role: ExportedGraph(role, tmp_path / ONNX_NAMES[role], f"{role}.pb", "ab" * 32, 1e-2, "cd" * 32, None)
        for role in ONNX_NAMES
    }
    card = model_card(get_style("design"), graphs, demo=False)
    assert "`v1.0.0`" in card and "damo/cv_unet_person-image-cartoon-sd-design_compound-models" in card
    assert "Apache-2.0" in card and "check the model page" in card
    assert "Demo weights" not in card
    assert card.count("not run (ONNX Runtime is not installed)") == 2
