"""The real AP radiographs with vertebra boxes (CADMA / Roboflow export of AASCE-type images).

Folder layout (``<data>/radiographs/cadma_train``): ``images/*.jpg`` and ``labels/*.txt`` with one YOLO box
per vertebra (``class xc yc w h``, normalised).  The boxes cover about T1-L5: no cervical vertebrae, no
sacrum, no level names.  Some source images were exported twice under different Roboflow suffixes; every
split scheme (`inference.splits`) keeps such copies, and a patient's films, together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.splits import source_key, split_of

SUBDIR = Path("radiographs") / "cadma_train"


@dataclass(frozen=True)
class RealRadiograph:
    """One real radiograph and its boxes in pixels: (x0, y0, x1, y1) rows sorted top to bottom."""

    key: str  # source name shared by duplicate exports
    path: Path
    boxes: np.ndarray  # float (n, 4)

    def load(self) -> np.ndarray:
        """Grayscale pixels as float32 in [0, 1]."""
        from PIL import Image

        with Image.open(self.path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def read_boxes(label: Path, width: int, height: int) -> np.ndarray:
    """YOLO boxes of one label file in pixels, sorted top to bottom."""
    rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
    boxes = []
    for parts in rows:
        _, xc, yc, w, h = (float(v) for v in parts[:5])
        boxes.append(((xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width, (yc + h / 2) * height))
    arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return arr[np.argsort((arr[:, 1] + arr[:, 3]) / 2)]


def load_cadma(data_dir: Path) -> list[RealRadiograph]:
    """Every image with its boxes (sorted by file name)."""
    from PIL import Image

    folder = Path(data_dir) / SUBDIR
    if not (folder / "images").is_dir():
        raise FileNotFoundError(f"{folder}/images not found (pass the shared data folder with --data)")
    out = []
    for path in sorted((folder / "images").glob("*.jpg")):
        label = folder / "labels" / (path.stem + ".txt")
        if not label.is_file():
            continue
        with Image.open(path) as im:
            width, height = im.size
        out.append(RealRadiograph(source_key(path), path, read_boxes(label, width, height)))
    return out


def split(items: list[RealRadiograph], scheme: str) -> dict[str, list[RealRadiograph]]:
    """Items by split under `scheme` (`inference.splits.SCHEMES`)."""
    out: dict[str, list[RealRadiograph]] = {"train": [], "val": [], "test": []}
    for item in items:
        out[split_of(item.path.name, scheme)].append(item)
    return out
