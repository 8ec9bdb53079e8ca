"""Generator backends, and how ``auto`` picks one by measuring.

A backend runs a style's two generators behind one interface (:class:`Runner`, the contract of
:meth:`inference.dctnet.GeneratorRunner.__call__`):

* ``onednn``: torch, fused oneDNN primitives (CPU; float32, and bfloat16/float16 where oneDNN has them);
* ``eager``: torch, the module's own ops (any device, any dtype; the reference);
* ``onnxruntime``: ONNX Runtime's CPU provider on the exported official graph (:mod:`inference.ort`;
  float32, needs the ``onnxruntime`` extra, and the ``onnx`` extra to export), or in int8 on that
  graph quantized (:mod:`inference.quantize`, docs/int8.md; the only backend that runs int8).

``auto`` decides when a style loads (:func:`build_runners`), for the precision already chosen: every
candidate that can run here is held to that precision's accuracy bound against the ``eager``
float32 output on a synthetic photo-like image of :data:`MEASURE_SIDE`² (both generators), the ones
that pass run the background generator :data:`MEASURE_ROUNDS` times each, in turns, and the
fastest median wins, except that the first passing candidate of :data:`CANDIDATES` (the choice
``auto`` made before it measured) is kept unless another beats it by :data:`WIN_MARGIN`.
:class:`BackendDecision` records the choice, every median and why any candidate was left out. A
process times once per device, precision and thread count, as the cost model's anchors: every style
has the same networks; a further style only has the chosen backend's accuracy checked on its weights.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal, Protocol

import torch
from torch import Tensor

from inference.dctnet import GeneratorRunner, load_generator, onednn_usable
from inference.errors import ConfigurationError, ToonserveError
from inference.weights import StyleWeights

log = logging.getLogger(__name__)

BackendName = Literal["onednn", "eager", "onnxruntime"]
#: The backend setting (``TOONSERVE_BACKEND``): one by name, or ``auto``.
BackendSetting = Literal["auto", "onednn", "eager", "onnxruntime"]
BACKEND_SETTINGS: Final[tuple[BackendSetting, ...]] = ("auto", "onednn", "eager", "onnxruntime")
#: ``auto``'s candidates, in its order of preference before measuring (the first one that passes is
#: the incumbent that another must beat by :data:`WIN_MARGIN`).
CANDIDATES: Final[tuple[BackendName, ...]] = ("onednn", "eager", "onnxruntime")
#: Side of the square image ``auto`` measures on: the head network's real input (every face crop is
#: 288×288), and large enough that fixed per-call costs no longer count (at 64² ONNX Runtime took
#: 0.72× ``onednn``'s time, from 128² up 0.85–1.05× depending on its memory settings, docs/model.md
#: §8.5). One pass costs about 130 ms in float32 and 65 ms in bfloat16 on 2 cores.
MEASURE_SIDE: Final = 288
#: Timed runs of each passing candidate, after its accuracy run (which also warms it up).
MEASURE_ROUNDS: Final = 3
#: The timed rounds stop after this many seconds (the round under way finishes, one always runs): on
#: a machine busy with other work a pass can take ten times as long, and start-up should not.
MEASURE_BUDGET_S: Final = 2.0
#: How much faster than the incumbent another candidate must be to be chosen. Medians of three runs
#: on a busy machine move by a few per cent; without a margin two backends within noise of each
#: other (float32 ``onednn`` and ``eager`` on CPU, bfloat16 likewise) would swap from start to start.
WIN_MARGIN: Final = 0.05
#: float32 must stay the exact mode: at least this share of uint8 values identical to ``eager``
#: float32 and none more than :data:`FP32_MAX_LEVELS` off (as the export check, docs/model.md §8.4).
FP32_MIN_IDENTICAL: Final = 0.999
FP32_MAX_LEVELS: Final = 1
#: The fast modes' bound against float32 (``test_bf16_close_to_fp32``, docs/model.md §2.4).
REDUCED_MAX_MEAN: Final = 1.0
REDUCED_MAX_LEVELS: Final = 16
#: int8's bound against float32 (docs/int8.md): a mean *under* one level, and the fast modes' max.
#: ``auto`` never picks int8 off it (:func:`inference.models.choose_dtype`).
INT8_MAX_MEAN: Final = 1.0


class Runner(Protocol):
    """What the pipeline calls: (N, 3, H, W) BGR 0..255 (uint8 or float), H and W multiples of 4 →
    (N, 3, H, W) uint8 BGR 0..254 on ``device``."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def backend(self) -> str: ...

    def __call__(self, bgr: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Accuracy:
    """A backend's uint8 outputs against ``eager`` float32's on the same inputs."""

    identical: float
    mean_levels: float
    max_levels: int

    def failure(self, dtype: torch.dtype) -> str | None:
        """Why this misses ``dtype``'s bound, or None when it meets it."""
        if dtype == torch.float32:
            if self.identical >= FP32_MIN_IDENTICAL and self.max_levels <= FP32_MAX_LEVELS:
                return None
            bound = f"float32 needs ≥ {FP32_MIN_IDENTICAL:.1%} identical and at most {FP32_MAX_LEVELS} level"
        elif dtype == torch.int8:
            if self.mean_levels < INT8_MAX_MEAN and self.max_levels <= REDUCED_MAX_LEVELS:
                return None
            bound = f"int8 needs a mean under {INT8_MAX_MEAN:g} and a max ≤ {REDUCED_MAX_LEVELS} levels"
        else:
            if self.mean_levels <= REDUCED_MAX_MEAN and self.max_levels <= REDUCED_MAX_LEVELS:
                return None
            bound = (
                f"{_name(dtype)} needs a mean ≤ {REDUCED_MAX_MEAN:g} and a max ≤ {REDUCED_MAX_LEVELS} levels"
            )
        return f"too far from eager float32: {self.describe()} ({bound})"

    def describe(self) -> str:
        return f"{self.identical:.3%} identical, mean {self.mean_levels:.3f}, max {self.max_levels} levels"


def compare(outputs: Sequence[Tensor], references: Sequence[Tensor]) -> Accuracy:
    """The uint8 ``outputs`` against ``references`` (same shapes), all values together."""
    diff = torch.cat(
        [(o.int().cpu() - r.int().cpu()).abs().flatten() for o, r in zip(outputs, references, strict=True)]
    )
    return Accuracy(float((diff == 0).double().mean()), float(diff.double().mean()), int(diff.max()))


@dataclass(frozen=True)
class BackendDecision:
    """Which backend runs a style's generators, and what decided it."""

    backend: BackendName
    #: Why, for a person.
    reason: str
    #: Median ms of one background pass at ``size`` per candidate timed (empty when none was).
    times_ms: dict[str, float] = field(default_factory=dict)
    #: Candidates left out, and why (not usable here, not installed, failed, too inaccurate).
    excluded: dict[str, str] = field(default_factory=dict)
    #: Each checked candidate's accuracy against ``eager`` float32.
    accuracy: dict[str, Accuracy] = field(default_factory=dict)
    #: (height, width) of the measurement, or None when nothing ran.
    size: tuple[int, int] | None = None
    #: What deciding cost at load (building every candidate, exports included, and their runs).
    cost_ms: float = 0.0

    def describe(self) -> str:
        times = ", ".join(f"{name} {ms:.1f} ms" for name, ms in self.times_ms.items())
        excluded = "; ".join(f"{name}: {why}" for name, why in self.excluded.items())
        where = f" at {self.size[0]}×{self.size[1]}" if self.size and times else ""
        return (
            f"{self.backend} ({self.reason})"
            + (f"; medians{where}: {times}" if times else "")
            + (f"; excluded: {excluded}" if excluded else "")
            + (f"; decided in {self.cost_ms / 1000:.1f} s" if self.cost_ms else "")
        )


@dataclass(frozen=True)
class Candidate:
    """One backend's runners for a style's head and background generators."""

    name: BackendName
    head: Runner
    bg: Runner


@dataclass(frozen=True)
class StyleRunners:
    """A style's generators on the backend chosen, and the decision."""

    head: Runner
    bg: Runner
    decision: BackendDecision


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unavailable(name: BackendName, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run ``dtype`` on ``device`` here, or None when it can (the
    ``onnx`` extra, needed only when no graph is cached, is checked when the graph is made)."""
    if dtype == torch.int8 and name != "onnxruntime":
        return "int8 runs on ONNX Runtime's quantized graph only (docs/int8.md), not on torch"
    if name == "onednn" and not onednn_usable(device, dtype):
        if device.type != "cpu":
            return "oneDNN runs on the CPU only"
        return f"oneDNN has no {_name(dtype)} convolutions on this CPU (or torch was built without it)"
    if name == "onnxruntime":
        if device.type != "cpu":
            return "toonserve runs ONNX Runtime on its CPU provider only"
        if dtype not in (torch.float32, torch.int8):
            return (
                f"ONNX Runtime runs float32 and int8 only here, not {_name(dtype)}: its CPU provider has "
                "no bfloat16 kernels, and its float16 was slower than float32 (docs/model.md §8.5)"
            )
        from inference.ort import missing_runtime

        return missing_runtime()
    return None


def check_setting(setting: BackendSetting, device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`ConfigurationError` when the backend named by ``setting`` cannot run here, or
    when ``auto`` has no candidate for ``dtype`` (int8 without ONNX Runtime)."""
    if setting == "auto":
        if dtype == torch.int8:
            why = unavailable("onnxruntime", device, dtype)
            if why is not None:
                raise ConfigurationError(f"TOONSERVE_DTYPE=int8 cannot run on {device}: {why}")
        return
    if setting not in BACKEND_SETTINGS:
        raise ConfigurationError(f"invalid backend {setting!r}: use one of {', '.join(BACKEND_SETTINGS)}")
    why = unavailable(setting, device, dtype)
    if why is not None:
        raise ConfigurationError(f"TOONSERVE_BACKEND={setting} cannot run {_name(dtype)} on {device}: {why}")


def build(
    name: BackendName, weights: StyleWeights, device: torch.device, dtype: torch.dtype, cache: bool = True
) -> Candidate:
    """Backend ``name``'s runners for ``weights`` in ``dtype`` (no accuracy check: see :func:`build_runners`).
    ``cache``: ONNX Runtime's graphs may be read from and written beside the converted weights."""
    if name == "onnxruntime" and dtype == torch.int8:
        return Candidate(name, _int8_runner(weights.head, cache), _int8_runner(weights.bg, cache))
    if name == "onnxruntime":
        return Candidate(name, _ort_runner(weights.head, cache), _ort_runner(weights.bg, cache))
    return Candidate(
        name,
        GeneratorRunner(load_generator(weights.head, device, dtype), name),
        GeneratorRunner(load_generator(weights.bg, device, dtype), name),
    )


def _ort_runner(weights: Path, cache: bool) -> Runner:
    """ONNX Runtime on the graph of ``weights``; a cached graph that does not load is exported again."""
    from inference.ort import OnnxRuntimeRunner, forget, graph

    data, origin = graph(weights, cache=cache)
    try:
        return OnnxRuntimeRunner(data)
    except Exception:
        if not origin.startswith("cached"):
            raise
        log.warning("the %s graph does not load; exporting it again", origin, exc_info=True)
        forget(weights)
        return OnnxRuntimeRunner(graph(weights, cache=cache)[0])


def _int8_runner(weights: Path, cache: bool) -> Runner:
    """ONNX Runtime on the int8 graph of ``weights`` (:func:`inference.quantize.int8_graph`); a cached
    graph that does not load is made again. What cannot be made here (no ONNX Runtime, no ``onnx``
    to export and edit the graph, no calibration photos) is a :class:`ConfigurationError` that says
    what to install."""
    from inference.ort import INT8_KEEP_PIXELS, OnnxRuntimeRunner
    from inference.quantize import QuantizationError, forget, int8_graph

    try:
        data, origin = int8_graph(weights, cache=cache)
    except QuantizationError as exc:
        raise ConfigurationError(f"TOONSERVE_DTYPE=int8: {exc}") from exc
    try:
        return OnnxRuntimeRunner(data, dtype=torch.int8, keep_pixels=INT8_KEEP_PIXELS)
    except Exception:
        if not origin.startswith("cached"):
            raise
        log.warning("the %s int8 graph does not load; quantizing it again", origin, exc_info=True)
        forget(weights)
        data = int8_graph(weights, cache=cache)[0]
        return OnnxRuntimeRunner(data, dtype=torch.int8, keep_pixels=INT8_KEEP_PIXELS)


def measure_image(side: int = MEASURE_SIDE) -> Tensor:
    """The measurement input: (1, 3, side, side) uint8 BGR with smooth areas, edges and noise
    (:func:`inference.export.check_image`), deterministic."""
    from inference.export import check_image

    return torch.from_numpy(check_image(side, side)).permute(2, 0, 1)[None].to(torch.uint8).contiguous()


def choose(
    candidates: Sequence[Candidate],
    reference: Candidate,
    dtype: torch.dtype,
    *,
    excluded: Mapping[str, str] | None = None,
    image: Tensor | None = None,
    rounds: int = MEASURE_ROUNDS,
    margin: float = WIN_MARGIN,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Candidate, BackendDecision]:
    """The candidate ``auto`` keeps, and the decision (module docstring).

    ``reference``: ``eager`` float32 on the same device (it may be one of ``candidates``: its
    outputs are then reused). ``image``: (1, 3, H, W) uint8 BGR; the background runner gets it as
    uint8, the head runner as float32 (as the pipeline feeds them). ``excluded``: candidates already
    left out, and why. When none meets the bound, the closest is kept (and the reason says so);
    raises :class:`ConfigurationError` when none runs at all.
    """
    image = measure_image() if image is None else image
    inputs = (image, image.float())
    left_out = dict(excluded or {})
    outputs: dict[int, tuple[Tensor, Tensor]] = {}

    def run(candidate: Candidate) -> tuple[Tensor, Tensor]:
        if id(candidate) not in outputs:
            outputs[id(candidate)] = (candidate.bg(inputs[0]), candidate.head(inputs[1]))
        return outputs[id(candidate)]

    expected = run(reference)
    accuracy: dict[str, Accuracy] = {}
    passing: list[Candidate] = []
    for candidate in candidates:
        try:
            got = run(candidate)
        except Exception as exc:  # any engine's own error types: this candidate is out, not the style
            left_out[candidate.name] = f"failed: {type(exc).__name__}: {_first_line(exc)}"
            log.warning("backend %s failed its accuracy run", candidate.name, exc_info=True)
            continue
        accuracy[candidate.name] = compare(got, expected)
        why = accuracy[candidate.name].failure(dtype)
        if why is None:
            passing.append(candidate)
        else:
            left_out[candidate.name] = why
    size = (int(image.shape[-2]), int(image.shape[-1]))
    if not accuracy:
        raise ConfigurationError(
            "no generator backend runs here: " + "; ".join(f"{name}: {why}" for name, why in left_out.items())
        )
    if not passing:
        # The precision was chosen (or set) before the backend; it is not the backend's to refuse.
        # Serve with the closest, and say so.
        closest = min(
            (c for c in candidates if c.name in accuracy), key=lambda c: accuracy[c.name].mean_levels
        )
        reason = (
            f"auto: no candidate met the {_name(dtype)} accuracy bound on the test image; {closest.name} "
            f"came closest{'; TOONSERVE_DTYPE=float32 is exact' if dtype != torch.float32 else ''}"
        )
        log.error("%s: %s", reason, "; ".join(f"{name}: {why}" for name, why in left_out.items()))
        return closest, BackendDecision(closest.name, reason, {}, left_out, accuracy, size)
    if len(passing) == 1:
        only = passing[0]
        reason = f"auto: the only candidate that runs {_name(dtype)} here within its accuracy bound"
        return only, BackendDecision(only.name, reason, {}, left_out, accuracy, size)
    times = time_passes(passing, inputs[0], rounds, clock)
    incumbent = passing[0].name
    winner, reason = decide(times, incumbent, margin)
    chosen = next(c for c in passing if c.name == winner)
    return chosen, BackendDecision(chosen.name, reason, times, left_out, accuracy, size)


def time_passes(
    passing: Sequence[Candidate],
    image: Tensor,
    rounds: int = MEASURE_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms of each candidate's background pass on ``image``. The candidates take turns, each
    round starting with the next one, so that a slow spell of the machine (other processes, clock
    changes) falls on all of them rather than on one; no round starts after
    :data:`MEASURE_BUDGET_S`."""
    samples: dict[str, list[float]] = {c.name: [] for c in passing}
    began = clock()
    for r in range(rounds):
        if r and clock() - began > MEASURE_BUDGET_S:
            break
        for k in range(len(passing)):
            candidate = passing[(r + k) % len(passing)]
            start = clock()
            candidate.bg(image)
            samples[candidate.name].append((clock() - start) * 1000)
    return {name: round(statistics.median(times), 1) for name, times in samples.items()}


def decide(times_ms: Mapping[str, float], incumbent: str, margin: float = WIN_MARGIN) -> tuple[str, str]:
    """The backend kept for these median times, and why: the fastest, unless it is ``incumbent`` or
    does not beat ``incumbent`` by ``margin`` (a share of the incumbent's time)."""
    fastest = min(times_ms, key=lambda name: times_ms[name])
    base = times_ms[incumbent]
    if fastest == incumbent:
        return incumbent, "auto: the fastest of the candidates within the accuracy bound"
    gain = 1 - times_ms[fastest] / base
    if gain >= margin:
        return fastest, f"auto: the fastest within the accuracy bound, {gain:.0%} faster than {incumbent}"
    return incumbent, (
        f"auto: {fastest} was only {gain:.1%} faster than {incumbent} (less than the {margin:.0%} it "
        f"must win by), so {incumbent} is kept"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


@dataclass
class _Measured:
    """What ``auto`` measured in this process for a device, precision and thread count: the first
    style's decision, and each style's own (its accuracy checked) by weights version."""

    style: str
    decision: BackendDecision
    by_version: dict[str, BackendDecision]


_measured: dict[tuple[str, str, int], _Measured] = {}
_measured_lock = threading.Lock()


def build_runners(
    weights: StyleWeights,
    device: torch.device,
    dtype: torch.dtype,
    setting: BackendSetting = "auto",
    *,
    version: str = "",
    cache: bool = True,
) -> StyleRunners:
    """A style's runners on the backend ``setting`` names, or for ``auto`` the one measured fastest
    within ``dtype``'s accuracy bound (module docstring).

    ``auto`` times the candidates once per process for a device, dtype and thread count: every style
    has the same two networks, so the times do not depend on the style. A further style (another
    ``version`` of weights, :func:`inference.weights.weights_version`) only has the chosen backend's
    accuracy checked on its own weights (about a third of the cost), and is measured in full if that
    fails. ``cache``: ONNX graphs may be read from and written beside the converted weights
    (:func:`inference.ort.graph`). Raises :class:`ConfigurationError` when the backend named cannot
    run here (which extra to install) or fails its accuracy check.
    """
    start = time.perf_counter()
    if setting != "auto":
        check_setting(setting, device, dtype)
        return _explicit(setting, weights, device, dtype, cache, start)
    version = version or f"{weights.head}|{weights.bg}"
    key = (str(device), _name(dtype), torch.get_num_threads())
    with _measured_lock:
        known = _measured.get(key)
    if known is not None:
        reused = _reuse(known, weights, device, dtype, version, cache, start)
        if reused is not None:
            return reused
    chosen, decision = _measure(weights, device, dtype, cache)
    decision = _with_cost(decision, start)
    with _measured_lock:
        _measured[key] = _Measured(weights.style, decision, {version: decision})
    log.info("style %s: generator backend %s", weights.style, decision.describe())
    return StyleRunners(chosen.head, chosen.bg, decision)


def _measure(
    weights: StyleWeights, device: torch.device, dtype: torch.dtype, cache: bool
) -> tuple[Candidate, BackendDecision]:
    """Build every candidate that can run here and :func:`choose`."""
    excluded: dict[str, str] = {}
    candidates: list[Candidate] = []
    for name in CANDIDATES:
        why = unavailable(name, device, dtype)
        if why is None:
            try:
                candidates.append(build(name, weights, device, dtype, cache))
            except Exception as exc:  # an export or a session that fails: not a candidate
                why = f"failed: {type(exc).__name__}: {_first_line(exc)}"
                if not isinstance(exc, ToonserveError):
                    log.warning("backend %s could not be built", name, exc_info=True)
        if why is not None:
            excluded[name] = why
    reference = next((c for c in candidates if c.name == "eager" and dtype == torch.float32), None)
    if reference is None:
        reference = build("eager", weights, device, torch.float32, cache)
    chosen, decision = choose(candidates, reference, dtype, excluded=excluded)
    if "onnxruntime" in decision.excluded and "onnxruntime" in decision.accuracy and cache:
        _forget_graphs(weights, dtype)  # a cached graph that fails its check is exported again next time
    return chosen, decision


def _reuse(
    known: _Measured,
    weights: StyleWeights,
    device: torch.device,
    dtype: torch.dtype,
    version: str,
    cache: bool,
    start: float,
) -> StyleRunners | None:
    """The backend measured for an earlier style, for these weights, if it builds and (for weights
    not seen yet) meets the bound on them; None to measure in full."""
    name = known.decision.backend
    try:
        chosen = build(name, weights, device, dtype, cache)
    except Exception:  # gone since (a file removed, an extra uninstalled): measure again
        log.warning("backend %s no longer builds; measuring again", name, exc_info=True)
        return None
    decision = known.by_version.get(version)
    if decision is None:
        exact = name == "eager" and dtype == torch.float32  # the reference itself
        reference = chosen if exact else build("eager", weights, device, torch.float32, cache)
        accuracy = _check(chosen, reference)
        why = accuracy.failure(dtype)
        if why is not None:
            log.warning("style %s: %s is %s; measuring again", weights.style, name, why)
            return None
        shared = f"timed when style {known.style} loaded: every style has the same networks"
        reason = f"{known.decision.reason} ({shared})"
        decision = _with_cost(replace(known.decision, reason=reason, accuracy={name: accuracy}), start)
        with _measured_lock:
            known.by_version[version] = decision
        log.info("style %s: generator backend %s", weights.style, decision.describe())
    return StyleRunners(chosen.head, chosen.bg, decision)


def _check(candidate: Candidate, reference: Candidate) -> Accuracy:
    """``candidate`` against ``reference`` on the measurement image, both generators."""
    image = measure_image()
    outputs = (candidate.bg(image), candidate.head(image.float()))
    expected = outputs if reference is candidate else (reference.bg(image), reference.head(image.float()))
    return compare(outputs, expected)


def _explicit(
    setting: BackendName,
    weights: StyleWeights,
    device: torch.device,
    dtype: torch.dtype,
    cache: bool,
    start: float,
) -> StyleRunners:
    """The backend named by the setting. torch's two are the reference implementation and run as
    they are; ONNX Runtime's graph is derived (and maybe cached), so it is checked first."""
    try:
        chosen = build(setting, weights, device, dtype, cache)
    except ToonserveError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"TOONSERVE_BACKEND={setting} failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    reason = "set by TOONSERVE_BACKEND"
    if setting != "onnxruntime":
        return StyleRunners(chosen.head, chosen.bg, BackendDecision(setting, reason))
    accuracy = _check(chosen, build("eager", weights, device, torch.float32, cache))
    why = accuracy.failure(dtype)
    if why is not None:
        if cache:
            _forget_graphs(weights, dtype)
        if dtype == torch.int8:
            raise ConfigurationError(
                f"TOONSERVE_DTYPE=int8: the quantized graph is {why}; bfloat16 or float32 serve these weights"
            )
        raise ConfigurationError(f"TOONSERVE_BACKEND=onnxruntime: the ONNX graph is {why}")
    size = (MEASURE_SIDE, MEASURE_SIDE)
    decision = _with_cost(BackendDecision(setting, reason, accuracy={setting: accuracy}, size=size), start)
    log.info("style %s: generator backend %s", weights.style, decision.describe())
    return StyleRunners(chosen.head, chosen.bg, decision)


def _with_cost(decision: BackendDecision, start: float) -> BackendDecision:
    return replace(decision, cost_ms=round((time.perf_counter() - start) * 1000, 1))


def _forget_graphs(weights: StyleWeights, dtype: torch.dtype) -> None:
    """Remove the cached graphs ONNX Runtime ran in ``dtype`` (made again at the next start)."""
    from inference import ort, quantize

    forget = quantize.forget if dtype == torch.int8 else ort.forget
    for path in (weights.head, weights.bg):
        forget(path)
