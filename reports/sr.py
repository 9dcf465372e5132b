"""TID 1500 Measurement Report (Comprehensive 3D SR) of one analysis of one study.

Content, in the order a reader meets it in a plain SR text view:

* observer context: the node as a device (TID 1004);
* one Measurement Group per vertebra (TID 1410): tracking identifier ("L3", or "vertebra 2 (level
  unknown)"), tracking UID, finding "Vertebra" at finding site "L3 vertebra", the outline as SCOORD
  POLYLINE (closed, SCOORD's polygon) on the source image, anterior/middle/posterior heights in mm,
  the height loss, the Genant grade and morphology; the centroid follows as a
  SCOORD POINT "Center" (TID 1410 is extensible);
* one group per implant: finding = implant kind, finding site = level(s) with laterality, outline,
  complications;
* one group per image finding and per named measurement (Cobb angle ...), with its evidence;
* the study-level "Qualitative Evaluations" container (TID 1500 row 12): the screening verdict,
  its reasons, the hardware verdict, instrumentation, study findings and the models that ran.

For a CT/MR series the regions lie on the slice where the structure is largest, outlined from its
mask, and reference that slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from inference.results import (
    Finding,
    FractureShape,
    HeightMeasurement,
    ImageResult,
    Implant,
    Measurement,
    Point,
    Side,
    StudyResult,
    Vertebra,
)
from reports import codes, geometry, style
from reports.common import (
    CHARACTER_SET,
    OutputKind,
    Producer,
    SopReference,
    apply_equipment,
    apply_identity,
    apply_series,
    as_list,
    declare_private_scheme,
    fit_lo,
    institution_name,
    models_text,
    plain,
    series_uid,
    sr_uid,
    tracking_uid,
)
from reports.uids import derive_uid

_REL = hd.sr.RelationshipTypeValues
#: A TID 1500 measurement group of this report: with an image region (TID 1410) or without (TID 1501).
_Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


def _closed(points: Sequence[Point]) -> np.ndarray:
    data = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if len(data) and not np.array_equal(data[0], data[-1]):
        data = np.vstack([data, data[:1]])
    return data


class _Regions:
    """Where one image's structures are drawn: the source instance and points of each region."""

    def __init__(self, image: ImageResult, sources: Sequence[Dataset]) -> None:
        self.image = image
        self.sources = list(sources)

    def source_ref(self, frame_index: int = 0) -> tuple[str, str]:
        ds = self.sources[frame_index]
        return str(ds.SOPClassUID), str(ds.SOPInstanceUID)

    def outline(self, mask_outline: Sequence[Point], item: Vertebra | Implant) -> tuple[int, np.ndarray] | None:
        """(source index, closed polygon) of a structure; None when it has no drawable outline."""
        if self.image.source.is_volume:
            cut = geometry.largest_slice_outline(item.mask)
            if cut is None:
                return None
            index, polygon = cut
            return index, _closed(polygon)
        if len(mask_outline) >= 3:
            return 0, _closed(mask_outline)
        polygon = geometry.mask_outline(item.mask)
        return (0, _closed(polygon)) if polygon else None

    def centroid(self, item: Vertebra | Implant, index: int) -> Point:
        if self.image.source.is_volume:
            return geometry.slice_centroid(item.mask, index) or item.centroid
        return item.centroid


def _image_region(regions: _Regions, index: int, graphic_type: str, data: np.ndarray) -> hd.sr.ImageRegion:
    sop_class, sop_uid = regions.source_ref(index)
    return hd.sr.ImageRegion(
        graphic_type=graphic_type,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion(sop_class, sop_uid),
    )


