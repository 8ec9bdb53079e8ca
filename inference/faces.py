"""Face detection in torch, on the model's device: MTCNN with the weights of the ``mtcnn`` PyPI package.

The pipeline needs, per face, a box, a score and five landmarks (eye centres, nose tip, mouth corners)
to align head crops (design.md, decision 4). MTCNN gives exactly that, and its trained weights ship
inside the ``mtcnn`` package (``mtcnn/assets/weights/{pnet,rnet,onet}.lz4``). That package runs them
with TensorFlow, which we never import to serve, so this module:

* finds the three files through the distribution's metadata (never ``import mtcnn``);
* reads them as data: they are joblib dumps (an LZ4 frame around a protocol-4 pickle of a list of
  ``joblib.numpy_pickle.NumpyArrayWrapper`` headers, each followed by the raw array bytes), and
  :class:`_NumpyOnlyUnpickler` admits numpy's array/dtype classes and that header only, refusing any
  other global before it is resolved, so nothing in the file can run code;
* converts the Keras layout once: HWIO kernels → OIHW, dense ``(in, out)`` → ``(out, in)``, PReLU
  alphas ``(1, 1, C)`` → ``(C,)``, and the flatten before the first dense layer of R-Net/O-Net, which
  Keras takes on a ``Permute((2, 1, 3))``-ed NHWC map (order W, H, C) where torch flattens NCHW;
* reproduces the package's detection semantics (version 1.0), so its own TF run is the parity
  reference in the tests.

The package's semantics, as reproduced here (they differ from the original MTCNN papers' code in
places, on purpose: parity is with what users of that package get):

* pixels are normalised as ``(x - 127.5) / 128``;
* the pyramid scales are ``(12 / min_face_size) · f^k`` for ``k < round(-(log(min(H, W) / 12) / log f)
  - 1)``. The count does not depend on ``min_face_size``, so the last level can come out smaller
  than the 11 pixels P-Net needs: with f = 0.709, for ``min_face_size`` above 22 (always above 31);
  with f = 0.8, even at 20. The package then fails inside TensorFlow and returns no face at all. We
  skip the levels that yield no P-Net cell and detect on the others. ``min_face_size`` is the
  pyramid's floor, not a filter: faces somewhat smaller are still found now and then, by both;
* each level is the TF ``AREA`` resize of the normalised image to ``trunc(H·s) × trunc(W·s)``;
* a P-Net cell ``(i, j)`` gives the box ``(2j + 1, 2i + 1, 2j + 12, 2i + 12)`` on its level (the
  one-based corners of the original MTCNN code: 11 pixels wide, not the 12 of the window), each
  corner moved by the regression times 11, then divided by the scale; cells with a face probability
  above the threshold are kept (strictly greater, as every threshold here);
* NMS keeps a box unless *any* higher-scored box overlaps it above the threshold, suppressed or not
  (not the greedy variant); overlap is computed without the ``+1`` pixel convention;
* P-Net: NMS per level (0.5), then across levels (0.7), then each box is squared about its centre;
* R-Net and O-Net read ``tf.image.crop_and_resize`` crops (24², 48²) of the normalised image: bilinear,
  box corners normalised by ``H``/``W`` but sampled on the ``(H - 1)``/``(W - 1)`` grid, samples
  outside the image read 0 (mid-grey); their regression is scaled by ``x2 - x1 + 1`` (here with the
  ``+1``); R-Net: threshold, NMS (0.7), square; O-Net: landmarks ``(x2 - x1 + 1) · l + x1 - 1``
  (MATLAB's one-based origin, kept as is), threshold, NMS over the *smaller* area (0.7);
* the final boxes are clipped to ``[0, W - 1] × [0, H - 1]`` (the package's ``fit_to_image``);
  landmarks are not.

Speed (see :func:`_pyramid_canvas` and :class:`_PNet`): every pyramid level is computed at once from
one integral image (one ``grid_sample`` at all levels' pixel corners), straight into a canvas where
the levels are packed side by side, so P-Net runs as a single pass; setting to ``-inf`` the pooling
inputs that a level's last window reaches past its own map makes that pass equal, cell for cell, to
separate passes with TF "SAME" pooling. R-Net and O-Net crops are one ``grid_sample`` call each over
all candidates, NMS is a blocked, vectorised mask, and the networks run channels-last (which is what
makes their 3-channel first convolutions fast on CPU). Everything stays on the detector's device (CPU
or CUDA) until the final, small transfer of the results.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import math
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.errors import InputShapeError, ToonserveError


class FaceDetectorError(ToonserveError):
    """A face detector could not be built: weights missing or unreadable, bad options, unknown name."""


# --------------------------------------------------------------------------------------------------
# Public result type and the detector interface
# --------------------------------------------------------------------------------------------------

#: The five landmarks, in the order of :attr:`DetectedFace.landmarks` rows ("left" = image-left).
LANDMARK_NAMES: Final = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face, in the pixel coordinates of the image handed to the detector.

    box: ``(x1, y1, x2, y2)``, floats, clipped to ``[0, W - 1] × [0, H - 1]``.
    score: face probability of the last stage, in (threshold, 1].
    landmarks: (5, 2) float32 ``(x, y)`` rows in :data:`LANDMARK_NAMES` order, read-only; not clipped.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray


@runtime_checkable
class FaceDetector(Protocol):
    """What the pipeline needs from a face detector; :func:`create_detector` builds one by name."""

    @property
    def device(self) -> torch.device:
        """Where the detector runs; :meth:`detect` moves its input there."""
        ...

    def detect(self, image: Tensor | np.ndarray) -> list[DetectedFace]:
        """Faces in ``image``, best score first.

        image: (3, H, W) uint8 RGB tensor (ideally already on :attr:`device`), or an (H, W, 3) uint8
        RGB numpy array.
        """
        ...


# --------------------------------------------------------------------------------------------------
# MTCNN constants and options
# --------------------------------------------------------------------------------------------------

#: Distribution whose files hold the weights, and where they sit inside it.
MTCNN_DISTRIBUTION: Final = "mtcnn"
MTCNN_WEIGHTS_PACKAGE_DIR: Final = "mtcnn/assets/weights"
#: Weight file of each network.
MTCNN_WEIGHT_FILES: Final = {"pnet": "pnet.lz4", "rnet": "rnet.lz4", "onet": "onet.lz4"}

#: P-Net's window (its receptive field) and the stride of its output cells, in level pixels. The
#: window is also the package's pyramid floor (``min_size``).
PNET_WINDOW: Final = 12
PNET_STRIDE: Final = 2
#: Smallest level side that still yields one P-Net cell: conv3 → pool "SAME" /2 → conv3 → conv3.
PNET_MIN_INPUT: Final = 11
#: R-Net and O-Net input crop sides.
RNET_SIZE: Final = 24
ONET_SIZE: Final = 48
#: Input normalisation: ``(x - PIXEL_MEAN) / PIXEL_SCALE`` maps uint8 to about [-1, 1].
PIXEL_MEAN: Final = 127.5
PIXEL_SCALE: Final = 128.0
#: Rows of NMS done at once (bounds the IoU block held in memory to this × candidates).
_NMS_BLOCK: Final = 1024
#: Pyramid layouts kept per detector (one per input size).
_LAYOUT_CACHE_SIZE: Final = 16
_LZ4_MAGIC: Final = b"\x04\x22\x4d\x18"

NmsMethod = Literal["union", "min"]


@dataclass(frozen=True)
class MTCNNConfig:
    """Detection parameters; the defaults are those of the ``mtcnn`` package (1.0).

    min_face_size: smallest face side in image pixels the pyramid reaches (its first scale is
        ``12 / min_face_size``); smaller faces are missed, values below 12 upsample the image.
    scale_factor: ratio between successive pyramid levels, in (0, 1).
    threshold_pnet / threshold_rnet / threshold_onet: face probability a candidate must exceed at each
        stage.
    nms_pnet_level: IoU above which a P-Net box is dropped for a better one of the same level.
    nms_pnet: the same across all levels; nms_rnet: after R-Net; nms_onet: after O-Net, where the
        overlap is over the smaller box's area.
    max_candidates: at most this many best P-Net cells per level, and boxes into the level-merging
        NMS. A box's fate depends only on better boxes, so this cap drops the worst candidates and
        changes nothing else; it bounds memory and time on cluttered photos.
    """

    min_face_size: float = 20.0
    scale_factor: float = 0.709
    threshold_pnet: float = 0.6
    threshold_rnet: float = 0.7
    threshold_onet: float = 0.8
    nms_pnet_level: float = 0.5
    nms_pnet: float = 0.7
    nms_rnet: float = 0.7
    nms_onet: float = 0.7
    max_candidates: int = 4000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_face_size) and self.min_face_size > 0):
            raise FaceDetectorError(
                f"min_face_size must be a positive number of pixels, got {self.min_face_size}"
            )
        if not 0.0 < self.scale_factor < 1.0:
            raise FaceDetectorError(f"scale_factor must be in (0, 1), got {self.scale_factor}")
        for name in ("threshold_pnet", "threshold_rnet", "threshold_onet"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise FaceDetectorError(f"{name} must be in [0, 1), got {value}")
        for name in ("nms_pnet_level", "nms_pnet", "nms_rnet", "nms_onet"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaceDetectorError(f"{name} must be in [0, 1], got {value}")
        if self.max_candidates < 1:
            raise FaceDetectorError(f"max_candidates must be at least 1, got {self.max_candidates}")


# --------------------------------------------------------------------------------------------------
# Reading the weights: joblib/LZ4 files, numpy data only
# --------------------------------------------------------------------------------------------------


class _ArrayHeader:
    """Stands in for ``joblib.numpy_pickle.NumpyArrayWrapper``: the header written before each array's
    raw bytes (``shape``, ``order``, ``dtype``, and since joblib 1.2 ``numpy_array_alignment_bytes``)."""

    _FIELDS: Final = frozenset(
        {"subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes"}
    )

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not set(state) <= self._FIELDS:
            raise pickle.UnpicklingError(f"unexpected array header {state!r}")
        self.state = state


def _reconstruct_functions() -> dict[tuple[str, str], Any]:
    # What ndarray.__reduce_ex__ names: _reconstruct (protocols < 5) and _frombuffer (5). Both only
    # build an array from a shape, a dtype and bytes. numpy 2 moved them from numpy.core to
    # numpy._core; files name either, so both names map to whichever module this numpy has.
    for package in ("numpy._core", "numpy.core"):
        try:
            helpers = {
                "multiarray": getattr(importlib.import_module(f"{package}.multiarray"), "_reconstruct"),  # noqa: B009
                "numeric": getattr(importlib.import_module(f"{package}.numeric"), "_frombuffer"),  # noqa: B009
            }
        except (ImportError, AttributeError):
            continue
        names = {"multiarray": "_reconstruct", "numeric": "_frombuffer"}
        return {
            (f"{prefix}.{module}", names[module]): function
            for prefix in ("numpy._core", "numpy.core")
            for module, function in helpers.items()
        }
    return {}


#: The only globals a weight pickle may name. Everything else is refused before it is resolved.
_ALLOWED_GLOBALS: Final[dict[tuple[str, str], Any]] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayHeader,
    **_reconstruct_functions(),
}
#: Array element kinds admitted: bool, signed/unsigned integers, floats.
_ALLOWED_KINDS: Final = frozenset("biuf")


class _NumpyOnlyUnpickler(pickle._Unpickler):
    """A pickle reader that builds numpy arrays and plain containers, and nothing else.

    ``find_class`` is the one door to code in a pickle (``GLOBAL``/``STACK_GLOBAL``/``INST``/``OBJ`` and
    the extension registry all go through it); it opens for :data:`_ALLOWED_GLOBALS` only. The joblib
    format also needs ``BUILD`` hooked: after a header is built, the raw array bytes follow in the
    stream, outside the pickle opcodes. The pure-Python unpickler is used because the C one cannot
    be hooked there (joblib does the same).
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self._stream = stream

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}': only numpy arrays are admitted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: only numpy arrays are admitted")

    def _load_build(self) -> None:
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        top = self.stack[-1]  # type: ignore[attr-defined]
        if isinstance(top, _ArrayHeader):
            self.stack[-1] = self._read_array(top)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    def _read_array(self, header: _ArrayHeader) -> np.ndarray:
        state = header.state
        dtype = state.get("dtype")
        shape = state.get("shape")
        order = state.get("order", "C")
        if state.get("subclass", np.ndarray) is not np.ndarray:
            raise pickle.UnpicklingError("refused array subclass")
        if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in _ALLOWED_KINDS:
            raise pickle.UnpicklingError(f"refused array dtype {dtype!r}: only numeric arrays are admitted")
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"bad array shape {shape!r}")
        if order not in ("C", "F"):
            raise pickle.UnpicklingError(f"bad array order {order!r}")
        if state.get("numpy_array_alignment_bytes") is not None:
            # One byte gives the padding length, then that many filler bytes.
            pad = self._stream.read(1)
            if len(pad) != 1:
                raise pickle.UnpicklingError("file ends inside an array header")
            self._stream.read(pad[0])
        count = math.prod(shape)
        data = self._stream.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise pickle.UnpicklingError("file ends inside array data")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        array = flat.reshape(shape[::-1]).T if order == "F" else flat.reshape(shape)
        return np.array(array, dtype=dtype.newbyteorder("="))


