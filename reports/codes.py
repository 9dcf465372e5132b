"""Every coded concept the node writes, in one place.

Standard codes come from pydicom's code dictionary (``pydicom.sr.codedict.codes``), which is generated
from the DICOM standard (PS3.16), so each one below exists in the standard with exactly this value and
scheme.  Where the standard has no concept (spinal rod, interbody cage, Genant grades, vertebral body
heights ...), the node uses its own private coding scheme ``99SPNAI``, declared in every object that
uses it through `CODING_SCHEME_IDENTIFICATION` (PS3.3 C.12.1.1.2 / PS3.3 8.2: private schemes start
with "99").  Never invent a SNOMED CT or DCM code: add a private one here instead.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.results import (
    LEVELS,
    Complication,
    FindingKind,
    FractureShape,
    GenantGrade,
    HardwareStatus,
    ImplantKind,
    MeasurementKind,
    ScreeningOutcome,
    Severity,
    Side,
)

#: Designator of the node's private coding scheme.
PRIVATE_SCHEME = "99SPNAI"
PRIVATE_SCHEME_NAME = "Spine PACS AI Node local codes"
PRIVATE_SCHEME_VERSION = "1"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


def coding_scheme_identification() -> Dataset:
    """Item for CodingSchemeIdentificationSequence (0008,0110) declaring `PRIVATE_SCHEME`."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "Spine PACS AI Node project"
    return item


def uses_private_scheme(*concepts: Code | None) -> bool:
    """True if any of `concepts` is from the private scheme."""
    return any(c is not None and c.scheme_designator == PRIVATE_SCHEME for c in concepts)


# ------------------------------------------------------------------------------- algorithm identity

#: Algorithm Family (CID 7162) of every model the node runs.
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # (123110, DCM, "Artificial Intelligence")

# ----------------------------------------------------------------------------------------- anatomy

#: Segmented Property Category (CID 7150) of vertebrae.
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # (91723000, SCT)
#: Segmented Property Category of implants.
PHYSICAL_OBJECT = codes.SCT.PhysicalObject  # (260787004, SCT)

#: A vertebra whose level the model could not name.
VERTEBRA = codes.SCT.Vertebra  # (51282000, SCT, "Vertebra")
SPINE = codes.SCT.Spine  # (421060004, SCT, "Spine")

_VERTEBRA_CODES: dict[str, Code] = {
    **{level: getattr(codes.SCT, f"{level}Vertebra") for level in LEVELS if level != "S1"},
    # "S1" in the results stands for the sacrum as a whole (the models do not split S1..S5).
    "S1": codes.SCT.Sacrum,  # (54735007, SCT, "Sacrum")
}


def vertebra_code(level: str | None) -> Code:
    """SNOMED CT concept of a vertebral level ("L3" -> L3 vertebra); `VERTEBRA` when unknown."""
    if level is None:
        return VERTEBRA
    try:
        return _VERTEBRA_CODES[level]
    except KeyError:
        raise ValueError(f"no code for vertebral level {level!r}") from None


# ---------------------------------------------------------------------------------------- implants

# The standard has SNOMED CT codes for bone screws and plates; rods and interbody cages have none in
# PS3.16, so they are private.
_IMPLANT_CODES: dict[ImplantKind, Code] = {
    ImplantKind.PEDICLE_SCREW: codes.SCT.BoneScrew,  # (68183006, SCT, "Bone Screw")
    ImplantKind.ROD: _private("IMP-ROD", "Spinal rod"),
    ImplantKind.INTERBODY_CAGE: _private("IMP-CAGE", "Interbody cage"),
    ImplantKind.PLATE: codes.SCT.BonePlate,  # (271003, SCT, "Bone Plate")
    ImplantKind.OTHER: codes.SCT.Implant,  # (40388003, SCT, "Implant")
}


def implant_code(kind: ImplantKind) -> Code:
    """Coded concept of an implant kind."""
    return _IMPLANT_CODES[ImplantKind(kind)]


_SIDE_CODES: dict[Side, Code] = {
    Side.LEFT: codes.SCT.Left,  # (7771000, SCT)
    Side.RIGHT: codes.SCT.Right,  # (24028007, SCT)
}
#: Topographical modifier for a midline implant (cages, plates).
MIDLINE = codes.SCT.Midline  # (261129000, SCT)


def laterality_code(side: Side) -> Code | None:
    """Laterality (CID 244) of a left/right structure; None for midline or unknown."""
    return _SIDE_CODES.get(Side(side))


# ----------------------------------------------------------------------------------- SR vocabulary

