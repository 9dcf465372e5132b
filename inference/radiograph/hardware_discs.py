"""Interbody cages, found disc space by disc space.

Why not the segmentation network: through two training runs its cage channel stayed below Dice 0.07 on
held-out images.  A PEEK cage is radiolucent and shows only as three or four marker pins, which at the
network's 1 mm per pixel look like screw tips or noise.  Asked instead "is there a cage between these two
vertebral bodies?", a small classifier on a 48 x 48 mm patch at 0.5 mm per pixel, oriented along the spine,
sees the pins, the distracted disc space and the titanium body.

* `find_discs` places the disc spaces between consecutive vertebral bodies (from the vertebra model, or
  the true bodies when training);
* `scan_discs` places candidates every fifth of a vertebral step along the spine instead,
  `scan_probabilities` scores them (every third first, then around the promising ones) and `pick_cages`
  keeps the strongest of neighbouring ones: at run time the vertebra model often merges the two bodies
  around a cage into one (a cage fills the disc space) or misses one, so a disc space between found
  bodies lies > 10 mm from 44 % of the true cages of the synthetic hold-out (2026-12-06);
* `disc_labels` says which of them hold a true cage (training and evaluation);
* `cage_probabilities` scores them; `footprint` is the region reported for a found cage: the middle of
  the disc space, about half as wide as the vertebral bodies (the classifier says where, not the outline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.radiograph.hardware_patches import Frame, cut, intensity_window

if TYPE_CHECKING:
    import torch

#: (across, along) patch pixels at `PATCH_MM`: 48 x 48 mm, both endplates and the body's width.
DISC_PATCH = (96, 96)
#: A pair of bodies further apart than this times the median step has a body missing between them.
MAX_STEP_RATIO = 1.6
MIN_STEP_MM, MAX_STEP_MM = 12.0, 60.0
#: A true cage belongs to a disc when its centre lies within this fraction of the vertebral step of the disc
#: centre along the spine, and within `LABEL_ACROSS_MM` across it.
LABEL_ALONG = 0.3
LABEL_ACROSS_MM = 25.0
#: The reported region: this fraction of the mean body width, at least the disc height tall.
FOOTPRINT_WIDTH = 0.5
MIN_FOOTPRINT_MM = 4.0
MAX_BODY_POINTS = 4000
#: `scan_discs`: a candidate every this fraction of the median vertebral step along the spine, reaching
#: this many steps beyond the end bodies (a cage under the lowest body found, as at L5-S1 when the sacrum
#: is not found).
SCAN_STEP = 0.2
SCAN_REACH = 0.75
#: `pick_cages`: candidates closer than this many vertebral steps along the spine, or than
#: `SCAN_MIN_SEPARATION_MM`, are one cage (two disc spaces are a vertebral body apart; seen on a phantom
#: whose pelvis the vertebra model cut into small "vertebrae": three cages stacked within one disc space).
SCAN_SEPARATION = 0.7
SCAN_MIN_SEPARATION_MM = 15.0
#: `scan_probabilities` asks at every `SCAN_COARSE`-th candidate first, then at the candidates between those
#: scoring at least `SCAN_REFINE_FLOOR` and their neighbours: on the synthetic hold-out and real overlays
#: (2026-12-06) the same cages as asking everywhere, with ~45 % of the patches (the classifier's time is most
#: of the scan's: ~0.4 s for a whole spine when asked everywhere, 2 CPU threads).
SCAN_COARSE = 3
SCAN_REFINE_FLOOR = 0.5
#: Patches per network call: on 2 CPU threads 32 ran faster than 128 (cache-sized batches).
PREDICT_BATCH = 32

Point = tuple[float, float]


@dataclass(frozen=True)
class Body:
    """A vertebral body (or the sacrum) on an image grid: its mask pixels' (x, y) centres, mm per pixel aside."""

    centroid: Point
    xy: np.ndarray  # (n, 2) pixel-centre coordinates

    @classmethod
    def from_mask(cls, mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> Body:
        rr, cc = np.nonzero(mask)
        xy = np.stack([cc + offset[1] + 0.5, rr + offset[0] + 0.5], axis=1).astype(np.float64)
        c = xy.mean(axis=0) if len(xy) else np.zeros(2)
        # Percentiles of a few thousand pixels place the endplates as well as all of a body's 50 000 at
        # 3000 px (and find_discs ran 34 ms on such an image with all of them).
        step = max(1, len(xy) // MAX_BODY_POINTS)
        return cls((float(c[0]), float(c[1])), xy[::step])


@dataclass(frozen=True)
class Disc:
    """The disc space between bodies `upper` and `lower` (indices into the list given to `find_discs`)."""

    upper: int
    lower: int
    frame: Frame  # centre in the disc space, direction from the upper to the lower body
    step_px: float  # centroid distance of the two bodies
    height_px: float  # gap between the upper body's lower edge and the lower body's upper edge (>= 0)
    width_px: float  # mean width of the two bodies across the spine
    along_px: float = 0.0  # position along the spine path (`scan_discs`)


def _width(body: Body, normal: np.ndarray) -> float:
    """The body's extent along `normal` (2nd to 98th percentile of its pixels)."""
    q = body.xy @ normal
    return float(np.percentile(q, 98) - np.percentile(q, 2))


def find_discs(bodies: Sequence[Body], src_mm: float) -> list[Disc]:
    """Disc spaces between consecutive bodies (ordered head to foot by centroid row); pairs too close,
    too far (a body missed between them) or with a body without pixels are skipped."""
    order = [i for i in sorted(range(len(bodies)), key=lambda i: bodies[i].centroid[1]) if len(bodies[i].xy)]
    pairs = list(zip(order[:-1], order[1:], strict=True))
    steps = [math.dist(bodies[a].centroid, bodies[b].centroid) for a, b in pairs]
    if not steps:
        return []
    median = float(np.median(steps))
    out = []
    for (a, b), step in zip(pairs, steps, strict=True):
        step_mm = step * src_mm
        if not MIN_STEP_MM <= step_mm <= MAX_STEP_MM or step > MAX_STEP_RATIO * median:
            continue
        ca, cb = np.array(bodies[a].centroid), np.array(bodies[b].centroid)
        u = (cb - ca) / step
        n = np.array([-u[1], u[0]])
        # Along the axis, the upper body ends and the lower one begins; the disc is between (for the sacrum,
        # whose centroid lies low, this still finds its upper endplate).
        da, db = bodies[a].xy - ca, bodies[b].xy - ca
        end_a, start_b = float(np.percentile(da @ u, 98)), float(np.percentile(db @ u, 2))
        t = 0.5 * (end_a + start_b)
        na, nb = da @ n, db @ n
        centre = ca + t * u + 0.5 * (float(np.median(na)) + float(np.median(nb))) * n
        width = 0.5 * (_width(bodies[a], n) + _width(bodies[b], n))
        out.append(Disc(a, b, Frame((float(centre[0]), float(centre[1])), (float(u[0]), float(u[1]))), step, max(start_b - end_a, 0.0), width))
    return out


def scan_discs(bodies: Sequence[Body], src_mm: float) -> list[Disc]:
    """Candidates every `SCAN_STEP` of the median vertebral step along the polyline through the body
    centroids (head to foot), extended by `SCAN_REACH` steps at both ends; each oriented along the path,
    with the width of its nearest bodies and the median disc height of `find_discs` (the footprint's size).
    Empty with fewer than two bodies or a median step outside `MIN_STEP_MM`..`MAX_STEP_MM`."""
    order = [i for i in sorted(range(len(bodies)), key=lambda i: bodies[i].centroid[1]) if len(bodies[i].xy)]
    if len(order) < 2:
        return []
    pts = np.array([bodies[i].centroid for i in order], dtype=np.float64)
    lengths = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    step = float(np.median(lengths))
    if not MIN_STEP_MM <= step * src_mm <= MAX_STEP_MM or lengths.min() <= 0:
        return []
    first = (pts[1] - pts[0]) / lengths[0]
    last = (pts[-1] - pts[-2]) / lengths[-1]
    path = np.vstack([pts[0] - SCAN_REACH * step * first, pts, pts[-1] + SCAN_REACH * step * last])
    seg = np.diff(path, axis=0)
    seg_len = np.linalg.norm(seg, axis=1)
    start = np.concatenate([[0.0], np.cumsum(seg_len)])
    heights = [d.height_px for d in find_discs(bodies, src_mm)]
    height = float(np.median(heights)) if heights else 0.0
    # Per path segment k (between bodies order[k-1] and order[k]; the first and last lead in and out): its
    # direction, the bodies it joins and their width across it, shared by every candidate on it.
    segments = []
    for k in range(len(seg)):
        u = seg[k] / max(seg_len[k], 1e-9)
        upper, lower = order[max(k - 1, 0)], order[min(k, len(order) - 1)]
        n = np.array([-u[1], u[0]])
        segments.append((u, upper, lower, 0.5 * (_width(bodies[upper], n) + _width(bodies[lower], n))))
    out = []
    for along in np.arange(0.0, start[-1] + 1e-6, SCAN_STEP * step):
        k = min(int(np.searchsorted(start, along, side="right")) - 1, len(seg) - 1)
        u, upper, lower, width = segments[k]
        centre = path[k] + (along - start[k]) * u
        out.append(Disc(upper, lower, Frame((float(centre[0]), float(centre[1])), (float(u[0]), float(u[1]))), step, height,
                        width, float(along)))
    return out


def pick_cages(discs: Sequence[Disc], probs: np.ndarray, threshold: float, src_mm: float) -> list[tuple[Disc, float]]:
    """The scanned candidates at or above `threshold` that are the most probable within `SCAN_SEPARATION`
    vertebral steps (at least `SCAN_MIN_SEPARATION_MM`) along the spine (greedy, strongest first), in path
    order.  A higher threshold keeps a subset of a lower one's cages (tuning relies on it)."""
    kept: list[tuple[Disc, float]] = []
    for k in np.argsort(-np.asarray(probs), kind="stable"):
        d, p = discs[int(k)], float(probs[int(k)])
        if p < threshold:
            break
        apart = max(SCAN_SEPARATION * d.step_px, SCAN_MIN_SEPARATION_MM / max(src_mm, 1e-6))
        if all(abs(d.along_px - o.along_px) > apart for o, _ in kept):
            kept.append((d, p))
    return sorted(kept, key=lambda dp: dp[0].along_px)


def disc_labels(discs: Sequence[Disc], cage_centres: Sequence[Point], src_mm: float) -> np.ndarray:
    """(n,) bool: disc i holds a cage (a cage centre near its centre, see `LABEL_ALONG`)."""
    out = np.zeros(len(discs), dtype=bool)
    for i, d in enumerate(discs):
        c = np.array(d.frame.centre)
        u = np.array(d.frame.direction)
        n = np.array([-u[1], u[0]])
        for p in cage_centres:
            v = np.array(p) - c
            if abs(v @ u) < LABEL_ALONG * d.step_px and abs(v @ n) * src_mm < LABEL_ACROSS_MM:
                out[i] = True
    return out


def disc_patches(pixels: np.ndarray, discs: Sequence[Disc], src_mm: float, window: tuple[float, float] | None = None) -> np.ndarray:
    """(n, 1, across, along) float32 patches of the disc spaces, intensity scaled to [0, 1]."""
    window = window or intensity_window(pixels)
    empty = np.zeros((1, 1), dtype=bool)
    if not discs:
        return np.zeros((0, 1, *DISC_PATCH), dtype=np.float32)
    return np.stack([cut(pixels, window, empty, (0, 0), d.frame, DISC_PATCH, src_mm)[:1] for d in discs])


def build_disc_net(width: int = 16) -> torch.nn.Module:
    """A small CNN: four conv blocks (pooling by 2), global average, one logit (a cage in this disc space)."""
    from torch import nn

    from inference.radiograph.network import double_conv

    def block(i: int, o: int) -> list[nn.Module]:
        return [*double_conv(i, o), nn.MaxPool2d(2)]

    w = width
    return nn.Sequential(*block(1, w), *block(w, 2 * w), *block(2 * w, 3 * w), *block(3 * w, 4 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w, 1))


def load_disc_net(state: dict[str, Any], width: int = 16) -> torch.nn.Module:
    """The classifier from a state dict (eval mode, channels-last: 1.9x faster on CPU, same outputs to 1e-6)."""
    import torch

    net = build_disc_net(width)
    net.load_state_dict(state)
    # Module.to takes memory_format at run time (documented); torch's overloads leave it out
    return net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def predict(net: torch.nn.Module, patches: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """(n,) cage probabilities of `disc_patches` output."""
    import torch

    if not len(patches):
        return np.zeros(0, dtype=np.float32)
    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch])).contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(net(x)).numpy().ravel())
    return np.concatenate(out)


