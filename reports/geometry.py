"""Outlines and centroids from masks, in SCOORD pixel coordinates (pixel centre = index + 0.5)."""

from __future__ import annotations

import numpy as np
from skimage import measure

from inference.results import Point, RegionMask


def _outline_2d(region: np.ndarray, row0: int, col0: int) -> list[Point]:
    if not region.any():
        return []
    padded = np.pad(region.astype(np.uint8), 1)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return []
    longest = max(contours, key=len)
    simplified = measure.approximate_polygon(longest, tolerance=0.5)
    # find_contours works in pixel-centre units of the padded array: undo the pad, shift to SCOORD.
    return [(float(c) - 1 + col0 + 0.5, float(r) - 1 + row0 + 0.5) for r, c in simplified]


def mask_outline(mask: RegionMask) -> list[Point]:
    """Closed outline of the largest connected part of a 2D mask (empty list for an empty mask)."""
    if mask.array.ndim != 2:
        raise ValueError(f"mask_outline needs a 2D mask, got {mask.array.ndim}D")
    return _outline_2d(mask.array, mask.offset[0], mask.offset[1])


def largest_slice(mask: RegionMask) -> int | None:
    """Index (in the full grid) of the slice where a 3D mask has most voxels."""
    if mask.array.ndim != 3 or not mask.array.any():
        return None
    counts = mask.array.reshape(mask.array.shape[0], -1).sum(axis=1)
    return int(mask.offset[0] + int(np.argmax(counts)))


def largest_slice_outline(mask: RegionMask) -> tuple[int, list[Point]] | None:
    """(slice index, outline) of a 3D mask on its largest slice."""
    index = largest_slice(mask)
    if index is None:
        return None
    region = mask.array[index - mask.offset[0]]
    outline = _outline_2d(region, mask.offset[1], mask.offset[2])
    return (index, outline) if len(outline) >= 3 else None


def slice_centroid(mask: RegionMask, index: int) -> Point | None:
    """Centroid (SCOORD) of a 3D mask's cut at slice `index`."""
    k = index - mask.offset[0]
    if mask.array.ndim != 3 or not 0 <= k < mask.array.shape[0]:
        return None
    rows, cols = np.nonzero(mask.array[k])
    if not len(rows):
        return None
    return (float(cols.mean()) + mask.offset[2] + 0.5, float(rows.mean()) + mask.offset[1] + 0.5)
