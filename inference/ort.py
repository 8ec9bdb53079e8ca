"""The ``onnxruntime`` backend: a style's generators run by ONNX Runtime from their exported graphs.

The graph is the one ``toonserve export`` writes (:mod:`inference.export`, docs/model.md §8): the
whole official graph, ``input_image`` float32 (H, W, 3) BGR 0..255 → ``output_image`` uint8
(H, W, 3) BGR 0..254, H and W multiples of 4. :class:`OnnxRuntimeRunner` puts it behind the
interface the pipeline calls (:meth:`inference.dctnet.GeneratorRunner.__call__`): a batch
(N, 3, H, W) BGR 0..255 in, (N, 3, H, W) uint8 BGR out, one graph run per image (the official
graph has no batch axis; on a CPU a batch costs the sum of its images anyway).

Float32, on the CPU: ONNX Runtime's CPU provider has no bfloat16 kernels, and its float16 ran
slower than float32 on our CPUs (docs/model.md §8.5). The same runner runs the graph quantized to
int8 (:mod:`inference.quantize`, docs/int8.md), which keeps its buffers between runs in one arena
shared by the process's int8 sessions (:class:`OnnxRuntimeRunner`).

Where the graph comes from (:func:`graph`): a file beside the converted weights,
``<weights stem>.<digest>.onnx``, whose name carries a digest of the weights file and of
:data:`GRAPH_VERSION`, so new weights or a changed export never meet an old graph; otherwise an
export, written there for the next start. An export traces the generator once per process (about
3–5 s on 2 cores; the traced graph does not depend on the weights) and then only swaps weights in
(tens of milliseconds), so the second generator and every further style cost next to nothing. A
cached graph needs only ``onnxruntime``; an export also needs the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import threading
import uuid
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

from inference.dctnet import check_size, load_generator
from inference.errors import ConfigurationError

log = logging.getLogger(__name__)

#: Part of every cached graph's digest: bump it when what :func:`export_graph` writes changes
#: (the graph module, the exporter's settings), so that no older file is used again.
GRAPH_VERSION: Final = "toonserve-ort-1"
#: Suffix of a cached graph beside the converted weights.
GRAPH_SUFFIX: Final = ".onnx"
#: Hex digits of the digest in a cached file's name.
DIGEST_CHARS: Final = 16
#: Images of at most this many pixels leave the int8 sessions' shared arena as it is, larger ones
#: give it back (:class:`OnnxRuntimeRunner`): a 16:9 photo at the default processing size.
INT8_KEEP_PIXELS: Final = 1280 * 720
#: The packages each extra brings, by what they are needed for.
RUNTIME_PACKAGES: Final = ("onnxruntime",)
EXPORT_PACKAGES: Final = ("onnx", "onnxscript")
_INPUT: Final = "input_image"
_OUTPUT: Final = "output_image"

_trace_lock = threading.Lock()
#: The traced graph (a ``torch.onnx.ONNXProgram``), made once per process, weights swapped per use.
_template: Any = None


def _import(name: str) -> Any:
    """The module, or None when it cannot be imported (not installed, or broken)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def missing_runtime() -> str | None:
    """Why ONNX Runtime cannot run here, with the command that fixes it; None when it can."""
    if _import("onnxruntime") is None:
        return "ONNX Runtime is not installed: pip install 'toonserve[onnxruntime]'"
    return None


def missing_exporter() -> str | None:
    """Why a graph cannot be exported here (the ``onnx`` extra is missing), or None."""
    missing = [name for name in EXPORT_PACKAGES if _import(name) is None]
    if missing:
        return (
            f"exporting the ONNX graph needs {' and '.join(missing)}, which are not installed: "
            "pip install 'toonserve[onnx]'"
        )
    return None


def graph_path(weights: Path) -> Path:
    """Where the graph of the converted generator ``weights`` is cached: beside it, named after a
    digest of its bytes and :data:`GRAPH_VERSION` (``head.safetensors`` → ``head.<16 hex>.onnx``)."""
    digest = hashlib.sha256(GRAPH_VERSION.encode())
    with weights.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return weights.with_name(f"{weights.stem}.{digest.hexdigest()[:DIGEST_CHARS]}{GRAPH_SUFFIX}")


def export_graph(weights: Path) -> bytes:
    """The serialised ONNX graph (docs/model.md §8) of the converted generator ``weights``.

    Raises :class:`ConfigurationError` naming the extra when the exporter is not installed.
    """
    why = missing_exporter()
    if why is not None:
        raise ConfigurationError(why)
    from inference.export import trace_onnx, with_weights

    global _template
    generator = load_generator(weights)
    with _trace_lock:
        if _template is None:
            _template = trace_onnx(generator)
        data: bytes = with_weights(_template, generator).SerializeToString()
    return data


def graph(weights: Path, *, cache: bool = True) -> tuple[bytes, str]:
    """The ONNX graph of the converted generator ``weights`` and where it came from.

    With ``cache``, a graph cached beside the weights (:func:`graph_path`) is used, and a new export
    is written there (atomically: other replicas may share the directory) and older graphs of the
    same generator are removed; a directory that cannot be written only means the next start
    exports again.
    """
    path = graph_path(weights) if cache else None
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes(), f"cached {path}"
    data = export_graph(weights)
    if path is not None:
        store(path, data)
    return data, "exported"


