"""Training targets of the hardware network from a data-engine `SynthSample` (DRR or real-image overlay).

Every sample goes through the node's own preprocessing (`hardware.prepare`) and its implant instance map
is brought to the network grid per class by area averaging, so thin rods keep their width.  What the
instance map cannot say directly is filled in here:

* a rod runs through the screw heads it is locked into: where the rod is interrupted only by screw pixels,
  those pixels are rod as well (the classes overlap; instances are told apart by class, not components);
* a screw's pixels hidden under a rod are screw as well;
* ``screw_centre``: a Gaussian at each screw's centroid (instance markers);
* ``loosening`` / ``breakage`` / ``subsidence``: the affected screw or cage, grown a little (a halo lies
  just outside the screw);
* ``rod_fracture``: a disk around the gap of a fractured rod, found as the closest points of the two rod
  pieces that remain apart after joining screw heads; where the gap cannot be found (hidden behind a head
  or the other rod on a lateral view), that rod is "unknown" (weight 0) for this channel.

Targets are stored bit-packed (`TargetItem.bits`) so a few thousand samples fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from inference.radiograph import preprocess
from inference.radiograph.hardware_post import (
    BREAKAGE,
    CAGE,
    CHANNELS,
    LOOSENING,
    METAL,
    PLATE,
    ROD,
    ROD_FRACTURE,
    SCREW,
    SCREW_CENTRE,
    SUBSIDENCE,
    _disk,
)
from inference.results import Complication, ImplantKind
from inference.train.targets import gaussian_into

#: Bit of each binary channel in `TargetItem.bits`; IGNORE_BIT marks rod-fracture "unknown".
BIT = {METAL: 0, SCREW: 1, ROD: 2, CAGE: 3, PLATE: 4, LOOSENING: 5, BREAKAGE: 6, ROD_FRACTURE: 7, SUBSIDENCE: 8}
IGNORE_BIT = 9
CENTRE_SIGMA_PX = 2.5
KIND_CHANNEL = {ImplantKind.PEDICLE_SCREW: SCREW, ImplantKind.ROD: ROD, ImplantKind.INTERBODY_CAGE: CAGE, ImplantKind.PLATE: PLATE}


@dataclass
class TargetItem:
    """One sample on the network grid with bit-packed targets."""

    image: np.ndarray  # float16 (H, W), normalised as the node does
    bits: np.ndarray  # uint16 (H, W)
    centres: np.ndarray  # (n, 2) float32 (row, column) network index coordinates + 0.5
    view: str
    kind: str  # "drr", "phantom" or "real-overlay"
    source: str
    complications: tuple[str, ...] = ()
    n_implants: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def anchors(self) -> np.ndarray:
        """(row, column) points a training crop likes to be centred near: implant pixels, else anywhere."""
        metal = (self.bits >> BIT[METAL]) & 1
        rr, cc = np.nonzero(metal)
        if not len(rr):
            return np.zeros((0, 2))
        pick = np.linspace(0, len(rr) - 1, num=min(16, len(rr))).astype(int)
        return np.stack([rr[pick] + 0.5, cc[pick] + 0.5], axis=1)


def _resample_mask(mask: np.ndarray, shape: tuple[int, int], scale: tuple[float, float], threshold: float = 0.5) -> np.ndarray:
    if not mask.any():
        return np.zeros(shape, dtype=bool)
    out = preprocess.resample(mask.astype(np.float32), scale)
    if out.shape != shape:  # rounding: resample computes the same shape as the image, but be safe
        out = np.pad(out, ((0, max(0, shape[0] - out.shape[0])), (0, max(0, shape[1] - out.shape[1]))))[: shape[0], : shape[1]]
    return out >= threshold


def rod_gap(rod: np.ndarray, joined: np.ndarray, max_gap_px: float = 15.0) -> tuple[float, float] | None:
    """(row, column) of the gap of a fractured rod, or None when the rod is not visibly in two pieces (or the
    two largest pieces lie farther apart than `max_gap_px`)."""
    comps, n = ndimage.label(joined, structure=np.ones((3, 3)))
    if n < 2:
        return None
    sizes = ndimage.sum(rod, comps, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1]
    if sizes[order[1]] < 4:
        return None
    a = np.argwhere(comps == order[0] + 1)
    b = np.argwhere(comps == order[1] + 1)
    # Closest pair of pixels (subsample long pieces: a rod is thin, a few hundred pixels).
    a = a[:: max(1, len(a) // 400)]
    b = b[:: max(1, len(b) // 400)]
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    if d[i, j] > max_gap_px**2:  # pieces far apart: not a gap this rod shows
        return None
    mid = (a[i] + b[j]) / 2.0
    return float(mid[0] + 0.5), float(mid[1] + 0.5)


def make_item(sample: Any, net_spacing_mm: float | None = None) -> TargetItem:
    """A data-engine sample on the network grid with its targets (see the module docstring)."""
    from inference.radiograph.hardware import SPACING_MM, prepare

    spacing = tuple(sample.pixel_spacing_mm) if sample.pixel_spacing_mm else None
    image, scale = prepare(sample.image, spacing, net_spacing_mm or SPACING_MM)
    shape = image.shape
    inst = sample.implants
    specs = sample.implant_specs
    bits = np.zeros(shape, dtype=np.uint16)
    classes: dict[int, np.ndarray] = {}
    for kind, ch in KIND_CHANNEL.items():
        ids = [k + 1 for k, s in enumerate(specs) if s.kind is kind]
        classes[ch] = _resample_mask(np.isin(inst, ids), shape, scale, 0.4) if ids else np.zeros(shape, bool)
    other_ids = [k + 1 for k, s in enumerate(specs) if s.kind not in KIND_CHANNEL]
    other = _resample_mask(np.isin(inst, other_ids), shape, scale, 0.4) if other_ids else np.zeros(shape, bool)
    screw, rod = classes[SCREW], classes[ROD]
    if rod.any() and screw.any():
        rod_through = ndimage.binary_closing(rod, structure=_disk(6)) & screw
        screw_under = ndimage.binary_closing(screw, structure=_disk(4)) & rod
        classes[ROD] = rod | rod_through
        classes[SCREW] = screw | screw_under
    metal = other.copy()
    for m in classes.values():
        metal |= m
    for ch, m in classes.items():
        bits |= m.astype(np.uint16) << BIT[ch]
    bits |= metal.astype(np.uint16) << BIT[METAL]

    def union(pred) -> np.ndarray:  # noqa: ANN001
        ids = [k + 1 for k, s in enumerate(specs) if pred(s)]
        return _resample_mask(np.isin(inst, ids), shape, scale, 0.3) if ids else np.zeros(shape, bool)

    loose = union(lambda s: Complication.SCREW_LOOSENING in s.complications)
    broken = union(lambda s: Complication.SCREW_BREAKAGE in s.complications)
    sunk = union(lambda s: Complication.CAGE_SUBSIDENCE in s.complications)
    if loose.any():
        bits |= ndimage.binary_dilation(loose, iterations=2).astype(np.uint16) << BIT[LOOSENING]
    if broken.any():
        bits |= ndimage.binary_dilation(broken, iterations=1).astype(np.uint16) << BIT[BREAKAGE]
    if sunk.any():
        bits |= ndimage.binary_dilation(sunk, iterations=2).astype(np.uint16) << BIT[SUBSIDENCE]
    joinable = classes[ROD] | classes[SCREW]
    for k, s in enumerate(specs):
        if s.kind is not ImplantKind.ROD or Complication.ROD_FRACTURE not in s.complications:
            continue
        rod_k = _resample_mask(inst == k + 1, shape, scale, 0.3)
        if not rod_k.any():
            continue
        near = ndimage.binary_dilation(rod_k, iterations=3)
        joined = rod_k | (near & joinable & ~_other_rods(inst, specs, k, shape, scale))
        gap = rod_gap(rod_k, joined)
        if gap is None:
            bits |= near.astype(np.uint16) << IGNORE_BIT
            continue
        r, c = gap
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        disk = (yy + 0.5 - r) ** 2 + (xx + 0.5 - c) ** 2 <= 4.5**2
        bits |= disk.astype(np.uint16) << BIT[ROD_FRACTURE]
    centres = []
    for k, s in enumerate(specs):
        if s.kind is not ImplantKind.PEDICLE_SCREW:
            continue
        rr, cc = np.nonzero(inst == k + 1)
        if len(rr) < 3:
            continue
        centres.append(((rr.mean() + 0.5) * scale[0], (cc.mean() + 0.5) * scale[1]))
    meta = sample.meta or {}
    image_kind = "real-overlay" if meta.get("real_image") else ("phantom" if meta.get("source") == "phantom" else "drr")
    return TargetItem(
        image=image.astype(np.float16),
        bits=bits,
        centres=np.array(centres, dtype=np.float32).reshape(-1, 2),
        view=str(sample.view),
        kind=image_kind,
        source=str(meta.get("source", "")),
        complications=tuple(sorted({c.value for s in specs for c in s.complications})),
        n_implants=len(specs),
        meta={"seed": meta.get("seed"), "real_image": meta.get("real_image"), "field": meta.get("field")},
    )


def _other_rods(inst: np.ndarray, specs: list, k: int, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Pixels of the other rods (a lateral view overlaps them: they must not bridge this rod's gap)."""
    ids = [j + 1 for j, s in enumerate(specs) if s.kind is ImplantKind.ROD and j != k]
    return _resample_mask(np.isin(inst, ids), shape, scale, 0.5) if ids else np.zeros(shape, bool)


def dense_targets(item: TargetItem) -> tuple[np.ndarray, np.ndarray]:
    """(target, weight) float32 arrays (len(CHANNELS), H, W) of one item."""
    h, w = item.bits.shape
    target = np.zeros((len(CHANNELS), h, w), dtype=np.float32)
    weight = np.ones((len(CHANNELS), h, w), dtype=np.float32)
    for ch, bit in BIT.items():
        target[ch] = (item.bits >> bit) & 1
    ignore = ((item.bits >> IGNORE_BIT) & 1).astype(bool)
    weight[ROD_FRACTURE][ignore & (target[ROD_FRACTURE] == 0)] = 0.0
    heat = target[SCREW_CENTRE]
    for r, c in item.centres:
        gaussian_into(heat, float(r), float(c), CENTRE_SIGMA_PX)
    return target, weight

