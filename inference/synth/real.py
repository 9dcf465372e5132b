"""Real AP radiographs (``radiographs/cadma_train``): the held-out split, loading, and implants rendered
onto them.

Split: `inference.splits` (a scheme names it; the cache builder draws only on "train" films of the scheme its
models train with, and records it).

Implant overlay (`render_real_sample`): a pseudo-3D pose is built for every vertebra box (centre on the
isocentre plane, superior axis along the chain of box centres, anterior toward the source, width / height
from the box, pixel size estimated from the box pitch, ~30 mm per level), the same planner as for CT
places screws / rods / cages / plates on it, their attenuation is projected exactly (2x supersampled)
and added in the log domain: ``x' = x + (1 - x)(1 - exp(-a L))`` (``a`` in 0.5..1.2: the processed image is
roughly proportional to log attenuation and saturates toward white; halos (L < 0) darken ``x exp(a L)``).

Labels of such a sample: ``implants`` is exact (0 = no added implant; the original may, rarely, show
hardware of its own).  ``body`` / ``vertebra`` are IGNORE (-1) except UNNAMED (-2) in the central 60 %
ellipse of each box and 0 (background) for pixels within the boxes' rows but farther than 1.5 box widths
sideways from the chain; vertebrae carry ``level=None``, ``grade=None``; meta["boxes"] has the boxes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from inference.results import FractureShape
from inference.splits import TRAINING_SCHEME, split_of
from inference.synth.drr import Projection
from inference.synth.implants import Frame, plan_implants, project_primitives
from inference.synth.sample import IGNORE, UNNAMED, SynthSample, VertebraSpec

REAL_FOLDER = Path("radiographs") / "cadma_train"
LEVEL_PITCH_MM = 30.0


def list_real_images(data_dir: str | Path, split: str | None = None, *, scheme: str | None = None) -> list[Path]:
    """Images of the real folder (sorted), optionally only one `split` of `scheme` (`inference.splits`)."""
    if split is not None and scheme is None:
        raise ValueError("a split needs its scheme (inference.splits.SCHEMES)")
    folder = Path(data_dir) / REAL_FOLDER / "images"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [p for p in files if split is None or split_of(p.name, scheme or TRAINING_SCHEME) == split]


def load_real(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [0, 1] (rows, cols), boxes (N, 4) x0, y0, x1, y1 in pixels, cranial first)."""
    from PIL import Image

    path = Path(path)
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    label = path.parent.parent / "labels" / (path.stem + ".txt")
    rows, cols = image.shape
    boxes = []
    if label.exists():
        for line in label.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 5:
                _, xc, yc, w, h = (float(v) for v in parts)
                boxes.append([(xc - w / 2) * cols, (yc - h / 2) * rows, (xc + w / 2) * cols, (yc + h / 2) * rows])
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return image, b[np.argsort(0.5 * (b[:, 1] + b[:, 3]))] if len(b) else b


def frames_from_boxes(boxes: np.ndarray, shape: tuple[int, int], pixel_mm: float) -> list[Frame]:
    """Pseudo-3D vertebra poses (beam coordinates = world) from boxes on an AP image."""
    rows, cols = shape
    centres = np.stack([0.5 * (boxes[:, 0] + boxes[:, 2]), 0.5 * (boxes[:, 1] + boxes[:, 3])], 1)
    world = np.stack([(centres[:, 0] - cols / 2) * pixel_mm, (centres[:, 1] - rows / 2) * pixel_mm, np.zeros(len(boxes))], 1)
    ant = np.array([0.0, 0.0, -1.0])  # AP: the patient faces the source
    frames = []
    for k in range(len(boxes)):
        up = world[max(0, k - 1)] - world[min(len(boxes) - 1, k + 1)]
        sup = up / np.linalg.norm(up) if np.linalg.norm(up) > 1e-6 else np.array([0.0, -1.0, 0.0])
        lat = np.cross(sup, ant)
        width = float(boxes[k, 2] - boxes[k, 0]) * pixel_mm * 0.85
        height = float(boxes[k, 3] - boxes[k, 1]) * pixel_mm * 0.9
        depth = 0.75 * width
        frames.append(Frame(f"box{k}", world[k], np.stack([lat, ant, sup]), width, depth, height, -0.5 * depth, None))
    return frames


def estimate_pixel_mm(boxes: np.ndarray) -> float:
    """Pixel size from the median distance between consecutive box centres (~30 mm per level)."""
    if len(boxes) < 2:
        return 1.4
    c = np.stack([0.5 * (boxes[:, 0] + boxes[:, 2]), 0.5 * (boxes[:, 1] + boxes[:, 3])], 1)
    pitch = float(np.median(np.linalg.norm(np.diff(c, axis=0), axis=1)))
    return LEVEL_PITCH_MM / max(pitch, 1.0)