def store(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (other replicas may share the directory) and remove the
    older files of the same generator and kind: the same ``<stem>.<16 hex>`` name with the same
    suffix (``.onnx`` here, ``.int8.onnx`` for :mod:`inference.quantize`). A directory that cannot be
    written only means the next start makes the file again."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.info("%s not cached (%s): the next start makes it again", path.name, exc)
        return
    stem = path.name.split(".", 1)[0]
    kind = path.name[len(stem) + 1 + DIGEST_CHARS :]
    for old in path.parent.glob(f"{stem}.*{kind}"):
        digest = old.name[len(stem) + 1 : len(stem) + 1 + DIGEST_CHARS]
        same_kind = old.name[len(stem) + 1 + DIGEST_CHARS :] == kind
        if old != path and same_kind and all(c in "0123456789abcdef" for c in digest):
            old.unlink(missing_ok=True)


def forget(weights: Path) -> None:
    """Remove the cached graph of ``weights`` (one that failed its check is exported again)."""
    graph_path(weights).unlink(missing_ok=True)


_shared_arena_lock = threading.Lock()
_shared_arena = False


def _share_arena(ort: Any) -> None:
    """Register the process's one shared CPU arena with ONNX Runtime's environment (once)."""
    global _shared_arena
    with _shared_arena_lock:
        if not _shared_arena:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            try:
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            except Exception:  # one is registered already (by another user of this process's runtime)
                log.warning("ONNX Runtime's shared CPU arena could not be registered", exc_info=True)
            _shared_arena = True


def session(
    graph: bytes, threads: int | None = None, *, shared_arena: bool = False, by_priority: bool = False
) -> Any:
    """An ONNX Runtime CPU session of ``graph`` as the service runs one (:class:`OnnxRuntimeRunner`):
    torch's thread count, operators one after another, idle threads sleeping rather than spinning.
    ``shared_arena``: its buffers come from the one arena all such sessions of the process share
    (the worker runs one generator at a time), not from an arena of its own. ``by_priority``: ONNX
    Runtime's priority-based execution order, which releases a graph's side branches early (the
    calibration graph's reductions: 0.9 GB at its peak instead of 2.2 for a 720×1088 photo)."""
    ort = _import("onnxruntime")
    if ort is None:
        raise ConfigurationError(missing_runtime() or "ONNX Runtime cannot be imported")
    options = ort.SessionOptions()
    if shared_arena:
        _share_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if by_priority:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class OnnxRuntimeRunner:
    """A generator run by ONNX Runtime's CPU provider from its exported graph, float32, or from
    that graph quantized (``dtype`` int8, :mod:`inference.quantize`).

    ``__call__`` has the contract of :meth:`inference.dctnet.GeneratorRunner.__call__`. The session
    uses torch's thread count (the same cores as the torch stages around it), runs its operators one
    after another, and its threads sleep rather than spin when idle: the pipeline's torch stages run
    between generator calls on the same cores. Its memory arena keeps its blocks during a run and
    gives them back after each one, as torch's buffers go back to the allocator (and the service's
    trimming to the system): an arena that keeps them holds every session's largest activations for
    good (0.8 GB for one 720×960 background), although it is what made ONNX Runtime 12 % faster than
    ``onednn`` at 720×960 on our 2-core machine (no page faults on fresh buffers); given back, it
    was 2 % faster there and 4 % slower at 288×288 (docs/model.md §8.5).

    ``keep_pixels`` (the int8 graphs, :data:`INT8_KEEP_PIXELS`): the session draws from the
    process's one shared arena (:func:`session`), which keeps its blocks after a run of at most that
    many pixels per image and gives them back after a larger one. The int8 pass is short enough for
    fresh pages to cost a quarter of it: 427 ms given back against 310 ms kept at 720×960, for
    360 MB more resident (docs/int8.md). Shared, that memory is held once, not once per style.
    """

    def __init__(
        self,
        graph: bytes,
        threads: int | None = None,
        dtype: torch.dtype = torch.float32,
        keep_pixels: int = 0,
    ) -> None:
        ort = _import("onnxruntime")
        if ort is None:
            raise ConfigurationError(missing_runtime() or "ONNX Runtime cannot be imported")
        self._session = session(graph, threads, shared_arena=keep_pixels > 0)
        self._keep_pixels = keep_pixels
        self._keep = ort.RunOptions()
        self._give_back = ort.RunOptions()
        self._give_back.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.device = torch.device("cpu")
        #: float32 for the exported graph, int8 for the quantized one (:mod:`inference.quantize`).
        self.dtype = dtype
        self.backend = "onnxruntime"

    def __call__(self, bgr: Tensor) -> Tensor:
        """(N, 3, H, W) BGR 0..255 (uint8 or float), H, W multiples of 4 → (N, 3, H, W) uint8 BGR
        0..254, on the CPU (channels-last strides, as the torch backends give it)."""
        check_size(bgr)
        images = bgr.detach().cpu().permute(0, 2, 3, 1)
        keep = bgr.shape[-2] * bgr.shape[-1] <= self._keep_pixels
        outs = []
        for image in images:
            hwc = np.ascontiguousarray(image.numpy(), dtype=np.float32)
            out = self._session.run([_OUTPUT], {_INPUT: hwc}, self._keep if keep else self._give_back)[0]
            outs.append(torch.from_numpy(out))
        return torch.stack(outs).permute(0, 3, 1, 2)
