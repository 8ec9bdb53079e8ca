"""Reference DCT-Net generator graphs built with TensorFlow, for parity tests and benchmarks.

The real ModelScope weights cannot be downloaded here, so we rebuild what the official exporter
writes (dctnet.md §2.1, §2.4, §2.5): a TF1 graph with an ``input_image`` placeholder (HWC BGR 0..255),
``x/127.5 - 1``, the White-box ``unet_generator`` under the ``generator`` variable scope (slim-style
names ``Conv``, ``Conv_1`` … ``Conv_9``, ``block_{i}/conv{1,2}``), the guided filter (r=1, depthwise
box filters, eps added to ``var_x``), clip ±0.999999, ``(z+1)*127.5`` and a cast to uint8 named
``output_image``; variables restored from random weights and frozen with
``convert_variables_to_constants``. The architecture is written out here on its own, not derived
from ``inference.dctnet``, so the parity tests compare two independent descriptions.

The random weights are drawn as ``inference.demo`` draws them (the demo weights the service can
write for itself), so ``inference.demo.build_generator_graph`` writes, with protobuf alone and in
milliseconds, a graph holding the same weights for the same seed (bit for bit) and the same eps, with
the endpoints and the eps topology the converter checks, but not the generator's computation: enough
for everything that converts a graph, not for running it with TensorFlow. :func:`write_fast_model_dir`
lays such graphs out like ModelScope's model directory. Importing this module does not import
TensorFlow.

Only tests and ``bench/`` import this module (TensorFlow is a dev dependency).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.demo import build_generator_graph, draw_conv, write_model_files

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _tf() -> Any:
    import tensorflow as tf

    return tf


# Base channel count of unet_generator (channel=32).
_CH = 32


def _conv(tf: Any, x: Any, scope: str, k: int, cout: int, rng: np.random.Generator, stride: int = 1) -> Any:
    tf1 = tf.compat.v1
    w, b = draw_conv(rng, k, int(x.shape[-1]), cout)
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
    """A model directory laid out like ModelScope's (``inference.demo.write_model_files``, so marked
    demo), with generator graphs built by TensorFlow: they compute the generator.

    ``legacy_names`` writes ``cartoon_anime_h.pb`` / ``cartoon_anime_bg.pb`` instead of the current
    names. ``head_pb`` / ``bg_pb`` reuse already built graphs (building one takes a few seconds).
    """
    head, bg = write_model_files(
        root,
        head_pb if head_pb is not None else build_generator_pb(head_seed, eps),
        bg_pb if bg_pb is not None else build_generator_pb(bg_seed, eps),
        legacy_names=legacy_names,
    )
    return ReferenceModelDir(root, head, bg)


def write_fast_model_dir(
    root: Path, head_seed: int = 1, bg_seed: int = 2, legacy_names: bool = False, eps: float = 1e-2
) -> ReferenceModelDir:
    """The demo model directory ``toonserve demo-weights`` writes (``inference.demo``): the same
    weights, eps and mask as :func:`write_model_dir` for the same seeds, without TensorFlow (for
    tests that convert the graphs but never run them with TensorFlow)."""
    head, bg = write_model_files(
        root,
        build_generator_graph(head_seed, eps),
        build_generator_graph(bg_seed, eps),
        legacy_names=legacy_names,
    )
    return ReferenceModelDir(root, head, bg)


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
