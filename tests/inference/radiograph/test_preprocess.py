"""Decoding radiographs: LUTs, MONOCHROME1, spacing with magnification, view, orientation, scaling."""

from __future__ import annotations

import numpy as np
import pytest

from inference.radiograph import preprocess
from inference.synth.dicom import radiograph_dataset


def _bright_stripe(rows: int = 64, cols: int = 48) -> np.ndarray:
    """12-bit MONOCHROME2-sense pixels: a bright (bone) vertical stripe on a darker background."""
    pixels = np.full((rows, cols), 800, dtype=np.uint16)
    pixels[:, 20:28] = 3000
    pixels[:8, :] = 1500  # a marker band in the first stored rows
    return pixels


def test_dx_monochrome2_spacing_with_magnification() -> None:
    ds = radiograph_dataset(_bright_stripe(), seed="pre-1", modality="DX", view_position="AP", pixel_spacing_mm=0.2, magnification=1.25)
    rad = preprocess.decode(ds)
    assert rad.pixel_spacing_mm == pytest.approx((0.16, 0.16))
    assert rad.spacing_source == "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    assert rad.view == "AP" and rad.anterior_sign is None
    assert rad.orientation.identity
    assert rad.pixels[30, 24] > rad.pixels[30, 5]  # bone stays bright


def test_cr_monochrome1_is_inverted_to_bone_bright() -> None:
    stripe = _bright_stripe()
    mono1 = (4095 - stripe).astype(np.uint16)  # MONOCHROME1: low values display white
    ds = radiograph_dataset(mono1, seed="pre-2", modality="CR", view_position="LL", photometric="MONOCHROME1")
    rad = preprocess.decode(ds)
    assert rad.pixels[30, 24] > rad.pixels[30, 5]
    assert rad.view == "LAT"
    assert rad.anterior_sign == 1  # PatientOrientation A\F: columns run anterior
    assert rad.spacing_source == "ImagerPixelSpacing"
    assert any("magnification" in n for n in rad.notes)



@pytest.mark.parametrize(("photometric", "pad", "limit"), [("MONOCHROME2", 0, None), ("MONOCHROME2", 4095, None),
                                                           ("MONOCHROME1", 0, 50)])
def test_padding_pixels_read_as_background_and_leave_the_contrast_alone(photometric: str, pad: int,
                                                                        limit: int | None) -> None:
    """PixelPaddingValue (and PixelPaddingRangeLimit) mark pixels that are not anatomy: a wide padded border,
    black or white, set the image's contrast and the model found other "vertebrae". They now repeat the
    nearest anatomy, as the network's own padding does."""
    stripe = _bright_stripe()
    stored = stripe if photometric == "MONOCHROME2" else (4095 - stripe).astype(np.uint16)
    bordered = np.full((stored.shape[0] + 40, stored.shape[1] + 40), pad, dtype=np.uint16)
    bordered[20:-20, 20:-20] = stored
    if limit is not None:
        bordered[:5, :] = limit  # the top of the range is padding too
    plain = preprocess.decode(radiograph_dataset(stored, seed="pad-0", photometric=photometric))
    ds = radiograph_dataset(bordered, seed="pad-1", photometric=photometric)
    ds.PixelPaddingValue = pad
    if limit is not None:
        ds.PixelPaddingRangeLimit = limit
    rad = preprocess.decode(ds)
    inner = rad.pixels[20:-20, 20:-20]
    assert not np.isnan(rad.pixels).any()
    assert np.array_equal(inner, plain.pixels)  # the anatomy is untouched
    assert rad.pixels[2, 2] == inner[0, 0] and np.array_equal(rad.pixels[:20, 30], np.full(20, inner[0, 10]))
    norm_plain, norm_padded = preprocess.normalise(plain.pixels, clahe=False), preprocess.normalise(rad.pixels, clahe=False)
    assert np.allclose(norm_padded[20:-20, 20:-20], norm_plain, atol=0.02)  # same contrast on the anatomy


