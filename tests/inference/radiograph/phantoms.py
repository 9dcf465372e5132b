"""Small phantom radiographs for the radiograph tests (the data engine's procedural spines, no shared data).

Rendering costs a few seconds per sample, so samples are cached per test session.
"""

from __future__ import annotations

import functools

import numpy as np

from inference.results import FractureShape
from inference.synth.dicom import radiograph_dataset
from inference.synth.render import SynthConfig, render_sample
from inference.synth.sample import SynthSample

#: The fixed synthetic set the shipped weights are checked on: (seed, view, field, fracture).
FIXED_SET: tuple[tuple[int, str, str, tuple | None], ...] = (
    (11, "LAT", "lumbar", ("L1", FractureShape.WEDGE, 0.45)),
    (12, "AP", "lumbar", None),
    (13, "LAT", "thoracolumbar", None),
    (14, "AP", "thoracolumbar", None),
)


@functools.lru_cache(maxsize=16)
def phantom(
    seed: int, view: str, field: str, fracture: tuple | None = None, max_px: int = 640, implants: tuple[str, ...] = ()
) -> SynthSample:
    """A phantom radiograph sample, deterministic by its arguments; `implants` names implants and failure
    modes to insert before projection (postoperative images), none by default."""
    force: list[tuple[str, object]] = [("view", view), ("field", field), ("curvature", False)]
    if fracture is not None:
        force.append(("fracture", fracture))
    if implants:
        force.append(("implants", implants))
    config = SynthConfig(
        sources=(("phantom", 1.0),),
        p_fracture=0.0 if fracture is None else 1.0,
        p_implants=1.0 if implants else 0.0,
        p_curvature=0.0,
        p_flip=0.0,
        shift=0.05,
        out_px=(max_px, max_px),
        looks=(("clahe", 0.0),),
        force=tuple(force),
    )
    return render_sample(seed, config)


def as_dicom(
    sample: SynthSample,
    *,
    seed: str,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    study_uid: str | None = None,
    magnification: float | None = 1.2,
    pixels: np.ndarray | None = None,
):  # noqa: ANN201 - pydicom Dataset
    """The sample as a DX/CR dataset; ImagerPixelSpacing at the detector = sample spacing x magnification."""
    image = sample.image if pixels is None else pixels
    top = 2**bits - 1
    stored = np.rint(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    spacing = float(sample.pixel_spacing_mm[0]) * (magnification or 1.0)
    return radiograph_dataset(
        stored,
        seed=seed,
        modality=modality,
        view_position="LL" if sample.view == "LAT" else "AP",
        pixel_spacing_mm=round(spacing, 6),
        photometric=photometric,
        bits_stored=bits,
        magnification=magnification,
        study_uid=study_uid,
    )