def _scoord(regions: _Regions, index: int, name: Code, graphic_type: str, data: np.ndarray) -> Dataset:
    sop_class, sop_uid = regions.source_ref(index)
    item = hd.sr.ScoordContentItem(
        name=name,
        graphic_type=graphic_type,
        graphic_data=data,
        relationship_type=_REL.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence([hd.sr.SourceImageForRegion(sop_class, sop_uid)])
    return item


def _height(name: Code, height: HeightMeasurement | None,
            algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement | None:
    # TID 1419 (the measurements of a TID 1410 group) refers to the group's region and has no row for
    # a per-measurement SCOORD, so the measured line is drawn by the SC and the presentation state only.
    if height is None:
        return None
    return hd.sr.Measurement(
        name=name,
        value=round(float(height.value_mm), 2),
        unit=codes.UNIT_MM,
    )


def _algorithm(result: StudyResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.analysis,
        version=fit_lo(models_text(result.models)),
        family=codes.ALGORITHM_FAMILY,
    )


def _tracking(image: ImageResult, what: str, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=tracking_uid(image, what, label),
        identifier=plain(label),
    )


def _vertebra_group(regions: _Regions, item: style.Ordered, label: str,
                    algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    v = item.vertebra
    placed = regions.outline(v.outline, v)
    if placed is None:
        return None
    index, polygon = placed
    measurements: list[hd.sr.Measurement] = []
    if v.heights is not None and not regions.image.source.is_volume:
        for name, h in ((codes.ANTERIOR_HEIGHT, v.heights.anterior), (codes.MIDDLE_HEIGHT, v.heights.middle),
                        (codes.POSTERIOR_HEIGHT, v.heights.posterior)):
            m = _height(name, h, algorithm)
            if m is not None:
                measurements.append(m)
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    loss = round(float(v.fracture.height_loss_pct), 1) if v.fracture is not None else 0.0
    if loss > 0.0:
        # A loss of exactly 0 is left out: OHIF 3.13 prints a zero NUM as an empty value ("%").
        measurements.append(hd.sr.Measurement(name=codes.HEIGHT_LOSS, value=loss, unit=codes.UNIT_PERCENT))
    if v.fracture is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.GENANT_GRADE, codes.genant_code(v.fracture.grade)))
        if v.fracture.shape is not FractureShape.NONE or v.fracture.grade == 0:
            evaluations.append(hd.sr.QualitativeEvaluation(codes.FRACTURE_SHAPE, codes.shape_code(v.fracture.shape)))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(regions.image, "vertebra", label),
        referenced_region=_image_region(regions, index, "POLYLINE", polygon),
        finding_type=codes.VERTEBRA,
        finding_category=codes.ANATOMICAL_STRUCTURE,
        # An unnamed vertebra has no site beyond the finding itself ("Vertebra"): a generic "Spine" site was
        # OHIF's label for every outline ("363698007: Spine" twenty times over the image, seen with the viewer).
        finding_sites=[hd.sr.FindingSite(codes.vertebra_code(v.level))] if v.level else None,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
    )
    cx, cy = regions.centroid(v, index)
    _append(group, _scoord(regions, index, codes.CENTER, "POINT", np.asarray([[cx, cy]], dtype=np.float32)))
    return group


def _append(group: _Group, item: Dataset) -> None:
    group[0].ContentSequence.append(item)


def _implant_sites(implant: Implant) -> list[hd.sr.FindingSite]:
    laterality = codes.laterality_code(implant.side)
    modifier = codes.MIDLINE if implant.side is Side.MIDLINE else None
    levels = implant.levels or ()
    if not levels:
        return [hd.sr.FindingSite(codes.SPINE, laterality=laterality, topographical_modifier=modifier)]
    return [hd.sr.FindingSite(codes.vertebra_code(level), laterality=laterality, topographical_modifier=modifier)
            for level in levels]


