"""The verdict logic of "spine-xr" and the grid conversions, without running a network."""

from __future__ import annotations

import numpy as np

from inference.radiograph import preprocess
from inference.radiograph.analysis import (
    HardwareOutcome,
    ImageWork,
    combine_verdict,
    mask_to_stored,
    outline_points,
)
from inference.radiograph.model import SpineInstances
from inference.results import (
    Finding,
    FindingKind,
    HardwareStatus,
    ScreeningOutcome,
    Severity,
    SourceImage,
)


def _work(view: str | None, graded: int, vertebrae: int = 5, findings: tuple[Finding, ...] = ()) -> ImageWork:
    rad = preprocess.Radiograph(np.zeros((8, 8), np.float32), (0.2, 0.2), "PixelSpacing", view, 1, preprocess.Orientation(), (8, 8))
    source = SourceImage("1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.1.1", ("1.2.3.4",), 8, 8, (0.2, 0.2), "PixelSpacing", view, "DX")
    work = ImageWork(dataset=None, radiograph=rad, source=source)  # type: ignore[arg-type]
    work.instances = SpineInstances([object()] * vertebrae, None, view, False, 1, 20.0, 1.0)  # type: ignore[list-item]
    work.graded = graded
    work.findings = list(findings)
    return work


FRACTURE = Finding(FindingKind.VERTEBRAL_COMPRESSION_FRACTURE, Severity.MODERATE, ("L1",), description="L1: wedge compression deformity")


def test_fracture_means_finding_present() -> None:
    verdict = combine_verdict([_work("LAT", 5, findings=(FRACTURE,))], None, [])
    assert verdict.outcome is ScreeningOutcome.FINDING_PRESENT
    assert verdict.reasons[0] == "L1: wedge compression deformity"
    assert verdict.hardware is None
    assert any("no hardware model" in r for r in verdict.reasons)


def test_graded_lateral_without_finding_is_no_finding() -> None:
    verdict = combine_verdict([_work("LAT", 4)], None, [])
    assert verdict.outcome is ScreeningOutcome.NO_FINDING


def test_ap_only_or_nothing_found_is_not_assessable() -> None:
    ap = combine_verdict([_work("AP", 0)], None, [])
    assert ap.outcome is ScreeningOutcome.NOT_ASSESSABLE
    assert any("lateral" in r for r in ap.reasons)
    empty = combine_verdict([_work("LAT", 0, vertebrae=0)], None, ["instance 9 skipped: modality CT is not a radiograph"])
    assert empty.outcome is ScreeningOutcome.NOT_ASSESSABLE
    assert any("no vertebra found" in r for r in empty.reasons)
    assert empty.reasons[-1].startswith("instance 9 skipped")
    none = combine_verdict([], None, [])
    assert none.outcome is ScreeningOutcome.NOT_ASSESSABLE and "no radiograph" in none.reasons[0]


def test_hardware_outcome_joins_the_verdict() -> None:
    complication = Finding(FindingKind.SCREW_LOOSENING, Severity.MODERATE, ("L4",), description="L4 left screw loosening")
    work = _work("AP", 0, findings=(complication,))  # the analysis adds hardware findings to the image
    hw = HardwareOutcome(status=HardwareStatus.POSSIBLE_COMPLICATION, instrumentation="posterior instrumentation L3–L5")
    verdict = combine_verdict([work], [hw], [])
    assert verdict.outcome is ScreeningOutcome.FINDING_PRESENT
    assert verdict.hardware is HardwareStatus.POSSIBLE_COMPLICATION
    assert verdict.instrumentation == "posterior instrumentation L3–L5"
    intact = combine_verdict([_work("LAT", 5)], [HardwareOutcome(status=HardwareStatus.INTACT)], [])
    assert intact.outcome is ScreeningOutcome.NO_FINDING and intact.hardware is HardwareStatus.INTACT


def test_an_intact_verdict_says_what_was_not_checked() -> None:
    seen = HardwareOutcome(status=HardwareStatus.INTACT, not_assessed=("screw loosening", "screw breakage"))
    lateral = HardwareOutcome(status=HardwareStatus.INTACT, not_assessed=("screw loosening",), view="LAT")
    verdict = combine_verdict([_work("AP", 0)], [seen, lateral], [])
    assert verdict.hardware is HardwareStatus.INTACT
    assert "hardware: screw loosening, screw breakage not assessed by this model version" in verdict.reasons
    # No implants: nothing to check, nothing to say.
    clean = combine_verdict([_work("AP", 0)], [HardwareOutcome(status=HardwareStatus.NO_IMPLANTS, not_assessed=())], [])
    assert not any("not assessed by this model" in r for r in clean.reasons)


