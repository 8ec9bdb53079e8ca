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

    img: np.ndarray = data.astronaut()
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

    img: np.ndarray = data.coffee()
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
        tiles.append(
            np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((tile, tile), Image.BILINEAR))
        )
    cols = min(count, 3)
    rows = -(-count // cols)
    canvas = np.full((rows * tile, cols * tile, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = t
    return canvas
