"""``bench/gpu.sh --dry``: the one-command GPU check runs every section on the CPU and reports figures.

No GPU has been lent to this project yet; the day one is, the script must work the first time. The
dry run takes the same code paths with tiny sizes (and stand-ins for CUDA graphs and nvJPEG), so this
test keeps it from rotting. It starts a server, hence the markers. Figures are checked to be there,
never for their size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.live]

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"env", "exactness", "generator", "graphs", "pipeline", "codec", "http", "video", "tensorrt",
            "compile"}  # fmt: skip


def test_the_dry_run_reports_every_section(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("GPU_DRY", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu-dry.json").read_text())
    assert report["dry"] is True and "error" not in report
    sections = report["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))

    exactness = sections["exactness"]
    assert {r["what"].split()[-1] for r in exactness["generator"]} == {"fp32", "fp16", "bf16"}
    fp32 = [r for r in exactness["generator"] if r["what"].endswith("fp32")]
    assert all(r["identical_pct"] >= 99.9 and r["max_abs"] <= 1 for r in fp32)  # eager vs oneDNN
    resize = exactness["device_resize"]
    assert resize["identical"] == resize["resizes"] and resize["turns_identical"] == resize["turns"]
    assert exactness["pipeline"]["faces_device"] == exactness["pipeline"]["faces_cpu"] >= 1

    for name in ("generator", "graphs"):
        rows = sections[name]["rows"]
        assert len(rows) == 2 * 2 * 3  # sizes × batches × dtypes
        assert all(r["passes_per_s"] > 0 and "skipped" not in r for r in rows), rows
    assert all(r["identical_to_eager_pct"] == 100 for r in sections["graphs"]["rows"])
    pipeline = sections["pipeline"]["rows"]
    assert all(r["total_ms"] > 0 for r in pipeline) and any("photos_per_s" in r for r in pipeline)
    assert all(set(r["stages_ms"]) >= {"background", "detect", "head"} for r in pipeline if "stages_ms" in r)

    codec = sections["codec"]
    assert all(r["pillow_ms"] > 0 and r["gpu_ms"] > 0 for r in codec["decode"])
    assert codec["encode"]["gpu_bytes"] > 0 and codec["rules"]["progressive"].startswith("Pillow")

    http = sections["http"]
    assert (
        http["ok"] == http["requests"] > 0
        and http["photos_per_s"] > 0
        and http["statuses"] == {"200": http["ok"]}
    )
    assert http["check"]["responses"] > 0 and http["check"]["worst_max_abs"] == 0
    assert {"decode", "queue", "encode"} <= set(http["server_timing_median_ms"])

    video = sections["video"]
    assert {r["mode"] for r in video["rows"]} == {"steady", "frame by frame"}
    assert all(r["frames_per_s"] > 0 and r["frames"] == video["clip"]["frames"] for r in video["rows"])
    assert all(
        set(r["step_ms_per_frame"]) == {"decode", "model", "steady", "resize", "encode"}
        for r in video["rows"]
    )
    assert "error" in video["pyav_cuda"] or set(video["pyav_cuda"]["usable"]) == {"h264_cuvid", "h264_nvenc"}

    # Never built in a dry run; where the onnx extra is installed, the export and its checks ran.
    trt = sections["tensorrt"]
    assert trt["skipped"] and "rows" not in trt
    if "onnx" in trt:
        assert trt["onnx"]["convolutions"] == 21 and trt["onnx"]["unet_first"]
        assert trt["float_output_check"]["checker"] == "passed" and trt["child_build"].startswith("reported")

    compiled = sections["compile"]["rows"]
    assert compiled and all("error" not in r and r["passes_per_s"] > 0 for r in compiled), compiled
    assert (tmp_path / "gpu-dry.log").read_text().count("\n== ") >= 10
