"""What every output object shares: the API types, patient/study identity, series and UIDs.

Kept apart from `reports.outputs` so the per-kind encoders (`seg`, `sr`, `sc`, `pr`) can use it
without importing each other.
"""

from __future__ import annotations

import copy
import datetime
import enum
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM

from inference.results import ImageResult, ModelInfo, StudyResult
from reports import codes
from reports.uids import derive_uid


class OutputKind(str, enum.Enum):  # noqa: UP042 (the agreed contract spells it so)
    """The four object kinds the node writes back into the study."""

    SEG = "seg"
    SR = "sr"
    SC = "sc"
    PR = "pr"


@dataclass(frozen=True)
class OutputOptions:
    """Per-destination encoding choices.

    LABELMAP SEG is a newer SOP class (Label Map Segmentation Storage) fewer PACS accept, so BINARY
    is the default.  JPEG 2000 lossless shrinks a CT SEG ~40x but some viewers cannot decode it.
    """

    seg_format: Literal["binary", "labelmap"] = "binary"
    seg_compression: Literal["none", "jpeg2000"] = "none"

    def __post_init__(self) -> None:
        if self.seg_format not in ("binary", "labelmap"):
            raise ValueError(f"seg_format must be 'binary' or 'labelmap', got {self.seg_format!r}")
        if self.seg_compression not in ("none", "jpeg2000"):
            raise ValueError(f"seg_compression must be 'none' or 'jpeg2000', got {self.seg_compression!r}")


def _package_version() -> str:
    try:
        return metadata.version("spine-pacs-ai-node")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class Producer:
    """The node as an equipment: Manufacturer, ManufacturerModelName, SoftwareVersions ..."""

    manufacturer: str = "Spine PACS AI Node project"
    model_name: str = "spine-pacs-ai-node"
    software_version: str = _package_version()
    device_serial_number: str = "0"
    #: None: copy InstitutionName from the source.
    institution_name: str | None = None

    @property
    def device_uid(self) -> UID:
        """Stable UID of this producer as a device observer (SR TID 1004)."""
        return derive_uid("device", self.manufacturer, self.model_name, self.device_serial_number)