def read_numpy_pickle(path: Path) -> list[np.ndarray]:
    """The list of numeric arrays stored in a joblib dump (LZ4-compressed or not) at ``path``.

    Only numpy arrays, dtypes and the joblib array header may appear in the pickle; anything else
    (another global, an object array, a persistent id) raises :class:`FaceDetectorError` before it
    is resolved. Arrays come back in native byte order, writable.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FaceDetectorError(f"cannot read face detector weights {path}: {exc}") from exc
    try:
        if raw.startswith(_LZ4_MAGIC):
            import lz4.frame  # type: ignore[import-untyped]

            raw = lz4.frame.decompress(raw)
        loaded = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # whatever a malformed file makes the parser raise: all mean "bad file"
        raise FaceDetectorError(f"{path} is not a numpy-only weight file: {exc}") from exc
    arrays = loaded if isinstance(loaded, list | tuple) else [loaded]
    if not all(isinstance(a, np.ndarray) and a.dtype.kind in _ALLOWED_KINDS for a in arrays):
        raise FaceDetectorError(f"{path} does not hold a list of numeric arrays")
    return list(arrays)


def package_weights_dir() -> Path:
    """The folder of the MTCNN weight files inside the installed ``mtcnn`` distribution.

    Found through the distribution's file list (its RECORD), so the package is never imported.
    """
    try:
        dist = importlib.metadata.distribution(MTCNN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FaceDetectorError(
            f"the '{MTCNN_DISTRIBUTION}' package, which ships the face detector weights, is not installed; "
            f"install it with: pip install {MTCNN_DISTRIBUTION}"
        ) from None
    wanted = f"{MTCNN_WEIGHTS_PACKAGE_DIR}/{MTCNN_WEIGHT_FILES['pnet']}"
    for file in dist.files or ():
        if file.as_posix() == wanted:
            return Path(str(dist.locate_file(file))).parent
    raise FaceDetectorError(
        f"the installed '{MTCNN_DISTRIBUTION}' {dist.version} does not list {wanted}; reinstall it "
        f"(pip install --force-reinstall {MTCNN_DISTRIBUTION}) or pass a weights directory"
    )


# --------------------------------------------------------------------------------------------------
# The three networks and the Keras → torch layout conversion
# --------------------------------------------------------------------------------------------------


def _max_pool_same(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TF ``MaxPool`` with "SAME" padding on (N, C, H, W): ``ceil(n / stride)`` outputs per axis.

    TF pads ``total // 2`` before and the rest after, with values that never win. When nothing goes
    before (every pooling in these networks), torch's ``ceil_mode`` windows are exactly TF's.
    """
    if kernel == stride == 2 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
        # No padding at all (P-Net's canvas): maxima of row pairs, then of column pairs, take a third
        # of the time of CPU max_pool2d (which also computes indices) on this large map.
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])
    pads: list[int] = []
    for size in (x.shape[3], x.shape[2]):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    if pads[0] == 0 and pads[2] == 0:
        return F.max_pool2d(x, kernel, stride, ceil_mode=True)
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), kernel, stride)


