"""Framework-free results shared by the models (`inference`) and the DICOM encoders (`reports`).

Nothing here imports torch or pydicom: a model fills these dataclasses, `reports` turns them into
SEG / SR / SC / PR objects, the node stores their `summary()` in its database.

Conventions (the DICOM ones, so `reports` never converts):

* A 2D point is ``(x, y) = (column, row)`` in the source image's pixel space, continuous, with the
  top-left corner of the top-left pixel at ``(0, 0)``; the centre of pixel ``[r, c]`` is
  ``(c + 0.5, r + 0.5)``.  This is the SCOORD convention of PS3.3 C.18.6.1.
* Masks are boolean arrays over the source pixel grid: ``(rows, columns)`` for a projection
  radiograph, ``(frames, rows, columns)`` for a CT/MR series in the order of
  ``SourceImage.sop_instance_uids``.  They are stored cropped (`RegionMask`) because a 3000x3000
  radiograph with 25 structures would otherwise hold hundreds of MB of mostly-False pixels.
* Vertebral levels are spelled as radiologists do: ``"C1"`` ... ``"C7"``, ``"T1"`` ... ``"T12"``,
  ``"L1"`` ... ``"L5"``, ``"S1"`` (the sacrum).  ``None`` means "level unknown": a model says so
  instead of guessing when the field of view does not allow naming.
* Lengths are millimetres, angles degrees, ratios percent (UCUM ``mm``, ``deg``, ``%``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Every level a vertebra can be named with, cranial to caudal.  ``S1`` stands for the sacrum.
LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "S1",
)
_LEVEL_INDEX = {name: i for i, name in enumerate(LEVELS)}

Point = tuple[float, float]
"""``(x, y) = (column, row)`` in source pixel coordinates, see the module docstring."""


def level_index(level: str) -> int:
    """Position of `level` in `LEVELS` (C1 = 0); raises ``ValueError`` naming an unknown level."""
    try:
        return _LEVEL_INDEX[level]
    except KeyError:
        raise ValueError(f"unknown vertebral level {level!r}; expected one of {', '.join(LEVELS)}") from None


def level_span(levels: Sequence[str]) -> str:
    """Surgeon's spelling of a run of levels: ``("L3", "L4", "L5", "S1") -> "L3–S1"``."""
    if not levels:
        return ""
    ordered = sorted(levels, key=level_index)
    return ordered[0] if len(ordered) == 1 else f"{ordered[0]}–{ordered[-1]}"


# --------------------------------------------------------------------------------------------- masks


