"""Demo weights: a model directory laid out like ModelScope's, with random weights in the official
generator architecture, written with protobuf alone (no TensorFlow) in well under a second.

They let a machine that cannot reach ModelScope run the whole service (`toonserve demo-weights`),
and they are what the tests and benchmarks run on. Their images are not cartoons: colour noise
shaped by a real DCT-Net generator. A demo directory says so in its ``configuration.json``
(:data:`DEMO_KEY`); conversion carries that into the converted files' metadata, and the service
marks every answer that comes from them (``source: demo``).

Each generator graph holds the 36 weight tensors of the White-box U-Net (``generator/<scope>/
weights|biases``, scopes as the official exporter names them, :data:`GENERATOR_CONVS`) as float32
``Const`` nodes, an ``input_image`` placeholder and an ``output_image`` whose guided-filter divisor
``RealDiv(…, AddV2(non-constant, eps))`` is the node the converter reads eps from. The graph does
not compute the generator (TensorFlow would run a stand-in); the converter only reads weights and
eps from it, and the service runs them in its own port of the architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np

#: The key in a model directory's ``configuration.json`` that marks its weights as demo weights.
DEMO_KEY: Final = "toonserve_demo"
#: What the marker says, for whoever opens the file.
DEMO_NOTE: Final = (
    "random weights in the official architecture, written by `toonserve demo-weights`: not real cartoons"
)

#: What ModelScope's configuration.json for these models holds (serving does not read it).
MODELSCOPE_CONFIGURATION: Final[dict[str, Any]] = {
    "framework": "tensorflow",
    "task": "image-portrait-stylization",
    "pipeline": {"type": "unet-person-image-cartoon"},
    "model": {"type": "unet-person-image-cartoon"},
}

#: The files a demo directory holds (:func:`write_model_files`); a real download replaces them.
DEMO_FILES: Final = frozenset(
    {
        "cartoon_h.pb",
        "cartoon_bg.pb",
        "cartoon_anime_h.pb",
        "cartoon_anime_bg.pb",
        "alpha.jpg",
        "configuration.json",
    }
)

# Base channel count of unet_generator (channel=32).
_CH: Final = 32

#: The generator's convolutions in the order the official ``unet_generator`` creates them, which is
#: the order their random weights are drawn in: (scope under ``generator/``, kernel size, input
#: channels, output channels).
GENERATOR_CONVS: Final[tuple[tuple[str, int, int, int], ...]] = (
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

#: The seeds of a demo directory's two generators (head, background).
HEAD_SEED: Final = 1
BG_SEED: Final = 2
#: The guided filter's eps in the demo graphs (the official graphs use 1e-2 too).
DEMO_EPS: Final = 1e-2

# TensorFlow DataType enum values (types.proto).
_DT_FLOAT: Final = 1
_DT_UINT8: Final = 4


def draw_conv(rng: np.random.Generator, k: int, cin: int, cout: int) -> tuple[np.ndarray, np.ndarray]:
    """One convolution's random weights (HWIO float32) and biases, weights drawn first."""
    # He-like init scaled down so the random generator neither explodes nor saturates the output.
    w = rng.normal(0.0, 0.9 / np.sqrt(k * k * cin), size=(k, k, cin, cout)).astype(np.float32)
    b = rng.normal(0.0, 0.05, size=(cout,)).astype(np.float32)
    return w, b


def draw_generator_weights(seed: int) -> dict[str, np.ndarray]:
    """``generator/<scope>/{weights,biases}`` → its random array for ``seed``, drawn in creation order."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for scope, k, cin, cout in GENERATOR_CONVS:
        w, b = draw_conv(rng, k, cin, cout)
        tensors[f"generator/{scope}/weights"] = w
        tensors[f"generator/{scope}/biases"] = b
    return tensors


def build_generator_graph(seed: int, eps: float = DEMO_EPS) -> bytes:
    """A serialized GraphDef holding :func:`draw_generator_weights` for ``seed`` and ``eps``, as
    TensorFlow would write it (module docstring): valid for TensorFlow to import, enough for the
    converter, not a graph that computes the generator."""
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
    """A feathered elliptical face mask like upstream's ``initialize_mask`` (uint8, size×size):
    ellipse axes 0.4·w × 0.49·h, feathered linearly over 0.15·w inside the border."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c = size / 2
    ax, ay = 0.4 * size, 0.49 * size
    r = np.sqrt(((xx - c) / ax) ** 2 + ((yy - c) / ay) ** 2)
    dist_inside = (1.0 - r) * min(ax, ay)
    alpha = np.clip(dist_inside / (0.15 * size), 0.0, 1.0)
    mask: np.ndarray = (alpha * 255).round().astype(np.uint8)
    return mask


def write_model_files(
    root: Path, head_pb: bytes | None = None, bg_pb: bytes | None = None, *, legacy_names: bool = False
) -> tuple[Path, Path]:
    """A ModelScope-style directory at ``root`` with these two graphs (by default
    :func:`build_generator_graph` of :data:`HEAD_SEED` and :data:`BG_SEED`), the demo mask and a
    ``configuration.json`` marked demo: the paths of the head and background graphs.

    ``legacy_names`` writes the anime model's old names (``cartoon_anime_h.pb`` /
    ``cartoon_anime_bg.pb``). Files already in ``root`` are replaced (``inference.weights.
    install_demo`` writes beside a person's files instead)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    prefix = "cartoon_anime_" if legacy_names else "cartoon_"
    head, bg = root / f"{prefix}h.pb", root / f"{prefix}bg.pb"
    head.write_bytes(head_pb if head_pb is not None else build_generator_graph(HEAD_SEED))
    bg.write_bytes(bg_pb if bg_pb is not None else build_generator_graph(BG_SEED))
    Image.fromarray(draw_alpha_mask()).save(root / "alpha.jpg", quality=95)
    configuration = {**MODELSCOPE_CONFIGURATION, DEMO_KEY: DEMO_NOTE}
    (root / "configuration.json").write_text(json.dumps(configuration, indent=2) + "\n")
    return head, bg


def is_demo_dir(path: Path) -> bool:
    """Whether the model directory ``path`` holds demo weights (its configuration.json says so)."""
    try:
        configuration = json.loads((path / "configuration.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(configuration, dict) and DEMO_KEY in configuration
