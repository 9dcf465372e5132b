"""The real test radiographs made to look like what other hospitals send (robustness rows of the card).

The real test split is one kind of image: whole-spine AP exports fitted to 416 px, CLAHE-processed, JPEG,
without a header. A hospital sends 16-bit DICOM at 2000-3000 px with ImagerPixelSpacing, often
MONOCHROME1, lumbar fields more often than whole spines, postoperative films with implants, low-contrast
and tilted films. Each variant here changes one of those things on every test image, keeps the vertebra
boxes in step, and scores detection exactly as the plain real rows do (centroid in box, box IoU >= 0.3),
so a drop against the "as exported" row is what that change costs.

Variants that go through DICOM are written with the data engine's DX writer, serialised, read back and
decoded by the node's own decoder (`preprocess.decode`), so the header path (photometric inversion, VOI,
ImagerPixelSpacing -> 1.25 mm network grid) is measured on real anatomy, which the plain rows never use.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from inference.evaluate import metrics as M
from inference.radiograph import preprocess
from inference.radiograph.model import VertebraModel
from inference.synth.real import estimate_pixel_mm
from inference.train import cadma

#: ImagerPixelSpacing is at the detector; a spine sits ~15 % closer to the source, so the header value
#: overstates the patient-plane pixel by about this much when no magnification factor is given.
DETECTOR_MAGNIFICATION = 1.15
#: Rows of an enlarged lumbar field (a 35 x 43 cm cassette at ~0.2 mm is ~2000 px).
LUMBAR_ROWS = 1800
#: Enlargement of a whole-spine export into a detector-sized matrix (416 -> ~2500 px).
LARGE_FACTOR = 6.0


@dataclass(frozen=True)
class VariantImage:
    """One changed radiograph: what the model gets, the boxes to score against and boxes cut by the edge."""

    radiograph: preprocess.Radiograph
    boxes: np.ndarray  # (n, 4) x0, y0, x1, y1 in the radiograph's pixels: scored
    cut: np.ndarray  # boxes less than half inside the field: detections there are neither right nor wrong


Transform = Callable[[cadma.RealRadiograph, np.ndarray, np.random.Generator], VariantImage]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    transform: Transform


def _plain(pixels: np.ndarray, spacing: tuple[float, float] | None = None) -> preprocess.Radiograph:
    from inference.evaluate.vertebrae import radiograph_from_array

    return radiograph_from_array(pixels, spacing, "AP", None)


def as_dicom(pixels: np.ndarray, key: str, spacing_mm: float | None, photometric: str = "MONOCHROME1") -> preprocess.Radiograph:
    """`pixels` (bone bright, 0..1) as a 16-bit DX file, serialised, read back and decoded by the node."""
    import pydicom

    from inference.synth.dicom import radiograph_dataset

    values = np.clip(pixels, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    stored = np.round(values * 65535).astype(np.uint16)
    ds = radiograph_dataset(
        stored, seed=f"real-variant-{key}", view_position="AP", body_part="SPINE",
        pixel_spacing_mm=spacing_mm or 0.2, photometric=photometric, bits_stored=16,
    )
    if spacing_mm is None:
        del ds.ImagerPixelSpacing
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    radiograph = preprocess.decode(pydicom.dcmread(buffer))
    crop = radiograph.orientation.crop
    if crop is not None and crop[:2] != (0, 0):
        # The variant rows score canonical positions against the film's boxes: a frame cropped at the top or
        # left would shift them all (one cut at the bottom or right, as on test film 39 enlarged six times,
        # moves nothing). None of the test films has one (2026-12-07); stop rather than score a shifted grid.
        raise ValueError(f"{key}: the decoder cropped a uniform frame {radiograph.orientation.crop}; the boxes "
                         "would no longer match")
    return radiograph


def _fraction_inside(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    xs = np.clip(boxes[:, [0, 2]], 0, shape[1])
    ys = np.clip(boxes[:, [1, 3]], 0, shape[0])
    return (xs[:, 1] - xs[:, 0]) * (ys[:, 1] - ys[:, 0]) / area


def lumbar_field(pixels: np.ndarray, boxes: np.ndarray, levels: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A lumbar AP field cut from a whole-spine image: the lowest `levels` boxes with half a body above and
    three bodies below (sacrum, iliac crests), about as wide as tall, enlarged to `LUMBAR_ROWS` rows.
    Returns (pixels, boxes mostly inside, boxes cut by the edge), boxes in the new pixels."""
    low = boxes[-levels:]
    height = float(np.median(low[:, 3] - low[:, 1]))
    top = max(0.0, low[0, 1] - 0.8 * height)
    bottom = min(float(pixels.shape[0]), low[-1, 3] + 3.0 * height)
    centre = float((low[:, 0] + low[:, 2]).mean() / 2)
    half = 0.42 * (bottom - top)
    left, right = max(0.0, centre - half), min(float(pixels.shape[1]), centre + half)
    r0, r1, c0, c1 = int(top), int(np.ceil(bottom)), int(left), int(np.ceil(right))
    crop = pixels[r0:r1, c0:c1]
    factor = LUMBAR_ROWS / crop.shape[0]
    big = np.clip(ndimage.zoom(crop, factor, order=1), 0.0, 1.0)
    moved = (boxes - np.array([c0, r0, c0, r0], float)) * factor
    inside = _fraction_inside(moved, big.shape)
    return big, moved[inside >= 0.5], moved[(inside > 0) & (inside < 0.5)]


