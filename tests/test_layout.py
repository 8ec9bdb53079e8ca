"""The import rules of the repository, read from the source with :mod:`ast` (nothing is imported).

Imports flow service → api → jobs → serving → inference; ``devkit/`` (development helpers) is shared by
``tests/`` and ``bench/``, which never import each other; the shipped packages import none of the three.
``inference/`` is the synchronous model library: no event loop, no thread of its own.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package (a top-level folder) → top-level modules it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "tests": frozenset({"bench"}),
    "bench": frozenset({"tests"}),
    "devkit": frozenset({"tests", "bench"}),
    "inference": frozenset(
        {"serving", "jobs", "api", "service", "fastapi", "starlette", "asyncio", "devkit", "tests", "bench"}
    ),
    "serving": frozenset({"jobs", "api", "service", "fastapi", "starlette", "devkit", "tests", "bench"}),
    "jobs": frozenset({"api", "service", "fastapi", "starlette", "devkit", "tests", "bench"}),
    "api": frozenset({"service", "devkit", "tests", "bench"}),
    "service": frozenset({"devkit", "tests", "bench"}),
}


def imported_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """Every module ``source`` imports, absolute; relative imports are resolved against ``package``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            if module:
                found.add(module)
            # ``from pkg import name`` may import the submodule pkg.name
            found.update(
                f"{module}.{alias.name}" if module else alias.name
                for alias in node.names
                if alias.name != "*"
            )
    return found


def violations(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        package_parts = path.relative_to(ROOT).parent.parts
        for module in sorted(imported_modules(path.read_text(), package_parts)):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


def test_the_model_library_starts_no_thread() -> None:
    """``inference/`` runs on its caller's thread: it may guard shared state with a lock, but it never
    starts a thread or a pool (the worker, the loader and the codec threads belong to ``serving/``)."""
    starts = []
    for path in sorted((ROOT / "inference").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in (
                "Thread",
                "ThreadPoolExecutor",
                "ProcessPoolExecutor",
            ):
                starts.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module in ("threading", "concurrent.futures"):
                names = {a.name for a in node.names} & {"Thread", "ThreadPoolExecutor", "ProcessPoolExecutor"}
                starts += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in sorted(names)]
    assert starts == []


def test_the_checker_sees_every_import_form() -> None:
    """Guards the checker: plain, dotted, from-, relative and function-level imports are all seen."""
    source = (
        "import os, api.state\n"
        "from service import app\n"
        "from . import faces\n"
        "from .models import ModelStore\n"
        "from .. import bench\n"
        "def f():\n"
        "    import starlette.requests\n"
    )
    modules = imported_modules(source, ("inference",))
    assert {"os", "api.state", "service", "service.app", "inference", "inference.faces"} <= modules
    assert {"inference.models", "bench", "starlette.requests"} <= modules


def test_dev_packages_are_not_shipped() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {name for name in shipped if any(fnmatch.fnmatchcase(name, pat) for pat in include)} == {
        "service",
        "api",
        "jobs",
        "serving",
        "inference",
    }
