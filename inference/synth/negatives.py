"""Structureless images: what the vertebra network must find nothing in.

A network trained only on spines finds a spine everywhere: on detector noise, the patient-grouped recipe
reported five vertebrae (and the shipped weights seven) once the contrast stretch had made the noise full
range.  These images carry no anatomy at all; a trainer shows them with all-zero targets so "no vertebra" is
something the network has seen.  The kinds span what a node receives by mistake or what a failed exposure
looks like: white detector noise, smooth mottle (low-frequency noise), exposure gradients and grid-line
stripes, each with noise on top.  Blank images never reach the network (`preprocess.has_contrast`).

Everything is drawn from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("noise", "mottle", "gradient", "stripes")
#: The seed of the evaluation set (`inference.evaluate`); a training run never draws its images from it.
EVALUATION_SEED = 7919


@dataclass(frozen=True)
class Structureless:
    """One structureless image: source pixels in [0, 1] (bone bright) and the pixel spacing it claims."""

    key: str
    kind: str
    pixels: np.ndarray  # float32 (rows, columns)
    spacing_mm: tuple[float, float] | None


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise with a correlation length of `scale_px`."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.normal(size=shape), scale_px, mode="wrap")
    return (field - field.mean()) / (field.std() or 1.0)


def structureless(rng: np.random.Generator, kind: str, key: str = "") -> Structureless:
    """One image of `kind` (one of `KINDS`), sized and calibrated like a radiograph, from `rng`."""
    if kind not in KINDS:
        raise ValueError(f"unknown structureless kind {kind!r}; one of {', '.join(KINDS)}")
    rows = int(rng.integers(300, 1400))
    shape = (rows, int(rows * rng.uniform(0.55, 1.1)))
    level = rng.uniform(0.2, 0.8)
    noise = rng.uniform(0.005, 0.08)
    image = np.full(shape, level, dtype=np.float64)
    if kind == "mottle":
        image += rng.uniform(0.02, 0.15) * _smooth_noise(rng, shape, rng.uniform(3.0, 0.08 * min(shape)))
    elif kind == "gradient":
        r, c = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
        angle = rng.uniform(0, 2 * np.pi)
        image += rng.uniform(0.05, 0.4) * (np.cos(angle) * r + np.sin(angle) * c)
    elif kind == "stripes":
        period = rng.uniform(2.5, 12.0)
        axis = int(rng.integers(0, 2))  # stripes across the rows or across the columns
        wave = rng.uniform(0.01, 0.08) * np.sin(2 * np.pi * np.arange(shape[axis]) / period)
        image += wave[:, None] if axis == 0 else wave[None, :]
    image += noise * rng.normal(size=shape)
    # A detector's size (15-45 cm on the long side), whatever the matrix; a third claim no spacing.
    spacing = None if rng.random() < 0.3 else (float(rng.uniform(150.0, 450.0)) / max(shape),) * 2
    return Structureless(key or kind, kind, np.clip(image, 0.0, 1.0).astype(np.float32), spacing)


def structureless_set(count: int, seed: int) -> list[Structureless]:
    """`count` images cycling through the kinds, deterministic by `seed`."""
    rng = np.random.default_rng(seed)
    return [structureless(rng, KINDS[k % len(KINDS)], key=f"structureless-{seed}-{k}") for k in range(count)]
