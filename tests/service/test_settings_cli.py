"""Settings from the environment, and the download/convert/styles commands."""

from __future__ import annotations

import logging
import socket
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from devkit import photos
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from service.cli import main
from service.settings import Settings, get_settings
from tests.api.conftest import jpeg_bytes


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOONSERVE_STYLES", "anime, 3d")
    monkeypatch.setenv("TOONSERVE_DTYPE", "bfloat16")
    monkeypatch.setenv("TOONSERVE_CACHE_DIR", str(tmp_path))
    s = Settings()
    assert s.styles == ["anime", "3d"] and s.dtype == "bfloat16" and s.cache_dir == tmp_path


def test_settings_reject_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOONSERVE_STYLES", "anime,pixar")
    with pytest.raises(ValidationError, match="pixar"):
        Settings()
    monkeypatch.setenv("TOONSERVE_STYLES", "3d")
    with pytest.raises(ValidationError, match="default_style 'anime' is not among the loaded styles"):
        Settings()


def test_convert_then_styles(
    model_dir: ReferenceModelDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", "sketch", str(model_dir.path), "--cache-dir", str(tmp_path)]) == 0
    assert (tmp_path / "converted" / "sketch" / "head.safetensors").is_file()
    assert main(["styles", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sketch" in out and "converted cache" in out and "not on this machine" in out


@pytest.mark.slow
def test_download_offline_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    assert main(["download", "sketch", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    # The hub client logs its retries; our verdict is the last line, one actionable message.
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no weights") or last.startswith("error: download of"), last
    assert "damo/cv_unet_person-image-cartoon-sketch_compound-models from ModelScope failed" in last
    assert "Traceback" not in err


@pytest.mark.slow
def test_cartoonize_a_folder(
    model_dir: ReferenceModelDir,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from PIL import Image

    from devkit import photos
    from service.settings import get_settings

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photos.astronaut()).save(src / "astronaut.jpg")
    Image.fromarray(photos.coffee()).save(src / "coffee.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (src / "notes.txt").write_text("ignored")
    (src / "scan.PDF").write_bytes(b"%PDF-1.7")
    (src / "older").mkdir()
    monkeypatch.setenv("TOONSERVE_MODEL_DIR", str(model_dir.path.parent))
    monkeypatch.setenv("TOONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOONSERVE_ALLOW_DOWNLOAD", "false")
    get_settings.cache_clear()
    try:
        code = main(["cartoonize", str(src), str(tmp_path / "out"), "--format", "jpeg", "--device", "cpu"])
    finally:
        get_settings.cache_clear()
    assert code == 1  # one photo failed, the others were written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.jpg", "coffee.jpg"]
    out, err = capsys.readouterr()
    assert "2 of 3 photos written" in out
    assert "broken.jpg:" in err
    # What was left out, each with its reason, before anything ran.
    assert f"skipping 3 of 6 entries in {src}:\n" in err
    assert "  notes.txt: not a photo by its name (.txt file)\n" in err
    assert "  older: a folder (folders inside are not read)\n" in err
    assert "  scan.PDF: not a photo by its name (.pdf file)\n" in err
    assert "3/3" not in err  # stderr is not a terminal: no progress bar
    with Image.open(tmp_path / "out" / "astronaut.jpg") as im:
        assert im.size == (512, 512)

    # The settings the service honours apply here too (TOONSERVE_MAX_FACES=0: no face is stylised), and
    # on a terminal the progress bar is drawn.
    monkeypatch.setenv("TOONSERVE_MAX_FACES", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    get_settings.cache_clear()
    try:
        code = main(["cartoonize", str(src), str(tmp_path / "out2"), "--no-face", "error", "--device", "cpu"])
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert code == 1 and "0 of 3 photos written" in out
    assert "astronaut.jpg: 1 face(s) found but none stylisable" in err
    assert "3/3" in err


def test_cartoonize_a_video_with_a_progress_bar(
    model_dir: ReferenceModelDir,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np
    from PIL import Image

    from devkit import photos
    from devkit.clips import write_test_clip
    from service.settings import get_settings
    from serving.video import probe_video

    frame = np.asarray(Image.fromarray(photos.astronaut()).resize((160, 160)))
    write_test_clip(tmp_path / "clip.mp4", [frame] * 6, fps=25, audio=True, quality=90)
    (tmp_path / "notes.mp4").write_text("not a video")
    monkeypatch.setenv("TOONSERVE_MODEL_DIR", str(model_dir.path.parent))
    monkeypatch.setenv("TOONSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOONSERVE_ALLOW_DOWNLOAD", "false")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    get_settings.cache_clear()
    try:
        code = main(
            ["cartoonize", str(tmp_path / "clip.mp4"), str(tmp_path / "out" / "toon.mp4"), "--device", "cpu"]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "6 frames (160×160) written to" in out and "audio copied" in out
        assert "6/6" in err and "frames/s" in err
        info = probe_video(tmp_path / "out" / "toon.mp4")
        assert info.frames == 6 and info.has_audio and info.display_size == (160, 160)
        # Not a video: one line, before any model loads; too long a video: its limit, by name.
        assert main(["cartoonize", str(tmp_path / "notes.mp4"), str(tmp_path / "x.mp4")]) == 2
        assert "not a video we can read" in capsys.readouterr().err
        monkeypatch.setenv("TOONSERVE_MAX_VIDEO_FRAMES", "5")
        get_settings.cache_clear()
        assert main(["cartoonize", str(tmp_path / "clip.mp4"), str(tmp_path / "x.mp4")]) == 2
        assert "TOONSERVE_MAX_VIDEO_FRAMES" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


def test_version_and_a_port_in_use(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"toonserve {version('toonserve')}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    # One line and nothing else: nothing was loaded or logged before the bind failed.
    assert err.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_every_setting_is_in_the_readme_table() -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `TOONSERVE_([A-Z_]+)` \|", table, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


@pytest.mark.slow
def test_demo_weights_serve_marked_demo_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The offline route in one command: no ModelScope, no second machine."""
    portrait_jpeg = jpeg_bytes(photos.astronaut())
    cache = tmp_path / "cache"
    monkeypatch.setenv("TOONSERVE_CACHE_DIR", str(cache))
    monkeypatch.setenv("TOONSERVE_STYLES", "anime,sketch")
    get_settings.cache_clear()  # the CLI reads the settings through it
    try:
        assert main(["demo-weights"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    assert "anime: demo weights (random, not real cartoons)" in out and "sketch: demo weights" in out
    assert main(["demo-weights", "pixar"]) == 1  # refused, and named
    assert "unknown style 'pixar'" in capsys.readouterr().err

    settings = Settings(allow_download=False, device="cpu", log_format="text")
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz").json()
        assert ready["styles"]["anime"]["source"] == "demo"
        styles = {s["name"]: s for s in client.get("/styles").json()["styles"]}
        assert styles["anime"]["source"] == "demo" and styles["3d"]["source"] is None
        r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)}, data={"response": "json"})
        assert r.status_code == 200 and r.json()["source"] == "demo"
        r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert "style anime runs on DEMO weights" in caplog.text
