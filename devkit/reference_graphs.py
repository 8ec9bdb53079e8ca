"""Reference DCT-Net generator graphs built with TensorFlow, for parity tests and benchmarks.

The real ModelScope weights cannot be downloaded here, so we rebuild what the official exporter
writes (dctnet.md §2.1, §2.4, §2.5): a TF1 graph with an ``input_image`` placeholder (HWC BGR 0..255),
``x/127.5 - 1``, the White-box ``unet_generator`` under the ``generator`` variable scope (slim-style
names ``Conv``, ``Conv_1`` … ``Conv_9``, ``block_{i}/conv{1,2}``), the guided filter (r=1, depthwise
box filters, eps added to ``var_x``), clip ±0.999999, ``(z+1)*127.5`` and a cast to uint8 named
``output_image``; variables restored from random weights and frozen with
``convert_variables_to_constants``. The architecture is written out here on its own, not derived
from ``inference.dctnet``, so the parity tests compare two independent descriptions.

:func:`build_fast_generator_pb` writes, with protobuf alone and in milliseconds, a graph holding the
same weights for the same seed (bit for bit) and the same eps, with the endpoints and the eps topology
the converter checks, but not the generator's computation: enough for everything that converts a
graph, not for running it with TensorFlow. :func:`write_fast_model_dir` lays such graphs out like
ModelScope's model directory. Importing this module does not import TensorFlow.

Only tests and ``bench/`` import this module (TensorFlow is a dev dependency).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _tf() -> Any:
    import tensorflow as tf

    return tf


# Base channel count of unet_generator (channel=32).
_CH = 32


def _draw_conv(rng: np.random.Generator, k: int, cin: int, cout: int) -> tuple[np.ndarray, np.ndarray]:
    """One convolution's random weights (HWIO float32) and biases, weights drawn first."""
    # He-like init scaled down so the random generator neither explodes nor saturates the output.
    w = rng.normal(0.0, 0.9 / np.sqrt(k * k * cin), size=(k, k, cin, cout)).astype(np.float32)
    b = rng.normal(0.0, 0.05, size=(cout,)).astype(np.float32)
    return w, b


def _conv(tf: Any, x: Any, scope: str, k: int, cout: int, rng: np.random.Generator, stride: int = 1) -> Any:
    tf1 = tf.compat.v1
    w, b = _draw_conv(rng, k, int(x.shape[-1]), cout)
    with tf1.variable_scope(scope):
        wv = tf1.get_variable("weights", initializer=w)
        bv = tf1.get_variable("biases", initializer=b)
        y = tf.nn.conv2d(x, wv, strides=[1, stride, stride, 1], padding="SAME")
        return tf.nn.bias_add(y, bv)


def _lrelu(tf: Any, x: Any) -> Any:
    return tf.nn.leaky_relu(x, alpha=0.2)


def _unet(tf: Any, x: Any, rng: np.random.Generator) -> Any:
    tf1 = tf.compat.v1
    with tf1.variable_scope("generator"):
        x0 = _lrelu(tf, _conv(tf, x, "Conv", 7, _CH, rng))
        x1 = _lrelu(tf, _conv(tf, x0, "Conv_1", 3, _CH, rng, stride=2))
        x1 = _lrelu(tf, _conv(tf, x1, "Conv_2", 3, _CH * 2, rng))
        x2 = _lrelu(tf, _conv(tf, x1, "Conv_3", 3, _CH * 2, rng, stride=2))
        x2 = _lrelu(tf, _conv(tf, x2, "Conv_4", 3, _CH * 4, rng))
        for i in range(4):
            with tf1.variable_scope(f"block_{i}"):
                r = _lrelu(tf, _conv(tf, x2, "conv1", 3, _CH * 4, rng))
                x2 = _conv(tf, r, "conv2", 3, _CH * 4, rng) + x2
        x2 = _lrelu(tf, _conv(tf, x2, "Conv_5", 3, _CH * 2, rng))
        h1, w1 = tf.shape(x2)[1], tf.shape(x2)[2]
        x3 = tf1.image.resize_bilinear(x2, (h1 * 2, w1 * 2))
        x3 = _lrelu(tf, _conv(tf, x3 + x1, "Conv_6", 3, _CH * 2, rng))
        x3 = _lrelu(tf, _conv(tf, x3, "Conv_7", 3, _CH, rng))
        h2, w2 = tf.shape(x3)[1], tf.shape(x3)[2]
        x4 = tf1.image.resize_bilinear(x3, (h2 * 2, w2 * 2))
        x4 = _lrelu(tf, _conv(tf, x4 + x0, "Conv_8", 3, _CH, rng))
        return _conv(tf, x4, "Conv_9", 7, 3, rng)