def _implant_group(regions: _Regions, implant: Implant, label: str,
                   algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    placed = regions.outline(implant.outline, implant)
    if placed is None:
        return None
    index, polygon = placed
    # "No complications" only where the model looked for one: an implant none of whose failure modes was
    # assessed gets no Complications item (the verdict says "not assessable" and why).
    if implant.complications:
        evaluations = [hd.sr.QualitativeEvaluation(codes.COMPLICATIONS, codes.complication_code(c))
                       for c in implant.complications]
    elif implant.assessed:
        evaluations = [hd.sr.QualitativeEvaluation(codes.COMPLICATIONS, codes.NO_COMPLICATIONS)]
    else:
        evaluations = []
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(regions.image, "implant", label),
        referenced_region=_image_region(regions, index, "POLYLINE", polygon),
        finding_type=codes.implant_code(implant.kind),
        finding_category=codes.PHYSICAL_OBJECT,
        finding_sites=_implant_sites(implant),
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations or None,
    )
    cx, cy = regions.centroid(implant, index)
    _append(group, _scoord(regions, index, codes.CENTER, "POINT", np.asarray([[cx, cy]], dtype=np.float32)))
    return group


def _finding_sites(levels: Sequence[str]) -> list[hd.sr.FindingSite] | None:
    return [hd.sr.FindingSite(codes.vertebra_code(level)) for level in levels] or None


def _finding_label(finding: Finding, ordinal: int) -> str:
    where = f" {style.level_text(finding.levels)}" if finding.levels else ""
    return f"finding {ordinal}: {finding.kind.value}{where}"


def _finding_group(regions: _Regions, finding: Finding, ordinal: int, result: StudyResult,
                   algorithm: hd.sr.AlgorithmIdentification) -> _Group:
    label = _finding_label(finding, ordinal)
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(result.study_instance_uid, "finding", label, *finding.levels), identifier=plain(label))
    evaluations = [hd.sr.QualitativeEvaluation(codes.SEVERITY, codes.severity_code(finding.severity))]
    finding_type = codes.finding_code(finding.kind)
    finding_sites = _finding_sites(finding.levels)
    group: _Group
    index = _evidence_index(regions, finding)
    if index is not None and len(finding.evidence) >= 3:
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=_image_region(regions, index, "POLYLINE", _closed(finding.evidence)),
            tracking_identifier=tracking, finding_type=finding_type, finding_sites=finding_sites,
            algorithm_id=algorithm, qualitative_evaluations=evaluations)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=finding_type, finding_sites=finding_sites,
            algorithm_id=algorithm, qualitative_evaluations=evaluations)
    if finding.description:
        _append(group, hd.sr.TextContentItem(codes.COMMENT, fit_lo(finding.description, 1024), _REL.CONTAINS))
    return group


def _evidence_index(regions: _Regions, finding: Finding) -> int | None:
    uids = [str(ds.SOPInstanceUID) for ds in regions.sources]
    if finding.sop_instance_uid:
        return uids.index(finding.sop_instance_uid) if finding.sop_instance_uid in uids else None
    return 0


def _measurement_group(regions: _Regions, measurement: Measurement,
                       algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    where = f" {style.level_text(measurement.levels)}" if measurement.levels else ""
    label = f"{measurement.kind.value}{where}"
    sop_class, sop_uid = regions.source_ref(0)
    coordinates = None
    if len(measurement.evidence) >= 2:
        coordinates = [hd.sr.CoordinatesForMeasurement(
            graphic_type="POLYLINE",
            graphic_data=np.asarray(measurement.evidence, dtype=np.float32),
            source_image=hd.sr.SourceImageForRegion(sop_class, sop_uid),
        )]
    num = hd.sr.Measurement(
        name=codes.measurement_code(measurement.kind),
        value=round(float(measurement.value), 2),
        unit=codes.unit_code(measurement.unit),
        referenced_coordinates=coordinates,
        referenced_images=None if coordinates else [hd.sr.SourceImageForMeasurement(sop_class, sop_uid)],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(sop_uid, "measurement", label), identifier=plain(label)),
        finding_sites=_finding_sites(measurement.levels),
        algorithm_id=algorithm,
        measurements=[num],
    )
    if measurement.method:
        _append(group, hd.sr.TextContentItem(codes.COMMENT, fit_lo(f"Method: {measurement.method}", 1024), _REL.CONTAINS))
    return group


