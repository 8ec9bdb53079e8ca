"""int8 generators (``TOONSERVE_DTYPE=int8``): their speed against TensorFlow's pass and torch's, and
their deviation from float32, in one run.

    python -m bench.int8 [--repeat 7] [--sizes 720x960,288x288] [--picture docs/int8-worst.png]
                         [--json bench/results/int8.json]

Weights: the demo weights (random, in the official architecture; head seed 1, background seed 2),
and the TensorFlow frozen graph of the same background weights as the reference pass; or, with
``--cache-dir DIR [--style anime]``, a real style's converted weights from that cache and its
``cartoon_bg.pb`` (``toonserve download anime --cache-dir DIR`` puts both there), copied into a
temporary cache so that the int8 graphs are made afresh.

1. **Making the int8 graphs**, from the converted weights in a fresh cache: the float32 export, then
   each network's calibration and quantization (:mod:`inference.quantize`), timed.
2. **Speed**, per size, on a photo (Grace Hopper resized): TensorFlow's frozen graph, torch float32
   and bfloat16 (``onednn``), ONNX Runtime float32 and int8 as the service runs them
   (:class:`inference.ort.OnnxRuntimeRunner`), the engines taking turns ``--repeat`` times; medians,
   and each as a share of TensorFlow's time measured in the same rounds.
3. **Deviation from float32** (torch ``eager``, exact to TensorFlow within a level), in levels 0–255,
   mean, 99th percentile and max, for int8 and, beside it, bfloat16: the background network on the
   calibration photos and on photos it was not calibrated on (scikit-image's rocket, motorcycle,
   retina, Hubble deep field), each at the default processing size; the head network on the face
   crops of the two portraits and their mirror images (no other real face ships in these packages).
4. **A whole photo**: the one-face 1024×768 portrait through the pipeline in float32, bfloat16 and
   int8, taking turns: ms per photo and per generator stage, and the result's deviation from
   float32's.
5. **The worst case**: the photo and the 128×128 region with the largest int8 deviation, drawn as
   photo | float32 | int8 | the difference amplified (``--picture``).
6. **What ``TOONSERVE_DTYPE=auto`` would decide** given these figures
   (:func:`inference.models.choose_dtype` with the evidence).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.report import write_report
from devkit import photos
from devkit.reference_graphs import TFGenerator, build_generator_pb, write_fast_model_dir
from inference import quantize
from inference.backends import build
from inference.constants import DEFAULT_PROCESSING_SIZE
from inference.models import Int8Evidence, choose_dtype
from inference.quantize import CalibrationPhoto, Deviation
from inference.weights import StyleWeights, resolve

#: Photos the background network is measured on that it was not calibrated on (scikit-image).
HELD_OUT: tuple[CalibrationPhoto, ...] = tuple(
    CalibrationPhoto(name, "skimage", "scikit-image", f"data/{file}", False)
    for name, file in (
        ("rocket", "rocket.jpg"),
        ("motorcycle", "motorcycle_left.png"),
        ("retina", "retina.jpg"),
        ("hubble", "hubble_deep_field.jpg"),
    )
)
#: Side of the worst region drawn.
REGION = 128
HEAD_SEED, BG_SEED = 1, 2

Run = Callable[[], Any]


def photo_bgr(h: int, w: int) -> np.ndarray:
    rgb = Image.fromarray(photos.grace_hopper()).resize((w, h), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


#: Pause before each timed pass: TensorFlow's and torch's idle threads spin for a while after their
#: pass, and would take cores from the next engine's.
SETTLE_S = 0.1


def interleaved(runs: dict[str, Run], repeat: int) -> dict[str, float]:
    """Median ms of each run, the runs taking turns (each round starting with the next one) so that a
    slow spell of a shared machine falls on all of them, each after :data:`SETTLE_S`."""
    for run in runs.values():
        run()  # warm-up at this size
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            runs[name]()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(times) for name, times in samples.items()}


def _weights(cache_dir: Path | None, style: str, work: Path) -> tuple[StyleWeights, bytes]:
    """The converted weights to measure, copied into ``work``'s converted cache (so the int8 graphs
    are made afresh there and the real cache is left as it is), and the background network's frozen
    graph: the demo weights and a TensorFlow-built graph of them, or a real style's."""
    from inference.styles import get_style
    from inference.weights import candidate_dirs, converted_dir, find_source_dir

    if cache_dir is None:
        models = work.parent / "models"
        write_fast_model_dir(models / style, head_seed=HEAD_SEED, bg_seed=BG_SEED)
        return resolve(style, work, models, allow_download=False), build_generator_pb(BG_SEED)
    source = resolve(style, cache_dir, None, allow_download=False)
    sources = [find_source_dir(d) for d in candidate_dirs(get_style(style), cache_dir, None)]
    found = next((d for d in sources if d is not None), None)
    if found is None:
        raise SystemExit(f"no {style} .pb graphs under {cache_dir}/models: toonserve download {style}")
    target = converted_dir(get_style(style), work)
    target.mkdir(parents=True)
    for path in source.head.parent.iterdir():
        if path.suffix in (".safetensors", ".jpg", ".json"):
            shutil.copyfile(path, target / path.name)
    return resolve(style, work, None, allow_download=False), found.bg.read_bytes()


