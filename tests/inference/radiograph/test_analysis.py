"""The "spine-xr" analysis end to end on DICOM made from phantoms, with the SHIPPED weights.

Phantoms are the data engine's procedural spines (no shared data).  Thresholds on the fixed synthetic set
are set below what the shipped model measured (see the model card), so a worse model fails here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from phantoms import FIXED_SET, as_dicom, phantom

from inference import analyses
from inference.registry import ModelRegistry
from inference.results import LEVELS, ScreeningOutcome, StudyResult
from inference.synth.dicom import ct_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def analysis():  # noqa: ANN201
    return analyses.create("spine-xr", ModelRegistry())


def _run(analysis, *datasets) -> StudyResult:  # noqa: ANN001
    return analysis.run(list(datasets))


def _bodies(result: StudyResult, k: int = 0):  # noqa: ANN202
    return [v for v in result.images[k].vertebrae if v.level != "S1"]


def test_dx_monochrome2_and_cr_monochrome1_give_the_same_answer(analysis) -> None:  # noqa: ANN001
    sample = phantom(12, "AP", "lumbar")
    dx = as_dicom(sample, seed="an-dx", modality="DX", photometric="MONOCHROME2", bits=12)
    cr = as_dicom(sample, seed="an-cr", modality="CR", photometric="MONOCHROME1", bits=10)
    r_dx, r_cr = _run(analysis, dx), _run(analysis, cr)
    for result, ds in ((r_dx, dx), (r_cr, cr)):
        assert result.analysis == "spine-xr" and result.study_instance_uid == ds.StudyInstanceUID
        assert [m.name for m in result.models] == ["spine-xr-vertebrae", "spine-xr-hardware"]
        image = result.images[0]
        assert image.source.sop_instance_uids == (ds.SOPInstanceUID,)
        assert image.source.view == "AP" and image.source.modality == ds.Modality
        assert image.source.spacing_source == "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
        assert image.source.pixel_spacing_mm == pytest.approx(sample.pixel_spacing_mm, rel=1e-3)
        assert len(_bodies(result)) >= 3
        for v in image.vertebrae:
            assert v.mask.shape == (ds.Rows, ds.Columns) and v.mask.area > 20
            assert len(v.outline) >= 3
            assert v.fracture is None and v.heights is None  # AP: not graded
        assert any("switched off" in n for n in image.notes)  # fracture grading is off in the shipped model
        # Never cleared while fractures are not graded (the hardware model may add a false flag on this
        # implant-free phantom: its specificity is low, see its model card).
        assert result.verdict.outcome is not ScreeningOutcome.NO_FINDING
    a = np.array([v.centroid for v in _bodies(r_dx)])
    b = np.array([v.centroid for v in _bodies(r_cr)])
    assert a.shape == b.shape and np.abs(a - b).max() < 1.5  # 10 vs 12 bits, inverted: same anatomy


def test_lateral_with_grading_switched_off_says_so_and_never_clears(analysis) -> None:  # noqa: ANN001
    # The shipped model's heights and grades were no better than chance in its evaluation (MODEL_CARD.md),
    # so it ships with them off: no heights, no grades, and the screen stays "not assessable", never
    # "no finding".  Height geometry itself is tested in test_morphometry.py.
    assert analysis.fracture_step.enabled is False
    sample = phantom(*FIXED_SET[0])  # lateral lumbar, L1 wedge with 45 % anterior height loss
    result = _run(analysis, as_dicom(sample, seed="an-lat"))
    image = result.images[0]
    assert image.source.view == "LAT" and len(_bodies(result)) >= 3
    assert all(v.fracture is None and v.heights is None for v in image.vertebrae)
    # Never cleared while fractures are not graded (the hardware model may add a false flag on this
    # implant-free phantom: its specificity is low, see its model card).
    assert result.verdict.outcome is not ScreeningOutcome.NO_FINDING
    assert any("grading switched off" in r for r in result.verdict.reasons)
    # No heights, so nothing about the scale heights would have: it only puzzled readers.
    bare = as_dicom(sample, seed="an-lat-bare")
    for keyword in ("EstimatedRadiographicMagnificationFactor", "DistanceSourceToDetector", "DistanceSourceToPatient"):
        del bare[keyword]
    notes = _run(analysis, bare).images[0].notes
    assert not any("magnification" in n or "heights cannot be given" in n for n in notes), notes


def test_cropped_view_without_sacrum_says_level_unknown(analysis) -> None:  # noqa: ANN001
    sample = phantom(12, "AP", "lumbar")
    sacrum_rows = np.nonzero((sample.body == LEVELS.index("S1") + 1).any(axis=1))[0]
    top = int(sacrum_rows.min()) - 40 if len(sacrum_rows) else sample.image.shape[0] // 2
    cropped = dataclasses.replace(sample, image=sample.image[:top], body=sample.body[:top], vertebra=sample.vertebra[:top])
    result = _run(analysis, as_dicom(cropped, seed="an-crop"))
    bodies = _bodies(result)
    assert bodies, "vertebrae above the crop line should still be found"
    assert all(v.level is None and v.display_name == "level unknown" for v in bodies)
    assert any("not named" in n for n in result.images[0].notes)


def test_empty_image_is_not_assessable(analysis) -> None:  # noqa: ANN001
    rng = np.random.default_rng(3)
    pixels = np.clip(rng.normal(0.5, 0.02, (300, 240)), 0, 1)
    sample = phantom(12, "AP", "lumbar")
    result = _run(analysis, as_dicom(sample, seed="an-empty", pixels=pixels))
    assert result.images[0].vertebrae == ()
    assert result.verdict.outcome is ScreeningOutcome.NOT_ASSESSABLE
    assert any("no vertebra" in r for r in result.verdict.reasons)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_a_blank_image_gets_no_invented_vertebra(analysis, value: float) -> None:  # noqa: ANN001
    """An all-zero or constant image (a rescale slope of 0 gives one too): its contrast stretch turned rounding
    noise into 33 'vertebrae' that went to the PACS."""
    sample = phantom(12, "AP", "lumbar")
    result = _run(analysis, as_dicom(sample, seed=f"blank-{value}", pixels=np.full((300, 240), value)))
    image = result.images[0]
    assert image.vertebrae == () and image.implants == ()
    assert any("without contrast" in n for n in image.notes)
    assert result.verdict.outcome is ScreeningOutcome.NOT_ASSESSABLE


def test_non_radiographs_are_skipped_with_a_reason(analysis) -> None:  # noqa: ANN001
    sample = phantom(12, "AP", "lumbar")
    xr = as_dicom(sample, seed="an-mixed")
    ct = ct_series(np.zeros((2, 16, 16)), seed="an-mixed", study_uid=xr.StudyInstanceUID)[0]
    result = _run(analysis, xr, ct)
    assert len(result.images) == 1
    assert any(r.startswith(f"instance {ct.SOPInstanceUID} skipped: modality CT") for r in result.verdict.reasons)
    with pytest.raises(analyses.AnalysisError):
        _run(analysis, ct_series(np.zeros((1, 8, 8)), seed="other-study")[0], xr)



def test_an_image_too_large_to_read_is_skipped_with_a_reason_before_decoding(analysis) -> None:  # noqa: ANN001
    """A 20000 x 25000 radiograph took the node to 11 GB; the header's matrix is checked before any pixel is read."""
    from inference.radiograph.analysis import MAX_PIXELS

    xr = as_dicom(phantom(12, "AP", "lumbar"), seed="an-huge")
    huge = as_dicom(phantom(13, "AP", "lumbar"), seed="an-huge-2")
    huge.StudyInstanceUID = xr.StudyInstanceUID
    huge.Rows, huge.Columns = 20000, 25000  # the header says so; the pixel data is never touched
    assert huge.Rows * huge.Columns > MAX_PIXELS
    result = _run(analysis, xr, huge)
    assert [im.source.sop_instance_uids for im in result.images] == [(xr.SOPInstanceUID,)]
    assert any(r.startswith(f"instance {huge.SOPInstanceUID} skipped: 20000 x 25000 pixels") for r in result.verdict.reasons)


