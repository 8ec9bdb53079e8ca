"""``toonserve`` command line: serve, download, convert, export or write demo weights, list styles."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from inference.errors import ToonserveError
from inference.models import DtypeSetting
from inference.styles import STYLES, get_style
from inference.weights import (
    StyleWeights,
    download,
    ensure_converted,
    find_source_dir,
    install_demo,
    resolve,
)
from service import jobs_cli
from service.folders import photos_in
from service.option_flags import add_option_flags, options_from
from service.progress import Progress

if TYPE_CHECKING:
    from service.settings import Settings
    from serving.flow import Flow
    from serving.options import ResolvedOptions


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` before anything loads, so a port in use fails at once with a
    clear message (and the service never logs that it is loading or ready)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.logs import configure
    from service.settings import get_settings

    settings = get_settings()
    host = args.host or settings.host
    port = args.port or settings.port
    try:
        sock = _listen(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # our middleware logs every request, with its request id
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache_dir is not None:
        return Path(args.cache_dir)
    from service.settings import get_settings

    return get_settings().cache_dir


def _cmd_download(args: argparse.Namespace) -> int:
    cache = _cache_dir(args)
    if args.format == "onnx" and (args.output is None or len(args.styles) != 1):
        print("error: --format onnx takes one STYLE and --output DIR", file=sys.stderr)
        return 2
    if args.format != "onnx" and args.output is not None:
        print("error: --output is where --format onnx writes; add --format onnx", file=sys.stderr)
        return 2
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
        if args.format == "onnx":
            _export_onnx(weights, Path(args.output))
    return 0


def _export_onnx(weights: StyleWeights, output: Path) -> None:
    """Export ``weights`` to ONNX into ``output`` and say what was written and how it was checked."""
    from inference.export import export_style

    print(f"exporting {weights.style} to ONNX into {output} ...", flush=True)
    result = export_style(weights, output)
    for graph in result.graphs.values():
        check = graph.check.describe() if graph.check else "not run (pip install 'toonserve[onnxruntime]')"
        print(f"{graph.path}: checked with {check}")
    print(f"{result.card}: the model card (source, interface, checks, licence)")
    if result.demo:
        print("note: these are demo weights (random, not real cartoons)")


def _cmd_export(args: argparse.Namespace) -> int:
    """Export a style's generators (resolved like the service resolves them) to portable files."""
    from service.settings import get_settings

    settings = get_settings()
    cache = Path(args.cache_dir) if args.cache_dir is not None else settings.cache_dir
    weights = resolve(args.style, cache, settings.model_dir, settings.allow_download)
    _export_onnx(weights, Path(args.output))
    return 0


def _cmd_demo_weights(args: argparse.Namespace) -> int:
    from service.settings import get_settings

    settings = get_settings()
    cache = Path(args.cache_dir) if args.cache_dir is not None else settings.cache_dir
    failed = 0
    for name in args.styles or settings.styles:
        try:
            weights = install_demo(name, cache, settings.model_dir)
        except ToonserveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{name}: demo weights (random, not real cartoons) in {cache / 'models' / name}, "
            f"converted into {weights.head.parent}"
        )
    if failed < len(args.styles or settings.styles):
        print(
            "Start the service (make serve, or toonserve serve) with the same TOONSERVE_CACHE_DIR: these "
            "styles answer with demo weights, marked source: demo. toonserve download STYLE fetches "
            "the real ones, which replace them (restart the service after)."
        )
    return 1 if failed else 0


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


#: Photos the CLI keeps in flight, so one's decode and encode overlap another's model work.
_IN_FLIGHT = 2


def _cmd_cartoonize(args: argparse.Namespace) -> int:
    """Cartoonize every photo of a folder into another folder, or a video into a cartoon video, through
    the service's own engine and request flow, with every setting the service honours (command-line
    flags override them)."""
    from service.factory import build_flow, loaded_engine

    src, dst = Path(args.input), Path(args.output)
    if src.is_file():
        return _cartoonize_video(args, src, dst)
    photos = photos_in(src)
    settings = _cli_settings(args)
    options = options_from(args)  # out of range: said before the models load
    engine = loaded_engine(settings, options.style)
    try:
        flow = build_flow(settings, engine)
        try:
            params = flow.options(options)
            dst.mkdir(parents=True, exist_ok=True)
            suffix = params.suffix
            failures = asyncio.run(_cartoonize_all(flow, params, photos, dst, suffix))
        finally:
            flow.close()
    finally:
        engine.close(drain=False)
    print(f"{len(photos) - failures} of {len(photos)} photos written to {dst}")
    return 1 if failures else 0


def _cli_settings(args: argparse.Namespace) -> Settings:
    """The service's settings with the command line's overrides."""
    from service.settings import get_settings

    overrides = {
        key: value
        for key, value in (
            ("device", args.device),
            ("dtype", args.dtype),
            ("cache_dir", Path(args.cache_dir) if args.cache_dir else None),
        )
        if value is not None
    }
    return get_settings().model_copy(update=overrides)


