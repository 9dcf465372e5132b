"""The SHIPPED hardware model on a small fixed synthetic set, and through the "spine-xr" analysis.

Phantoms are the data engine's procedural spines with implants inserted before projection (no shared data).
Thresholds are set below what the shipped model measured on this set (see the model card for the real
evaluation), so a worse model fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from phantoms import phantom

from inference import analyses
from inference.evaluate.hardware import (
    TrueImplant,
    aggregate,
    construct_size_baseline,
    recipe_args,
    sample_record,
    true_status,
)
from inference.radiograph.hardware import HardwareModel
from inference.radiograph.hardware_post import CAGE, PLATE
from inference.registry import ModelRegistry
from inference.results import Complication, FindingKind, HardwareStatus, ImplantKind, ScreeningOutcome, Side
from inference.synth.dicom import sample_dataset
from inference.train.hardware import parse_pos_weight

pytestmark = pytest.mark.slow

#: (seed, view, field, implants forced; () = none)
FIXED_SET: tuple[tuple[int, str, str, tuple[str, ...]], ...] = (
    (21, "AP", "lumbar", ("posterior", "cage")),
    (22, "LAT", "lumbar", ("posterior",)),
    (23, "AP", "thoracolumbar", ("posterior",)),
    (24, "AP", "lumbar", ("plate",)),
    (25, "AP", "lumbar", ()),
    (26, "LAT", "thoracolumbar", ()),
)


def postop(seed: int, view: str, field: str, implants: tuple[str, ...]) -> Any:
    """A phantom radiograph with (or without) implants, deterministic by its arguments."""
    return phantom(seed, view, field, implants=implants)


def as_dicom(sample: Any, seed: str, study_uid: str | None = None) -> Any:
    """The sample as a DX with the sample's PatientOrientation (the patient's left may be on either side),
    12 bits, ImagerPixelSpacing at a magnification of 1.2."""
    spacing = round(float(sample.pixel_spacing_mm[0]) * 1.2, 6)
    return sample_dataset(sample, seed=seed, pixel_spacing_mm=spacing, magnification=1.2, study_uid=study_uid)


@pytest.fixture(scope="module")
def model() -> HardwareModel:
    return HardwareModel.from_registry(ModelRegistry())


@pytest.fixture(scope="module")
def fixed_set_metrics(model: HardwareModel) -> dict[str, Any]:
    records = [sample_record(model, postop(*case), f"fixed/{case[0]}", None) for case in FIXED_SET]
    return aggregate(records, "fixed set")


def test_shipped_model_folder_is_complete() -> None:
    spec = ModelRegistry().spec("spine-xr-hardware")
    spec.verify()
    assert spec.weights.stat().st_size <= 20 * 2**20
    card = Path(spec.folder / "MODEL_CARD.md").read_text()
    for needed in ("Dice", "precision", "sensitivity", "AASCE", "research use", "REAL", "Read this first"):
        assert needed in card, needed
    assert "leave-one-patient-out" in card.lower()  # its numbers, or that it was not run
    assert spec.metadata["metrics"]["synthetic_holdout"]["samples"] >= 100


def test_leave_one_patient_out_retrains_with_the_shipped_recipe() -> None:
    """A fold must get the shipped model's budget and threads, not a shorter run (which would measure
    under-training rather than a new patient); paths and the excluded sources are not recipe."""
    command = "python -m inference.train.hardware --data d --cache c --out o --threads 1 --max-minutes 80 --mix 'a:1,b:2' --no-real-negatives"
    assert recipe_args(command) == ["--threads", "1", "--max-minutes", "80", "--mix", "a:1,b:2", "--no-real-negatives"]
    shipped = recipe_args(ModelRegistry().spec("spine-xr-hardware").metadata["training"]["command"])
    assert "--max-minutes" in shipped and "--threads" in shipped
    assert recipe_args("python -m inference.train.hardware --pos-weight cage:10,plate:10") == ["--pos-weight", "cage:10,plate:10"]
    # What the shipped model does not report, the folds do not report either (values with spaces, quoted).
    assert recipe_args("python -m inference.train.hardware --not-assessed 'screw loosening,screw breakage'") == [
        "--not-assessed", "screw loosening,screw breakage"]


def test_positive_weights_name_class_maps_only() -> None:
    assert parse_pos_weight("cage:10, plate:4") == {CAGE: 10.0, PLATE: 4.0}
    assert parse_pos_weight("") == {}
    with pytest.raises(ValueError, match="loosening"):
        parse_pos_weight("loosening:5")  # a complication map, not a class map


def test_construct_size_baseline_flags_big_constructs() -> None:
    # Images with a complication show 4, 8, 12 and 3 implants; intact ones 1, 2, 4 and 2: "at least 3" catches
    # every failed construct and one intact one.
    assert construct_size_baseline([4, 8, 12, 3], [1, 2, 4, 2]) == {"min_implants": 3, "sensitivity": 1.0, "specificity": 0.75}
    assert construct_size_baseline([], [1, 2]) == {}


def test_cage_rows_by_pixel_size_bin_each_image_once() -> None:
    from inference.evaluate.hardware import counts_by_pixel_size

    records = [{"mm_per_pixel": 0.2, "cage_discs": (1, 0, 0)}, {"mm_per_pixel": 1.0, "cage_discs": (1, 1, 0)},
               {"mm_per_pixel": 1.49, "cage_discs": (0, 0, 2)}, {"mm_per_pixel": 1.5, "cage_discs": (0, 0, 3)},
               {"mm_per_pixel": 2.0, "cage_discs": (0, 0, 0)}, {"mm_per_pixel": 0.5, "cage_discs": None}]
    rows = counts_by_pixel_size(records, "cage_discs")
    assert list(rows) == ["finer than 1 mm", "1 to 1.5 mm", "1.5 mm or coarser"]
    assert (rows["1 to 1.5 mm"]["tp"], rows["1 to 1.5 mm"]["fp"], rows["1 to 1.5 mm"]["fn"]) == (1, 1, 2)
    assert rows["1.5 mm or coarser"]["recall"] == 0.0 and rows["finer than 1 mm"]["recall"] == 1.0
    assert counts_by_pixel_size([{"mm_per_pixel": 2.0, "cage_discs": (0, 0, 0)}], "cage_discs") == {}


def test_true_verdict_ignores_complications_the_model_does_not_assess() -> None:
    mask = np.zeros((4, 4), bool)
    loose = TrueImplant(1, ImplantKind.PEDICLE_SCREW, ("L4",), Side.LEFT, (Complication.SCREW_LOOSENING,), mask)
    rod = TrueImplant(2, ImplantKind.ROD, ("L3", "L4"), Side.LEFT, (), mask)
    assert true_status([loose, rod]) is HardwareStatus.POSSIBLE_COMPLICATION
    assert true_status([loose, rod], not_assessed=("screw loosening",)) is HardwareStatus.INTACT
    assert true_status([]) is HardwareStatus.NO_IMPLANTS


def test_segmentation_and_screw_detection_on_the_fixed_set(fixed_set_metrics: dict[str, Any]) -> None:
    # Shipped model on this set (2026-12-04): Dice 0.67 (the plate is missed), AP screws recall 0.91 /
    # precision 0.91, levels 0.95, sides 1.00; the cage disc (seed 21) found at its level, nothing else
    # called a cage.  Thresholds sit just below.  Since 1.5 (2026-12-06) Dice 0.62: faint screw pieces beside
    # confident ones are dropped, here on the lateral image (its screws overlap, none is matched either way);
    # on the 320-sample hold-out Dice stayed 0.83.
    m = fixed_set_metrics
    assert m["dice"]["all hardware"]["pooled"] >= 0.6
    screws = m["detection"]["pedicle screw, AP"]
    assert screws["recall"] >= 0.9 and screws["precision"] >= 0.5
    assert m["screw_levels_true_vertebrae"]["accuracy_all"] >= 0.8
    assert m["sides_frontal"]["accuracy_of_named"] >= 0.9
    assert m["cage_disc_levels"]["tp"] >= 1 and m["cage_disc_levels"]["fp"] == 0


def test_no_implants_means_no_implants(model: HardwareModel, fixed_set_metrics: dict[str, Any]) -> None:
    assert fixed_set_metrics["no_implants"]["said_no_implants"] == 1.0
    # Screw-and-rod constructs are always seen.  The plate-only image (seed 24) is missed by the shipped
    # model: plates and cages are not found (its card says so); the split keeps that failure from hiding
    # a missed screw construct.
    assert fixed_set_metrics["no_implants"]["images_with_screws_or_rods_said_no_implants"] == {"images": 3, "rate": 0.0}
    # An empty (uniform) radiograph is not noise either.
    blank = postop(25, "AP", "lumbar", ())
    from dataclasses import replace

    for pixels in (np.zeros_like(blank.image), np.full_like(blank.image, 0.5)):
        rec = sample_record(model, replace(blank, image=pixels), "blank", None)
        assert rec["status"] == HardwareStatus.NO_IMPLANTS.value and rec["n_pred"] == 0


def test_postoperative_dx_through_the_analysis() -> None:
    analysis = analyses.create("spine-xr", ModelRegistry())
    assert analysis.hardware_step is not None
    sample = postop(21, "AP", "lumbar", ("posterior", "cage"))
    ds = as_dicom(sample, "hw-postop")
    result = analysis.run([ds])
    assert [m.name for m in result.models] == ["spine-xr-vertebrae", "spine-xr-hardware"]
    image = result.images[0]
    screws = [i for i in image.implants if i.kind is ImplantKind.PEDICLE_SCREW]
    rods = [i for i in image.implants if i.kind is ImplantKind.ROD]
    assert len(screws) >= 4 and len(rods) >= 1
    # Its PLIF pair (one disc space), found by the cage scan on the vertebra model's vertebrae.
    assert [i.kind for i in image.implants].count(ImplantKind.INTERBODY_CAGE) == 1
    for i in image.implants:
        assert i.mask.shape == (ds.Rows, ds.Columns) and len(i.outline) >= 3
    assert result.verdict.hardware in (HardwareStatus.INTACT, HardwareStatus.POSSIBLE_COMPLICATION, HardwareStatus.NOT_ASSESSABLE)
    assert result.verdict.instrumentation.startswith("posterior instrumentation")
    summary = result.summary()
    assert summary["hardware"] == result.verdict.hardware.value and summary["images"][0]["implants"] == len(image.implants)


def test_forced_failures_are_not_cleared_and_a_mode_switched_on_flags_the_study() -> None:
    """The shipped model assesses no failure mode (each was no better than chance, or than a construct-size
    baseline, on its hold-outs; see its card): a construct with a loosened screw, a broken screw and a
    fractured rod is described, not reported on, and never called intact.  A site that switches rod fracture
    back on (one config line, `postprocess.not_assessed`) gets the classifier's finding, which flags the study."""
    from dataclasses import replace

    registry = ModelRegistry()
    analysis = analyses.create("spine-xr", registry)
    ds = as_dicom(postop(27, "AP", "lumbar", ("posterior", "loosening", "breakage", "rod_fracture")), "hw-failed")
    result = analysis.run([ds])
    hardware_kinds = {FindingKind.SCREW_LOOSENING, FindingKind.SCREW_BREAKAGE, FindingKind.ROD_FRACTURE}
    assert not {f.kind for f in result.all_findings()} & hardware_kinds
    assert {"screw loosening not assessed", "screw breakage not assessed", "rod fracture not assessed"} <= set(result.images[0].notes)
    assert result.verdict.hardware is HardwareStatus.NOT_ASSESSABLE and not result.flagged
    assert any("no failure mode of the implants found is assessed" in r for r in result.verdict.reasons)
    assert result.verdict.instrumentation.startswith("posterior instrumentation")

    model = HardwareModel.from_registry(registry)
    model.params = replace(model.params, not_assessed=tuple(c for c in model.params.not_assessed if c != Complication.ROD_FRACTURE.value))
    result = analysis.run([ds])
    kinds = {f.kind for f in result.all_findings()}
    assert FindingKind.ROD_FRACTURE in kinds
    assert not kinds & {FindingKind.SCREW_LOOSENING, FindingKind.SCREW_BREAKAGE}
    assert any(r.startswith("hardware: ") and "screw loosening" in r and "screw breakage" in r and r.endswith("not assessed by this model version")
               for r in result.verdict.reasons)
    assert result.verdict.hardware is HardwareStatus.POSSIBLE_COMPLICATION
    assert result.verdict.outcome is ScreeningOutcome.FINDING_PRESENT and result.flagged
    for f in result.all_findings():
        if f.kind is FindingKind.ROD_FRACTURE:
            assert len(f.evidence) >= 3 and "rod" in f.description


