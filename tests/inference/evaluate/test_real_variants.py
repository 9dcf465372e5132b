"""Robustness variants of the real test images: the boxes follow every change, the DICOM path decodes back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from inference.evaluate import real_variants as RV
from inference.train import cadma


def _spine_image(rows: int = 416, cols: int = 200, count: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Dark film with `count` bright 'vertebrae' (rectangles) down the middle; their boxes, top first."""
    pixels = np.full((rows, cols), 0.1, np.float32)
    boxes = []
    pitch = rows * 0.8 / count
    for k in range(count):
        y0 = 20 + k * pitch
        box = (cols / 2 - 18, y0, cols / 2 + 18, y0 + 0.7 * pitch)
        pixels[int(box[1]) + 1 : int(box[3]), int(box[0]) + 1 : int(box[2])] = 0.9
        boxes.append(box)
    return pixels, np.array(boxes)


class Oracle:
    """A 'model' that reports every bright blob: perfect on the plain image, so any score below 1 on a
    variant means the variant lost track of its boxes."""

    def analyse(self, radiograph):
        # Decoded DICOM comes back in stored units, JPEG-like images in 0..1: threshold halfway.
        pixels = radiograph.pixels
        labels, n = ndimage.label(pixels > (pixels.min() + pixels.max()) / 2)
        vertebrae = []
        for k in range(1, n + 1):
            rows, cols = np.nonzero(labels == k)
            if len(rows) < 20:
                continue
            mask = labels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] == k
            vertebrae.append(SimpleNamespace(mask=mask, offset=(rows.min(), cols.min()), centroid=(cols.mean(), rows.mean()), level=None))
        return SimpleNamespace(vertebrae=vertebrae, zoom=1.0)


@pytest.fixture
def item(tmp_path: Path) -> cadma.RealRadiograph:
    from PIL import Image

    pixels, boxes = _spine_image()
    path = tmp_path / "radiographs" / "cadma_train" / "images" / "Image_001_jpg.rf.x.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path, quality=95)
    rows, cols = pixels.shape
    labels = path.parent.parent / "labels"
    labels.mkdir()
    (labels / (path.stem + ".txt")).write_text("".join(
        f"0 {(x0 + x1) / 2 / cols} {(y0 + y1) / 2 / rows} {(x1 - x0) / cols} {(y1 - y0) / rows}\n" for x0, y0, x1, y1 in boxes
    ))
    return cadma.RealRadiograph("Image_001", path, boxes)


@pytest.mark.parametrize("name", ["as_exported", "dicom_large", "lumbar", "lumbar_dicom", "low_contrast", "tilted"])
def test_boxes_follow_each_variant(item, name):
    variant = next(v for v in RV.VARIANTS if v.name == name)
    scores = RV.evaluate_variants(Oracle(), [item], [variant])[name]
    assert scores["centroid_in_box"]["precision"] == pytest.approx(1.0)
    assert scores["centroid_in_box"]["recall"] == pytest.approx(1.0)
    assert scores["box_iou_0.3"]["f1"] > 0.9


def test_lumbar_field_keeps_the_low_levels_and_sets_aside_cut_ones():
    pixels, boxes = _spine_image()
    big, kept, cut = RV.lumbar_field(pixels, boxes)
    assert big.shape[0] == RV.LUMBAR_ROWS
    assert len(kept) == 6 and len(cut) <= 1
    # The kept boxes are the six lowest, still over their bright bodies.
    factor = RV.LUMBAR_ROWS / (boxes[-1, 3] + 3 * np.median(boxes[-6:, 3] - boxes[-6:, 1]) - (boxes[-6, 1] - 0.8 * np.median(boxes[-6:, 3] - boxes[-6:, 1])))
    assert np.allclose(kept[:, 3] - kept[:, 1], (boxes[-6:, 3] - boxes[-6:, 1]) * factor, rtol=0.02)
    for x0, y0, x1, y1 in kept:
        assert big[int((y0 + y1) / 2), int((x0 + x1) / 2)] > 0.8


def test_rotated_boxes_stay_on_their_bodies():
    pixels, boxes = _spine_image()
    for degrees in (10.0, -10.0):
        turned, moved = RV.rotate(pixels, boxes, degrees)
        centres = np.stack([(moved[:, 0] + moved[:, 2]) / 2, (moved[:, 1] + moved[:, 3]) / 2], axis=1)
        assert all(turned[int(round(y)), int(round(x))] > 0.8 for x, y in centres)


def test_dicom_round_trip_through_the_node_decoder():
    pixels, _ = _spine_image()
    # A film has grain: a background of one exact value would be read as a shutter frame and cropped.
    pixels = pixels + np.random.default_rng(0).normal(0.0, 0.01, pixels.shape).astype(np.float32)
    radiograph = RV.as_dicom(pixels, "key", spacing_mm=0.25, photometric="MONOCHROME1")
    assert radiograph.pixel_spacing_mm == pytest.approx((0.25, 0.25))
    values = radiograph.pixels
    # Bone stays bright after MONOCHROME1 inversion and any VOI the decoder applies.
    assert np.corrcoef(values.ravel(), pixels.ravel())[0, 1] > 0.99
    assert RV.as_dicom(pixels, "key", spacing_mm=None).pixel_spacing_mm is None
    # Without grain the even background is a frame: the evaluation stops instead of scoring a shifted grid.
    with pytest.raises(ValueError, match="cropped a uniform frame"):
        RV.as_dicom(_spine_image()[0], "key", spacing_mm=0.25)


def test_implant_variant_draws_on_the_same_grid(item):
    variant = next(v for v in RV.VARIANTS if v.name == "implants")
    pixels = item.load()
    changed = [variant.transform(item, pixels, np.random.default_rng(seed)) for seed in range(4)]
    assert all(c.radiograph.pixels.shape == pixels.shape and np.array_equal(c.boxes, item.boxes) for c in changed)
    # Most draws add implants (about 15 % add none, as in the hardware data engine).
    assert sum(np.abs(c.radiograph.pixels - pixels).max() > 0.2 for c in changed) >= 2


def test_card_lists_every_variant():
    from inference.evaluate.card import _variants_section

    row = {"description": "d", "images": 3, "centroid_in_box": {"precision": 0.9, "recall": 0.8, "f1": 0.85},
           "box_iou_0.3": {"f1": 0.8}, "images_re_zoomed": 1, "images_without_spine": 0, "seconds_per_image_mean": 0.2}
    lines = _variants_section({"a": row, "b": {**row, "description": "e"}})
    assert "(3 images)" in lines[0]
    assert sum(line.startswith("| d |") or line.startswith("| e |") for line in lines) == 2
    assert _variants_section(None) == []
