"""Image formation and the "look" of a radiograph: exposure, scatter, noise, processing, artefacts.

`expose` turns line integrals into a processed radiograph (bone bright, float in [0, 1]) the way a
detector and its vendor processing do: Beer-Lambert intensity with heel effect, collimation, scatter
(low-pass of the primary), quantum + electronic noise, log, windowing, unsharp masking / multi-scale
enhancement, tone curve, optional CLAHE, anti-scatter grid lines, burned-in text and lead markers,
bit-depth quantisation and JPEG artefacts.  Everything is drawn from the `rng` and recorded in `record`.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)


def resize(image: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize a 2D array to `shape` (order 0 for label maps, area-averaging when shrinking images)."""
    if tuple(image.shape) == tuple(shape):
        return image
    if order == 0:
        rr = np.minimum((np.arange(shape[0]) + 0.5) * image.shape[0] / shape[0], image.shape[0] - 1).astype(int)
        cc = np.minimum((np.arange(shape[1]) + 0.5) * image.shape[1] / shape[1], image.shape[1] - 1).astype(int)
        return image[rr][:, cc]
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    mode = "area" if shape[0] < image.shape[0] and shape[1] < image.shape[1] else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=tuple(shape), mode=mode, **kw)[0, 0].numpy()


def collimation_mask(shape: tuple[int, int], rng: np.random.Generator, record: dict) -> np.ndarray:
    """Soft-edged exposed region (1 inside): a rectangle shrunk from random sides, slightly rotated."""
    rows, cols = shape
    mask = np.ones(shape, np.float32)
    if rng.random() < 0.45:
        record["collimation"] = None
        return mask
    margins = [rng.uniform(0.0, 0.18) if rng.random() < 0.6 else 0.0 for _ in range(4)]  # top, bottom, left, right
    angle = rng.normal(0.0, 1.5)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    a = np.deg2rad(angle)
    y = (yy - cy) * np.cos(a) - (xx - cx) * np.sin(a) + cy
    x = (yy - cy) * np.sin(a) + (xx - cx) * np.cos(a) + cx
    edge = max(1.0, 0.004 * max(shape))
    t, b, lft, r = margins
    inside = (
        _soft(y - t * rows, edge) * _soft((1 - b) * rows - y, edge) * _soft(x - lft * cols, edge) * _soft((1 - r) * cols - x, edge)
    )
    record["collimation"] = {"margins": [round(m, 3) for m in margins], "angle_deg": round(angle, 2)}
    return inside.astype(np.float32)


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-d / edge))


