"""What ``TOONSERVE_BACKEND=auto`` picks on this machine, what the choice costs at start-up, and
whether the generator pass it measured carries over to whole photos.

    python -m bench.backends [--photos 5] [--json bench/results/backends.json]

1. **Decisions and start-up cost.** For float32 and, where oneDNN has it, bfloat16: a style (demo
   weights in the official architecture) loaded in a fresh process with ``TOONSERVE_BACKEND=onednn``
   (no measuring: the baseline), then with ``auto`` twice on one cache directory, the first start
   exporting the ONNX graphs and caching them beside the converted weights, the second reading them.
   Each start prints the decision: the backend, every candidate's median at 288×288, the ones left
   out and why, and how long deciding took; the load time against the baseline is what ``auto`` adds.
2. **Whole photos.** The same style on each float32 backend (``onednn``, ``eager``, ``onnxruntime``
   where installed) through the whole pipeline, a 1024×768 one-face portrait at the default
   processing size, the backends taking turns ``--photos`` times: median ms per photo and of the
   background and head stages, so a per-pass lead can be checked where the torch stages run between
   the generator calls.

The machine's load average is printed before and after: on a shared machine other processes change
every figure (torch's OpenMP threads suffer more from a busy core than ONNX Runtime's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import write_report


def _child(models: str, cache: str, dtype: str, backend: str) -> None:
    """One start: load the style, print the load time and the decision as JSON."""
    from dataclasses import asdict

    from inference.models import ModelStore

    store = ModelStore(torch.device("cpu"), getattr(torch, dtype), Path(cache), Path(models), False, backend)  # type: ignore[arg-type]
    start = time.perf_counter()
    loaded = store.load("anime")
    load_ms = (time.perf_counter() - start) * 1000
    decision = asdict(loaded.backend) if loaded.backend else None
    print(json.dumps({"load_ms": load_ms, "decision": decision}))


def _start(models: Path, cache: Path, dtype: str, backend: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.backends", "--child", str(models), str(cache), dtype, backend],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def starts(models: Path, tmp: Path) -> list[dict[str, Any]]:
    from inference.dctnet import onednn_usable

    dtypes = ["float32"] + (["bfloat16"] if onednn_usable(torch.device("cpu"), torch.bfloat16) else [])
    rows = []
    for dtype in dtypes:
        baseline = _start(models, tmp / f"cache-{dtype}-onednn", dtype, "onednn")
        rows.append({"dtype": dtype, "start": "onednn (baseline)", **baseline})
        cache = tmp / f"cache-{dtype}-auto"
        for label in ("auto, first start", "auto, graphs cached"):
            result = _start(models, cache, dtype, "auto")
            result["added_ms"] = result["load_ms"] - baseline["load_ms"]
            rows.append({"dtype": dtype, "start": label, **result})
    return rows


def photos_per_backend(models: Path, tmp: Path, repeat: int) -> list[dict[str, Any]]:
    from devkit import photos
    from inference.backends import unavailable
    from inference.faces import create_detector
    from inference.models import ModelStore
    from inference.pipeline import Cartoonizer

    cpu = torch.device("cpu")
    detector = create_detector("mtcnn", cpu)
    pipelines = {}
    for backend in ("onednn", "eager", "onnxruntime"):
        if unavailable(backend, cpu, torch.float32) is None:
            store = ModelStore(cpu, torch.float32, tmp / "cache-photos", models, False, backend)
            pipelines[backend] = Cartoonizer(store.load("anime"), detector)
    rgb = photos.one_face_1024x768()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
    for c in pipelines.values():
        c.run(rgb)  # warm-up at this size
    for _ in range(repeat):
        for name, c in pipelines.items():
            samples[name].append(c.run(rgb).timings_ms)
    rows = []
    for name, runs in samples.items():
        total = statistics.median(sum(t.values()) for t in runs)
        rows.append(
            {
                "backend": name,
                "photo_ms": total,
                "background_ms": statistics.median(t["background"] for t in runs),
                "head_ms": statistics.median(t["head"] for t in runs),
            }
        )
    return rows


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("bench/results/backends.json"))
    args = ap.parse_args()

    from devkit.reference_graphs import write_fast_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    load_before = os.getloadavg()
    start_rows = starts(tmp / "models", tmp)
    photo_rows = photos_per_backend(tmp / "models", tmp, args.photos)
    load_after = os.getloadavg()

    env = dict(
        python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), load_before=load_before, load_after=load_after,
    )  # fmt: skip
    print(f"# backends  {json.dumps(env)}")
    print(f"{'dtype':9} {'start':22} {'load ms':>8} {'added':>7}  decision")
    for r in start_rows:
        d = r["decision"] or {}
        times = ", ".join(f"{k} {v:.0f}" for k, v in d.get("times_ms", {}).items())
        excluded = "; ".join(f"{k}: {v[:60]}" for k, v in d.get("excluded", {}).items())
        added = f"{r['added_ms']:7.0f}" if "added_ms" in r else f"{'':7}"
        print(
            f"{r['dtype']:9} {r['start']:22} {r['load_ms']:8.0f} {added}  {d.get('backend')} "
            f"[{times}] {('excluded ' + excluded) if excluded else ''}"
        )
    print(f"\n{'backend (float32)':18} {'photo ms':>9} {'background':>11} {'head':>7}")
    for r in photo_rows:
        print(f"{r['backend']:18} {r['photo_ms']:9.0f} {r['background_ms']:11.0f} {r['head_ms']:7.0f}")
    write_report(args.json, {"environment": env, "starts": start_rows, "photos": photo_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
