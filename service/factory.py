"""The one place that turns settings into a working engine and request flow.

:func:`build_engine` wires the model store, the face detector (by registry name), the per-style
pipelines and the device's worker (:class:`serving.engine.Engine`); :func:`build_flow` puts the
request flow on top with the per-request defaults and limits. The app, the CLI and the benchmarks
all call these two; nothing else builds that graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from inference.backends import check_setting
from inference.errors import StyleUnavailableError, ToonserveError, WeightsUnavailableError
from inference.models import ModelStore, choose_dtype, int8_unconsidered, parse_device
from inference.pipeline import Result
from service.settings import Settings
from serving.encoding import default_png_threads
from serving.engine import Engine
from serving.flow import Flow, Limits
from serving.gpu_codec import GpuCodec
from serving.options import ResolvedOptions
from serving.result_cache import ResultCache


def default_codec_threads() -> int:
    """Half the cores, 1 to 4: decode and encode overlap the model work without crowding it out."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def explain_weights_error(settings: Settings) -> Callable[[str, ToonserveError], str]:
    """The message for a style that failed to load: the error's own (what was tried, how to place
    the files) plus the settings that fix it on this service."""

    def explain(style: str, exc: ToonserveError) -> str:
        if not isinstance(exc, WeightsUnavailableError):
            return str(exc)
        download = (
            "TOONSERVE_ALLOW_DOWNLOAD=false stops asking ModelScope"
            if settings.allow_download
            else "TOONSERVE_ALLOW_DOWNLOAD=true lets it download from ModelScope"
        )
        return (
            f"{exc} Settings: TOONSERVE_MODEL_DIR=DIR reads DIR/{style}/ (or DIR/<model id>/); "
            f"TOONSERVE_CACHE_DIR=DIR points at a copied cache; {download}. "
            "The service keeps trying in the background, with backoff."
        )

    return explain


def build_engine(
    settings: Settings,
    *,
    styles: Sequence[str] | None = None,
    default_style: str | None = None,
    retry: bool = True,
    on_outcome: Callable[[str, str], None] | None = None,
) -> Engine:
    """The engine the settings describe (not started). ``styles``/``default_style`` narrow it (the
    CLI loads only the style it uses); ``retry=False`` for one-shot tools, which also skip the
    warm-up at the processing size (``TOONSERVE_WARMUP``: their first photo pays for it once)."""
    device = parse_device(settings.device)
    precision = choose_dtype(settings.dtype, device, settings.backend)
    # A backend named that cannot run here (ONNX Runtime not installed, on a GPU, or in bfloat16)
    # stops the start with the fix, rather than failing every style.
    check_setting(settings.backend, device, precision.dtype)
    # auto weighs int8 per style as it loads, where it can run fast (inference.models.int8_unconsidered);
    # where only the CPU or a missing extra stops it, the reason says so (the extra is the fix).
    int8_why_not = int8_unconsidered(settings.dtype, device, settings.backend)
    reason = precision.reason
    if (
        int8_why_not is not None
        and settings.dtype == "auto"
        and device.type == "cpu"
        and settings.backend == "auto"
    ):
        reason = f"{reason}; int8 not considered: {int8_why_not}"
    store = ModelStore(
        device=device,
        dtype=precision.dtype,
        dtype_reason=reason,
        consider_int8=int8_why_not is None,
        cache_dir=settings.cache_dir,
        model_dir=settings.model_dir,
        allow_download=settings.allow_download,
        backend=settings.backend,
    )
    # On CPU, batching large images is slower per image than one at a time (memory-bound; see
    # inference.pipeline.DEFAULT_BG_BATCH), so the worker takes one image at a time there by default.
    max_batch = settings.max_batch or (8 if device.type == "cuda" else 1)
    return Engine(
        store,
        list(styles) if styles is not None else settings.styles,
        default_style or settings.default_style,
        detector=settings.face_detector,
        smallest_face=settings.min_face_size,
        max_batch=max_batch,
        head_batch=settings.head_batch,
        queue_size=settings.queue_size,
        batch_wait_s=settings.batch_wait_ms / 1000,
        interactive_grace_s=settings.interactive_grace_ms / 1000,
        retry_max_s=settings.weights_retry_max_s,
        retry=retry,
        on_outcome=on_outcome,
        explain=explain_weights_error(settings),
        # A 3:4 photo at the processing size, the shape of most phone and camera photos.
        warmup_size=(
            (settings.processing_size, round(settings.processing_size * 4 / 3))
            if settings.warmup and retry
            else None
        ),
    )


def loaded_engine(settings: Settings, style: str | None = None) -> Engine:
    """An engine with ``style`` (default: the default style) loaded and warm, for one-shot tools and
    benchmarks; raises the load error when the style cannot be loaded."""
    style = style or settings.default_style
    engine = build_engine(settings, styles=[style], default_style=style, retry=False)
    engine.start()
    status = engine.wait_settled(style)
    if status.state != "loaded":
        engine.close(drain=False)
        raise StyleUnavailableError(engine.not_ready_reason(), retry_after=0)
    return engine


def build_flow(settings: Settings, engine: Engine, on_result: Callable[[Result], None] | None = None) -> Flow:
    """The request flow over ``engine`` with the settings' per-request defaults and limits; on a
    CUDA engine, with JPEG decode and encode on the GPU where torchvision allows
    (:meth:`GpuCodec.create`; Pillow otherwise)."""
    # What a request gets for the options it leaves out.
    defaults = ResolvedOptions(
        style=engine.default_style,
        processing_size=settings.processing_size,
        format=settings.output_format,
        quality=settings.quality,
    )
    limits = Limits(
        max_pixels=settings.max_pixels,
        max_processing_pixels=settings.max_processing_pixels,
        max_inflight_pixels=settings.max_inflight_pixels,
        max_output_pixels=settings.max_output_pixels,
        max_upscale=settings.max_upscale,
        reduced_decode=settings.reduced_decode,
        min_face_size=settings.min_face_size,
        max_faces=settings.max_faces,
        png_compression=settings.png_compression,
        png_threads=settings.png_threads or default_png_threads(),
    )
    return Flow(
        engine,
        defaults,
        limits=limits,
        timeout_s=settings.request_timeout_s,
        codec_threads=settings.codec_threads or default_codec_threads(),
        on_result=on_result,
        gpu_codec=GpuCodec.create(engine.store.device),
        cache=ResultCache(settings.result_cache_bytes),
        tag_salt=settings.etag_salt,
    )
