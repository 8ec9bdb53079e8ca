"""Section ``env``: the machine, the driver, the libraries."""

from __future__ import annotations

import os
import platform
from typing import Any

import cv2
import PIL
import torch

from bench.gpu.common import Context, nvidia_smi, table
from inference import device_image
from serving.gpu_codec import GpuCodec


def section_env(ctx: Context, deadline: float) -> dict[str, Any]:
    env: dict[str, Any] = dict(
        dry=ctx.plan.dry,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_build=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        device=str(ctx.device),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        pillow=PIL.__version__,
        opencv=cv2.__version__,
        opencv_agrees=device_image.opencv_agrees(),
        budget_s=ctx.plan.budget_s,
    )
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            gpu=props.name,
            capability=".".join(map(str, torch.cuda.get_device_capability(ctx.device))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    for module in ("torchvision", "triton"):
        try:
            env[module] = __import__(module).__version__
        except Exception as exc:  # a torchvision built for another torch fails in many ways
            env[module] = f"not importable ({type(exc).__name__}: {exc})"[:200]
    ctx.codec, ctx.codec_why = GpuCodec.try_create(ctx.device)
    env["gpu_codec"] = (
        f"nvJPEG via torchvision {ctx.codec.version}" if ctx.codec else f"Pillow: {ctx.codec_why}"
    )
    env["nvidia_smi"] = nvidia_smi()
    table("environment", ["what", "value"], [[k, v] for k, v in env.items() if k != "nvidia_smi"])
    if env["nvidia_smi"]:
        table("nvidia-smi", list(env["nvidia_smi"][0]), [list(r.values()) for r in env["nvidia_smi"]])
    return env
