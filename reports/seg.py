"""DICOM Segmentation of one analysed image: one segment per vertebra level and per implant class.

Projection radiographs (DX, CR ...) have no patient coordinate system, and highdicom rightly writes
their SEG with Derivation Image references only.  OHIF 3.13 (@cornerstonejs/adapters) however reads
``PlaneOrientationSequence`` of every SEG unconditionally and hangs on "Loading SEG..." without it.
The SEG IOD allows the Plane Orientation/Position (Patient) functional groups to be present when
there is no Frame of Reference ("may be present otherwise", PS3.3 A.51.5.1), so for a radiograph
the encoder adds them with the values a viewer assumes for an image without geometry: row/column
directions (1,0,0)/(0,1,0) and the origin at (0,0,0).  The frames still reference their source
image explicitly (Derivation Image + Referenced Image), which is what ties them to the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from inference.results import ImageResult, ImplantKind, RegionMask, StudyResult
from reports import codes, style
from reports.common import (
    CHARACTER_SET,
    DISCLAIMER,
    OutputKind,
    OutputOptions,
    Producer,
    apply_equipment,
    apply_identity,
    apply_series,
    as_list,
    copy_image_attributes,
    declare_private_scheme,
    fit_lo,
    image_output_uid,
    image_series_uid,
    models_text,
    tracking_uid,
)
from reports.uids import derive_uid

#: Series/image attributes a SEG of a radiograph copies from its source (dciodvfy wants
#: PatientOrientation, Type 2C in General Image, when there is no Image Orientation).
_RADIOGRAPH_ATTRIBUTES = ("PatientOrientation", "BodyPartExamined", "Laterality")
_VOLUME_ATTRIBUTES = ("BodyPartExamined", "Laterality")

#: What a viewer assumes for an image without geometry (see the module docstring).
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
DEFAULT_POSITION = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment before encoding: its number, label, codes, colour and mask."""

    number: int
    label: str
    category: Code
    property_type: Code
    colour: style.RGB
    masks: tuple[RegionMask, ...]
    tracking_id: str
    anatomic_region: Code | None = None
    #: The implant class of an implant segment (None: anatomy).
    kind: ImplantKind | None = None


def segment_specs(image: ImageResult) -> list[SegmentSpec]:
    """Segments of one image in reading order: vertebrae cranial to caudal, then implant classes."""
    specs: list[SegmentSpec] = []
    for item in style.ordered_vertebrae(image.vertebrae):
        if item.vertebra.mask.empty:
            continue
        label = item.label
        specs.append(SegmentSpec(
            number=len(specs) + 1,
            label=label,
            category=codes.ANATOMICAL_STRUCTURE,
            property_type=codes.vertebra_code(item.vertebra.level),
            colour=style.vertebra_colour(item.vertebra),
            masks=(item.vertebra.mask,),
            tracking_id=label,
            anatomic_region=codes.SPINE,
        ))
    for kind in ImplantKind:
        members = tuple(i.mask for i in image.implants if i.kind is kind and not i.mask.empty)
        if not members:
            continue
        label = style.IMPLANT_CLASS_LABELS[kind]
        specs.append(SegmentSpec(
            number=len(specs) + 1,
            label=label,
            category=codes.PHYSICAL_OBJECT,
            property_type=codes.implant_code(kind),
            colour=style.implant_colour(kind),
            masks=members,
            tracking_id=label,
            kind=kind,
        ))
    return specs


def _paint(target: np.ndarray, mask: RegionMask) -> None:
    if mask.array.size:
        target[mask.slices()] |= mask.array


def _stacked(specs: Sequence[SegmentSpec], grid: tuple[int, ...], frames: slice) -> np.ndarray:
    """BINARY input: (frames, rows, columns, segments), uint8 0/1."""
    n_frames = frames.stop - frames.start
    out = np.zeros((n_frames, *grid[-2:], len(specs)), dtype=np.uint8)
    for s, spec in enumerate(specs):
        dense = np.zeros(grid, dtype=bool)
        for mask in spec.masks:
            _paint(dense, mask)
        if len(grid) == 2:
            dense = dense[np.newaxis]
        out[..., s] = dense[frames]
    return out