def make_graphs(weights: StyleWeights) -> dict[str, float]:
    """Seconds to export both float32 graphs, then to calibrate and quantize each network."""
    from inference.ort import graph

    seconds = {}
    start = time.perf_counter()
    for path in (weights.bg, weights.head):
        graph(path)
    seconds["export"] = time.perf_counter() - start
    for role, path in (("bg", weights.bg), ("head", weights.head)):
        start = time.perf_counter()
        quantize.int8_graph(path)
        seconds[role] = time.perf_counter() - start
    return seconds


def speed(
    weights: StyleWeights, tf_gen: TFGenerator, sizes: Sequence[tuple[int, int]], repeat: int
) -> list[dict[str, Any]]:
    cpu = torch.device("cpu")
    runners = {
        "torch float32 onednn": build("onednn", weights, cpu, torch.float32).bg,
        "torch bfloat16 onednn": build("onednn", weights, cpu, torch.bfloat16).bg,
        "onnxruntime float32": build("onnxruntime", weights, cpu, torch.float32).bg,
        "onnxruntime int8": build("onnxruntime", weights, cpu, torch.int8).bg,
    }
    rows = []
    for h, w in sizes:
        bgr = photo_bgr(h, w)
        x = torch.from_numpy(bgr).permute(2, 0, 1)[None].contiguous()
        runs: dict[str, Run] = {"tensorflow graph": partial(tf_gen, bgr)}
        runs |= {name: partial(runner, x) for name, runner in runners.items()}
        medians = interleaved(runs, repeat)
        tf_ms = medians["tensorflow graph"]
        for name, ms in medians.items():
            rows.append({"engine": name, "size": f"{h}x{w}", "ms": ms, "vs_tf": ms / tf_ms})
    return rows


def whole_photo(style: str, cache: Path, repeat: int) -> list[dict[str, Any]]:
    """The one-face 1024×768 photo through the whole pipeline in float32, bfloat16 and int8, taking
    turns: median ms per photo and per generator stage, and the result's deviation from float32's."""
    from inference.faces import create_detector
    from inference.models import ModelStore
    from inference.pipeline import Cartoonizer

    cpu = torch.device("cpu")
    detector = create_detector("mtcnn", cpu)
    configs = {"float32": ("onednn", torch.float32), "bfloat16": ("onednn", torch.bfloat16)}
    configs["int8"] = ("onnxruntime", torch.int8)
    pipelines = {
        name: Cartoonizer(ModelStore(cpu, dtype, cache, None, False, backend).load(style), detector)  # type: ignore[arg-type]
        for name, (backend, dtype) in configs.items()
    }
    rgb = photos.one_face_1024x768()
    images = {name: c.run(rgb).image for name, c in pipelines.items()}  # also the warm-up at this size
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
    for r in range(repeat):
        names = list(pipelines)
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            samples[name].append(pipelines[name].run(rgb).timings_ms)
    rows = []
    for name, runs in samples.items():
        dev = Deviation.of([images[name]], [images["float32"]])
        rows.append(
            {
                "dtype": name,
                "photo_ms": statistics.median(sum(t.values()) for t in runs),
                "background_ms": statistics.median(t["background"] for t in runs),
                "head_ms": statistics.median(t["head"] for t in runs),
                **{f"result_{k}": v for k, v in vars(dev).items()},
            }
        )
    return rows