@pytest.mark.parametrize("orientation", [["L", "F"], ["R", "H"]])
def test_a_uniform_frame_is_cropped_and_results_map_back_to_the_stored_grid(orientation: list[str]) -> None:
    """An electronic shutter (a frame of one value, black or white) is left out of what the models see: filled
    in or kept, it misled them (a 400 px frame around a real film: 22 "vertebrae" for 11)."""
    from inference.radiograph.analysis import mask_to_stored

    stripe = _bright_stripe()
    framed = np.zeros((stripe.shape[0] + 30, stripe.shape[1] + 20), dtype=np.uint16)
    framed[10:-20, 12:-8] = stripe  # top 10, bottom 20, left 12, right 8
    ds = radiograph_dataset(framed, seed="frame", view_position="AP")
    ds.PatientOrientation = orientation
    rad = preprocess.decode(ds)
    assert rad.pixels.shape == stripe.shape and rad.orientation.crop is not None
    assert any("uniform frame" in n for n in rad.notes)
    assert np.array_equal(rad.orientation.from_canonical(rad.pixels), framed.astype(np.float32))
    # The canonical pixel at (row 30, column 24) of the content is the stored pixel the orientation names.
    mask = np.zeros(rad.pixels.shape, dtype=bool)
    mask[30, 24] = True
    stored = mask_to_stored(rad.orientation, rad.pixels.shape, (0, 0), mask).dense()
    (r,), (c,) = np.nonzero(stored)
    x, y = rad.orientation.point_from_canonical((24.5, 30.5), rad.pixels.shape)
    assert (int(y), int(x)) == (r, c)
    assert framed[r, c] == (stripe[30, 24] if orientation == ["L", "F"] else stripe[::-1, ::-1][30, 24])


def test_no_frame_is_found_in_an_ordinary_image_or_a_narrow_band() -> None:
    stripe = _bright_stripe()
    assert preprocess.content_box(stripe.astype(np.float32)) is None
    banded = stripe.astype(np.float32).copy()
    banded[:1] = 0  # one dark row: less than 2 % of the image
    assert preprocess.content_box(banded) is None

def test_spacing_sources() -> None:
    ds = radiograph_dataset(_bright_stripe(), seed="pre-3")
    del ds.ImagerPixelSpacing
    spacing, source, notes = preprocess.pixel_spacing(ds)
    assert spacing is None and source == "none" and notes
    ds.PixelSpacing = [0.3, 0.3]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    assert preprocess.pixel_spacing(ds)[:2] == ((0.3, 0.3), "PixelSpacing")
    ds2 = radiograph_dataset(_bright_stripe(), seed="pre-4", pixel_spacing_mm=0.2)
    ds2.DistanceSourceToDetector = 1200.0
    ds2.DistanceSourceToPatient = 1000.0
    spacing, source, _ = preprocess.pixel_spacing(ds2)
    assert spacing == pytest.approx((0.2 / 1.2, 0.2 / 1.2))
    assert "DistanceSourceToDetector" in source


def test_head_down_image_is_turned_and_points_map_back() -> None:
    ds = radiograph_dataset(_bright_stripe(), seed="pre-5", view_position="AP")
    ds.PatientOrientation = ["R", "H"]  # a standard L\F frontal view turned by 180 degrees
    rad = preprocess.decode(ds)
    # Head up, and the patient's right back on the viewer's left: both flips, no transpose.
    assert rad.orientation.flip_rows and rad.orientation.flip_columns and not rad.orientation.transpose
    assert rad.left_sign == 1
    # Under R\H the first stored rows are the feet end: head-up puts the marker band at the bottom.
    assert rad.pixels[-1, 0] > rad.pixels[0, 0]
    stored = ds.pixel_array.astype(float)
    assert np.array_equal(rad.orientation.from_canonical(rad.pixels), stored)
    # A point in the canonical grid maps to the mirrored row and column of the stored grid.
    assert rad.orientation.point_from_canonical((10.0, 4.0), rad.pixels.shape) == (38.0, 60.0)


def test_a_frontal_view_shown_as_from_behind_is_mirrored_to_the_usual_display() -> None:
    r"""R\F (the patient's right towards higher columns): the models read the usual display best."""
    ds = radiograph_dataset(_bright_stripe(), seed="pre-5b", view_position="PA")
    ds.PatientOrientation = ["R", "F"]
    rad = preprocess.decode(ds)
    assert rad.orientation.flip_columns and not rad.orientation.flip_rows and rad.left_sign == 1
    assert np.array_equal(rad.pixels, ds.pixel_array[:, ::-1].astype(np.float32))
    # The note says the mirroring is the analysis's, not the picture's (the SC shows the image as stored).
    assert any("mirrored to the patient's right on the viewer's left for the analysis only; shown and measured"
               " as stored" in n for n in rad.notes), rad.notes
    lateral = radiograph_dataset(_bright_stripe(), seed="pre-5c", view_position="LL")
    lateral.PatientOrientation = ["P", "F"]  # laterals keep their side: the models read the anterior side
    assert preprocess.orientation_of(lateral).identity