@dataclass(frozen=True, eq=False)
class RegionMask:
    """A boolean mask stored as its bounding box: `array` placed at `offset` in a grid of `shape`."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    array: np.ndarray

    def __post_init__(self) -> None:
        if self.array.dtype != np.bool_:
            raise ValueError(f"RegionMask.array must be boolean, got {self.array.dtype}")
        if not (len(self.shape) == len(self.offset) == self.array.ndim):
            raise ValueError(
                f"RegionMask dimensions disagree: shape {self.shape}, offset {self.offset}, array {self.array.shape}"
            )
        for axis, (off, size, full) in enumerate(zip(self.offset, self.array.shape, self.shape, strict=True)):
            if off < 0 or off + size > full:
                raise ValueError(f"RegionMask axis {axis}: [{off}, {off + size}) lies outside [0, {full})")

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> RegionMask:
        """Crop a full-size boolean mask to its bounding box (an empty mask keeps a 0-size array)."""
        dense = np.asarray(dense, dtype=bool)
        if not dense.any():
            return cls(tuple(dense.shape), (0,) * dense.ndim, np.zeros((0,) * dense.ndim, dtype=bool))
        lo, hi = [], []
        for axis in range(dense.ndim):
            other = tuple(a for a in range(dense.ndim) if a != axis)
            present = np.flatnonzero(dense.any(axis=other))
            lo.append(int(present[0]))
            hi.append(int(present[-1]) + 1)
        region = dense[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        return cls(tuple(dense.shape), tuple(lo), np.ascontiguousarray(region))

    @property
    def empty(self) -> bool:
        """True when no pixel is set."""
        return not self.array.any()

    @property
    def area(self) -> int:
        """Number of set pixels (voxels for a 3D mask)."""
        return int(self.array.sum())

    def dense(self) -> np.ndarray:
        """The mask over the full grid."""
        out = np.zeros(self.shape, dtype=bool)
        if self.array.size:
            out[self.slices()] = self.array
        return out

    def slices(self) -> tuple[slice, ...]:
        """Index expression of the bounding box in the full grid."""
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.array.shape, strict=True))


# --------------------------------------------------------------------------------------- vocabulary


class ImplantKind(str, enum.Enum):
    """Kinds of spinal implant the hardware model separates."""

    PEDICLE_SCREW = "pedicle screw"
    ROD = "rod"
    INTERBODY_CAGE = "interbody cage"
    PLATE = "plate"
    OTHER = "other implant"


class Side(str, enum.Enum):
    """Patient side of an implant (the patient's left, not the viewer's)."""

    LEFT = "left"
    RIGHT = "right"
    MIDLINE = "midline"
    UNKNOWN = "unknown"


class Complication(str, enum.Enum):
    """Hardware failure modes the surgeon needs to hear about first."""

    SCREW_LOOSENING = "screw loosening"
    SCREW_BREAKAGE = "screw breakage"
    ROD_FRACTURE = "rod fracture"
    CAGE_SUBSIDENCE = "cage subsidence"

    @property
    def not_assessed_note(self) -> str:
        """The image note saying this failure mode was not looked for ("screw loosening not assessed")."""
        return f"{self.value} not assessed"


#: The failure modes of each implant kind (what a model could look for; which it does is per implant,
#: `Implant.assessed`).
FAILURE_MODES: dict[ImplantKind, tuple[Complication, ...]] = {
    ImplantKind.PEDICLE_SCREW: (Complication.SCREW_LOOSENING, Complication.SCREW_BREAKAGE),
    ImplantKind.ROD: (Complication.ROD_FRACTURE,),
    ImplantKind.INTERBODY_CAGE: (Complication.CAGE_SUBSIDENCE,),
    ImplantKind.PLATE: (),
    ImplantKind.OTHER: (),
}


class GenantGrade(enum.IntEnum):
    """Genant semi-quantitative grade of a vertebral compression deformity (height loss)."""

    NORMAL = 0  # < 20 %
    MILD = 1  # 20-25 %
    MODERATE = 2  # 25-40 %
    SEVERE = 3  # > 40 %

    @classmethod
    def from_height_loss(cls, loss_pct: float) -> GenantGrade:
        """Grade from the largest height-loss percentage (Genant 1993 thresholds)."""
        if loss_pct > 40.0:
            return cls.SEVERE
        if loss_pct >= 25.0:
            return cls.MODERATE
        if loss_pct >= 20.0:
            return cls.MILD
        return cls.NORMAL


class FractureShape(str, enum.Enum):
    """Morphology of a compression deformity: which height is reduced most."""

    NONE = "none"
    WEDGE = "wedge"  # anterior height reduced
    BICONCAVE = "biconcave"  # middle height reduced
    CRUSH = "crush"  # posterior (or all) heights reduced


class Severity(str, enum.Enum):
    """How urgent a finding is for the reader."""

    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"


class FindingKind(str, enum.Enum):
    """Findings the node can report; `reports.codes` maps each to its coded concept."""

    VERTEBRAL_COMPRESSION_FRACTURE = "vertebral compression fracture"
    SCREW_LOOSENING = "screw loosening"
    SCREW_BREAKAGE = "screw breakage"
    ROD_FRACTURE = "rod fracture"
    CAGE_SUBSIDENCE = "cage subsidence"
    IMPLANT_OUTSIDE_FIELD_OF_VIEW = "implant outside field of view"


COMPLICATION_FINDING: dict[Complication, FindingKind] = {
    Complication.SCREW_LOOSENING: FindingKind.SCREW_LOOSENING,
    Complication.SCREW_BREAKAGE: FindingKind.SCREW_BREAKAGE,
    Complication.ROD_FRACTURE: FindingKind.ROD_FRACTURE,
    Complication.CAGE_SUBSIDENCE: FindingKind.CAGE_SUBSIDENCE,
}


class MeasurementKind(str, enum.Enum):
    """Named measurements beyond the per-vertebra heights."""

    COBB_ANGLE = "Cobb angle"
    LUMBAR_LORDOSIS = "lumbar lordosis"
    THORACIC_KYPHOSIS = "thoracic kyphosis"
    HEIGHT_LOSS = "vertebral height loss"


class ScreeningOutcome(str, enum.Enum):
    """Study-level screening verdict."""

    NO_FINDING = "no finding"
    FINDING_PRESENT = "finding present"
    NOT_ASSESSABLE = "not assessable"


class HardwareStatus(str, enum.Enum):
    """Postoperative hardware verdict."""

    NO_IMPLANTS = "no implants"
    INTACT = "hardware intact"
    POSSIBLE_COMPLICATION = "possible complication"
    NOT_ASSESSABLE = "not assessable"


# ------------------------------------------------------------------------------------ result parts


@dataclass(frozen=True)
class SourceImage:
    """The analysed source: one projection radiograph, or one CT/MR series (slices in mask order)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    rows: int
    columns: int
    #: (row spacing, column spacing) in mm at the plane measurements refer to, or None (no calibration).
    pixel_spacing_mm: tuple[float, float] | None = None
    #: Where `pixel_spacing_mm` came from, e.g. "PixelSpacing", "ImagerPixelSpacing",
    #: "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"; "none" when absent.
    spacing_source: str = "none"
    #: Projection view as read from ViewPosition / PatientOrientation ("AP", "PA", "LAT"...), None if unknown.
    view: str | None = None
    modality: str = ""
    #: SeriesNumber and InstanceNumber, when the source has them: how a reader finds the image in a viewer.
    series_number: int | None = None
    instance_number: int | None = None

    @property
    def label(self) -> str:
        """The image as a reader names it ("AP image, series 3 no. 1"); its UID when it has no numbers."""
        if self.series_number is None and self.instance_number is None:
            return f"image {self.sop_instance_uids[0]}"
        kind = f"{self.view} image" if self.view else "image"
        numbers = [f"series {self.series_number}" if self.series_number is not None else "",
                   f"no. {self.instance_number}" if self.instance_number is not None else ""]
        return f"{kind}, {' '.join(n for n in numbers if n)}"

    @property
    def is_volume(self) -> bool:
        """True for a multi-slice series (masks are 3D)."""
        return len(self.sop_instance_uids) > 1

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape masks over this source must have."""
        if self.is_volume:
            return (len(self.sop_instance_uids), self.rows, self.columns)
        return (self.rows, self.columns)


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model that contributed to a result (goes into algorithm identification)."""

    name: str
    version: str