def _study_evaluations(result: StudyResult) -> Dataset:
    """TID 1500 row 12: verdict, reasons, hardware, instrumentation, study findings, models."""
    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_REL.CONTAINS)
    items: list[hd.sr.ContentItem] = []
    verdict = result.verdict
    items.append(hd.sr.CodeContentItem(codes.OVERALL_ASSESSMENT, codes.outcome_code(verdict.outcome), _REL.CONTAINS))
    for reason in verdict.reasons:
        items.append(hd.sr.TextContentItem(codes.REASON, fit_lo(reason, 1024), _REL.CONTAINS))
    if verdict.hardware is not None:
        items.append(hd.sr.CodeContentItem(codes.IMPLANT_FINDING, codes.hardware_code(verdict.hardware), _REL.CONTAINS))
    if verdict.instrumentation:
        items.append(hd.sr.TextContentItem(codes.INSTRUMENTATION, fit_lo(verdict.instrumentation, 1024), _REL.CONTAINS))
    for finding in result.findings:
        item = hd.sr.CodeContentItem(codes.FINDING, codes.finding_code(finding.kind), _REL.CONTAINS)
        children = [hd.sr.CodeContentItem(codes.SEVERITY, codes.severity_code(finding.severity), _REL.HAS_CONCEPT_MOD)]
        children += [hd.sr.CodeContentItem(codes.FINDING_SITE, codes.vertebra_code(level), _REL.HAS_CONCEPT_MOD)
                     for level in finding.levels]
        item.ContentSequence = hd.sr.ContentSequence(children)
        items.append(item)
        if finding.description:
            items.append(hd.sr.TextContentItem(codes.COMMENT, fit_lo(finding.description, 1024), _REL.CONTAINS))
    for image in result.images:
        # With several images, each note says which image it is about ("screw loosening not assessed" on one).
        where = f"{image.source.label}: " if len(result.images) > 1 else ""
        for note in image.notes:
            items.append(hd.sr.TextContentItem(codes.IMAGE_NOTE, fit_lo(where + note, 1024), _REL.CONTAINS))
    for model in result.models:
        items.append(hd.sr.TextContentItem(codes.MODEL, f"{model.name} {model.version}", _REL.CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _observation_context(producer: Producer) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.OBSERVER_DEVICE,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=producer.device_uid,
                name=producer.model_name,
                manufacturer_name=producer.manufacturer,
                model_name=producer.model_name,
                serial_number=producer.device_serial_number,
            ),
        )
    )