def test_an_image_that_cannot_be_read_is_skipped_and_the_study_s_other_images_analysed(analysis) -> None:  # noqa: ANN001
    """A Modality LUT with 12-bit entries (legal; pydicom raises TypeError on it) failed the whole study, and a
    multi-frame DX failed its outputs; each is now skipped with its reason."""
    import numpy as np
    from pydicom.dataset import Dataset

    good = as_dicom(phantom(12, "AP", "lumbar"), seed="an-lut-ok")
    lut = as_dicom(phantom(13, "AP", "lumbar"), seed="an-lut-12")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.ModalityLUTType = "US"
    item.LUTData = np.arange(4096, dtype=np.uint16).tolist()
    lut.ModalityLUTSequence = [item]
    lut.StudyInstanceUID = good.StudyInstanceUID
    multi = as_dicom(phantom(14, "AP", "lumbar"), seed="an-multi")
    multi.StudyInstanceUID = good.StudyInstanceUID
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    result = _run(analysis, good, lut, multi)
    assert [im.source.sop_instance_uids for im in result.images] == [(good.SOPInstanceUID,)]
    reasons = " ".join(result.verdict.reasons)
    assert f"instance {lut.SOPInstanceUID} skipped: pixel data could not be read" in reasons
    assert f"instance {multi.SOPInstanceUID} skipped: a multi-frame radiograph (2 frames) is not analysed" in reasons


