"""Write synthetic images as valid DICOM: DX and CR radiographs and CT series, for tests and demos.

The objects pass `dciodvfy` without errors, so end-to-end tests exercise the node with inputs a real
modality could have sent.  UIDs are derived from the `seed` string, so the same call gives the same
files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from reports.uids import derive_uid


@dataclass(frozen=True)
class Patient:
    """Patient and study identity written into synthetic objects."""

    name: str = "SYNTH^SPINE"
    patient_id: str = "SYN0001"
    issuer: str = "SPINE-NODE-SYNTH"
    birth_date: str = "19550314"
    sex: str = "F"
    accession: str = "ACC0001"
    study_id: str = "1"
    study_date: str = "20260115"
    study_time: str = "101500"
    referring: str = "REFERRER^ANNA"
    study_description: str = "XR LUMBAR SPINE"
    extra: dict[str, str] = field(default_factory=dict)


def _file_meta(sop_class: UID, sop_instance: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _common(ds: Dataset, patient: Patient, study_uid: UID, series_uid: UID, sop_class: UID, sop_uid: UID) -> None:
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyID = patient.study_id
    ds.AccessionNumber = patient.accession
    ds.StudyDate = patient.study_date
    ds.StudyTime = patient.study_time
    ds.StudyDescription = patient.study_description
    ds.ReferringPhysicianName = patient.referring
    ds.SeriesInstanceUID = series_uid
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "Synthetic Test Hospital"
    ds.ContentDate = patient.study_date
    ds.ContentTime = patient.study_time
    ds.InstanceCreationDate = dt.date(2026, 1, 15).strftime("%Y%m%d")
    ds.InstanceCreationTime = patient.study_time
    for keyword, value in patient.extra.items():
        setattr(ds, keyword, value)


def _pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {pixels.shape}")
    if not np.issubdtype(pixels.dtype, np.integer) or pixels.min() < 0 or pixels.max() >= 2**bits_stored:
        raise ValueError(f"pixels must be unsigned integers below 2**{bits_stored}")
    ds.Rows, ds.Columns = (int(s) for s in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()


def radiograph_dataset(
    pixels: np.ndarray,
    *,
    seed: str,
    modality: str = "DX",
    patient: Patient = Patient(),
    view_position: str = "LL",
    body_part: str = "LSPINE",
    pixel_spacing_mm: float | tuple[float, float] = 0.2,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    series_number: int = 1,
    instance_number: int = 1,
    study_uid: str | None = None,
    magnification: float | None = None,
    patient_orientation: Sequence[str] | None = None,
    distance_source_to_detector: float = 1150.0,
    burned_in_annotation: bool = False,
) -> Dataset:
    """A DX (for presentation) or CR image of `pixels` (unsigned ints, `bits_stored` bits).

    `view_position` follows DICOM ViewPosition (AP, PA, LL, RL, LATERAL ...); PatientOrientation is
    set to match a standard upright projection.  `magnification` adds
    EstimatedRadiographicMagnificationFactor (with `distance_source_to_detector`).  `pixel_spacing_mm`
    is the detector pitch (ImagerPixelSpacing), a number or (row, column).  `patient_orientation`
    overrides the default (e.g. ("R", "F") for a horizontally flipped AP image).
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    study = UID(study_uid) if study_uid else derive_uid(seed, "study")
    series = derive_uid(seed, "series", str(series_number))
    sop = derive_uid(seed, "instance", str(series_number), str(instance_number))
    ds = Dataset()
    _common(ds, patient, study, series, sop_class, sop)
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = f"{body_part} {view_position}"
    ds.BodyPartExamined = body_part
    lateral = view_position in ("LL", "RL", "LATERAL", "LAT")
    ds.ViewPosition = view_position
    # Upright projection: rows run head to feet; columns run to the patient's left (AP) or anterior (LL).
    ds.PatientOrientation = list(patient_orientation) if patient_orientation else (["A", "F"] if lateral else ["L", "F"])
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _pixels(ds, pixels, bits_stored)
    ds.PhotometricInterpretation = photometric
    ds.WindowCenter = int(pixels.mean())
    ds.WindowWidth = max(int(pixels.max()) - int(pixels.min()), 2)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    # numpy types isscalar as a TypeGuard, which does not narrow the else branch to the pair
    row_mm, col_mm = cast(tuple[float, float], (pixel_spacing_mm, pixel_spacing_mm) if np.isscalar(pixel_spacing_mm)
                          else pixel_spacing_mm)
    ds.ImagerPixelSpacing = [round(float(row_mm), 6), round(float(col_mm), 6)]
    if magnification:
        ds.EstimatedRadiographicMagnificationFactor = round(float(magnification), 6)
        ds.DistanceSourceToDetector = round(float(distance_source_to_detector), 1)
        ds.DistanceSourceToPatient = round(float(distance_source_to_detector) / magnification, 1)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = DicomSequence([_anatomic_region(body_part)])
        ds.AcquisitionContextSequence = DicomSequence([])
        ds.PositionerType = "NONE"
        ds.ViewCodeSequence = DicomSequence([_view_code(view_position)])
    return ds


