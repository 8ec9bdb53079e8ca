"""8-bit integer generators (``TOONSERVE_DTYPE=int8``): static post-training quantization of the
exported graphs, run by ONNX Runtime (docs/int8.md).

What is made: from a generator's exported float32 graph (:mod:`inference.ort`, the whole official
graph, docs/model.md §8), a QDQ graph in which the U-Net runs in 8-bit integers — its 18
convolutions with per-channel int8 weights (symmetric) and uint8 activations (asymmetric, one scale
per tensor, calibrated), its leaky ReLUs, residual and skip additions and the reshuffles around them
— and the rest in float32 as before: the input normalisation, the guided filter (whose
``E[x²] - E[x]²`` would cancel to noise in 8 bits, as it would in bfloat16, docs/model.md §2.4), the
clip and the truncating cast. ONNX Runtime also keeps the two ×2 upsamplings in float32 between a
dequantize and a quantize. The interface is the official one: ``input_image`` float32 (H, W, 3) BGR
0..255 → ``output_image`` uint8 (H, W, 3) BGR 0..254.

Two rewrites come first, both exact in float32 (:func:`prepare`):

* the guided filter's guide ``x`` is kept apart from the U-Net's input, so that quantizing the one
  never touches the other;
* the two 7×7 convolutions at full resolution with 3 channels on one side (the first, 3 → 32, and
  the last, 32 → 3) are *output-blocked*: one convolution computes an s×s tile of output pixels per
  position, with stride s, kernel 6 + s and s²·C output channels, and a depth-to-space reshuffle in
  channels-last order (one transpose of contiguous channel runs) puts the tiles in place. ONNX
  Runtime's 8-bit convolution is an im2col and a GEMM over the output channels: with 3 outputs (or
  a 3-channel im2col) the last convolution took 370 ms and the first 55 ms of a 450 ms pass at
  720×960; blocked (the first by 2, the last by 4) they took 17 and 31 ms.

Calibration (:func:`calibration_inputs`, :func:`calibrate`) is deterministic and bounded: four real
photos that ship inside installed packages (:data:`CALIBRATION_PHOTOS`: scikit-image's astronaut,
coffee and chelsea, matplotlib's Grace Hopper), read as files without importing those packages. The
background network sees each as the pipeline would at a processing size of
:data:`CALIBRATION_SIDE` (short side; padded with white to a multiple of 16); the head network sees
the aligned 288×288 crop of the face in each portrait and in its mirror image, cut as the pipeline
cuts it (MTCNN, :mod:`inference.align`). An activation's range is its min and max over all of them.

The result is cached beside the converted weights (:func:`int8_graph`: ``bg.<digest>.int8.onnx``),
the digest taken over the weights, :data:`QUANT_VERSION`, :data:`inference.ort.GRAPH_VERSION` and
the calibration photos' bytes, so new weights, another recipe or other photos never meet an old
graph. Making one needs the ``onnxruntime`` and ``onnx`` extras and the photos' packages; a cached
graph needs only ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from PIL import Image

from inference.constants import BACKGROUND_MULTIPLE, DEFAULT_PROCESSING_SIZE
from inference.convert import Role
from inference.errors import ToonserveError

if TYPE_CHECKING:
    import onnx

    from inference.models import Int8Evidence
    from inference.weights import StyleWeights

log = logging.getLogger(__name__)

#: Part of every quantized graph's digest: bump it when what :func:`quantize_graph` makes changes
#: (the rewrites, the calibration set or sizes, the quantizer's settings).
QUANT_VERSION: Final = "toonserve-int8-1"
#: Suffix of a cached quantized graph beside the converted weights (``bg.<digest>.int8.onnx``).
INT8_SUFFIX: Final = ".int8.onnx"
#: The first ONNX Runtime whose quantizer takes a calibration cache (``calibration_cache_path``,
#: ``save_tensors_data``), how :func:`quantize_graph` hands it the ranges; the int8 extra requires it.
MIN_QUANTIZER_ORT: Final = "1.27"
#: Output blocking of the first (3 → 32) and last (32 → 3) 7×7 convolutions (module docstring).
FIRST_CONV_BLOCK: Final = 2
LAST_CONV_BLOCK: Final = 4
#: Short side of the background calibration images: half the default processing size. Ranges taken
#: there gave the same deviation at every processing size tried (256 to 1024) as ranges taken at 720,
#: or at both, in a fifth of the time (2 s against 11 s for the four photos; docs/int8.md).
CALIBRATION_SIDE: Final = DEFAULT_PROCESSING_SIZE // 2
#: The names of the exported graph's tensors (docs/model.md §8.1).
_INPUT: Final = "input_image"
#: The weights of the U-Net's first and last convolutions in the exported graph.
_FIRST_CONV: Final = "generator.Conv.weight"
_LAST_CONV: Final = "generator.Conv_9.weight"
#: The node that gives the U-Net its own copy of the normalised input (:func:`prepare`).
_UNET_INPUT: Final = "q.unet_input"


class QuantizationError(ToonserveError):
    """An int8 graph that cannot be made here (the message says what is missing and how to get it)."""


# --- The calibration set ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationPhoto:
    """A photo shipped inside an installed package, read as a file (the package is not imported)."""

    name: str
    #: The import name of the package that holds it, and the pip name that installs it.
    package: str
    distribution: str
    #: Its path inside the package's directory.
    path: str
    #: One face: its aligned crop (and its mirror image's) calibrates the head network.
    portrait: bool

    def locate(self) -> Path | None:
        """The file, or None when the package (or the file in it) is not installed."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for root in spec.submodule_search_locations:
            candidate = Path(root) / self.path
            if candidate.is_file():
                return candidate
        return None

    def read(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB. Raises :class:`QuantizationError` when it is not installed."""
        path = self.locate()
        if path is None:
            raise QuantizationError(missing_photos() or f"calibration photo {self.name} not found")
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()


#: The calibration photos (design.md, "Where tests get real data"): two portraits, a still life and a
#: cat, 4 photos in all.
CALIBRATION_PHOTOS: Final[tuple[CalibrationPhoto, ...]] = (
    CalibrationPhoto("astronaut", "skimage", "scikit-image", "data/astronaut.png", True),
    CalibrationPhoto(
        "grace_hopper", "matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", True
    ),
    CalibrationPhoto("coffee", "skimage", "scikit-image", "data/coffee.png", False),
    CalibrationPhoto("chelsea", "skimage", "scikit-image", "data/chelsea.png", False),
)


def missing_photos(photos: Sequence[CalibrationPhoto] = CALIBRATION_PHOTOS) -> str | None:
    """Why the calibration photos cannot be read here, with the command that fixes it; None if they can."""
    missing = sorted({p.distribution for p in photos if p.locate() is None})
    if not missing:
        return None
    return (
        f"making the int8 graphs needs the calibration photos shipped inside {' and '.join(missing)}, "
        f"which {'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)} "
        "(or copy a cache directory where the int8 graphs were made: they are kept beside the converted "
        "weights as *.int8.onnx)"
    )


def _calibration_digest(photos: Sequence[CalibrationPhoto]) -> bytes:
    digest = hashlib.sha256()
    for photo in photos:
        path = photo.locate()
        digest.update(photo.name.encode())
        digest.update(path.read_bytes() if path is not None else b"missing")
    return digest.digest()


def background_input(rgb: np.ndarray, side: int) -> np.ndarray:
    """A photo as the background network sees it: its short side brought to ``side`` (bilinear),
    padded with white at the bottom and right to a multiple of 16 (docs/model.md §4), as
    (H, W, 3) float32 BGR 0..255."""
    h, w = rgb.shape[:2]
    scale = side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    ph, pw = -resized.shape[0] % BACKGROUND_MULTIPLE, -resized.shape[1] % BACKGROUND_MULTIPLE
    padded = np.pad(resized, ((0, ph), (0, pw), (0, 0)), constant_values=255)
    return np.ascontiguousarray(padded[:, :, ::-1], dtype=np.float32)


def head_inputs(rgb: np.ndarray) -> list[np.ndarray]:
    """The aligned 288×288 crop of the most confident face in ``rgb`` and in its mirror image, as
    the pipeline cuts them (MTCNN's landmarks, :func:`inference.align.crop_matrices`,
    :func:`inference.align.warp_crops`): a list of (288, 288, 3) float32 BGR 0..255, empty when no
    face is found."""
    from inference.align import crop_matrices, warp_crops
    from inference.faces import create_detector

    detector = create_detector("mtcnn", "cpu")
    crops = []
    for image in (rgb, np.ascontiguousarray(rgb[:, ::-1])):
        faces = detector.detect(image)
        if not faces:
            continue
        tfm, _ = crop_matrices(faces[0].landmarks)
        crop = warp_crops(torch.from_numpy(image).permute(2, 0, 1), tfm[None])[0]
        bgr = crop.flip(0).permute(1, 2, 0).round().clamp(0, 255)
        crops.append(np.ascontiguousarray(bgr.numpy(), dtype=np.float32))
    return crops


def calibration_inputs(
    role: Role, photos: Sequence[CalibrationPhoto] = CALIBRATION_PHOTOS
) -> list[np.ndarray]:
    """What ``role``'s network is calibrated on (module docstring): (H, W, 3) float32 BGR images."""
    why = missing_photos(photos)
    if why is not None:
        raise QuantizationError(why)
    if role == "bg":
        return [background_input(photo.read(), CALIBRATION_SIDE) for photo in photos]
    inputs = [crop for photo in photos if photo.portrait for crop in head_inputs(photo.read())]
    if not inputs:
        raise QuantizationError("no face was found in the calibration portraits")
    return inputs


# --- The graph ------------------------------------------------------------------------------------------


def _onnx() -> Any:
    import onnx

    return onnx


def _blocked_weights(weight: np.ndarray, bias: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A k×k convolution's weights (O, I, k, k) as the stride-``block`` convolution that computes a
    block×block tile of its output per position: (block²·O, I, k + block - 1, k + block - 1), the
    output channel of tile offset (a, b) and channel o at ``(a·block + b)·O + o``; zeros elsewhere."""
    out_ch, in_ch, k, _ = weight.shape
    size = k + block - 1
    blocked = np.zeros((block * block * out_ch, in_ch, size, size), np.float32)
    for a in range(block):
        for b in range(block):
            first = (a * block + b) * out_ch
            blocked[first : first + out_ch, :, a : a + k, b : b + k] = weight
    return blocked, np.tile(bias, block * block).astype(np.float32)


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported float32 graph rewritten for quantization (module docstring): the same function
    in float32, up to the order of additions. Changes and returns ``model``."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    convs = {node.input[1]: node for node in graph.node if node.op_type == "Conv" and len(node.input) == 3}
    if _FIRST_CONV not in convs or _LAST_CONV not in convs:
        raise QuantizationError("the graph is not an exported DCT-Net generator (no Conv and Conv_9 weights)")
    guide = convs[_FIRST_CONV].input[0]

    def initializer(name: str, values: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(values, name))
        return name

    def blocked(conv: Any, tag: str, block: int, source: str) -> list[Any]:
        """``conv`` as its output-blocked form: the blocked convolution, then depth to space in
        channels-last order, (1, h, w, s·s·C) → (1, h, s, w, s, C) → (1, H, W, C) → NCHW."""
        w, b = (numpy_helper.to_array(weights[name]) for name in conv.input[1:])
        out_ch, k, out = w.shape[0], w.shape[-1], conv.output[0]
        bw, bb = _blocked_weights(w, b, block)
        tiles = np.array([0, 0, 0, block, block, out_ch], np.int64)
        full = [initializer(f"q.{tag}.one", np.array([1], np.int64)), "q.input_hw"]
        full.append(initializer(f"q.{tag}.channels", np.array([out_ch], np.int64)))
        step = [(f"{out}.{part}", f"q.{tag}.{part}") for part in ("blocks", "nhwc", "tiles", "rows", "full")]
        return [
            helper.make_node(
                "Conv",
                [source, initializer(f"q.{tag}.weight", bw), initializer(f"q.{tag}.bias", bb)],
                [step[0][0]],
                name=f"q.{tag}.conv",
                kernel_shape=[k + block - 1] * 2,
                strides=[block, block],
                pads=[k // 2] * 4,
            ),
            helper.make_node("Transpose", [step[0][0]], [step[1][0]], name=step[1][1], perm=[0, 2, 3, 1]),
            helper.make_node(
                "Reshape",
                [step[1][0], initializer(f"q.{tag}.tiles_shape", tiles)],
                [step[2][0]],
                name=step[2][1],
            ),
            helper.make_node(
                "Transpose", [step[2][0]], [step[3][0]], name=step[3][1], perm=[0, 1, 3, 2, 4, 5]
            ),
            helper.make_node("Concat", full, [f"{out}.shape"], name=f"q.{tag}.shape", axis=0),
            helper.make_node("Reshape", [step[3][0], f"{out}.shape"], [step[4][0]], name=step[4][1]),
            helper.make_node("Transpose", [step[4][0]], [out], name=f"q.{tag}.nchw", perm=[0, 3, 1, 2]),
        ]

    # The exported graph is in topological order, and the first convolution comes before the last.
    nodes: list[Any] = []
    for node in graph.node:
        if node is convs[_FIRST_CONV]:
            # The U-Net reads its own copy of the normalised input, so quantizing it leaves the guide be.
            nodes.append(helper.make_node("Identity", [guide], [_unet_input(guide)], name=_UNET_INPUT))
            nodes.append(helper.make_node("Shape", [_INPUT], ["q.input_hw"], name="q.input_hw", end=2))
            nodes += blocked(node, "first", FIRST_CONV_BLOCK, _unet_input(guide))
        elif node is convs[_LAST_CONV]:
            nodes += blocked(node, "last", LAST_CONV_BLOCK, node.input[0])
        else:
            nodes.append(node)
    replaced = {*convs[_FIRST_CONV].input[1:], *convs[_LAST_CONV].input[1:]}
    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def _unet_input(guide: str) -> str:
    return f"{guide}.unet"


def unet_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of the nodes on the U-Net's data path of a :func:`prepare`-d graph: those reachable
    from its own input and reaching the last convolution's output (what is quantized)."""
    graph = model.graph
    last = next(node for node in graph.node if node.name == "q.last.nchw").output[0]
    forward = {_unet_input(_guide_name(model))}
    ahead = []
    for node in graph.node:
        if any(name in forward for name in node.input):
            forward.update(node.output)
            ahead.append(node)
    backward = {last}
    kept = []
    for node in reversed(ahead):
        if any(name in backward for name in node.output):
            backward.update(node.input)
            kept.append(node.name)
    return kept[::-1]


def _guide_name(model: onnx.ModelProto) -> str:
    name: str = next(node.input[0] for node in model.graph.node if node.name == _UNET_INPUT)
    return name


def calibrate(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """The range (min, max) of every activation the U-Net of ``model`` (a :func:`prepare`-d graph)
    quantizes, over all ``inputs`` ((H, W, 3) float32 BGR 0..255 each).

    The graph is run with a ``ReduceMin`` and a ``ReduceMax`` on each of those tensors, so a run
    returns two numbers per tensor rather than the tensors, and with ONNX Runtime's graph
    optimisations on and in priority order (:func:`inference.ort.session`): ONNX Runtime's own
    calibrator turns the optimisations off, and took 6.4 s and 1.4 GB for the four photos at 360
    where this takes 1.3 s and 0.6 GB (docs/int8.md).
    """
    onnx = _onnx()
    from onnx import helper

    quantized = set(unet_nodes(model))
    tensors = [_unet_input(_guide_name(model))]
    tensors += [out for node in model.graph.node if node.name in quantized for out in node.output]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    reductions: dict[str, list[Any]] = {}
    for k, name in enumerate(tensors):
        for op in ("ReduceMin", "ReduceMax"):
            out = f"q.range.{k}.{op}"
            reductions.setdefault(name, []).append(helper.make_node(op, [name], [out], name=out, keepdims=0))
            probe.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, []))
    # Each reduction right after the node that makes its tensor, and run in priority order: ONNX
    # Runtime's default order left every activation of the pass alive until the reductions at the
    # end (2.2 GB at the peak for one 720×1088 photo, against 0.9 GB).
    nodes: list[Any] = []
    for node in model.graph.node:
        nodes.append(node)
        for out in node.output:
            nodes += reductions.get(out, [])
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    from inference.ort import session

    run = session(probe.SerializeToString(), by_priority=True)
    low = np.full(len(tensors), np.inf, np.float32)
    high = np.full(len(tensors), -np.inf, np.float32)
    for image in inputs:
        values = np.asarray(run.run(None, {_INPUT: image}), np.float32).reshape(len(tensors), 2)
        low, high = np.minimum(low, values[:, 0]), np.maximum(high, values[:, 1])
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(tensors, low, high, strict=True)}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice on the root logger (run its pre-processing, which we
    do not need: the graph is already shaped and folded); keep it out of the service's logs."""
    root = logging.getLogger()

    def advice(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_graph(float_graph: bytes, inputs: Sequence[np.ndarray]) -> bytes:
    """The int8 QDQ graph (module docstring) of the exported float32 ``float_graph``, its activations
    calibrated on ``inputs`` ((H, W, 3) float32 BGR 0..255 each). Raises :class:`QuantizationError`
    when ONNX Runtime or ``onnx`` is missing."""
    why = missing_tools()
    if why is not None:
        raise QuantizationError(why)
    onnx = _onnx()
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    try:
        from onnxruntime.quantization.calibrate import (  # type: ignore[import-untyped]
            TensorsData,
            save_tensors_data,
        )
    except ImportError:
        save_tensors_data = None
    if (
        save_tensors_data is None
        or "calibration_cache_path" not in inspect.signature(quantize_static).parameters
    ):
        import onnxruntime  # type: ignore[import-untyped]

        raise QuantizationError(
            f"ONNX Runtime {onnxruntime.__version__}'s quantizer takes no calibration cache, which "
            f"toonserve hands it its ranges in (from {MIN_QUANTIZER_ORT}): pip install --upgrade "
            f"'onnxruntime>={MIN_QUANTIZER_ORT}'"
        )
    model = prepare(onnx.load_from_string(float_graph))
    nodes = unet_nodes(model)
    ranges = {name: (np.float32(lo), np.float32(hi)) for name, (lo, hi) in calibrate(model, inputs).items()}
    with tempfile.TemporaryDirectory(prefix="toonserve-int8-") as tmp, _quiet_quantizer():
        src, dst, cache = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        onnx.save_model(model, str(src))
        # Handed over as a calibration cache: ONNX Runtime then calibrates nothing itself.
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        quantize_static(
            str(src),
            str(dst),
            None,
            calibration_cache_path=str(cache),
            calibrate_method=CalibrationMethod.MinMax,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            op_types_to_quantize=sorted({n.op_type for n in model.graph.node if n.name in set(nodes)}),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        quantized = onnx.load_model(str(dst))
    quantized.doc_string = f"{model.doc_string} Quantized to int8 by toonserve ({QUANT_VERSION})."
    data: bytes = quantized.SerializeToString()
    return data


def missing_tools() -> str | None:
    """Why a graph cannot be quantized here (ONNX Runtime or onnx missing), with the command that
    fixes it; None when it can. (Exporting the float32 graph, when none is cached, also needs
    onnxscript: :func:`inference.ort.missing_exporter`.)"""
    from inference.ort import missing_runtime

    why = missing_runtime()
    if why is not None:
        return why
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "quantizing the ONNX graph needs onnx, which is not installed: pip install 'toonserve[onnx]'"
    return None


# --- The cache --------------------------------------------------------------------------------------------


_lock = threading.Lock()


def int8_path(weights: Path) -> Path:
    """Where the int8 graph of the converted generator ``weights`` is cached: beside it, named after
    a digest of its bytes, the recipe (:data:`QUANT_VERSION`, the calibration size, the blockings),
    the export's version and the calibration photos (``bg.safetensors`` → ``bg.<16 hex>.int8.onnx``)."""
    from inference.ort import DIGEST_CHARS, GRAPH_VERSION

    recipe = f"{QUANT_VERSION}|{GRAPH_VERSION}|{CALIBRATION_SIDE}|{FIRST_CONV_BLOCK}|{LAST_CONV_BLOCK}"
    digest = hashlib.sha256(recipe.encode())
    digest.update(_calibration_digest(CALIBRATION_PHOTOS))
    with weights.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return weights.with_name(f"{weights.stem}.{digest.hexdigest()[:DIGEST_CHARS]}{INT8_SUFFIX}")


def role_of(weights: Path) -> Role:
    """Which generator a converted file holds, by its name (``head.safetensors``, ``bg.safetensors``)."""
    from inference.weights import CONVERTED_NAMES

    for role, name in CONVERTED_NAMES.items():
        if weights.name == name:
            return role
    raise QuantizationError(f"{weights}: not a converted generator ({' or '.join(CONVERTED_NAMES.values())})")


def int8_graph(weights: Path, *, cache: bool = True, role: Role | None = None) -> tuple[bytes, str]:
    """The int8 graph of the converted generator ``weights`` and where it came from.

    With ``cache``, a graph cached beside the weights (:func:`int8_path`) is used, and a new one is
    written there (atomically) and older int8 graphs of the same generator removed. ``role``: which
    network (its calibration set); by default read from the file name (:func:`role_of`).
    """
    from inference.ort import graph, store

    role = role or role_of(weights)
    path = int8_path(weights) if cache else None
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes(), f"cached {path}"
    with _lock:  # one quantization at a time: each holds a calibration run's activations
        start = time.perf_counter()
        float_graph, _ = graph(weights, cache=cache)
        data = quantize_graph(float_graph, calibration_inputs(role))
        log.info("%s generator quantized to int8 in %.1f s", role, time.perf_counter() - start)
    if path is not None:
        store(path, data)
    return data, "quantized"


def forget(weights: Path) -> None:
    """Remove the cached int8 graph of ``weights``."""
    with contextlib.suppress(OSError):
        int8_path(weights).unlink(missing_ok=True)


# --- Deviation and the evidence auto needs -----------------------------------------------------------


@dataclass(frozen=True)
class Deviation:
    """uint8 outputs against float32's, all values together, in levels 0..255."""

    mean: float
    p99: float
    max: int
    identical: float

    @classmethod
    def of(cls, outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> Deviation:
        """Over every value of every pair (same shapes, uint8)."""
        diff = np.concatenate(
            [
                np.abs(o.astype(np.int16) - r.astype(np.int16)).ravel()
                for o, r in zip(outputs, references, strict=True)
            ]
        )
        return cls(
            float(diff.mean()), float(np.percentile(diff, 99)), int(diff.max()), float((diff == 0).mean())
        )

    def describe(self) -> str:
        return f"mean {self.mean:.3f}, 99th percentile {self.p99:g}, max {self.max} levels"


@dataclass(frozen=True)
class Measurement:
    """int8 against eager float32 on the calibration photos, and its background pass against the
    pass of the precision ``auto`` would pick otherwise (:func:`measure`)."""

    bg: Deviation
    head: Deviation
    both: Deviation
    int8_ms: float
    other_ms: float
    #: The other precision, by name, and the (height, width) the passes were timed at.
    other: str
    size: tuple[int, int]
    photos: int
    crops: int

    def evidence(self) -> Int8Evidence:
        """What :func:`inference.models.choose_dtype` needs to consider int8."""
        from inference.models import Int8Evidence

        where = f"{self.photos} photos at {self.size[0]}×{self.size[1]}-ish and {self.crops} face crops"
        return Int8Evidence(self.both.mean, self.int8_ms, self.other_ms, where)


def _tensor(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)[None]


def _out(runner: Any, hwc: np.ndarray) -> np.ndarray:
    out: np.ndarray = runner(_tensor(hwc))[0].permute(1, 2, 0).numpy()
    return out


def measure(
    weights: StyleWeights,
    other: torch.dtype,
    *,
    side: int = DEFAULT_PROCESSING_SIZE,
    rounds: int = 3,
    cache: bool = True,
    photos: Sequence[CalibrationPhoto] = CALIBRATION_PHOTOS,
) -> Measurement:
    """Both int8 generators of ``weights`` against eager float32 on ``photos`` (the background network
    on each at short side ``side``, the head network on their face crops), and the int8 background
    pass against ``other``'s (torch, ``onednn`` where it runs) on the first photo, ``rounds`` passes
    each in turns, medians. Seconds on 2 cores; for benchmarks and for whoever decides to pick int8."""
    from inference.backends import build, unavailable

    cpu = torch.device("cpu")
    int8 = build("onnxruntime", weights, cpu, torch.int8, cache)
    exact = build("eager", weights, cpu, torch.float32, cache)
    bg, head, both, n_photos, n_crops = _deviations(int8, exact, photos, side)
    fast = build(
        "onednn" if unavailable("onednn", cpu, other) is None else "eager", weights, cpu, other, cache
    )
    image = _tensor(background_input(photos[0].read(), side)).to(torch.uint8)
    times: dict[str, list[float]] = {"int8": [], "other": []}
    for runner in (int8.bg, fast.bg):
        runner(image)  # warm-up at this size
    for _ in range(rounds):
        for name, runner in (("int8", int8.bg), ("other", fast.bg)):
            start = time.perf_counter()
            runner(image)
            times[name].append((time.perf_counter() - start) * 1000)
    return Measurement(
        bg=bg,
        head=head,
        both=both,
        int8_ms=float(np.median(times["int8"])),
        other_ms=float(np.median(times["other"])),
        other=str(other).removeprefix("torch."),
        size=(int(image.shape[-2]), int(image.shape[-1])),
        photos=n_photos,
        crops=n_crops,
    )


# --- What auto measures when a style loads ----------------------------------------------------------------

#: The cached deviation of a style's two int8 graphs (:func:`deviation_path`).
DEVIATION_SUFFIX: Final = ".deviation.json"
#: Timed passes of each precision when ``auto`` weighs int8 (:func:`inference.backends.time_passes`).
EVIDENCE_ROUNDS: Final = 5

_timed_lock = threading.Lock()
#: The passes timed in this process, by the other precision and thread count: every style has the
#: same two networks, so the times do not depend on the style.
_timed: dict[tuple[str, int], tuple[float, float]] = {}


def deviation_path(weights: StyleWeights) -> Path:
    """Where the deviation of ``weights``' int8 graphs from float32 is cached: beside them, named
    after both graphs' names (so new weights, a new recipe or new photos measure again) and the
    processing size it is measured at (``int8.<16 hex>.deviation.json``)."""
    from inference.ort import DIGEST_CHARS

    names = f"{int8_path(weights.head).name}|{int8_path(weights.bg).name}|{DEFAULT_PROCESSING_SIZE}"
    digest = hashlib.sha256(names.encode()).hexdigest()[:DIGEST_CHARS]
    return weights.bg.with_name(f"int8.{digest}{DEVIATION_SUFFIX}")


def _deviations(
    int8: Any, exact: Any, photos: Sequence[CalibrationPhoto], side: int
) -> tuple[Deviation, Deviation, Deviation, int, int]:
    """bg, head and both of ``int8``'s runners against ``exact``'s on ``photos``; the counts."""
    bg_in = [background_input(photo.read(), side) for photo in photos]
    head_in = [crop for photo in photos if photo.portrait for crop in head_inputs(photo.read())]
    bg = ([_out(int8.bg, x) for x in bg_in], [_out(exact.bg, x) for x in bg_in])
    head = ([_out(int8.head, x) for x in head_in], [_out(exact.head, x) for x in head_in])
    both = Deviation.of(bg[0] + head[0], bg[1] + head[1])
    return Deviation.of(*bg), Deviation.of(*head), both, len(bg_in), len(head_in)


def _cached_deviation(path: Path) -> tuple[Deviation, int, int] | None:
    try:
        data = json.loads(path.read_text())
        found = Deviation(**data["both"])
        return found, int(data["photos"]), int(data["crops"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s cannot be read; measuring the int8 deviation again", path, exc_info=True)
        return None


def evidence(weights: StyleWeights, other: torch.dtype, *, cache: bool = True) -> Int8Evidence:
    """What ``auto`` weighs before it picks int8 for ``weights`` (:func:`inference.models.choose_dtype`):

    * the deviation of both int8 generators from eager float32 on the calibration photos at the
      default processing size (the background network) and on their face crops (the head network),
      over all values together; measured once per weights, recipe and photos, and with ``cache``
      kept beside the int8 graphs (:func:`deviation_path`): a few seconds, after the graphs are
      made (:func:`int8_graph`);
    * the int8 background pass against ``other``'s (torch: ``onednn`` where it runs) on the
      backends' measurement image (:func:`inference.backends.measure_image`), the two taking turns,
      medians of :data:`EVIDENCE_ROUNDS`; timed once per process (every style has the same networks).

    Raises what building the int8 graphs raises (:class:`QuantizationError` for what is missing and
    how to install it, wrapped in :class:`~inference.errors.ConfigurationError` by the backend).
    """
    from inference.backends import build, measure_image, time_passes, unavailable
    from inference.models import Int8Evidence
    from inference.ort import store

    cpu = torch.device("cpu")
    int8 = build("onnxruntime", weights, cpu, torch.int8, cache)
    path = deviation_path(weights) if cache else None
    known = _cached_deviation(path) if path is not None else None
    if known is None:
        exact = build("eager", weights, cpu, torch.float32, cache)
        start = time.perf_counter()
        bg, head, both, photos, crops = _deviations(int8, exact, CALIBRATION_PHOTOS, DEFAULT_PROCESSING_SIZE)
        log.info(
            "style %s: int8 against float32 measured in %.1f s: %s (background %s; head %s)",
            weights.style, time.perf_counter() - start, both.describe(), bg.describe(), head.describe(),
        )  # fmt: skip
        if path is not None:
            record = {
                "both": asdict(both),
                "bg": asdict(bg),
                "head": asdict(head),
                "photos": photos,
                "crops": crops,
            }
            store(path, json.dumps(record, indent=1).encode())
        known = both, photos, crops
    both, photos, crops = known
    key = (str(other), torch.get_num_threads())
    with _timed_lock:
        times = _timed.get(key)
    if times is None:
        fast = build(
            "onednn" if unavailable("onednn", cpu, other) is None else "eager", weights, cpu, other, cache
        )
        image = measure_image()
        for runner in (int8.bg, fast.bg):
            runner(image)  # warm-up at this size
        timed = time_passes([int8, fast], image, EVIDENCE_ROUNDS)
        times = timed[int8.name], timed[fast.name]
        with _timed_lock:
            _timed[key] = times
    side = int(measure_image().shape[-1])
    where = (
        f"{photos} calibration photos at short side {DEFAULT_PROCESSING_SIZE} and {crops} face crops; "
        f"passes timed at {side}×{side}"
    )
    return Int8Evidence(both.mean, times[0], times[1], where)