def scan_probabilities(net: torch.nn.Module, pixels: np.ndarray, discs: Sequence[Disc], src_mm: float) -> np.ndarray:
    """(n,) cage probabilities of `scan_discs` candidates: asked at every `SCAN_COARSE`-th one, then within
    `SCAN_COARSE` - 1 candidates of those scoring `SCAN_REFINE_FLOOR` or more; a candidate not asked scores 0."""
    probs = np.zeros(len(discs), dtype=np.float32)
    if not discs:
        return probs
    window = intensity_window(pixels)
    first = list(range(0, len(discs), SCAN_COARSE))
    probs[first] = predict(net, disc_patches(pixels, [discs[i] for i in first], src_mm, window))
    near = sorted({j for i in first if probs[i] >= SCAN_REFINE_FLOOR for j in range(i - SCAN_COARSE + 1, i + SCAN_COARSE)
                   if 0 <= j < len(discs) and j % SCAN_COARSE})
    if near:
        probs[near] = predict(net, disc_patches(pixels, [discs[j] for j in near], src_mm, window))
    return probs


def cage_probabilities(net: torch.nn.Module, pixels: np.ndarray, discs: Sequence[Disc], src_mm: float) -> np.ndarray:
    """(n,) probability that each disc space holds an interbody cage."""
    return predict(net, disc_patches(pixels, discs, src_mm))


