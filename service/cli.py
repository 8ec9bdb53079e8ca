"""``toonserve`` command line: serve, download and convert weights, list styles."""

from __future__ import annotations

import argparse
import sys
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