def test_spine_along_rows_is_transposed() -> None:
    ds = radiograph_dataset(_bright_stripe(), seed="pre-6", view_position="LL")
    ds.PatientOrientation = ["F", "A"]
    rad = preprocess.decode(ds)
    assert rad.orientation.transpose
    assert rad.pixels.shape == (48, 64)
    assert rad.anterior_sign == 1
    assert np.array_equal(rad.orientation.from_canonical(rad.pixels), ds.pixel_array.astype(float))


def test_view_from_patient_orientation_only() -> None:
    ds = radiograph_dataset(_bright_stripe(), seed="pre-7", view_position="AP")
    del ds.ViewPosition
    ds.PatientOrientation = ["P", "F"]
    assert preprocess.view_of(ds) == "LAT"
    ds.PatientOrientation = ["L", "F"]
    assert preprocess.view_of(ds) == "AP"
    del ds.PatientOrientation
    assert preprocess.view_of(ds) is None


def test_narrow_window_is_not_applied() -> None:
    ds = radiograph_dataset(_bright_stripe(), seed="pre-8")
    ds.WindowCenter = 800
    ds.WindowWidth = 10  # would saturate everything but the background
    values = preprocess.stored_values(ds)
    assert values[30, 24] > values[30, 5] > 0


def test_network_scale_and_normalise() -> None:
    assert preprocess.network_scale((2000, 1000), (0.25, 0.25)) == pytest.approx((0.2, 0.2))
    s = preprocess.network_scale((416, 200), None)
    assert s[0] * 416 == pytest.approx(preprocess.UNCALIBRATED_LONG_SIDE)
    capped = preprocess.network_scale((6000, 1000), (0.5, 0.5))
    assert 6000 * capped[0] <= preprocess.MAX_NETWORK_SIDE + 1e-6
    img = np.random.default_rng(0).normal(100, 20, (80, 60))
    out = preprocess.normalise(img)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not preprocess.normalise(np.full((20, 20), 7.0)).any()
    padded, shape = preprocess.pad_to_multiple(np.zeros((33, 70), np.float32))
    assert padded.shape == (64, 96) and shape == (33, 70)


def test_resample_by_scale_or_onto_a_shape_for_one_image_or_channels() -> None:
    image = np.linspace(0.0, 1.0, 40 * 30, dtype=np.float32).reshape(40, 30)
    by_scale = preprocess.resample(image, (0.5, 0.5))
    assert by_scale.shape == (20, 15) and by_scale.dtype == np.float32
    assert np.array_equal(preprocess.resample(image, shape=(20, 15)), by_scale)
    maps = np.stack([image, 1.0 - image])  # channels first, as the network's probabilities
    grown = preprocess.resample(maps, shape=(52, 39))
    assert grown.shape == (2, 52, 39)
    assert np.allclose(grown[0], preprocess.resample(image, shape=(52, 39)))
    assert np.allclose(grown[0] + grown[1], 1.0, atol=1e-5)  # bilinear keeps a partition of one


def test_resample_needs_a_scale_or_a_shape() -> None:
    with pytest.raises(ValueError, match="scale or a target shape"):
        preprocess.resample(np.zeros((4, 4), np.float32))


def test_compressed_pixel_data_outside_bits_stored_is_refused_as_damaged() -> None:
    """A cut JPEG-LS stream decoded without an error to values a 12-bit image cannot hold (32906), and was
    analysed. Here a 16-bit stream under a 12-bit header: the decoder returns its values as they are."""
    from pydicom.uid import JPEGLSLossless

    ds = radiograph_dataset(_bright_stripe(), seed="pre-damaged", bits_stored=12)
    ds.compress(JPEGLSLossless)
    assert preprocess.decode(ds).pixels.size  # intact: decodes
    wide = radiograph_dataset(_bright_stripe(), seed="pre-damaged", bits_stored=16)
    values = wide.pixel_array.astype(np.uint16)
    values[0, 0] = 5000
    wide.PixelData = values.tobytes()
    wide.compress(JPEGLSLossless)
    wide.BitsStored, wide.HighBit = 12, 11
    with pytest.raises(preprocess.PreprocessError, match="outside BitsStored 12"):
        preprocess.decode(wide)
