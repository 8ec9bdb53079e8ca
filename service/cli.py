"""``toonserve`` command line: serve, download and convert weights, list styles."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from inference.errors import ToonserveError
from inference.weights import STYLES, download, ensure_converted, find_source_dir, get_style, resolve


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.logs import configure
    from service.settings import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    configure(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # our middleware logs every request, with its request id
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    return 0


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir is not None:
        return Path(args.cache_dir)
    from service.settings import get_settings

    return get_settings().cache_dir


def _cmd_download(args: argparse.Namespace) -> int:
    cache = _cache_dir(args)
    for name in args.styles:
        style = get_style(name)
        print(f"downloading {name} ({style.model_id}) into {cache / 'models' / name} ...", flush=True)
        path = download(style, cache, everything=args.all)
        source = find_source_dir(path)
        if source is None:
            print(
                f"error: {path} has no cartoon_h.pb/cartoon_bg.pb/alpha.jpg after download", file=sys.stderr
            )
            return 1
        weights = ensure_converted(name, path, cache)
        print(f"{name}: converted into {weights.head.parent}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    weights = ensure_converted(args.style, Path(args.source), _cache_dir(args))
    print(f"{args.style}: converted {args.source} into {weights.head.parent}")
    return 0


def _cmd_styles(args: argparse.Namespace) -> int:
    cache = _cache_dir(args)
    for name, style in STYLES.items():
        try:
            where = resolve(name, cache, None, allow_download=False).source
        except ToonserveError:
            where = "not on this machine"
        rev = f"@{style.revision}" if style.revision else ""
        print(f"{name:13} {style.model_id}{rev}  [{where}]")
    return 0


_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _progress(done: int, total: int, name: str, started: float) -> None:
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:.2f} img/s {name[:40]:40}"
    )
    sys.stderr.flush()


def _cmd_cartoonize(args: argparse.Namespace) -> int:
    """Cartoonize every photo of a folder into another folder, with the service's own pipeline."""
    from inference.faces import create_detector
    from inference.images import decode, encode
    from inference.models import ModelStore, parse_device, parse_dtype
    from inference.pipeline import Cartoonizer, Options
    from service.settings import get_settings

    settings = get_settings()
    src, dst = Path(args.input), Path(args.output)
    if not src.is_dir():
        print(f"error: {src} is not a directory", file=sys.stderr)
        return 2
    photos = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _PHOTO_SUFFIXES)
    if not photos:
        print(f"error: no photos ({', '.join(_PHOTO_SUFFIXES)}) in {src}", file=sys.stderr)
        return 2
    dst.mkdir(parents=True, exist_ok=True)
    device = parse_device(args.device or settings.device)
    store = ModelStore(
        device, parse_dtype(args.dtype or settings.dtype), Path(args.cache_dir or settings.cache_dir),
        settings.model_dir, settings.allow_download, settings.backend,
    )  # fmt: skip
    style = args.style or settings.default_style
    cartoonizer = Cartoonizer(
        store.load(style), create_detector("mtcnn", device), head_batch=settings.head_batch
    )
    options = Options(
        processing_size=args.processing_size or settings.processing_size, strength=args.strength
    )
    fmt = args.format or settings.output_format
    failures = 0
    started = time.monotonic()
    for i, path in enumerate(photos):
        _progress(i, len(photos), path.name, started)
        try:
            result = cartoonizer.run(
                decode(path.read_bytes(), max_pixels=settings.max_pixels).pixels, options
            )
            suffix = "jpg" if fmt == "jpeg" else fmt
            (dst / f"{path.stem}.{suffix}").write_bytes(
                encode(result.image, fmt, args.quality or settings.quality)
            )
        except ToonserveError as exc:
            failures += 1
            sys.stderr.write(f"\n{path.name}: {exc}\n")
    _progress(len(photos), len(photos), "done", started)
    sys.stderr.write("\n")
    print(f"{len(photos) - failures} of {len(photos)} photos written to {dst}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toonserve", description="DCT-Net cartoon service and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (settings from TOONSERVE_* variables)")
    serve.add_argument("--host", help="override TOONSERVE_HOST")
    serve.add_argument("--port", type=int, help="override TOONSERVE_PORT")
    serve.set_defaults(func=_cmd_serve)

    dl = sub.add_parser("download", help="fetch styles from ModelScope and convert them")
    dl.add_argument("styles", nargs="+", choices=list(STYLES), metavar="STYLE", help=", ".join(STYLES))
    dl.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    dl.add_argument(
        "--all", action="store_true", help="fetch the whole model directory, not just what serving needs"
    )
    dl.set_defaults(func=_cmd_download)

    conv = sub.add_parser("convert", help="convert a local ModelScope directory of one style")
    conv.add_argument("style", choices=list(STYLES), metavar="STYLE", help=", ".join(STYLES))
    conv.add_argument("source", help="directory with cartoon_h.pb, cartoon_bg.pb and alpha.jpg")
    conv.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    conv.set_defaults(func=_cmd_convert)

    cz = sub.add_parser("cartoonize", help="cartoonize a folder of photos into another folder")
    cz.add_argument("input", help="folder of photos (jpg, png, webp, bmp, tiff, gif)")
    cz.add_argument("output", help="folder for the results (created)")
    cz.add_argument("--style", choices=list(STYLES), help="default: TOONSERVE_DEFAULT_STYLE")
    cz.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: TOONSERVE_OUTPUT_FORMAT")
    cz.add_argument("--quality", type=int, help="JPEG/WebP quality, default: TOONSERVE_QUALITY")
    cz.add_argument("--strength", type=float, default=1.0, help="1 = cartoon, 0 = photo")
    cz.add_argument("--processing-size", type=int, help="default: TOONSERVE_PROCESSING_SIZE")
    cz.add_argument("--device", help="override TOONSERVE_DEVICE")
    cz.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override TOONSERVE_DTYPE")
    cz.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    cz.set_defaults(func=_cmd_cartoonize)

    st = sub.add_parser("styles", help="list the styles and whether their weights are on this machine")
    st.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    st.set_defaults(func=_cmd_styles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ToonserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