def test_with_two_views_the_construct_and_the_reasons_name_their_image() -> None:
    """A lateral's SC showed "7 pedicle screws, 2 rods" (the frontal view's count) beside its own key of 3
    screws and 1 rod, and two different "not assessable" reasons without saying which image gave which."""
    import dataclasses

    ap, lat = _work("AP", 0), _work("LAT", 0)
    ap.source = dataclasses.replace(ap.source, series_number=1, instance_number=1)
    lat.source = dataclasses.replace(lat.source, view="LAT", series_number=1, instance_number=2)
    edge = "hardware not assessable: implants reach the image edge"
    frontal = HardwareOutcome(status=HardwareStatus.NOT_ASSESSABLE, instrumentation="7 pedicle screws, 2 rods",
                              reasons=(edge,), view="AP")
    side = HardwareOutcome(status=HardwareStatus.NOT_ASSESSABLE, instrumentation="3 pedicle screws", view="LAT",
                           reasons=(edge,))
    verdict = combine_verdict([ap, lat], [frontal, side], [])
    assert verdict.instrumentation == "7 pedicle screws, 2 rods (counted on the AP image, series 1 no. 1)"
    assert f"AP image, series 1 no. 1: {edge}" in verdict.reasons
    assert f"LAT image, series 1 no. 2: {edge}" in verdict.reasons
    alone = combine_verdict([ap], [frontal], [])  # one image: nothing to tell apart
    assert alone.instrumentation == "7 pedicle screws, 2 rods" and edge in alone.reasons


def test_masks_and_points_return_to_the_stored_grid() -> None:
    stored = np.zeros((40, 30), dtype=bool)
    stored[5:9, 20:27] = True
    for orientation in (
        preprocess.Orientation(),
        preprocess.Orientation(flip_rows=True),
        preprocess.Orientation(flip_columns=True),
        preprocess.Orientation(transpose=True),
        preprocess.Orientation(transpose=True, flip_rows=True, flip_columns=True),
    ):
        canonical = orientation.to_canonical(stored)
        rows, cols = np.nonzero(canonical)
        offset = (int(rows.min()), int(cols.min()))
        crop = canonical[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        mask = mask_to_stored(orientation, canonical.shape, offset, crop)
        assert np.array_equal(mask.dense(), stored), orientation
        # The canonical centroid maps onto the stored centroid.
        c = (float(cols.mean() + 0.5), float(rows.mean() + 0.5))
        x, y = orientation.point_from_canonical(c, canonical.shape)
        sr, sc = np.nonzero(stored)
        assert abs(x - (sc.mean() + 0.5)) < 1e-9 and abs(y - (sr.mean() + 0.5)) < 1e-9


def test_outline_surrounds_the_mask() -> None:
    mask = np.zeros((44, 64), dtype=bool)
    mask[1:41, 2:62] = True
    pts = np.array(outline_points(mask, (10, 20)))
    # The block's pixel edges are columns 22..82 and rows 11..51; the 0.5 contour runs along them
    # (corners cut by at most a pixel).
    assert pts[:, 0].min() >= 22.0 and pts[:, 0].max() <= 82.0
    assert pts[:, 1].min() >= 11.0 and pts[:, 1].max() <= 51.0
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert abs(area - mask.sum()) <= 0.03 * mask.sum()


def test_hardware_in_doubt_keeps_the_screen_open() -> None:
    edge = HardwareOutcome(status=HardwareStatus.NOT_ASSESSABLE, reasons=("implants cut by the image edge",))
    verdict = combine_verdict([_work("LAT", 5)], [edge], [])
    assert verdict.outcome is ScreeningOutcome.NOT_ASSESSABLE
    assert verdict.hardware is HardwareStatus.NOT_ASSESSABLE
    assert "implants cut by the image edge" in verdict.reasons
    # Metal one view could not judge is not outweighed by another view without implants ...
    none = HardwareOutcome(status=HardwareStatus.NO_IMPLANTS)
    assert combine_verdict([_work("LAT", 5)], [none, edge], []).hardware is HardwareStatus.NOT_ASSESSABLE
    # ... while an intact construct on one view stays intact, and the other view's reason is still given.
    both = combine_verdict([_work("LAT", 5)], [HardwareOutcome(status=HardwareStatus.INTACT), edge], [])
    assert both.hardware is HardwareStatus.INTACT and both.outcome is ScreeningOutcome.NO_FINDING
    assert "implants cut by the image edge" in both.reasons


def test_reasons_name_the_image_as_a_reader_finds_it() -> None:
    from dataclasses import replace

    work = _work("AP", 0)
    work.source = replace(work.source, series_number=3, instance_number=1)
    verdict = combine_verdict([work], None, [])
    assert any(r.startswith("AP image, series 3 no. 1: ") for r in verdict.reasons)
    # Without numbers (they are optional in DICOM) the UID is the only name there is.
    assert _work("AP", 0).source.label == "image 1.2.3.4"
