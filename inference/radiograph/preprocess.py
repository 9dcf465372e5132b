"""From a DICOM radiograph to the image the network sees, and back.

Three steps, each a pure function so training, evaluation and the node share them exactly:

1. `decode`: pixels with the Modality and VOI LUTs applied sensibly, bone bright (MONOCHROME1 inverted),
   the calibrated pixel spacing at the patient plane, the view, and a turn to the canonical orientation
   (head up) read from PatientOrientation.
2. `network_scale`: how much to resample so that one network pixel is `TARGET_SPACING_MM` at the patient,
   or, with no calibration, so that the long side is `UNCALIBRATED_LONG_SIDE` pixels.
3. `normalise`: robust percentile scaling and CLAHE-like local contrast, so DRRs, raw DICOM and the
   already-equalised JPEG exports look alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

#: Network pixel size (mm at the patient) when the image carries a pixel spacing.
TARGET_SPACING_MM = 1.25
#: Long side (network pixels) of an image without pixel spacing (about a whole-spine view at ~1.3 mm).
UNCALIBRATED_LONG_SIDE = 576
#: Never feed the network more than this along either side (keeps inference within ~1 s on 2 cores).
MAX_NETWORK_SIDE = 1024
#: The network downsamples 4 times; inputs are padded to a multiple of this.
PAD_MULTIPLE = 32

FRONTAL_VIEWS = {"AP": "AP", "PA": "PA"}
LATERAL_VIEWS = {"LL": "LAT", "RL": "LAT", "LAT": "LAT", "LATERAL": "LAT", "LLD": "LAT", "RLD": "LAT"}


class PreprocessError(ValueError):
    """A dataset cannot be turned into a radiograph image (message names the attribute)."""


@dataclass(frozen=True)
class Orientation:
    """A turn of the stored pixel grid to the canonical one (rows run head to feet).

    Applied in this order to go to canonical: transpose, then flip rows, then flip columns, then `crop` (the
    content inside a uniform frame, see `content_box`).
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False
    #: (top, left, bottom, right) of the canonical grid kept, and that grid's full (rows, columns).
    crop: tuple[int, int, int, int] | None = None
    full_shape: tuple[int, int] | None = None

    @property
    def identity(self) -> bool:
        """True when the stored grid is already canonical."""
        return not (self.transpose or self.flip_rows or self.flip_columns or self.crop)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Stored grid -> canonical grid (works on the last two axes)."""
        out = np.swapaxes(array, -1, -2) if self.transpose else array
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.flip_columns:
            out = out[..., :, ::-1]
        if self.crop is not None:
            top, left, bottom, right = self.crop
            out = out[..., top:bottom, left:right]
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Canonical grid -> stored grid (inverse of `to_canonical`; outside a crop: zeros)."""
        out = array
        if self.crop is not None and self.full_shape is not None:
            top, left, bottom, right = self.crop
            full = np.zeros((*array.shape[:-2], *self.full_shape), dtype=array.dtype)
            full[..., top:bottom, left:right] = array
            out = full
        if self.flip_columns:
            out = out[..., :, ::-1]
        if self.flip_rows:
            out = out[..., ::-1, :]
        return np.swapaxes(out, -1, -2) if self.transpose else out

    def point_from_canonical(self, point: tuple[float, float], canonical_shape: tuple[int, int]) -> tuple[float, float]:
        """A continuous (x, y) point of the canonical grid in stored-grid coordinates."""
        x, y = point
        rows, cols = canonical_shape
        if self.crop is not None and self.full_shape is not None:
            x, y = x + self.crop[1], y + self.crop[0]
            rows, cols = self.full_shape
        if self.flip_columns:
            x = cols - x
        if self.flip_rows:
            y = rows - y
        return (y, x) if self.transpose else (x, y)

    def canonical_shape(self, stored_shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the canonical grid for a stored grid of `stored_shape`."""
        if self.crop is not None:
            return (self.crop[2] - self.crop[0], self.crop[3] - self.crop[1])
        return (stored_shape[1], stored_shape[0]) if self.transpose else (stored_shape[0], stored_shape[1])

    def with_crop(self, box: tuple[int, int, int, int], full_shape: tuple[int, int]) -> Orientation:
        """This turn, then keep `box` (top, left, bottom, right) of the canonical grid of `full_shape`."""
        from dataclasses import replace

        return replace(self, crop=box, full_shape=full_shape)


@dataclass(frozen=True)
class Radiograph:
    """A decoded radiograph in canonical orientation (head up), bone bright."""

    pixels: np.ndarray  # float32 (rows, columns), canonical orientation, larger = more attenuation
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing in the canonical grid, patient plane
    spacing_source: str
    view: str | None  # "AP", "PA", "LAT" or None
    #: For lateral views: +1 when anterior lies toward larger column index in the canonical grid, -1 toward
    #: smaller, None when the header does not say.
    anterior_sign: int | None
    orientation: Orientation
    stored_shape: tuple[int, int]
    notes: tuple[str, ...] = ()
    #: For frontal views: +1 when the patient's left lies toward larger column index in the canonical grid,
    #: -1 toward smaller, None when the header does not say (PatientOrientation absent).
    left_sign: int | None = None


#: What the header's spacing means for vertebral heights; said only where heights are measured (see
#: `analysis.FractureStep`): on a frontal view, or with grading switched off, they only puzzle a reader.
NO_MAGNIFICATION_NOTE = "no magnification factor in the header: heights are at the detector plane (typically 10-20% too large)"
NO_SPACING_NOTE = "no pixel spacing in the header: heights cannot be given in mm"
HEIGHT_SCALE_NOTES = (NO_MAGNIFICATION_NOTE, NO_SPACING_NOTE)


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str, tuple[str, ...]]:
    """(row, column) spacing in mm at the patient plane, where it came from, and notes for the reader.

    PixelSpacing with a calibration type is already at the patient; ImagerPixelSpacing is at the detector
    and is divided by EstimatedRadiographicMagnificationFactor (or SID/SOD) when the header has it.
    """
    notes: list[str] = []

    def pair(keyword: str) -> tuple[float, float] | None:
        value = ds.get(keyword)
        if value is None:
            return None
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            notes.append(f"{keyword} {value!r} is not a pair of numbers; ignored")
            return None
        if not (row > 0 and col > 0):
            notes.append(f"{keyword} {row}\\{col} is not positive; ignored")
            return None
        return (row, col)

    calibrated = pair("PixelSpacing")
    imager = pair("ImagerPixelSpacing")
    if calibrated and ds.get("PixelSpacingCalibrationType"):
        return calibrated, "PixelSpacing", tuple(notes)
    if imager:
        factor = ds.get("EstimatedRadiographicMagnificationFactor")
        try:
            factor = float(factor) if factor is not None else None
        except (TypeError, ValueError):
            factor = None
        if factor and 0.5 < factor < 3.0:
            return (imager[0] / factor, imager[1] / factor), "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor", tuple(notes)
        sid, sod = ds.get("DistanceSourceToDetector"), ds.get("DistanceSourceToPatient")
        try:
            ratio = float(sid) / float(sod) if sid and sod else None
        except (TypeError, ValueError, ZeroDivisionError):
            ratio = None
        if ratio and 1.0 <= ratio < 3.0:
            return (imager[0] / ratio, imager[1] / ratio), "ImagerPixelSpacing * DistanceSourceToPatient / DistanceSourceToDetector", tuple(notes)
        notes.append(NO_MAGNIFICATION_NOTE)
        return imager, "ImagerPixelSpacing", tuple(notes)
    if calibrated:
        return calibrated, "PixelSpacing", tuple(notes)
    notes.append(NO_SPACING_NOTE)
    return None, "none", tuple(notes)


def view_of(ds: Dataset) -> str | None:
    """"AP", "PA" or "LAT" from ViewPosition, else from PatientOrientation, else None."""
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position in FRONTAL_VIEWS:
        return FRONTAL_VIEWS[position]
    if position in LATERAL_VIEWS:
        return LATERAL_VIEWS[position]
    orientation = _patient_orientation(ds)
    if orientation:
        along_row = orientation[0] if orientation[0][:1] not in ("H", "F") else orientation[1]
        if along_row[:1] in ("A", "P"):
            return "LAT"
        if along_row[:1] in ("L", "R"):
            return "AP"
    return None


def _patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    if value is None:
        return None
    parts = [str(v).strip().upper() for v in (value if not isinstance(value, str) else value.split("\\"))]
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


def orientation_of(ds: Dataset) -> Orientation:
    """The turn that brings the head to the top of the image, read from PatientOrientation; a frontal view shown
    as from behind (the patient's right towards higher columns) is also mirrored to the usual display, the
    patient's right on the viewer's left, which the models read best (mirrored, they found other vertebrae)."""
    orientation = _patient_orientation(ds)
    if orientation is None:
        return Orientation()
    along_row, along_column = orientation
    if along_column[:1] in ("H", "F"):
        return Orientation(flip_rows=along_column[:1] == "H", flip_columns=along_row[:1] == "R")
    if along_row[:1] in ("H", "F"):
        # The spine runs along the rows: transpose, then the former row direction runs down the rows.
        return Orientation(transpose=True, flip_rows=along_row[:1] == "H", flip_columns=along_column[:1] == "R")
    return Orientation()


def _anterior_sign(ds: Dataset, orientation: Orientation) -> int | None:
    return _row_sign(ds, orientation, {"A": 1, "P": -1})


def _left_sign(ds: Dataset, orientation: Orientation) -> int | None:
    return _row_sign(ds, orientation, {"L": 1, "R": -1})


def _row_sign(ds: Dataset, orientation: Orientation, signs: dict[str, int]) -> int | None:
    """+1 / -1 when the patient direction named +1 in `signs` runs along / against canonical columns."""
    patient_orientation = _patient_orientation(ds)
    if patient_orientation is None:
        return None
    # After the turn, the direction along a canonical row is the stored column direction when transposed.
    along = patient_orientation[1] if orientation.transpose else patient_orientation[0]
    sign = signs.get(along[:1])
    if sign is None:
        return None
    return -sign if orientation.flip_columns else sign


def padding_mask(ds: Dataset, raw: np.ndarray) -> np.ndarray | None:
    """Pixels the modality marked as padding (PixelPaddingValue, up to PixelPaddingRangeLimit), on the stored
    values; None without them. They are not anatomy, and a wide padded border would set the contrast."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        a = int(ds.PixelPaddingValue)
        b = int(ds.get("PixelPaddingRangeLimit", a))
    except (TypeError, ValueError):
        return None
    mask = (raw >= min(a, b)) & (raw <= max(a, b))
    return mask if mask.any() and not mask.all() else None


def fill_from_nearest(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`values` with the pixels under `mask` set to the nearest pixel's outside it, as the network's own
    padding repeats the edge. A padded border filled with one value, dark or bright, is a hard frame the
    models misread (measured on a real whole-spine film with a 150 px padded border: 0 or 3 vertebrae where
    the unpadded film gives 11, with the frame; 11-12 with the edge repeated, at most one of them in the
    repeated rows)."""
    from scipy import ndimage

    nearest = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
    return values[tuple(nearest)]


#: A frame counts when it covers this share of the image, and leaves at least `MIN_CONTENT_PX` either way.
MIN_FRAME_FRACTION = 0.02
MIN_CONTENT_PX = 32


def content_box(values: np.ndarray, uniform: float = 0.99) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) inside a frame of edge rows and columns that hold the image's lowest or highest
    value almost everywhere (an electronic shutter, an undeclared padding: air and bone are never that even);
    None when there is no such frame. Filled in, the frame misled the models (a 400 px black frame around a
    real whole-spine film: 22 "vertebrae" where the film alone gives 11)."""
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return None
    even_rows = (np.mean(values == lo, axis=1) >= uniform) | (np.mean(values == hi, axis=1) >= uniform)
    even_cols = (np.mean(values == lo, axis=0) >= uniform) | (np.mean(values == hi, axis=0) >= uniform)
    rows, cols = np.flatnonzero(~even_rows), np.flatnonzero(~even_cols)
    if rows.size < MIN_CONTENT_PX or cols.size < MIN_CONTENT_PX:
        return None
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    if box[2] - box[0] < MIN_CONTENT_PX or box[3] - box[1] < MIN_CONTENT_PX:
        return None
    kept = (box[2] - box[0]) * (box[3] - box[1])
    return box if kept <= (1.0 - MIN_FRAME_FRACTION) * values.size else None


def _check_decoded_range(ds: Dataset, raw: np.ndarray) -> None:
    """Compressed pixel data that decodes to values BitsStored cannot hold is damaged (a JPEG-LS stream cut to
    a third decoded to 32906 in a 12-bit image, without an error), or its header disagrees with its
    codestream (a vendor fault): either way the values cannot be trusted, so it is not analysed (skipped with
    this reason; the study's report says so).  Native data is masked to BitsStored by pydicom."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "BitsStored" not in ds:
        return
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0)) else (0, 2**bits - 1)
    if raw.size and (int(raw.min()) < lo or int(raw.max()) > hi):
        raise PreprocessError(f"compressed pixel data decodes to values outside BitsStored {bits} "
                              f"({int(raw.min())}..{int(raw.max())}): the data is damaged, or its header does not"
                              " match its codestream")


def stored_values(ds: Dataset) -> np.ndarray:
    """Pixel values after the Modality LUT and a VOI transform that does not throw bone detail away; padding
    pixels (`padding_mask`) are NaN."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise PreprocessError(f"SOP instance {ds.get('SOPInstanceUID', '?')} has no PixelData")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise PreprocessError(f"SamplesPerPixel {ds.SamplesPerPixel}: only grayscale radiographs are analysed")
    raw = ds.pixel_array
    if raw.ndim == 3:
        raw = raw[0]  # multi-frame: the first frame (the spine-xr analysis skips such images)
    _check_decoded_range(ds, raw)
    padding = padding_mask(ds, raw)
    values = apply_modality_lut(raw, ds).astype(np.float32)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            windowed = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
        except (ValueError, KeyError, IndexError, TypeError):
            windowed = None
        # A narrow display window clips bone detail; keep it only if it leaves most pixels unsaturated.
        if windowed is not None and np.ptp(windowed) > 0:
            lo, hi = float(windowed.min()), float(windowed.max())
            saturated = float(np.mean((windowed <= lo) | (windowed >= hi)))
            if saturated < 0.25:
                values = windowed
    if padding is not None:
        values[padding] = np.nan
    return values


def decode(ds: Dataset) -> Radiograph:
    """Decode one DX/CR dataset into a canonical, bone-bright `Radiograph`."""
    values = stored_values(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "MONOCHROME1":
        values = np.nanmax(values) - values
    elif photometric != "MONOCHROME2":
        raise PreprocessError(f"PhotometricInterpretation {photometric}: only MONOCHROME1/2 radiographs are analysed")
    padded = np.isnan(values)
    if padded.any():
        values = fill_from_nearest(values, padded)
    orientation = orientation_of(ds)
    spacing, source, notes = pixel_spacing(ds)
    if spacing is not None and orientation.transpose:
        spacing = (spacing[1], spacing[0])
    canonical = orientation.to_canonical(values)
    box = content_box(canonical)
    if box is not None:
        framed = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / canonical.size
        orientation = orientation.with_crop(box, canonical.shape)
        canonical = canonical[box[0]:box[2], box[1]:box[3]]  # what `orientation.to_canonical` now gives
        notes = notes + (f"a uniform frame ({100 * framed:.0f} % of the image, an electronic shutter or an "
                         "undeclared padding) left out of the analysis",)
    canonical = np.ascontiguousarray(canonical, dtype=np.float32)
    view = view_of(ds)
    anterior = _anterior_sign(ds, orientation) if view == "LAT" else None
    left = _left_sign(ds, orientation) if view != "LAT" else None
    extra: tuple[str, ...] = ()
    if orientation.transpose or orientation.flip_rows or orientation.flip_columns:
        stated = "\\".join(_patient_orientation(ds) or ())
        done = [what for what, applies in (("turned head-up", orientation.transpose or orientation.flip_rows),
                                           ("mirrored to the patient's right on the viewer's left",
                                            orientation.flip_columns)) if applies]
        # "for analysis only": a reader looking at an SC drawn as stored took "mirrored" to describe the picture.
        extra = (f"image {' and '.join(done)} for the analysis only; shown and measured as stored"
                 f" (PatientOrientation {stated})",)
    return Radiograph(
        pixels=canonical,
        pixel_spacing_mm=spacing,
        spacing_source=source,
        view=view,
        anterior_sign=anterior,
        orientation=orientation,
        stored_shape=(int(values.shape[0]), int(values.shape[1])),
        notes=notes + extra,
        left_sign=left,
    )


def network_scale(shape: tuple[int, int], spacing_mm: tuple[float, float] | None, zoom: float = 1.0) -> tuple[float, float]:
    """(row, column) factors from the source grid to the network grid (network px per source px)."""
    rows, cols = shape
    if spacing_mm is not None:
        scale = (spacing_mm[0] / TARGET_SPACING_MM * zoom, spacing_mm[1] / TARGET_SPACING_MM * zoom)
    else:
        s = UNCALIBRATED_LONG_SIDE / max(rows, cols) * zoom
        scale = (s, s)
    # Cap the network grid; keep the aspect ratio of the physical pixels.
    cap = min(1.0, MAX_NETWORK_SIDE / max(rows * scale[0], 1.0), MAX_NETWORK_SIDE / max(cols * scale[1], 1.0))
    return (scale[0] * cap, scale[1] * cap)


def resample(image: np.ndarray, scale: tuple[float, float] | None = None, *, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Resize the last two axes of `image` (2-D, or channels first) by (row, column) `scale` or onto `shape`,
    bilinear, anti-aliased when shrinking (float32 out)."""
    import torch
    import torch.nn.functional as F

    rows, cols = image.shape[-2:]
    if shape is None:
        if scale is None:
            raise ValueError("resample needs a scale or a target shape")
        shape = (max(int(round(rows * scale[0])), 1), max(int(round(cols * scale[1])), 1))
    out_shape = (int(shape[0]), int(shape[1]))
    if out_shape == (rows, cols):
        return image.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(1, -1, rows, cols)
    shrinking = out_shape[0] < rows or out_shape[1] < cols
    out = F.interpolate(tensor, size=out_shape, mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0].reshape(*image.shape[:-2], *out_shape).numpy()


def normalise(image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.5, clahe: bool = True) -> np.ndarray:
    """Robust [0, 1] scaling and local contrast equalisation (float32 out)."""
    from skimage.exposure import equalize_adapthist

    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, (low_pct, high_pct)) if image.size else (0.0, 1.0)
    if not hi > lo:
        return np.zeros_like(image)
    scaled = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    if not clahe:
        return scaled
    kernel = max(8, int(round(max(image.shape) / 8)))
    return equalize_adapthist(scaled, kernel_size=kernel, clip_limit=0.01).astype(np.float32)


def pad_to_multiple(image: np.ndarray, multiple: int = PAD_MULTIPLE) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad bottom/right with edge values to a multiple of `multiple`; returns the array and the original shape."""
    rows, cols = image.shape
    pr, pc = (-rows) % multiple, (-cols) % multiple
    if pr or pc:
        image = np.pad(image, ((0, pr), (0, pc)), mode="edge")
    return image, (rows, cols)


def prepare(image: np.ndarray, spacing_mm: tuple[float, float] | None, zoom: float = 1.0) -> tuple[np.ndarray, tuple[float, float]]:
    """Source pixels (canonical, bone bright) -> normalised network image and the (row, column) scale used."""
    scale = network_scale(image.shape, spacing_mm, zoom)
    return normalise(resample(image, scale)), scale


def has_contrast(pixels: np.ndarray) -> bool:
    """False for an image of (almost) one value: blank, constant, or a rescale slope of 0. A subsample is
    enough to see contrast."""
    lo, hi = np.percentile(pixels[::4, ::4], [1.0, 99.5])
    return bool(hi - lo > 1e-6 * max(1.0, abs(float(hi))))
