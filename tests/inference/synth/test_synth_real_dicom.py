"""Real-radiograph split and implant overlay (on a generated stand-in), and the DICOM writer for samples."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.splits import SCHEMES, TRAINING_SCHEME, source_stem, split_of
from inference.synth.dicom import write_sample
from inference.synth.real import render_real_sample
from inference.synth.render import render_sample
from inference.synth.sample import IGNORE, UNNAMED


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_split_is_deterministic_proportional_and_keeps_copies_together(scheme):
    names = [f"Image_{i:03d}_jpg.rf.{i * 7919:032x}.jpg" for i in range(2000)]
    splits = [split_of(n, scheme) for n in names]
    assert splits == [split_of(n, scheme) for n in names]
    share = Counter(splits)
    assert 0.09 < share["test"] / 2000 < 0.18 and 0.07 < share["val"] / 2000 < 0.13
    # Copies of one source image (different Roboflow hashes) share the split.
    assert source_stem("Image_287_jpg.rf.abc.jpg") == source_stem("Image_287_jpg.rf.def.jpg") == "Image_287_jpg"
    assert split_of("Image_287_jpg.rf.abc.jpg", scheme) == split_of("Image_287_jpg.rf.def.jpg", scheme)


def test_the_training_split_keeps_a_patients_films_together():
    """The old schemes hashed film names: AASCE films of one patient (-A-AP, -C-AP) could straddle them."""
    films = [f"sunhl-1th-01-Mar-2017-{p}-{letter}-AP_jpg.rf.{p}{letter}.jpg" for p in range(300) for letter in "ABC"]
    for p in range(300):
        assert len({split_of(f, TRAINING_SCHEME) for f in films[3 * p: 3 * p + 3]}) == 1
    assert any(len({split_of(f, "real-v1") for f in films[3 * p: 3 * p + 3]}) > 1 for p in range(300))


def _fake_real_folder(root: Path) -> Path:
    """A radiograph-like JPEG with 12 YOLO vertebra boxes, named so that it falls in the train split."""
    from PIL import Image

    name = next(f"Image_{i:03d}_jpg.rf.x.jpg" for i in range(100) if split_of(f"Image_{i:03d}_jpg.rf.x.jpg") == "train")
    images, labels = root / "radiographs" / "cadma_train" / "images", root / "radiographs" / "cadma_train" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rows, cols = 416, 240
    img = np.full((rows, cols), 60, np.uint8)
    lines = []
    for k in range(12):
        yc = 40 + k * 28
        img[yc - 10 : yc + 10, 100:140] = 170
        lines.append(f"0 {120 / cols:.5f} {yc / rows:.5f} {44 / cols:.5f} {22 / rows:.5f}")
    Image.fromarray(img).save(images / name)
    (labels / name.replace(".jpg", ".txt")).write_text("\n".join(lines))
    return root


def test_implants_rendered_onto_a_real_radiograph(tmp_path, small_config):
    data = _fake_real_folder(tmp_path)
    cfg = replace(small_config, force=(("implants", ("posterior",)),))
    s = render_real_sample(5, cfg, data, split="train")
    again = render_real_sample(5, cfg, data, split="train")
    assert np.array_equal(s.image, again.image) and np.array_equal(s.implants, again.implants)
    assert s.implant_specs and {sp.kind.value for sp in s.implant_specs} <= {"pedicle screw", "rod"}
    assert s.meta["split"] == "train" and len(s.meta["boxes"]) == 12
    assert all(v.level is None and v.grade is None for v in s.vertebrae)
    # Weak labels: box cores are "vertebra, level unknown", far sideways is background, the rest ignored.
    assert (s.vertebra == UNNAMED).any() and (s.vertebra == 0).any() and (s.vertebra == IGNORE).any()
    # Metal brightens the real image where it is labelled, and only there.
    from PIL import Image

    original = np.asarray(Image.open(next((data / "radiographs/cadma_train/images").glob("*.jpg"))), np.float32) / 255
    diff = s.image - original
    metal = s.implants > 0
    assert diff[metal].mean() > 0.2
    assert np.abs(diff[~metal]).mean() < 0.03
    with pytest.raises(ValueError):
        render_real_sample(5, cfg, data, split="test", image=next((data / "radiographs/cadma_train/images").glob("*.jpg")))


@pytest.mark.parametrize(
    ("modality", "photometric", "bits"), [("DX", "MONOCHROME2", 12), ("DX", "MONOCHROME1", 16), ("CR", "MONOCHROME1", 8)]
)
def test_sample_written_as_dicom_passes_dciodvfy(tmp_path, small_config, modality, photometric, bits):
    s = render_sample(4, replace(small_config, force=(("view", "LAT"),)))
    path = tmp_path / "sample.dcm"
    write_sample(s, path, seed=f"synth-{modality}-{bits}", modality=modality, photometric=photometric, bits_stored=bits)
    ds = pydicom.dcmread(path)
    assert ds.Modality == modality and ds.PhotometricInterpretation == photometric and ds.BitsStored == bits
    assert (ds.Rows, ds.Columns) == s.image.shape and ds.ViewPosition == "LL"
    mag = float(ds.EstimatedRadiographicMagnificationFactor)
    assert float(ds.ImagerPixelSpacing[0]) / mag == pytest.approx(s.pixel_spacing_mm[0], rel=1e-3)
    stored = ds.pixel_array.astype(np.float64) / (2**bits - 1)
    shown = 1.0 - stored if photometric == "MONOCHROME1" else stored
    assert np.abs(shown - s.image).max() < 2.0 / (2**bits - 1) + 1e-6
    dciodvfy = shutil.which("dciodvfy") or str(Path(__file__).resolve().parents[3] / ".venv/bin/dciodvfy")
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error")]
    assert out.returncode == 0 and not errors, errors