@dataclass(frozen=True)
class HeightMeasurement:
    """One vertebral body height: its value and the segment it was measured along."""

    value_mm: float
    start: Point
    end: Point


@dataclass(frozen=True)
class VertebralHeights:
    """Anterior, middle and posterior vertebral body heights (lateral view; AP views give left/mid/right)."""

    anterior: HeightMeasurement | None
    middle: HeightMeasurement | None
    posterior: HeightMeasurement | None


@dataclass(frozen=True)
class FractureAssessment:
    """Genant grading of one vertebral body."""

    grade: GenantGrade
    shape: FractureShape
    #: Largest height loss in percent, relative to the reference height named in `method`.
    height_loss_pct: float
    method: str = "Genant semi-quantitative, largest of anterior/middle vs posterior and adjacent-level heights"


@dataclass(frozen=True)
class Vertebra:
    """One vertebra (or the sacrum, level ``S1``) found on the source."""

    level: str | None
    mask: RegionMask
    outline: tuple[Point, ...]
    centroid: Point
    heights: VertebralHeights | None = None
    fracture: FractureAssessment | None = None
    score: float = 1.0

    def __post_init__(self) -> None:
        if self.level is not None:
            level_index(self.level)
        if len(self.outline) and len(self.outline) < 3:
            raise ValueError(f"vertebra {self.display_name} outline needs >= 3 points, got {len(self.outline)}")

    @property
    def display_name(self) -> str:
        """Level name, or "level unknown"."""
        return self.level or "level unknown"


@dataclass(frozen=True)
class Implant:
    """One implant instance."""

    kind: ImplantKind
    mask: RegionMask
    outline: tuple[Point, ...]
    centroid: Point
    #: Levels the implant belongs to: a screw ``("L4",)``, a cage ``("L4", "L5")``, a rod the levels it spans.
    levels: tuple[str, ...] = ()
    side: Side = Side.UNKNOWN
    complications: tuple[Complication, ...] = ()
    #: The failure modes looked for on this implant. Empty when none was (switched off or not modelled): the
    #: SR then states no complication status for it, rather than "no complications" nobody checked.
    assessed: tuple[Complication, ...] = ()
    #: Optional polyline along the implant's long axis (screw shaft, rod), for drawing and lengths.
    axis: tuple[Point, ...] = ()
    score: float = 1.0

    def __post_init__(self) -> None:
        for level in self.levels:
            level_index(level)

    @property
    def display_name(self) -> str:
        """E.g. "pedicle screw L4 left"."""
        parts = [self.kind.value]
        if self.levels:
            parts.append("–".join(self.levels) if self.kind is ImplantKind.INTERBODY_CAGE else level_span(self.levels))
        if self.side not in (Side.UNKNOWN,):
            parts.append(self.side.value)
        return " ".join(parts)


