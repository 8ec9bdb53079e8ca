"""The photos of a folder, for both CLIs (``toonserve cartoonize`` and ``toonserve jobs submit``).

A folder holds more than photos; what is left out is said, each entry with its reason, so a file
that was expected to be a cartoon is never missing without a word.
"""

from __future__ import annotations

import sys
from pathlib import Path

from inference.errors import ToonserveError

#: The file name suffixes the CLIs take as photos (the service itself decides by content).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class FolderError(ToonserveError):
    """A folder that is not there, or holds no photos."""


def _why_not(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """Why ``path`` is not taken as a photo, or None when it is."""
    if path.is_dir():
        return "a folder (folders inside are not read)"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in suffixes:
        kind = f"{path.suffix.lower()} file" if path.suffix else "no suffix"
        return f"not a photo by its name ({kind})"
    return None


def photos_in(folder: Path, suffixes: tuple[str, ...] = PHOTO_SUFFIXES, quiet: bool = False) -> list[Path]:
    """The folder's photos (by suffix), sorted by name; :class:`FolderError` if there is none. What
    it leaves out is listed on stderr (one line per entry, with the reason) unless ``quiet``."""
    if not folder.is_dir():
        raise FolderError(f"{folder} is not a directory")
    photos, skipped = [], []
    for path in sorted(folder.iterdir()):
        reason = _why_not(path, suffixes)
        if reason is None:
            photos.append(path)
        else:
            skipped.append(f"  {path.name}: {reason}")
    if skipped and not quiet:
        print(
            f"skipping {len(skipped)} of {len(skipped) + len(photos)} entries in {folder}:", file=sys.stderr
        )
        print("\n".join(skipped), file=sys.stderr, flush=True)
    if not photos:
        raise FolderError(f"no photos ({', '.join(suffixes)}) in {folder}")
    return photos
