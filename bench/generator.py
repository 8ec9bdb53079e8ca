"""Generator benchmark: the TensorFlow frozen graph against the PyTorch port, same input, one run.

    python -m bench.generator [--repeat 5] [--sizes 720x960,288x288] [--json bench/results/generator.json]

Builds a reference frozen graph exactly like the official exporter (random weights; the real ones
cannot be downloaded here), converts it with our converter, and times on the same photo:
TensorFlow (the graph as ModelScope runs it, one HWC image per call), torch float32 with the
``onednn`` backend (the default on CPU) and the plain ``eager`` backend, torch bfloat16 (and float16
where the CPU supports it), and on CUDA, when present, float32/float16/bfloat16 at batch 1, 8 and 32.
For each: median ms per image, images/s, speed-up over TensorFlow (>1 = faster), and the mean and
max deviation in uint8 levels from TensorFlow's output and from torch float32's.

Portable engines, in the same run and at the same sizes, fed the graph ``toonserve export`` writes
(the official interface: one (H, W, 3) float32 BGR image per call, uint8 out): ONNX Runtime's
CPUExecutionProvider in float32, and in float16 where its CPU kernels take it (the U-Net in
float16, the filter and cast in float32, as the service's fast modes do; its CPU provider has no
bfloat16 kernels), and OpenVINO's CPU plugin (float32, and bfloat16 where the CPU has it) when it is
installed. Each runs with torch's thread count (intra-op threads, one stream, sequential). The
``vs oneDNN`` column is the torch ``onednn`` time of the same precision (float32 for the others)
divided by the row's time: above 1, faster than our default path.
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
from inference.dctnet import DCTNetGenerator, GeneratorRunner, load_generator, onednn_usable

#: (name, precision tag, run: (H, W, 3) float32 BGR → (H, W, 3) uint8 BGR)
Engine = tuple[str, str, Callable[[np.ndarray], np.ndarray]]


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


def _export_graphs(weights: Path, tmp: Path) -> dict[str, Path]:
    """The exported graph in float32 (what ``toonserve export`` writes) and a float16 variant."""
    import onnx
    from torch import Tensor

    from inference.export import OfficialGraph, export_program, trace_onnx

    class HalfUnet(OfficialGraph):
        """The U-Net in float16; normalisation, guided filter and cast in float32 (the fast modes')."""

        def _unet(self, x: Tensor) -> Tensor:
            return super()._unet(x.half()).float()

    paths = {"fp32": tmp / "g.onnx", "fp16": tmp / "g16.onnx"}
    onnx.save_model(trace_onnx(load_generator(weights)).model_proto, str(paths["fp32"]))
    half: DCTNetGenerator = load_generator(weights).half()
    onnx.save_model(export_program(HalfUnet(half)).model_proto, str(paths["fp16"]))
    return paths


def portable_engines(weights: Path, tmp: Path, threads: int) -> list[Engine]:
    """ONNX Runtime and OpenVINO on the exported graphs, each skipped (and said) where not installed."""
    engines: list[Engine] = []
    try:
        paths = _export_graphs(weights, tmp)
    except Exception as exc:  # the onnx extra missing, most likely
        print(f"# no ONNX export ({type(exc).__name__}: {exc}); pip install -e '.[onnx,onnxruntime]'")
        return engines
    try:
        import onnxruntime as ort
    except ImportError:
        print("# ONNX Runtime not installed (pip install -e '.[onnxruntime]')")
    else:
        for tag, path in paths.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # a precision its CPU kernels do not take
                print(f"# onnxruntime {tag}: {str(exc).splitlines()[0][:160]}")
                continue
            engines.append(
                (
                    f"onnxruntime {tag}",
                    tag,
                    lambda x, s=session: s.run(["output_image"], {"input_image": x})[0],
                )
            )
    try:
        import openvino as ov
    except ImportError:
        print("# OpenVINO not installed (pip install -e '.[openvino]')")
        return engines
    core = ov.Core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    model = core.read_model(str(paths["fp32"]))
    hints = {"fp32": "f32"} | ({"bf16": "bf16"} if "BF16" in capabilities else {})
    hints |= {"fp16": "f16"} if "FP16" in capabilities else {}
    for tag, hint in hints.items():
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        request = core.compile_model(model, "CPU", config).create_infer_request()
        engines.append((f"openvino {tag}", tag, lambda x, r=request: r.infer({0: x})[0]))
    return engines


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

    engines = portable_engines(tmp / "g.safetensors", tmp, torch.get_num_threads())

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
        hwc = np.ascontiguousarray(bgr, dtype=np.float32)  # the official input: float32, no batch axis
        for name, _tag, run in engines:
            ms = median_ms(lambda run=run, hwc=hwc: run(hwc), args.repeat)
            out = run(hwc)
            tf_mean, tf_max = deviation(out, tf_out)
            f_mean, f_max = deviation(out, fp32_out["cpu"])
            rows.append(
                dict(
                    config=name, size=f"{h}x{w}", batch=1, ms_per_image=ms,
                    dev_tf_mean=tf_mean, dev_tf_max=tf_max, dev_fp32_mean=f_mean, dev_fp32_max=f_max,
                )
            )  # fmt: skip
        size_rows = [r for r in rows if r["size"] == f"{h}x{w}"]
        onednn = {
            r["config"].split()[1]: r["ms_per_image"] for r in size_rows if r["config"].endswith("onednn")
        }
        for r in size_rows:
            r["images_per_s"] = 1000.0 / r["ms_per_image"]
            r["speedup_vs_tf"] = tf_ms / r["ms_per_image"]
            tag = r["config"].split()[1] if r["config"] != "tensorflow graph" else "fp32"
            reference = onednn.get(tag, onednn.get("fp32"))
            if reference is not None and not r["config"].startswith("cuda"):
                r["speedup_vs_onednn"] = reference / r["ms_per_image"]
    tf_gen.close()

    env = dict(
        python=platform.python_version(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), cuda=torch.cuda.get_device_name() if cuda else None,
        repeat=args.repeat, engines=[name for name, _, _ in engines],
    )  # fmt: skip
    header = f"{'config':20} {'size':>9} {'batch':>5} {'ms/img':>8} {'img/s':>7} {'vs TF':>6} "
    header += f"{'vs oneDNN':>9} {'Δ TF mean/max':>14} {'Δ fp32 mean/max':>16}"
    print(f"# generator benchmark  {json.dumps(env)}")
    print(header)
    for r in rows:
        dev = ""
        if "dev_tf_mean" in r:
            dev = f"{r['dev_tf_mean']:9.4f}/{r['dev_tf_max']:<4} "
            dev += f"{r['dev_fp32_mean']:11.4f}/{r['dev_fp32_max']:<4}"
        vs_onednn = f"{r['speedup_vs_onednn']:8.2f}x" if "speedup_vs_onednn" in r else f"{'':9}"
        print(
            f"{r['config']:20} {r['size']:>9} {r['batch']:>5} {r['ms_per_image']:8.1f} "
            f"{r['images_per_s']:7.2f} {r['speedup_vs_tf']:5.2f}x {vs_onednn} {dev}"
        )
    write_report(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
