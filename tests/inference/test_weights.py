"""Style registry and weight resolution: converted cache → local directory → ModelScope download."""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from devkit.reference_graphs import ReferenceModelDir, write_model_dir
from inference.demo import MODELSCOPE_CONFIGURATION, is_demo_dir
from inference.errors import ConfigurationError, ConversionError, UnknownStyleError, WeightsUnavailableError
from inference.styles import STYLES, get_style
from inference.weights import (
    MASK_NAME,
    download,
    ensure_converted,
    install_demo,
    local_fingerprint,
    resolve,
)


def test_registry_has_the_seven_styles() -> None:
    assert list(STYLES) == ["anime", "3d", "handdrawn", "sketch", "artstyle", "design", "illustration"]
    assert get_style("anime").model_id == "damo/cv_unet_person-image-cartoon_compound-models"
    assert get_style("3d").model_id == "damo/cv_unet_person-image-cartoon-3d_compound-models"
    assert get_style("design").model_id == "damo/cv_unet_person-image-cartoon-sd-design_compound-models"
    assert get_style("design").revision == get_style("illustration").revision == "v1.0.0"
    with pytest.raises(UnknownStyleError, match="unknown style 'pixar'; choose one of: anime, 3d"):
        get_style("pixar")


def _copy_dir(src: ReferenceModelDir, dst: Path) -> Path:
    shutil.copytree(src.path, dst)
    return dst