@dataclass(frozen=True)
class SopReference:
    """An earlier output, referenced from a new SR's PredecessorDocumentsSequence."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class EncodedOutput:
    """One finished object: `dataset` has its file meta and is ready for dcmwrite or C-STORE."""

    kind: OutputKind
    dataset: Dataset
    source_sop_instance_uids: tuple[str, ...]


# ------------------------------------------------------------------------------------------ series


@dataclass(frozen=True)
class SeriesStyle:
    """Stable series number and description of one output kind."""

    number: int
    description: str


SERIES: dict[OutputKind, SeriesStyle] = {
    OutputKind.SEG: SeriesStyle(9001, "AI Spine SEG"),
    OutputKind.SR: SeriesStyle(9002, "AI Spine Report"),
    OutputKind.SC: SeriesStyle(9003, "AI Spine Annotated"),
    OutputKind.PR: SeriesStyle(9004, "AI Spine Presentation State"),
}
#: The series of the node's rejection notes (`reports.kos`), beside those of its output kinds.
REJECTION_SERIES = SeriesStyle(9005, "AI Spine rejected outputs")

#: Shown on every human-facing output.
DISCLAIMER = "AI RESULT — NOT FOR PRIMARY DIAGNOSIS"


# -------------------------------------------------------------------------------------------- UIDs


def models_fingerprint(models: Sequence[ModelInfo]) -> str:
    """Order-independent text of the model names and versions (part of every output UID)."""
    if not models:
        return "no-model"
    return ";".join(sorted(f"{m.name}={m.version}" for m in models))


def output_fingerprint(result: StudyResult) -> str:
    """What every output UID of `result` derives from beside its sources: the model versions and the study's
    identity epoch (`StudyResult.identity_epoch`; none before the first correction, so UIDs stay as they were)."""
    fingerprint = models_fingerprint(result.models)
    return f"{fingerprint}|identity-epoch={result.identity_epoch}" if result.identity_epoch else fingerprint


def models_text(models: Sequence[ModelInfo]) -> str:
    """Readable "name version, name version"."""
    return ", ".join(f"{m.name} {m.version}" for m in models) or "no model"


def image_key(result: StudyResult, image: ImageResult) -> tuple[str, ...]:
    """The UIDs one image's outputs derive from: its study and its source (one radiograph, or a whole series).
    The study too: a sender that moves a film to another study keeps its SOP Instance UID, and its outputs
    there must not take the UIDs of those it had in the first study (which a rejection note may name)."""
    src = image.source
    if src.is_volume:
        return (result.study_instance_uid, src.series_instance_uid, *sorted(src.sop_instance_uids))
    return (result.study_instance_uid, src.sop_instance_uids[0])


def series_uid(result: StudyResult, kind: OutputKind, variant: str = "") -> UID:
    """Series of one output kind in the study (one per kind, model versions and variant)."""
    return derive_uid(result.study_instance_uid, "series", kind.value, output_fingerprint(result),
                      variant or "default")


def image_series_uid(result: StudyResult, image: ImageResult, kind: OutputKind, variant: str = "") -> UID:
    """Series of one image's output of a kind (and variant): for the SEG, whose series viewers open by its first
    instance only (OHIF takes `instances[0]` of a SEG series), so the SEG of each view needs a series of its own."""
    return derive_uid(*image_key(result, image), "series", kind.value, output_fingerprint(result), variant or "default")


def image_output_uid(result: StudyResult, image: ImageResult, kind: OutputKind, variant: str = "") -> UID:
    """SOP Instance UID of a per-image output (SEG, SC, PR)."""
    return derive_uid(*image_key(result, image), kind.value, output_fingerprint(result), variant or "default")


def tracking_uid(image: ImageResult, what: str, label: str) -> UID:
    """Tracking UID of one tracked object of an image ("vertebra", "L3"): the SEG segment and the SR group of a
    vertebra carry the same one, so a reader can link them."""
    return derive_uid(image.source.sop_instance_uids[0], "tracking", what, label)


def analysed_sop_instance_uids(result: StudyResult) -> tuple[str, ...]:
    """Sorted SOP Instance UIDs of every analysed source instance."""
    return tuple(sorted({uid for im in result.images for uid in im.source.sop_instance_uids}))


def sc_uid(result: StudyResult, image: ImageResult) -> UID:
    """SOP Instance UID of an image's annotated SC. The SC draws the study's verdict beside the image, so, like the
    SR's, it changes when the set of analysed instances changes: a PACS that keeps the first object stored under
    a UID would otherwise go on showing a stale verdict."""
    return derive_uid(*image_key(result, image), OutputKind.SC.value, output_fingerprint(result),
                      "study", *analysed_sop_instance_uids(result))


def sr_uid(result: StudyResult, unanalysed: Sequence[str] = ()) -> UID:
    """SOP Instance UID of the study's SR: changes when the set of analysed instances changes.  A report over
    no analysed image derives it from the instances it covers (`unanalysed`), else every such report of the
    study would share one UID while its reasons change."""
    if not result.images:
        return derive_uid(result.study_instance_uid, OutputKind.SR.value, output_fingerprint(result),
                          "no image analysed", *sorted(unanalysed))
    return derive_uid(result.study_instance_uid, OutputKind.SR.value, output_fingerprint(result),
                      *analysed_sop_instance_uids(result))


# ---------------------------------------------------------------------------------------- identity

#: Patient and study attributes copied verbatim from the source, with their type in the output IODs
#: (2: always present, empty if the source lacks it; 3: only if the source has it).
IDENTITY_ATTRIBUTES: tuple[tuple[str, int], ...] = (
    # Patient module
    ("PatientName", 2),
    ("PatientID", 2),
    ("IssuerOfPatientID", 3),
    ("IssuerOfPatientIDQualifiersSequence", 3),
    ("TypeOfPatientID", 3),
    ("PatientBirthDate", 2),
    ("PatientBirthTime", 3),
    ("PatientSex", 2),
    ("OtherPatientIDsSequence", 3),
    ("PatientComments", 3),
    ("PatientSpeciesDescription", 3),
    ("PatientSpeciesCodeSequence", 3),
    ("PatientBreedDescription", 3),
    ("PatientBreedCodeSequence", 3),
    ("BreedRegistrationSequence", 3),
    ("ResponsiblePerson", 3),
    ("ResponsiblePersonRole", 3),
    ("ResponsibleOrganization", 3),
    ("PatientIdentityRemoved", 3),
    ("DeidentificationMethod", 3),
    ("DeidentificationMethodCodeSequence", 3),
    # General Study module
    ("StudyInstanceUID", 1),
    ("StudyDate", 2),
    ("StudyTime", 2),
    ("ReferringPhysicianName", 2),
    ("ReferringPhysicianIdentificationSequence", 3),
    ("StudyID", 2),
    ("AccessionNumber", 2),
    ("IssuerOfAccessionNumberSequence", 3),
    ("StudyDescription", 3),
    ("PhysiciansOfRecord", 3),
    ("PhysiciansOfRecordIdentificationSequence", 3),
    ("NameOfPhysiciansReadingStudy", 3),
    ("PhysiciansReadingStudyIdentificationSequence", 3),
    ("RequestingServiceCodeSequence", 3),
    ("ProcedureCodeSequence", 3),
    ("ReasonForPerformedProcedureCodeSequence", 3),
    # Patient Study module
    ("AdmittingDiagnosesDescription", 3),
    ("AdmittingDiagnosesCodeSequence", 3),
    ("PatientAge", 3),
    ("PatientSize", 3),
    ("PatientWeight", 3),
    ("EthnicGroup", 3),
    ("Occupation", 3),
    ("AdditionalPatientHistory", 3),
    ("AdmissionID", 3),
    ("IssuerOfAdmissionIDSequence", 3),
    ("PregnancyStatus", 3),
    ("SmokingStatus", 3),
)

#: Attributes all sources must agree on: outputs never mix patients or studies.
_MUST_AGREE = ("StudyInstanceUID", "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
               "PatientSex")
#: Attributes where one source leaving the value empty does not make it another patient.
_EMPTY_AGREES = ("PatientBirthDate", "PatientSex")


def _comparable(keyword: str, value: object) -> str:
    text = str(value if value is not None else "").strip()
    if keyword == "PatientName":
        # "DOE^JOHN" and "DOE^JOHN^^^" are one name: empty trailing components and groups are optional.
        text = "=".join(group.rstrip("^ ") for group in text.split("=")).rstrip("= ")
    return text


def check_one_study(sources: Sequence[Dataset]) -> None:
    """Raise ``ValueError`` naming the attribute if `sources` span more than one study or patient.

    Values are compared as a reader would: a person name's empty trailing components, and a birth date or
    sex that one source leaves empty, do not tell two patients apart."""
    if not sources:
        raise ValueError("no source datasets given")
    for keyword in _MUST_AGREE:
        values = {_comparable(keyword, ds.get(keyword, "")) for ds in sources}
        if keyword in _EMPTY_AGREES:
            values.discard("")
        if len(values) > 1:
            # The values are patient data (a numeric PatientID or a birth date would pass the log's redaction):
            # the message names the attribute and the instances, never the values.
            counted = [ds for ds in sources
                       if keyword not in _EMPTY_AGREES or _comparable(keyword, ds.get(keyword, ""))]
            one = counted[0]
            other = next(ds for ds in counted
                         if _comparable(keyword, ds.get(keyword, "")) != _comparable(keyword, one.get(keyword, "")))
            raise ValueError(
                f"sources disagree on {keyword} (instances {one.get('SOPInstanceUID', '?')} and"
                f" {other.get('SOPInstanceUID', '?')}); outputs are built for one patient and study"
            )


#: Every output is UTF-8: our own text (dashes in level spans, the disclaimer) is not Latin-1, and UTF-8
#: carries any patient name exactly, whatever character set the source used.
CHARACTER_SET = "ISO_IR 192"


def apply_identity(ds: Dataset, source: Dataset) -> None:
    """Overwrite `ds`'s patient and study attributes with exact copies of the source's."""
    for keyword, type_ in IDENTITY_ATTRIBUTES:
        if keyword in source:
            setattr(ds, keyword, copy.deepcopy(source[keyword].value))
        elif type_ == 2:
            setattr(ds, keyword, None)  # present but empty, as the IODs require
        elif keyword in ds:
            delattr(ds, keyword)
    ds.SpecificCharacterSet = CHARACTER_SET


_DATE_TIME_VRS = {"DA": DA, "TM": TM, "DT": DT}


def encodable_copy(source: Dataset) -> Dataset:
    """`source` with identity dates/times that do not parse emptied (e.g. PatientBirthDate "31.12.1960"),
    absent Type 2 identity attributes present but empty (a DX without PatientSex or StudyID), and a window that
    cannot be used left out (`_unusable_window`).

    Some modalities send such data; highdicom refuses unparseable values and reads Type 2 attributes
    unconditionally while building.  The builders get this copy, and `apply_identity` afterwards copies the
    source's values back verbatim (absent Type 2 ones empty, as the IODs require), so identity stays exact.
    """
    bad = []
    for keyword, _ in IDENTITY_ATTRIBUTES:
        if keyword not in source or source[keyword].VR not in _DATE_TIME_VRS or not source[keyword].value:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _DATE_TIME_VRS[source[keyword].VR](str(source[keyword].value))
        except ValueError:
            bad.append(keyword)
    absent = [keyword for keyword, type_ in IDENTITY_ATTRIBUTES if type_ == 2 and keyword not in source]
    luts = list(source.get("VOILUTSequence", []))
    # A LUT item without its three descriptor values or its data cannot be applied or copied: the window (if
    # any) or the percentile range stands in for it.
    broken_luts = any(len(as_list(item.get("LUTDescriptor"))) != 3 or "LUTData" not in item for item in luts)
    luts_to_convert = not broken_luts and any(
        not isinstance(item.get("LUTData"), bytes) or int(item.LUTDescriptor[2]) != 16 for item in luts)
    window = _unusable_window(source) if not broken_luts else []
    if not bad and not absent and not luts_to_convert and not window and not broken_luts:
        return source
    clean = Dataset()
    clean.update(source)
    if hasattr(source, "file_meta"):
        clean.file_meta = source.file_meta
    for keyword in bad:
        del clean[keyword]  # the element object is shared with `source`: replace it, never mutate it
    for keyword in (*bad, *absent):
        setattr(clean, keyword, None)  # empty, not absent: the builders read these Type 2 attributes
    if luts_to_convert:
        del clean.VOILUTSequence  # shared with `source`, as above
        clean.VOILUTSequence = DicomSequence([_lut_in_16_bits(item) for item in luts])
    if broken_luts:
        del clean.VOILUTSequence
    for keyword in window:
        del clean[keyword]
    return clean


_WINDOW = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction")


def _unusable_window(source: Dataset) -> list[str]:
    """The window attributes the outputs leave out: all of them beside a VOI LUT Sequence (the SC uses the LUT,
    and a presentation state may carry only one of the two), or when the window is not numbers with a positive
    width in pairs (WindowWidth 0, WindowCenter "abc"), which the SC and PR builders cannot use."""
    present = [k for k in _WINDOW if k in source]
    if not present:
        return []
    if len(source.get("VOILUTSequence", [])):
        return present
    try:
        centres = [float(v) for v in as_list(source.get("WindowCenter"))]
        widths = [float(v) for v in as_list(source.get("WindowWidth"))]
    except (TypeError, ValueError):
        return present
    usable = centres and len(centres) == len(widths) and all(np.isfinite(c) for c in centres) and all(
        np.isfinite(w) and w >= 1 for w in widths)
    return [] if usable else present


def as_list(value: object) -> list[Any]:
    """The values of a possibly multi-valued element's value ([] when empty)."""
    # Any, as pydicom types element values: callers check them at run time (float() in a try).
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _lut_in_16_bits(item: Dataset) -> Dataset:
    """A copy of a VOI LUT item with 16-bit entries as words (VR OW): highdicom copies only words into the
    presentation state (it refused a list of values) and writes 16 bits per entry whatever the source said,
    and a Softcopy VOI LUT allows only 8 or 16; so a 12-bit LUT (values to 4095) is scaled to 16 bits, or
    it would show nearly black."""
    out = copy.deepcopy(item)
    if "LUTData" not in out or "LUTDescriptor" not in out:
        return out
    raw = out.LUTData
    data = (np.frombuffer(raw, dtype="<u2") if isinstance(raw, bytes) else np.asarray(list(as_list(raw)))).astype(np.float64)
    bits = int(out.LUTDescriptor[2])
    if bits != 16:
        data = np.rint(data * 65535.0 / float(2**bits - 1))
        out.LUTDescriptor = [int(out.LUTDescriptor[0]), int(out.LUTDescriptor[1]), 16]
    out["LUTData"] = DataElement(0x00283006, "OW", np.clip(data, 0, 65535).astype("<u2").tobytes())
    return out


