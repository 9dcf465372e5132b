"""Analysis "spine-xr": spine radiographs -> vertebrae with levels, heights, fracture grades, verdict.

For each radiograph of the study (DX / CR; other instances are skipped with a reason):

1. `VertebraStep`: decode (`preprocess.decode`), run the vertebra model, turn its instances into
   `Vertebra` results on the stored pixel grid (mask, outline, centroid, level or None).
2. `FractureStep`: on lateral views, body heights (mm when the header gives a spacing) and Genant grades;
   a `Finding` per deformed body.  Frontal views are not graded (said in the notes).
3. Hardware: a `HardwareStep` registered with `register_hardware_step` (e.g. by
   ``inference/radiograph/hardware.py``) runs after the vertebrae so implants can be given levels.
4. `combine_verdict`: the one place where fracture and hardware outcomes become the study's
   `ScreeningVerdict`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from inference import analyses
from inference.analyses import AnalysisError
from inference.radiograph import endplates, morphometry, preprocess
from inference.radiograph.model import MODEL_NAME, SpineInstances, VertebraInstance, VertebraModel
from inference.registry import ModelError, ModelRegistry
from inference.results import (
    Finding,
    FindingKind,
    FractureAssessment,
    GenantGrade,
    HardwareStatus,
    HeightMeasurement,
    ImageResult,
    Implant,
    Measurement,
    MeasurementKind,
    ModelInfo,
    Point,
    RegionMask,
    ScreeningOutcome,
    ScreeningVerdict,
    Severity,
    SourceImage,
    StudyResult,
    Vertebra,
    VertebralHeights,
    level_span,
)

if TYPE_CHECKING:
    import torch
    from pydicom import Dataset

ANALYSIS_NAME = "spine-xr"
#: Modalities analysed as projection radiographs.
RADIOGRAPH_MODALITIES = frozenset({"DX", "CR", "RG"})
#: Largest matrix read (rows x columns). Real radiographs stay under about 30 million pixels (a stitched
#: long-length film); decoding a far larger one would take the node's memory (a 20000 x 25000 image took
#: 11 GB) for no reading the models were made for.
MAX_PIXELS = 60_000_000
GRADE_SEVERITY = {GenantGrade.MILD: Severity.MILD, GenantGrade.MODERATE: Severity.MODERATE, GenantGrade.SEVERE: Severity.SEVERE}
#: A lateral view needs this many graded bodies before "no fracture" can be said.
MIN_GRADED_FOR_NO_FINDING = 2


# ------------------------------------------------------------------------------ grid conversions


def mask_to_stored(orientation: preprocess.Orientation, canonical_shape: tuple[int, int], offset: tuple[int, int], crop: np.ndarray) -> RegionMask:
    """A canonical-grid crop as a `RegionMask` over the stored grid."""
    rows, cols = canonical_shape
    r0, c0 = offset
    if orientation.crop is not None and orientation.full_shape is not None:
        rows, cols = orientation.full_shape
        r0, c0 = r0 + orientation.crop[0], c0 + orientation.crop[1]
    h, w = crop.shape
    arr = crop
    if orientation.flip_columns:
        arr = arr[:, ::-1]
        c0 = cols - (c0 + w)
    if orientation.flip_rows:
        arr = arr[::-1, :]
        r0 = rows - (r0 + h)
    shape = (rows, cols)
    if orientation.transpose:
        arr = arr.T
        r0, c0 = c0, r0
        shape = (cols, rows)
    return RegionMask(shape, (int(r0), int(c0)), np.ascontiguousarray(arr, dtype=bool))


#: Outlines stay within this many pixels of the mask's contour.  On a 3000 px radiograph a rod's outline at
#: 0.6 px had 158 vertices and took 14 ms to simplify, at 1 px 26 vertices and 3 ms: the difference is not visible.
OUTLINE_TOLERANCE_PX = 1.0


def outline_points(mask: np.ndarray, offset: tuple[int, int]) -> list[Point]:
    """Closed polygon (SCOORD, canonical grid) around the largest part of a boolean crop."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    contour = max(contours, key=len)
    contour = approximate_polygon(contour, tolerance=OUTLINE_TOLERANCE_PX)
    if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
        contour = contour[:-1]
    # find_contours works on pixel-centre indices of the padded crop: index i -> SCOORD i - 1 + 0.5.
    return [(float(c - 1 + 0.5 + offset[1]), float(r - 1 + 0.5 + offset[0])) for r, c in contour]