def _cartoonize_video(args: argparse.Namespace, src: Path, dst: Path) -> int:
    """One video into a cartoon video (MP4, H.264; the input's frame count, timing, rotation and
    audio), faces tracked and frames steadied; a run stopped mid-way resumes from where it was."""
    from service.factory import build_flow, loaded_engine
    from serving.clips import ClipFlow
    from serving.video import probe_video

    settings = _cli_settings(args)
    options = options_from(args)
    clip_limits = settings.video_limits
    info = probe_video(src, clip_limits)  # not a video, or too long: said before the models load
    engine = loaded_engine(settings, options.style)
    try:
        flow = build_flow(settings, engine)
        try:
            params = flow.options(options)
            progress = Progress(info.frames, unit="frames")
            clips = ClipFlow(flow, clip_limits, steady=not args.no_steady)
            dst.parent.mkdir(parents=True, exist_ok=True)
            report = asyncio.run(
                clips.run(src, dst, params, on_progress=lambda done, _: progress.update(done, src.name))
            )
            progress.close()
        finally:
            flow.close()
    finally:
        engine.close(drain=False)
    resumed = f", resumed at frame {report.resumed_from}" if report.resumed_from else ""
    audio = report.audio.note or f"audio {report.audio.action}"
    print(
        f"{report.frames} frames ({report.size[0]}×{report.size[1]}) written to {dst} at "
        f"{report.frames_per_s:.2f} frames/s{resumed}; {audio}"
    )
    return 0


async def _cartoonize_all(
    flow: Flow, params: ResolvedOptions, photos: list[Path], dst: Path, suffix: str
) -> int:
    """Every photo through the flow, a few in flight; failures are reported and counted."""
    progress = Progress(len(photos))
    slots = asyncio.Semaphore(_IN_FLIGHT)
    failures = 0

    async def one(path: Path) -> None:
        nonlocal failures
        async with slots:
            try:
                outcome = await flow.run(path.read_bytes(), params)
                (dst / f"{path.stem}.{suffix}").write_bytes(outcome.data)
            except ToonserveError as exc:
                failures += 1
                if progress.tty:
                    sys.stderr.write("\n")
                sys.stderr.write(f"{path.name}: {exc}\n")
            progress.step(path.name)

    await asyncio.gather(*(one(p) for p in photos))
    progress.close()
    return failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toonserve", description="DCT-Net cartoon service and tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('toonserve')}")
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
    dl.add_argument(
        "--format",
        choices=["safetensors", "onnx"],
        default="safetensors",
        help="safetensors: convert into the cache for serving (default); onnx: then also export the "
        "style's two generators to ONNX files in --output (one STYLE)",
    )
    dl.add_argument("--output", metavar="DIR", help="where --format onnx writes its files (created)")
    dl.set_defaults(func=_cmd_download)

    demo = sub.add_parser(
        "demo-weights",
        help="write demo weights (random, official architecture; not real cartoons) for a machine "
        "without ModelScope",
    )
    demo.add_argument(
        "styles", nargs="*", metavar="STYLE", help=f"{', '.join(STYLES)}; default: TOONSERVE_STYLES"
    )
    demo.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    demo.set_defaults(func=_cmd_demo_weights)

    conv = sub.add_parser("convert", help="convert a local ModelScope directory of one style")
    conv.add_argument("style", choices=list(STYLES), metavar="STYLE", help=", ".join(STYLES))
    conv.add_argument("source", help="directory with cartoon_h.pb, cartoon_bg.pb and alpha.jpg")
    conv.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    conv.set_defaults(func=_cmd_convert)

    ex = sub.add_parser(
        "export",
        help="export a style's generators to ONNX with the official graphs' inputs and outputs, "
        "with a model card",
    )
    ex.add_argument("style", choices=list(STYLES), metavar="STYLE", help=", ".join(STYLES))
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (onnx)")
    ex.add_argument("--output", required=True, metavar="DIR", help="where the files go (created)")
    ex.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    ex.set_defaults(func=_cmd_export)

    cz = sub.add_parser(
        "cartoonize", help="cartoonize a folder of photos into another folder, or a video into a video"
    )
    cz.add_argument(
        "input",
        help="folder of photos (jpg, png, webp, bmp, tiff, gif), or a video (mp4, mov, webm, mkv, gif)",
    )
    cz.add_argument("output", help="folder for the results (created), or the cartoon video (.mp4)")
    cz.add_argument(
        "--no-steady",
        action="store_true",
        help="video: cartoonize each frame on its own (no face tracking, no steadying; for comparison)",
    )
    add_option_flags(cz)
    cz.add_argument("--device", help="override TOONSERVE_DEVICE")
    cz.add_argument("--dtype", choices=list(get_args(DtypeSetting)), help="override TOONSERVE_DTYPE")
    cz.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    cz.set_defaults(func=_cmd_cartoonize)

    st = sub.add_parser("styles", help="list the styles and whether their weights are on this machine")
    st.add_argument("--cache-dir", help="override TOONSERVE_CACHE_DIR")
    st.set_defaults(func=_cmd_styles)

    jobs_cli.add_parser(sub)
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