#: A rectangle ``(row0, row1, col0, col1)`` of a feature map.
_Rect = tuple[int, int, int, int]


class _PNet(nn.Module):
    """Proposal network, fully convolutional.

    forward: (N, 3, H, W) normalised RGB → regression (N, 4, h, w) and face logits (N, 2, h, w), with
    ``h = ceil((H - 2) / 2) - 4``. ``outside``: rectangles of the conv1 map set to ``-inf`` before
    pooling, which is how a packed pyramid gives each level TF's "SAME" pooling at its own edge.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 4, 1)
        self.conv4_2 = nn.Conv2d(32, 2, 1)

    def forward(self, x: Tensor, outside: Sequence[_Rect] = ()) -> tuple[Tensor, Tensor]:
        x = self.prelu1(self.conv1(x))
        for r0, r1, c0, c1 in outside:
            x[:, :, r0:r1, c0:c1] = -math.inf
        x = _max_pool_same(x, 2, 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x), self.conv4_2(x)


class _RNet(nn.Module):
    """Refinement network: (N, 3, 24, 24) normalised RGB → regression (N, 4), face logits (N, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.fc4 = nn.Linear(64 * 3 * 3, 128)
        self.prelu4 = nn.PReLU(128)
        self.fc5_1 = nn.Linear(128, 4)
        self.fc5_2 = nn.Linear(128, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu4(self.fc4(self.prelu3(self.conv3(x)).flatten(1)))
        return self.fc5_1(x), self.fc5_2(x)


class _ONet(nn.Module):
    """Output network: (N, 3, 48, 48) normalised RGB → regression (N, 4), landmarks (N, 10) as
    ``x1..x5, y1..y5`` in box units, face logits (N, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.fc5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.fc6_1 = nn.Linear(256, 4)
        self.fc6_2 = nn.Linear(256, 10)
        self.fc6_3 = nn.Linear(256, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = _max_pool_same(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu5(self.fc5(self.prelu4(self.conv4(x)).flatten(1)))
        return self.fc6_1(x), self.fc6_2(x), self.fc6_3(x)


def _keras_to_torch(net: nn.Module, arrays: Sequence[np.ndarray]) -> dict[str, Tensor]:
    """Map a Keras ``get_weights()`` list onto ``net``'s parameters, converting each layout once.

    Keras lists weights layer by layer in the order the layers were created, which is the order of
    ``net``'s children: Conv2D ``kernel`` (HWIO → OIHW) and ``bias``; PReLU ``alpha`` ((1, 1, C) or
    (C,) → (C,)); Dense ``kernel`` ((in, out) → (out, in)) and ``bias``. The first Dense layer reads
    a conv map that Keras permuted to (W, H, C) before flattening; its rows are reordered to torch's
    (C, H, W) flatten so the networks need no permute at run time.
    """
    it = iter(arrays)
    state: dict[str, Tensor] = {}
    channels = 0
    flattened = False
    try:
        for name, layer in net.named_children():
            if isinstance(layer, nn.Conv2d):
                state[f"{name}.weight"] = torch.from_numpy(next(it).transpose(3, 2, 0, 1).copy())
                state[f"{name}.bias"] = torch.from_numpy(next(it).copy())
                channels = layer.out_channels
            elif isinstance(layer, nn.PReLU):
                state[f"{name}.weight"] = torch.from_numpy(next(it).reshape(-1).copy())
            elif isinstance(layer, nn.Linear):
                kernel = next(it)
                if not flattened:
                    side = math.isqrt(kernel.shape[0] // channels)
                    kernel = (
                        kernel.reshape(side, side, channels, -1)
                        .transpose(3, 2, 1, 0)
                        .reshape(-1, kernel.shape[0])
                    )
                    flattened = True
                else:
                    kernel = kernel.T
                state[f"{name}.weight"] = torch.from_numpy(kernel.copy())
                state[f"{name}.bias"] = torch.from_numpy(next(it).copy())
    except StopIteration:
        raise FaceDetectorError(f"too few arrays ({len(arrays)}) for {type(net).__name__}") from None
    except (ValueError, ZeroDivisionError) as exc:
        raise FaceDetectorError(f"array layout does not fit {type(net).__name__}: {exc}") from exc
    if next(it, None) is not None:
        raise FaceDetectorError(f"too many arrays ({len(arrays)}) for {type(net).__name__}")
    return state


_NETWORKS: Final[dict[str, Callable[[], nn.Module]]] = {"pnet": _PNet, "rnet": _RNet, "onet": _ONet}


def _load_network(kind: str, path: Path) -> nn.Module:
    net = _NETWORKS[kind]()
    state = _keras_to_torch(net, read_numpy_pickle(path))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FaceDetectorError(f"{path}: weights do not fit the {kind} architecture: {exc}") from exc
    return net.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------------
# Geometry: pyramid, area resize, packing, NMS, crops
# --------------------------------------------------------------------------------------------------


def pyramid_scales(height: int, width: int, min_face_size: float, scale_factor: float) -> list[float]:
    """The package's pyramid scales for an image of ``height × width`` (some may be too small to use).

    ``(12 / min_face_size) · scale_factor^k`` for ``k < round(-(log(min(H, W) / 12) / log(f)) - 1)``.
    """
    count = int(np.round(-(np.log(min(height, width) / PNET_WINDOW) / np.log(scale_factor) + 1)))
    if count <= 0:
        return []
    scales = (PNET_WINDOW / min_face_size) * scale_factor ** np.arange(count)
    return [float(s) for s in scales]


def _pack(sizes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Place rectangles (h, w), largest first, on one canvas at even offsets, without overlap.

    Greedy skyline (each rectangle goes where its top is highest, then leftmost), tried for a few
    canvas widths; the smallest canvas wins. Returns the (top, left) of each and the (even) canvas size.
    """
    even = [(h + h % 2, w + w % 2) for h, w in sizes]
    widest = max(w for _, w in even)
    widths = {widest} | {even[0][1] + w for _, w in even[1:4]}
    best: tuple[int, list[tuple[int, int]], tuple[int, int]] | None = None
    for width in sorted(widths):
        skyline = np.zeros(width // 2, dtype=np.int64)  # column tops, in units of 2 px
        offsets: list[tuple[int, int]] = []
        starts = {0}
        for h, w in even:
            cells = w // 2
            spots = [
                (int(skyline[x : x + cells].max()), x) for x in sorted(starts) if x + cells <= skyline.size
            ]
            top, x = min(spots)
            skyline[x : x + cells] = top + h // 2
            starts |= {x + cells}
            offsets.append((2 * top, 2 * x))
        canvas = (2 * int(skyline.max()), width)
        if best is None or canvas[0] * canvas[1] < best[0]:
            best = (canvas[0] * canvas[1], offsets, canvas)
    assert best is not None
    return best[1], best[2]


def _area_edges(in_size: int, out_size: int) -> np.ndarray:
    """Source coordinates ``i · in/out`` (float32, as TF's ``ResizeArea``) of the ``out + 1`` pixel
    edges of an area resize, clipped to ``in``."""
    ratio = np.float32(in_size) / np.float32(out_size)
    edges = np.arange(out_size + 1, dtype=np.float32) * ratio
    return np.asarray(np.minimum(edges, np.float32(in_size)), dtype=np.float32)


@dataclass(frozen=True)
class _Level:
    """One pyramid level: its scale, size, place on the canvas, and sampling coordinates."""

    scale: float
    height: int
    width: int
    top: int
    left: int
    #: The level's pixel edges as ``grid_sample`` coordinates into the integral image.
    grid_x: Tensor  # (width + 1,) float64
    grid_y: Tensor  # (height + 1,) float64
    #: ``out / in`` area ratio: TF divides each output's weighted sum by the source area it covers.
    density: float

    @property
    def cells(self) -> tuple[int, int]:
        """P-Net output size for this level: conv 3 → pool "SAME" /2 → conv 3 → conv 3."""
        return -(-(self.height - 2) // 2) - 4, -(-(self.width - 2) // 2) - 4

    def pool_overhang(self) -> list[_Rect]:
        """conv1-map rectangles that this level's last pooling row/column reaches past its own map.

        The conv1 map of a level is ``(h - 2) × (w - 2)``; when that is odd, TF pads the pooling
        with nothing that can win. On the packed canvas that row/column holds other pixels, so the
        detector sets it to ``-inf``.
        """
        rows, cols = self.height - 2, self.width - 2
        pooled_rows, pooled_cols = rows + rows % 2, cols + cols % 2
        out: list[_Rect] = []
        if rows % 2:
            out.append((self.top + rows, self.top + pooled_rows, self.left, self.left + pooled_cols))
        if cols % 2:
            out.append((self.top, self.top + pooled_rows, self.left + cols, self.left + pooled_cols))
        return out


@dataclass(frozen=True)
class _Pyramid:
    """The packed pyramid of one input size: levels, canvas, and the tensors that map P-Net cells back."""

    levels: tuple[_Level, ...]
    canvas: tuple[int, int]  # (Hc, Wc), even
    outside: tuple[_Rect, ...]  # conv1-map rectangles set to -inf before pooling
    cell_level: Tensor  # (Hc/2 - 5, Wc/2 - 5) int64: level of each P-Net cell, -1 for none
    origin: Tensor  # (L, 2) int64: each level's first cell (row, col) on the P-Net output map
    scale: Tensor  # (L,) float32


def _plan_pyramid(height: int, width: int, config: MTCNNConfig, device: torch.device) -> _Pyramid | None:
    sizes = []
    for s in pyramid_scales(height, width, config.min_face_size, config.scale_factor):
        # TF truncates the float target size (shape · scale) to int.
        h, w = int(height * s), int(width * s)
        if min(h, w) >= PNET_MIN_INPUT:
            sizes.append((s, h, w))
    if not sizes:
        return None
    # Each level's footprint keeps one spare row and column: the integral-image samples of a level
    # are its (h + 1) × (w + 1) pixel corners.
    offsets, canvas = _pack([(h + 1, w + 1) for _, h, w in sizes])
    levels = []
    for (s, h, w), (top, left) in zip(sizes, offsets, strict=True):
        # Sampling the inclusive integral image C at (edge - 1) reads the sum over [0, edge).
        gx = 2 * (_area_edges(width, w).astype(np.float64) - 1) / (width - 1) - 1
        gy = 2 * (_area_edges(height, h).astype(np.float64) - 1) / (height - 1) - 1
        density = 1.0 / (float(np.float32(height) / np.float32(h)) * float(np.float32(width) / np.float32(w)))
        grid_x = torch.from_numpy(gx).to(device)
        grid_y = torch.from_numpy(gy).to(device)
        levels.append(_Level(s, h, w, top, left, grid_x, grid_y, density))
    cell_level = torch.full((canvas[0] // 2 - 5, canvas[1] // 2 - 5), -1, dtype=torch.int64)
    for i, lv in enumerate(levels):
        ch, cw = lv.cells
        cell_level[lv.top // 2 : lv.top // 2 + ch, lv.left // 2 : lv.left // 2 + cw] = i
    return _Pyramid(
        levels=tuple(levels),
        canvas=canvas,
        outside=tuple(rect for lv in levels for rect in lv.pool_overhang()),
        cell_level=cell_level.to(device),
        origin=torch.tensor([[lv.top // 2, lv.left // 2] for lv in levels], dtype=torch.int64, device=device),
        scale=torch.tensor([lv.scale for lv in levels], dtype=torch.float32, device=device),
    )


#: Rows whose column sums of uint8 values stay exact in float32 (below 2^24).
_EXACT_FLOAT32_ROWS: Final = (1 << 24) // 255


def _pyramid_canvas(pixels: Tensor, plan: _Pyramid) -> Tensor:
    """Every level's TF ``AREA`` resize of ``pixels``, normalised, at its place on the packed canvas.

    pixels: (3, H, W) float32 RGB holding uint8 values. Returns (1, 3, Hc, Wc) float32 in about
    [-1, 1]; pixels between levels hold arbitrary values that no kept P-Net cell reads.

    An area resize averages the source over each output pixel's footprint, fractional edges included.
    With the integral image ``S`` that is ``(S(y1, x1) - S(y0, x1) - S(y1, x0) + S(y0, x0)) / area``,
    and ``S`` between integer points is exactly the bilinear interpolation of its values there; so one
    ``grid_sample`` at every level's pixel corners, then two differences, gives the whole pyramid.
    ``S`` is summed exactly (integers) and held in float64, whose 53 bits keep the differences within
    ~1e-7 of a grey level; TF itself sums in float32 and is off the exact average by up to ~5e-3.
    """
    height = pixels.shape[1]
    rows = pixels if height <= _EXACT_FLOAT32_ROWS else pixels.double()
    integral = rows.cumsum(1).double().cumsum(2)[None]  # (1, 3, H, W): inclusive sums over [0, y] × [0, x]
    hc, wc = plan.canvas
    grid = integral.new_full((1, hc + 1, wc + 1, 2), -2.0)  # outside [-1, 1]: reads 0
    for lv in plan.levels:
        block = grid[0, lv.top : lv.top + lv.height + 1, lv.left : lv.left + lv.width + 1]
        block[..., 0] = lv.grid_x
        block[..., 1] = lv.grid_y[:, None]
    # Zero padding supplies the empty sums at edge 0 (one before the first row/column of C).
    corners = F.grid_sample(integral, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    del integral, grid  # the big float64 buffers go before the next ones come
    for lv in plan.levels:
        # The normalisation's scale goes in here, while the values are still float64.
        corners[..., lv.top : lv.top + lv.height + 1, lv.left : lv.left + lv.width + 1] *= (
            lv.density / PIXEL_SCALE
        )
    return corners.diff(dim=3).diff(dim=2).float().sub_(PIXEL_MEAN / PIXEL_SCALE)


def nms_keep(
    boxes: Tensor, threshold: float, method: NmsMethod = "union", groups: Tensor | None = None
) -> Tensor:
    """Which boxes survive the package's NMS: a box goes if *any* earlier box overlaps it too much.

    boxes: (N, 4) float ``x1, y1, x2, y2``, best first. Overlap is ``inter / union`` ("union") or
    ``inter / min(area)`` ("min"), areas without the +1 pixel convention; too much is ``> threshold``.
    groups: optional (N,) ids; boxes of different groups never suppress each other.
    Returns an (N,) bool mask. Unlike greedy NMS, a suppressed box still suppresses those after it.
    """
    n = boxes.shape[0]
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    index = torch.arange(n, device=boxes.device)
    for start in range(0, n, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, n)
        # Rows start..stop can only suppress columns after them.
        r, c = slice(start, stop), slice(start, n)
        iw = (torch.minimum(x2[r, None], x2[None, c]) - torch.maximum(x1[r, None], x1[None, c])).clamp_min(0)
        ih = (torch.minimum(y2[r, None], y2[None, c]) - torch.maximum(y1[r, None], y1[None, c])).clamp_min(0)
        inter = iw * ih
        if method == "union":
            denom = area[r, None] + area[None, c] - inter
        else:
            denom = torch.minimum(area[r, None], area[None, c])
        hit = (inter / denom > threshold) & (index[r, None] < index[None, c])
        if groups is not None:
            hit &= groups[r, None] == groups[None, c]
        suppressed[c] |= hit.any(0)
    return ~suppressed


def _square(boxes: Tensor) -> Tensor:
    """(N, 4+) boxes → squares of side ``max(w, h)`` about the same centre (no +1); extra columns kept."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], 1), boxes[:, 4:]], 1)


def _regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Move (N, 4+) box corners by (N, 4) offsets in units of ``x2 - x1 + 1`` / ``y2 - y1 + 1``."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    moved = boxes[:, :4] + offsets * torch.stack([w, h, w, h], 1)
    return torch.cat([moved, boxes[:, 4:]], 1)


def crop_and_resize(image: Tensor, boxes: Tensor, size: int, extrapolation_value: float = 0.0) -> Tensor:
    """``tf.image.crop_and_resize`` of one image: bilinear ``size × size`` crops of every box.

    image: (C, H, W) float. boxes: (K, 4) float ``x1, y1, x2, y2`` in pixels. As the package calls TF,
    corners are normalised by ``W``/``H`` and sampled on the ``(W - 1)``/``(H - 1)`` grid: sample
    ``(i, j)`` sits at row ``(y1 + i·(y2 - y1)/(size - 1)) / H · (H - 1)``, and a sample row or column
    outside the image reads ``extrapolation_value``. Returns (K, C, size, size) in ``image``'s dtype,
    from one ``grid_sample`` call for all boxes.
    """
    c, height, width = image.shape
    k = boxes.shape[0]
    norm = boxes / boxes.new_tensor([width, height, width, height])
    steps = torch.arange(size, dtype=boxes.dtype, device=boxes.device) / (size - 1)
    xs = norm[:, 0:1] + steps * (norm[:, 2:3] - norm[:, 0:1])  # (K, size), in [0, 1] inside the image
    ys = norm[:, 1:2] + steps * (norm[:, 3:4] - norm[:, 1:2])
    grid = torch.stack([xs[:, None, :].expand(k, size, size), ys[:, :, None].expand(k, size, size)], -1)
    # All crops stacked along the grid's rows, so a single (1, C, H, W) image serves every box.
    crops = F.grid_sample(
        image[None], (grid * 2 - 1).reshape(1, k * size, size, 2).to(image.dtype), align_corners=True
    )
    crops = crops.reshape(c, k, size, size).transpose(0, 1)
    inside = ((ys >= 0) & (ys <= 1))[:, None, :, None] & ((xs >= 0) & (xs <= 1))[:, None, None, :]
    return crops.where(inside, extrapolation_value)


# --------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------


def _as_chw_uint8(image: Tensor | np.ndarray, device: torch.device) -> Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputShapeError(
                f"face detector input must be an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}"
            )
        # torch wants writable memory; photos decoded elsewhere are often read-only views.
        array = image if image.flags.writeable else image.copy()
        image = torch.from_numpy(array).permute(2, 0, 1)
    elif not isinstance(image, Tensor):
        raise InputShapeError(
            f"face detector input must be a tensor or numpy array, got {type(image).__name__}"
        )
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise InputShapeError(
            f"face detector input must be a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} "
            f"{image.dtype}"
        )
    return image.to(device)


class MTCNNDetector:
    """MTCNN (P-Net → R-Net → O-Net) in torch, on one device, with the ``mtcnn`` package's semantics.

    Build it with :meth:`load` (or :func:`create_detector`). :meth:`detect` is the whole detector;
    the stages are public too (:meth:`prepare`, :meth:`propose`, :meth:`refine`, :meth:`output`) so
    benchmarks can time each. Between stages, candidates are (N, 5) float32 tensors on the device:
    ``x1, y1, x2, y2, score`` in image pixels, best score first.

    ``dtype`` is the networks' compute dtype; resizing, crops and box arithmetic stay float32/float64.
    float32 reproduces the package. float16 moves boxes by a fraction of a pixel, bfloat16 by a few
    pixels; on the 2-core CPU neither is faster (measured), they are for GPUs. The networks run
    channels-last, which is what makes the 3-channel first convolutions fast on CPU. The only state
    kept between calls is a small cache of pyramid layouts, one per input size.
    """

    def __init__(
        self,
        pnet: nn.Module,
        rnet: nn.Module,
        onet: nn.Module,
        *,
        config: MTCNNConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._device = torch.device(device)
        self._dtype = dtype
        self.config = config if config is not None else MTCNNConfig()
        # Copies: Module.to works in place, and the caller's networks may serve another detector.
        # torch's stubs omit Module.to's memory_format keyword, which it accepts.
        nets = [
            copy.deepcopy(net).to(device=self._device, dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]
            for net in (pnet, rnet, onet)
        ]
        self.pnet, self.rnet, self.onet = nets
        self._layouts: OrderedDict[tuple[int, int], _Pyramid | None] = OrderedDict()
        self._layouts_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: MTCNNConfig | None = None,
        weights_dir: Path | None = None,
    ) -> MTCNNDetector:
        """Read the three weight files (default: those inside the installed ``mtcnn`` package).

        Raises :class:`FaceDetectorError` when a file is missing or is not a numpy-only joblib dump
        of the expected arrays.
        """
        folder = weights_dir if weights_dir is not None else package_weights_dir()
        nets = {}
        for kind, filename in MTCNN_WEIGHT_FILES.items():
            path = folder / filename
            if not path.is_file():
                raise FaceDetectorError(f"face detector weights not found: {path}")
            nets[kind] = _load_network(kind, path)
        return cls(nets["pnet"], nets["rnet"], nets["onet"], config=config, device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def with_config(self, **changes: Any) -> MTCNNDetector:
        """A detector sharing these networks, with some :class:`MTCNNConfig` fields changed."""
        try:
            config = replace(self.config, **changes)
        except TypeError as exc:  # an unknown field, or a value of the wrong type
            raise FaceDetectorError(f"bad MTCNN option: {exc}") from exc
        clone = copy.copy(self)
        clone.config = config
        clone._layouts = OrderedDict()  # layouts depend on min_face_size and scale_factor
        clone._layouts_lock = threading.Lock()
        return clone

    # -- stages ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, image: Tensor | np.ndarray) -> Tensor:
        """(3, H, W) uint8 RGB tensor or (H, W, 3) uint8 RGB array → (3, H, W) float32 RGB 0..255 on
        the device: what the other stages read."""
        # Contiguous (3, H, W): an HWC array's permuted view would slow the integral image and crops.
        return _as_chw_uint8(image, self._device).contiguous().float()

    def _pyramid(self, height: int, width: int) -> _Pyramid | None:
        key = (height, width)
        with self._layouts_lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        plan = _plan_pyramid(height, width, self.config, self._device)
        with self._layouts_lock:
            self._layouts[key] = plan
            if len(self._layouts) > _LAYOUT_CACHE_SIZE:
                self._layouts.popitem(last=False)
        return plan

    def _run(self, net: nn.Module, x: Tensor, *args: Any) -> list[Tensor]:
        outputs = net(x.to(self._dtype).contiguous(memory_format=torch.channels_last), *args)
        return [y.float() for y in outputs]

    @torch.inference_mode()
    def propose(self, pixels: Tensor) -> Tensor:
        """P-Net over the whole pyramid in one pass → squared candidates (N, 5), best first."""
        cfg = self.config
        plan = self._pyramid(pixels.shape[1], pixels.shape[2])
        if plan is None:
            return pixels.new_zeros(0, 5)
        reg, logits = self._run(self.pnet, _pyramid_canvas(pixels, plan), plan.outside)
        prob = torch.softmax(logits[0], 0)[1]
        cy, cx = torch.nonzero((prob > cfg.threshold_pnet) & (plan.cell_level >= 0), as_tuple=True)
        level = plan.cell_level[cy, cx]
        score = prob[cy, cx]
        offsets = reg[0, :, cy, cx].T
        # The cell's box on its level, moved by the regression (in box sides), then to image pixels.
        y0 = (cy - plan.origin[level, 0]) * PNET_STRIDE + 1
        x0 = (cx - plan.origin[level, 1]) * PNET_STRIDE + 1
        side = PNET_WINDOW - 1
        corners = torch.stack([x0, y0, x0 + side, y0 + side], 1).float() + offsets * side
        boxes = torch.cat([corners / plan.scale[level, None], score[:, None]], 1)
        # Per level: best first, capped, NMS; then all levels together.
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(level[order], stable=True)]
        boxes, level = boxes[order], level[order]
        counts = torch.bincount(level, minlength=len(plan.levels))
        rank = torch.arange(level.shape[0], device=level.device) - (torch.cumsum(counts, 0) - counts)[level]
        boxes, level = boxes[rank < cfg.max_candidates], level[rank < cfg.max_candidates]
        boxes = boxes[nms_keep(boxes[:, :4], cfg.nms_pnet_level, "union", groups=level)]
        boxes = boxes[torch.argsort(boxes[:, 4], descending=True, stable=True)][: cfg.max_candidates]
        boxes = boxes[nms_keep(boxes[:, :4], cfg.nms_pnet, "union")]
        return _square(boxes)

    def _crops(self, pixels: Tensor, candidates: Tensor, size: int) -> Tensor:
        # Cropped from the 0..255 pixels, then normalised: TF's 0 outside the image is mid-grey.
        crops = crop_and_resize(pixels, candidates[:, :4], size, extrapolation_value=PIXEL_MEAN)
        return (crops - PIXEL_MEAN) / PIXEL_SCALE

    @torch.inference_mode()
    def refine(self, pixels: Tensor, candidates: Tensor) -> Tensor:
        """R-Net on 24² crops of the candidates → regressed, filtered, squared candidates (N, 5)."""
        if candidates.shape[0] == 0:
            return candidates
        offsets, logits = self._run(self.rnet, self._crops(pixels, candidates, RNET_SIZE))
        score = torch.softmax(logits, 1)[:, 1]
        boxes = torch.cat([_regress(candidates[:, :4], offsets), score[:, None]], 1)
        boxes = boxes[score > self.config.threshold_rnet]
        boxes = boxes[torch.argsort(boxes[:, 4], descending=True, stable=True)]
        boxes = boxes[nms_keep(boxes[:, :4], self.config.nms_rnet, "union")]
        return _square(boxes)

    @torch.inference_mode()
    def output(self, pixels: Tensor, candidates: Tensor) -> Tensor:
        """O-Net on 48² crops → faces (N, 15): ``x1, y1, x2, y2, score``, then the five landmarks as
        ``x, y`` pairs in :data:`LANDMARK_NAMES` order; image pixels, best first, boxes not clipped."""
        if candidates.shape[0] == 0:
            return candidates.new_zeros(0, 15)
        offsets, marks, logits = self._run(self.onet, self._crops(pixels, candidates, ONET_SIZE))
        score = torch.softmax(logits, 1)[:, 1]
        # Landmarks are in units of the input box, from a one-based origin (hence the -1).
        w = candidates[:, 2:3] - candidates[:, 0:1] + 1
        h = candidates[:, 3:4] - candidates[:, 1:2] + 1
        xs = w * marks[:, :5] + candidates[:, 0:1] - 1
        ys = h * marks[:, 5:] + candidates[:, 1:2] - 1
        points = torch.stack([xs, ys], 2).flatten(1)
        faces = torch.cat([_regress(candidates[:, :4], offsets), score[:, None], points], 1)
        faces = faces[score > self.config.threshold_onet]
        faces = faces[torch.argsort(faces[:, 4], descending=True, stable=True)]
        return faces[nms_keep(faces[:, :4], self.config.nms_onet, "min")]

    # -- whole detector ----------------------------------------------------------------------------

    @torch.inference_mode()
    def detect_tensor(self, image: Tensor | np.ndarray) -> Tensor:
        """All three stages → (N, 15) float32 on the device, as :meth:`output`, with the boxes clipped
        to the image (``[0, W - 1] × [0, H - 1]``)."""
        pixels = self.prepare(image)
        faces = self.output(pixels, self.refine(pixels, self.propose(pixels)))
        height, width = pixels.shape[1:]
        faces[:, 0:4:2] = faces[:, 0:4:2].clamp(0, width - 1)
        faces[:, 1:4:2] = faces[:, 1:4:2].clamp(0, height - 1)
        return faces

    def detect(self, image: Tensor | np.ndarray) -> list[DetectedFace]:
        """Faces in ``image``, best score first (see :class:`FaceDetector`)."""
        faces = []
        for row in self.detect_tensor(image).cpu().numpy():
            landmarks = row[5:15].reshape(5, 2).astype(np.float32)
            landmarks.flags.writeable = False
            x1, y1, x2, y2 = (float(v) for v in row[:4])
            faces.append(DetectedFace(box=(x1, y1, x2, y2), score=float(row[4]), landmarks=landmarks))
        return faces


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

#: Builds a detector from ``(device, dtype, **options)``.
DetectorFactory = Callable[..., FaceDetector]


def _create_mtcnn(device: torch.device | str, dtype: torch.dtype, **options: Any) -> MTCNNDetector:
    weights_dir = options.pop("weights_dir", None)
    known = {f.name for f in fields(MTCNNConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FaceDetectorError(f"unknown MTCNN option(s) {unknown}; known: {sorted(known)}")
    try:
        config = MTCNNConfig(**options)
    except TypeError as exc:  # a value of the wrong type
        raise FaceDetectorError(f"bad MTCNN option: {exc}") from exc
    return MTCNNDetector.load(device=device, dtype=dtype, config=config, weights_dir=weights_dir)


_REGISTRY: dict[str, DetectorFactory] = {"mtcnn": _create_mtcnn}


def register_detector(name: str, factory: DetectorFactory) -> None:
    """Make ``factory`` available to :func:`create_detector` as ``name`` (replacing any previous one)."""
    _REGISTRY[name] = factory


def available_detectors() -> tuple[str, ...]:
    """Names :func:`create_detector` accepts."""
    return tuple(sorted(_REGISTRY))


def create_detector(
    name: str = "mtcnn",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> FaceDetector:
    """Build the detector registered as ``name`` on ``device``.

    For "mtcnn", ``options`` are :class:`MTCNNConfig` fields plus ``weights_dir`` (a folder holding
    ``pnet.lz4``, ``rnet.lz4``, ``onet.lz4``; default: the installed ``mtcnn`` package's).
    Raises :class:`FaceDetectorError` for an unknown name or option, or unreadable weights.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise FaceDetectorError(
            f"unknown face detector '{name}'; available: {', '.join(available_detectors())}"
        ) from None
    return factory(device, dtype, **options)
