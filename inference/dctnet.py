"""The DCT-Net generator (`cartoon_h.pb` / `cartoon_bg.pb`) as a PyTorch module, exact to the TF graph.

What the official frozen graph computes (docs/model.md §2): BGR 0..255 → ``x/127.5 - 1`` → a U-Net with
18 convolutions and 4 residual blocks → a guided filter (r=1) of the raw output guided by ``x`` →
clip to ±0.999999 → ``(z + 1) * 127.5`` → truncating cast to uint8. This port reproduces each TF rule
that differs from PyTorch's defaults:

* stride-2 convolutions use TF "SAME" padding, which for k=3 and even sizes is 0 before and 1 after;
* the ×2 upsampling is TF's legacy ``ResizeBilinear`` (``align_corners=False``,
  ``half_pixel_centers=False``): source coordinate ``dst / 2``;
* the guided filter's box mean is zero-padded and normalised by the number of valid pixels;
* the uint8 cast truncates.

Size contract: H and W must be multiples of 4 (:data:`SIZE_MULTIPLE`), as in the TF graph, whose skip
additions fail otherwise. The network does not pad: callers pad (the pipeline pads the background
image with white to a multiple of 16 like upstream, head crops are 288×288) and crop afterwards;
:func:`pad_to_multiple` is the helper for that.

Precision: ``float32`` is the exact mode. ``bfloat16`` and ``float16`` run the convolutions in that
dtype (the fast modes); the guided filter and the output cast always run in float32, because the
filter's ``E[x²] - E[x]²`` cancels catastrophically in 8- or 11-bit mantissas.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.errors import ConversionError, InputShapeError

#: H and W of every generator input must be multiples of this.
SIZE_MULTIPLE: Final = 4
#: Trainable parameters of the official generator (18 convolutions with biases).
PARAMETER_COUNT: Final = 1_467_075
#: Leaky ReLU slope (``tf.nn.leaky_relu`` default, the ``alpha`` attribute in the frozen graph).
LEAKY_SLOPE: Final = 0.2
#: Output clip before the uint8 cast; 255 can therefore never occur.
OUTPUT_CLIP: Final = 0.999999
#: Guided filter eps of ``CartoonModel`` (the converter reads the real value from each graph).
DEFAULT_EPS: Final = 1e-2
#: Guided filter radius.
GUIDED_FILTER_RADIUS: Final = 1


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of the generator, named as in the TF graph (``generator/<scope>/weights``)."""

    scope: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int = 1

    @property
    def module_path(self) -> str:
        """The attribute path in :class:`DCTNetGenerator` (``block_0/conv1`` → ``block_0.conv1``)."""
        return self.scope.replace("/", ".")

    @property
    def weight_shape_tf(self) -> tuple[int, int, int, int]:
        """HWIO shape of the ``weights`` constant in the frozen graph."""
        return (self.kernel, self.kernel, self.in_channels, self.out_channels)


def _specs() -> tuple[ConvSpec, ...]:
    ch = 32
    head = [
        ConvSpec("Conv", 3, ch, 7),
        ConvSpec("Conv_1", ch, ch, 3, 2),
        ConvSpec("Conv_2", ch, ch * 2, 3),
        ConvSpec("Conv_3", ch * 2, ch * 2, 3, 2),
        ConvSpec("Conv_4", ch * 2, ch * 4, 3),
    ]
    blocks = [ConvSpec(f"block_{i}/conv{j}", ch * 4, ch * 4, 3) for i in range(4) for j in (1, 2)]
    tail = [
        ConvSpec("Conv_5", ch * 4, ch * 2, 3),
        ConvSpec("Conv_6", ch * 2, ch * 2, 3),
        ConvSpec("Conv_7", ch * 2, ch, 3),
        ConvSpec("Conv_8", ch, ch, 3),
        ConvSpec("Conv_9", ch, 3, 7),
    ]
    return (*head, *blocks, *tail)


#: The 18 convolutions in graph order.
CONV_SPECS: Final[tuple[ConvSpec, ...]] = _specs()
#: Variable scope of the generator inside the frozen graph.
TF_SCOPE: Final = "generator"


