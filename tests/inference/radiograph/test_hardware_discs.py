"""Disc spaces between vertebral bodies, their cage labels, patches and reported regions (pure geometry)."""

from __future__ import annotations

import numpy as np
import pytest

from inference.radiograph.hardware_discs import (
    DISC_PATCH,
    Body,
    disc_labels,
    disc_patches,
    find_discs,
    footprint,
)


def column_of_bodies(n: int, step_px: int = 30, height_px: int = 22, width_px: int = 40, x0: int = 60, tilt: float = 0.0,
                     skip: tuple[int, ...] = ()) -> tuple[list[Body], np.ndarray]:
    """`n` rectangular bodies, top to bottom, `step_px` apart (1 mm per pixel), optionally drifting sideways
    by `tilt` px per step; bodies in `skip` left out.  Returns the bodies in a shuffled order and the image."""
    shape = (n * step_px + 40, 200)
    image = np.zeros(shape, np.float32)
    bodies = []
    for k in range(n):
        if k in skip:
            continue
        mask = np.zeros(shape, bool)
        top = 20 + k * step_px
        left = int(x0 + k * tilt)
        mask[top : top + height_px, left : left + width_px] = True
        image[mask] = 0.5
        bodies.append(Body.from_mask(mask))
    order = np.random.default_rng(0).permutation(len(bodies))
    return [bodies[i] for i in order], image


def test_discs_lie_between_consecutive_bodies_in_head_to_foot_order() -> None:
    bodies, _ = column_of_bodies(5)
    discs = find_discs(bodies, src_mm=1.0)
    assert len(discs) == 4
    rows = [d.frame.centre[1] for d in discs]
    assert rows == sorted(rows)
    for d in discs:
        upper, lower = bodies[d.upper], bodies[d.lower]
        assert upper.centroid[1] < d.frame.centre[1] < lower.centroid[1]
        # Bodies 22 px tall every 30 px: an 8 px disc space, centred on the gap.
        assert d.height_px == pytest.approx(8, abs=1.5)
        assert d.frame.direction == pytest.approx((0.0, 1.0), abs=1e-6)
        assert d.width_px == pytest.approx(40, abs=4)
    assert rows[0] == pytest.approx(20 + 22 + 4, abs=1.0)


def test_a_missing_body_leaves_no_disc_across_the_gap() -> None:
    bodies, _ = column_of_bodies(6, skip=(3,))
    discs = find_discs(bodies, src_mm=1.0)
    assert len(discs) == 3  # 0-1, 1-2, 4-5; not 2-4
    assert all(abs(bodies[d.lower].centroid[1] - bodies[d.upper].centroid[1]) < 35 for d in discs)


def test_scale_limits_and_too_few_bodies() -> None:
    bodies, _ = column_of_bodies(4)
    assert find_discs(bodies, src_mm=0.2) == []  # 6 mm apart: not vertebrae
    assert find_discs(bodies, src_mm=3.0) == []  # 90 mm apart
    assert find_discs(bodies[:1], src_mm=1.0) == []


def test_a_tilted_column_orients_the_disc_along_the_spine() -> None:
    bodies, _ = column_of_bodies(4, tilt=10.0)
    d = find_discs(bodies, src_mm=1.0)[0]
    dx, dy = d.frame.direction
    assert dx > 0.2 and dy > 0.9 and dx * dx + dy * dy == pytest.approx(1.0)


def test_cage_labels_follow_the_cage_centre() -> None:
    bodies, _ = column_of_bodies(5)
    discs = find_discs(bodies, src_mm=1.0)
    cage = discs[2].frame.centre
    labels = disc_labels(discs, [(cage[0] + 5, cage[1] + 2)], src_mm=1.0)
    assert labels.tolist() == [False, False, True, False]
    # Far to the side (a screw head, not the disc space) or mid-body: no disc.
    assert not disc_labels(discs, [(cage[0] + 40, cage[1])], src_mm=1.0).any()
    assert not disc_labels(discs, [(cage[0], cage[1] + 15)], src_mm=1.0).any()


def test_patches_are_cut_along_the_spine_at_half_a_millimetre() -> None:
    bodies, image = column_of_bodies(5)
    discs = find_discs(bodies, src_mm=1.0)
    patches = disc_patches(image, discs, src_mm=1.0, window=(0.0, 0.5))
    assert patches.shape == (4, 1, *DISC_PATCH) and patches.dtype == np.float32
    # The long axis (columns) runs along the spine: the middle column is the disc gap in the middle, bone
    # 4 mm (8 patch pixels) either side of it.
    mid = DISC_PATCH[1] // 2
    row = patches[0, 0, DISC_PATCH[0] // 2]
    assert row[mid] == 0.0 and row[mid - 12] == 1.0 and row[mid + 12] == 1.0
    assert disc_patches(image, [], src_mm=1.0).shape == (0, 1, *DISC_PATCH)


def test_footprint_fills_the_disc_space_half_as_wide_as_the_bodies() -> None:
    bodies, image = column_of_bodies(3)
    disc = find_discs(bodies, src_mm=1.0)[0]
    offset, mask = footprint(disc, 1.0, image.shape)
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    assert len(rows) == pytest.approx(8, abs=2)
    assert len(cols) == pytest.approx(20, abs=2)
    centre_row = offset[0] + rows.mean() + 0.5
    assert centre_row == pytest.approx(disc.frame.centre[1], abs=1.0)
    # A disc at the image edge is clipped, not lost; one entirely outside gives nothing.
    assert footprint(disc, 1.0, (int(disc.frame.centre[1]) + 1, 200)) is not None
    assert footprint(disc, 1.0, (5, 5)) is None
