"""What the README's set-up commands do on a machine that is not ours: a user who is not root, the
tree left as it was found."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _as_a_user(command: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    """``command`` as an ordinary user (nobody, when we are root) with only ``path`` on PATH."""
    prefix = []
    if os.geteuid() == 0:
        prefix = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"PATH": str(path), "LANG": "C.UTF-8"}
    return subprocess.run([*prefix, *command], env=env, capture_output=True, text=True, timeout=60)


def test_missing_debian_packages_without_root_or_sudo_name_the_command() -> None:
    """Not root, no sudo: nothing is attempted, and the exact command to run is printed."""
    with tempfile.TemporaryDirectory() as name:
        # pytest's own temporary folders are closed to other users.
        place = Path(name)
        place.chmod(0o755)
        _check_the_script(place)


def _check_the_script(place: Path) -> None:
    bin_dir = place / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("id") or "/usr/bin/id", bin_dir / "id")
    script = place / "debian_packages.sh"
    shutil.copyfile(ROOT / "devkit" / "debian_packages.sh", script)
    done = _as_a_user(["/bin/sh", str(script), "id", "no-such-tool"], bin_dir)
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        "The tests need the Debian packages no-such-tool. Install them, then run make test again:",
        "  sudo apt-get update && sudo apt-get install -y --no-install-recommends "
        "-o DPkg::Lock::Timeout=300 no-such-tool",
    ]
    # Nothing missing: nothing to do, whoever runs it.
    assert _as_a_user(["/bin/sh", str(script), "id"], bin_dir).returncode == 0


def test_the_tests_write_screenshots_outside_the_tree_unless_asked() -> None:
    """`make test` must leave `git status` clean: the browser tests write into build/ (ignored), and
    only `make screenshots` points them at docs/screenshots/."""
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "TOONSERVE_SCREENSHOTS" not in dry.stdout
    dry = subprocess.run(["make", "-n", "screenshots"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert f"TOONSERVE_SCREENSHOTS={ROOT}/docs/screenshots" in dry.stdout
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "build/screenshots/single-desktop.png"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0