def test_a_study_of_skipped_images_alone_is_reported_not_failed(analysis) -> None:  # noqa: ANN001
    """Its only image multi-frame: the study failed ("no radiograph (DX/CR)", though it was one) with nothing
    in the PACS; now its SR says why."""
    from reports import OutputKind, build_outputs

    multi = as_dicom(phantom(14, "AP", "lumbar"), seed="an-multi-alone")
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    result = _run(analysis, multi)
    assert result.images == ()
    assert result.verdict.outcome is ScreeningOutcome.NOT_ASSESSABLE
    assert "no radiograph of the study could be analysed" in result.verdict.reasons
    assert [o.kind for o in build_outputs(result, [multi])] == [OutputKind.SR]


def test_a_black_frame_around_a_postoperative_film_changes_nothing_but_the_offsets(analysis) -> None:  # noqa: ANN001
    """An electronic shutter left as a black frame is cropped before both models; their vertebrae, implants and
    implant sides come back on the whole image (the hardware step once read every screw as "right" there:
    it took the vertebrae back to the canonical grid without the crop)."""
    import copy

    from inference.synth.dicom import sample_dataset
    from inference.synth.render import SynthConfig, render_sample

    force = (("view", "AP"), ("field", "lumbar"), ("implants", ("posterior",)))
    sample = render_sample(300, SynthConfig(sources=(("phantom", 1.0),), p_implants=1.0, force=force))
    plain = sample_dataset(sample, seed="an-frame-0")
    framed = copy.deepcopy(plain)
    border = 120
    pixels = np.zeros((plain.Rows + 2 * border, plain.Columns + 2 * border), dtype=plain.pixel_array.dtype)
    pixels[border:-border, border:-border] = plain.pixel_array
    framed.PixelData, (framed.Rows, framed.Columns) = pixels.tobytes(), pixels.shape
    framed.SOPInstanceUID = framed.SOPInstanceUID + ".1"

    def seen(result: StudyResult, offset: int) -> tuple[list, list]:
        image = result.images[0]
        # Ordered down the spine (by row): ordered by column first, a 1 px shift swapped two stacked vertebrae.
        vertebrae = sorted(((round(v.centroid[0]) - offset, round(v.centroid[1]) - offset) for v in image.vertebrae),
                           key=lambda c: (c[1], c[0]))
        implants = sorted(((i.kind.value, i.side.value, round(i.centroid[0]) - offset, round(i.centroid[1]) - offset)
                           for i in image.implants), key=lambda i: (i[0], i[1], i[3], i[2]))
        return vertebrae, implants

    before, after = _run(analysis, plain), _run(analysis, framed)
    (v0, i0), (v1, i1) = seen(before, 0), seen(after, border)
    assert i0 and [i[:2] for i in i0] == [i[:2] for i in i1]  # the same implants, the same sides
    # Positions within 3 px (the frame still counts in whether the header's window is applied).
    assert len(v0) == len(v1) and np.abs(np.array(v0) - np.array(v1)).max() <= 3
    assert np.abs(np.array([i[2:] for i in i0]) - np.array([i[2:] for i in i1])).max() <= 3
    assert before.verdict.instrumentation == after.verdict.instrumentation
    assert any("uniform frame" in n for n in after.images[0].notes)

def test_head_down_image_gives_mirrored_results(analysis) -> None:  # noqa: ANN001
    sample = phantom(12, "AP", "lumbar")
    upright = _run(analysis, as_dicom(sample, seed="an-up"))
    flipped_ds = as_dicom(sample, seed="an-down", pixels=sample.image[::-1])
    flipped_ds.PatientOrientation = ["L", "H"]
    down = _run(analysis, flipped_ds)
    rows = sample.image.shape[0]
    a = sorted((v.centroid[0], rows - v.centroid[1]) for v in _bodies(upright))
    b = sorted(v.centroid for v in _bodies(down))
    assert len(a) == len(b) and np.abs(np.array(a) - np.array(b)).max() < 1.5
    assert [v.level for v in _bodies(upright)] == [v.level for v in sorted(_bodies(down), key=lambda v: -v.centroid[1])]