def test_local_directory_is_converted_once(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _copy_dir(model_dir, models / "anime")
    cache = tmp_path / "cache"
    first = resolve("anime", cache, models, allow_download=False)
    assert first.source.startswith("converted from")
    assert first.head.parent == cache / "converted" / "anime"
    assert first.mask.read_bytes() == (models / "anime" / "alpha.jpg").read_bytes()
    mtime = first.head.stat().st_mtime_ns
    second = resolve("anime", cache, models, allow_download=False)
    assert second.source.startswith("converted cache")
    assert second.head.stat().st_mtime_ns == mtime


def test_changed_source_is_converted_again(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    models = tmp_path / "models"
    src = _copy_dir(model_dir, models / "anime")
    cache = tmp_path / "cache"
    resolve("anime", cache, models, allow_download=False)
    (src / "cartoon_h.pb").write_bytes(model_dir.bg_pb.read_bytes())  # a different graph
    again = resolve("anime", cache, models, allow_download=False)
    assert again.source.startswith("converted from")


def test_legacy_anime_names_and_model_id_layout(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    models = tmp_path / "models"
    legacy = write_model_dir(
        models / "damo" / "cv_unet_person-image-cartoon_compound-models",
        legacy_names=True,
        head_pb=model_dir.head_pb.read_bytes(),
        bg_pb=model_dir.bg_pb.read_bytes(),
    )
    assert legacy.head_pb.name == "cartoon_anime_h.pb"
    weights = resolve("anime", tmp_path / "cache", models, allow_download=False)
    assert str(legacy.path) in weights.source


def test_converted_cache_alone_is_enough(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    """Converted files copied from another machine serve without the source graphs."""
    cache = tmp_path / "cache"
    ensure_converted("sketch", model_dir.path, cache)
    weights = resolve("sketch", cache, tmp_path / "nothing-here", allow_download=False)
    assert weights.source.startswith("converted cache")


def test_convert_command_refuses_a_directory_without_graphs(tmp_path: Path) -> None:
    (tmp_path / "alpha.jpg").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"lacks cartoon_h\.pb or cartoon_anime_h\.pb"):
        ensure_converted("anime", tmp_path, tmp_path / "cache")


def test_bad_graph_in_local_directory_is_named(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    models = tmp_path / "models"
    src = _copy_dir(model_dir, models / "3d")
    (src / "cartoon_bg.pb").write_bytes(model_dir.bg_pb.read_bytes()[:1000])
    with pytest.raises(ConversionError, match=r"3d/cartoon_bg\.pb"):
        resolve("3d", tmp_path / "cache", models, allow_download=False)


def test_download_disabled_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        resolve("handdrawn", tmp_path / "cache", tmp_path / "models", allow_download=False)
    msg = str(info.value)
    assert "no weights for style 'handdrawn'" in msg
    assert f"local directory {tmp_path / 'models' / 'handdrawn'} (does not exist)" in msg
    assert "download from ModelScope (disabled)" in msg
    assert "toonserve download handdrawn" in msg


@pytest.mark.slow
def test_offline_hub_gives_one_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real download path with the hub unreachable (a closed port on loopback)."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailableError) as info:
        resolve("3d", tmp_path / "cache", None, allow_download=True)
    msg = str(info.value)
    assert "download of damo/cv_unet_person-image-cartoon-3d_compound-models from ModelScope failed" in msg
    assert "toonserve download 3d --cache-dir DIR" in msg
    assert "Traceback" not in msg


def test_fixture_graphs_are_distinct(model_dir: ReferenceModelDir) -> None:
    # Guards the fixture itself: head and background graphs must be distinguishable.
    assert model_dir.head_pb.read_bytes() != model_dir.bg_pb.read_bytes()


@pytest.mark.slow
def test_a_failed_download_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub unreachable twice: the second message is the first, and no empty directory appears."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    cache = tmp_path / "cache"
    messages = []
    for _ in range(2):
        with pytest.raises(WeightsUnavailableError) as info:
            resolve("sketch", cache, None, allow_download=True)
        messages.append(str(info.value))
        assert not (cache / "models" / "sketch").exists()
    assert messages[0] == messages[1]
    assert f"local directory {cache / 'models' / 'sketch'} (does not exist)" in messages[1]


def _hub(monkeypatch: pytest.MonkeyPatch, attempt: Callable[[Path], None]) -> None:
    """The hub client replaced by ``attempt(local_dir)``: it writes what a download would, or raises."""
    hub = importlib.import_module("modelscope.hub.snapshot_download")  # the module, not the function

    def snapshot_download(model_id: str, *, local_dir: str, **_: object) -> str:
        attempt(Path(local_dir))
        return local_dir

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)


def test_files_copied_in_during_a_failing_download_survive_it(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person copies the weights where the error told them to while an attempt is failing."""
    cache = tmp_path / "cache"
    target = cache / "models" / "anime"

    def attempt(local_dir: Path) -> None:
        (local_dir / "cartoon_h.pb").write_bytes(b"partial")  # what the hub client had written
        _copy_dir(model_dir, target)  # meanwhile, by hand
        raise ConnectionError("name resolution timed out")

    _hub(monkeypatch, attempt)
    before = {p.name: p.read_bytes() for p in model_dir.path.iterdir()}
    with pytest.raises(WeightsUnavailableError, match="ConnectionError: name resolution timed out"):
        resolve("anime", cache, None, allow_download=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not (cache / "downloads").exists()  # the attempt's own files are gone
    assert resolve("anime", cache, None, allow_download=False).style == "anime"


def test_a_complete_download_is_moved_into_place_beside_what_is_there(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    target = cache / "models" / "anime"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    (target / MASK_NAME).write_bytes(b"my mask")

    def attempt(local_dir: Path) -> None:
        for p in model_dir.path.iterdir():
            shutil.copyfile(p, local_dir / p.name)
        (local_dir / ".lock").write_text("")  # the hub client's bookkeeping stays out

    _hub(monkeypatch, attempt)
    assert download(get_style("anime"), cache) == target
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / MASK_NAME).read_bytes() == b"my mask"  # never replaced
    for p in model_dir.path.iterdir():
        if p.name != MASK_NAME:
            assert (target / p.name).read_bytes() == p.read_bytes()
    assert not (target / ".lock").exists() and not (cache / "downloads").exists()


def test_the_fingerprint_changes_while_files_are_copied(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert local_fingerprint("anime", tmp_path / "cache", models) is None
    _copy_dir(model_dir, models / "anime")
    first = local_fingerprint("anime", tmp_path / "cache", models)
    assert first is not None and first == local_fingerprint("anime", tmp_path / "cache", models)
    with (models / "anime" / MASK_NAME).open("ab") as grow:
        grow.write(b"\0")
    assert local_fingerprint("anime", tmp_path / "cache", models) != first


def _real_copy(src: ReferenceModelDir, dst: Path) -> Path:
    """The fixture's files as a real model directory would hold them (no demo marker)."""
    _copy_dir(src, dst)
    (dst / "configuration.json").write_text(json.dumps(MODELSCOPE_CONFIGURATION))
    return dst


def test_demo_weights_are_written_converted_and_marked(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    weights = install_demo("sketch", cache)
    assert weights.demo and weights.kind == "demo"
    assert is_demo_dir(cache / "models" / "sketch")
    assert not (cache / "downloads").exists()
    # The mark survives conversion: the converted cache alone still says demo.
    shutil.rmtree(cache / "models")
    assert resolve("sketch", cache, None, allow_download=False).demo
    # Again: kept as it is, still demo.
    assert install_demo("sketch", cache).demo


def test_demo_weights_never_stand_in_for_real_ones(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    cache, models = tmp_path / "cache", tmp_path / "models"
    _real_copy(model_dir, models / "anime")
    with pytest.raises(ConfigurationError, match="has real weights at"):
        install_demo("anime", cache, models)
    real = resolve("anime", cache, models, allow_download=False)
    assert not real.demo and real.kind == "modelscope"
    shutil.rmtree(models)  # the converted cache alone is real weights too
    with pytest.raises(ConfigurationError, match="real converted weights"):
        install_demo("anime", cache, models)
    assert not (cache / "models" / "anime").exists()


def test_demo_weights_are_not_written_over_a_persons_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "models" / "3d").mkdir(parents=True)
    (cache / "models" / "3d" / "alpha.jpg").write_bytes(b"my own mask")
    with pytest.raises(ConfigurationError, match=r"already holds alpha\.jpg, not demo files"):
        install_demo("3d", cache)
    assert [p.name for p in (cache / "models" / "3d").iterdir()] == ["alpha.jpg"]
    assert (cache / "models" / "3d" / "alpha.jpg").read_bytes() == b"my own mask"


def test_a_download_replaces_demo_weights(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    install_demo("anime", cache)
    real = _real_copy(model_dir, tmp_path / "hub")
    # The legacy name: no demo graph may stay beside it.
    (real / "cartoon_h.pb").rename(real / "cartoon_anime_h.pb")

    def attempt(local_dir: Path) -> None:
        for p in real.iterdir():
            shutil.copyfile(p, local_dir / p.name)

    _hub(monkeypatch, attempt)
    target = download(get_style("anime"), cache)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in real.iterdir())
    weights = resolve("anime", cache, None, allow_download=False)
    assert not weights.demo and "converted from" in weights.source