def weak_labels(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """IGNORE everywhere, UNNAMED in each box's central ellipse, 0 far sideways from the chain."""
    rows, cols = shape
    out = np.full(shape, IGNORE, np.int16)
    if not len(boxes):
        return out
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
    w = boxes[:, 2] - boxes[:, 0]
    top, bottom = int(max(0, boxes[:, 1].min())), int(min(rows, boxes[:, 3].max()))
    # Background: rows covered by the chain, sideways beyond 1.5 box widths from the chain's centre line.
    row_c = np.interp(np.arange(rows), cy, cx)
    row_w = np.interp(np.arange(rows), cy, w)
    far = np.abs(xx - row_c[:, None]) > 1.5 * row_w[:, None]
    band = (yy >= top) & (yy < bottom)
    out[far & band] = 0
    for k in range(len(boxes)):
        a, b = 0.3 * w[k], 0.3 * (boxes[k, 3] - boxes[k, 1])
        inside = ((xx - cx[k]) / max(a, 0.5)) ** 2 + ((yy - cy[k]) / max(b, 0.5)) ** 2 <= 1.0
        out[inside] = UNNAMED
    return out


@lru_cache(maxsize=4)
def _split_files(data_dir: str, split: str, scheme: str) -> tuple[Path, ...]:
    return tuple(p for p in list_real_images(data_dir, split, scheme=scheme) if len(load_real(p)[1]) >= 3)


def render_real_sample(seed: int, config, data_dir: str | Path, *, split: str = "train", scheme: str = TRAINING_SCHEME,
                       image: str | Path | None = None) -> SynthSample:
    """A real radiograph of `split` under `scheme` (picked by seed, or `image`) with implants rendered onto it."""
    rng = np.random.default_rng([int(seed), 0x4EA1])
    if image is None:
        files = _split_files(str(data_dir), split, scheme)
        if not files:
            raise FileNotFoundError(f"no real radiographs with >= 3 boxes in split {split!r} ({scheme}) under {data_dir}")
        path = files[int(rng.integers(0, len(files)))]
    else:
        path = Path(image)
        if split_of(path.name, scheme) != split:
            raise ValueError(f"{path.name} belongs to split {split_of(path.name, scheme)!r} ({scheme}), not {split!r}")
    img, boxes = load_real(path)
    rows, cols = img.shape
    pixel_mm = estimate_pixel_mm(boxes)
    frames = frames_from_boxes(boxes, (rows, cols), pixel_mm)
    kvp = float(rng.uniform(70.0, 90.0))
    force = tuple(config.forced("implants") or ()) if config is not None else ()
    plan = plan_implants(frames, rng, kvp, force=force, hook_prob=config.p_hooks if config is not None else 0.0,
                         rod_fracture_prob=config.p_rod_fracture if config is not None else 0.1)
    if not force and rng.random() < 0.15:
        plan.specs, plan.primitives = [], []  # real negatives: the implant map is known to be empty
    ss = 2
    axes = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    proj = Projection("AP", 1800.0, 1650.0, rows * ss, cols * ss, pixel_mm / ss, (0.0, 0.0, 0.0), axes)
    from inference.synth import augment

    if plan.specs:
        line_ss, inst_ss = project_primitives(plan.primitives, proj, len(plan.specs))
        line = augment.resize(line_ss, (rows, cols))
        inst = augment.resize(inst_ss, (rows, cols), order=0)
    else:
        line = np.zeros((rows, cols), np.float32)
        inst = np.zeros((rows, cols), np.int16)
    alpha = float(rng.uniform(0.5, 1.2))
    la = np.clip(alpha * line, -30.0, 30.0)
    out = np.where(la >= 0, img + (1 - img) * (1 - np.exp(-la)), img * np.exp(la))
    out = np.clip(out + rng.normal(0.0, rng.uniform(0.0, 0.01), size=out.shape), 0.0, 1.0).astype(np.float32)
    # Specs: only instances that are visible; levels unknown on real images (box indices in details).
    present = set(np.unique(inst)) - {0}
    specs, remap = [], np.zeros(len(plan.specs) + 1, np.int16)
    frame_keys = {f.key: k for k, f in enumerate(frames)}
    for idx, spec in enumerate(plan.specs, start=1):
        if idx not in present:
            continue
        details = dict(spec.details)
        details["visible_fraction"] = 1.0
        specs.append(type(spec)(spec.kind, (), spec.side, spec.complications, details))
        remap[idx] = len(specs)
    inst = remap[inst]
    weak = weak_labels((rows, cols), boxes)
    centres = np.stack([0.5 * (boxes[:, 0] + boxes[:, 2]), 0.5 * (boxes[:, 1] + boxes[:, 3])], 1)
    vertebrae = [
        VertebraSpec(None, (round(float(x), 2), round(float(y), 2)), None, None, None, FractureShape.NONE, 0.0, 1.0)
        for x, y in centres
    ]
    meta = {
        "seed": int(seed),
        "source": "real:cadma_train",
        "real_image": f"{REAL_FOLDER.as_posix()}/images/{path.name}",
        "split": split,
        "split_scheme": scheme,
        "field": "real",
        "boxes": [[round(float(v), 2) for v in b] for b in boxes],
        "pixel_spacing_estimated": True,
        "overlay": {"alpha": round(alpha, 3), "kvp": round(kvp, 1), "n_frames": len(frame_keys)},
        "patient_orientation": ["L", "F"],
        "implants": [dict(s.details) for s in specs],
        "labels": "body/vertebra: -1 ignore, -2 vertebra of unknown level (box core), 0 background",
    }
    return SynthSample(
        image=out,
        pixel_spacing_mm=(round(pixel_mm, 5), round(pixel_mm, 5)),
        view="AP",
        body=weak.copy(),
        vertebra=weak,
        implants=inst.astype(np.int16),
        implant_specs=specs,
        vertebrae=vertebrae,
        meta=meta,
    )