def test_shipped_weights_on_the_fixed_synthetic_set(analysis) -> None:  # noqa: ANN001
    found = truth = hits = named = named_right = 0
    for k, args in enumerate(FIXED_SET):
        sample = phantom(*args)
        result = _run(analysis, as_dicom(sample, seed=f"fixed-{k}"))
        rows, cols = sample.body.shape
        visible = {
            v.level
            for v in sample.vertebrae
            if v.level and v.level != "S1" and v.visible_fraction >= 0.9 and (sample.body == LEVELS.index(v.level) + 1).sum() > 50
        }
        truth += len(visible)
        for v in _bodies(result):
            found += 1
            r, c = int(min(v.centroid[1], rows - 1)), int(min(v.centroid[0], cols - 1))
            code = int(sample.body[r, c])
            level = LEVELS[code - 1] if code >= 1 else None
            if level in visible:
                hits += 1
                if v.level is not None:
                    named += 1
                    named_right += v.level == level
    recall, precision = hits / truth, hits / max(found, 1)
    assert recall >= RECALL_MIN and precision >= PRECISION_MIN, (recall, precision)
    # Level naming is switched off in the shipped model (its evaluation named wrongly more often than
    # rightly, see MODEL_CARD.md): "level unknown", never a guessed level.
    assert named == 0, (named_right, named)


# Measured on the shipped weights (see MODEL_CARD.md), with margin.
RECALL_MIN = 0.5
PRECISION_MIN = 0.7


def test_shipped_six_point_stage_on_the_fixed_laterals() -> None:
    # The shipped model's morphometry stage, run as the evaluation runs it (the node keeps grading off: its
    # sensitivity on the synthetic lateral hold-out is too low to clear a study, see MODEL_CARD.md).  No
    # header side is given: the stage reads the anterior side itself.
    from inference.evaluate.vertebrae import radiograph_from_array
    from inference.radiograph import morphometry
    from inference.radiograph.analysis import chain_heights
    from inference.radiograph.model import VertebraModel
    from inference.results import FractureShape, GenantGrade

    model = VertebraModel.from_registry(ModelRegistry())
    assert model.endplates is not None
    errors, severe = [], {}
    for args in FIXED_SET:
        if args[1] != "LAT":
            continue
        sample = phantom(*args)
        rad = radiograph_from_array(sample.image, tuple(sample.pixel_spacing_mm), "LAT", None)
        bodies = model.analyse(rad).vertebrae
        heights = chain_heights(model.endplates, rad, bodies, None)
        values = [h.values() if h else None for h in heights]
        truth = {v.level: v for v in sample.vertebrae}
        for body, h, grade in zip(bodies, values, morphometry.grade_fractures(values), strict=True):
            r, c = (int(min(body.centroid[1], sample.body.shape[0] - 1)), int(min(body.centroid[0], sample.body.shape[1] - 1)))
            code = int(sample.body[r, c])
            spec = truth.get(LEVELS[code - 1]) if code >= 1 else None
            if h is None or spec is None or spec.heights_mm is None:
                continue
            errors += [abs(p - t) for p, t in zip(h, spec.heights_mm, strict=True)]
            if grade is not None and grade.grade >= GenantGrade.MODERATE:
                severe[(args[0], spec.level)] = grade.shape
    assert len(errors) >= 30 and float(np.mean(errors)) < HEIGHT_MAE_MAX_MM, (len(errors), float(np.mean(errors)))
    # The L1 wedge (45 % anterior loss) is found as a moderate or severe wedge, and nothing else is.
    assert severe == {(FIXED_SET[0][0], "L1"): FractureShape.WEDGE}, severe


# Measured on the shipped stage: 1.1 mm over 45 heights of 15 bodies (MODEL_CARD.md has the hold-out), with margin.
HEIGHT_MAE_MAX_MM = 2.0


def test_fracture_step_with_the_six_point_stage_reports_the_wedge(analysis) -> None:  # noqa: ANN001
    # What the node would report with grading switched on (a deployment decision the model card argues
    # against today): heights in mm on the graded bodies, the L1 wedge as a finding with its height loss.
    from inference.radiograph.analysis import FractureStep
    from inference.results import FindingKind, MeasurementKind

    shipped = analysis.fracture_step
    analysis.fracture_step = FractureStep(enabled=True, model=analysis.vertebra_step.model)
    try:
        sample = phantom(*FIXED_SET[0])
        ds = as_dicom(sample, seed="an-lat-on")
        del ds.PatientOrientation  # no header side: the stage reads it
        result = _run(analysis, ds)
    finally:
        analysis.fracture_step = shipped
    image = result.images[0]
    graded = [v for v in _bodies(result) if v.fracture is not None]
    assert len(graded) >= 4 and all(v.heights is not None and v.heights.anterior.value_mm > 5 for v in graded)
    assert any("read by the morphometry network" in n for n in image.notes)
    fractures = [f for f in image.findings if f.kind is FindingKind.VERTEBRAL_COMPRESSION_FRACTURE]
    assert len(fractures) == 1 and "wedge" in fractures[0].description, [f.description for f in fractures]
    assert any(m.kind is MeasurementKind.HEIGHT_LOSS and m.value >= 25 for m in image.measurements)
