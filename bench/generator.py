"""Generator benchmark: the TensorFlow frozen graph against the PyTorch port, same input, one run.

    python -m bench.generator [--repeat 5] [--sizes 720x960,288x288] [--json bench/results/generator.json]

Builds a reference frozen graph exactly like the official exporter (random weights; the real ones
cannot be downloaded here), converts it with our converter, and times on the same photo:
TensorFlow (the graph as ModelScope runs it, one HWC image per call), torch float32 with the
``onednn`` backend (the default on CPU) and the plain ``eager`` backend, torch bfloat16 (and float16
where the CPU supports it), and on CUDA, when present, float32/float16/bfloat16 at batch 1, 8 and 32.
For each: median ms per image, images/s, speed-up over TensorFlow (>1 = faster), and the mean and
max deviation in uint8 levels from TensorFlow's output and from torch float32's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import write_report
from devkit import photos
from devkit.reference_graphs import TFGenerator, build_generator_pb
from inference.convert import convert_pb
from inference.dctnet import GeneratorRunner, load_generator, onednn_usable


def photo_bgr(h: int, w: int) -> np.ndarray:
    from PIL import Image

    rgb = Image.fromarray(photos.grace_hopper()).resize((w, h), Image.BILINEAR)
    return np.asarray(rgb)[:, :, ::-1].copy()


def median_ms(fn: Callable[[], Any], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up: kernels, primitive caches, allocator
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def deviation(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="720x960,288x288")
    ap.add_argument("--cuda-batches", default="1,8,32")
    ap.add_argument("--json", type=Path, default=Path("bench/results/generator.json"))
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    pb = build_generator_pb(seed=1)
    (tmp / "g.pb").write_bytes(pb)
    convert_pb(tmp / "g.pb", tmp / "g.safetensors", "bench", "bg")
    tf_gen = TFGenerator(pb)

    cpu = torch.device("cpu")
    configs: list[tuple[str, torch.device, torch.dtype, str]] = [
        ("torch fp32 onednn", cpu, torch.float32, "onednn"),
        ("torch fp32 eager", cpu, torch.float32, "eager"),
        ("torch bf16 onednn", cpu, torch.bfloat16, "onednn"),
    ]
    if onednn_usable(cpu, torch.float16):
        configs.append(("torch fp16 onednn", cpu, torch.float16, "onednn"))
    configs = [c for c in configs if c[3] != "onednn" or onednn_usable(cpu, c[2])]
    cuda = torch.cuda.is_available()
    if cuda:
        gpu = torch.device("cuda")
        for name, dt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            configs.append((f"cuda {name}", gpu, dt, "eager"))

    rows: list[dict[str, Any]] = []
    for h, w in sizes:
        bgr = photo_bgr(h, w)
        tf_ms = median_ms(lambda bgr=bgr: tf_gen(bgr), args.repeat)
        tf_out = tf_gen(bgr)
        rows.append(dict(config="tensorflow graph", size=f"{h}x{w}", batch=1, ms_per_image=tf_ms))
        x = torch.from_numpy(bgr).permute(2, 0, 1)[None].contiguous()
        fp32_out: dict[str, np.ndarray] = {}
        for name, device, dtype, backend in configs:
            runner = GeneratorRunner(load_generator(tmp / "g.safetensors", device, dtype), backend=backend)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            batches = [int(b) for b in args.cuda_batches.split(",")] if device.type == "cuda" else [1]
            for batch in batches:
                xb = x.to(device).expand(batch, -1, -1, -1).contiguous()
                try:
                    ms = median_ms(lambda xb=xb, runner=runner: runner(xb), args.repeat, sync) / batch
                except torch.OutOfMemoryError:
                    continue
                out = runner(x.to(device))[0].permute(1, 2, 0).cpu().numpy()
                if dtype == torch.float32:
                    fp32_out[device.type] = out
                ref32 = fp32_out.get(device.type, fp32_out.get("cpu"))
                tf_mean, tf_max = deviation(out, tf_out)
                f_mean, f_max = deviation(out, ref32) if ref32 is not None else (float("nan"), -1)
                rows.append(
                    dict(
                        config=name, size=f"{h}x{w}", batch=batch, ms_per_image=ms,
                        dev_tf_mean=tf_mean, dev_tf_max=tf_max, dev_fp32_mean=f_mean, dev_fp32_max=f_max,
                    )
                )  # fmt: skip
        for r in rows:
            if r["size"] == f"{h}x{w}":
                r["images_per_s"] = 1000.0 / r["ms_per_image"]
                r["speedup_vs_tf"] = tf_ms / r["ms_per_image"]
    tf_gen.close()

    env = dict(
        python=platform.python_version(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), cuda=torch.cuda.get_device_name() if cuda else None,
        repeat=args.repeat,
    )  # fmt: skip
    header = f"{'config':20} {'size':>9} {'batch':>5} {'ms/img':>8} {'img/s':>7} {'vs TF':>6} "
    header += f"{'Δ TF mean/max':>14} {'Δ fp32 mean/max':>16}"
    print(f"# generator benchmark  {json.dumps(env)}")
    print(header)
    for r in rows:
        dev = ""
        if "dev_tf_mean" in r:
            dev = f"{r['dev_tf_mean']:9.4f}/{r['dev_tf_max']:<4} "
            dev += f"{r['dev_fp32_mean']:11.4f}/{r['dev_fp32_max']:<4}"
        print(
            f"{r['config']:20} {r['size']:>9} {r['batch']:>5} {r['ms_per_image']:8.1f} "
            f"{r['images_per_s']:7.2f} {r['speedup_vs_tf']:5.2f}x {dev}"
        )
    write_report(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
