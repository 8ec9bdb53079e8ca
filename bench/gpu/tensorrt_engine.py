"""Section ``tensorrt``: the exported ONNX graph as a float16 TensorRT engine, against torch.

Optional twice over: it needs the ``onnx`` extra for the export and the ``tensorrt`` wheels (not a
dependency of the project); without either the section says so and the run goes on. The background
generator is exported as ``toonserve export`` writes it (:func:`inference.export.export_style`: the
official interface, ``input_image`` float32 (H, W, 3) BGR → ``output_image`` uint8, one image per
call), parsed by TensorRT's ONNX parser and built with one optimization profile over
:attr:`~bench.gpu.common.Plan.trt_profile`, in two ways, the first one first:

* ``fp16 U-Net, filter fp32``: float16 allowed, the layers outside the U-Net (the input's scaling, the
  guided filter, the output's scaling) pinned to float32 and TF32 off, which is the service's own
  precision rule (docs/model.md §2.4: the box means of ``E[x²] - E[x]²`` cancel, a 10-bit mantissa
  leaves noise); the U-Net is the first 18 convolutions of the network and what lies between them;
* ``fp16 everywhere``: ``BuilderFlag.FP16`` alone, what a plain ``trtexec --fp16`` build does.

Each engine runs at :attr:`~bench.gpu.common.Plan.trt_sizes` (batch 1, as the interface takes it);
its output is compared with torch float32 on the device (the exact mode) and with torch's eager
float16, and timed beside torch's eager float16 passes/s (the ``generator`` section's figure when it
ran, else measured here). Should the parser or the builder refuse the graph's uint8 output, the
engine is built again with the final cast taken out (``Identity``, float32 out) and the truncating
cast done in torch, and the row says so.

Each build runs in a child process (:mod:`bench.gpu.trt_build`) that is killed when the section's
time is up, since a build cannot be stopped in process: a build stopped so, or one not started for
want of time, is reported as skipped; one that TensorRT refuses is an error (the section fails, the
run goes on).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from bench.gpu.common import Context, cudnn_benchmark, photo_bgr, runner, sync, table, throughput
from bench.gpu.trt_build import TrtError, make_logger
from inference.export import INPUT_NAME, OUTPUT_NAME, export_style

TRT_MISSING = "pip install tensorrt (the NVIDIA wheels) to compare"
ONNX_MISSING = "pip install 'toonserve[onnx]' (the onnx extra) to export the graph"
#: Convolutions of the U-Net (10 plain, 4 residual blocks of 2) and of the guided filter (3 box means).
UNET_CONVS = 18
FILTER_CONVS = 3
#: The two builds, in the order they are tried; True: the layers outside the U-Net pinned to float32.
VARIANTS = (("fp16 U-Net, filter fp32", True), ("fp16 everywhere", False))
#: Seconds a build is given at least (else it is not started), and kept back for running the engine.
MIN_BUILD_S = 20.0
MEASURE_S = 10.0


class TrtTimeout(TrtError):
    """A build stopped at its time limit: the budget's doing, not TensorRT's (reported as skipped)."""


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """The ``tensorrt`` module and its version, or None and why not (the wheels can also fail to
    load their libraries, hence any exception)."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"[:300]
    return tensorrt, str(getattr(tensorrt, "__version__", "?"))


