"""The three MTCNN networks in torch, and the conversion of the package's Keras weights to them.

:func:`_load_network` converts the Keras layout once: HWIO kernels → OIHW, dense ``(in, out)`` →
``(out, in)``, PReLU alphas ``(1, 1, C)`` → ``(C,)``, and the flatten before the first dense layer of
R-Net/O-Net, which Keras takes on a ``Permute((2, 1, 3))``-ed NHWC map (order W, H, C) where torch
flattens NCHW. Max pooling is TF's "SAME" pooling (:func:`_max_pool_same`); :class:`_PNet` also takes
the rectangles that let one pass over a packed pyramid equal separate passes per level
(:mod:`inference.faces.mtcnn.pyramid`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.faces.detector import FaceDetectorError
from inference.faces.mtcnn.weights import read_numpy_pickle

#: P-Net's window (its receptive field) and the stride of its output cells, in level pixels. The
#: window is also the package's ``min_size``, the smallest side its pyramid shrinks the image to
#: (which sets the level count; not to be confused with ``MTCNNConfig.pyramid_floor``).
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
