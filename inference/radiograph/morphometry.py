"""Vertebral body heights on a lateral radiograph and Genant semi-quantitative grading.

Heights follow quantitative morphometry: along the direction perpendicular to the endplates, at 12 % of
the body depth from the anterior and posterior walls and at mid-depth (the same positions the data
engine measures its 3D truth at).  Each height is the length of the chord through the body's
membership map (the body probability at source resolution, restricted to the vertebra's instance) between
its two 0.5 crossings, located with linear interpolation, so heights are not quantised to pixels.

Genant grade from the largest height loss among: anterior vs posterior (wedge), middle vs posterior
(biconcave), and the posterior height vs the adjacent vertebrae's posterior heights (crush).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.results import (
    FractureAssessment,
    FractureShape,
    GenantGrade,
    HeightMeasurement,
    Point,
    VertebralHeights,
)

#: Where heights are measured, as a fraction of the body depth from the anterior wall.
HEIGHT_POSITIONS = {"anterior": 0.12, "middle": 0.5, "posterior": 0.88}


@dataclass(frozen=True)
class BodyFrame:
    """Per-body measurement frame in source pixel coordinates (x = column, y = row, SCOORD)."""

    centre: Point
    endplate: tuple[float, float]  # unit vector (x, y) along the endplates, pointing anterior
    axis: tuple[float, float]  # unit vector (x, y) perpendicular to the endplates (in mm), pointing caudal


@dataclass(frozen=True)
class MeasuredHeights:
    """Heights in mm (or pixels when `calibrated` is False) with their end points."""

    anterior: HeightMeasurement | None
    middle: HeightMeasurement | None
    posterior: HeightMeasurement | None
    calibrated: bool
    frame: BodyFrame

    def values(self) -> tuple[float | None, float | None, float | None]:
        """(anterior, middle, posterior) lengths."""
        return tuple(h.value_mm if h else None for h in (self.anterior, self.middle, self.posterior))  # type: ignore[return-value]

    def as_result(self) -> VertebralHeights | None:
        """The `VertebralHeights` to report (only when lengths are in mm)."""
        if not self.calibrated:
            return None
        return VertebralHeights(self.anterior, self.middle, self.posterior)


#: How far (degrees) the endplates may tilt against the local spine axis; wedge fractures and the
#: central-difference spine axis stay well inside this.
ENDPLATE_SEARCH_DEG = 25.0


def body_frame(
    membership: np.ndarray,
    offset: tuple[int, int],
    spacing_mm: tuple[float, float],
    spine_axis: tuple[float, float],
    anterior_sign: int,
) -> BodyFrame | None:
    """Endplate direction of the body's smallest enclosing rectangle, searched within
    `ENDPLATE_SEARCH_DEG` of perpendicular to the spine (in mm, so non-square pixels do not tilt it);
    None for an empty body.

    Principal axes were used before: on a nearly square body (lumbar bodies on a lateral are about as
    tall as deep) they point anywhere, and chords along a tilted frame cut the corners (heights on the
    true projected masks were off by 5 mm on average)."""
    rows, cols = np.nonzero(membership >= 0.5)
    if len(rows) < 4:
        return None
    sy, sx = spacing_mm
    x = (cols + offset[1] + 0.5) * sx
    y = (rows + offset[0] + 0.5) * sy
    cx, cy = float(x.mean()), float(y.mean())
    t = np.array([spine_axis[0] * sx, spine_axis[1] * sy])
    t = t / (np.linalg.norm(t) or 1.0)
    base = math.atan2(-t[0], t[1])  # direction (t_y, -t_x): perpendicular to the spine
    angles = base + np.radians(np.arange(-ENDPLATE_SEARCH_DEG, ENDPLATE_SEARCH_DEG + 0.25, 0.5))
    ex, ey = np.cos(angles), np.sin(angles)
    px, py = x - cx, y - cy
    u = np.outer(ex, px) + np.outer(ey, py)  # (angles, pixels) along the endplate
    v = np.outer(-ey, px) + np.outer(ex, py)  # across it
    area = (u.max(axis=1) - u.min(axis=1)) * (v.max(axis=1) - v.min(axis=1))
    best = angles[int(np.argmin(area))]
    e = np.array([math.cos(best), math.sin(best)])
    if e[0] * anterior_sign < 0 or (e[0] == 0 and e[1] < 0):
        e = -e
    a = np.array([-e[1], e[0]])
    if a[1] < 0:
        a = -a
    # Back to pixel units for the returned frame (directions defined in mm, points in pixels).
    return BodyFrame((cx / sx, cy / sy), (float(e[0]), float(e[1])), (float(a[0]), float(a[1])))


def _chord(
    membership: np.ndarray, offset: tuple[int, int], spacing_mm: tuple[float, float], origin_mm: np.ndarray, a: np.ndarray, reach_mm: float
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """Length (mm) of the chord through the body along `a` from `origin_mm`, and its end points (mm)."""
    sy, sx = spacing_mm
    step = 0.1 * min(sx, sy)
    s = np.arange(-reach_mm, reach_mm + step / 2, step)
    pts = origin_mm[None, :] + s[:, None] * a[None, :]
    # mm -> index coordinates of the membership crop (pixel centres at +0.5).
    col = pts[:, 0] / sx - 0.5 - offset[1]
    row = pts[:, 1] / sy - 0.5 - offset[0]
    profile = ndimage.map_coordinates(membership.astype(np.float32), [row, col], order=1, mode="constant", cval=0.0)
    inside = profile >= 0.5
    if not inside.any():
        return None
    # The run of inside samples that holds the sample nearest the origin (or the longest run).
    runs, n = ndimage.label(inside)
    centre = len(s) // 2
    label = runs[centre] if runs[centre] else 1 + int(np.argmax(ndimage.sum(inside, runs, index=np.arange(1, n + 1))))
    idx = np.flatnonzero(runs == label)
    lo, hi = idx[0], idx[-1]

    def cross(i: int, j: int) -> float:
        if j < 0 or j >= len(s):
            return float(s[i])
        p0, p1 = profile[i], profile[j]
        t = (p0 - 0.5) / max(p0 - p1, 1e-9)
        return float(s[i] + t * (s[j] - s[i]))

    top, bottom = cross(lo, lo - 1), cross(hi, hi + 1)
    return bottom - top, origin_mm + top * a, origin_mm + bottom * a


def measure_heights(
    membership: np.ndarray,
    offset: tuple[int, int],
    spacing_mm: tuple[float, float] | None,
    spine_axis: tuple[float, float],
    anterior_sign: int,
) -> MeasuredHeights | None:
    """Anterior, middle and posterior height of one body.

    `membership` is a float (or boolean) crop at source resolution whose 0.5 level is the body outline;
    `offset` its (row, column) in the source grid; `spine_axis` the local cranio-caudal direction (x, y);
    `anterior_sign` +1 when anterior lies toward larger x.  Without `spacing_mm`, lengths are in pixels
    and `calibrated` is False.
    """
    calibrated = spacing_mm is not None
    spacing = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    frame = body_frame(membership, offset, spacing, spine_axis, anterior_sign)
    if frame is None:
        return None
    sy, sx = spacing
    e = np.array(frame.endplate)
    a = np.array(frame.axis)
    centre = np.array([frame.centre[0] * sx, frame.centre[1] * sy])
    rows, cols = np.nonzero(membership >= 0.5)
    x = (cols + offset[1] + 0.5) * sx
    y = (rows + offset[0] + 0.5) * sy
    u = (x - centre[0]) * e[0] + (y - centre[1]) * e[1]
    half_pixel = 0.5 * (abs(e[0]) * sx + abs(e[1]) * sy)
    u_post, u_ant = float(u.min()) - half_pixel, float(u.max()) + half_pixel
    depth = u_ant - u_post
    extent = float(np.hypot(membership.shape[0] * sy, membership.shape[1] * sx))
    found: dict[str, HeightMeasurement | None] = {}
    for name, frac in HEIGHT_POSITIONS.items():
        u0 = u_ant - frac * depth
        chord = _chord(membership, offset, spacing, centre + u0 * e, a, extent)
        if chord is None:
            found[name] = None
            continue
        length, p0, p1 = chord
        found[name] = HeightMeasurement(
            float(length), (float(p0[0] / sx), float(p0[1] / sy)), (float(p1[0] / sx), float(p1[1] / sy))
        )
    return MeasuredHeights(found["anterior"], found["middle"], found["posterior"], calibrated, frame)


def grade_fractures(heights: Sequence[tuple[float, float, float] | None]) -> list[FractureAssessment | None]:
    """Genant grade and shape for each body of a chain (top to bottom, adjacent in the list).

    ``heights[k]`` is (anterior, middle, posterior) in any one unit, or None when not measurable.  The
    crush reference is the mean posterior height of the nearest measurable neighbours above and below.
    """
    out: list[FractureAssessment | None] = []
    for k, h in enumerate(heights):
        if h is None or min(h) <= 0:
            out.append(None)
            continue
        ha, hm, hp = h
        neighbours = []
        for step in (-1, 1):
            j = k + step
            if 0 <= j < len(heights) and heights[j] is not None:
                neighbours.append(heights[j][2])  # type: ignore[index]
        losses = {
            FractureShape.WEDGE: 1.0 - ha / hp,
            FractureShape.BICONCAVE: 1.0 - hm / hp,
        }
        if neighbours:
            reference = float(np.mean(neighbours))
            losses[FractureShape.CRUSH] = 1.0 - hp / reference if reference > 0 else 0.0
        shape, loss = max(losses.items(), key=lambda kv: kv[1])
        loss_pct = max(0.0, 100.0 * loss)
        grade = GenantGrade.from_height_loss(loss_pct)
        out.append(FractureAssessment(grade, shape if grade > GenantGrade.NORMAL else FractureShape.NONE, round(loss_pct, 1)))
    return out


def spine_axes(centroids: Sequence[Point]) -> list[tuple[float, float]]:
    """Local cranio-caudal unit direction at each centroid of a chain (central differences)."""
    n = len(centroids)
    out = []
    for k in range(n):
        a = centroids[max(k - 1, 0)]
        b = centroids[min(k + 1, n - 1)]
        dx, dy = b[0] - a[0], b[1] - a[1]
        norm = math.hypot(dx, dy)
        out.append((dx / norm, dy / norm) if norm > 0 else (0.0, 1.0))
    return out