def section_tensorrt(ctx: Context, deadline: float) -> dict[str, Any]:
    trt, version = import_tensorrt()
    result: dict[str, Any] = dict(tensorrt=version if trt is not None else f"not importable ({version})")
    if trt is None and not ctx.plan.dry:  # on the GPU nothing to prove without it: keep the time
        return _skipped(result, TRT_MISSING)
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return _skipped(result, f"{ONNX_MISSING} (missing: {', '.join(missing)})")
    start = time.perf_counter()
    export = export_style(ctx.weights, ctx.tmp / "onnx", check=False)
    path = export.graphs["bg"].path
    data = path.read_bytes()
    result["onnx"] = dict(
        file=path.name,
        mib=round(len(data) / 2**20, 2),
        export_s=round(time.perf_counter() - start, 1),
        **onnx_layout(data),
    )
    print(
        f"\n== tensorrt: exported {path.name} ({result['onnx']['mib']} MiB, {result['onnx']['nodes']} nodes, "
        f"{result['onnx']['convolutions']} convolutions) in {result['onnx']['export_s']} s"
    )
    if ctx.plan.dry:
        # What the GPU run relies on, checked on the tiny graph: the float-output fallback is valid
        # and, where ONNX Runtime is installed, gives the uint8 graph's bytes once truncated; the
        # build's child process starts, and reports why it could not build here.
        result["float_output_check"] = _check_float_output(data)
        try:
            build_in_child(ctx, path, True, 60.0)
            result["child_build"] = "built (unexpected on a CPU)"
        except TrtError as exc:
            result["child_build"] = f"reported: {exc}"[:300]
        print(
            f"   float-output graph: {result['float_output_check']}\n   build child: {result['child_build']}"
        )
    if trt is None:
        return _skipped(result, TRT_MISSING)
    if ctx.plan.dry:
        return _skipped(result, "a dry run: TensorRT builds for a CUDA device")
    rows = _engines(ctx, trt, path, deadline)
    result["rows"] = rows
    result["profile"] = [f"{h}x{w}" for h, w in ctx.plan.trt_profile]
    _print(ctx, result)
    failed = [r for r in rows if "error" in r]
    if failed:
        result["error"] = f"{len(failed)} of {len(rows)} TensorRT builds failed; first: {failed[0]['error']}"
    return result


def _skipped(result: dict[str, Any], reason: str) -> dict[str, Any]:
    result["skipped"] = reason
    print(f"\n== tensorrt: skipped: {reason}\n   tensorrt: {result['tensorrt']}")
    return result


def onnx_layout(data: bytes) -> dict[str, Any]:
    """Nodes, convolutions, and whether the first :data:`UNET_CONVS` convolutions are the U-Net's (their
    weights named ``generator.…``) and the rest the filter's: what pinning the filter relies on."""
    import onnx

    model = onnx.load_from_string(data)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    unet = [any(i.startswith("generator.") for i in n.input) for n in convs]
    output = [n.op_type for n in model.graph.node if OUTPUT_NAME in n.output]
    return dict(
        nodes=len(model.graph.node),
        convolutions=len(convs),
        unet_first=unet == [True] * UNET_CONVS + [False] * FILTER_CONVS,
        output_op=output[0] if output else None,
    )


def float_output(data: bytes) -> bytes:
    """The graph with its final cast to uint8 made an ``Identity``: float32 out, values 0..255, which a
    truncating cast (``tensor.to(torch.uint8)``) turns into the graph's own output."""
    import onnx

    model = onnx.load_from_string(data)
    for node in model.graph.node:
        if OUTPUT_NAME in node.output and node.op_type == "Cast":
            node.op_type = "Identity"
            del node.attribute[:]
            break
    else:
        raise ValueError(f"no Cast node makes {OUTPUT_NAME}")
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return bytes(model.SerializeToString())


def _check_float_output(data: bytes) -> dict[str, Any]:
    import onnx

    changed = float_output(data)
    onnx.checker.check_model(onnx.load_from_string(changed))
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError:
        return dict(checker="passed", onnxruntime="not installed")
    image = photo_bgr(64, 64)[0].permute(1, 2, 0).float().numpy()
    outs = [
        ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(
            [OUTPUT_NAME], {INPUT_NAME: image}
        )[0]
        for graph in (data, changed)
    ]
    same = bool(np.array_equal(outs[0], outs[1].astype(np.uint8)))
    if not same:
        raise AssertionError("the float-output graph, truncated, does not give the uint8 graph's bytes")
    return dict(checker="passed", onnxruntime=f"64x64: truncated float output == uint8 output: {same}")


# --- TensorRT --------------------------------------------------------------------------------------