#: Procedure reported (TID 1500 row 4) per source modality.
PROCEDURE_RADIOGRAPHY = codes.SCT.PlainRadiography  # (168537006, SCT, "Plain radiography")
PROCEDURE_CT = codes.SCT.ComputedTomography  # (77477000, SCT)
PROCEDURE_IMAGING = codes.SCT.ImagingProcedure  # (363679005, SCT, "Imaging procedure")


def procedure_code(modality: str) -> Code:
    """Procedure reported for a source modality."""
    if modality in ("DX", "CR", "RF", "XA", "MG", "PX"):
        return PROCEDURE_RADIOGRAPHY
    if modality == "CT":
        return PROCEDURE_CT
    return PROCEDURE_IMAGING


#: TID 1500 row 12 container of study-level qualitative evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
FINDING = codes.DCM.Finding  # (121071, DCM)
FINDING_SITE = codes.SCT.FindingSite  # (363698007, SCT)
OVERALL_ASSESSMENT = codes.DCM.OverallAssessment  # (111413, DCM, "Overall Assessment")
IMPLANT_FINDING = codes.DCM.ImplantFinding  # (111407, DCM, "Implant finding")
COMPLICATIONS = codes.DCM.Complications  # (121113, DCM, "Complications")
NO_COMPLICATIONS = codes.DCM.NoComplications  # (111492, DCM, "No complications")
SEVERITY = codes.SCT.Severity  # (246112005, SCT)
CENTER = codes.DCM.Center  # (111010, DCM, "Center")
COMMENT = codes.DCM.Comment  # (121106, DCM, "Comment")

OBSERVER_DEVICE = codes.cid270.Device  # (121007, DCM, "Device")
REASON = _private("REASON", "Reason for assessment")
INSTRUMENTATION = _private("INSTR", "Instrumentation")
IMAGE_NOTE = _private("NOTE", "Analysis note")
MODEL = _private("MODEL", "Model")

ANTERIOR_HEIGHT = _private("VBH-A", "Anterior vertebral body height")
MIDDLE_HEIGHT = _private("VBH-M", "Middle vertebral body height")
POSTERIOR_HEIGHT = _private("VBH-P", "Posterior vertebral body height")
HEIGHT_LOSS = _private("VBH-LOSS", "Vertebral body height loss")
GENANT_GRADE = _private("GENANT", "Genant fracture grade")
FRACTURE_SHAPE = _private("VCF-SHAPE", "Fracture morphology")

#: Units (UCUM).
UNIT_MM = codes.UCUM.Millimeter
UNIT_DEGREE = codes.UCUM.Degree
UNIT_PERCENT = codes.UCUM.Percent
_UNITS = {"mm": UNIT_MM, "deg": UNIT_DEGREE, "%": UNIT_PERCENT}


def unit_code(unit: str) -> Code:
    """UCUM code of "mm", "deg" or "%"."""
    try:
        return _UNITS[unit]
    except KeyError:
        raise ValueError(f"no UCUM code for unit {unit!r}") from None


_GRADE_CODES: dict[GenantGrade, Code] = {
    GenantGrade.NORMAL: _private("GENANT-0", "Grade 0: normal (height loss < 20 %)"),
    GenantGrade.MILD: _private("GENANT-1", "Grade 1: mild (height loss 20-25 %)"),
    GenantGrade.MODERATE: _private("GENANT-2", "Grade 2: moderate (height loss 25-40 %)"),
    GenantGrade.SEVERE: _private("GENANT-3", "Grade 3: severe (height loss > 40 %)"),
}


def genant_code(grade: GenantGrade) -> Code:
    """Qualitative value of a Genant grade."""
    return _GRADE_CODES[GenantGrade(grade)]


_SHAPE_CODES: dict[FractureShape, Code] = {
    FractureShape.NONE: _private("VCF-NONE", "No deformity"),
    FractureShape.WEDGE: _private("VCF-WEDGE", "Wedge deformity"),
    FractureShape.BICONCAVE: _private("VCF-BICONCAVE", "Biconcave deformity"),
    FractureShape.CRUSH: _private("VCF-CRUSH", "Crush deformity"),
}


def shape_code(shape: FractureShape) -> Code:
    """Qualitative value of a fracture morphology."""
    return _SHAPE_CODES[FractureShape(shape)]


_FINDING_CODES: dict[FindingKind, Code] = {
    FindingKind.VERTEBRAL_COMPRESSION_FRACTURE: _private("F-VCF", "Vertebral compression fracture"),
    FindingKind.SCREW_LOOSENING: _private("F-SCREW-LOOSE", "Screw loosening"),
    FindingKind.SCREW_BREAKAGE: _private("F-SCREW-BREAK", "Screw breakage"),
    FindingKind.ROD_FRACTURE: _private("F-ROD-FX", "Rod fracture"),
    FindingKind.CAGE_SUBSIDENCE: _private("F-CAGE-SUB", "Cage subsidence"),
    FindingKind.IMPLANT_OUTSIDE_FIELD_OF_VIEW: _private("F-IMP-FOV", "Implant extends outside field of view"),
}