def _conv(spec: ConvSpec) -> nn.Conv2d:
    # Stride 1: TF SAME is symmetric (k//2 each side). Stride 2: padded by hand in forward().
    pad = spec.kernel // 2 if spec.stride == 1 else 0
    return nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, pad)


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _conv_same_s2(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """TF 'SAME' for k=3, s=2 on even sizes: pad_total = 1, all of it after (bottom/right)."""
    out: Tensor = conv(F.pad(x, (0, 1, 0, 1)))
    return out


def upsample2x_tf_legacy(x: Tensor) -> Tensor:
    """TF1 ``ResizeBilinear`` ×2 with ``align_corners=False, half_pixel_centers=False``.

    Source coordinate = dst/2, so ``out[2k] = in[k]`` and ``out[2k+1] = (in[k] + in[min(k+1, n-1)])/2``
    along each axis (the last row/column is replicated).

    x: (N, C, H, W) float → (N, C, 2H, 2W), same dtype and memory format.
    """
    n, c, h, w = x.shape
    out = torch.zeros((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device).contiguous(
        memory_format=_memory_format(x)
    )
    return upsample2x_tf_legacy_add(x, out)


def upsample2x_tf_legacy_add(x: Tensor, skip: Tensor) -> Tensor:
    """``skip + upsample2x_tf_legacy(x)``, accumulated into ``skip`` in place (and returned).

    The generator adds every upsampled map to a skip connection that is not used again, so writing
    the four interleaved phases straight into it saves a full-resolution temporary and a pass.
    x: (N, C, H, W); skip: (N, C, 2H, 2W), same dtype.
    """
    right = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    down = torch.cat([x[..., 1:, :], x[..., -1:, :]], dim=-2)
    down_right = torch.cat([right[..., 1:, :], right[..., -1:, :]], dim=-2)
    skip[..., 0::2, 0::2] += x
    skip[..., 0::2, 1::2] += (x + right) * 0.5
    skip[..., 1::2, 0::2] += (x + down) * 0.5
    skip[..., 1::2, 1::2] += ((x + right) + (down + down_right)) * 0.25
    return skip


def _memory_format(x: Tensor) -> torch.memory_format:
    return (
        torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    )


def box_mean(x: Tensor) -> Tensor:
    """3×3 mean over the valid (in-image) neighbours: TF's zero-padded box filter divided by N.

    ``box(x)`` is a depthwise 3×3 convolution with weights 1/9 and zero padding, exactly as in the
    exporter graph; ``N = box(ones)`` is 1 inside, 6/9 on edges and 4/9 in corners, built directly.
    x: (N, C, H, W) float, any memory format (channels-last is much faster on CPU).
    """
    c, (h, w) = x.shape[1], x.shape[-2:]
    k = 2 * GUIDED_FILTER_RADIUS + 1
    kernel = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=x.dtype, device=x.device)
    summed = F.conv2d(
        x, kernel.contiguous(memory_format=_memory_format(x)), padding=GUIDED_FILTER_RADIUS, groups=c
    )
    return summed / _valid_fraction(h, w, x)


def _valid_fraction(h: int, w: int, like: Tensor) -> Tensor:
    """``box(ones)``: the fraction of each pixel's 3×3 window that lies inside the image, (H, W)."""
    r = GUIDED_FILTER_RADIUS
    k = 2 * r + 1

    def counts(n: int) -> Tensor:  # window cells inside [0, n) along one axis
        idx = torch.arange(n, device=like.device)
        return idx.clamp(max=r) + (n - 1 - idx).clamp(max=r) + 1

    return (counts(h)[:, None] * counts(w)[None, :]).to(like.dtype) / (k * k)


def guided_filter(x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast guided filter (He et al.) with r=1, per channel, as in the exporter graph.

    x: guide, (N, C, H, W) float32 in [-1, 1]; y: raw generator output, same shape, float32.
    Returns the filtered (N, C, H, W) float32. The four first-pass means (and the two second-pass
    means) are taken in one pooling call each over the channel-stacked maps.
    """
    c = x.shape[1]
    means = box_mean(torch.cat([x, y, x * y, x * x], dim=1))
    mean_x, mean_y, mean_xy, mean_xx = torch.split(means, c, dim=1)
    cov_xy = mean_xy - mean_x * mean_y
    var_x = mean_xx - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    b = mean_y - a * mean_x
    mean_a, mean_b = torch.split(box_mean(torch.cat([a, b], dim=1)), c, dim=1)
    out: Tensor = mean_a * x + mean_b
    return out


def to_uint8(z: Tensor) -> Tensor:
    """In-graph post-processing: clip ±0.999999, ``(z+1)·127.5``, truncating cast (values 0..254)."""
    return ((z.clamp(-OUTPUT_CLIP, OUTPUT_CLIP) + 1.0) * 127.5).to(torch.uint8)


class _ResBlock(nn.Module):
    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d) -> None:
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2

    def forward(self, x: Tensor) -> Tensor:
        # No activation after the addition (docs/model.md §2.2).
        out: Tensor = x + self.conv2(_lrelu(self.conv1(x)))
        return out


class DCTNetGenerator(nn.Module):
    """The DCT-Net U-Net generator plus guided filter and the graph's own pre/post-processing.

    This module is the reference formulation in plain PyTorch ops; it runs on any device.
    :class:`GeneratorRunner` executes it, on CPU through fused oneDNN primitives.
    Parameter names mirror the TF scopes: ``Conv.weight`` … ``Conv_9.bias``,
    ``block_{0..3}.conv{1,2}.{weight,bias}``.
    """

    def __init__(self, eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        convs = {spec.scope: _conv(spec) for spec in CONV_SPECS}
        self.Conv = convs["Conv"]
        self.Conv_1 = convs["Conv_1"]
        self.Conv_2 = convs["Conv_2"]
        self.Conv_3 = convs["Conv_3"]
        self.Conv_4 = convs["Conv_4"]
        for i in range(4):
            self.add_module(f"block_{i}", _ResBlock(convs[f"block_{i}/conv1"], convs[f"block_{i}/conv2"]))
        self.Conv_5 = convs["Conv_5"]
        self.Conv_6 = convs["Conv_6"]
        self.Conv_7 = convs["Conv_7"]
        self.Conv_8 = convs["Conv_8"]
        self.Conv_9 = convs["Conv_9"]
        self.eps = float(eps)

    def conv(self, spec: ConvSpec) -> nn.Conv2d:
        module = self.get_submodule(spec.module_path)
        assert isinstance(module, nn.Conv2d)
        return module

    def _res_blocks(self) -> Iterator[nn.Module]:
        for i in range(4):
            yield getattr(self, f"block_{i}")

    def unet(self, x: Tensor) -> Tensor:
        """The raw U-Net output (``Conv_9``, no activation).

        x: (N, 3, H, W) in [-1, 1], BGR, in the dtype of the convolutions; H, W multiples of 4.
        """
        x0 = _lrelu(self.Conv(x))
        x1 = _lrelu(self.Conv_2(_lrelu(_conv_same_s2(self.Conv_1, x0))))
        x2 = _lrelu(self.Conv_4(_lrelu(_conv_same_s2(self.Conv_3, x1))))
        for block in self._res_blocks():
            x2 = block(x2)
        x2 = _lrelu(self.Conv_5(x2))
        x3 = _lrelu(self.Conv_7(_lrelu(self.Conv_6(upsample2x_tf_legacy_add(x2, x1)))))
        y: Tensor = self.Conv_9(_lrelu(self.Conv_8(upsample2x_tf_legacy_add(x3, x0))))
        return y

    def forward(self, bgr: Tensor) -> Tensor:
        """(N, 3, H, W) BGR 0..255 (uint8 or float) → (N, 3, H, W) uint8 BGR 0..254."""
        return to_uint8(filtered(self.unet, bgr, self.Conv.weight.dtype, self.eps))


def filtered(unet: Callable[[Tensor], Tensor], bgr: Tensor, conv_dtype: torch.dtype, eps: float) -> Tensor:
    """The graph up to the guided filter: (N, 3, H, W) float32, about [-1, 1], BGR, before the clip.

    bgr: (N, 3, H, W) BGR 0..255, uint8 or any float dtype, H and W multiples of 4. ``unet`` runs in
    ``conv_dtype``; normalisation and the guided filter always run in float32.
    """
    check_size(bgr)
    x = bgr.float() / 127.5 - 1.0
    x = x.contiguous(memory_format=torch.channels_last)
    y = unet(x.to(conv_dtype))
    return guided_filter(x, y.float().contiguous(memory_format=torch.channels_last), eps)


class _OneDNNUnet:
    """The U-Net on CPU through oneDNN's fused convolution primitives (the ones Inductor emits).

    Each convolution runs with its bias and leaky ReLU (or the residual addition) fused, in
    channels-last layout, so the network costs little more than its convolutions. No graph is
    compiled: oneDNN caches one primitive per input shape internally (a few ms on first sight of a
    shape), so image sizes may vary freely. The stride-2 TF "SAME" padding (0 before, 1 after) is
    expressed exactly as a 4×4 kernel whose first row and column are zero, with symmetric padding 1.
    """

    def __init__(self, model: DCTNetGenerator) -> None:
        self._ops = torch.ops.mkldnn
        self._layers: dict[str, tuple[Tensor, Tensor, list[int], list[int]]] = {}
        for spec in CONV_SPECS:
            conv = model.conv(spec)
            weight = conv.weight.detach()
            padding = [spec.kernel // 2] * 2
            if spec.stride == 2:
                weight, padding = F.pad(weight, (1, 0, 1, 0)), [1, 1]
            assert conv.bias is not None
            self._layers[spec.scope] = (
                weight.contiguous(memory_format=torch.channels_last),
                conv.bias.detach(),
                padding,
                [spec.stride] * 2,
            )

    def _conv(self, scope: str, x: Tensor, act: bool = True) -> Tensor:
        w, b, pad, stride = self._layers[scope]
        unary, scalars = ("leaky_relu", [LEAKY_SLOPE]) if act else ("none", [])
        out: Tensor = self._ops._convolution_pointwise(x, w, b, pad, stride, [1, 1], 1, unary, scalars, "")
        return out

    def _conv_add_(self, scope: str, x: Tensor, residual: Tensor) -> Tensor:
        """``residual += conv(x)`` with the addition fused into the convolution."""
        w, b, pad, stride = self._layers[scope]
        out: Tensor = self._ops._convolution_pointwise_.binary(
            residual, x, w, b, pad, stride, [1, 1], 1, "add", None, None, [], None
        )
        return out

    def __call__(self, x: Tensor) -> Tensor:
        x0 = self._conv("Conv", x)
        x1 = self._conv("Conv_2", self._conv("Conv_1", x0))
        x2 = self._conv("Conv_4", self._conv("Conv_3", x1))
        for i in range(4):
            x2 = self._conv_add_(f"block_{i}/conv2", self._conv(f"block_{i}/conv1", x2), x2)
        x2 = self._conv("Conv_5", x2)
        x3 = self._conv("Conv_7", self._conv("Conv_6", upsample2x_tf_legacy_add(x2, x1)))
        return self._conv("Conv_9", self._conv("Conv_8", upsample2x_tf_legacy_add(x3, x0)), act=False)


Backend = Literal["auto", "onednn", "eager"]
BACKENDS: Final[tuple[Backend, ...]] = ("auto", "onednn", "eager")


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused oneDNN path can run here: a CPU device, oneDNN built in, the dtype supported."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_convolution_pointwise_")):
        return False
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(ops._is_mkldnn_fp16_supported())
    return dtype == torch.float32


class GeneratorRunner:
    """Runs a :class:`DCTNetGenerator` on its device with the chosen backend.

    Backends: ``onednn`` (CPU only: fused oneDNN primitives, no compilation, any size), ``eager``
    (the module's own ops in channels-last layout; what CUDA uses, cuDNN picking the kernels), and
    ``auto`` (``onednn`` where usable, else ``eager``). Both compute the same function; the tests
    hold them to the TF reference. Calls are inference-only and thread-compatible (no state). On
    CUDA every call runs with cuDNN's TF32 off (:func:`ieee_fp32_convolutions`).
    """

    def __init__(self, model: DCTNetGenerator, backend: Backend = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        weight = model.Conv.weight
        self.model = model.eval()
        self.device = weight.device
        self.dtype = weight.dtype
        self.eps = model.eps
        usable = onednn_usable(self.device, self.dtype)
        if backend == "onednn" and not usable:
            raise ValueError(f"the onednn backend needs a CPU device with oneDNN {self.dtype} support")
        self.backend: Backend = "onednn" if (backend != "eager" and usable) else "eager"
        self._unet: Callable[[Tensor], Tensor]
        if self.backend == "onednn":
            self._unet = _OneDNNUnet(model)
        else:
            for conv in self.model.modules():
                if isinstance(conv, nn.Conv2d):
                    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
            self._unet = self.model.unet

    @torch.inference_mode()
    def filtered(self, bgr: Tensor) -> Tensor:
        """(N, 3, H, W) BGR 0..255 → guided-filter output (N, 3, H, W) float32, before the clip."""
        if self.device.type == "cuda":
            with ieee_fp32_convolutions():
                return filtered(self._unet, bgr.to(self.device), self.dtype, self.eps)
        return filtered(self._unet, bgr.to(self.device), self.dtype, self.eps)

    @torch.inference_mode()
    def __call__(self, bgr: Tensor) -> Tensor:
        """(N, 3, H, W) BGR 0..255 (uint8 or float), H, W multiples of 4 → (N, 3, H, W) uint8 BGR."""
        return to_uint8(self.filtered(bgr))


@contextmanager
def ieee_fp32_convolutions() -> Iterator[None]:
    """cuDNN's float32 convolutions in full float32 while inside, whatever the process's setting.

    PyTorch lets cuDNN run float32 convolutions in TF32 (a 10-bit mantissa) by default on GPUs that
    have it. That would break the precision policy (docs/model.md §2.4): float32 is the exact mode,
    and in every mode the guided filter's box means (depthwise convolutions) stay float32, because
    ``var_x = E[x²] - E[x]²`` cancels and a 10-bit mantissa leaves mostly noise. The setting is
    process-wide; the generator runs on its device's one worker thread, so nothing interleaves.

    It goes through ``torch.backends.cudnn.allow_tf32``, which sets cuDNN's convolution and RNN
    precisions together. Setting only the convolutions' through the newer per-operator API
    (``torch.backends.cudnn.conv.fp32_precision``) leaves the two different, and then reading
    ``allow_tf32`` raises (Inductor reads it). Only if someone already left them different is the
    per-operator setting used.
    """
    cudnn: Any = torch.backends.cudnn
    try:
        allowed = cudnn.allow_tf32
    except RuntimeError:  # mixed per-operator settings: keep to the per-operator API
        before = cudnn.conv.fp32_precision
        cudnn.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            cudnn.conv.fp32_precision = before
        return
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = allowed


def check_size(bgr: Tensor) -> None:
    """Raise :class:`InputShapeError` unless ``bgr`` is (N, 3, H, W) with H, W multiples of 4."""
    if bgr.dim() != 4 or bgr.shape[1] != 3:
        raise InputShapeError(f"generator input must be (N, 3, H, W) BGR, got shape {tuple(bgr.shape)}")
    h, w = bgr.shape[-2:]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == 0 or w == 0:
        raise InputShapeError(
            f"generator input height and width must be positive multiples of {SIZE_MULTIPLE}, got {h}×{w}; "
            "pad first (see inference.dctnet.pad_to_multiple)"
        )


def pad_to_multiple(bgr: Tensor, multiple: int, value: float = 255.0) -> Tensor:
    """Pad (N, C, H, W) at the bottom/right with ``value`` so H and W are multiples of ``multiple``.

    Unlike upstream's ``padTo16x`` this adds nothing to a dimension that already fits; the padded
    border is cropped off after the pass either way.
    """
    h, w = bgr.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return bgr
    return F.pad(bgr, (0, pw, 0, ph), value=value)


def tf_to_torch_name(tf_name: str) -> str:
    """``generator/block_0/conv1/weights`` → ``block_0.conv1.weight``."""
    scope, _, leaf = tf_name.removeprefix(TF_SCOPE + "/").rpartition("/")
    return f"{scope.replace('/', '.')}.{'weight' if leaf == 'weights' else 'bias'}"


#: Metadata keys written by the converter into each safetensors file.
META_EPS: Final = "eps"


def load_generator(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> DCTNetGenerator:
    """Build a generator from a converted safetensors file (see :mod:`inference.convert`).

    The file's metadata carries the guided-filter eps read from the source graph. Weights go to
    ``device`` in ``dtype``; the module is returned in eval mode with gradients off.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        eps = float(json.loads(meta[META_EPS]))
    except (KeyError, ValueError) as exc:
        raise ConversionError(f"{path}: metadata has no valid '{META_EPS}'; re-run the converter") from exc
    model = DCTNetGenerator(eps=eps)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{path}: tensors missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()
