"""The contract the code, the OpenAPI schema and the README must agree on: every domain error has a
deliberate status, every code is documented, every default and bound is written once."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import inference
import jobs
import serving
from api.errors import CODES, ERROR_CODES, code_for
from inference.constants import (
    DEFAULT_MAX_FACES,
    DEFAULT_MIN_FACE_SIZE,
    DEFAULT_PROCESSING_SIZE,
    MAX_MAX_FACES,
    MAX_OUTPUT_SIDE,
    MAX_PROCESSING_SIZE,
    MIN_OUTPUT_SIDE,
    MIN_PROCESSING_SIZE,
    NO_FACE_POLICIES,
)
from inference.errors import ToonserveError
from inference.weights import REQUIRED_FILES
from service.settings import Settings
from serving.encoding import MAX_QUALITY, MIN_QUALITY, OUTPUT_FORMATS
from serving.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _domain_errors() -> list[type[ToonserveError]]:
    for package in (inference, serving, jobs):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: list[type[ToonserveError]] = []
    todo = [ToonserveError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith(("inference.", "serving.", "jobs.")):
                found.append(sub)
            todo.append(sub)
    return found


def test_every_domain_error_has_a_deliberate_code() -> None:
    errors = _domain_errors()
    assert len(errors) >= 25
    missing = sorted(cls.__qualname__ for cls in errors if cls not in ERROR_CODES)
    assert not missing, f"map these in api.errors.ERROR_CODES: {missing}"
    assert set(ERROR_CODES.values()) <= set(CODES)
    # The lookup follows the class, not a base class's entry that happens to come first.
    for cls in errors:
        exc = cls.__new__(cls)
        assert code_for(exc) == ERROR_CODES[cls], cls


def test_every_code_is_in_the_readme_error_table() -> None:
    rows = re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", _section("API summary"), flags=re.M)
    assert {code: int(status) for status, code in rows} == {code: c.status for code, c in CODES.items()}


def _readme_settings() -> dict[str, str]:
    rows = re.findall(r"^\| `TOONSERVE_([A-Z_]+)` \| (.*?) \|", _section("Settings"), flags=re.M)
    return {name.lower(): default.strip() for name, default in rows}


def _as_readme(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, list):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, Path):
        return f"`{str(value).replace(str(Path.home()), '~')}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def test_readme_settings_table_matches_the_settings() -> None:
    documented = _readme_settings()
    assert set(documented) == set(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        expected = _as_readme(default)
        if expected is not None:
            assert documented[name] == expected, name


def _bounds(field_name: str) -> tuple[Any, Any]:
    lo = hi = None
    for meta in Settings.model_fields[field_name].metadata:
        lo = getattr(meta, "ge", lo)
        hi = getattr(meta, "le", hi)
    return lo, hi


def test_settings_take_their_defaults_and_bounds_from_the_inference_constants() -> None:
    fields = Settings.model_fields
    assert fields["processing_size"].default == DEFAULT_PROCESSING_SIZE
    assert _bounds("processing_size") == (MIN_PROCESSING_SIZE, MAX_PROCESSING_SIZE)
    assert _bounds("quality") == (MIN_QUALITY, MAX_QUALITY)
    assert fields["min_face_size"].default == DEFAULT_MIN_FACE_SIZE
    assert fields["max_faces"].default == DEFAULT_MAX_FACES and _bounds("max_faces")[1] == MAX_MAX_FACES
    assert fields["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert fields["max_upload_bytes"].default == DEFAULT_MAX_BYTES


def test_openapi_form_bounds_and_choices_are_the_constants(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for route in ("/cartoonize", "/cartoonize/batch"):
        ref = spec["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        props = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]

        def bounds(name: str, props: dict[str, Any] = props) -> tuple[Any, Any]:
            schema = props[name]
            options = [schema, *schema.get("anyOf", [])]
            return (
                next(o["minimum"] for o in options if "minimum" in o),
                next(o["maximum"] for o in options if "maximum" in o),
            )

        assert bounds("processing_size") == (MIN_PROCESSING_SIZE, MAX_PROCESSING_SIZE)
        assert bounds("output_size") == (MIN_OUTPUT_SIDE, MAX_OUTPUT_SIDE)
        assert bounds("quality") == (MIN_QUALITY, MAX_QUALITY)
        assert bounds("strength") == (0, 1)
        fmt = next(o for o in [props["format"], *props["format"].get("anyOf", [])] if "enum" in o)
        assert tuple(fmt["enum"]) == OUTPUT_FORMATS
        assert tuple(props["no_face"]["enum"]) == NO_FACE_POLICIES


def test_openapi_states_this_servers_file_and_byte_limits(client: TestClient) -> None:
    """Clients (the web page among them) read the limits from the schema: the files a list may hold
    and the body a route reads, as this server is configured."""
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    upload = 3_000_000  # the fixture's TOONSERVE_MAX_UPLOAD_BYTES
    spec = client.get("/openapi.json").json()
    expected = {
        "/cartoonize": (None, upload),
        "/cartoonize/batch": (defaults["max_batch_files"], upload),
        "/jobs": (defaults["max_job_files"], defaults["max_job_bytes"]),
    }
    for route, (files, body_bytes) in expected.items():
        body = spec["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]
        props = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
        assert body["x-max-body-bytes"] == body_bytes, route
        if files is not None:
            assert props["images"]["minItems"] == 1 and props["images"]["maxItems"] == files, route
        if route == "/jobs":  # a video job's clip: the limits it is checked against
            assert {k: v for k, v in props["video"].items() if k.startswith("x-")} == {
                "x-max-bytes": defaults["max_video_bytes"],
                "x-max-seconds": defaults["max_video_seconds"],
                "x-max-frames": defaults["max_video_frames"],
                "x-max-pixels": defaults["max_video_pixels"],
            }


def test_readme_form_table_states_the_constants() -> None:
    form = _section("API summary")
    assert f"| `processing_size` | {MIN_PROCESSING_SIZE}…{MAX_PROCESSING_SIZE}" in form
    assert f"| `output_size` | {MIN_OUTPUT_SIDE}…{MAX_OUTPUT_SIDE}" in form
    assert f"| `quality` | {MIN_QUALITY}…{MAX_QUALITY}" in form
    assert "| `format` | " + ", ".join(f"`{f}`" for f in OUTPUT_FORMATS) in form


def test_readme_and_the_offline_message_name_the_same_files(tmp_path: Path) -> None:
    from inference.errors import WeightsUnavailableError
    from inference.weights import resolve

    with pytest.raises(WeightsUnavailableError) as info:
        resolve("anime", tmp_path, None, allow_download=False)
    files = ", ".join(REQUIRED_FILES)
    assert f"place the files {files}" in str(info.value)
    section = _section("Weights on a machine without internet")
    assert "Needed: " + ", ".join(f"`{f}`" for f in REQUIRED_FILES) in section


def test_openapi_declares_errors_and_headers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/cartoonize"]["post"]["responses"]
    assert {"400", "401", "413", "415", "422", "499", "500", "503", "504"} <= set(post)
    for status in ("400", "413", "422", "503"):
        assert post[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"Server-Timing", "X-Faces-Stylized", "X-Request-ID"} <= set(post["200"]["headers"])
    assert "Retry-After" in post["503"]["headers"]
    batch = spec["paths"]["/cartoonize/batch"]["post"]["responses"]
    assert batch["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "Server-Timing" in batch["200"]["headers"] and "too_many_files" in batch["413"]["description"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    # Every response field is described.
    for name in ("CartoonJSON", "FaceOut", "BatchItem", "Ready", "StyleInfo", "ErrorDetail"):
        props = spec["components"]["schemas"][name]["properties"]
        undocumented = [p for p, s in props.items() if not s.get("description")]
        assert not undocumented, (name, undocumented)


def test_docs_page_needs_no_internet(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text