def finding_code(kind: FindingKind) -> Code:
    """Coded concept of a finding kind."""
    return _FINDING_CODES[FindingKind(kind)]


_COMPLICATION_CODES: dict[Complication, Code] = {
    Complication.SCREW_LOOSENING: _FINDING_CODES[FindingKind.SCREW_LOOSENING],
    Complication.SCREW_BREAKAGE: _FINDING_CODES[FindingKind.SCREW_BREAKAGE],
    Complication.ROD_FRACTURE: _FINDING_CODES[FindingKind.ROD_FRACTURE],
    Complication.CAGE_SUBSIDENCE: _FINDING_CODES[FindingKind.CAGE_SUBSIDENCE],
}


def complication_code(complication: Complication) -> Code:
    """Coded concept of a hardware complication."""
    return _COMPLICATION_CODES[Complication(complication)]


_SEVERITY_CODES: dict[Severity, Code] = {
    Severity.MILD: codes.SCT.Mild,  # (255604002, SCT)
    Severity.MODERATE: codes.SCT.Moderate,  # (6736007, SCT)
    Severity.SEVERE: codes.SCT.Severe,  # (24484000, SCT)
}


def severity_code(severity: Severity) -> Code:
    """SNOMED CT severity qualifier."""
    return _SEVERITY_CODES[Severity(severity)]


_OUTCOME_CODES: dict[ScreeningOutcome, Code] = {
    ScreeningOutcome.NO_FINDING: _private("SCR-NEG", "No finding"),
    ScreeningOutcome.FINDING_PRESENT: _private("SCR-POS", "Finding present"),
    ScreeningOutcome.NOT_ASSESSABLE: _private("SCR-NA", "Not assessable"),
}


def outcome_code(outcome: ScreeningOutcome) -> Code:
    """Qualitative value of the screening verdict."""
    return _OUTCOME_CODES[ScreeningOutcome(outcome)]


_HARDWARE_CODES: dict[HardwareStatus, Code] = {
    HardwareStatus.NO_IMPLANTS: _private("HW-NONE", "No implants"),
    HardwareStatus.INTACT: _private("HW-INTACT", "Hardware intact"),
    HardwareStatus.POSSIBLE_COMPLICATION: _private("HW-COMPL", "Possible hardware complication"),
    HardwareStatus.NOT_ASSESSABLE: _private("HW-NA", "Hardware not assessable"),
}


def hardware_code(status: HardwareStatus) -> Code:
    """Qualitative value of the postoperative hardware verdict."""
    return _HARDWARE_CODES[HardwareStatus(status)]


_MEASUREMENT_CODES: dict[MeasurementKind, Code] = {
    MeasurementKind.COBB_ANGLE: codes.SCT.CobbAngle,  # (285285000, SCT, "Cobb angle")
    MeasurementKind.LUMBAR_LORDOSIS: _private("M-LL", "Lumbar lordosis angle"),
    MeasurementKind.THORACIC_KYPHOSIS: _private("M-TK", "Thoracic kyphosis angle"),
    MeasurementKind.HEIGHT_LOSS: HEIGHT_LOSS,
}


def measurement_code(kind: MeasurementKind) -> Code:
    """Coded concept of a named measurement."""
    return _MEASUREMENT_CODES[MeasurementKind(kind)]


def all_private_codes() -> list[Code]:
    """Every private code this module defines, once per place it is defined (a value may repeat when two
    tables share a concept; tests check that it then means the same thing)."""
    found = [v for v in globals().values() if isinstance(v, Code) and v.scheme_designator == PRIVATE_SCHEME]
    for table in (_IMPLANT_CODES, _GRADE_CODES, _SHAPE_CODES, _FINDING_CODES, _OUTCOME_CODES,
                  _HARDWARE_CODES, _MEASUREMENT_CODES):
        found.extend(c for c in table.values() if c.scheme_designator == PRIVATE_SCHEME)
    return found

#: Title of an IHE IOCM rejection note (CID 7011): the node's outputs made under a patient identity the sender
#: corrected since were, in effect, filed to the wrong worklist entry; an IOCM archive hides and then deletes
#: the instances the note lists.
REJECTED_INCORRECT_WORKLIST_ENTRY = codes.DCM.IncorrectModalityWorklistEntry  # (113038, DCM)