def expose(
    line_integral: np.ndarray,
    pixel_mm: float,
    rng: np.random.Generator,
    record: dict,
    *,
    collimation: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """Processed radiograph (bone bright, [0, 1]) from line integrals (mu * mm) at `pixel_mm` spacing."""
    rows, cols = line_integral.shape
    P: np.ndarray = line_integral.astype(np.float32)
    # Heel effect / uneven exposure: a gentle ramp along a random direction.
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    ramp = ((yy / rows - 0.5) * np.sin(ang) + (xx / cols - 0.5) * np.cos(ang)).astype(np.float32)
    heel = 1.0 + rng.uniform(0.0, 0.25) * strength * ramp
    # Polychromatic beam: thick paths harden the beam, so log attenuation grows less than linearly.
    beta = rng.uniform(0.02, 0.06)
    P = np.log1p(beta * np.maximum(P, 0.0)) / beta
    intensity = np.exp(-P) * heel
    if collimation is not None:
        intensity = intensity * (0.02 + 0.98 * collimation)
    # Scatter: a blurred fraction of the primary (scatter-to-primary ratio after the grid).
    spr = rng.uniform(0.1, 1.0) * strength
    sigma_px = rng.uniform(20.0, 60.0) / pixel_mm
    # Scatter originates in the patient (where the primary was attenuated), not in air beside it.
    scatter = _blur(intensity * (1.0 - np.exp(-np.minimum(P, 20.0) * 0.5)), sigma_px)
    intensity = intensity + spr * scatter
    # Quantum noise: the exposure control sets the dose so that the median exposed pixel gets
    # `counts` quanta; thinner or denser regions follow Poisson statistics (Gaussian approximation).
    # The chamber sits behind the dense part of the anatomy (spine), not in direct exposure.
    anat = P if collimation is None else np.where(collimation > 0.5, P, 0.0)
    dense = anat >= np.percentile(anat, 60)
    ref = float(np.median(intensity[dense])) if dense.any() else float(np.median(intensity))
    counts = 10 ** rng.uniform(2.6, 4.0) / max(strength, 0.2)
    n0 = counts / max(ref, 1e-9)
    noise = rng.standard_normal(intensity.shape).astype(np.float32)
    if rng.random() < 0.5:
        noise = ndimage.gaussian_filter(noise, rng.uniform(0.4, 0.9)) * 1.6
    intensity = intensity + np.sqrt(np.maximum(intensity, 0) / n0) * noise * strength
    intensity = intensity + ref * rng.uniform(0.0, 0.01) * rng.standard_normal(intensity.shape).astype(np.float32)
    log = -np.log(np.maximum(intensity, 1e-5))
    # Window on the exposed area, as vendor processing does (collimated borders excluded).
    # Metal is left out of the histogram, as vendor processing does: it saturates instead.
    keep = np.ones(log.shape, bool) if collimation is None else collimation > 0.5
    if exclude is not None:
        keep &= ~exclude
    # Direct exposure (air beside the patient) is left out too; it saturates black.
    body = P > 0.3 * float(np.percentile(P, 95))
    if (keep & body).sum() > 64:
        keep &= body
    # Dynamic-range compression ("equalisation"): subtract part of the large-scale low-pass of the log
    # image, so the spine stays visible through a thick abdomen or beside lungs (metal clipped first).
    ref_vals = log[keep] if keep.sum() > 16 else log.ravel()
    clipped = np.clip(log, np.percentile(ref_vals, 1), np.percentile(ref_vals, 99.5))
    k_large = rng.uniform(0.3, 0.85) * strength
    log = log - k_large * _blur(clipped, rng.uniform(12.0, 35.0) / pixel_mm)
    valid = log[keep]
    if valid.size < 16:
        valid = log.ravel()
    lo = np.percentile(valid, rng.uniform(0.2, 3.0))
    hi = np.percentile(valid, rng.uniform(99.0, 99.95))
    x = (log - lo) / max(hi - lo, 1e-3)
    # Metal and collimator edges far outside the window would smear through the unsharp masks.
    x = np.clip(x, -0.2, 1.3)
    # Unsharp masking: small radius sharpens edges (trabecular texture, cortices).
    k_small = rng.uniform(0.0, 1.5) * strength
    x = x + k_small * (x - _blur(x, rng.uniform(0.8, 3.0) / pixel_mm))
    # Tone curve: gamma and a sigmoid of random slope.
    x = np.clip(x, 0.0, 1.0)
    gamma = float(np.exp(rng.normal(0.0, 0.3)))
    x = x**gamma
    if rng.random() < 0.5:
        slope = rng.uniform(3.0, 8.0)
        mid = rng.uniform(0.4, 0.6)
        x = (1 / (1 + np.exp(-slope * (x - mid))) - 1 / (1 + np.exp(slope * mid))) / (
            1 / (1 + np.exp(-slope * (1 - mid))) - 1 / (1 + np.exp(slope * mid))
        )
    record.update(
        {
            "spr": round(float(spr), 3),
            "counts_at_median": round(float(counts), 1),
            "unsharp": [round(float(k_large), 3), round(float(k_small), 3)],
            "gamma": round(gamma, 3),
        }
    )
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur; large sigmas on a downsampled copy (scatter kernels are tens of mm wide)."""
    if sigma_px <= 6.0:
        return ndimage.gaussian_filter(image, sigma_px, mode="nearest")
    f = int(sigma_px // 3)
    small = resize(image, (max(2, image.shape[0] // f), max(2, image.shape[1] // f)))
    small = ndimage.gaussian_filter(small, sigma_px / f, mode="nearest")
    return resize(small, image.shape)


def finish(image: np.ndarray, pixel_mm: float, rng: np.random.Generator, record: dict, p: dict[str, float]) -> np.ndarray:
    """Post-processing looks: CLAHE, grid lines, burned-in text and lead markers, bit depth, JPEG."""
    x = image
    if rng.random() < p.get("clahe", 0.5):
        from skimage import exposure

        clip = rng.uniform(0.005, 0.03)
        tiles = int(rng.integers(4, 12))
        x = exposure.equalize_adapthist(x, kernel_size=(max(8, x.shape[0] // tiles), max(8, x.shape[1] // tiles)), clip_limit=clip)
        record["clahe"] = {"clip_limit": round(float(clip), 4), "tiles": tiles}
    if rng.random() < p.get("grid_lines", 0.25):
        period = rng.uniform(2.05, 3.5)  # pixels: near Nyquist, as aliased grid lines are
        amp = rng.uniform(0.004, 0.02)
        axis = int(rng.integers(0, 2))
        coord = np.arange(x.shape[axis], dtype=np.float32)
        stripes = amp * np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi))
        x = x + (stripes[:, None] if axis == 0 else stripes[None, :])
        record["grid_lines"] = {"period_px": round(float(period), 2), "amplitude": round(float(amp), 4), "axis": axis}
    marks = []
    if rng.random() < p.get("lead_marker", 0.6):
        marks.append(_draw_text(x, rng, rng.choice(["L", "R", "LT", "RT", "L ↑", "R STANDING"]), bold=True))
    if rng.random() < p.get("text", 0.4):
        marks.append(_draw_text(x, rng, _random_annotation(rng), bold=False))
    if marks:
        record["burned_in"] = marks
    x = np.clip(x, 0.0, 1.0)
    bits = int(rng.choice([8, 10, 12, 14, 16]))
    levels = 2**bits - 1
    x = np.round(x * levels) / levels
    record["bits"] = bits
    if rng.random() < p.get("jpeg", 0.3):
        from PIL import Image

        quality = int(rng.integers(55, 96))
        buf = io.BytesIO()
        Image.fromarray((x * 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        x = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
        record["jpeg_quality"] = quality
    return x.astype(np.float32)


def _random_annotation(rng: np.random.Generator) -> str:
    words = ["AP", "LAT", "STANDING", "SUPINE", "ERECT", "PORTABLE", "WB", "FLEX", "EXT", "SPINE", "L-SPINE", "T-SPINE"]
    parts = list(rng.choice(words, size=int(rng.integers(1, 3)), replace=False))
    if rng.random() < 0.5:
        parts.append(f"{int(rng.integers(1, 29)):02d}.{int(rng.integers(1, 13)):02d}.20{int(rng.integers(10, 27))}")
    if rng.random() < 0.4:
        parts.append(f"{int(rng.integers(60, 96))}kV {rng.uniform(2, 60):.1f}mAs")
    return " ".join(parts)


@lru_cache(maxsize=8)
def _font(size: int, bold: bool):
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for d in _FONT_DIRS:
        path = Path(d) / name
        if path.exists():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default()


def _draw_text(x: np.ndarray, rng: np.random.Generator, text: str, bold: bool) -> dict:
    """Burn `text` near a random corner/edge (white, as lead markers and annotations appear)."""
    from PIL import Image, ImageDraw

    rows, cols = x.shape
    size = max(8, int(min(rows, cols) * rng.uniform(0.025, 0.07)))
    canvas = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(canvas)
    font = _font(size, bold)
    box = draw.textbbox((0, 0), text, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    corner = int(rng.integers(0, 4))
    mx, my = rng.uniform(0.01, 0.08) * cols, rng.uniform(0.01, 0.08) * rows
    px = mx if corner in (0, 2) else cols - tw - mx
    py = my if corner in (0, 1) else rows - th - my
    draw.text((px - box[0], py - box[1]), text, fill=255, font=font)
    m = np.asarray(canvas, dtype=np.float32) / 255.0
    if bold:
        m = ndimage.gaussian_filter(m, 0.6)
    level = rng.uniform(0.85, 1.0)
    x[:] = np.maximum(x, m * level)
    return {"text": text, "xy": [round(float(px), 1), round(float(py), 1)], "size_px": size}
