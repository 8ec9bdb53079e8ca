"""Real photos that ship inside installed packages (design.md, "Where tests get real data").

All functions return HWC uint8 RGB numpy arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def astronaut() -> np.ndarray:
    """Eileen Collins, 512×512 RGB, one face (scikit-image)."""
    from skimage import data

    img: np.ndarray = data.astronaut()  # type: ignore[no-untyped-call]
    return np.ascontiguousarray(img)


def grace_hopper() -> np.ndarray:
    """Grace Hopper, 600×512 (H×W) RGB, one face (matplotlib sample data)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def coffee() -> np.ndarray:
    """A cup of coffee, 400×600 RGB, no face (scikit-image)."""
    from skimage import data

    img: np.ndarray = data.coffee()  # type: ignore[no-untyped-call]
    return np.ascontiguousarray(img)


def group(count: int = 4, tile: int = 384) -> np.ndarray:
    """A composite "group photo": ``count`` portraits (astronaut/hopper alternately, some mirrored)
    resized to ``tile``×``tile`` and laid out in a row of up to 3, then more rows. RGB uint8."""
    sources = [astronaut(), grace_hopper()]
    tiles = []
    for i in range(count):
        img = sources[i % 2]
        if (i // 2) % 2:
            img = img[:, ::-1]
        resized = Image.fromarray(np.ascontiguousarray(img)).resize((tile, tile), Image.Resampling.BILINEAR)
        tiles.append(np.asarray(resized))
    cols = min(count, 3)
    rows = -(-count // cols)
    canvas = np.full((rows * tile, cols * tile, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = t
    return canvas


def one_face_1024x768() -> np.ndarray:
    """Grace Hopper resized to 768 high and widened to 1024×768 (W×H) with reflected borders (the
    benchmarks' one-face photo). RGB uint8."""
    src = Image.fromarray(grace_hopper())
    h = 768
    w = round(src.width * h / src.height)
    portrait = np.asarray(src.resize((w, h), Image.Resampling.BILINEAR))
    left = (1024 - w) // 2
    return np.pad(portrait, ((0, 0), (left, 1024 - w - left), (0, 0)), mode="reflect")