def test_instrumented_levels_count_levels_not_screws() -> None:
    from inference.evaluate.hardware import instrumented_levels

    def rec(view, true, found, visible):
        return {"view": view, "screw_levels": {"true": true, "found": found, "visible": visible}}

    records = [
        # Lateral: both screws of L4 and L5 superimpose; one found screw per level still finds the level.
        rec("LAT", ["L4", "L5"], ["L4", "L5"], ["L2", "L3", "L4", "L5"]),
        rec("AP", ["L3", "L4"], ["L4", "L5"], ["L2", "L3", "L4", "L5"]),
        rec("AP", [], ["L1"], ["L1", "L2"]),  # a false screw on an image without implants
        rec("AP", ["L4"], [], []),  # no named vertebrae (a real radiograph): not scored
    ]
    m = instrumented_levels(records)
    assert m["LAT"]["model"] == {"tp": 2, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert (m["AP"]["model"]["tp"], m["AP"]["model"]["fp"], m["AP"]["model"]["fn"]) == (1, 2, 1)
    # Baseline "every vertebra in view", on images with screws only: 4 of 8 levels carry screws.
    assert (m["all"]["baseline_every_visible_vertebra"]["tp"], m["all"]["baseline_every_visible_vertebra"]["fp"]) == (4, 4)


def test_superimposed_screws_are_counted_per_group() -> None:
    from inference.evaluate.hardware import match, superimposed_screw_counts

    shape = (60, 80)

    def box(r0, r1, c0, c1):
        m = np.zeros(shape, bool)
        m[r0:r1, c0:c1] = True
        return m

    # A lateral level: the left and right screws cross; the label map gives the crossing to the left one,
    # so the right one shows as two stubs touching it.  A third screw one level lower stands alone.
    left = box(10, 16, 10, 50)
    right_a, right_b = box(16, 20, 14, 30), box(16, 20, 34, 50)
    lower = box(40, 46, 10, 50)
    true = [left, right_a | right_b, lower]
    pair = box(10, 20, 10, 50)  # one piece drawn over the pair: IoU 0.6 with the left screw, 0.32 with the right
    half = box(10, 20, 10, 30)  # the pair read as two pieces, end to end
    other = box(10, 20, 30, 50)
    noise = box(50, 56, 60, 70)
    assert superimposed_screw_counts([pair, lower], true) == (2, 0, 1)  # the pair read as one screw: one missed
    assert superimposed_screw_counts([half, other, lower], true) == (3, 0, 0)
    assert len(match([half, other, lower], true, 0.3)) == 2  # per screw at IoU 0.3 the right stubs go unmatched
    assert superimposed_screw_counts([half, other, pair, lower, noise], true) == (3, 2, 0)  # a third piece on the pair, a piece on none
    assert superimposed_screw_counts([], true) == (0, 0, 3)
    assert superimposed_screw_counts([noise], []) == (0, 1, 0)
    # Screws that do not touch are never grouped: one piece per screw, each on its own screw.
    assert superimposed_screw_counts([left, lower], [left, lower]) == (2, 0, 0)
    assert superimposed_screw_counts([left | lower], [left, lower]) == (1, 0, 1)


def test_instrumented_levels_on_the_fixed_set(fixed_set_metrics: dict[str, Any]) -> None:
    # Shipped model on this set (2026-12-05): AP 11 of 12 instrumented levels, none false; the lateral
    # construct 2 of 5 (lateral screws are weak, see the card).  Thresholds sit just below.
    ap = fixed_set_metrics["instrumented_levels"]["AP"]["model"]
    assert ap["recall"] >= 0.85 and ap["precision"] >= 0.9
    assert fixed_set_metrics["instrumented_levels"]["all"]["model"]["precision"] >= 0.9


def test_real_films_with_hardware_are_named_as_the_split_names_them() -> None:
    # The export's file names carry Roboflow's hash; the list is keyed by the source stem so that a
    # re-export (another hash) still finds the film.
    from inference.evaluate.hardware import REAL_WITH_HARDWARE
    from inference.splits import hardware_split, source_stem

    name = "sunhl-1th-30-Dec-2016-159-C-AP_jpg.rf.8ab155020a01e6e3a62aeae67615327f.jpg"
    assert source_stem(name) in REAL_WITH_HARDWARE
    assert hardware_split(name) == "test"  # scored in the real test rows, apart from the films without hardware