def _box(tf: Any, x: Any) -> Any:
    ch = int(x.shape[-1])
    kernel = np.full((3, 3, ch, 1), 1.0 / 9.0, dtype=np.float32)
    return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")


def _guided_filter(tf: Any, x: Any, y: Any, eps: float) -> Any:
    shape = tf.shape(x)
    n = _box(tf, tf.ones((1, shape[1], shape[2], 1), dtype=x.dtype))
    mean_x = _box(tf, x) / n
    mean_y = _box(tf, y) / n
    cov_xy = _box(tf, x * y) / n - mean_x * mean_y
    var_x = _box(tf, x * x) / n - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    b = mean_y - a * mean_x
    return _box(tf, a) / n * x + _box(tf, b) / n


def build_generator_pb(seed: int, eps: float = 1e-2) -> bytes:
    """A frozen generator graph with random weights drawn from ``seed``; the serialized GraphDef."""
    tf = _tf()
    tf1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        image = tf1.placeholder(tf.float32, [None, None, 3], name="input_image")
        x = image[tf.newaxis] / 127.5 - 1.0
        y = _unet(tf, x, rng)
        z = _guided_filter(tf, x, y, eps)[0]
        z = tf.clip_by_value(z, -0.999999, 0.999999)
        tf.cast((z + 1.0) * 127.5, tf.uint8, name="output_image")
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            frozen = tf1.graph_util.convert_variables_to_constants(
                sess, graph.as_graph_def(), ["output_image"]
            )
    data: bytes = frozen.SerializeToString()
    return data


#: The generator's convolutions in the order :func:`_unet` creates them, which is the order their
#: weights are drawn in: (scope under ``generator/``, kernel size, input channels, output channels).
GENERATOR_CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("Conv", 7, 3, _CH),
    ("Conv_1", 3, _CH, _CH),
    ("Conv_2", 3, _CH, _CH * 2),
    ("Conv_3", 3, _CH * 2, _CH * 2),
    ("Conv_4", 3, _CH * 2, _CH * 4),
    *((f"block_{i}/{conv}", 3, _CH * 4, _CH * 4) for i in range(4) for conv in ("conv1", "conv2")),
    ("Conv_5", 3, _CH * 4, _CH * 2),
    ("Conv_6", 3, _CH * 2, _CH * 2),
    ("Conv_7", 3, _CH * 2, _CH),
    ("Conv_8", 3, _CH, _CH),
    ("Conv_9", 7, _CH, 3),
)

# TensorFlow DataType enum values (types.proto).
_DT_FLOAT = 1
_DT_UINT8 = 4


def draw_generator_weights(seed: int) -> dict[str, np.ndarray]:
    """``generator/<scope>/{weights,biases}`` → the array :func:`build_generator_pb` freezes for ``seed``."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for scope, k, cin, cout in GENERATOR_CONVS:
        w, b = _draw_conv(rng, k, cin, cout)
        tensors[f"generator/{scope}/weights"] = w
        tensors[f"generator/{scope}/biases"] = b
    return tensors


def build_fast_generator_pb(seed: int, eps: float = 1e-2) -> bytes:
    """A GraphDef with :func:`build_generator_pb`'s weights and eps for ``seed``, without TensorFlow.

    Serialized with the converter's own protobuf schema (:mod:`inference._graphdef`), as TensorFlow
    would write it: the 36 weights as float32 ``Const`` nodes (``tensor_content``), an ``input_image``
    placeholder, and ``output_image = uint8(x / (x·x + eps))``, whose divisor is the one
    ``RealDiv(…, AddV2(non-constant, scalar Const))`` the converter reads eps from. It is a valid
    graph TensorFlow imports, but it does not compute the generator: run :func:`build_generator_pb`'s
    graph for that.
    """
    from inference._graphdef import parse_graph_def

    graph = parse_graph_def(b"")

    def node(name: str, op: str, *inputs: str, **types: int) -> Any:
        n = graph.node.add(name=name, op=op)
        n.input.extend(inputs)
        for key, value in types.items():
            n.attr[key].type = value
        return n

    def const(name: str, value: np.ndarray) -> None:
        tensor = node(name, "Const", dtype=_DT_FLOAT).attr["value"].tensor
        tensor.dtype = _DT_FLOAT
        for size in value.shape:
            tensor.tensor_shape.dim.add(size=size)
        if value.ndim:
            tensor.tensor_content = np.ascontiguousarray(value, dtype="<f4").tobytes()
        else:  # TensorFlow stores a scalar in float_val
            tensor.float_val.append(float(value))

    image = node("input_image", "Placeholder", dtype=_DT_FLOAT)
    for size in (-1, -1, 3):
        image.attr["shape"].shape.dim.add(size=size)
    for name, value in draw_generator_weights(seed).items():
        const(name, value)
    node("guided_filter/var_x", "Mul", "input_image", "input_image", T=_DT_FLOAT)
    const("guided_filter/add/y", np.asarray(eps, dtype=np.float32))
    node("guided_filter/add", "AddV2", "guided_filter/var_x", "guided_filter/add/y", T=_DT_FLOAT)
    node("guided_filter/truediv", "RealDiv", "input_image", "guided_filter/add", T=_DT_FLOAT)
    out = node("output_image", "Cast", "guided_filter/truediv", SrcT=_DT_FLOAT, DstT=_DT_UINT8)
    out.attr["Truncate"].b = False
    data: bytes = graph.SerializeToString()
    return data


def draw_alpha_mask(size: int = 288) -> np.ndarray:
    """A feathered elliptical face mask like upstream's ``initialize_mask`` (uint8, size×size).

    Ellipse axes 0.4·w × 0.49·h, feathered linearly over 0.15·w inside the border.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c = size / 2
    ax, ay = 0.4 * size, 0.49 * size
    r = np.sqrt(((xx - c) / ax) ** 2 + ((yy - c) / ay) ** 2)
    dist_inside = (1.0 - r) * min(ax, ay)
    alpha = np.clip(dist_inside / (0.15 * size), 0.0, 1.0)
    mask: np.ndarray = (alpha * 255).round().astype(np.uint8)
    return mask