@dataclass(frozen=True)
class Finding:
    """A coded finding with where it is and what shows it."""

    kind: FindingKind
    severity: Severity
    levels: tuple[str, ...] = ()
    #: Closed polygon on the source image showing the evidence (empty if none).
    evidence: tuple[Point, ...] = ()
    description: str = ""
    #: SOP Instance UID of the image the evidence is drawn on ("" for study-level findings).
    sop_instance_uid: str = ""

    def __post_init__(self) -> None:
        for level in self.levels:
            level_index(level)


@dataclass(frozen=True)
class Measurement:
    """A named measurement (Cobb angle, lordosis, height loss ...)."""

    kind: MeasurementKind
    value: float
    unit: str
    method: str
    levels: tuple[str, ...] = ()
    #: Polyline showing how it was measured (e.g. the two endplate lines of a Cobb angle).
    evidence: tuple[Point, ...] = ()

    def __post_init__(self) -> None:
        if self.unit not in {"mm", "deg", "%"}:
            raise ValueError(f"measurement unit must be one of mm, deg, %; got {self.unit!r}")


@dataclass(frozen=True)
class ScreeningVerdict:
    """The study-level answer a radiologist reads first."""

    outcome: ScreeningOutcome
    reasons: tuple[str, ...] = ()
    hardware: HardwareStatus | None = None
    #: How a surgeon would say it, e.g. "posterior instrumentation L3–S1: 8 pedicle screws, 2 rods".
    instrumentation: str = ""


@dataclass(frozen=True)
class ImageResult:
    """Everything found on one analysed source (one radiograph, or one series)."""

    source: SourceImage
    vertebrae: tuple[Vertebra, ...] = ()
    implants: tuple[Implant, ...] = ()
    findings: tuple[Finding, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    #: Plain-language notes for the reader, e.g. "levels not named: sacrum outside the field of view".
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        expected = self.source.grid_shape
        items: tuple[Vertebra | Implant, ...] = (*self.vertebrae, *self.implants)
        for item in items:
            if tuple(item.mask.shape) != expected:
                raise ValueError(
                    f"{item.display_name}: mask shape {item.mask.shape} does not match the source grid {expected}"
                )


@dataclass(frozen=True)
class StudyResult:
    """The outcome of one analysis of one study."""

    study_instance_uid: str
    analysis: str
    models: tuple[ModelInfo, ...]
    images: tuple[ImageResult, ...]
    verdict: ScreeningVerdict
    findings: tuple[Finding, ...] = field(default=())
    #: How many times the sender had corrected the study's patient identity (name, ID, birth date, sex,
    #: accession number) when it was analysed; the node sets it, an analysis leaves 0.  Part of every output
    #: UID when > 0: a corrected study's outputs are new objects, never ones a PACS holds, or an IOCM archive
    #: was told to reject, under another identity.
    identity_epoch: int = 0

    def __post_init__(self) -> None:
        for image in self.images:
            if image.source.study_instance_uid != self.study_instance_uid:
                raise ValueError(
                    f"image {image.source.sop_instance_uids[0]} belongs to study "
                    f"{image.source.study_instance_uid}, not {self.study_instance_uid}"
                )

    def all_findings(self) -> Iterable[Finding]:
        """Study-level findings followed by every image's findings."""
        yield from self.findings
        for image in self.images:
            yield from image.findings

    @property
    def flagged(self) -> bool:
        """True when a reader should look first: a finding present or a possible hardware complication."""
        return (
            self.verdict.outcome is ScreeningOutcome.FINDING_PRESENT
            or self.verdict.hardware is HardwareStatus.POSSIBLE_COMPLICATION
        )

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable digest (no masks, no patient data) for the database, status and API."""
        return {
            "analysis": self.analysis,
            "models": [{"name": m.name, "version": m.version} for m in self.models],
            "verdict": self.verdict.outcome.value,
            "hardware": self.verdict.hardware.value if self.verdict.hardware else None,
            "reasons": list(self.verdict.reasons),
            "instrumentation": self.verdict.instrumentation,
            "flagged": self.flagged,
            "findings": [
                {"kind": f.kind.value, "severity": f.severity.value, "levels": list(f.levels), "description": f.description}
                for f in self.all_findings()
            ],
            "images": [
                {
                    "sop_instance_uid": im.source.sop_instance_uids[0],
                    "view": im.source.view,
                    "vertebrae": [v.display_name for v in im.vertebrae],
                    "implants": len(im.implants),
                    "notes": list(im.notes),
                }
                for im in self.images
            ],
        }