#: LABELMAP paint order of the implant classes (later wins where they overlap): the generic "other implant"
#: region first, then the classes from the largest to the smallest, so a screw head under a rod or a screw
#: inside an unrecognised metal region keeps its label.
_LABELMAP_IMPLANT_ORDER = (ImplantKind.OTHER, ImplantKind.PLATE, ImplantKind.ROD, ImplantKind.INTERBODY_CAGE,
                           ImplantKind.PEDICLE_SCREW)


def _labelmap(specs: Sequence[SegmentSpec], grid: tuple[int, ...], frames: slice) -> np.ndarray:
    """LABELMAP input: one label per pixel. Where segments overlap, implants win over anatomy; among anatomy the
    smaller structure wins (the sacrum's overlap with the lowest vertebra), among implants the order above."""
    dtype = np.uint8 if len(specs) < 256 else np.uint16
    labels = np.zeros(grid, dtype=dtype)
    painted = []
    for spec in specs:
        dense = np.zeros(grid, dtype=bool)
        for mask in spec.masks:
            _paint(dense, mask)
        rank = (1, _LABELMAP_IMPLANT_ORDER.index(spec.kind)) if spec.kind is not None else (0, -int(dense.sum()))
        painted.append((rank, spec.number, dense))
    for _, number, dense in sorted(painted, key=lambda p: p[:2]):
        labels[dense] = number
    if len(grid) == 2:
        labels = labels[np.newaxis]
    return labels[frames]


def _frame_range(specs: Sequence[SegmentSpec], n_frames: int, is_volume: bool) -> slice:
    """Slab of slices holding any segment (a SEG need not reference slices it has nothing on)."""
    if not is_volume:
        return slice(0, 1)
    lo, hi = n_frames, 0
    for spec in specs:
        for mask in spec.masks:
            if mask.array.size:
                lo = min(lo, mask.offset[0])
                hi = max(hi, mask.offset[0] + mask.array.shape[0])
    return slice(lo, hi) if hi > lo else slice(0, 0)


def _algorithm(result: StudyResult) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=fit_lo(result.analysis),
        family=codes.ALGORITHM_FAMILY,
        version=fit_lo(models_text(result.models)),
    )


def seg_variant(labelmap: bool, compression: str) -> str:
    """What, besides the analysis, tells one SEG of an image from another (part of its derived UID).

    The transfer syntax is included: two destinations wanting the same SEG compressed differently get two
    files, and one UID naming both would have the second overwrite the first on disk while the first's
    transfer syntax stayed on record.  Uncompressed is the default and adds nothing, so the UIDs of the
    default SEGs stay those of earlier versions."""
    parts = (["labelmap"] if labelmap else []) + ([compression] if compression != "none" else [])
    return "/".join(parts)