def _hwc(runner: Any, image: np.ndarray) -> np.ndarray:
    out: np.ndarray = runner(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    return out


def deviations(weights: StyleWeights) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The deviation table, and the worst case (its images)."""
    cpu = torch.device("cpu")
    exact = build("eager", weights, cpu, torch.float32)
    fast = {
        "int8": build("onnxruntime", weights, cpu, torch.int8),
        "bfloat16": build("onednn", weights, cpu, torch.bfloat16),
    }
    sets: dict[str, tuple[str, list[tuple[str, np.ndarray]]]] = {
        "bg, calibration photos": (
            "bg",
            [
                (p.name, quantize.background_input(p.read(), DEFAULT_PROCESSING_SIZE))
                for p in quantize.CALIBRATION_PHOTOS
            ],
        ),
        "bg, held-out photos": (
            "bg",
            [(p.name, quantize.background_input(p.read(), DEFAULT_PROCESSING_SIZE)) for p in HELD_OUT],
        ),
        "head, face crops": (
            "head",
            [
                (f"{p.name}{' mirrored' if k else ''}", crop)
                for p in quantize.CALIBRATION_PHOTOS
                if p.portrait
                for k, crop in enumerate(quantize.head_inputs(p.read()))
            ],
        ),
    }
    rows: list[dict[str, Any]] = []
    worst: dict[str, Any] = {"score": (-1, -1.0)}
    for label, (role, images) in sets.items():
        refs = [_hwc(getattr(exact, role), image) for _, image in images]
        for dtype, candidate in fast.items():
            outs = [_hwc(getattr(candidate, role), image) for _, image in images]
            dev = Deviation.of(outs, refs)
            per_image = {
                name: round(Deviation.of([o], [r]).mean, 4)
                for (name, _), o, r in zip(images, outs, refs, strict=True)
            }
            rows.append(
                {
                    "dtype": dtype,
                    "set": label,
                    "images": len(images),
                    **vars(dev),
                    "per_image_mean": per_image,
                }
            )
            if dtype != "int8":
                continue
            for (name, image), out, ref in zip(images, outs, refs, strict=True):
                diff = np.abs(out.astype(np.int16) - ref.astype(np.int16)).max(axis=2)
                region = _worst_region(diff)
                score = (int(diff.max()), float(diff[region].mean()))
                if score > worst["score"]:
                    worst = {
                        "score": score,
                        "set": label,
                        "photo": name,
                        "region": region,
                        "input": image,
                        "ref": ref,
                        "out": out,
                    }
    return rows, worst


def _worst_region(diff: np.ndarray) -> tuple[slice, slice]:
    """The REGION×REGION window (or the whole image, if smaller) with the largest mean deviation."""
    h, w = diff.shape
    size_y, size_x = min(REGION, h), min(REGION, w)
    sums = np.pad(diff.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    window = (
        sums[size_y:, size_x:] - sums[:-size_y, size_x:] - sums[size_y:, :-size_x] + sums[:-size_y, :-size_x]
    )
    y, x = np.unravel_index(int(window.argmax()), window.shape)
    return slice(int(y), int(y) + size_y), slice(int(x), int(x) + size_x)


def draw_worst(worst: dict[str, Any], path: Path) -> int:
    """photo | float32 | int8 | the difference amplified, of the worst region, each ×2 (nearest) and
    labelled; the difference is scaled so that its largest value is white. Returns the factor."""
    region = worst["region"]
    photo = np.clip(worst["input"][region], 0, 255).astype(np.uint8)
    ref, out = worst["ref"][region], worst["out"][region]
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16)).max(axis=2)
    factor = max(1, 255 // max(1, int(diff.max())))
    amplified = np.repeat(np.clip(diff * factor, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    panels = [p[:, :, ::-1] for p in (photo, ref, out)] + [amplified]  # BGR → RGB
    labels = ("photo", "float32", "int8", f"|int8 - float32| x {factor} (max {int(diff.max())})")
    scale, gap, top = 2, 6, 20
    h, w = ref.shape[0] * scale, ref.shape[1] * scale
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * gap, h + top), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (panel, label) in enumerate(zip(panels, labels, strict=True)):
        image = Image.fromarray(np.ascontiguousarray(panel)).resize((w, h), Image.Resampling.NEAREST)
        canvas.paste(image, (k * (w + gap), top))
        draw.text((k * (w + gap) + 2, 4), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return factor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", default="720x960,288x288")
    ap.add_argument("--picture", type=Path, default=Path("docs/int8-worst.png"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/int8.json"))
    ap.add_argument(
        "--cache-dir",
        type=Path,
        help="measure the real weights of --style converted in this toonserve cache (its models/<style>/ "
        "must hold the .pb graphs, TensorFlow's reference) instead of the demo weights",
    )
    ap.add_argument("--style", default="anime")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-int8-"))
    weights, bg_pb = _weights(args.cache_dir, args.style, tmp / "cache")
    load_before = os.getloadavg()
    made = make_graphs(weights)
    tf_gen = TFGenerator(bg_pb)
    speed_rows = speed(weights, tf_gen, sizes, args.repeat)  # type: ignore[arg-type]
    tf_gen.close()
    dev_rows, worst = deviations(weights)
    photo_rows = whole_photo(weights.style, tmp / "cache", max(3, args.repeat // 2))
    load_after = os.getloadavg()
    factor = draw_worst(worst, args.picture)

    first = f"{sizes[0][0]}x{sizes[0][1]}"
    at = {r["engine"]: r["ms"] for r in speed_rows if r["size"] == first}
    without = choose_dtype("auto", torch.device("cpu"))
    other = f"torch {without.name} onednn"
    calibration = [r for r in dev_rows if r["dtype"] == "int8" and r["set"] != "bg, held-out photos"]
    pooled_mean = sum(r["mean"] * r["images"] for r in calibration) / sum(r["images"] for r in calibration)
    evidence = Int8Evidence(
        pooled_mean,
        at["onnxruntime int8"],
        at.get(other, at["torch float32 onednn"]),
        "the calibration photos",
    )
    decision = choose_dtype("auto", torch.device("cpu"), "auto", evidence)

    env = dict(
        python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), repeat=args.repeat,
        load_before=load_before, load_after=load_after,
    )  # fmt: skip
    print(f"# int8 benchmark  {json.dumps(env)}")
    print(
        f"making the int8 graphs: export {made['export']:.1f} s (both networks); calibrate + quantize: "
        f"background {made['bg']:.1f} s ({len(quantize.CALIBRATION_PHOTOS)} photos at short side "
        f"{quantize.CALIBRATION_SIDE}), head {made['head']:.1f} s (face crops 288×288)"
    )
    print(f"\n{'engine':24} {'size':>9} {'ms':>8} {'vs TF':>7}")
    for r in speed_rows:
        print(f"{r['engine']:24} {r['size']:>9} {r['ms']:8.1f} {r['vs_tf']:6.3f}x")
    print(f"\n{'deviation from float32':34} {'n':>3} {'mean':>7} {'p99':>5} {'max':>4} {'identical':>10}")
    for r in dev_rows:
        print(
            f"{r['dtype'] + ' ' + r['set']:34} {r['images']:3} {r['mean']:7.3f} {r['p99']:5g} {r['max']:4} "
            f"{r['identical']:9.2%}"
        )
    print(
        f"\n{'whole 1024x768 photo':20} {'ms':>7} {'background':>10} {'head':>6} "
        f"{'result vs float32: mean/p99/max':>32}"
    )
    for r in photo_rows:
        print(
            f"{r['dtype']:20} {r['photo_ms']:7.0f} {r['background_ms']:10.0f} {r['head_ms']:6.0f} "
            f"{r['result_mean']:21.3f}/{r['result_p99']:g}/{r['result_max']}"
        )
    region = worst["region"]
    print(
        f"\nworst case: {worst['photo']} ({worst['set']}), rows {region[0].start}-{region[0].stop}, columns "
        f"{region[1].start}-{region[1].stop}: max {worst['score'][0]} levels, mean {worst['score'][1]:.2f} "
        f"in the region → {args.picture} (difference × {factor})"
    )
    print(f"auto, given these figures: {decision.name} ({decision.reason})")
    report = {
        "environment": env,
        "made_s": made,
        "speed": speed_rows,
        "deviation": dev_rows,
        "whole_photo": photo_rows,
        "worst": {k: worst[k] for k in ("set", "photo", "score")}
        | {"region": [[s.start, s.stop] for s in region]},
        "auto": {"dtype": decision.name, "reason": decision.reason},
    }
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
