"""The style registry and the resolution of a style to converted, ready-to-load weights.

Resolution order for a style (first that works wins):

1. the **converted cache** ``<cache_dir>/converted/<style>/`` (``head.safetensors``,
   ``bg.safetensors``, ``alpha.jpg``), when its format is current and, if the source graphs are
   known, it was converted from exactly those bytes;
2. a **local ModelScope directory**: ``<model_dir>/<style>/``, ``<model_dir>/<model id>/`` (for
   example ``<model_dir>/damo/cv_unet_person-image-cartoon_compound-models/``) or an earlier
   download in ``<cache_dir>/models/<style>/``; converted once into the cache;
3. a **download** with ModelScope's ``snapshot_download`` into ``<cache_dir>/models/<style>/``
   (only the files serving needs, unless ``everything=True``), then converted.

If none works, :class:`WeightsUnavailableError` says what was tried and how to place the files by
hand. Model files are never unpickled: generators come from protobuf and safetensors only.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from inference.convert import FORMAT_VERSION, META_DEMO, Role, convert_pb, read_metadata
from inference.demo import DEMO_FILES, is_demo_dir, write_model_files
from inference.errors import ConfigurationError, ConversionError, WeightsUnavailableError
from inference.styles import Style, get_style

log = logging.getLogger(__name__)


#: Generator graph names in a ModelScope directory, current first, then the anime-only legacy names.
GRAPH_NAMES: Final[dict[Role, tuple[str, ...]]] = {
    "head": ("cartoon_h.pb", "cartoon_anime_h.pb"),
    "bg": ("cartoon_bg.pb", "cartoon_anime_bg.pb"),
}
MASK_NAME: Final = "alpha.jpg"
#: The files a model directory must hold to serve (current names; the legacy anime names also work).
REQUIRED_FILES: Final[tuple[str, ...]] = (GRAPH_NAMES["head"][0], GRAPH_NAMES["bg"][0], MASK_NAME)
#: What a download fetches: the required files (under either name) and ModelScope's configuration.json
#: (not needed to serve). The detector/landmark graphs, TF checkpoints and the 550 MB vgg19.npy are
#: skipped unless everything is asked for.
SERVING_FILES: Final[tuple[str, ...]] = (
    *GRAPH_NAMES["head"],
    *GRAPH_NAMES["bg"],
    MASK_NAME,
    "configuration.json",
)
#: What a style's weights are: a real model's files (from ModelScope) or demo weights.
WeightsKind = Literal["modelscope", "demo"]
CONVERTED_NAMES: Final[dict[Role, str]] = {"head": "head.safetensors", "bg": "bg.safetensors"}


@dataclass(frozen=True)
class SourceDir:
    """A ModelScope model directory with the files serving needs."""

    path: Path
    head: Path
    bg: Path
    mask: Path
    #: Demo weights (``inference.demo``), not a real model.
    demo: bool = False


@dataclass(frozen=True)
class StyleWeights:
    """Converted weights of one style, ready for :func:`inference.dctnet.load_generator`."""

    style: str
    head: Path
    bg: Path
    mask: Path
    #: Where they came from, for logs and ``GET /styles``.
    source: str
    #: Demo weights (``inference.demo``): random, in the official architecture; not real cartoons.
    demo: bool = False

    @property
    def kind(self) -> WeightsKind:
        """``demo`` or ``modelscope`` (a real model's files), as the API reports it (``source``)."""
        return "demo" if self.demo else "modelscope"


def weights_version(weights: StyleWeights) -> str:
    """16 hex digits that change whenever the style's converted generators or its mask do (SHA-256
    of the three files; a few tens of milliseconds, once per load)."""
    from hashlib import sha256

    digest = sha256(weights.style.encode())
    for path in (weights.head, weights.bg, weights.mask):
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def find_source_dir(path: Path) -> SourceDir | None:
    """``path`` as a ModelScope directory, or None when it lacks a generator graph or the mask."""
    if not path.is_dir():
        return None
    found: dict[Role, Path] = {}
    for role, names in GRAPH_NAMES.items():
        for name in names:
            if (path / name).is_file():
                found[role] = path / name
                break
    mask = path / MASK_NAME
    if len(found) != 2 or not mask.is_file():
        return None
    return SourceDir(path, found["head"], found["bg"], mask, demo=is_demo_dir(path))


def _describe_missing(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    missing = [
        " or ".join(names) for names in GRAPH_NAMES.values() if not any((path / n).is_file() for n in names)
    ]
    if not (path / MASK_NAME).is_file():
        missing.append(MASK_NAME)
    return "lacks " + ", ".join(missing)


def candidate_dirs(style: Style, cache_dir: Path, model_dir: Path | None) -> list[Path]:
    """The local directories searched for ``style``'s ModelScope files, in order."""
    dirs = []
    if model_dir is not None:
        dirs += [model_dir / style.name, model_dir / style.model_id]
    dirs.append(cache_dir / "models" / style.name)
    return dirs


def converted_dir(style: Style, cache_dir: Path) -> Path:
    return cache_dir / "converted" / style.name


def _converted(style: Style, cache_dir: Path, source: SourceDir | None) -> StyleWeights | None:
    """The converted cache when it is complete, current and (if ``source`` is given) from it."""
    out = converted_dir(style, cache_dir)
    paths = {role: out / name for role, name in CONVERTED_NAMES.items()}
    mask = out / MASK_NAME
    if not (all(p.is_file() for p in paths.values()) and mask.is_file()):
        return None
    demo = False
    for role, p in paths.items():
        meta = read_metadata(p)
        demo = demo or meta.get(META_DEMO) == "true"
        if meta.get("format_version") != FORMAT_VERSION or meta.get("role") != role:
            return None
        if source is not None:
            from hashlib import sha256

            src = source.head if role == "head" else source.bg
            if meta.get("source_sha256") != sha256(src.read_bytes()).hexdigest():
                return None
    if source is not None and source.demo != demo:
        return None  # the same graphs, now marked (or no longer marked) demo
    return StyleWeights(style.name, paths["head"], paths["bg"], mask, f"converted cache {out}", demo)


def convert_source(style: Style, source: SourceDir, cache_dir: Path) -> StyleWeights:
    """Convert a ModelScope directory's two graphs (and copy its mask) into the converted cache."""
    out = converted_dir(style, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    for role, name in CONVERTED_NAMES.items():
        convert_pb(source.head if role == "head" else source.bg, out / name, style.name, role, source.demo)
    tmp = out / f".{MASK_NAME}.{uuid.uuid4().hex}.tmp"  # unique: other replicas may convert at once
    shutil.copyfile(source.mask, tmp)
    tmp.replace(out / MASK_NAME)
    log.info("converted style %s from %s into %s", style.name, source.path, out)
    return StyleWeights(
        style.name,
        out / CONVERTED_NAMES["head"],
        out / CONVERTED_NAMES["bg"],
        out / MASK_NAME,
        f"converted from {source.path}",
        source.demo,
    )


def download(style: Style, cache_dir: Path, everything: bool = False) -> Path:
    """Fetch ``style``'s model directory from ModelScope into ``<cache_dir>/models/<style>``.

    Only the files serving needs unless ``everything``. The download goes to a directory of its own
    (``<cache_dir>/downloads/``) and its files are moved into place only once it is complete, each
    only where no file of that name is there already: files a person put there (copied in while a
    download was failing, say) are never replaced nor removed. Raises :class:`WeightsUnavailableError`
    (with the hub's reason) when the hub cannot be reached or refuses.
    """
    target = cache_dir / "models" / style.name
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as exc:  # pragma: no cover - modelscope is a runtime dependency
        raise WeightsUnavailableError(f"modelscope is not installed ({exc}); pip install modelscope") from exc
    staging = _staging(cache_dir, style)
    try:
        try:
            path = Path(
                snapshot_download(
                    style.model_id,
                    revision=style.revision,
                    local_dir=str(staging),
                    allow_patterns=None if everything else list(SERVING_FILES),
                )
            )
        except Exception as exc:  # the hub client raises many types (network, auth, HTTP, its own)
            reason = " ".join(str(exc).split())[:300]
            raise WeightsUnavailableError(
                f"download of {style.model_id}"
                f"{'@' + style.revision if style.revision else ''} from ModelScope failed: "
                f"{type(exc).__name__}: {reason}"
            ) from exc
        # Real weights take the place of demo ones (the configuration.json that marks them included).
        _install(path, target, over_demo=True)
    finally:
        _unstage(staging)
    return target


def install_demo(style_name: str, cache_dir: Path, model_dir: Path | None = None) -> StyleWeights:
    """Write demo weights (:mod:`inference.demo`) for ``style_name`` into
    ``<cache_dir>/models/<style>`` and convert them: what a machine without ModelScope can serve.

    Refuses (:class:`ConfigurationError`) where real weights for the style are found (any
    :func:`candidate_dirs` entry or the converted cache): demo weights never stand in front of, nor
    replace, a real model. Demo weights already there are kept as they are.
    """
    style = get_style(style_name)
    for path in candidate_dirs(style, cache_dir, model_dir):
        source = find_source_dir(path)
        if source is not None and not source.demo:
            raise ConfigurationError(
                f"style {style.name} has real weights at {path}; demo weights not written"
            )
    cached = _converted(style, cache_dir, None)
    if cached is not None and not cached.demo:
        raise ConfigurationError(
            f"style {style.name} has real converted weights at {cached.head.parent}; demo weights not written"
        )
    target = cache_dir / "models" / style.name
    staging = _staging(cache_dir, style)
    try:
        write_model_files(staging)
        if not is_demo_dir(target):
            ours = sorted(p.name for p in staging.iterdir() if (target / p.name).exists())
            if ours:
                raise ConfigurationError(
                    f"{target} already holds {', '.join(ours)}, not demo files; demo weights are not "
                    "written over them (move them away and run again)"
                )
        _install(staging, target)
    finally:
        _unstage(staging)
    return resolve(style.name, cache_dir, model_dir, allow_download=False)


def _staging(cache_dir: Path, style: Style) -> Path:
    """A new directory of this process's own, beside the model directories, for files in the making."""
    staging = cache_dir / "downloads" / f"{style.name}.{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    return staging


def _unstage(staging: Path) -> None:
    """Remove what :func:`_staging` made: that directory, and its parent once it is empty."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()


def _install(downloaded: Path, target: Path, *, over_demo: bool = False) -> None:
    """Move a complete download's files into ``target``, leaving every file already there as it is,
    except (``over_demo``) the files of demo weights the service wrote there itself."""
    if over_demo and is_demo_dir(target):
        # The service's own files, all of them: a real graph under the other name must not end up
        # beside a demo one.
        for name in DEMO_FILES:
            (target / name).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    for entry in downloaded.iterdir():
        if not entry.name.startswith(".") and not (target / entry.name).exists():
            entry.replace(target / entry.name)


def local_fingerprint(
    style_name: str, cache_dir: Path, model_dir: Path | None = None
) -> tuple[object, ...] | None:
    """What :func:`resolve` would find on disk for ``style_name`` without downloading, as a cheap
    fingerprint (the files' paths, sizes and modification times), or None when nothing usable is
    there. Unchanged between two looks, the files are complete (a copy in progress grows)."""
    style = get_style(style_name)
    for path in candidate_dirs(style, cache_dir, model_dir):
        source = find_source_dir(path)
        if source is not None:
            return _stat(source.head, source.bg, source.mask)
    out = converted_dir(style, cache_dir)
    files = [out / name for name in CONVERTED_NAMES.values()] + [out / MASK_NAME]
    return _stat(*files) if all(f.is_file() for f in files) else None


def _stat(*paths: Path) -> tuple[object, ...] | None:
    try:
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    except OSError:  # removed in between
        return None


def resolve(
    style_name: str, cache_dir: Path, model_dir: Path | None = None, allow_download: bool = True
) -> StyleWeights:
    """Converted weights for ``style_name``, converting or downloading as needed (module docstring).

    Raises :class:`UnknownStyleError`, :class:`ConversionError` (a source file is not a valid
    generator), or :class:`WeightsUnavailableError` with everything tried and how to fix it.
    """
    style = get_style(style_name)
    tried: list[str] = []
    for path in candidate_dirs(style, cache_dir, model_dir):
        source = find_source_dir(path)
        if source is None:
            tried.append(f"local directory {path} ({_describe_missing(path)})")
            continue
        cached = _converted(style, cache_dir, source)
        return cached if cached is not None else convert_source(style, source, cache_dir)
    # No source on disk: a converted cache on its own (e.g. copied from another machine) is fine.
    cached = _converted(style, cache_dir, None)
    if cached is not None:
        return cached
    tried.insert(0, f"converted cache {converted_dir(style, cache_dir)} (missing or incomplete)")
    if allow_download:
        try:
            path = download(style, cache_dir)
        except WeightsUnavailableError as exc:
            tried.append(str(exc))
        else:
            source = find_source_dir(path)
            if source is not None:
                return convert_source(style, source, cache_dir)
            tried.append(f"downloaded directory {path} ({_describe_missing(path)})")
    else:
        tried.append("download from ModelScope (disabled)")
    raise WeightsUnavailableError(_unavailable_message(style, cache_dir, model_dir, tried))


def _unavailable_message(style: Style, cache_dir: Path, model_dir: Path | None, tried: list[str]) -> str:
    place = model_dir / style.name if model_dir is not None else cache_dir / "models" / style.name
    revision = f" --revision {style.revision}" if style.revision else ""
    return (
        f"no weights for style '{style.name}' ({style.model_id}). Tried: " + "; ".join(tried) + ". "
        f"To fix: on a machine with internet run `toonserve download {style.name} --cache-dir DIR` and copy "
        f"DIR to this machine's cache directory ({cache_dir}), or place the files "
        f"{', '.join(REQUIRED_FILES)} of the ModelScope directory at {place} (e.g. `modelscope download "
        f"{style.model_id}{revision} --local-dir {place} {' '.join(REQUIRED_FILES)}`)."
    )


def ensure_converted(style_name: str, source_dir: Path, cache_dir: Path) -> StyleWeights:
    """Convert an explicit ModelScope directory for ``style_name`` (the ``convert`` CLI command)."""
    style = get_style(style_name)
    source = find_source_dir(source_dir)
    if source is None:
        raise ConversionError(
            f"{source_dir} is not a DCT-Net model directory: it {_describe_missing(source_dir)}"
        )
    return convert_source(style, source, cache_dir)
