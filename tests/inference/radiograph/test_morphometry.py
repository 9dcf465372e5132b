"""Vertebral heights on exact geometric shapes, and Genant grading."""

from __future__ import annotations

import numpy as np
import pytest

from inference.radiograph import morphometry
from inference.results import FractureShape, GenantGrade


def _rectangle(rows: int, cols: int, pad: int = 5) -> np.ndarray:
    mask = np.zeros((rows + 2 * pad, cols + 2 * pad), dtype=bool)
    mask[pad : pad + rows, pad : pad + cols] = True
    return mask


def test_rectangle_heights_are_exact_in_mm() -> None:
    # 60 rows x 100 columns, rows 0.2 mm, columns 0.25 mm: a 12 mm tall, 25 mm deep body.
    mask = _rectangle(60, 100)
    h = morphometry.measure_heights(mask, (40, 70), (0.2, 0.25), spine_axis=(0.0, 1.0), anterior_sign=1)
    assert h is not None and h.calibrated
    for m in (h.anterior, h.middle, h.posterior):
        assert m is not None
        assert m.value_mm == pytest.approx(12.0, abs=1e-6)
    # Anterior lies toward larger x (anterior_sign=+1), at 12 % of the depth from the anterior wall.
    left, right = 70 + 5, 70 + 5 + 100
    assert h.anterior.start[0] == pytest.approx(right - 12.0, abs=1e-6)
    assert h.posterior.start[0] == pytest.approx(left + 12.0, abs=1e-6)
    assert h.middle.start[0] == pytest.approx((left + right) / 2, abs=1e-6)
    # End points lie on the endplates (rows 45 and 105 in the source grid).
    assert h.middle.start[1] == pytest.approx(40 + 5, abs=1e-6)
    assert h.middle.end[1] == pytest.approx(40 + 5 + 60, abs=1e-6)
    assert h.as_result() is not None


def test_anterior_sign_swaps_anterior_and_posterior() -> None:
    mask = np.zeros((80, 120), dtype=bool)
    # Wedge: height falls linearly from 50 px on the left to 25 px on the right (anterior = right).
    for c in range(10, 110):
        height = 50 - 25 * (c - 10) / 99
        mask[int(40 - height / 2) : int(40 + height / 2), c] = True
    right = morphometry.measure_heights(mask, (0, 0), (0.1, 0.1), (0.0, 1.0), anterior_sign=1)
    left = morphometry.measure_heights(mask, (0, 0), (0.1, 0.1), (0.0, 1.0), anterior_sign=-1)
    assert right.anterior.value_mm < right.posterior.value_mm
    assert left.anterior.value_mm > left.posterior.value_mm


def test_rotated_rectangle_follows_the_endplates() -> None:
    # A 40 x 80 px body tilted by 20 degrees, drawn supersampled: heights ~ 40 px, not the tilted extent.
    angle = np.radians(20)
    size = 160
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u = (xx - 80) * np.cos(angle) + (yy - 80) * np.sin(angle)
    v = -(xx - 80) * np.sin(angle) + (yy - 80) * np.cos(angle)
    mask = (np.abs(u) <= 40) & (np.abs(v) <= 20)
    axis = (-np.sin(angle), np.cos(angle))
    h = morphometry.measure_heights(mask, (0, 0), (1.0, 1.0), axis, anterior_sign=1)
    for m in (h.anterior, h.middle, h.posterior):
        assert m.value_mm == pytest.approx(40.0, abs=1.0)


def test_no_spacing_gives_pixels_and_no_reportable_heights() -> None:
    h = morphometry.measure_heights(_rectangle(30, 50), (0, 0), None, (0.0, 1.0), 1)
    assert not h.calibrated and h.as_result() is None
    assert h.middle.value_mm == pytest.approx(30.0, abs=1e-6)


def test_empty_membership() -> None:
    assert morphometry.measure_heights(np.zeros((10, 10), bool), (0, 0), (1.0, 1.0), (0.0, 1.0), 1) is None


def test_genant_grades_and_shapes() -> None:
    normal = (25.0, 24.0, 25.0)
    grades = morphometry.grade_fractures(
        [
            normal,
            (14.0, 22.0, 25.0),  # anterior 44 % lower: severe wedge
            normal,
            (24.0, 18.0, 25.0),  # middle 28 % lower: moderate biconcave
            normal,
            (19.5, 19.5, 19.5),  # all 22 % lower than the neighbours: mild crush
            normal,
            None,
        ]
    )
    assert grades[0].grade == GenantGrade.NORMAL and grades[0].shape == FractureShape.NONE
    assert (grades[1].grade, grades[1].shape) == (GenantGrade.SEVERE, FractureShape.WEDGE)
    assert grades[1].height_loss_pct == pytest.approx(44.0)
    assert (grades[3].grade, grades[3].shape) == (GenantGrade.MODERATE, FractureShape.BICONCAVE)
    assert (grades[5].grade, grades[5].shape) == (GenantGrade.MILD, FractureShape.CRUSH)
    assert grades[7] is None


def test_spine_axes() -> None:
    axes = morphometry.spine_axes([(10.0, 0.0), (10.0, 10.0), (20.0, 20.0)])
    assert axes[0] == pytest.approx((0.0, 1.0))
    assert axes[1] == pytest.approx((10 / np.hypot(10, 20), 20 / np.hypot(10, 20)))
    assert morphometry.spine_axes([(1.0, 1.0)]) == [(0.0, 1.0)]


def test_nearly_square_tilted_body_follows_its_sides_not_its_principal_axes() -> None:
    # Lumbar bodies on a lateral are about as tall as deep: a 38 x 36 px body tilted by 21 degrees, with the
    # spine axis from neighbouring centroids 12 degrees off.  Chords must run along the body's sides.
    angle = np.radians(21)
    yy, xx = np.mgrid[0:120, 0:120] + 0.5
    u = (xx - 60) * np.cos(angle) + (yy - 60) * np.sin(angle)
    v = -(xx - 60) * np.sin(angle) + (yy - 60) * np.cos(angle)
    mask = (np.abs(u) <= 18) & (np.abs(v) <= 19)
    off = np.radians(33)
    h = morphometry.measure_heights(mask, (0, 0), (1.0, 1.0), (-np.sin(off), np.cos(off)), anterior_sign=1)
    for m in (h.anterior, h.middle, h.posterior):
        assert m.value_mm == pytest.approx(38.0, abs=1.0)
