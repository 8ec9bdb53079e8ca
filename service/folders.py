"""The photos of a folder, for both CLIs (``toonserve cartoonize`` and ``toonserve jobs submit``)."""

from __future__ import annotations

from pathlib import Path

from inference.errors import ToonserveError

#: The file name suffixes the CLIs take as photos (the service itself decides by content).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class FolderError(ToonserveError):
    """A folder that is not there, or holds no photos."""


def photos_in(folder: Path, suffixes: tuple[str, ...] = PHOTO_SUFFIXES) -> list[Path]:
    """The folder's photos (by suffix), sorted by name; :class:`FolderError` if there is none."""
    if not folder.is_dir():
        raise FolderError(f"{folder} is not a directory")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not photos:
        raise FolderError(f"no photos ({', '.join(suffixes)}) in {folder}")
    return photos
