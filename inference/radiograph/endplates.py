"""Six-point vertebral morphometry on lateral radiographs: a small network places the endplate points.

Why not the segmentation silhouette: heights read off the vertebra model's body masks were 8-13 mm off
(card of 1.0+e26ce00b), and even the data engine's TRUE projected masks gave 4-5 mm and called 29 % of
normal bodies fractured: a body whose endplates are not parallel to the beam projects taller than it is,
and neighbouring silhouettes touch.  A reader measures differently (quantitative morphometry): six points
on the endplates' rims - anterior, middle and posterior, superior and inferior - and the three distances.
This stage does the same.

* `body_crop` cuts a square around one vertebra, turned so the spine runs down the rows (cranial at the
  top) and scaled to the local vertebral step (`CROP_STEPS` steps wide at `CROP_PX` pixels), so the same
  network serves cervical to lumbar bodies at any pixel spacing;
* the network (a small CNN with a regression head) returns the six points in crop units by the crop's
  side (`SIDE_POINTS`: the lower-column side first) and a logit for "anterior lies toward the higher
  columns";
* `place_points` runs it on every body of a chain and maps the points back to the source grid.

Everything but the network is numpy/scipy; torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from inference.radiograph.morphometry import spine_axes

if TYPE_CHECKING:
    import torch

CROP_PX = 64
#: Crop side in vertebral steps (centroid distance to the neighbours): the body, both endplates with the
#: discs and the posterior wall's surroundings.
CROP_STEPS = 1.6
#: Output point order: the side toward lower crop columns ("low"), the middle, the higher-column side.
SIDE_POINTS = ("low_superior", "low_inferior", "middle_superior", "middle_inferior", "high_superior", "high_inferior")

Point = tuple[float, float]


@dataclass(frozen=True)
class CropFrame:
    """Where a body crop is cut: centre (x, y), unit cranio-caudal direction (x, y), side length (px)."""

    centre: Point
    axis: Point
    side_px: float

    @property
    def across(self) -> Point:
        """Unit direction of increasing crop columns: the axis turned so (0, 1) gives (1, 0)."""
        return (self.axis[1], -self.axis[0])

    def to_source(self, uv: np.ndarray) -> np.ndarray:
        """Crop units (u across, v along, each -1..1 over the crop) -> source (x, y)."""
        half = self.side_px / 2.0
        ax, ay = self.axis
        cx, cy = self.across
        u, v = uv[..., 0] * half, uv[..., 1] * half
        return np.stack([self.centre[0] + u * cx + v * ax, self.centre[1] + u * cy + v * ay], axis=-1)

    def to_crop(self, xy: np.ndarray) -> np.ndarray:
        """Inverse of `to_source`."""
        half = self.side_px / 2.0
        dx, dy = xy[..., 0] - self.centre[0], xy[..., 1] - self.centre[1]
        ax, ay = self.axis
        cx, cy = self.across
        return np.stack([(dx * cx + dy * cy) / half, (dx * ax + dy * ay) / half], axis=-1)


#: A neighbour further than this times the chain's median step has a vertebra missed between: its distance
#: is not the body's step.
GAP_RATIO = 1.5


def chain_frames(centroids: Sequence[Point]) -> list[CropFrame]:
    """One crop frame per body of a chain ordered head to foot: axis by central differences (`spine_axes`), step the mean
    distance to the neighbours that are not across a gap (else the chain's median step); a chain of one
    gets no frame."""
    c = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    n = len(c)
    if n < 2:
        return []
    gaps = np.hypot(*np.diff(c, axis=0).T)
    median = float(np.median(gaps))
    frames = []
    for k, axis in enumerate(spine_axes([tuple(p) for p in c])):
        steps = [float(gaps[j]) for j in (k - 1, k) if 0 <= j < n - 1 and gaps[j] <= GAP_RATIO * median]
        step = float(np.mean(steps)) if steps else median
        frames.append(CropFrame((float(c[k, 0]), float(c[k, 1])), axis, CROP_STEPS * step))
    return frames


def body_crop(pixels: np.ndarray, frame: CropFrame, size: int = CROP_PX) -> np.ndarray:
    """(size, size) float32 crop in [0, 1], scaled by its own 1st / 99th percentiles (so raw 12-16 bit
    DICOM, processed exports and the data engine's images look alike)."""
    g = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    u, v = np.meshgrid(g, g)  # rows: v (along the spine), columns: u (across)
    xy = frame.to_source(np.stack([u, v], axis=-1))
    # Only the window under the crop is read (and smoothed when the crop is much coarser than the source,
    # so grid lines and noise do not alias).
    r0 = max(int(xy[..., 1].min()) - 4, 0)
    c0 = max(int(xy[..., 0].min()) - 4, 0)
    r1 = min(int(xy[..., 1].max()) + 5, pixels.shape[0])
    c1 = min(int(xy[..., 0].max()) + 5, pixels.shape[1])
    if r1 - r0 < 2 or c1 - c0 < 2:
        return np.zeros((size, size), np.float32)
    window = np.asarray(pixels[r0:r1, c0:c1], dtype=np.float32)
    factor = frame.side_px / size
    if factor > 1.5:
        window = ndimage.gaussian_filter(window, 0.4 * factor)
    crop = ndimage.map_coordinates(window, [xy[..., 1] - 0.5 - r0, xy[..., 0] - 0.5 - c0], order=1, mode="nearest")
    lo, hi = np.percentile(crop, (1.0, 99.0))
    if not hi > lo:
        return np.zeros((size, size), np.float32)
    return np.clip((crop - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def build_net(width: int = 24) -> torch.nn.Module:
    """Small CNN: four conv blocks (64 -> 4 px) and a regression head of 12 coordinates + 1 side logit.

    (A heatmap U-Net with soft-argmax was tried: in 750 iterations it placed every point in the middle row
    of the crop, the superior and inferior endplates on top of each other.)"""
    from torch import nn

    from inference.radiograph.network import double_conv

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(*double_conv(cin, cout), nn.MaxPool2d(2))

    w = width
    return nn.Sequential(
        block(1, w),
        block(w, 2 * w),
        block(2 * w, 4 * w),
        block(4 * w, 4 * w),
        nn.Flatten(),
        nn.Linear(4 * w * (CROP_PX // 16) ** 2, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 2 * len(SIDE_POINTS) + 1),
    )


def load_net(state: dict[str, Any], width: int = 24) -> torch.nn.Module:
    """The stage's network from a state dict (strict), in eval mode."""
    net = build_net(width)
    net.load_state_dict(state)
    return net.eval()


@dataclass(frozen=True)
class BodyPoints:
    """The six points of one body in source (x, y) and P(anterior toward the crop's higher columns)."""

    points: dict[str, Point]  # keys of SIDE_POINTS
    p_high_anterior: float
    frame: CropFrame


def predict(net: torch.nn.Module, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 6, 2) points in crop units and (n,) P(anterior toward higher columns) for (n, size, size) crops."""
    import torch

    if len(crops) == 0:
        return np.zeros((0, len(SIDE_POINTS), 2), np.float32), np.zeros(0, np.float32)
    with torch.inference_mode():
        out = net(torch.from_numpy(np.ascontiguousarray(crops[:, None], dtype=np.float32))).numpy()
    pts = out[:, : 2 * len(SIDE_POINTS)].reshape(-1, len(SIDE_POINTS), 2)
    return pts, 1.0 / (1.0 + np.exp(-out[:, -1]))


def recentred(frame: CropFrame, points: np.ndarray) -> CropFrame:
    """The frame moved to the centre of the six points (crop units) and turned to their mean superior ->
    inferior direction; the side stays (it is the chain's step)."""
    xy = frame.to_source(points.astype(np.float64))
    d = (xy[1::2] - xy[0::2]).mean(axis=0)
    norm = float(np.hypot(*d))
    axis = (float(d[0] / norm), float(d[1] / norm)) if norm > 0 and (d[0] * frame.axis[0] + d[1] * frame.axis[1]) > 0.5 * norm else frame.axis
    c = xy.mean(axis=0)
    return CropFrame((float(c[0]), float(c[1])), axis, frame.side_px)


def place_points(net: torch.nn.Module, pixels: np.ndarray, centroids: Sequence[Point], passes: int = 2) -> list[BodyPoints]:
    """Six points for every body of a chain (head to foot, source grid); empty for fewer than two bodies.

    The vertebra model's centroids lie up to a third of a crop from the body's centre (its masks are not the
    body's projection), so after the first pass each crop is cut again around the points it gave."""
    frames = chain_frames(centroids)
    if not frames:
        return []
    for k in range(passes):
        crops = np.stack([body_crop(pixels, f) for f in frames])
        pts, side = predict(net, crops)
        if k + 1 < passes:
            frames = [recentred(f, p) for f, p in zip(frames, pts, strict=True)]
    out = []
    for f, p, s in zip(frames, pts, side, strict=True):
        xy = f.to_source(p.astype(np.float64))
        out.append(BodyPoints({n: (float(q[0]), float(q[1])) for n, q in zip(SIDE_POINTS, xy, strict=True)}, float(s), f))
    return out


def anterior_is_high(points: Sequence[BodyPoints], anterior_sign: int | None) -> list[bool]:
    """Per body: is anterior toward the crop's higher columns?  From the header's (or the image's) anterior
    side when known (+1: anterior toward larger x), else from the network's vote over the whole chain (one
    patient faces one way on one image)."""
    if anterior_sign is not None:
        return [(b.frame.across[0] * anterior_sign) > 0 for b in points]
    if not points:
        return []
    # The vote is in image terms: each body's P(high side anterior) turned into P(anterior toward +x).
    p_right = [b.p_high_anterior if b.frame.across[0] >= 0 else 1.0 - b.p_high_anterior for b in points]
    right = float(np.mean(p_right)) >= 0.5
    return [(b.frame.across[0] >= 0) == right for b in points]


def heights_px(b: BodyPoints, high_anterior: bool, spacing_mm: tuple[float, float] | None) -> dict[str, tuple[float, Point, Point]]:
    """Anterior, middle and posterior heights (mm with a spacing, else pixels) with their end points
    (superior, inferior)."""
    sy, sx = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    ant, post = ("high", "low") if high_anterior else ("low", "high")
    out = {}
    for name, side in (("anterior", ant), ("middle", "middle"), ("posterior", post)):
        p, q = b.points[f"{side}_superior"], b.points[f"{side}_inferior"]
        out[name] = (math.hypot((q[0] - p[0]) * sx, (q[1] - p[1]) * sy), p, q)
    return out


def crop_targets(frame: CropFrame, corners: dict[str, Point], high_anterior: bool) -> np.ndarray:
    """(6, 2) training targets in crop units from the data engine's six projected points
    ("anterior_superior", ..., "middle_inferior")."""
    ant, post = ("high", "low") if high_anterior else ("low", "high")
    rename = {f"{ant}_superior": "anterior_superior", f"{ant}_inferior": "anterior_inferior",
              f"{post}_superior": "posterior_superior", f"{post}_inferior": "posterior_inferior",
              "middle_superior": "middle_superior", "middle_inferior": "middle_inferior"}
    xy = np.array([corners[rename[n]] for n in SIDE_POINTS], dtype=np.float64)
    return frame.to_crop(xy)