def build_in_child(ctx: Context, graph: Path, pin: bool, timeout_s: float) -> tuple[Path, dict[str, Any]]:
    """:mod:`bench.gpu.trt_build` on ``graph`` in a child process, killed after ``timeout_s``: the
    engine file and what the build reported. Raises :class:`TrtError` when it failed, :class:`TrtTimeout`
    when it ran out of time."""
    stem = graph.stem + ("-pinned" if pin else "-fp16")
    spec: dict[str, Any] = dict(
        onnx=str(graph),
        engine=str(ctx.tmp / f"{stem}.engine"),
        info=str(ctx.tmp / f"{stem}.json"),
        input=INPUT_NAME,
        profile=[list(s) for s in ctx.plan.trt_profile],
        pin=pin,
        unet_convs=UNET_CONVS,
        filter_convs=FILTER_CONVS,
    )
    spec_path = ctx.tmp / f"{stem}-spec.json"
    spec_path.write_text(json.dumps(spec))
    info_path, engine_path = Path(spec["info"]), Path(spec["engine"])
    info_path.unlink(missing_ok=True)
    engine_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu.trt_build", str(spec_path)],
        cwd=Path(__file__).resolve().parents[2],  # the repository root: bench is a package there
        start_new_session=True,
    )
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TrtTimeout(
            f"the build ran past the time budget and was stopped after {timeout_s:.0f} s"
        ) from None
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.exists() else {}
    if proc.returncode != 0 or "error" in info or not engine_path.exists():
        raise TrtError(info.get("error") or f"the build process exited with status {proc.returncode}")
    return engine_path, info


