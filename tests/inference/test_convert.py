"""The .pb → safetensors converter: protobuf only, every tensor and shape checked, clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from devkit.reference_graphs import ReferenceModelDir, build_generator_pb
from inference.convert import convert_pb, read_generator_pb, read_metadata
from inference.dctnet import CONV_SPECS, PARAMETER_COUNT
from inference.demo import build_generator_graph
from inference.errors import ConversionError


def _edit_graph(pb: bytes, edit: str, name: str) -> bytes:
    """Rewrite one node of a frozen graph with TensorFlow's own protos (the test side may use TF)."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(pb)
    for i, node in enumerate(graph.node):
        if node.name != name:
            continue
        if edit == "drop":
            del graph.node[i]
        elif edit == "reshape":
            value = tf.make_ndarray(node.attr["value"].tensor)
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value[:, :, :, :-1]))
        break
    else:
        raise AssertionError(f"no node {name}")
    out: bytes = graph.SerializeToString()
    return out


def test_converts_all_tensors_with_metadata(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    out = tmp_path / "head.safetensors"
    meta = convert_pb(model_dir.head_pb, out, "anime", "head")
    tensors = load_file(str(out))
    assert len(tensors) == 36
    assert sum(t.size for t in tensors.values()) == PARAMETER_COUNT
    for spec in CONV_SPECS:
        w = tensors[f"{spec.module_path}.weight"]
        assert w.shape == (spec.out_channels, spec.in_channels, spec.kernel, spec.kernel)  # OIHW
        assert tensors[f"{spec.module_path}.bias"].shape == (spec.out_channels,)
    assert read_metadata(out) == meta
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(model_dir.head_pb.read_bytes()).hexdigest()
    assert meta["style"] == "anime" and meta["role"] == "head"
    assert json.loads(meta["eps"]) == pytest.approx(1e-2, rel=1e-6)


@pytest.mark.tf
def test_weights_are_transposed_not_flipped(model_dir: ReferenceModelDir) -> None:
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(model_dir.head_pb.read_bytes())
    hwio = next(
        tf.make_ndarray(n.attr["value"].tensor) for n in graph.node if n.name == "generator/Conv/weights"
    )
    oihw = read_generator_pb(model_dir.head_pb).tensors["Conv.weight"]
    np.testing.assert_array_equal(oihw, hwio.transpose(3, 2, 0, 1))


def test_rejects_truncated_file(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    bad = tmp_path / "cartoon_h.pb"
    data = model_dir.head_pb.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 3])
    with pytest.raises(ConversionError, match=r"cartoon_h\.pb: not a valid TensorFlow GraphDef.*truncated"):
        read_generator_pb(bad)


@pytest.mark.tf
def test_rejects_missing_tensor(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    bad = tmp_path / "cartoon_bg.pb"
    bad.write_bytes(_edit_graph(model_dir.bg_pb.read_bytes(), "drop", "generator/Conv_5/biases"))
    with pytest.raises(
        ConversionError, match=r"cartoon_bg\.pb: missing 1 of 36 generator tensors: generator/Conv_5/biases"
    ):
        read_generator_pb(bad)


@pytest.mark.tf
def test_rejects_wrong_shape(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    bad = tmp_path / "cartoon_h.pb"
    bad.write_bytes(_edit_graph(model_dir.head_pb.read_bytes(), "reshape", "generator/Conv_2/weights"))
    with pytest.raises(
        ConversionError,
        match=r"tensor 'generator/Conv_2/weights' has shape \[3, 3, 32, 63\], expected \[3, 3, 32, 64\]",
    ):
        read_generator_pb(bad)


def test_rejects_other_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    with pytest.raises(ConversionError, match=r"empty\.pb: file is empty"):
        read_generator_pb(empty)
    with pytest.raises(ConversionError, match="cannot read file"):
        read_generator_pb(tmp_path / "absent.pb")
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ConversionError, match=r"junk\.pb: not a valid TensorFlow GraphDef"):
        read_generator_pb(junk)


@pytest.mark.tf
def test_rejects_a_graph_that_is_not_a_generator(tmp_path: Path) -> None:
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, None, 3], name="input_image")
        tf.cast(x * 2.0, tf.uint8, name="output_image")
    other = tmp_path / "other.pb"
    other.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(ConversionError, match=r"other\.pb: missing 36 of 36 generator tensors"):
        read_generator_pb(other)


def _convert(pb: bytes, path: Path) -> tuple[dict[str, np.ndarray], float]:
    path.write_bytes(pb)
    meta = convert_pb(path, path.with_suffix(".safetensors"), "anime", "head")
    return load_file(str(path.with_suffix(".safetensors"))), json.loads(meta["eps"])


def _assert_bitwise_equal(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(ref) and len(ours) == 36
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype == np.float32, name
        assert ours[name].shape == value.shape, name
        assert ours[name].tobytes() == value.tobytes(), f"{name} differs"


@pytest.mark.tf
def test_fast_graphs_hold_the_tensorflow_graphs_weights(
    model_dir: ReferenceModelDir, head_pb: bytes, bg_pb: bytes, tmp_path: Path
) -> None:
    """The TF-free ``model_dir`` converts to exactly what the TensorFlow reference graphs (same seeds)
    convert to, so tests may compare what is converted from it with TensorFlow runs of those."""
    import tensorflow as tf

    cases = [
        (model_dir.head_pb.read_bytes(), head_pb, 1e-2),
        (model_dir.bg_pb.read_bytes(), bg_pb, 1e-2),
        (build_generator_graph(7, eps=5e-3), build_generator_pb(7, eps=5e-3), 5e-3),
    ]
    for i, (fast, reference, eps) in enumerate(cases):
        ours, ours_eps = _convert(fast, tmp_path / f"fast{i}.pb")
        ref, ref_eps = _convert(reference, tmp_path / f"tf{i}.pb")
        _assert_bitwise_equal(ours, ref)
        assert ours_eps == ref_eps == float(np.float32(eps))
        # A well-formed GraphDef: TensorFlow's own protos parse it and it imports into a graph.
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(fast)
        with tf.Graph().as_default():
            tf.compat.v1.import_graph_def(graph_def, name="fast")


def test_fast_graph_is_deterministic_and_carries_eps(tmp_path: Path) -> None:
    pb = build_generator_graph(7, eps=5e-3)
    assert build_generator_graph(7, eps=5e-3) == pb
    assert build_generator_graph(8, eps=5e-3) != pb
    (tmp_path / "g.pb").write_bytes(pb)
    weights = read_generator_pb(tmp_path / "g.pb")
    assert weights.eps == float(np.float32(5e-3))
    assert sum(v.size for v in weights.tensors.values()) == PARAMETER_COUNT


@pytest.mark.slow
def test_inference_never_imports_tensorflow() -> None:
    code = (
        "import sys, inference.convert, inference.weights, inference.dctnet, inference._graphdef;"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
