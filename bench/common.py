"""Shared benchmark plumbing: peers from ``tests/peers.py``, node configurations, timing helpers."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "tests", REPO / "tests" / "dicom_node"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import peers  # noqa: E402  (the real peers the tests use)
from nodekit import to_toml  # noqa: E402

T = TypeVar("T")

__all__ = ["REPO", "peers", "to_toml", "percentile", "phantom_radiograph", "timed", "write_node_config"]


def phantom_radiograph(name: str, view: str, field: str, long_side: int, spacing: float, bits: int, modality: str,
                       photometric: str, *, seed: int, implants: tuple[str, ...] = ()) -> tuple[Any, int]:
    """A phantom radiograph from the data engine (with `implants`, if any) written as DICOM at `long_side`
    pixels; `spacing` 0 leaves ImagerPixelSpacing out.  Returns the data set and the implants drawn."""
    import numpy as np
    from skimage.transform import resize

    from inference.synth.dicom import radiograph_dataset
    from inference.synth.render import SynthConfig, render_sample

    force: list[tuple[str, Any]] = [("view", view), ("field", field)]
    if implants:
        force.append(("implants", implants))
    sample = render_sample(seed, SynthConfig(sources=(("phantom", 1.0),), p_implants=1.0 if implants else 0.0,
                                             force=tuple(force)))
    rows, cols = sample.image.shape
    f = long_side / max(rows, cols)
    image = resize(sample.image, (int(round(rows * f)), int(round(cols * f))), order=1, anti_aliasing=f < 1)
    top = 2**bits - 1
    pixels = np.rint(np.clip(image, 0, 1) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        pixels = (top - pixels).astype(np.uint16)
    ds = radiograph_dataset(
        pixels, seed=f"bench-{name}", modality=modality, view_position="LL" if view == "LAT" else "AP",
        pixel_spacing_mm=spacing or 0.2, photometric=photometric, bits_stored=bits,
        magnification=1.15 if spacing else None,
    )
    ds.PatientOrientation = list(sample.meta.get("patient_orientation", ds.PatientOrientation))
    if not spacing:
        del ds.ImagerPixelSpacing
    return ds, len(sample.implant_specs)


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`fn(*args)` and the seconds it took."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


def write_node_config(path: Path, raw: dict) -> Path:
    """Write a node TOML configuration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(raw))
    return path