def build_seg(
    result: StudyResult,
    image: ImageResult,
    sources: Sequence[Dataset],
    *,
    instance_number: int,
    options: OutputOptions,
    producer: Producer,
) -> Dataset | None:
    """The SEG of one analysed image, or None when the image has no segment with any pixel."""
    specs = segment_specs(image)
    if not specs:
        return None
    labelmap = options.seg_format == "labelmap"
    grid = image.source.grid_shape
    frames = _frame_range(specs, len(sources), image.source.is_volume)
    if frames.stop <= frames.start:
        return None
    pixels = _labelmap(specs, grid, frames) if labelmap else _stacked(specs, grid, frames)
    used_sources = list(sources[frames])
    algorithm = _algorithm(result)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=spec.number,
            segment_label=fit_lo(spec.label),
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(tracking_uid(image, "vertebra" if spec.kind is None else "implant class", spec.label)),
            tracking_id=fit_lo(spec.tracking_id),
            anatomic_regions=[spec.anatomic_region] if spec.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*spec.colour),
        )
        for spec in specs
    ]
    transfer_syntax = JPEG2000Lossless if options.seg_compression == "jpeg2000" else ExplicitVRLittleEndian
    variant = seg_variant(labelmap, options.seg_compression)
    seg = hd.seg.Segmentation(
        specific_character_set=CHARACTER_SET,  # not the source's: see CHARACTER_SET
        source_images=used_sources,
        pixel_array=pixels,
        segmentation_type=(hd.seg.SegmentationTypeValues.LABELMAP if labelmap
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=image_series_uid(result, image, OutputKind.SEG, variant),
        series_number=1,  # replaced by apply_series
        sop_instance_uid=_sop_instance_uid(result, image, variant),
        instance_number=instance_number,
        manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.model_name,
        software_versions=producer.software_version,
        device_serial_number=producer.device_serial_number,
        content_label="SPINE_AI",
        content_description=fit_lo(f"{DISCLAIMER}: vertebrae and implants"),
        transfer_syntax_uid=transfer_syntax,
        omit_empty_frames=True,
    )
    if labelmap:
        # highdicom describes the background as segment 0 (black). The standard does not require it, and
        # OHIF 3.13 takes segment colours by list position, so with it every label shows the colour of
        # the segment before it (L3 black, L4 in L3's colour ...). Pixels 0 stay background either way.
        # highdicom's constructor sets a list, so mypy infers list[SegmentDescription]; pydicom takes a Sequence too
        seg.SegmentSequence = DicomSequence([s for s in seg.SegmentSequence if s.SegmentNumber != 0])  # type: ignore[assignment]
    source = sources[0]
    apply_identity(seg, source)
    apply_equipment(seg, source, producer)
    apply_series(seg, OutputKind.SEG, _source_name(image, source))
    if image.source.is_volume:
        copy_image_attributes(seg, source, _VOLUME_ATTRIBUTES)
    else:
        copy_image_attributes(seg, source, _RADIOGRAPH_ATTRIBUTES)
        add_projection_geometry(seg, source)
    if any(codes.uses_private_scheme(s.property_type, s.category) for s in specs):
        declare_private_scheme(seg)
    # highdicom draws the Dimension Organization UID at random; derived, the same input gives the same object.
    dimension_uid = derive_uid(str(seg.SOPInstanceUID), "dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    return seg


def _sop_instance_uid(result: StudyResult, image: ImageResult, variant: str) -> str:
    # Until 2026-12-07 the SEGs of a study shared one series. Their UIDs are derived afresh, so a PACS that holds
    # one of those never receives the same SOP Instance UID again in another series.
    return derive_uid(image_output_uid(result, image, OutputKind.SEG, variant), "series of its own")


def _source_name(image: ImageResult, source: Dataset) -> str:
    """The analysed image or series as the viewer lists it: its series description ("LSPINE LL no. 1", the
    number telling apart two views of one series), else its label ("LAT image, series 3 no. 1")."""
    described = str(source.get("SeriesDescription") or "").strip()
    number = source.get("InstanceNumber")
    if described:
        return described if image.source.is_volume or number in (None, "") else f"{described} no. {number}"
    if image.source.is_volume:
        return f"series {source.get('SeriesNumber') or image.source.series_instance_uid}"
    return image.source.label


def add_projection_geometry(seg: Dataset, source: Dataset) -> None:
    """Plane Orientation/Position and Pixel Measures functional groups for a SEG of a radiograph.

    See the module docstring: without them OHIF 3.13 never displays the SEG (it also reads Pixel
    Measures unconditionally); with them the SEG stays a valid Segmentation IOD (no Frame of
    Reference, frames tied to the source by reference).  The pixel spacing is the one a viewer
    uses for the source: PixelSpacing when calibrated, else ImagerPixelSpacing.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = _spacing(source, "PixelSpacing") or _spacing(source, "ImagerPixelSpacing")
    if spacing is not None and "PixelMeasuresSequence" not in shared:
        measures = Dataset()
        measures.PixelSpacing = spacing
        # A projection has no slice; the attribute is only there because readers (highdicom's segread)
        # require it next to PixelSpacing.  Nominal 1 mm, as for any single plane.
        measures.SliceThickness = 1.0
        shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(DEFAULT_ORIENTATION)
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = Dataset()
        position.ImagePositionPatient = list(DEFAULT_POSITION)
        frame.PlanePositionSequence = DicomSequence([position])


def _spacing(source: Dataset, keyword: str) -> list[float] | None:
    """A pixel spacing of the source as two positive numbers, None when it is absent or not that ("0.25",
    "0.25\\abc", a negative value): copied, it would make the SEG invalid or fail to build."""
    try:
        values = [float(v) for v in as_list(source.get(keyword))]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values) else None