# ------------------------------------------------------------------------------------------ steps


@dataclass
class ImageWork:
    """What the steps know about one radiograph while the analysis runs (canonical grid inside)."""

    dataset: Dataset
    radiograph: preprocess.Radiograph
    source: SourceImage
    instances: SpineInstances | None = None
    vertebrae: list[Vertebra] = field(default_factory=list)
    fractures: list[FractureAssessment | None] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    implants: list[Implant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    graded: int = 0
    #: The vertebra model ships with heights and grades off (see `FractureStep`).
    grading_off: bool = False

    def point(self, p: Point) -> Point:
        """A canonical-grid point on the stored grid."""
        return self.radiograph.orientation.point_from_canonical(p, self.radiograph.pixels.shape)

    def result(self) -> ImageResult:
        """The `ImageResult` of this radiograph."""
        return ImageResult(
            source=self.source,
            vertebrae=tuple(self.vertebrae),
            implants=tuple(self.implants),
            findings=tuple(self.findings),
            measurements=tuple(self.measurements),
            notes=tuple(dict.fromkeys(self.notes)),
        )


class VertebraStep:
    """Vertebrae, sacrum and level names on one radiograph."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.info = registry.spec(MODEL_NAME).info

    def model(self) -> VertebraModel:
        """The loaded model (loaded once through the registry)."""
        return VertebraModel.from_registry(self.registry)

    def run(self, work: ImageWork) -> None:
        """Fill `work.instances` and `work.vertebrae` (fracture fields are filled by `FractureStep`)."""
        instances = self.model().analyse(work.radiograph)
        work.instances = instances
        work.notes.extend(instances.notes)
        if instances.view_inferred:
            work.source = _with_view(work.source, instances.view)
        if not instances.vertebrae:
            work.notes.append("no vertebra found on this image")


def _with_view(source: SourceImage, view: str | None) -> SourceImage:
    from dataclasses import replace

    return replace(source, view=view)


def chain_heights(
    net: torch.nn.Module | None, radiograph: preprocess.Radiograph, bodies: Sequence[VertebraInstance], anterior_sign: int | None
) -> list[morphometry.MeasuredHeights | None]:
    """Anterior, middle and posterior height of each body of a lateral chain (None on bodies cut by the image
    border).  With the six-point stage `net`: from the endplate points it places (the anterior side from
    `anterior_sign`, else read by the stage); without it: from the body silhouettes (needs `anterior_sign`)."""
    spacing = radiograph.pixel_spacing_mm
    out: list[morphometry.MeasuredHeights | None] = [None] * len(bodies)
    if net is None:
        if anterior_sign is None:
            return out
        axes = morphometry.spine_axes([b.centroid for b in bodies])
        for k, body in enumerate(bodies):
            if not body.touches_border:
                out[k] = morphometry.measure_heights(body.membership, body.offset, spacing, axes[k], anterior_sign)
        return out
    placed = endplates.place_points(net, radiograph.pixels, [b.centroid for b in bodies])
    # (A chain of one body gets no points: `placed` is empty and every height stays None.)
    for k, (body, p, high) in enumerate(zip(bodies, placed, endplates.anterior_is_high(placed, anterior_sign), strict=False)):
        if body.touches_border:
            continue
        h = endplates.heights_px(p, high, spacing)
        across = p.frame.across if high else (-p.frame.across[0], -p.frame.across[1])
        frame = morphometry.BodyFrame(body.centroid, across, p.frame.axis)
        out[k] = morphometry.MeasuredHeights(
            HeightMeasurement(*h["anterior"]), HeightMeasurement(*h["middle"]), HeightMeasurement(*h["posterior"]),
            calibrated=spacing is not None, frame=frame,
        )
    return out


class FractureStep:
    """Heights and Genant grades on lateral views; notes why not on others.

    `enabled` comes from the vertebra model's ``fracture_grading`` metadata: a model whose evaluation showed
    heights and grades no better than chance ships with them off, so no study is flagged (or cleared) by noise."""

    def __init__(self, enabled: bool = True, model: Callable[[], VertebraModel] | None = None) -> None:
        self.enabled = enabled
        #: The vertebra model (loaded on first use): its six-point stage measures heights when it has one.
        self.model = model

    def run(self, work: ImageWork) -> None:
        """Fill `work.vertebrae`, `work.findings`, `work.measurements` from `work.instances`."""
        inst = work.instances
        assert inst is not None
        bodies = inst.vertebrae
        heights: list[morphometry.MeasuredHeights | None] = [None] * len(bodies)
        net = self.model().endplates if (self.model is not None and self.enabled) else None
        # The six-point stage reads the anterior side itself; the silhouette method needs it given.
        can_grade = self.enabled and inst.view == "LAT" and (inst.anterior_sign is not None or net is not None)
        work.grading_off = not self.enabled
        if not can_grade:
            work.notes = [n for n in work.notes if n not in preprocess.HEIGHT_SCALE_NOTES]
        if not self.enabled and bodies:
            work.notes.append(
                "vertebral heights and fracture grades are switched off for this model version (unreliable in "
                "its evaluation, see its model card): fractures not assessed"
            )
        elif inst.view != "LAT" and bodies:
            work.notes.append(
                f"{inst.view or 'unknown'} view: compression fractures are graded on lateral views only"
            )
        elif inst.view == "LAT" and inst.anterior_sign is None and bodies and net is None:
            work.notes.append("lateral view but anterior side unknown: heights and grades not given")
        spacing = work.radiograph.pixel_spacing_mm
        if can_grade:
            # The stage reads the anterior side better than the posterior-element rule (card), so it only
            # takes the header's word.
            sign = work.radiograph.anterior_sign if net is not None else inst.anterior_sign
            heights = chain_heights(net, work.radiograph, bodies, sign)
            if net is not None and sign is None and any(heights):
                work.notes.append("anterior side not in the header: read by the morphometry network")
            if spacing is None and any(heights):
                work.notes.append("no pixel spacing: fractures graded from height ratios, heights not given in mm")
        values = [h.values() if h and all(v is not None for v in h.values()) else None for h in heights]
        grades = morphometry.grade_fractures(values) if can_grade else [None] * len(bodies)  # type: ignore[arg-type]
        work.graded = sum(1 for g in grades if g is not None)
        cut = sum(1 for b in bodies if b.touches_border)
        if can_grade and cut:
            work.notes.append(f"{cut} vertebra(e) cut by the image border: not graded")
        for body, h, grade in zip(bodies, heights, grades, strict=True):
            work.vertebrae.append(self._vertebra(work, body, h, grade))
            if grade is not None and grade.grade > GenantGrade.NORMAL:
                v = work.vertebrae[-1]
                work.findings.append(
                    Finding(
                        kind=FindingKind.VERTEBRAL_COMPRESSION_FRACTURE,
                        severity=GRADE_SEVERITY[grade.grade],
                        levels=(body.level,) if body.level else (),
                        evidence=v.outline,
                        description=(
                            f"{v.display_name}: {grade.shape.value} compression deformity, Genant grade "
                            f"{int(grade.grade)} ({GRADE_SEVERITY[grade.grade].value}), {grade.height_loss_pct:.0f}% height loss"
                        ),
                        sop_instance_uid=work.source.sop_instance_uids[0],
                    )
                )
                work.measurements.append(
                    Measurement(
                        kind=MeasurementKind.HEIGHT_LOSS,
                        value=grade.height_loss_pct,
                        unit="%",
                        method=grade.method,
                        levels=(body.level,) if body.level else (),
                        evidence=v.outline,
                    )
                )
        if inst.sacrum is not None:
            work.vertebrae.append(self._vertebra(work, inst.sacrum, None, None))

    def _vertebra(
        self, work: ImageWork, body: VertebraInstance, heights: morphometry.MeasuredHeights | None, grade: FractureAssessment | None
    ) -> Vertebra:
        canonical_shape = work.radiograph.pixels.shape
        mask = mask_to_stored(work.radiograph.orientation, canonical_shape, body.offset, body.mask)
        outline = tuple(work.point(p) for p in outline_points(body.mask, body.offset))
        result_heights = None
        if heights is not None and heights.calibrated:
            from dataclasses import replace

            def moved(m):  # noqa: ANN001, ANN202
                return None if m is None else replace(m, start=work.point(m.start), end=work.point(m.end))

            result_heights = VertebralHeights(moved(heights.anterior), moved(heights.middle), moved(heights.posterior))
        return Vertebra(
            level=body.level,
            mask=mask,
            outline=outline if len(outline) >= 3 else (),
            centroid=work.point(body.centroid),
            heights=result_heights,
            fracture=grade,
            score=float(body.score),
        )


# --------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class HardwareOutcome:
    """What a hardware step found on one radiograph."""

    implants: tuple[Implant, ...] = ()
    findings: tuple[Finding, ...] = ()
    status: HardwareStatus = HardwareStatus.NOT_ASSESSABLE
    instrumentation: str = ""
    #: Vertebrae the pedicle screws span on the vertebra chain (named or not); None when unknown.
    vertebrae_spanned: int | None = None
    notes: tuple[str, ...] = ()
    #: Why the status is "not assessable" (e.g. implants reaching the image edge); joins the verdict's reasons.
    reasons: tuple[str, ...] = ()
    #: View of the image ("AP", "PA", "LAT"): a frontal view's instrumentation text is preferred (counts).
    view: str | None = None
    #: Complications the model did not look for on this image's implants (e.g. "screw loosening"): an
    #: "intact" verdict says so, so that it is not read as "the screws are not loose".
    not_assessed: tuple[str, ...] = ()


class HardwareStep(Protocol):
    """The implant model's step (built by a factory registered with `register_hardware_step`)."""

    info: ModelInfo

    def run(self, radiograph: preprocess.Radiograph, vertebrae: Sequence[Vertebra], source: SourceImage) -> HardwareOutcome:
        """Implants on one radiograph (stored grid), given the vertebrae already found there."""
        ...


HardwareFactory = Callable[[ModelRegistry], "HardwareStep | None"]
_HARDWARE_FACTORIES: list[HardwareFactory] = []
_HARDWARE_MODULES = ("inference.radiograph.hardware",)


def register_hardware_step(factory: HardwareFactory) -> None:
    """Add the hardware step to "spine-xr"; the factory returns None when its model is not installed."""
    if factory not in _HARDWARE_FACTORIES:
        _HARDWARE_FACTORIES.append(factory)


def _hardware_step(registry: ModelRegistry) -> HardwareStep | None:
    for module in _HARDWARE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    for factory in _HARDWARE_FACTORIES:
        step = factory(registry)
        if step is not None:
            return step
    return None


def _combine_hardware(outcomes: Sequence[HardwareOutcome], labels: Sequence[str]) -> tuple[HardwareStatus | None, str]:
    """The study's hardware status and its construct sentence; with several images the sentence says which
    image it was counted on (a lateral's SC showed the frontal view's counts beside its own key).  `labels`
    names each outcome's image, one per outcome at least (see `combine_verdict`)."""
    if not outcomes:
        return None, ""
    statuses = {o.status for o in outcomes}
    # Metal that one image could not assess outweighs another image showing none; an intact construct seen
    # on one view stays "intact" (the other view's reasons still reach the verdict).
    for status in (HardwareStatus.POSSIBLE_COMPLICATION, HardwareStatus.INTACT, HardwareStatus.NOT_ASSESSABLE,
                   HardwareStatus.NO_IMPLANTS):
        if status in statuses:
            chosen = status
            break
    else:
        chosen = HardwareStatus.NOT_ASSESSABLE
    described = [(o, label) for o, label in zip(outcomes, labels, strict=False) if o.instrumentation]
    frontal = [(o, label) for o, label in described if o.view != "LAT"]
    if not described:
        return chosen, ""
    outcome, label = (frontal or described)[0]
    text = outcome.instrumentation + (f" (counted on the {label})" if len(outcomes) > 1 and label else "")
    return chosen, text


def _hardware_reasons(outcomes: Sequence[HardwareOutcome], labels: Sequence[str]) -> list[str]:
    several = len(outcomes) > 1
    reasons = [f"{label}: {r}" if several and label else r for o, label in zip(outcomes, labels, strict=False)
               if o.status is HardwareStatus.NOT_ASSESSABLE for r in o.reasons]
    judged = (HardwareStatus.INTACT, HardwareStatus.POSSIBLE_COMPLICATION)
    unassessed = list(dict.fromkeys(c for o in outcomes if o.status in judged for c in o.not_assessed))
    if unassessed:
        reasons.append(f"hardware: {', '.join(unassessed)} not assessed by this model version")
    return reasons


# ---------------------------------------------------------------------------------------- verdict


def combine_verdict(
    works: Sequence[ImageWork], hardware: Sequence[HardwareOutcome] | None, skipped: Sequence[str]
) -> ScreeningVerdict:
    """The study's screening verdict from every image's fracture outcome and the hardware outcome.

    * finding present: any compression deformity (Genant >= 1) or hardware complication;
    * no finding: a lateral view with at least `MIN_GRADED_FOR_NO_FINDING` graded bodies and no finding
      (and, when a hardware model ran, hardware not in doubt);
    * not assessable otherwise, with the reasons.
    """
    reasons: list[str] = []
    # Hardware findings were added to their image's findings by the analysis.
    findings = [f for w in works for f in w.findings]
    # One hardware outcome per image, in the images' order (an outcome without its image gets no label).
    labels = [w.source.label for w in works]
    labels += [""] * (len(hardware or ()) - len(labels))
    hw_status, instrumentation = _combine_hardware(hardware or (), labels)
    for f in findings:
        reasons.append(f.description or f.kind.value)
    graded = [w for w in works if w.graded >= MIN_GRADED_FOR_NO_FINDING]
    if findings:
        outcome = ScreeningOutcome.FINDING_PRESENT
    elif graded and hw_status is HardwareStatus.NOT_ASSESSABLE:
        # A postoperative screen is not "negative" while metal in the image could not be judged.
        outcome = ScreeningOutcome.NOT_ASSESSABLE
        reasons.append("hardware not assessable")
    elif graded:
        outcome = ScreeningOutcome.NO_FINDING
        for w in graded:
            levels = [v.level for v in w.vertebrae if v.fracture is not None and v.level]
            span = level_span(levels) if levels else f"{w.graded} vertebrae (levels unknown)"
            reasons.append(f"no compression deformity on the lateral view ({span} graded)")
    else:
        outcome = ScreeningOutcome.NOT_ASSESSABLE
        if not works:
            reasons.append("no radiograph of the study could be analysed" if skipped else "no radiograph (DX/CR) in the study")
        for w in works:
            if w.instances is None or not w.instances.vertebrae:
                reasons.append(f"{w.source.label}: no vertebra found")
            elif w.grading_off:
                reasons.append(f"{w.source.label}: fractures not assessed (grading switched off for this model version)")
            elif w.instances.view != "LAT":
                reasons.append(f"{w.source.label}: {w.instances.view or 'unknown'} view, fractures are graded on lateral views")
            else:
                reasons.append(f"{w.source.label}: too few vertebrae could be graded ({w.graded})")
    if hardware is None:
        reasons.append("hardware not assessed: no hardware model installed")
    else:
        # Every image whose hardware could not be judged says why, whatever the study's status, and what a
        # judged one was not checked for.
        reasons.extend(_hardware_reasons(hardware, labels))
    reasons.extend(skipped)
    return ScreeningVerdict(outcome=outcome, reasons=tuple(dict.fromkeys(reasons)), hardware=hw_status, instrumentation=instrumentation)


# --------------------------------------------------------------------------------------- analysis


def source_image(ds: Dataset, radiograph: preprocess.Radiograph) -> SourceImage:
    """`SourceImage` (stored grid) of one radiograph dataset."""
    spacing, source, _ = preprocess.pixel_spacing(ds)
    return SourceImage(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uids=(str(ds.SOPInstanceUID),),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=spacing,
        spacing_source=source,
        view=radiograph.view,
        modality=str(ds.get("Modality", "")),
        series_number=_number(ds, "SeriesNumber"),
        instance_number=_number(ds, "InstanceNumber"),
    )


def _number(ds: Dataset, keyword: str) -> int | None:
    """An IS attribute as an int, None when absent, empty or not a number (it is type 2 or 3)."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class SpineXrAnalysis:
    """The "spine-xr" analysis (see the module docstring)."""

    name = ANALYSIS_NAME

    def __init__(self, registry: ModelRegistry) -> None:
        try:
            self.vertebra_step = VertebraStep(registry)
        except ModelError as exc:
            raise AnalysisError(f"{ANALYSIS_NAME}: {exc}") from exc
        self.fracture_step = FractureStep(
            enabled=bool(registry.spec(MODEL_NAME).metadata.get("fracture_grading", True)), model=self.vertebra_step.model
        )
        self.hardware_step = _hardware_step(registry)

    def models(self) -> tuple[ModelInfo, ...]:
        """Vertebra model (and hardware model when installed); loads them."""
        self.vertebra_step.model()
        infos = [self.vertebra_step.info]
        if self.hardware_step is not None:
            infos.append(self.hardware_step.info)
        return tuple(infos)

    def run(self, datasets: Sequence[Dataset]) -> StudyResult:
        """Analyse the radiographs of one study."""
        if not datasets:
            raise AnalysisError(f"{ANALYSIS_NAME}: no instances given")
        study_uids = {str(ds.StudyInstanceUID) for ds in datasets}
        if len(study_uids) != 1:
            raise AnalysisError(f"{ANALYSIS_NAME}: instances of several studies given: {', '.join(sorted(study_uids))}")
        study_uid = study_uids.pop()
        works: list[ImageWork] = []
        skipped: list[str] = []
        for ds in datasets:
            uid = str(ds.get("SOPInstanceUID", "?"))
            modality = str(ds.get("Modality", "")).upper()
            if modality not in RADIOGRAPH_MODALITIES:
                skipped.append(f"instance {uid} skipped: modality {modality or 'missing'} is not a radiograph")
                continue
            rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            if rows * columns > MAX_PIXELS:
                skipped.append(f"instance {uid} skipped: {rows} x {columns} pixels, more than the "
                               f"{MAX_PIXELS // 1_000_000} million this analysis reads")
                continue
            frames = int(ds.get("NumberOfFrames") or 1)
            if frames > 1:
                # Which frame is the radiograph is not said anywhere, and the outputs reference whole images.
                skipped.append(f"instance {uid} skipped: a multi-frame radiograph ({frames} frames) is not analysed")
                continue
            try:
                radiograph = preprocess.decode(ds)
            except Exception as exc:  # noqa: BLE001 - one undecodable image (a LUT pydicom cannot apply ...) skips
                # that image, with the reason, never the study's other images
                detail = str(exc) if isinstance(exc, preprocess.PreprocessError) else f"{type(exc).__name__}: {exc}"
                skipped.append(f"instance {uid} skipped: pixel data could not be read ({detail})")
                continue
            work = ImageWork(ds, radiograph, source_image(ds, radiograph), notes=list(radiograph.notes))
            self.vertebra_step.run(work)
            self.fracture_step.run(work)
            works.append(work)
        hardware: list[HardwareOutcome] | None = None
        if self.hardware_step is not None:
            hardware = []
            for work in works:
                outcome = self.hardware_step.run(work.radiograph, work.vertebrae, work.source)
                work.implants.extend(outcome.implants)
                work.findings.extend(outcome.findings)
                work.notes.extend(outcome.notes)
                hardware.append(outcome)
        verdict = combine_verdict(works, hardware, skipped)
        return StudyResult(
            study_instance_uid=study_uid,
            analysis=ANALYSIS_NAME,
            models=self.models(),
            images=tuple(w.result() for w in works),
            verdict=verdict,
        )


analyses.register(ANALYSIS_NAME, SpineXrAnalysis)