MODELSCOPE_CONFIGURATION = {
    "framework": "tensorflow",
    "task": "image-portrait-stylization",
    "pipeline": {"type": "unet-person-image-cartoon"},
    "model": {"type": "unet-person-image-cartoon"},
}


@dataclass(frozen=True)
class ReferenceModelDir:
    path: Path
    head_pb: Path
    bg_pb: Path


def write_model_dir(
    root: Path,
    head_seed: int = 1,
    bg_seed: int = 2,
    legacy_names: bool = False,
    eps: float = 1e-2,
    head_pb: bytes | None = None,
    bg_pb: bytes | None = None,
) -> ReferenceModelDir:
    """A model directory laid out like ModelScope's, with synthetic generator graphs and mask.

    ``legacy_names`` writes ``cartoon_anime_h.pb`` / ``cartoon_anime_bg.pb`` instead of the current
    names. ``head_pb`` / ``bg_pb`` reuse already built graphs (building one takes a few seconds).
    """
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    h_name, bg_name = (
        ("cartoon_anime_h.pb", "cartoon_anime_bg.pb") if legacy_names else ("cartoon_h.pb", "cartoon_bg.pb")
    )
    h_path, bg_path = root / h_name, root / bg_name
    h_path.write_bytes(head_pb if head_pb is not None else build_generator_pb(head_seed, eps))
    bg_path.write_bytes(bg_pb if bg_pb is not None else build_generator_pb(bg_seed, eps))
    Image.fromarray(draw_alpha_mask()).save(root / "alpha.jpg", quality=95)
    (root / "configuration.json").write_text(json.dumps(MODELSCOPE_CONFIGURATION, indent=2))
    return ReferenceModelDir(root, h_path, bg_path)


def write_fast_model_dir(
    root: Path, head_seed: int = 1, bg_seed: int = 2, legacy_names: bool = False, eps: float = 1e-2
) -> ReferenceModelDir:
    """:func:`write_model_dir` with :func:`build_fast_generator_pb` graphs: the same weights, eps and
    mask for the same seeds, without TensorFlow (for tests that convert the graphs but never run them
    with TensorFlow)."""
    return write_model_dir(
        root,
        legacy_names=legacy_names,
        head_pb=build_fast_generator_pb(head_seed, eps),
        bg_pb=build_fast_generator_pb(bg_seed, eps),
    )


class TFGenerator:
    """Runs a frozen generator graph with TensorFlow: HWC uint8 BGR in, HWC uint8 BGR out."""

    def __init__(self, pb: bytes, prefix: str = "model", intra_op_threads: int = 0) -> None:
        tf = _tf()
        tf1 = tf.compat.v1
        graph_def = tf1.GraphDef()
        graph_def.ParseFromString(pb)
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf1.import_graph_def(graph_def, name=prefix)
        config = tf1.ConfigProto(intra_op_parallelism_threads=intra_op_threads)
        self.session = tf1.Session(graph=self.graph, config=config)
        self._in = self.graph.get_tensor_by_name(f"{prefix}/input_image:0")
        self._out = self.graph.get_tensor_by_name(f"{prefix}/output_image:0")

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(self._out, {self._in: bgr})
        return out

    def close(self) -> None:
        self.session.close()
