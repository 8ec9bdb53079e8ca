"""A stand-in for ``torchvision.io``'s JPEG calls, done by Pillow on the CPU.

``serving.gpu_codec.GpuCodec`` drives nvJPEG through ``torchvision.io.decode_jpeg`` and
``encode_jpeg``, which cannot run without a GPU. With this module in their place, the codec's rules,
its orientation and resize steps, the flow's choice of codec and the fallbacks run on the CPU: the
tests use it, and ``bench/gpu.sh --dry`` runs its codec section through it.
"""

from __future__ import annotations

import io
import types

import numpy as np
import torch
from PIL import Image


class PillowTorchvisionIO(types.ModuleType):
    """``decode_jpeg``, ``encode_jpeg`` and ``ImageReadMode.RGB`` with torchvision's signatures.

    ``fail``: "decode" or "encode" makes that call raise, as a failing nvJPEG would.
    """

    ImageReadMode = types.SimpleNamespace(RGB="RGB")

    def __init__(self, fail: str | None = None) -> None:
        super().__init__("torchvision.io")
        self.fail = fail

    def decode_jpeg(self, raw: torch.Tensor, mode: str, device: torch.device) -> torch.Tensor:
        """1-D uint8 CPU tensor of JPEG bytes → (3, H, W) uint8 on ``device`` (no orientation)."""
        if self.fail == "decode":
            raise RuntimeError("nvjpeg error (stand-in)")
        with Image.open(io.BytesIO(raw.numpy().tobytes())) as im:
            pixels = np.asarray(im.convert(mode)).copy()
        return torch.from_numpy(pixels).permute(2, 0, 1).to(device)

    def encode_jpeg(self, image: torch.Tensor, quality: int) -> torch.Tensor:
        """(3, H, W) uint8 → 1-D uint8 tensor of JPEG bytes (Pillow's, at that quality)."""
        if self.fail == "encode":
            raise RuntimeError("nvjpeg error (stand-in)")
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, "JPEG", quality=quality)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
