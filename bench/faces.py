"""Face detection: its time against the pyramid floor, and which face sizes each floor still finds.

    python -m bench.faces [--floors 12,20,24,32,40,48,60] [--repeat 15] [--json bench/results/faces.json]

The detector's floor is the smallest face side it looks for; the service ties it to
``TOONSERVE_MIN_FACE_SIZE`` (faces under that are not stylised, so finding them is wasted work).
For each floor, in one run on this machine's CPU:

1. the median time of ``detect`` on the 1024×768 one-face photo at the default processing size
   (short side 720, as the pipeline hands it to the detector): the cost per request;
2. a ladder: the same real face scaled to sides of 16…96 px, each alone on a 720×960 canvas; which
   of them are found (a found face's box overlaps the planted one). Upstream keeps faces over 60 px.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.report import write_report
from devkit import photos
from inference.faces import create_detector
from inference.geometry import resize_rgb
from inference.pipeline import Options

LADDER = (16, 20, 24, 28, 32, 36, 40, 48, 56, 64, 80, 96)


def face_crop() -> np.ndarray:
    """Grace Hopper's face, square, from the one-face photo (found at a generous floor)."""
    rgb = photos.grace_hopper()
    faces = create_detector("mtcnn", smallest_face=20.0).detect(rgb)
    x1, y1, x2, y2 = faces[0].box
    side = max(x2 - x1, y2 - y1) * 1.6  # the face and some head around it, as in a photo
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box = (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
    return np.asarray(Image.fromarray(rgb).crop(box))


def planted(crop: np.ndarray, face_side: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A 720×960 grey canvas with the crop scaled so the face inside is about ``face_side`` px."""
    canvas = np.full((960, 720, 3), 128, np.uint8)
    side = round(face_side * 1.6)
    small = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.LANCZOS))
    y, x = 400, 300
    canvas[y : y + side, x : x + side] = small
    return canvas, (x, y, x + side, y + side)


def overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w > 0 and h > 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floors", default="12,20,24,32,40,48,60")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", type=Path, default=Path("bench/results/faces.json"))
    args = ap.parse_args()

    photo = photos.one_face_1024x768()
    h, w = photo.shape[:2]
    scale = Options().processing_size / min(h, w)
    photo = resize_rgb(photo, round(h * scale), round(w * scale))
    crop = face_crop()
    ladder = {side: planted(crop, side) for side in LADDER}

    rows = []
    for floor in (float(f) for f in args.floors.split(",")):
        detector = create_detector("mtcnn", smallest_face=floor)
        detector.detect(photo)  # first-call costs aside
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            found = detector.detect(photo)
            times.append((time.perf_counter() - start) * 1000)
        assert len(found) == 1, f"floor {floor}: {len(found)} faces in the one-face photo"
        seen = [
            s for s, (img, box) in ladder.items() if any(overlaps(f.box, box) for f in detector.detect(img))
        ]
        rows.append(dict(floor=floor, detect_ms=statistics.median(times), found_sides=seen))

    base = rows[0]["detect_ms"]
    print(f"# face detection, MTCNN on CPU ({torch.get_num_threads()} threads), photo {photo.shape[1]}×"
          f"{photo.shape[0]}, median of {args.repeat}")  # fmt: skip
    print(f"{'floor px':>8} {'detect ms':>10} {'vs first':>12}  planted faces found (px)")
    for r in rows:
        print(f"{r['floor']:8.0f} {r['detect_ms']:10.1f} {r['detect_ms'] / base:11.2f}x  "
              f"{', '.join(str(s) for s in r['found_sides'])}")  # fmt: skip
    write_report(args.json, dict(ladder=LADDER, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