class TrtRunner:
    """A deserialized engine and its execution context on a stream of its own, run at one shape at a
    time on torch's CUDA tensors: ``(H, W, 3)`` float32 in, ``(H, W, 3)`` uint8 out."""

    def __init__(self, trt: ModuleType, serialized: bytes) -> None:
        self.trt = trt
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise TrtError(f"the engine did not deserialize: {' | '.join(self.logger.messages[-4:])}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        out_dtype = self.engine.get_tensor_dtype(OUTPUT_NAME)
        self.float_out = out_dtype != trt.DataType.UINT8
        self.out_dtype = torch.float32 if self.float_out else torch.uint8

    def bind(self, image: torch.Tensor) -> torch.Tensor:
        """Set the input shape and both addresses for ``image``; the output tensor the runs write."""
        h, w, _ = image.shape
        self.context.set_input_shape(INPUT_NAME, (h, w, 3))
        shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(shape, dtype=self.out_dtype, device=image.device)
        self.context.set_tensor_address(INPUT_NAME, image.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        sync(image.device)  # the input was written on torch's stream
        return out

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise TrtError(f"execute_async_v3 failed: {' | '.join(self.logger.messages[-4:])}")

    def result(self, out: torch.Tensor) -> np.ndarray:
        """The output as the interface gives it: uint8, truncated where the engine hands out float."""
        self.stream.synchronize()
        return (out.to(torch.uint8) if self.float_out else out).cpu().numpy()

    def close(self) -> None:
        del self.context, self.engine, self.runtime


def _deviation(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    return dict(
        mean_abs=round(float(d.mean()), 4),
        max_abs=int(d.max()),
        within_one_pct=round(100.0 * float((d <= 1).mean()), 4),
        identical_pct=round(100.0 * float((d == 0).mean()), 4),
    )


def _torch_fp16_rate(ctx: Context, size: tuple[int, int], gen16: Any, x: torch.Tensor) -> tuple[float, str]:
    """Torch's eager float16 passes/s at batch 1: the generator section's, else measured now."""
    label = f"{size[0]}x{size[1]}"
    for r in ctx.results.get("generator", {}).get("rows", []):
        if (
            r.get("size") == label
            and r.get("batch") == 1
            and r.get("dtype") == "fp16"
            and "passes_per_s" in r
        ):
            return r["passes_per_s"], "generator section"
    with cudnn_benchmark():
        rate, _ = throughput(lambda: gen16(x), 1, ctx.device, ctx.plan)
    return round(rate, 1), "measured here"


def _engines(ctx: Context, trt: ModuleType, graph: Path, deadline: float) -> list[dict[str, Any]]:
    gen32, gen16 = runner(ctx, "fp32"), runner(ctx, "fp16")
    cases = []
    for h, w in ctx.plan.trt_sizes:
        x = photo_bgr(h, w).to(ctx.device)
        cases.append(
            dict(
                size=(h, w),
                x=x,
                image=x[0].permute(1, 2, 0).float().contiguous(),  # the interface's (H, W, 3) float32 BGR
                fp32=gen32(x)[0].permute(1, 2, 0).cpu().numpy(),
                fp16=gen16(x)[0].permute(1, 2, 0).cpu().numpy(),
            )
        )
    rows: list[dict[str, Any]] = []
    output = "uint8"
    for name, pin in VARIANTS:
        row: dict[str, Any] = dict(variant=name)
        if deadline - time.monotonic() < MIN_BUILD_S + MEASURE_S:
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            try:
                engine, info = build_in_child(ctx, graph, pin, deadline - time.monotonic() - MEASURE_S)
            except TrtTimeout:
                raise
            except TrtError as exc:
                if output != "uint8" or deadline - time.monotonic() < MIN_BUILD_S + MEASURE_S:
                    raise
                # The uint8 output is the one thing in the graph TensorRT may not take: once more
                # with float32 out, the cast done in torch (and that graph for the next build).
                row["uint8_output_error"] = str(exc)[:500]
                float_graph = graph.with_name(f"{graph.stem}-float-out.onnx")
                float_graph.write_bytes(float_output(graph.read_bytes()))
                graph, output = float_graph, "float32 (cast in torch)"
                engine, info = build_in_child(ctx, graph, pin, deadline - time.monotonic() - MEASURE_S)
            row.update(output=output, **info)
            row["sizes"] = _measure(ctx, trt, engine.read_bytes(), cases, gen16)
            engine.unlink()
        except TrtTimeout as exc:
            row["skipped"] = str(exc)
        except Exception as exc:  # one build fails, the next is still tried
            row["error"] = f"{type(exc).__name__}: {exc}"[:800]
        rows.append(row)
    return rows


def _measure(
    ctx: Context, trt: ModuleType, serialized: bytes, cases: list[dict[str, Any]], gen16: Any
) -> list[dict[str, Any]]:
    engine = TrtRunner(trt, serialized)
    out_rows = []
    try:
        for case in cases:
            h, w = case["size"]
            out = engine.bind(case["image"])
            engine()
            got = engine.result(out)
            rate, ms = throughput(engine, 1, ctx.device, ctx.plan)
            torch_rate, source = _torch_fp16_rate(ctx, (h, w), gen16, case["x"])
            out_rows.append(
                dict(
                    size=f"{h}x{w}",
                    passes_per_s=round(rate, 1),
                    ms_per_call=round(ms, 2),
                    torch_fp16_passes_per_s=torch_rate,
                    torch_fp16_from=source,
                    vs_torch_fp16=round(rate / torch_rate, 2) if torch_rate else None,
                    vs_torch_fp32=_deviation(got, case["fp32"]),
                    vs_torch_fp16_output=_deviation(got, case["fp16"]),
                    torch_fp16_vs_fp32=_deviation(case["fp16"], case["fp32"]),
                )
            )
    finally:
        engine.close()
    return out_rows


def _print(ctx: Context, result: dict[str, Any]) -> None:
    lines = []
    for r in result["rows"]:
        if "sizes" not in r:
            lines.append([r["variant"], "-", r.get("skipped", r.get("error")), *[None] * 8])
            continue
        for s in r["sizes"]:
            dev, base = s["vs_torch_fp32"], s["torch_fp16_vs_fp32"]
            lines.append(
                [
                    r["variant"], s["size"], s["passes_per_s"], s["torch_fp16_passes_per_s"],
                    s["vs_torch_fp16"], dev["mean_abs"], dev["max_abs"], dev["within_one_pct"],
                    f"{base['mean_abs']}/{base['max_abs']}", r["build_s"], r["output"],
                ]
            )  # fmt: skip
    table(
        f"TensorRT {result['tensorrt']}, float16 engine from the exported ONNX (profile "
        f"{' .. '.join(result['profile'])}), batch 1, vs torch float32 / eager float16 on the device",
        ["variant", "size", "passes/s", "torch fp16", "× torch", "mean |Δ|", "max |Δ|", "≤1 %",
         "torch fp16 Δ mean/max", "build s", "output"],
        lines,
    )  # fmt: skip
