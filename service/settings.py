"""Service settings, read from the environment (prefix ``TOONSERVE_``) or a ``.env`` file.

Every field is documented in the README's settings table (a test keeps the two in step). Defaults,
bounds and choices that belong to the model or the pipeline come from the constants in ``inference/``,
so they are written once; the per-request defaults of the routes, the CLI and the jobs come from here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.clients import parse_networks
from inference.backends import BackendSetting
from inference.constants import (
    DEFAULT_HEAD_BATCH,
    DEFAULT_MAX_FACES,
    DEFAULT_MAX_PROCESSING_PIXELS,
    DEFAULT_MIN_FACE_SIZE,
    DEFAULT_PROCESSING_SIZE,
    MAX_MAX_FACES,
    MAX_PROCESSING_SIZE,
    MIN_PROCESSING_SIZE,
)
from inference.faces import available_detectors
from inference.models import DEFAULT_DTYPE, DtypeSetting, describe_dtypes
from inference.styles import STYLES
from service.memory import MAX_MMAP_THRESHOLD_MIB
from serving.clips import DEFAULT_CHUNK_S
from serving.encoding import (
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_PNG_COMPRESSION,
    DEFAULT_QUALITY,
    MAX_PNG_COMPRESSION,
    MAX_PNG_THREADS,
    MAX_QUALITY,
    MIN_PNG_COMPRESSION,
    MIN_QUALITY,
    OutputFormat,
)
from serving.engine import DEFAULT_RETRY_MAX_S
from serving.flow import DEFAULT_MAX_INFLIGHT_PIXELS, DEFAULT_MAX_UPSCALE
from serving.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, MAX_DECODER_COPIES
from serving.result_cache import DEFAULT_RESULT_CACHE_BYTES
from serving.scheduler import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_INTERACTIVE_GRACE_S,
    DEFAULT_QUEUE_SIZE,
    default_client_queue_size,
)
from serving.video import (
    DEFAULT_MAX_VIDEO_BYTES,
    DEFAULT_MAX_VIDEO_FRAMES,
    DEFAULT_MAX_VIDEO_PIXELS,
    DEFAULT_MAX_VIDEO_SECONDS,
    VideoLimits,
)


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "toonserve"


class Settings(BaseSettings):
    """All knobs of the service. Build with :func:`get_settings` (cached), never at import time."""

    model_config = SettingsConfigDict(env_prefix="TOONSERVE_", env_file=".env", extra="ignore")

    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (CUDA when available).")
    dtype: DtypeSetting = Field(DEFAULT_DTYPE, description=f"Generator precision. {describe_dtypes()}")
    backend: BackendSetting = Field(
        "auto",
        description="Generator backend: onednn (fused CPU kernels), eager (plain PyTorch), onnxruntime "
        "(ONNX Runtime's CPU provider on the exported graph, float32, or quantized for int8; the onnxruntime "
        "and onnx extras), or auto (each style measures the candidates that run its precision here and "
        "keeps the fastest).",
    )
    styles: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["anime"], description="Styles to load at start-up (comma-separated)."
    )
    default_style: str = Field("anime", description="Style used when a request names none.")
    face_detector: str = Field("mtcnn", description="Face detector, by registry name.")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="Downloads and converted weights."
    )
    model_dir: Path | None = Field(
        None,
        description="Optional directory of ModelScope model folders (<dir>/<style>/ or <dir>/<model id>/).",
    )
    allow_download: bool = Field(True, description="Fetch missing weights from ModelScope at start-up.")
    warmup: bool = Field(
        True,
        description="Before the service is ready, run the default style twice on a blank photo of the "
        "processing size, so that the first requests do not pay for setting that size up.",
    )
    weights_retry_max_s: float = Field(
        DEFAULT_RETRY_MAX_S,
        gt=0,
        description="Longest wait between attempts to load a style whose weights failed (backoff cap).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "json", description="Log lines as JSON objects or plain text."
    )

    # Processing defaults (each request may override them).
    processing_size: int = Field(
        DEFAULT_PROCESSING_SIZE,
        ge=MIN_PROCESSING_SIZE,
        le=MAX_PROCESSING_SIZE,
        description="Short side the photo is processed at.",
    )
    output_format: OutputFormat = Field(DEFAULT_OUTPUT_FORMAT, description="Default response image format.")
    png_compression: int = Field(
        DEFAULT_PNG_COMPRESSION,
        ge=MIN_PNG_COMPRESSION,
        le=MAX_PNG_COMPRESSION,
        description="PNG zlib level: 1 is fastest (a third less encode time than 4, 7–20 % larger).",
    )
    quality: int = Field(
        DEFAULT_QUALITY, ge=MIN_QUALITY, le=MAX_QUALITY, description="Default JPEG/WebP quality."
    )
    min_face_size: float = Field(
        DEFAULT_MIN_FACE_SIZE, ge=0, description="Smallest face box side (processing pixels) stylised."
    )
    max_faces: int = Field(
        DEFAULT_MAX_FACES,
        ge=0,
        le=MAX_MAX_FACES,
        description="Most faces stylised per photo (largest first).",
    )

    # Video.
    max_video_seconds: float = Field(
        DEFAULT_MAX_VIDEO_SECONDS, gt=0, description="Longest video taken (its duration, from its header)."
    )
    max_video_frames: int = Field(DEFAULT_MAX_VIDEO_FRAMES, ge=1, description="Most frames in one video.")
    max_video_pixels: int = Field(
        DEFAULT_MAX_VIDEO_PIXELS, ge=64 * 64, description="Largest video frame (width × height)."
    )
    video_chunk_s: float = Field(
        DEFAULT_CHUNK_S,
        gt=0,
        le=3600,
        description="A video job's clip is cut into chunks of about this many seconds, run apart (by "
        "every replica, and by several job slots of one) and joined at the end.",
    )
    max_video_bytes: int = Field(
        DEFAULT_MAX_VIDEO_BYTES,
        ge=1024,
        description="Largest clip a video job takes (bytes; the body is bounded by max_job_bytes too).",
    )

    # Seen before, answered at once.
    result_cache_bytes: int = Field(
        DEFAULT_RESULT_CACHE_BYTES,
        ge=0,
        description="Memory for what the models made of recent photos, per client (strength, format, "
        "quality and size changes then skip them); it holds photos' pixels in this process only. 0 turns "
        "it off.",
    )
    etag_salt: str = Field(
        "",
        max_length=256,
        description="Mixed into every ETag: change it to invalidate every tag given out (after an "
        "update that changes results).",
    )

    # Limits.
    max_upload_bytes: int = Field(
        DEFAULT_MAX_BYTES,
        ge=1024,
        description="Largest request body (bytes), and largest photo in a job (a larger one fails on "
        "arrival).",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=10_000, description="Largest decoded image (width × height)."
    )
    max_processing_pixels: int = Field(
        DEFAULT_MAX_PROCESSING_PIXELS,
        ge=MIN_PROCESSING_SIZE**2,
        description="Most pixels the models run on per photo; a photo whose processing size exceeds it "
        "is shrunk further, aspect kept.",
    )
    max_inflight_pixels: int = Field(
        DEFAULT_MAX_INFLIGHT_PIXELS,
        ge=10_000,
        description="Decoded pixels held at once by all decodes in progress, every copy a decoder makes "
        "counted (bounds decode memory).",
    )
    reduced_decode: bool = Field(
        True,
        description="Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves twice the "
        "processing size (faster; within about 1 level of a full decode).",
    )
    max_output_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=10_000, description="Largest requested output (width × height); more: 422."
    )
    max_upscale: float = Field(
        DEFAULT_MAX_UPSCALE,
        ge=1.0,
        le=64.0,
        description="How many times a requested output's long side may exceed the photo's; more: 422.",
    )
    max_batch_files: int = Field(
        16, ge=1, le=256, description="Most images in one /cartoonize/batch request."
    )
    queue_size: int = Field(
        DEFAULT_QUEUE_SIZE, ge=1, description="Images that may wait for the worker; beyond it: 503."
    )
    max_batch: int | None = Field(
        None, ge=1, le=64, description="Most images the worker takes together; unset: 1 on CPU, 8 on CUDA."
    )
    head_batch: int = Field(
        DEFAULT_HEAD_BATCH, ge=1, le=256, description="Most face crops per head-network call."
    )
    batch_wait_ms: float = Field(
        DEFAULT_BATCH_WAIT_S * 1000, ge=0, le=1000, description="How long the worker waits to fill a batch."
    )
    interactive_grace_ms: float = Field(
        DEFAULT_INTERACTIVE_GRACE_S * 1000,
        ge=0,
        le=1000,
        description="How long job items wait after a request was admitted or served, for the next one.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A client that stops sending its request body for this long gets 408.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline per image, queue wait included; then 504."
    )
    malloc_arenas: int = Field(
        2,
        ge=0,
        le=64,
        description="glibc malloc arenas (0: glibc's default of 8 per core); fewer strand less memory "
        "after bursts.",
    )
    malloc_keep_mib: int = Field(
        MAX_MMAP_THRESHOLD_MIB,
        ge=0,
        le=MAX_MMAP_THRESHOLD_MIB,
        description="glibc malloc: buffers under this many MiB are reused rather than given back to the "
        "system and faulted in again at each request (0: glibc's sliding default); the idle trims "
        "still return them.",
    )
    codec_threads: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Threads that decode uploads and encode results; unset: half the cores (1 to 4).",
    )
    png_threads: int | None = Field(
        None,
        ge=1,
        le=MAX_PNG_THREADS,
        description="Most threads one PNG result is compressed on, in stripes side by side; unset: the "
        "cores (1 to 4). The bytes written do not depend on it.",
    )

    # Jobs.
    data_dir: Path | None = Field(
        None, description="Where jobs keep their records, photos and results; unset: <cache dir>/data."
    )
    max_job_files: int = Field(200, ge=1, le=10_000, description="Most photos in one job.")
    max_job_bytes: int = Field(
        1024**3,
        ge=1024,
        description="Largest POST /jobs body (bytes); larger ones get 413 before being read.",
    )
    max_job_storage_bytes: int = Field(
        10 * 1024**3,
        ge=1024 * 1024,
        description="Job storage quota: photos plus (reserved, then actual) results of every stored job.",
    )
    client_job_storage_bytes: int | None = Field(
        None,
        ge=1024 * 1024,
        description="The share of the job storage one client's jobs may hold (each key's client; "
        "without keys, each address); beyond it: 507. Unset: half of max_job_storage_bytes.",
    )
    job_ttl_s: float = Field(86_400.0, gt=0, description="Seconds an ended job and its results are kept.")
    job_concurrency: int | None = Field(
        None, ge=1, le=256, description="Job items in flight at once; unset: the worker's batch size + 1."
    )
    jobs_backend: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="Where job records and the work queue live: sqlite (embedded, one replica) or redis "
        "(shared by several replicas, which must all mount the same data directory).",
    )
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="The Redis of the redis jobs backend: redis://[user:password@]host:port/db, rediss:// "
        "(TLS) or unix:///path.sock.",
    )
    job_lease_s: float = Field(
        60.0,
        ge=2,
        le=3600,
        description="Redis backend: a running item whose replica has not renewed it (every second) for "
        "this long is taken over by another replica.",
    )
    webhook_secret: str | None = Field(
        None, description="Key of the HMAC-SHA256 signature of job webhooks; webhooks are refused without it."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhooks to loopback, private and link-local addresses."
    )
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries per webhook (1 s, 2 s, 4 s … apart).")
    webhook_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Deadline of one whole webhook attempt (resolving, connecting, sending, reading the "
        "answer), not only of each read.",
    )
    webhook_concurrency: int = Field(
        8, ge=1, le=256, description="Webhook attempts in flight at once, across all jobs."
    )

    # Access and clients.
    api_key: SecretStr | None = Field(
        None,
        description="One API key (the client named default); if any key is set, requests must send one "
        "(X-API-Key or Bearer).",
    )
    api_keys: SecretStr | None = Field(
        None, description="Named API keys, name=key,name=key: each name is a client of its own."
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of named API keys, one name=key a line, optionally followed by that "
        "client's queue_size=N, images_per_minute=N, event_streams=N and job_storage_bytes=N (e.g. a "
        "mounted Kubernetes Secret).",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses or CIDR ranges of proxies whose X-Forwarded-For is "
        "believed (to tell clients without keys apart by address).",
    )
    client_queue_size: int | None = Field(
        None,
        ge=1,
        description="Images one client may have waiting for the worker; beyond it: 429. Unset: half "
        "the queue size.",
    )
    client_images_per_minute: int = Field(
        0, ge=0, description="Images one client may send a minute (0: no limit); beyond it: 429."
    )
    client_event_streams: int = Field(
        16,
        ge=1,
        description="Job events streams (GET /jobs/{id}/events) one client may have open at once; "
        "beyond it: 429.",
    )
    max_event_streams: int = Field(
        1000,
        ge=1,
        description="Job events streams this process holds open at once, all clients together; beyond "
        "it: 503.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Host header values answered (names, addresses, *.example.com); "
        "others get 400 host_not_allowed. Empty: any host. /healthz, /readyz and /metrics answer any.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS (empty: CORS off)."
    )

    @field_validator("styles", "cors_origins", "trusted_proxies", "allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # TOONSERVE_STYLES=anime,3d and TOONSERVE_CORS_ORIGINS=https://a.example,https://b.example
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but empty; unset it to run without a key, or give it a value")
        return value

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown style(s) {unknown}; choose from {', '.join(STYLES)}")
        if not value:
            raise ValueError("at least one style must be loaded")
        return list(dict.fromkeys(value))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value.split("://", 1)[0] not in ("redis", "rediss", "unix") or "://" not in value:
            raise ValueError(f"not a Redis URL: {value!r}; use redis://host:6379/0, rediss://… or unix://…")
        return value

    @field_validator("face_detector")
    @classmethod
    def _known_detector(cls, value: str) -> str:
        if value not in available_detectors():
            raise ValueError(
                f"unknown face detector {value!r}; choose from {', '.join(available_detectors())}"
            )
        return value

    @field_validator("default_style")
    @classmethod
    def _known_default(cls, value: str) -> str:
        if value not in STYLES:
            raise ValueError(f"unknown style {value!r}; choose from {', '.join(STYLES)}")
        return value

    @model_validator(mode="after")
    def _inflight_holds_one_photo(self) -> Settings:
        if self.max_inflight_pixels < MAX_DECODER_COPIES * self.max_pixels:
            raise ValueError(
                f"max_inflight_pixels ({self.max_inflight_pixels}) must be at least {MAX_DECODER_COPIES} "
                f"times max_pixels ({self.max_pixels}): every copy a decoder makes counts, and the largest "
                "photos could otherwise never be decoded"
            )
        return self

    @model_validator(mode="after")
    def _client_share_fits(self) -> Settings:
        if (
            self.client_job_storage_bytes is not None
            and self.client_job_storage_bytes > self.max_job_storage_bytes
        ):
            raise ValueError(
                f"client_job_storage_bytes ({self.client_job_storage_bytes}) must not exceed "
                f"max_job_storage_bytes ({self.max_job_storage_bytes})"
            )
        if self.client_queue_size is not None and self.client_queue_size > self.queue_size:
            raise ValueError(
                f"client_queue_size ({self.client_queue_size}) must not exceed queue_size "
                f"({self.queue_size}): one client could then fill the queue for everyone"
            )
        return self

    @model_validator(mode="after")
    def _default_is_loaded(self) -> Settings:
        if self.default_style not in self.styles:
            raise ValueError(
                f"default_style {self.default_style!r} is not among the loaded styles {self.styles}"
            )
        return self

    @property
    def client_share(self) -> int:
        """Images one client may have waiting (``client_queue_size``, or half the queue)."""
        return self.client_queue_size or default_client_queue_size(self.queue_size)

    @property
    def client_storage(self) -> int:
        """Bytes of job storage one client's jobs may hold (``client_job_storage_bytes``, or half)."""
        return self.client_job_storage_bytes or self.max_job_storage_bytes // 2

    @property
    def video_limits(self) -> VideoLimits:
        """What one video may be (duration, frames, pixels per frame)."""
        return VideoLimits(
            max_duration_s=self.max_video_seconds,
            max_frames=self.max_video_frames,
            max_pixels=self.max_video_pixels,
        )

    @property
    def jobs_dir(self) -> Path:
        """The jobs' data directory (``data_dir``, or ``<cache_dir>/data``)."""
        return self.data_dir if self.data_dir is not None else self.cache_dir / "data"


@lru_cache
def get_settings() -> Settings:
    return Settings()
