"""Synthetic studies with hand-built results, for the report tests, the viewer test and `make render-docs`.

Each case is a valid source study (written by `inference.synth.dicom`) plus a `StudyResult` built
from the same simple shapes the image was drawn with, so every mask, outline and height is known
exactly: a lateral lumbar DX (MONOCHROME2) with an L1 wedge fracture and L4–S1 instrumentation, an
AP lumbar CR (MONOCHROME1) with bilateral screws and rods, and a small CT series.
Nothing here is a model result; it is test data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage
from skimage import draw

from inference.results import (
    FAILURE_MODES,
    Complication,
    Finding,
    FindingKind,
    FractureAssessment,
    FractureShape,
    GenantGrade,
    HardwareStatus,
    HeightMeasurement,
    ImageResult,
    Implant,
    ImplantKind,
    Measurement,
    MeasurementKind,
    ModelInfo,
    Point,
    RegionMask,
    ScreeningOutcome,
    ScreeningVerdict,
    Severity,
    Side,
    SourceImage,
    StudyResult,
    Vertebra,
    VertebralHeights,
)
from inference.synth.dicom import Patient, ct_series, radiograph_dataset

_PATIENT = Patient()
_CT_PATIENT = Patient(study_description="CT LUMBAR SPINE")
MODELS = (ModelInfo("spine-xr-vertebrae", "1.2.0"), ModelInfo("spine-xr-hardware", "0.9.1"))


@dataclass(frozen=True)
class Case:
    """Source datasets of one study and the result an analysis of it returned."""

    name: str
    sources: tuple[Dataset, ...]
    result: StudyResult


def _polygon_mask(shape: tuple[int, int], polygon: list[Point]) -> np.ndarray:
    """Pixels whose centres lie inside a SCOORD polygon."""
    xs = np.array([p[0] - 0.5 for p in polygon])
    ys = np.array([p[1] - 0.5 for p in polygon])
    rr, cc = draw.polygon(ys, xs, shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth blotches of unit spread: some anatomy-like unevenness that still compresses well."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), sigma=max(shape) / 60)
    return smooth / max(float(smooth.std()), 1e-9)


@dataclass(frozen=True)
class _Body:
    level: str
    polygon: list[Point]
    heights: tuple[float, float, float] | None  # anterior, middle, posterior (pixels)


def _lateral_bodies(scale: float) -> list[_Body]:
    """L1-L5 bodies and the sacrum on a lateral view; anterior is to the right (PatientOrientation A\\F)."""
    bodies = []
    top = 60 * scale
    height, gap, width = 62 * scale, 16 * scale, 118 * scale
    x0 = 150 * scale
    for i, level in enumerate(("L1", "L2", "L3", "L4", "L5")):
        y0 = top + i * (height + gap)
        x = x0 + i * 6 * scale  # slight lordotic drift
        a_loss = 0.38 * height if level == "L1" else 0.0  # L1 wedge fracture: anterior height reduced
        polygon = [(x, y0), (x + width, y0 + a_loss), (x + width, y0 + height), (x, y0 + height)]
        bodies.append(_Body(level, polygon, (height - a_loss, height - a_loss / 2, height)))
    y0 = top + 5 * (height + gap)
    x = x0 + 34 * scale
    bodies.append(_Body("S1", [(x, y0), (x + width * 1.1, y0 + 8 * scale), (x + width * 0.7, y0 + 150 * scale),
                               (x - 10 * scale, y0 + 120 * scale)], None))
    return bodies


def _heights(body: _Body, spacing: float) -> VertebralHeights | None:
    if body.heights is None:
        return None
    xs = [p[0] for p in body.polygon]
    x0, x1 = min(xs), max(xs)
    (ax, ay_top), (px, py_top) = body.polygon[1], body.polygon[0]
    bottom = body.polygon[2][1]
    inset = 0.08 * (x1 - x0)
    a_x, p_x, m_x = x1 - inset, x0 + inset, (x0 + x1) / 2
    top_at = lambda x: py_top + (ay_top - py_top) * (x - px) / (ax - px)  # noqa: E731
    mk = lambda x: HeightMeasurement(round((bottom - top_at(x)) * spacing, 2), (x, top_at(x)), (x, bottom))  # noqa: E731
    return VertebralHeights(anterior=mk(a_x), middle=mk(m_x), posterior=mk(p_x))


def _fracture(body: _Body) -> FractureAssessment | None:
    if body.heights is None:
        return None
    a, m, p = body.heights
    loss = 100.0 * (1.0 - min(a, m) / p)
    grade = GenantGrade.from_height_loss(loss)
    shape = FractureShape.WEDGE if grade > GenantGrade.NORMAL else FractureShape.NONE
    return FractureAssessment(grade=grade, shape=shape, height_loss_pct=round(loss, 1))


def _vertebra(body: _Body, grid: tuple[int, int], spacing: float) -> Vertebra:
    dense = _polygon_mask(grid, body.polygon)
    rows, cols = np.nonzero(dense)
    return Vertebra(
        level=body.level,
        mask=RegionMask.from_dense(dense),
        outline=tuple(body.polygon),
        centroid=(float(cols.mean()) + 0.5, float(rows.mean()) + 0.5),
        heights=_heights(body, spacing),
        fracture=_fracture(body),
        score=0.97,
    )


def _implant(kind: ImplantKind, polygon: list[Point], grid: tuple[int, int], levels: tuple[str, ...], side: Side,
             complications: tuple[Complication, ...] = ()) -> Implant:
    dense = _polygon_mask(grid, polygon)
    rows, cols = np.nonzero(dense)
    return Implant(
        kind=kind,
        mask=RegionMask.from_dense(dense),
        outline=tuple(polygon),
        centroid=(float(cols.mean()) + 0.5, float(rows.mean()) + 0.5),
        levels=levels,
        side=side,
        complications=complications,
        # The hand-built cases show a model that looks for every failure mode of its implants.
        assessed=FAILURE_MODES[kind],
        score=0.95,
    )


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _paint(image: np.ndarray, polygon: list[Point], value: float) -> None:
    image[_polygon_mask(image.shape, polygon)] = value


def _source_image(ds: Dataset, view: str) -> SourceImage:
    spacing = float(ds.ImagerPixelSpacing[0])
    return SourceImage(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uids=(str(ds.SOPInstanceUID),),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=(spacing, spacing),
        spacing_source="ImagerPixelSpacing",
        view=view,
        modality=str(ds.Modality),
    )


def lateral_dx(scale: float = 1.0, *, seed: str = "reports-lateral-dx", patient: Patient = _PATIENT) -> Case:
    """Lateral lumbar DX, MONOCHROME2: L1 wedge fracture (Genant 2), pedicle screws L4/L5 and a rod."""
    rows, cols = int(640 * scale), int(480 * scale)
    grid = (rows, cols)
    spacing = 0.42 / scale  # vertebral bodies ~26 mm high, as in an adult
    yy, xx = np.mgrid[0:rows, 0:cols]
    image = 900 + 500 * np.exp(-((xx - 0.45 * cols) / (0.35 * cols)) ** 2) + 80 * _texture(grid, 1)
    bodies = _lateral_bodies(scale)
    for body in bodies:
        _paint(image, body.polygon, 2300)
    # Screws run from posterior (left) into the body; the rod joins the screw heads.
    screws = []
    for level, body in ((("L4",), bodies[3]), (("L5",), bodies[4])):
        bx0 = min(p[0] for p in body.polygon)
        cy = (body.polygon[0][1] + body.polygon[3][1]) / 2
        poly = _rect(bx0 - 40 * scale, cy - 5 * scale, bx0 + 75 * scale, cy + 5 * scale)
        _paint(image, poly, 3900)
        screws.append(_implant(ImplantKind.PEDICLE_SCREW, poly, grid, level, Side.UNKNOWN))
    rod_x = min(p[0] for p in bodies[3].polygon) - 46 * scale
    rod = _rect(rod_x, screws[0].outline[0][1] - 10 * scale, rod_x + 8 * scale, screws[1].outline[2][1] + 10 * scale)
    _paint(image, rod, 3800)
    stored = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    ds = radiograph_dataset(stored, seed=seed, modality="DX", view_position="LL", patient=patient,
                            pixel_spacing_mm=spacing, photometric="MONOCHROME2")
    ds.WindowCenter, ds.WindowWidth = 2200, 3400
    vertebrae = tuple(_vertebra(b, grid, spacing) for b in bodies)
    implants = (*screws, _implant(ImplantKind.ROD, rod, grid, ("L4", "L5"), Side.UNKNOWN))
    l1 = vertebrae[0]
    finding = Finding(
        kind=FindingKind.VERTEBRAL_COMPRESSION_FRACTURE,
        severity=Severity.MODERATE,
        levels=("L1",),
        evidence=l1.outline,
        description=f"L1 anterior wedge compression, height loss {l1.fracture.height_loss_pct:.0f} %" if l1.fracture else "",
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
    lordosis_pts = (bodies[0].polygon[0], bodies[0].polygon[1], bodies[4].polygon[3], bodies[4].polygon[2])
    image_result = ImageResult(
        source=_source_image(ds, "LAT"),
        vertebrae=vertebrae,
        implants=implants,
        findings=(finding,),
        measurements=(Measurement(MeasurementKind.LUMBAR_LORDOSIS, 38.5, "deg",
                                  "angle between the L1 superior and L5 inferior endplates", ("L1", "L5"),
                                  lordosis_pts),
                      # As the radiograph analysis reports a graded vertebra: its loss, shown by its outline.
                      Measurement(MeasurementKind.HEIGHT_LOSS, l1.fracture.height_loss_pct if l1.fracture else 0.0,
                                  "%", "largest of anterior/middle vs posterior height", ("L1",), l1.outline)),
        notes=("synthetic test image",),
    )
    result = StudyResult(
        study_instance_uid=str(ds.StudyInstanceUID),
        analysis="spine-xr",
        models=MODELS,
        images=(image_result,),
        verdict=ScreeningVerdict(
            outcome=ScreeningOutcome.FINDING_PRESENT,
            reasons=("L1 compression fracture, Genant grade 2",),
            hardware=HardwareStatus.INTACT,
            instrumentation="posterior instrumentation L4–L5: 2 pedicle screws, 1 rod",
        ),
    )
    return Case("lateral-dx", (ds,), result)


def ap_cr(scale: float = 1.0, *, seed: str = "reports-ap-cr", patient: Patient = _PATIENT) -> Case:
    """AP lumbar CR, MONOCHROME1 (bone has LOW stored values): bilateral L3-L4 screws and rods, one loose."""
    rows, cols = int(600 * scale), int(500 * scale)
    grid = (rows, cols)
    spacing = 0.3 / scale
    yy, xx = np.mgrid[0:rows, 0:cols]
    density = 0.25 + 0.25 * np.exp(-((xx - cols / 2) / (0.3 * cols)) ** 2) + 0.012 * _texture(grid, 2)
    levels = ("L2", "L3", "L4", "L5")
    bodies = []
    for i, level in enumerate(levels):
        y0 = (70 + i * 120) * scale
        poly = _rect((cols / 2) - 75 * scale, y0, (cols / 2) + 75 * scale, y0 + 90 * scale)
        bodies.append(_Body(level, poly, None))
        _paint(density, poly, 0.8)
    implants = []
    for level in ("L3", "L4"):
        body = bodies[levels.index(level)]
        cy = (body.polygon[0][1] + body.polygon[2][1]) / 2
        for side, sign in ((Side.RIGHT, -1), (Side.LEFT, 1)):  # patient's right is on the image left (AP)
            cx = cols / 2 + sign * 45 * scale
            poly = _rect(cx - 30 * scale, cy - 6 * scale, cx + 30 * scale, cy + 6 * scale)
            _paint(density, poly, 1.0)
            loose = (Complication.SCREW_LOOSENING,) if (level == "L4" and side is Side.LEFT) else ()
            implants.append(_implant(ImplantKind.PEDICLE_SCREW, poly, grid, (level,), side, loose))
    top = bodies[1].polygon[0][1] + 30 * scale
    bottom = bodies[2].polygon[2][1] - 30 * scale
    for side, sign in ((Side.RIGHT, -1), (Side.LEFT, 1)):
        cx = cols / 2 + sign * 80 * scale
        poly = _rect(cx - 5 * scale, top, cx + 5 * scale, bottom)
        _paint(density, poly, 1.0)
        implants.append(_implant(ImplantKind.ROD, poly, grid, ("L3", "L4"), side))
    stored = np.clip(np.rint(4095 * (1.0 - density)), 0, 4095).astype(np.uint16)  # MONOCHROME1: dense = low
    ds = radiograph_dataset(stored, seed=seed, modality="CR", view_position="AP", patient=patient,
                            pixel_spacing_mm=spacing, photometric="MONOCHROME1")
    ds.WindowCenter, ds.WindowWidth = 2000, 3600
    vertebrae = tuple(_vertebra(b, grid, spacing) for b in bodies)
    loose_screw = next(i for i in implants if i.complications)
    image_result = ImageResult(
        source=_source_image(ds, "AP"),
        vertebrae=vertebrae,
        implants=tuple(implants),
        findings=(Finding(FindingKind.SCREW_LOOSENING, Severity.MODERATE, ("L4",), loose_screw.outline,
                          "lucent halo around the left L4 screw", str(ds.SOPInstanceUID)),),
    )
    result = StudyResult(
        study_instance_uid=str(ds.StudyInstanceUID),
        analysis="spine-xr",
        models=MODELS,
        images=(image_result,),
        verdict=ScreeningVerdict(
            outcome=ScreeningOutcome.FINDING_PRESENT,
            reasons=("possible loosening of the left L4 pedicle screw",),
            hardware=HardwareStatus.POSSIBLE_COMPLICATION,
            instrumentation="posterior instrumentation L3–L4: 4 pedicle screws, 2 rods",
        ),
    )
    return Case("ap-cr", (ds,), result)


def ct(*, seed: str = "reports-ct", slices: int = 24, size: int = 64, patient: Patient = _CT_PATIENT) -> Case:
    """A small axial CT series: L3 and L4 bodies as blocks, one pedicle screw in L4."""
    volume = np.full((slices, size, size), -50.0)
    grid3 = volume.shape
    l3 = np.zeros(grid3, dtype=bool)
    l4 = np.zeros(grid3, dtype=bool)
    screw = np.zeros(grid3, dtype=bool)
    c = size // 2
    u = size / 64  # in-plane unit: the shapes scale with the matrix
    body = (slice(c - round(12 * u), c + round(10 * u)), slice(c - round(14 * u), c + round(14 * u)))
    # Slices run feet to head: L4 is lower (smaller index) than L3.
    l4[round(0.08 * slices):round(0.42 * slices), body[0], body[1]] = True
    l3[round(0.54 * slices):round(0.88 * slices), body[0], body[1]] = True
    k = round(0.25 * slices)
    screw[k - max(1, slices // 24):k + max(1, slices // 24), c + round(4 * u):c + round(22 * u),
          c + round(6 * u):c + round(9 * u)] = True
    volume[l3 | l4] = 700.0
    volume[screw] = 2500.0
    datasets = ct_series(volume, seed=seed, spacing_mm=(2.5, 0.8, 0.8), patient=patient)
    first = datasets[0]
    source = SourceImage(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        rows=size,
        columns=size,
        pixel_spacing_mm=(0.8, 0.8),
        spacing_source="PixelSpacing",
        view=None,
        modality="CT",
    )

    def vert(level: str, mask: np.ndarray) -> Vertebra:
        k, r, col = np.nonzero(mask)
        return Vertebra(level=level, mask=RegionMask.from_dense(mask), outline=(),
                        centroid=(float(col.mean()) + 0.5, float(r.mean()) + 0.5))

    _, r, col = np.nonzero(screw)
    implant = Implant(kind=ImplantKind.PEDICLE_SCREW, mask=RegionMask.from_dense(screw), outline=(),
                      centroid=(float(col.mean()) + 0.5, float(r.mean()) + 0.5), levels=("L4",), side=Side.LEFT,
                      assessed=FAILURE_MODES[ImplantKind.PEDICLE_SCREW])
    image_result = ImageResult(source=source, vertebrae=(vert("L3", l3), vert("L4", l4)), implants=(implant,))
    result = StudyResult(
        study_instance_uid=str(first.StudyInstanceUID),
        analysis="spine-ct",
        models=(ModelInfo("spine-ct-vertebrae", "0.1.0"),),
        images=(image_result,),
        verdict=ScreeningVerdict(outcome=ScreeningOutcome.NO_FINDING, hardware=HardwareStatus.INTACT,
                                 instrumentation="1 pedicle screw L4"),
    )
    return Case("ct", tuple(datasets), result)