_REGIONS = {
    "LSPINE": ("122496007", "Lumbar spine"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "SPINE": ("421060004", "Spine"),
    "CSPINE": ("122494005", "Cervical spine"),
}


_VIEWS = {
    "AP": ("399348003", "antero-posterior"),
    "PA": ("272479007", "postero-anterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
}


def _view_code(view_position: str) -> Dataset:
    code, meaning = _VIEWS.get(view_position, _VIEWS["AP"] if view_position not in ("LAT", "LATERAL") else _VIEWS["LL"])
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def _anatomic_region(body_part: str) -> Dataset:
    code, meaning = _REGIONS.get(body_part, _REGIONS["SPINE"])
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def ct_series(
    volume_hu: np.ndarray,
    *,
    seed: str,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    patient: Patient = Patient(study_description="CT LUMBAR SPINE"),
    series_number: int = 2,
    study_uid: str | None = None,
) -> list[Dataset]:
    """One axial CT slice per `volume_hu[k]` (HU, shape (slices, rows, columns)), feet to head.

    `spacing_mm` is (slice, row, column) spacing.
    """
    if volume_hu.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) volume, got shape {volume_hu.shape}")
    dz, dy, dx = (float(s) for s in spacing_mm)
    study = UID(study_uid) if study_uid else derive_uid(seed, "study")
    series = derive_uid(seed, "series", str(series_number))
    frame_of_reference = derive_uid(seed, "frame-of-reference")
    out = []
    stored = np.clip(np.rint(volume_hu + 1024), 0, 4095).astype(np.uint16)
    for k in range(volume_hu.shape[0]):
        sop = derive_uid(seed, "instance", str(series_number), str(k + 1))
        ds = Dataset()
        _common(ds, patient, study, series, CTImageStorage, sop)
        ds.Modality = "CT"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = "Synthetic CT spine"
        ds.BodyPartExamined = "LSPINE"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, round(k * dz, 3)]
        ds.SliceThickness = dz
        ds.PixelSpacing = [dy, dx]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        _pixels(ds, stored[k], 12)
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 400
        ds.WindowWidth = 1800
        out.append(ds)
    return out


_BODY_PARTS = {"lumbar": "LSPINE", "thoracic": "TSPINE", "thoracolumbar": "SPINE", "whole": "SPINE"}


def sample_dataset(
    sample,
    *,
    seed: str,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    patient: Patient = Patient(),
    **kwargs,
) -> Dataset:
    """A DX or CR dataset of a `SynthSample` (`inference.synth.sample`), for end-to-end tests and demos.

    The image (bone bright) is quantised to `bits_stored` bits and inverted for MONOCHROME1.
    ImagerPixelSpacing is the detector pitch: the sample's isocentre spacing x its magnification, which is
    written as EstimatedRadiographicMagnificationFactor with the source distances, so a reader recovers
    the isocentre spacing.  View, body part and PatientOrientation follow the sample.
    """
    levels = 2**bits_stored - 1
    image = np.clip(np.asarray(sample.image, dtype=np.float64), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    pixels = np.rint(image * levels).astype(np.uint16 if bits_stored > 8 else np.uint8)
    geometry = sample.meta.get("geometry", {})
    magnification = float(geometry.get("magnification", 1.0))
    sid = float(geometry.get("sid_mm", 1150.0))
    row_mm, col_mm = sample.pixel_spacing_mm
    view = "AP" if sample.view == "AP" else "LL"
    options = {
        "view_position": view,
        "body_part": _BODY_PARTS.get(sample.meta.get("field", ""), "SPINE"),
        "pixel_spacing_mm": (row_mm * magnification, col_mm * magnification),
        "magnification": magnification,
        "distance_source_to_detector": sid,
        "patient_orientation": sample.meta.get("patient_orientation"),
        "burned_in_annotation": bool(sample.meta.get("look", {}).get("burned_in")),
    }
    options.update(kwargs)
    return radiograph_dataset(
        pixels, seed=seed, modality=modality, patient=patient, photometric=photometric, bits_stored=bits_stored, **options
    )


def write_sample(sample, path, **kwargs) -> Dataset:
    """Write `sample` as a DICOM file at `path` (see `sample_dataset`); returns the dataset."""
    ds = sample_dataset(sample, **kwargs)
    ds.save_as(str(path), enforce_file_format=True)
    return ds