def build_sr(
    result: StudyResult,
    images: Sequence[tuple[ImageResult, Sequence[Dataset]]],
    *,
    producer: Producer,
    predecessor: SopReference | None = None,
    evidence: Sequence[Dataset] = (),
) -> Dataset:
    """The study's TID 1500 report over `images` (each analysed image with its source datasets); with no
    image analysed, over the study's `evidence` (the verdict and its reasons, no measurement)."""
    algorithm = _algorithm(result)
    groups: list[_Group] = []
    ordinal = 0
    all_sources: list[Dataset] = []
    for image, sources in images:
        all_sources.extend(sources)
        regions = _Regions(image, sources)
        for item in style.ordered_vertebrae(image.vertebrae):
            group = _vertebra_group(regions, item, item.label, algorithm)
            if group is not None:
                groups.append(group)
        seen: dict[str, int] = {}
        # Numbered from the top of the image down, as a reader counts them ("pedicle screw left (3)" between
        # (1) and (2) sent readers looking for the wrong screw).
        for implant in sorted(image.implants, key=lambda i: (i.centroid[1], i.centroid[0])):
            label = implant.display_name
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label} ({seen[label]})"
            group = _implant_group(regions, implant, label, algorithm)
            if group is not None:
                groups.append(group)
        for finding in image.findings:
            ordinal += 1
            groups.append(_finding_group(regions, finding, ordinal, result, algorithm))
        for measurement in image.measurements:
            groups.append(_measurement_group(regions, measurement, algorithm))
    if not groups:
        # TID 1500 needs one measurement group: record that the analysis ran and found nothing drawable.
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(result.study_instance_uid, "tracking", "analysis"), identifier="analysis"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                codes.OVERALL_ASSESSMENT, codes.outcome_code(result.verdict.outcome))],
        ))
    if not all_sources:
        all_sources = list(evidence)
    if not all_sources:
        raise ValueError("a report needs the study's instances: no image analysed and no evidence given")
    modality = str(all_sources[0].get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(producer),
        procedure_reported=codes.procedure_code(modality),
        imaging_measurements=groups,
        # TID 1500 row 5: the Image Library lists the images the report's coordinates refer to (dcmtk's TID 1500
        # check refuses a report without it).
        referenced_images=_library_images(all_sources),
    )
    report[0].ContentSequence.append(_study_evaluations(result))
    source = all_sources[0]
    sr = hd.sr.Comprehensive3DSR(
        specific_character_set=CHARACTER_SET,  # not the source's: see CHARACTER_SET
        evidence=all_sources,
        content=report[0],
        series_instance_uid=series_uid(result, OutputKind.SR),
        series_number=1,  # replaced by apply_series
        sop_instance_uid=sr_uid(result, [str(ds.SOPInstanceUID) for ds in all_sources] if not images else ()),
        instance_number=1,
        manufacturer=producer.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name(source, producer),
    )
    apply_identity(sr, source)
    apply_equipment(sr, source, producer)
    apply_series(sr, OutputKind.SR)
    # A re-analysis of the same instances derives the same UID: a document is never its own predecessor.
    if predecessor is not None and predecessor.sop_instance_uid != sr.SOPInstanceUID:
        # highdicom's constructor sets a list, so mypy infers list[Dataset]; pydicom takes a Sequence as well
        sr.PredecessorDocumentsSequence = DicomSequence([_hierarchical_reference(predecessor)])  # type: ignore[assignment]
    declare_private_scheme(sr)
    return sr


#: What highdicom's Image Library entry (TID 1602-1604) reads from an image of each kind of modality.
_LIBRARY_NEEDS = {
    ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"): (("PatientOrientation", 2), ("ImagerPixelSpacing", 2)),
    ("CT", "MR", "PT"): (("PixelSpacing", 2), ("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("SliceThickness", 1)),
}


def _library_images(sources: Sequence[Dataset]) -> list[Dataset] | None:
    """The sources for the Image Library, or None (no library) when one lacks what its entry describes: a CR
    may leave PatientOrientation empty and need not give ImagerPixelSpacing, a header may hold a spacing that
    is no number, and the report must still be made."""
    for ds in sources:
        for modalities, needs in _LIBRARY_NEEDS.items():
            if ds.get("Modality") in modalities and not all(_describes(ds, keyword, n) for keyword, n in needs):
                return None
    return list(sources)


def _describes(ds: Dataset, keyword: str, n: int) -> bool:
    """`keyword` of `ds` holds `n` values an Image Library entry can carry (numbers, or for PatientOrientation
    non-empty letters)."""
    try:
        values = as_list(ds.get(keyword))
        if keyword != "PatientOrientation":
            values = [v for v in values if np.isfinite(float(v))]
    except (TypeError, ValueError):
        return False
    return len(values) == n and all(str(v).strip() for v in values)


def _hierarchical_reference(ref: SopReference) -> Dataset:
    sop = Dataset()
    sop.ReferencedSOPClassUID = ref.sop_class_uid
    sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = ref.series_instance_uid
    series.ReferencedSOPSequence = DicomSequence([sop])
    study = Dataset()
    study.StudyInstanceUID = ref.study_instance_uid
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study