def institution_name(source: Dataset, producer: Producer) -> str | None:
    """The producer's institution, else the source's, as one LO value: a source's over-long or two-valued
    InstitutionName would make the output invalid (and highdicom refuses it)."""
    if producer.institution_name is not None:
        return producer.institution_name
    values = as_list(source.get("InstitutionName"))
    if not values:
        return None
    value = str(values[0])
    return value if len(value.encode("utf-8")) <= 64 else fit_lo(value)


#: The creation dates and times an output carries (highdicom stamps them, each from its own clock read).
_CREATION_DATE_TIME = (("InstanceCreationDate", "InstanceCreationTime"), ("ContentDate", "ContentTime"),
                       ("PresentationCreationDate", "PresentationCreationTime"),
                       ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"))
_UTC_OFFSET = re.compile(r"^([+-])(\d\d)(\d\d)$")


def utc_offset_minutes(source: Dataset) -> int | None:
    """The source's TimezoneOffsetFromUTC ("+0100") in minutes; None when absent, multi-valued or outside the
    range PS3.3 C.12.1.1.8 allows (-1200 to +1400)."""
    match = _UTC_OFFSET.match(str(source.get("TimezoneOffsetFromUTC", "")).strip())
    if match is None or int(match[3]) > 59:
        return None
    minutes = (int(match[2]) * 60 + int(match[3])) * (-1 if match[1] == "-" else 1)
    return minutes if -12 * 60 <= minutes <= 14 * 60 else None


def apply_creation_time(ds: Dataset, source: Dataset, now: datetime.datetime) -> None:
    """One creation moment for every date and time the node (or highdicom for it) stamps on an output. When the
    source states its TimezoneOffsetFromUTC the output copies it and gives its own times in that zone: the
    offset applies to every date and time of an instance, the copied study date and time included, so it must
    be the source's. (No SeriesDate / SeriesTime: an output series outlives one analysis, its later instances
    would contradict its first.)"""
    minutes = utc_offset_minutes(source)
    local = now.astimezone(datetime.timezone(datetime.timedelta(minutes=minutes))) if minutes is not None else now.astimezone()
    date, time = local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f")
    for date_keyword, time_keyword in _CREATION_DATE_TIME:
        if date_keyword in ds:
            setattr(ds, date_keyword, date)
            setattr(ds, time_keyword, time)
    # highdicom names itself as contributing equipment, stamped with its own (node-local) clock.
    for item in ds.get("ContributingEquipmentSequence") or ():
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time
    if minutes is not None:
        ds.TimezoneOffsetFromUTC = f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    elif "TimezoneOffsetFromUTC" in ds:
        del ds.TimezoneOffsetFromUTC


def apply_equipment(ds: Dataset, source: Dataset, producer: Producer) -> None:
    """General Equipment of the node, institution copied from the source unless the producer sets one."""
    ds.Manufacturer = producer.manufacturer
    ds.ManufacturerModelName = producer.model_name
    ds.SoftwareVersions = producer.software_version
    ds.DeviceSerialNumber = producer.device_serial_number
    institution = institution_name(source, producer)
    if institution:
        ds.InstitutionName = institution
    elif "InstitutionName" in ds:
        del ds.InstitutionName


def apply_series(ds: Dataset, kind: OutputKind, about: str = "") -> None:
    """Stable SeriesNumber and SeriesDescription of an output kind; `about` names what a series of one image
    holds ("AI Spine SEG, LSPINE LL no. 1")."""
    style = SERIES[kind]
    ds.SeriesNumber = style.number
    ds.SeriesDescription = fit_lo(f"{style.description}, {about}") if about else style.description


def copy_image_attributes(ds: Dataset, source: Dataset, keywords: Sequence[str]) -> None:
    """Copy series/image attributes the source has (PatientOrientation, Laterality, BodyPartExamined ...); a
    PatientOrientation that is not two valid direction values is not copied, nor a code string outside the CS
    repertoire once upper-cased ("lspine" goes out as LSPINE, "L-SPINE" not at all): either would make the
    output invalid."""
    for keyword in keywords:
        if keyword == "PatientOrientation" and "PatientOrientation" in source:
            pair = patient_orientation(source)
            if pair is not None:
                ds.PatientOrientation = list(pair)
        elif keyword in source and source[keyword].value not in (None, ""):
            element = source[keyword]
            if element.VR == "CS":
                # One value (these attributes have VM 1; a second value would make the output invalid).
                values = [str(v).upper() for v in as_list(element.value)]
                if values and _CODE_STRING.fullmatch(values[0]):
                    setattr(ds, keyword, values[0])
            else:
                setattr(ds, keyword, copy.deepcopy(element.value))


def empty_laterality_without_body_part(ds: Dataset) -> None:
    """In an SC or PR, General Series Laterality is Type 2C while the body part may be a paired one: with no
    body part (a CR may send none, or one outside the CS repertoire) dciodvfy wants it, empty.  Not for a SEG,
    where it must then be absent."""
    if "Laterality" not in ds and "BodyPartExamined" not in ds:
        ds.Laterality = None


_CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")


def declare_private_scheme(ds: Dataset) -> None:
    """Add the private coding scheme to CodingSchemeIdentificationSequence (once)."""
    items = list(ds.get("CodingSchemeIdentificationSequence", []))
    if not any(i.get("CodingSchemeDesignator") == codes.PRIVATE_SCHEME for i in items):
        items.append(codes.coding_scheme_identification())
    ds.CodingSchemeIdentificationSequence = DicomSequence(items)


# Typographic characters in generated text become their ASCII look-alikes: some DICOM tools (dcmtk's
# dcmpschk) and older PACS reject anything but the default repertoire in LO/ST values.
_TYPOGRAPHY = str.maketrans({"—": "-", "–": "-", "‒": "-", "−": "-", "•": "*", "‘": "'", "’": "'", "“": '"',
                             "”": '"', "…": "..."})


def plain(text: str) -> str:
    """`text` with dashes, bullets and quotes in ASCII."""
    return text.translate(_TYPOGRAPHY)


def fit_lo(text: str, limit: int = 64) -> str:
    """`plain(text)` truncated so its UTF-8 encoding fits `limit` bytes (LO/SH/ST lengths count bytes)."""
    encoded = plain(text).encode("utf-8")
    if len(encoded) <= limit:
        return plain(text)
    return encoded[:limit].decode("utf-8", errors="ignore").rstrip()


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """PatientOrientation of a source: its own, or derived from ImageOrientationPatient (CT/MR); None when it
    gives none that is valid (absent, empty as CR allows, or letters other than A P L R H F)."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2:
        pair = (str(value[0]).strip(), str(value[1]).strip())
        return pair if all(p and set(p) <= set("APLRHF") for p in pair) else None
    iop = source.get("ImageOrientationPatient")
    if not iop or len(iop) != 6:
        return None
    return (direction_letters([float(v) for v in iop[:3]]), direction_letters([float(v) for v in iop[3:]]))


def direction_letters(vector: list[float]) -> str:
    """PatientOrientation letters of a direction in patient coordinates, e.g. (0, 1, 0) -> "P"."""
    # PS3.3 C.7.6.1.1.1: letters of the main axes, most significant first; patient x = L, y = P, z = H.
    letters = []
    for axis in sorted(range(3), key=lambda i: -abs(vector[i])):
        if abs(vector[axis]) < 1e-3:
            continue
        positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
        letters.append(positive if vector[axis] > 0 else negative)
    return "".join(letters)


def sources_by_uid(sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """Index source datasets by SOP Instance UID."""
    return {str(ds.SOPInstanceUID): ds for ds in sources}


def image_sources(image: ImageResult, by_uid: dict[str, Dataset]) -> list[Dataset]:
    """The source datasets of one analysed image, in mask order; ``ValueError`` if one is missing."""
    out = []
    for uid in image.source.sop_instance_uids:
        try:
            out.append(by_uid[uid])
        except KeyError:
            raise ValueError(f"source instance {uid} of the result is not among the given sources") from None
    return out