def rotate(pixels: np.ndarray, boxes: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The image turned by `degrees` (counter-clockwise on screen) about its centre, boxes moved with their
    centres (same size: a centroid-in-box test stays fair for a 10 degree turn)."""
    out = ndimage.rotate(pixels, degrees, reshape=False, order=1, mode="nearest")
    centre = np.array(pixels.shape[::-1], float) / 2 - 0.5
    t = np.deg2rad(-degrees)
    turn = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    moved = (centres - centre) @ turn.T + centre
    half = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) / 2
    return out, np.concatenate([moved - half, moved + half], axis=1)


def _none() -> np.ndarray:
    return np.zeros((0, 4))


def _as_exported(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    return VariantImage(_plain(pixels), item.boxes, _none())


def _dicom_large(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    big = np.clip(ndimage.zoom(pixels, LARGE_FACTOR, order=1), 0.0, 1.0)
    spacing = estimate_pixel_mm(item.boxes) / LARGE_FACTOR * DETECTOR_MAGNIFICATION
    return VariantImage(as_dicom(big, item.key, spacing), item.boxes * LARGE_FACTOR, _none())


def _lumbar(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    big, boxes, cut = lumbar_field(pixels, item.boxes)
    return VariantImage(_plain(big), boxes, cut)


def _lumbar_dicom(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    big, boxes, cut = lumbar_field(pixels, item.boxes)
    spacing = estimate_pixel_mm(boxes) * DETECTOR_MAGNIFICATION
    return VariantImage(as_dicom(big, item.key, spacing), boxes, cut)


def _low_contrast(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    flat = 0.35 + 0.3 * pixels + rng.normal(0.0, 0.02, pixels.shape)
    return VariantImage(_plain(np.clip(flat, 0.0, 1.0)), item.boxes, _none())


def _tilted(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    turned, boxes = rotate(pixels, item.boxes, 10.0 if rng.random() < 0.5 else -10.0)
    return VariantImage(_plain(turned), boxes, _none())


def _implants(item: cadma.RealRadiograph, pixels: np.ndarray, rng: np.random.Generator) -> VariantImage:
    from inference.splits import TRAINING_SCHEME, split_of
    from inference.synth.real import render_real_sample

    # Implants rendered the way the hardware model's real overlays are (screws, rods, cages, plates);
    # ~15 % of draws add none, as in that data engine.
    data_dir = Path(item.path).parents[3]  # <data>/radiographs/cadma_train/images/<file>
    sample = render_real_sample(int(rng.integers(0, 2**31)), None, data_dir, split=split_of(item.path.name),
                                image=item.path, scheme=TRAINING_SCHEME)
    return VariantImage(_plain(sample.image), item.boxes, _none())


VARIANTS: tuple[Variant, ...] = (
    Variant("as_exported", "as exported (416 px JPEG, no header): the plain real rows", _as_exported),
    Variant("dicom_large", f"16-bit DX, MONOCHROME1, enlarged x{LARGE_FACTOR:g} (~2500 px), ImagerPixelSpacing from the box pitch x {DETECTOR_MAGNIFICATION}", _dicom_large),
    Variant("lumbar", f"lumbar field (lowest six boxes, sacrum, iliac crests) enlarged to {LUMBAR_ROWS} rows, no header", _lumbar),
    Variant("lumbar_dicom", "the same lumbar field as 16-bit DX MONOCHROME1 with ImagerPixelSpacing", _lumbar_dicom),
    Variant("low_contrast", "contrast cut to 30 % plus noise (sigma 2 % of the range)", _low_contrast),
    Variant("tilted", "turned 10 degrees (left or right)", _tilted),
    Variant("implants", "posterior and anterior implants rendered onto the film (the hardware model's real-overlay engine)", _implants),
)


def _drop_cut(cents: np.ndarray, boxes_px: np.ndarray, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detections whose centroid lies in a box the field's edge cuts: left out of the score."""
    if not len(cut) or not len(cents):
        return cents, boxes_px
    x, y = cents[:, 0][:, None], cents[:, 1][:, None]
    hit = ((x >= cut[None, :, 0]) & (x <= cut[None, :, 2]) & (y >= cut[None, :, 1]) & (y <= cut[None, :, 3])).any(axis=1)
    return cents[~hit], boxes_px[~hit]


def evaluate_variants(
    model: VertebraModel, items: Sequence[cadma.RealRadiograph], variants: Sequence[Variant] = VARIANTS, seed: int = 0
) -> dict[str, Any]:
    """Detection on every variant of every image: {variant name: {description, centroid_in_box, box_iou_0.3,
    re-zoomed images, images without a spine, seconds per image}}."""
    from inference.evaluate.vertebrae import instance_boxes

    out: dict[str, Any] = {}
    for variant in variants:
        rng = np.random.default_rng([seed, sum(variant.name.encode())])
        centroid, iou = M.DetectionCounts(), M.DetectionCounts()
        times, rezoomed, empty = [], 0, 0
        for item in items:
            changed = variant.transform(item, item.load(), rng)
            t0 = time.perf_counter()
            spine = model.analyse(changed.radiograph)
            times.append(time.perf_counter() - t0)
            rezoomed += spine.zoom != 1.0
            cents, boxes, _ = instance_boxes(spine)
            empty += len(cents) == 0
            cents, boxes = _drop_cut(cents, boxes, changed.cut)
            centroid.add(*M.match_centroids_in_boxes(cents, changed.boxes)[:3])
            iou.add(*M.match_boxes(boxes, changed.boxes, 0.3)[:3])
        out[variant.name] = {
            "description": variant.description,
            "images": len(items),
            "centroid_in_box": centroid.as_dict(),
            "box_iou_0.3": iou.as_dict(),
            "images_re_zoomed": int(rezoomed),
            "images_without_spine": int(empty),
            "seconds_per_image_mean": round(float(np.mean(times)), 3) if times else None,
        }
    return out