def footprint(disc: Disc, src_mm: float, shape: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray] | None:
    """(offset, bool crop) of the region reported for a cage in `disc`: an oriented rectangle, the disc
    height tall (at least `MIN_FOOTPRINT_MM`) and `FOOTPRINT_WIDTH` of the bodies' width wide; None when it
    falls outside the image."""
    half_along = 0.5 * max(disc.height_px, MIN_FOOTPRINT_MM / max(src_mm, 1e-6))
    half_across = 0.5 * max(FOOTPRINT_WIDTH * disc.width_px, MIN_FOOTPRINT_MM / max(src_mm, 1e-6))
    cx, cy = disc.frame.centre
    u = np.array(disc.frame.direction)
    n = np.array([-u[1], u[0]])
    reach = math.hypot(half_along, half_across) + 1
    r0, r1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)) + 1, shape[0])
    c0, c1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)) + 1, shape[1])
    if r1 <= r0 or c1 <= c0:
        return None
    yy, xx = np.mgrid[r0:r1, c0:c1]
    v = np.stack([xx + 0.5 - cx, yy + 0.5 - cy], axis=-1)
    mask = (np.abs(v @ u) <= half_along) & (np.abs(v @ n) <= half_across)
    if not mask.any():
        return None
    rr, cc = np.nonzero(mask)
    a, b, c, d = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
    return (r0 + int(a), c0 + int(c)), mask[a:b, c:d]
