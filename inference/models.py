"""Resident models: each configured style's two generators and its mask, loaded once on a device.

The service builds one :class:`ModelStore` at start-up (in its lifespan), loads the configured styles
into it and warms each generator up; requests then only read from it. Loading a style resolves its
weights (:mod:`inference.weights`), builds runners for the head and the background network on the
backend the setting names or, for ``auto``, the one measured fastest within the precision's accuracy
bound (:mod:`inference.backends`), and decodes ``alpha.jpg`` into the 288×288 float mask upstream uses.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import numpy as np
import torch
from PIL import Image

from inference.backends import (
    INT8_MAX_MEAN,
    WIN_MARGIN,
    BackendDecision,
    BackendSetting,
    Runner,
    build_runners,
)
from inference.errors import ConfigurationError, ToonserveError
from inference.styles import get_style
from inference.weights import StyleWeights, local_fingerprint, resolve, weights_version

log = logging.getLogger(__name__)

#: Side of the aligned head crop and of the blending mask (docs/model.md §4).
HEAD_CROP: Final = 288
#: Size of the warm-up input: big enough to create the kernels, small enough to be quick.
_WARMUP_SIZE: Final = 64


def load_mask(path: Path, size: int = HEAD_CROP) -> np.ndarray:
    """``alpha.jpg`` as upstream reads it: resized to size×size (area filter), grey, float32 in [0, 1]."""
    with Image.open(path) as im:
        grey = im.convert("L")
        if grey.size != (size, size):
            grey = grey.resize((size, size), Image.Resampling.BOX)
        return np.asarray(grey, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class LoadedStyle:
    """One style resident on a device."""

    name: str
    head: Runner
    bg: Runner
    #: (288, 288) float32 in [0, 1] on the device.
    mask: torch.Tensor
    weights: StyleWeights
    load_ms: float
    #: What identifies these weights (a digest of the converted generators and the mask): results
    #: cached or tagged under one version are never served under another.
    version: str = ""
    #: Which backend runs the generators, and what decided it (:mod:`inference.backends`).
    backend: BackendDecision | None = None
    #: The generators' precision and why: the store's, or int8 where ``auto`` weighed it for these
    #: weights and picked it (:attr:`ModelStore.consider_int8`). None: the store's (callers that build
    #: a style by hand).
    precision: DtypeChoice | None = None


def parse_device(spec: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` (CUDA when available) → a device, checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigurationError(f"invalid device {spec!r}: use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device {spec!r} requested but CUDA is not available in this build/machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigurationError(f"unsupported device {spec!r}: use cpu, cuda, cuda:N or auto")
    return device


DtypeName = Literal["float32", "bfloat16", "float16", "int8"]
#: Generator precisions by name: float32 is exact to the official graphs; the others are faster.
#: ``int8`` is the U-Net in 8-bit integers, statically quantized (:mod:`inference.quantize`), run by
#: ONNX Runtime; the other three are torch dtypes of the convolutions (:mod:`inference.dctnet`).
DTYPES: Final[dict[DtypeName, torch.dtype]] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}


#: The dtype setting: a precision by name, or ``auto`` (:func:`choose_dtype`).
DtypeSetting = Literal["auto", DtypeName]
DEFAULT_DTYPE: Final[DtypeSetting] = "auto"
#: What each value of the setting means, for the settings' description (and so the README's table
#: and ``toonserve --help``): one place says it.
DTYPE_MEANINGS: Final[dict[DtypeSetting, str]] = {
    "auto": "the fastest accurate one on this device; on a CPU with 8-bit dot products and the "
    "onnxruntime extra, int8 for a style whose int8 graphs measure under one level from float32 on "
    "average and faster (docs/int8.md)",
    "float32": "exact to the official model",
    "bfloat16": "CPUs with bfloat16 hardware and GPUs, within about a level",
    "float16": "GPUs with tensor cores, within about a level",
    "int8": "8-bit integers on ONNX Runtime, CPU only, needs the onnxruntime extra (docs/int8.md)",
}


def describe_dtypes() -> str:
    """The dtype setting's choices and what each means, in one sentence (the settings' description)."""
    return "; ".join(f"{name}: {meaning}" for name, meaning in DTYPE_MEANINGS.items()) + "."


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]  # type: ignore[index]
    except KeyError:
        raise ConfigurationError(f"invalid dtype {name!r}: use one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class DtypeChoice:
    """The generators' precision and why it was chosen."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16), where oneDNN's bfloat16
    convolutions are fast; elsewhere they are emulated and slower than float32."""
    try:
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    except (AttributeError, RuntimeError):  # older torch: ask for the two features one by one
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def int8_cpu() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), on
    which ONNX Runtime's int8 convolutions are fast; elsewhere they run on slower instruction pairs."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni") or caps.get("amx_int8"))


@dataclass(frozen=True)
class Int8Evidence:
    """What ``auto`` must know before it may pick int8: on these weights and this machine, its mean
    deviation from float32 (levels 0–255, over both networks) and its pass against the pass of the
    precision ``auto`` picks otherwise, on the same image (:func:`inference.quantize.measure`)."""

    mean_levels: float
    int8_ms: float
    other_ms: float
    #: What was measured, for the reason (photos, sizes).
    measured_on: str = ""


def choose_dtype(
    setting: str, device: torch.device, backend: str = "auto", int8: Int8Evidence | None = None
) -> DtypeChoice:
    """The precision for ``setting`` on ``device``: the one named, or for ``auto`` the fastest one
    that is accurate there (measurements in docs/model.md §2.4 and the README's Performance), float32
    when ``backend`` is ``onnxruntime`` (the only float precision toonserve runs it in).

    int8 is opt in: ``auto`` picks it only given ``int8`` evidence with a mean deviation under
    :data:`~inference.backends.INT8_MAX_MEAN` level and a pass faster than the other choice's by
    :data:`~inference.backends.WIN_MARGIN`, on a CPU, where ONNX Runtime can run it (docs/int8.md).
    """
    if setting == "int8":
        dtype = parse_dtype(setting)
        if device.type != "cpu":
            raise ConfigurationError(
                f"TOONSERVE_DTYPE=int8 runs on the CPU only (ONNX Runtime's CPU provider), not on {device}"
            )
        why = "8-bit integers on ONNX Runtime's quantized graph, docs/int8.md"
        if not int8_cpu():
            why += "; this CPU has no VNNI or AMX-INT8, where int8 may be no faster than float32"
        return DtypeChoice(dtype, f"set by TOONSERVE_DTYPE ({why})")
    choice = _choose_float(setting, device, backend)
    if setting != "auto" or int8 is None or device.type != "cpu" or backend not in ("auto", "onnxruntime"):
        return choice
    return _with_int8(choice, int8)


def int8_unconsidered(setting: str, device: torch.device, backend: str) -> str | None:
    """Why ``auto`` does not weigh int8 for the styles it loads here; None when it does
    (:attr:`ModelStore.consider_int8`): the precision is ``auto``, on a CPU with 8-bit dot products
    (:func:`int8_cpu`), the backend ``auto`` and ONNX Runtime installed."""
    from inference.ort import missing_runtime

    if setting != "auto":
        return f"TOONSERVE_DTYPE={setting}"
    if device.type != "cpu":
        return "int8 runs on the CPU only"
    if backend != "auto":
        return f"TOONSERVE_BACKEND={backend}"
    if not int8_cpu():
        return "this CPU has no VNNI or AMX-INT8, where int8 is no faster than float32"
    return missing_runtime()


def _with_int8(choice: DtypeChoice, int8: Int8Evidence) -> DtypeChoice:
    """``auto``'s choice once int8 has been measured: int8 only under one level and faster."""
    where = f" ({int8.measured_on})" if int8.measured_on else ""
    if int8.mean_levels >= INT8_MAX_MEAN:
        return DtypeChoice(
            choice.dtype,
            f"{choice.reason}; int8 not picked: mean deviation {int8.mean_levels:.2f} level{where}, "
            f"not under {INT8_MAX_MEAN:g}",
        )
    gain = 1 - int8.int8_ms / int8.other_ms if int8.other_ms > 0 else 0.0
    if gain < WIN_MARGIN:
        return DtypeChoice(
            choice.dtype,
            f"{choice.reason}; int8 not picked: {int8.int8_ms:.0f} ms against {int8.other_ms:.0f} ms for "
            f"{choice.name}, not {WIN_MARGIN:.0%} faster",
        )
    return DtypeChoice(
        torch.int8,
        f"auto: int8 measured within {int8.mean_levels:.2f} level of float32 on average{where}, "
        f"{gain:.0%} faster than {choice.name} ({int8.int8_ms:.0f} against {int8.other_ms:.0f} ms)",
    )


def _choose_float(setting: str, device: torch.device, backend: str) -> DtypeChoice:
    if setting == "auto" and backend == "onnxruntime":
        return DtypeChoice(
            torch.float32,
            "auto: TOONSERVE_BACKEND=onnxruntime runs float32 only (exact), unless TOONSERVE_DTYPE=int8 asks "
            "for its quantized graph",
        )
    if setting != "auto":
        dtype = parse_dtype(setting)
        why = "exact to the official graphs" if dtype == torch.float32 else "faster, within about a level"
        return DtypeChoice(dtype, f"set by TOONSERVE_DTYPE ({why})")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 7:
            return DtypeChoice(
                torch.float16,
                f"auto: a GPU with tensor cores (compute capability {major}.{minor}); float16 runs as fast "
                "as bfloat16 there and keeps three more mantissa bits",
            )
        return DtypeChoice(
            torch.float32, f"auto: compute capability {major}.{minor} has no tensor cores; float32 (exact)"
        )
    if native_bf16_cpu():
        return DtypeChoice(
            torch.bfloat16,
            "auto: this CPU computes bfloat16 in hardware (AMX or AVX512-BF16); about 3.6× the speed of "
            "float32, within 0.14 level on average",
        )
    return DtypeChoice(
        torch.float32,
        "auto: this CPU has no bfloat16 hardware (no AMX, no AVX512-BF16), where bfloat16 is emulated "
        "and slower than float32; float32 is also the exact mode",
    )


@dataclass
class ModelStore:
    """The styles loaded on one device, and why the others are not."""

    device: torch.device
    dtype: torch.dtype
    cache_dir: Path
    model_dir: Path | None = None
    allow_download: bool = True
    #: ``TOONSERVE_BACKEND``: a backend by name, or ``auto`` (measured per style at load).
    backend: BackendSetting = "auto"
    #: Why this precision (see :func:`choose_dtype`).
    dtype_reason: str = "set by the caller"
    #: ``auto`` weighs int8 for each style as it loads (:func:`int8_unconsidered` is None): measured
    #: on its weights (:func:`inference.quantize.evidence`), picked under :func:`choose_dtype`'s rule,
    #: the store's precision kept otherwise. That style's :attr:`LoadedStyle.precision` says which.
    consider_int8: bool = False
    styles: dict[str, LoadedStyle] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self, name: str) -> LoadedStyle:
        """Resolve, load and warm up ``name`` (idempotent). Raises the domain error on failure."""
        get_style(name)
        with self._lock:
            if name in self.styles:
                return self.styles[name]
            start = time.perf_counter()
            weights = resolve(name, self.cache_dir, self.model_dir, self.allow_download)
            version = weights_version(weights)
            precision = self._precision(weights)
            runners = build_runners(weights, self.device, precision.dtype, self.backend, version=version)
            head, bg = runners.head, runners.bg
            mask = torch.from_numpy(load_mask(weights.mask)).to(self.device)
            for runner in (head, bg):
                runner(torch.full((1, 3, _WARMUP_SIZE, _WARMUP_SIZE), 128, dtype=torch.uint8))
            ms = (time.perf_counter() - start) * 1000
            loaded = LoadedStyle(name, head, bg, mask, weights, ms, version, runners.decision, precision)
            self.styles[name] = loaded
            log.info(
                "style %s loaded on %s (%s, %s backend) from %s in %.0f ms",
                name, self.device, precision.name, head.backend, weights.source, loaded.load_ms,
            )  # fmt: skip
            return loaded

    def _precision(self, weights: StyleWeights) -> DtypeChoice:
        """The store's precision, or int8 for these weights where ``auto`` weighs it and its rule
        holds (:attr:`consider_int8`). A measurement that cannot be made (a package missing, an
        export failing) keeps the store's precision and says why."""
        chosen = DtypeChoice(self.dtype, self.dtype_reason)
        if not self.consider_int8:
            return chosen
        from inference import quantize

        try:
            found = quantize.evidence(weights, self.dtype)
        except Exception as exc:  # any engine's or exporter's error: int8 is out, not the style
            if not isinstance(exc, ToonserveError):
                log.warning("style %s: int8 could not be measured", weights.style, exc_info=True)
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.info("style %s: int8 not considered: %s", weights.style, why)
            return DtypeChoice(self.dtype, f"{self.dtype_reason}; int8 not considered: {why}")
        return _with_int8(chosen, found)

    def precision_of(self, name: str) -> DtypeChoice:
        """The precision a loaded style runs in, and why (the store's unless ``auto`` picked int8 for
        it); the store's for a style not loaded."""
        loaded = self.styles.get(name)
        if loaded is not None and loaded.precision is not None:
            return loaded.precision
        return DtypeChoice(self.dtype, self.dtype_reason)

    def weights_on_disk(self, name: str) -> tuple[object, ...] | None:
        """A cheap fingerprint of ``name``'s weights on disk (:func:`local_fingerprint`), None if none."""
        return local_fingerprint(name, self.cache_dir, self.model_dir)

    def get(self, name: str) -> LoadedStyle:
        """A loaded style; :class:`UnknownStyleError` for unknown names, StyleNotLoadedError if not loaded."""
        get_style(name)
        try:
            return self.styles[name]
        except KeyError:
            raise StyleNotLoadedError(f"style {name!r} is not loaded on {self.device}") from None

    def release(self) -> None:
        """Drop every model (shutdown); frees device memory once nothing else holds them."""
        with self._lock:
            self.styles.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class StyleNotLoadedError(ToonserveError):
    """A known style that this process has not loaded (not configured, or its weights failed)."""
