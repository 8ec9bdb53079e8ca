"""End-to-end pipeline benchmark: our Cartoonizer against the upstream flow, same photos, one run.

    python -m bench.pipeline [--repeat 5] [--json bench/results/pipeline.json]

Photos: a 1024×768 (W×H) one-face portrait (Grace Hopper, widened with reflected borders) and the
four-face composite of devkit/photos.py (1152×768). Ours: CPU float32 and bfloat16 (and CUDA float32,
float16 and bfloat16 when present), median of ``--repeat`` runs, with the per-stage breakdown.

The upstream side is ModelScope's compound flow as ``devkit/upstream.py`` runs it: its own alignment
code, cv2 resizes and warps, and the TensorFlow frozen graphs (built like the official exporter, random
weights), one head pass per face. Its face detector and landmark graphs (``detector.pb``,
``keypoints.pb``) cannot be downloaded here, so the upstream column gets our detector's landmarks
for free: its total excludes face detection, and our ``detect`` stage is shown so the two can be
compared either way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import write_report
from devkit import photos
from devkit.reference_graphs import write_model_dir
from devkit.upstream import UpstreamFlow
from inference.constants import STAGES
from inference.geometry import box_area
from service.factory import loaded_engine
from service.settings import Settings


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("bench/results/pipeline.json"))
    ap.add_argument("--no-upstream", action="store_true", help="skip the TensorFlow upstream flow")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    model = write_model_dir(tmp / "models" / "anime")
    images = {"1 face 1024x768": photos.one_face_1024x768(), "4 faces 1152x768": photos.group(4)}

    configs: list[tuple[str, str, str]] = [("cpu fp32", "cpu", "float32"), ("cpu bf16", "cpu", "bfloat16")]
    if torch.cuda.is_available():
        configs += [(f"cuda {n}", "cuda", d) for n, d in
                    (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"))]  # fmt: skip

    rows: list[dict[str, Any]] = []
    landmarks: dict[str, list[np.ndarray]] = {}
    for name, device, dtype in configs:
        settings = Settings(
            model_dir=tmp / "models",
            cache_dir=tmp / "cache",
            allow_download=False,
            device=device,
            dtype=dtype,
        )
        engine = loaded_engine(settings)
        c = engine.cartoonizer("anime")
        for label, rgb in images.items():
            c.run(rgb)  # warm-up
            results = [c.run(rgb) for _ in range(args.repeat)]
            totals = [sum(r.timings_ms.values()) for r in results]
            stages = {s: median([r.timings_ms[s] for r in results]) for s in STAGES}
            last = results[-1]
            rows.append(dict(engine="toonserve", config=name, image=label, faces=last.faces_stylized,
                             total_ms=median(totals), stages_ms=stages))  # fmt: skip
            if name == "cpu fp32":
                sy, sx = last.processing_size[0] / rgb.shape[0], last.processing_size[1] / rgb.shape[1]
                faces = sorted(
                    (f for f in last.faces if f.stylized), key=lambda f: box_area(f.box), reverse=True
                )
                landmarks[label] = [np.asarray(f.landmarks) * [sx, sy] for f in faces]
        engine.close()

    if not args.no_upstream:
        flow = UpstreamFlow(model.head_pb.read_bytes(), model.bg_pb.read_bytes(), model.path / "alpha.jpg")
        for label, rgb in images.items():
            flow.run(rgb, landmarks[label])
            runs = []
            for _ in range(args.repeat):
                flow.run(rgb, landmarks[label])
                runs.append(dict(flow.timings_ms))
            stages = {s: median([r.get(s, 0.0) for r in runs]) for s in STAGES}
            rows.append(dict(engine="upstream (TF, no detector)", config="cpu fp32 TF", image=label,
                             faces=len(landmarks[label]), total_ms=median([sum(r.values()) for r in runs]),
                             stages_ms=stages))  # fmt: skip
        flow.close()

    cuda_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    env = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
               cuda=cuda_name, repeat=args.repeat)  # fmt: skip
    print(f"# pipeline benchmark  {json.dumps(env)}")
    cols = " ".join(f"{s[:9]:>9}" for s in STAGES)
    print(f"{'engine':27} {'config':12} {'image':17} {'faces':>5} {'total ms':>9} {'vs up':>6}  {cols}")
    upstream = {r["image"]: r["total_ms"] for r in rows if r["engine"].startswith("upstream")}
    for r in rows:
        ratio = upstream.get(r["image"], float("nan")) / r["total_ms"]
        stages = " ".join(f"{r['stages_ms'][s]:9.1f}" for s in STAGES)
        print(
            f"{r['engine']:27} {r['config']:12} {r['image']:17} {r['faces']:>5} {r['total_ms']:9.1f} "
            f"{ratio:5.2f}x  {stages}"
        )
    write_report(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
