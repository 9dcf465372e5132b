"""Disc spaces between vertebral bodies, their cage labels, patches and reported regions (pure geometry)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.radiograph.hardware_discs import (
    DISC_PATCH,
    Body,
    disc_labels,
    disc_patches,
    find_discs,
    footprint,
    pick_cages,
    predict,
    scan_discs,
    scan_probabilities,
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


def test_the_scan_runs_along_the_spine_past_both_end_bodies() -> None:
    bodies, _ = column_of_bodies(5, tilt=3.0)
    scan = scan_discs(bodies, src_mm=1.0)
    step = scan[0].step_px
    assert step == pytest.approx(np.hypot(30, 3), abs=0.5)
    alongs = [d.along_px for d in scan]
    assert np.diff(alongs) == pytest.approx(0.2 * step)  # a candidate every fifth of a step
    rows = [d.frame.centre[1] for d in scan]
    tops = sorted(b.centroid[1] for b in bodies)
    # From 0.75 steps above the top body's centre to 0.75 below the bottom one's.
    assert rows[0] == pytest.approx(tops[0] - 0.75 * 30, abs=1.0)
    assert rows[-1] == pytest.approx(tops[-1] + 0.75 * 30, abs=6.0)
    for d in scan:
        assert d.frame.direction[1] > 0.99  # along the column, head to foot
        assert d.width_px == pytest.approx(40, abs=4)
        assert d.height_px == pytest.approx(8, abs=1.5)  # the median disc height of the column
    # A missing body, or two merged into one, still has candidates where the discs are.
    gap, _ = column_of_bodies(6, skip=(3,))
    rows = [d.frame.centre[1] for d in scan_discs(gap, src_mm=1.0)]
    for disc_row in (20 + 22 + 4 + 30 * k for k in (2, 3)):  # either side of the missing body
        assert min(abs(r - disc_row) for r in rows) <= 3.5
    assert scan_discs(bodies[:1], src_mm=1.0) == []
    assert scan_discs(bodies, src_mm=0.2) == []  # 6 mm apart: not vertebrae


def test_pick_cages_keeps_the_strongest_of_neighbouring_candidates() -> None:
    bodies, _ = column_of_bodies(5)
    scan = scan_discs(bodies, src_mm=1.0)
    probs = np.zeros(len(scan))
    probs[[5, 6, 7]] = [0.95, 0.99, 0.97]  # one cage seen from three neighbouring positions
    probs[16] = 0.96  # another two steps further down
    probs[10] = 0.4  # below the threshold
    kept = pick_cages(scan, probs, threshold=0.9, src_mm=0.4)
    assert [(round(d.along_px / scan[0].step_px, 1), p) for d, p in kept] == [(1.2, 0.99), (3.2, 0.96)]
    assert pick_cages(scan, probs, threshold=0.995, src_mm=0.4) == []
    # A higher threshold keeps a subset of a lower one's cages (what tuning relies on).
    low = {round(d.along_px) for d, _ in pick_cages(scan, probs, 0.3, src_mm=0.4)}
    assert {round(d.along_px) for d, _ in kept} <= low
    # Small "vertebrae" (a pelvis cut into pieces) make a short step: candidates within 15 mm are still one cage.
    # At 0.4 mm per pixel the two cages above lie 60 px = 24 mm apart; at 0.2 mm, 12 mm: one.
    assert len(pick_cages(scan, probs, threshold=0.9, src_mm=0.2)) == 1


class BrightCentre(torch.nn.Module):
    """Stands in for the disc classifier (its decisions are the trained network's, tested elsewhere): "a cage"
    when the middle of the patch (`half` patch pixels either way) is brighter than `level` on average. With a
    middle 24 mm wide its answer is as broad as the trained classifier's: a cage a scan step off still scores."""

    def __init__(self, half: int, level: float) -> None:
        super().__init__()
        self.half, self.level = half, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, r = x.shape[-2] // 2, x.shape[-1] // 2, self.half
        centre = x[..., h - r : h + r, w - r : w + r].mean(dim=(-1, -2, -3))
        return (40 * (centre - self.level)).unsqueeze(1)


def test_the_scan_asks_beside_promising_candidates_only_and_finds_what_asking_everywhere_finds() -> None:
    bodies, image = column_of_bodies(8)
    rows = sorted(b.centroid[1] for b in bodies)
    for k in (1, 4):  # bright cages in two disc spaces
        top = int(rows[k] + 11)
        image[top : top + 8, 60:100] = 1.0
    scan = scan_discs(bodies, src_mm=1.0)
    net = BrightCentre(half=24, level=0.55).eval()
    full = predict(net, disc_patches(image, scan, src_mm=1.0))
    probs = scan_probabilities(net, image, scan, src_mm=1.0)
    asked = np.nonzero(probs)[0]
    assert len(asked) < 0.75 * len(scan)  # every other candidate, plus the neighbours of strong ones
    assert probs[asked] == pytest.approx(full[asked], abs=1e-6)
    everywhere = [round(d.frame.centre[1]) for d, _ in pick_cages(scan, full, 0.9, src_mm=1.0)]
    assert [round(d.frame.centre[1]) for d, _ in pick_cages(scan, probs, 0.9, src_mm=1.0)] == everywhere
    assert len(everywhere) == 2
    assert scan_probabilities(net, image, [], src_mm=1.0).shape == (0,)


def test_a_cage_between_two_bodies_found_as_one_is_found_by_the_scan_only() -> None:
    """The vertebra model often merges the two bodies around a cage (the cage fills the disc space): there is
    then no disc space between found bodies to ask about, but the scan along the spine still asks there."""
    import dataclasses

    from inference.radiograph.hardware import disc_cages
    from inference.radiograph.hardware_post import HardwareParams, VertebraGeom

    _, image = column_of_bodies(6)
    rows = [20 + k * 30 for k in range(6)]  # each body's top row (22 px tall, 40 wide from column 60)
    image[rows[2] + 22 : rows[3], 60:100] = 1.0  # a titanium cage filling the disc space between bodies 2 and 3
    geoms = []
    for k, top in enumerate(rows):
        if k == 3:
            continue  # bodies 2 and 3 found as one, with the cage between them
        bottom = rows[3] + 22 if k == 2 else top + 22
        mask = np.ones((bottom - top, 40), bool)
        geoms.append(VertebraGeom(None, (80.0, (top + bottom) / 2), mask, (top, 60)))
    assert len(geoms) == 5
    net = BrightCentre(half=24, level=0.55).eval()
    scan = HardwareParams(cage_scan_threshold=0.9)
    found = disc_cages(net, image, geoms, 1.0, (1.0, 1.0), scan)
    assert len(found) == 1
    # The middle of the filled disc space, to one scan step (a fifth of the 37.5 px median step; this stand-in
    # answers alike on two neighbouring candidates).
    assert found[0].centroid[1] == pytest.approx(rows[3] - 4, abs=7.5)
    assert found[0].centroid[0] == pytest.approx(80.0, abs=2.0)
    between_found_bodies = dataclasses.replace(scan, cage_scan_threshold=None, cage_disc_threshold=0.9)
    assert disc_cages(net, image, geoms, 1.0, (1.0, 1.0), between_found_bodies) == []
    # The disc space as dense as bone (the brightest thing a lead marker in a corner): no cage.
    image[rows[2] + 22 : rows[3], 60:100] = 0.5
    image[:12, 170:200] = 1.0
    assert disc_cages(net, image, geoms, 1.0, (1.0, 1.0), scan) == []


def test_a_cage_with_no_other_implant_needs_the_stronger_evidence() -> None:
    """One false cage was the commonest noise on real films without implants: alone on a film a cage must
    reach `cage_alone_threshold`; beside a screw, rod or plate the scan's threshold is enough."""
    from inference.radiograph.hardware import SourcePiece, drop_doubtful_lone_cages
    from inference.radiograph.hardware_post import Piece
    from inference.results import ImplantKind

    def piece(kind: ImplantKind, score: float) -> SourcePiece:
        mask = np.ones((4, 4), bool)
        return SourcePiece(Piece(kind, mask, (0, 0), score=score), (0, 0), mask, (2.0, 2.0))

    weak, strong = piece(ImplantKind.INTERBODY_CAGE, 0.98), piece(ImplantKind.INTERBODY_CAGE, 0.995)
    assert drop_doubtful_lone_cages([weak, strong], 0.99) == [strong]
    assert drop_doubtful_lone_cages([weak], 0.99) == []
    screw = piece(ImplantKind.PEDICLE_SCREW, 0.6)
    assert drop_doubtful_lone_cages([screw, weak], 0.99) == [screw, weak]
    assert drop_doubtful_lone_cages([weak], None) == [weak]


def test_a_screw_lying_on_a_cage_is_the_cage_not_a_screw() -> None:
    """A tantalum marker or the edge of a cage read as a screw: a screw piece with `fraction` of its pixels
    inside a cage found is dropped; a screw beside the cage, or any screw when no cage is found, stays."""
    from inference.radiograph.hardware import SourcePiece, drop_screws_on_cages
    from inference.radiograph.hardware_post import Piece
    from inference.results import ImplantKind

    def piece(kind: ImplantKind, offset: tuple[int, int], shape: tuple[int, int]) -> SourcePiece:
        mask = np.ones(shape, bool)
        return SourcePiece(Piece(kind, mask, offset, score=0.9), offset, mask, (offset[1] + shape[1] / 2, offset[0] + shape[0] / 2))

    cage = piece(ImplantKind.INTERBODY_CAGE, (50, 40), (12, 30))
    marker = piece(ImplantKind.PEDICLE_SCREW, (52, 60), (6, 20))  # 10 of its 20 columns on the cage
    pedicle = piece(ImplantKind.PEDICLE_SCREW, (20, 20), (10, 30))  # above the disc space
    grazing = piece(ImplantKind.PEDICLE_SCREW, (60, 10), (10, 31))  # one column of 31 on the cage
    assert drop_screws_on_cages([cage, marker, pedicle, grazing], 0.2) == [cage, pedicle, grazing]
    assert drop_screws_on_cages([cage, marker], 0.0) == [cage, marker]
    assert drop_screws_on_cages([marker, pedicle], 0.2) == [marker, pedicle]
