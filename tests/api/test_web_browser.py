"""The web page in a real browser: headless Chromium (Playwright) against a live ``toonserve serve``.

Every test records each request the page makes and fails if one goes anywhere but the service, and
fails on a script error or an unexpected console error. The single-photo, batch and video tests write
screenshots (desktop and 360 px wide) into build/screenshots/, or where TOONSERVE_SCREENSHOTS says:
`make screenshots` points it at docs/screenshots/ to refresh the README's, so `make test` leaves the
tree as it found it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageChops
from playwright.sync_api import (
    Browser,
    Error,
    FilePayload,
    Page,
    Route,
    ViewportSize,
    expect,
    sync_playwright,
)

from devkit import photos
from devkit.clips import write_test_clip
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env
from inference.constants import MAX_OUTPUT_SIDE
from serving.encoding import MAX_QUALITY, MIN_QUALITY
from serving.video import probe_video

pytestmark = [pytest.mark.browser, pytest.mark.live]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("TOONSERVE_SCREENSHOTS") or ROOT / "build" / "screenshots")
DESKTOP = ViewportSize(width=1280, height=900)
PHONE = ViewportSize(width=360, height=780)
API_KEY = "page-test-key"
#: A job takes at most this many photos, and this many bytes, on the test service.
MAX_JOB_FILES = 12
MAX_JOB_BYTES = 4_000_000
#: The largest body /cartoonize takes there, and so the largest photo in a job.
MAX_PHOTO_BYTES = 2_000_000
#: Chromium must not talk to anything but the page's service: no updates, sync, field trials, QUIC.
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container
    "--headless",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-quic",
]
#: Seconds a step of the page may take (a photo takes one or two on 2 busy cores).
STEP_S = 60


def _start_server(model_dir: ReferenceModelDir, tmp: Path, **extra: str) -> LiveService:
    env = service_env(
        model_dir.path.parent,
        tmp,
        TOONSERVE_LOG_FORMAT="text",
        # Small: the page does not care, and the tests stay fast. Faces shrink with it (a 320 px
        # portrait's face is about 20 processing pixels), so the face floor follows.
        TOONSERVE_PROCESSING_SIZE="128",
        TOONSERVE_MIN_FACE_SIZE="16",
        TOONSERVE_MAX_JOB_FILES=str(MAX_JOB_FILES),
        TOONSERVE_MAX_JOB_BYTES=str(MAX_JOB_BYTES),
        TOONSERVE_MAX_UPLOAD_BYTES=str(MAX_PHOTO_BYTES),
        **extra,
    )
    return LiveService(env, tmp / "server.log").start()


@pytest.fixture(scope="module")
def server(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    srv = _start_server(model_dir, tmp_path_factory.mktemp("web"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(
    model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    srv = _start_server(model_dir, tmp_path_factory.mktemp("web-key"), TOONSERVE_API_KEY=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium when installed (`make test` installs it), else Playwright's own browser; with
    neither, the tests fail: they are part of the suite, not optional."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        try:
            found = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.fail(
                "no browser for the web page tests: install Chromium "
                f"(apt-get install chromium, or playwright install chromium): {exc}"
            )
        expect.set_options(timeout=STEP_S * 1000)
        yield found
        found.close()


@dataclass
class Session:
    """A page on the service, and what it did: every request, console error and script error."""

    page: Page
    origin: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    #: Console errors a test provokes on purpose (the browser logs every 4xx/5xx answer).
    allowed: list[str] = field(default_factory=list)

    def open(self) -> Page:
        self.page.goto(self.origin + "/")
        self.page.wait_for_selector("body[data-ready]")
        return self.page

    def allow_status(self, *statuses: int) -> None:
        self.allowed += [f"status of {s}" for s in statuses]

    def check(self) -> None:
        foreign = [
            url
            for url in self.requests
            if not (url.startswith((self.origin + "/", "blob:" + self.origin + "/", "data:")))
        ]
        assert foreign == [], f"requests to another origin: {foreign}"
        assert self.page_errors == []
        unexpected = [e for e in self.console_errors if not any(a in e for a in self.allowed)]
        assert unexpected == []


def _session(browser: Browser, srv: LiveService) -> Iterator[Session]:
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(STEP_S * 1000)
    page = context.new_page()
    session = Session(page, srv.url)
    page.on("request", lambda r: session.requests.append(r.url))
    page.on("console", lambda m: session.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: session.page_errors.append(str(e)))
    yield session
    context.close()
    session.check()


@pytest.fixture
def web(browser: Browser, server: LiveService) -> Iterator[Session]:
    yield from _session(browser, server)


@pytest.fixture
def keyed_web(browser: Browser, keyed_server: LiveService) -> Iterator[Session]:
    yield from _session(browser, keyed_server)


# -- helpers ---------------------------------------------------------------------------------------


def _jpeg(rgb: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _file(name: str, data: bytes, mime: str = "image/jpeg") -> FilePayload:
    return FilePayload(name=name, mimeType=mime, buffer=data)


def _photos(count: int) -> list[FilePayload]:
    sources = [photos.astronaut(), photos.grace_hopper(), photos.coffee()]
    return [_file(f"photo-{i + 1:02d}.jpg", _jpeg(sources[i % 3], (192, 192 + 8 * i))) for i in range(count)]


def _choose(page: Page, name: str, rgb: np.ndarray, size: tuple[int, int]) -> None:
    """One photo into the Photo input (the file chooser itself is the system's, out of the page)."""
    page.get_by_label("Photo", exact=True).set_input_files([_file(name, _jpeg(rgb, size))])


#: Keeps the text fields of the last FormData the page sends, as ``window.sentFields``.
SENT_FIELDS_SCRIPT = """
const send = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body instanceof FormData)
    window.sentFields = Object.fromEntries([...init.body.entries()].filter(([, v]) => typeof v === "string"));
  return send(url, init);
};
"""

NOT_AN_IMAGE = _file("notes.txt", b"not a photo, just some words\n" * 20, "text/plain")


def _api_error(srv: LiveService, path: str, files: list[tuple[str, Any]], data: dict[str, str]) -> str:
    """The message the API itself gives for this request (the page must show exactly that)."""
    r = httpx.post(srv.url + path, files=files, data=data, timeout=60)
    assert r.status_code >= 400, r.text
    message: str = r.json()["error"]["message"]
    return message


def _download(page: Page, name: str) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.get_by_role("link", name=name, exact=True).click()
    download = info.value
    return download.suggested_filename, Path(download.path()).read_bytes()


def _blob_type(page: Page, link_name: str) -> str:
    href = page.get_by_role("link", name=link_name, exact=True).get_attribute("href")
    kind: str = page.evaluate("async (url) => (await (await fetch(url)).blob()).type", href)
    return kind


def _fits(page: Page, width: int) -> None:
    """No horizontal scrolling, and every control of the visible side lies within the width."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    controls = page.locator("main").locator("input, select, button, a, progress")
    for i in range(controls.count()):
        control = controls.nth(i)
        if not control.is_visible():
            continue
        box = control.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (
            control.evaluate("e => e.outerHTML.slice(0, 120)"),
            box,
        )


def _screenshot(page: Page, name: str, varying: str | None = None) -> None:
    """<SCREENSHOTS>/<name>.png, full page. The file is kept when the new one differs from it only
    inside ``varying`` (the timings, which change from run to run), so git sees real changes only."""
    page.mouse.move(0, 0)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    png = page.screenshot(full_page=True, animations="disabled")
    path = SCREENSHOTS / f"{name}.png"
    if path.exists() and varying is not None:
        with Image.open(path) as old_file, Image.open(io.BytesIO(png)) as new_file:
            old, new = old_file.convert("RGB"), new_file.convert("RGB")
            diff = ImageChops.difference(old, new).getbbox() if old.size == new.size else (0, 0, *new.size)
        box = page.locator(varying).bounding_box()
        scroll = page.evaluate("[window.scrollX, window.scrollY]")
        if diff is None:
            return
        if box is not None:
            x0, y0 = box["x"] + scroll[0], box["y"] + scroll[1]
            x1, y1 = x0 + box["width"], y0 + box["height"]
            if diff[0] >= x0 - 1 and diff[1] >= y0 - 1 and diff[2] <= x1 + 1 and diff[3] <= y1 + 1:
                return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


def _until(page: Page, script: str) -> None:
    """Wait until ``script`` is true in the page (polled from here: the page's CSP forbids the string
    evaluation that wait_for_function uses)."""
    deadline = time.monotonic() + STEP_S
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"still false after {STEP_S} s: {script}"
        time.sleep(0.05)


def _batch_tab(page: Page) -> None:
    page.get_by_role("tab", name="A batch").click()
    expect(page.get_by_label("Photos", exact=True)).to_be_visible()


def _job(srv: LiveService, page: Page, store: str = "toonserve.job") -> dict[str, Any]:
    job_id = page.evaluate(f"localStorage.getItem('{store}')")
    status, body = srv.get(f"/jobs/{job_id}")
    assert status == 200, body
    job: dict[str, Any] = json.loads(body)
    return job


# -- one photo -------------------------------------------------------------------------------------


def test_one_photo_end_to_end(web: Session) -> None:
    page = web.open()
    style = page.get_by_label("Style", exact=True)
    # Only the loaded styles (the synthetic service loads anime alone), the default selected.
    assert style.locator("option").all_inner_texts() == ["anime"]
    expect(style).to_have_value("anime")
    expect(page.get_by_label("Processing size")).to_have_attribute("max", "2048")  # from /openapi.json
    # The test service runs on demo weights: the page says so before anything else.
    expect(page.get_by_role("note")).to_have_text(
        re.compile(r"^Demo weights: these are not real cartoons\. anime runs")
    )
    expect(page.get_by_label("Processing size")).to_be_hidden()  # under "More settings"
    assert page.get_by_label("Format").locator("option").all_inner_texts() == [
        "Service default",
        "PNG",
        "JPEG",
        "WebP",
    ]

    _choose(page, "portrait.jpg", photos.astronaut(), (320, 240))
    expect(page.get_by_alt_text("Your photo")).to_be_visible()
    page.get_by_role("button", name="Cartoonize").click()
    expect(page.get_by_role("link", name="Download", exact=True)).to_be_visible()

    cartoon = page.get_by_alt_text("Cartoon", exact=True)
    expect(cartoon).to_be_visible()
    _until(page, "document.getElementById('cartoon').complete")
    assert cartoon.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [320, 240]
    # The face found, drawn over the photo and listed; the timings of every stage.
    assert page.locator("#face-boxes .box").count() == 1
    expect(page.locator("#faces-list")).to_have_text("Face 1: cartooned.")
    # Timings and sizes are there for whoever opens "Details".
    expect(page.locator("#timings")).to_be_hidden()
    page.get_by_text("Details", exact=True).click()
    for stage in ("decode", "background", "head", "encode", "sum"):
        expect(page.locator("#timings")).to_contain_text(stage)
    expect(page.locator("#run-info")).to_contain_text("with demo weights (not a real cartoon)")
    page.get_by_text("Details", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Done")).to_contain_text("1 face stylised")

    # The before/after slider moves the clip, by keyboard too.
    slider = page.get_by_label("Before / after")
    slider.focus()
    page.keyboard.press("ArrowLeft")
    expect(slider).to_have_attribute("aria-valuetext", "49 % photo, 51 % cartoon")
    assert "49%" in cartoon.evaluate("img => img.style.clipPath")

    name, data = _download(page, "Download")
    assert name == "portrait-anime.png"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (320, 240)
    assert _blob_type(page, "Download") == "image/png"

    slider.fill("50")
    _screenshot(page, "single-desktop", varying="#timings")
    page.set_viewport_size(PHONE)
    _fits(page, PHONE["width"])
    _screenshot(page, "single-phone", varying="#timings")


def test_a_changed_setting_updates_the_cartoon_at_once(web: Session) -> None:
    """After a result, moving the strength or picking another format asks again; the service answers
    from what its models already made of the photo, and the page says so and offers the new file."""
    page = web.open()
    _choose(page, "grace.jpg", photos.grace_hopper(), (240, 300))
    page.get_by_role("button", name="Cartoonize").click()
    status = page.get_by_role("status").filter(has_text="The cartoon is ready")
    expect(status).to_contain_text("Done:")
    first = page.get_by_alt_text("Cartoon", exact=True).get_attribute("src")
    _, full = _download(page, "Download")

    page.get_by_label("Strength").fill("0.5")
    expect(page.get_by_role("status").filter(has_text="Updated in")).to_contain_text(
        "from what the models already made of this photo"
    )
    assert page.get_by_alt_text("Cartoon", exact=True).get_attribute("src") != first
    _, half = _download(page, "Download")
    assert half != full
    with Image.open(io.BytesIO(half)) as im:
        assert im.size == (240, 300)

    page.get_by_label("Format").select_option("jpeg")
    expect(page.get_by_role("link", name="Download", exact=True)).to_have_attribute(
        "download", "grace-anime.jpg"
    )
    expect(page.get_by_role("status").filter(has_text="Updated in")).to_be_visible()
    assert _blob_type(page, "Download") == "image/jpeg"
    page.get_by_label("Format").select_option("")  # the next tests start from the service's defaults
    page.get_by_label("Strength").fill("1")


def test_settings_are_remembered_and_used(web: Session) -> None:
    page = web.open()
    # The number fields take their bounds from /openapi.json.
    expect(page.get_by_label("Output size")).to_have_attribute("max", str(MAX_OUTPUT_SIDE))
    expect(page.get_by_label("Quality")).to_have_attribute("min", str(MIN_QUALITY))
    expect(page.get_by_label("Quality")).to_have_attribute("max", str(MAX_QUALITY))
    page.get_by_label("Strength").fill("0.5")
    page.get_by_text("More settings", exact=True).click()
    for label, value in (("Processing size", "96"), ("Output size", "120"), ("Quality", "70")):
        page.get_by_label(label).fill(value)
        page.get_by_label(label).dispatch_event("change")
    page.get_by_label("Format").select_option("webp")
    # What the page sends: the text fields of its last form upload (the browser does not expose
    # multipart bodies with files to Playwright).
    page.add_init_script(SENT_FIELDS_SCRIPT)
    page.reload()
    page.wait_for_selector("body[data-ready]")
    expect(page.get_by_label("Strength")).to_have_value("0.5")
    expect(page.locator("#strength-value")).to_have_text("0.50")
    expect(page.get_by_label("Processing size")).to_have_value("96")
    expect(page.get_by_label("Output size")).to_have_value("120")
    expect(page.get_by_label("Format")).to_have_value("webp")
    expect(page.get_by_label("Quality")).to_have_value("70")

    _choose(page, "me.jpg", photos.grace_hopper(), (200, 240))
    page.get_by_role("button", name="Cartoonize").click()
    download = page.get_by_role("link", name="Download", exact=True)
    expect(download).to_have_attribute("download", "me-anime.webp")
    assert _blob_type(page, "Download") == "image/webp"
    expect(page.locator("#run-info")).to_contain_text("worked on at 96×115")
    # The result's long side is the output size asked for; the quality went with the request.
    _, data = _download(page, "Download")
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "WEBP" and im.size == (100, 120)
    assert page.evaluate("window.sentFields") == {
        "style": "anime",
        "strength": "0.5",
        "processing_size": "96",
        "output_size": "120",
        "format": "webp",
        "quality": "70",
        "response": "json",  # the single side reads faces and timings from the JSON answer
    }


def test_busy_service_is_retried_after_retry_after(web: Session) -> None:
    """A 503 with Retry-After (here made by intercepting the first POST: a full queue is hard to time)
    is waited out and sent again, and the person is told."""
    web.allow_status(503)
    page = web.open()
    answered: list[str] = []

    def busy_once(route: Route) -> None:
        if answered:
            route.continue_()
            return
        answered.append(route.request.url)
        body = {"error": {"code": "queue_full", "message": "the queue is full; retry in about 1 s"}}
        route.fulfill(status=503, headers={"Retry-After": "1"}, json=body)

    page.route("**/cartoonize", busy_once)
    _choose(page, "a.jpg", photos.astronaut(), (160, 160))
    page.get_by_role("button", name="Cartoonize").click()
    expect(page.locator("#single-status")).to_contain_text(
        "The service is busy; trying again in 1 s. (the queue is full; retry in about 1 s)"
    )
    expect(page.get_by_role("link", name="Download", exact=True)).to_be_visible()
    assert len(answered) == 1


def test_errors_are_the_apis_words(web: Session, server: LiveService) -> None:
    web.allow_status(415, 422)
    page = web.open()
    photo = _jpeg(photos.astronaut(), (160, 160))
    page.get_by_label("Photo", exact=True).set_input_files([_file("a.jpg", photo)])
    # Out of the API's bounds (the field says so, the page sends it anyway: the API decides).
    page.get_by_text("More settings", exact=True).click()
    page.get_by_label("Processing size").fill("5000")
    page.get_by_role("button", name="Cartoonize").click()
    expected = _api_error(server, "/cartoonize", [("image", photo)], {"processing_size": "5000"})
    assert "2048" in expected
    expect(page.get_by_role("alert").filter(has_text=expected)).to_have_text(expected)

    page.get_by_label("Processing size").fill("")
    page.get_by_label("Photo", exact=True).set_input_files([NOT_AN_IMAGE])
    # Not a picture the browser can draw: no broken image, a plain word instead.
    expect(page.locator("#single-status")).to_have_text(
        "This browser cannot preview this file; the service may still read it."
    )
    expect(page.get_by_alt_text("Your photo")).to_be_hidden()
    page.get_by_role("button", name="Cartoonize").click()
    expected = _api_error(server, "/cartoonize", [("image", NOT_AN_IMAGE["buffer"])], {})
    expect(page.locator("#single-error")).to_have_text(expected)
    expect(page.get_by_role("link", name="Download", exact=True)).to_be_hidden()
    expect(page.get_by_alt_text("Your photo")).to_be_hidden()


def test_keyboard_alone(web: Session) -> None:
    page = web.open()
    order = []
    page.keyboard.press("Tab")
    for _ in range(9):
        order.append(page.evaluate("document.activeElement.id"))
        page.keyboard.press("Tab")
    assert order == [
        *("style", "strength", "output-size", "format", "quality", "more-settings-summary"),
        *("tab-single", "photo", "cartoonize"),
    ]
    # "More settings" opens from the keyboard, its field next in order.
    page.locator("#more-settings-summary").focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "processing-size"
    # The focused control shows it.
    page.get_by_role("tab", name="One photo").focus()
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", "")

    # Tabs by arrow keys, then straight into the panel's first control.
    page.get_by_role("tab", name="One photo").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="A batch")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_label("Photos", exact=True)).to_be_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "photos"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("ArrowLeft")
    expect(page.get_by_label("Photo", exact=True)).to_be_visible()

    # The file chooser is the system's: the photo is set here, the rest is keys.
    _choose(page, "k.jpg", photos.astronaut(), (160, 160))
    page.get_by_label("Photo", exact=True).focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Cartoonize"
    page.keyboard.press("Enter")
    expect(page.get_by_role("link", name="Download", exact=True)).to_be_visible()


# -- a batch ---------------------------------------------------------------------------------------


def test_a_batch_with_one_bad_file(web: Session, server: LiveService) -> None:
    page = web.open()
    _batch_tab(page)
    files = [
        _file("astronaut.jpg", _jpeg(photos.astronaut(), (200, 200))),
        NOT_AN_IMAGE,
        _file("coffee.jpg", _jpeg(photos.coffee(), (240, 160))),
    ]
    page.get_by_label("Photos", exact=True).set_input_files(files)
    expect(page.locator("#batch-status")).to_have_text("3 photos chosen (0.0 MB).")
    page.get_by_role("button", name="Start batch").click()

    expect(page.locator("#batch-count")).to_have_text("3 of 3")
    progress = page.get_by_label("Progress")
    assert progress.evaluate("p => [p.value, p.max]") == [3, 3]
    expect(page.locator("#batch-status")).to_have_text("Batch done: 2 photos of 3 cartoonized, 1 failed.")
    expect(page.get_by_alt_text("Cartoon of astronaut.jpg")).to_be_visible()
    expect(page.get_by_alt_text("Cartoon of coffee.jpg")).to_be_visible()
    assert page.locator("#batch-items img").count() == 2
    failed = page.locator("#batch-items li.failed")
    expect(failed).to_have_count(1)
    expected = _api_error(server, "/cartoonize", [("image", NOT_AN_IMAGE["buffer"])], {})
    expect(failed).to_contain_text(f"notes.txt{expected}")
    _until(page, "[...document.querySelectorAll('#batch-items img')].every(i => i.complete)")
    # Each result on its own, named as in the ZIP but for the number.
    name, data = _download(page, "Download the cartoon of coffee.jpg")
    assert name == "coffee.png"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (240, 160)
    expect(page.get_by_role("link", name="Download the cartoon of notes.txt")).to_have_count(0)

    name, data = _download(page, "Download all")
    assert name.startswith("toonserve-") and name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["001-astronaut.png", "003-coffee.png", "results.json"]
        report = json.loads(zf.read("results.json"))
    assert [i["status"] for i in report["items"]] == ["ok", "error", "ok"]

    _screenshot(page, "batch-desktop")
    page.set_viewport_size(PHONE)
    _fits(page, PHONE["width"])
    _screenshot(page, "batch-phone")


def test_cancel_during_a_batch(web: Session, server: LiveService) -> None:
    page = web.open()
    # Larger than the service's default, so the batch surely outlasts the click, even on a fast machine.
    page.get_by_text("More settings", exact=True).click()
    page.get_by_label("Processing size").fill("384")
    _batch_tab(page)
    page.get_by_label("Photos", exact=True).set_input_files(_photos(9))
    page.get_by_role("button", name="Start batch").click()
    _until(page, "document.querySelectorAll('#batch-items img').length >= 1")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#batch-status")).to_contain_text("Batch cancelled:")
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("link", name="Download all", exact=True)).to_be_visible()
    job = _job(server, page)
    assert job["status"] == "cancelled"
    ok = sum(item["status"] == "ok" for item in job["items"])
    assert 1 <= ok < 9
    expect(page.locator("#batch-items .note").filter(has_text="cancelled")).to_have_count(
        sum(item["status"] == "cancelled" for item in job["items"])
    )


def test_a_reload_finds_the_running_batch(web: Session, server: LiveService) -> None:
    page = web.open()
    _batch_tab(page)
    page.get_by_label("Photos", exact=True).set_input_files(_photos(6))
    page.get_by_role("button", name="Start batch").click()
    _until(page, "parseInt(document.getElementById('batch-count').textContent) >= 1")
    assert _job(server, page)["status"] in ("queued", "running")
    page.reload()
    page.wait_for_selector("body[data-ready]")
    expect(page.get_by_role("tab", name="A batch")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#batch-count")).to_have_text("6 of 6")
    expect(page.locator("#batch-status")).to_have_text("Batch done: 6 photos of 6 cartoonized.")
    expect(page.locator("#batch-items img")).to_have_count(6)
    assert _job(server, page)["status"] == "succeeded"


def test_too_many_photos_for_a_job_are_refused_before_sending(web: Session) -> None:
    """The page reads the job limits from the API's schema, says them, and refuses a choice over
    them at once, in words, without uploading anything."""
    page = web.open()
    _batch_tab(page)
    expect(page.locator("#photos-hint")).to_contain_text(
        f"At most {MAX_JOB_FILES} photos and 4.0 MB in one batch."
    )
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    tiny = _jpeg(photos.coffee(), (32, 32))
    files = [_file(f"t{i}.jpg", tiny) for i in range(MAX_JOB_FILES + 1)]
    page.get_by_label("Photos", exact=True).set_input_files(files)
    expect(page.locator("#batch-error")).to_contain_text(
        f"{MAX_JOB_FILES + 1} photos chosen; this service takes at most {MAX_JOB_FILES} in one batch"
    )
    expect(page.get_by_role("button", name="Start batch")).to_be_disabled()
    page.get_by_label("Photos", exact=True).set_input_files(files[:MAX_JOB_FILES])
    expect(page.locator("#batch-error")).to_have_text("")
    expect(page.get_by_role("button", name="Start batch")).to_be_enabled()
    # Over the byte limit: three photos of noise, about 1.6 MB each as PNG.
    noise = np.random.default_rng(0).integers(0, 256, (740, 740, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, "PNG", compress_level=0)
    heavy = [_file(f"n{i}.png", png.getvalue(), "image/png") for i in range(3)]
    total = 3 * len(png.getvalue())
    page.get_by_label("Photos", exact=True).set_input_files(heavy)
    expect(page.locator("#batch-error")).to_have_text(
        f"The chosen photos come to {total / 1e6:.1f} MB; this service takes at most 4.0 MB in one batch. "
        "Choose fewer, or send them as several batches."
    )
    expect(page.get_by_role("button", name="Start batch")).to_be_disabled()
    # One photo over the largest a job takes (the largest /cartoonize takes), the batch within its bytes.
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(
        big, "PNG", compress_level=0
    )
    page.get_by_label("Photos", exact=True).set_input_files([_file("big.png", big.getvalue(), "image/png")])
    expect(page.locator("#batch-error")).to_have_text(
        f"big.png is {len(big.getvalue()) / 1e6:.1f} MB; this service takes photos of at most "
        f"{MAX_PHOTO_BYTES / 1e6:.1f} MB. Leave it out, or make it smaller."
    )
    expect(page.get_by_role("button", name="Start batch")).to_be_disabled()
    assert posts == []
    assert page.evaluate("localStorage.getItem('toonserve.job')") is None


# -- a video ---------------------------------------------------------------------------------------

#: The test clip's frames: a portrait panning two pixels a frame, small enough to run in a few seconds.
CLIP_FRAMES = 20
CLIP_SIDE = 144
#: Four times the clip's side (the most the service enlarges): each frame takes a moment, so progress
#: shows between the first frame and the last. Here (about 8 frames/s, counts recorded twice a
#: second) the speed and the time left show from 1.5 s on; with 12 frames the run ended a second
#: after its first count, and whether the time left showed before the end was down to a millisecond.
SLOW_PROCESSING_SIZE = "576"


def _clip_frames(count: int) -> list[np.ndarray]:
    wide = np.asarray(Image.fromarray(photos.astronaut()).resize((CLIP_SIDE + 2 * count, CLIP_SIDE)))
    return [np.ascontiguousarray(wide[:, 2 * i : 2 * i + CLIP_SIDE]) for i in range(count)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> FilePayload:
    path = write_test_clip(
        tmp_path_factory.mktemp("clip") / "clip.mp4", _clip_frames(CLIP_FRAMES), fps=10, quality=90
    )
    return _file("portrait.mp4", path.read_bytes(), "video/mp4")


#: Keeps every text the page writes to the frame count and the speed line, in order and with the
#: page's clock when it wrote it, as ``window.seen`` (``[ms, "count" | "speed", text]``): the page
#: changes them faster than a test could look.
SEEN_SCRIPT = """
window.seen = [];
document.addEventListener("DOMContentLoaded", () => {
  const text = Object.getOwnPropertyDescriptor(Node.prototype, "textContent");
  for (const [id, key] of [["video-count", "count"], ["video-speed", "speed"]]) {
    Object.defineProperty(document.getElementById(id), "textContent", {
      get() { return text.get.call(this); },
      set(value) {
        window.seen.push([performance.now(), key, String(value)]);
        text.set.call(this, value);
      },
    });
  }
});
"""

#: How far from the page's one second a count may be before :func:`_check_speed_line` says what the
#: speed line must show (the page reads its clock a moment before it writes the count).
SPEED_MARGIN_MS = 50
#: The page measures the speed over the counts of the last this long (``SPEED_WINDOW_MS`` in video.js).
SPEED_WINDOW_MS = 10_000


def _check_speed_line(seen: list[list[Any]]) -> None:
    """The speed line as the counts came: empty until two counts of written frames are a second
    apart, then "N.N frames/s", with the time left while frames remain and without it once all are
    written. Whether a second passes before the last frame depends on the machine (the speed may
    first show with the last count, or not at all), so what each line must say is read from the
    page's own times of the counts before it, not assumed."""
    running = re.compile(r"\d+\.\d frames/s, about \d+ (s|min) left")
    finished = re.compile(r"\d+\.\d frames/s")
    first = last = -1.0  # the page's times of the first count of written frames, and of the latest new one
    done = 0
    for at, key, text in seen:
        if key == "count":
            count = int(text.split()[0])
            if count > 0 and count != done:
                first, last = (at if first < 0 else first), at
            done = count
            continue
        span = last - first if first >= 0 else -1.0
        if text:
            assert span > 1000 - SPEED_MARGIN_MS, seen
            assert (running if done < CLIP_FRAMES else finished).fullmatch(text), seen
        else:  # (or the counts a second apart have left the window, in a run longer than it)
            assert span < 1000 + SPEED_MARGIN_MS or span > SPEED_WINDOW_MS, seen


def _video_tab(page: Page) -> None:
    page.get_by_role("tab", name="A video").click()
    expect(page.get_by_label("Clip", exact=True)).to_be_visible()


def _slow_frames(page: Page) -> None:
    """:data:`SLOW_PROCESSING_SIZE`, under "More settings"."""
    page.get_by_text("More settings", exact=True).click()
    page.get_by_label("Processing size").fill(SLOW_PROCESSING_SIZE)


def _player_ready(page: Page, element_id: str) -> None:
    """The <video> has read the clip: its size and duration known, its first frame drawn."""
    _until(page, f"document.getElementById('{element_id}').readyState >= 2")
    duration = page.evaluate(f"document.getElementById('{element_id}').duration")
    assert duration > 0, duration


def _still(page: Page, selector: str) -> None:
    """Wait until ``selector`` looks the same twice in a row: a player shows a spinner for a moment
    after its clip has loaded, which a screenshot must not catch."""
    deadline = time.monotonic() + STEP_S
    last = b""
    while (shot := page.locator(selector).screenshot()) != last:
        assert time.monotonic() < deadline, f"{selector} still moves after {STEP_S} s"
        last = shot
        time.sleep(0.25)


def _check_clip(data: bytes, tmp: Path) -> None:
    """An H.264 MP4 with every frame of the test clip, at its size."""
    path = tmp / "cartoon.mp4"
    path.write_bytes(data)
    info = probe_video(path)
    assert "mp4" in info.format and info.codec == "h264"
    assert (info.frames, info.width, info.height) == (CLIP_FRAMES, CLIP_SIDE, CLIP_SIDE)


def test_a_video_end_to_end(web: Session, server: LiveService, clip: FilePayload, tmp_path: Path) -> None:
    page = web.page
    page.add_init_script(SEEN_SCRIPT)
    page.add_init_script(SENT_FIELDS_SCRIPT)
    web.open()
    # A photo's setting that does not apply to a video: not sent with it.
    page.get_by_label("Format").select_option("webp")
    _slow_frames(page)
    _video_tab(page)
    expect(page.locator("#quality-hint")).to_contain_text("a video at 100 is lossless")
    # The clip's limits, from /openapi.json: the job body (smaller here than the clip's own) and its length.
    expect(page.locator("#clip-hint")).to_contain_text("At most 4.0 MB, 5 min long.")
    page.get_by_label("Clip", exact=True).set_input_files([clip])
    expect(page.locator("#video-status")).to_have_text("portrait.mp4 chosen (0.0 MB).")
    expect(page.get_by_label("Your clip")).to_be_visible()  # the browser plays it: shown before it goes
    page.get_by_role("button", name="Cartoonize clip").click()

    status = page.locator("#video-status")
    expect(status).to_have_text(
        f"Done: {CLIP_FRAMES} frames cartoonized. The cartoon clip plays below, ready to download."
    )
    expect(page.locator("#video-count")).to_have_text(f"{CLIP_FRAMES} of {CLIP_FRAMES} frames")
    assert page.get_by_label("Frames").evaluate("p => [p.value, p.max]") == [CLIP_FRAMES, CLIP_FRAMES]
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    # Progress was shown as the frames were written: counts between none and all, in order, and the
    # speed (with the time left while frames remained) once a second of counts was known.
    seen = page.evaluate("window.seen")
    counts = [int(text.split()[0]) for _, key, text in seen if key == "count"]
    assert counts == sorted(counts) and any(0 < n < CLIP_FRAMES for n in counts), seen
    _check_speed_line(seen)
    assert page.evaluate("window.sentFields") == {
        "style": "anime",
        "strength": "1",
        "processing_size": SLOW_PROCESSING_SIZE,
    }
    job = _job(server, page, "toonserve.video")
    assert job["kind"] == "video" and job["status"] == "succeeded"

    # The cartoon plays in the page, from the same bytes the download gives.
    player = page.get_by_label("Cartoon clip")
    expect(player).to_be_visible()
    _player_ready(page, "toon")
    assert player.evaluate("v => [v.videoWidth, v.videoHeight]") == [CLIP_SIDE, CLIP_SIDE]
    expect(page.locator("#toon-caption")).to_have_text(
        re.compile(r"^The cartoon of portrait\.mp4 \(0\.\d MB\)$")
    )
    name, data = _download(page, "Download clip")
    assert name == "portrait-anime.mp4"
    _check_clip(data, tmp_path)
    assert _blob_type(page, "Download clip") == "video/mp4"

    page.get_by_label("Format").select_option("")  # as the other screenshots show it
    _player_ready(page, "clip-preview")
    _still(page, "#video-result")
    _screenshot(page, "video-desktop", varying="#video-speed")
    page.set_viewport_size(PHONE)
    _fits(page, PHONE["width"])
    _still(page, "#video-result")
    _screenshot(page, "video-phone", varying="#video-speed")


def test_a_file_that_is_not_a_video_gets_the_apis_415(web: Session, server: LiveService) -> None:
    web.allow_status(415)
    page = web.open()
    _video_tab(page)
    page.get_by_label("Clip", exact=True).set_input_files([NOT_AN_IMAGE])
    # The browser cannot play it: not shown, and the page says so in words.
    expect(page.locator("#video-status")).to_have_text(
        "notes.txt chosen (0.0 MB). This browser cannot preview it; the service may still read it."
    )
    expect(page.get_by_label("Your clip")).to_be_hidden()
    page.get_by_role("button", name="Cartoonize clip").click()
    r = httpx.post(server.url + "/jobs", files=[("video", ("notes.txt", NOT_AN_IMAGE["buffer"]))], timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_video", r.text
    expected = r.json()["error"]["message"]
    expect(page.get_by_role("alert").filter(has_text=expected)).to_have_text(expected)
    expect(page.locator("#video-status")).to_have_text("")
    expect(page.get_by_label("Frames")).to_be_hidden()
    expect(page.get_by_role("link", name="Download clip", exact=True)).to_be_hidden()
    assert page.evaluate("localStorage.getItem('toonserve.video')") is None


def test_a_reload_finds_the_running_video_and_reads_it_without_its_events_stream(
    web: Session, server: LiveService, clip: FilePayload, tmp_path: Path
) -> None:
    """After a reload the page follows the video job again, on its side; when its events stream
    cannot be had (here every attempt fails), it reads the job every second instead."""
    page = web.open()
    _slow_frames(page)
    _video_tab(page)
    page.get_by_label("Clip", exact=True).set_input_files([clip])
    page.get_by_role("button", name="Cartoonize clip").click()
    _until(page, "parseInt(document.getElementById('video-count').textContent) >= 1")
    assert _job(server, page, "toonserve.video")["status"] in ("queued", "running")

    page.route("**/jobs/*/events", lambda route: route.abort())
    web.allowed.append("net::ERR_FAILED")  # the browser logs every aborted request
    page.reload()
    page.wait_for_selector("body[data-ready]")
    expect(page.get_by_role("tab", name="A video")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#video-status")).to_have_text(
        f"Done: {CLIP_FRAMES} frames cartoonized. The cartoon clip plays below, ready to download."
    )
    job_id = page.evaluate("localStorage.getItem('toonserve.video')")
    reads = [url for url in web.requests if url == f"{server.url}/jobs/{job_id}"]
    assert reads, web.requests
    _player_ready(page, "toon")
    _, data = _download(page, "Download clip")
    _check_clip(data, tmp_path)


def test_cancel_during_a_video(web: Session, server: LiveService, tmp_path: Path) -> None:
    long_clip = write_test_clip(tmp_path / "long.mp4", _clip_frames(40), fps=10, quality=90)
    page = web.open()
    _slow_frames(page)
    _video_tab(page)
    page.get_by_label("Clip", exact=True).set_input_files(
        [_file("long.mp4", long_clip.read_bytes(), "video/mp4")]
    )
    page.get_by_role("button", name="Cartoonize clip").click()
    _until(page, "parseInt(document.getElementById('video-count').textContent) >= 1")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#video-status")).to_have_text(re.compile(r"^Cancelled after \d+ of 40 frames\.$"))
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("link", name="Download clip", exact=True)).to_be_hidden()
    job = _job(server, page, "toonserve.video")
    assert job["status"] == "cancelled" and 1 <= job["done"] < 40, job
    expect(page.locator("#video-status")).to_have_text(f"Cancelled after {job['done']} of 40 frames.")


# -- with an API key -------------------------------------------------------------------------------


def test_with_an_api_key_the_page_asks_once_and_keeps_it_in_the_tab(
    keyed_web: Session, clip: FilePayload, tmp_path: Path
) -> None:
    keyed_web.allow_status(401)
    page = keyed_web.page
    page.goto(keyed_web.origin + "/")
    dialog = page.get_by_role("dialog", name="API key needed")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("This service asks for a key before it makes cartoons.")
    expect(dialog).not_to_contain_text("X-API-Key")  # a person's words, not the API's
    page.get_by_label("API key", exact=True).fill("wrong")
    page.get_by_role("button", name="Use this key").click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("That key was not accepted.")
    page.get_by_label("API key", exact=True).fill(API_KEY)
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    page.wait_for_selector("body[data-ready]")
    expect(page.get_by_label("Style", exact=True)).to_have_value("anime")
    assert page.evaluate("sessionStorage.getItem('toonserve.apiKey')") == API_KEY
    assert API_KEY not in page.evaluate("JSON.stringify(localStorage)")

    _choose(page, "k.jpg", photos.astronaut(), (160, 160))
    page.get_by_role("button", name="Cartoonize").click()
    expect(page.get_by_role("link", name="Download", exact=True)).to_be_visible()

    _batch_tab(page)
    page.get_by_label("Photos", exact=True).set_input_files(_photos(2))
    page.get_by_role("button", name="Start batch").click()
    expect(page.locator("#batch-count")).to_have_text("2 of 2")
    expect(page.locator("#batch-items img")).to_have_count(2)
    link = page.get_by_role("link", name="Download all", exact=True)
    expect(link).to_have_attribute("href", re.compile(r"^blob:"))
    _, data = _download(page, "Download all")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["001-photo-01.png", "002-photo-02.png", "results.json"]

    # A video job, its events and its clip, with the key too (a <video> cannot send it: the page does).
    _video_tab(page)
    page.get_by_label("Clip", exact=True).set_input_files([clip])
    page.get_by_role("button", name="Cartoonize clip").click()
    expect(page.locator("#video-status")).to_contain_text(f"Done: {CLIP_FRAMES} frames cartoonized.")
    _player_ready(page, "toon")
    _check_clip(_download(page, "Download clip")[1], tmp_path)
    assert not dialog.is_visible()  # asked once only


def test_the_docs_render_under_their_content_security_policy(web: Session) -> None:
    """/docs and /redoc send a policy (this origin only, their inline script by its hash); the
    browser must still draw them, with no violation logged and nothing fetched from elsewhere."""
    page = web.page
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    response = page.goto(web.origin + "/docs")
    assert response is not None and "'sha256-" in response.headers["content-security-policy"]
    page.wait_for_selector(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path >> text=/cartoonize")
    response = page.goto(web.origin + "/redoc")
    assert response is not None and "content-security-policy" in response.headers
    page.wait_for_selector("[role=search], .api-content", state="attached")
    # ReDoc links its "powered by" logo from its CDN: the policy keeps the browser from fetching it,
    # which is the point (nothing leaves a closed network). Nothing else may be blocked.
    blocked = [e for e in web.console_errors if "Content Security Policy" in e]
    assert all("https://cdn.redoc.ly/" in e for e in blocked), blocked
    web.allowed += blocked
    here = (web.origin + "/", "blob:" + web.origin + "/", "data:")
    elsewhere = [url for url in web.requests if not url.startswith(here)]
    assert all(url in failed for url in elsewhere), (elsewhere, failed)  # asked for, never fetched
    web.requests[:] = [url for url in web.requests if url not in elsewhere]
