"""The web page's serving (``GET /``, ``/ui/``): from the package, open with an API key, nothing from
another origin, shipped in the wheel. What the page does is tested in a browser (test_web_browser.py)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.resources import files
from pathlib import Path

from fastapi.testclient import TestClient

from api.web import ASSETS_PATH, STATIC
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
#: The page's modules (app.js imports the others); every file of the page.
MODULES = (
    "app.js",
    "api.js",
    "util.js",
    "settings.js",
    "tabs.js",
    "jobs.js",
    "single.js",
    "batch.js",
    "video.js",
)
PAGE_FILES = ("index.html", *MODULES, "app.css", "icon.svg")
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html"}


def _client(tmp_path: Path, **overrides: object) -> TestClient:
    # No weights: the page and its assets do not need the engine.
    values: dict[str, object] = dict(
        model_dir=tmp_path, cache_dir=tmp_path, allow_download=False, device="cpu"
    )
    values.update(overrides)
    return TestClient(create_app(Settings(**values)))  # type: ignore[arg-type]


def _static_dir() -> Path:
    return Path(str(files(STATIC[0]).joinpath(STATIC[1])))


def test_the_page_and_its_assets_are_served(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp
        # The video side plays the cartoon clip (and previews the chosen one) from object URLs.
        assert "media-src 'self' blob:" in csp
        assets = re.findall(r"""(?:src|href)=["']([^"'#]+)["']""", page.text)
        linked = {a for a in assets if a.startswith(ASSETS_PATH + "/")}
        assert linked == {f"{ASSETS_PATH}/{name}" for name in ("app.js", "app.css", "icon.svg")}
        assert all(a.startswith("/") for a in assets), assets
        for asset in linked:
            r = client.get(asset)
            assert r.status_code == 200, asset
            assert r.headers["content-type"].startswith(TYPES[Path(asset).suffix]), asset
        assert client.get(f"{ASSETS_PATH}/nope.js").status_code == 404
        for module in MODULES:  # imported by app.js, not linked from the page
            r = client.get(f"{ASSETS_PATH}/{module}")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript"), module


def test_the_modules_import_only_each_other() -> None:
    """Every module the page's scripts import is one of them, on this origin (relative ./x.js)."""
    static = _static_dir()
    assert sorted(p.name for p in static.glob("*.js")) == sorted(MODULES)
    declared = r"^export (?:async function\*? |function\*? |const |let |class )([\w$]+)"
    exported = {m: set(re.findall(declared, (static / m).read_text(), flags=re.M)) for m in MODULES}
    for module in MODULES:
        imports = re.findall(
            r'^import \{([^}]+)\} from "([^"]+)";$', (static / module).read_text(), flags=re.M
        )
        for names, source in imports:
            assert source.startswith("./") and source[2:] in MODULES, (module, source)
            missing = {n.strip() for n in names.split(",")} - exported[source[2:]]
            assert not missing, f"{module} imports {missing} that {source} does not export"


def test_the_page_has_three_sides_and_the_video_one_takes_a_clip(tmp_path: Path) -> None:
    """One photo, a batch, a video: each a tab with its panel. The video side takes a clip (any video,
    or a GIF) by its labelled file input and its drop zone, says its progress to screen readers, and
    has a player and a download link for the cartoon clip; its module is imported by the page."""
    with _client(tmp_path) as client:
        page = client.get("/").text
        app = client.get(f"{ASSETS_PATH}/app.js").text
    tabs = re.findall(
        r'<button type="button" role="tab" id="(tab-\w+)"[^>]*aria-controls="(panel-\w+)"', page
    )
    assert tabs == [
        ("tab-single", "panel-single"),
        ("tab-batch", "panel-batch"),
        ("tab-video", "panel-video"),
    ]
    for _, panel in tabs:
        assert re.search(rf'<section [^>]*role="tabpanel" id="{panel}"', page), panel
    clip = re.search(r"<input [^>]*id=\"clip\"[^>]*>", page)
    assert clip is not None and 'type="file"' in clip.group() and 'accept="video/*,.gif"' in clip.group()
    assert '<label for="clip">' in page and 'id="video-drop"' in page
    assert re.search(r'<progress id="video-progress"', page) and '<label for="video-progress">' in page
    assert re.search(r'id="video-status" role="status" aria-live="polite"', page)
    assert re.search(r'id="video-told" aria-live="polite"', page)
    assert re.search(r'id="video-error" role="alert"', page)
    assert re.search(r'<video id="toon" controls[^>]*aria-label="Cartoon clip"', page)
    assert re.search(r'<a [^>]*id="video-download"[^>]*download', page)
    assert re.search(r'<button type="button" id="video-cancel">Cancel</button>', page)
    assert 'from "./video.js";' in app and 'dropZone($("video-drop"), $("clip"));' in app


def test_nothing_comes_from_another_origin() -> None:
    """No URL of another site in any file of the page (the SVG namespace is a name, not a fetch); the
    browser test checks the requests themselves."""
    for name in PAGE_FILES:
        text = (_static_dir() / name).read_text().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        assert not re.search(r"""(?:src|href)=["']//""", text), name


def test_the_page_stays_open_with_an_api_key_and_the_api_does_not(tmp_path: Path) -> None:
    with _client(tmp_path, api_key="s3cret") as client:
        assert client.get("/").status_code == 200
        for name in (*MODULES, "app.css", "icon.svg"):
            assert client.get(f"{ASSETS_PATH}/{name}").status_code == 200
        assert client.get("/openapi.json").status_code == 200  # the page reads its bounds there
        assert client.get("/styles").status_code == 401
        assert client.get("/styles", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_the_page_is_not_an_api_route(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith(ASSETS_PATH) for p in paths)


def test_the_page_files_are_package_data() -> None:
    """Reachable through importlib.resources, and every one matched by pyproject's package-data."""
    static = _static_dir()
    for name in PAGE_FILES:
        assert static.joinpath(name).is_file(), name
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["api"]
    for path in static.rglob("*"):
        if path.is_file():
            rel = path.relative_to(static.parent).as_posix()
            assert any(fnmatch.fnmatchcase(rel, p) for p in patterns), rel


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    """A wheel built from the shipped packages holds the page (setuptools' PEP 517 hook, offline)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("service", "api", "jobs", "inference"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = src / "dist" / done.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {f"api/static/{name}" for name in PAGE_FILES} <= names
