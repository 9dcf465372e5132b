"""From the hardware network's probability maps to named implant instances, complications and a verdict.

Everything here is pure numpy/scipy on two grids of the same (canonical, head-up) radiograph:

* the **network grid** (about 1 mm per pixel), where instances are separated: connected components per
  implant class with class-specific rules (screws split by the screw-centre heatmap, rod pieces interrupted
  by screw heads or a fracture merged along their direction, cage markers clustered into one cage);
* the **source grid** (the decoded radiograph's pixels), where each instance gets its mask, outline and
  axis, is given levels from the vertebrae found on the same image, and a side from the image geometry and
  the patient orientation (the patient's left, not the viewer's).

Rods are told from screws by class, never by components: where a rod runs through a screw head the two
probability maps overlap and both instances keep the pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from inference.results import (
    FAILURE_MODES,
    LEVELS,
    Complication,
    ImplantKind,
    Point,
    Side,
    level_index,
    level_span,
)

#: Channels of the hardware network, in output order.
CHANNELS: tuple[str, ...] = (
    "metal",  # any implant
    "screw",
    "rod",
    "cage",
    "plate",
    "screw_centre",  # Gaussian at each pedicle screw's centre: instance markers
    "loosening",  # a loosened screw and its halo
    "breakage",  # a broken screw
    "rod_fracture",  # around the gap of a fractured rod
    "subsidence",  # a cage sunk into an endplate
)
METAL, SCREW, ROD, CAGE, PLATE, SCREW_CENTRE, LOOSENING, BREAKAGE, ROD_FRACTURE, SUBSIDENCE = range(len(CHANNELS))
CLASS_CHANNEL: dict[ImplantKind, int] = {
    ImplantKind.PEDICLE_SCREW: SCREW,
    ImplantKind.ROD: ROD,
    ImplantKind.INTERBODY_CAGE: CAGE,
    ImplantKind.PLATE: PLATE,
    ImplantKind.OTHER: METAL,
}
COMPLICATION_CHANNEL: dict[Complication, int] = {
    Complication.SCREW_LOOSENING: LOOSENING,
    Complication.SCREW_BREAKAGE: BREAKAGE,
    Complication.ROD_FRACTURE: ROD_FRACTURE,
    Complication.CAGE_SUBSIDENCE: SUBSIDENCE,
}


@dataclass(frozen=True)
class HardwareParams:
    """Tunable constants of the instance, level and complication steps (model.json "postprocess")."""

    class_threshold: float = 0.5
    metal_threshold: float = 0.5
    centre_threshold: float = 0.3
    centre_min_distance_mm: float = 6.0
    min_area_mm2: dict[str, float] = field(
        default_factory=lambda: {"pedicle screw": 12.0, "rod": 30.0, "interbody cage": 4.0, "plate": 40.0, "other implant": 40.0}
    )
    #: An image shows implants when the pieces kept cover at least this much.
    min_total_mm2: float = 25.0
    #: A piece is kept when its mean class probability reaches this (faint look-alikes on bone are dropped).
    min_score: float = 0.0
    #: Beside a screw, rod or plate reaching it, pedicle screws need this mean probability (see
    #: `drop_faint_screws`): on the real VAL films with implants drawn on, screws scoring below 0.84 were 45
    #: false for 21 true (200 training samples: 35 false for 13 true; 2026-12-06); 0: off.
    screw_min_score: float = 0.84
    rod_merge_mm: float = 30.0
    rod_merge_angle_deg: float = 35.0
    #: A rod piece lying alongside a larger one (at least `ROD_HUG_FRACTION` of its pixels within this many
    #: mm of it) is part of that rod, not a rod of its own (see `absorb_hugging_rods`; 10 chosen on the real
    #: VAL films with implants drawn on, 2026-12-06); 0: off.
    rod_hug_mm: float = 10.0
    #: Rod pieces that meet end to end in the rows (row gap at most this many mm, their end columns within
    #: `rod_join_offset_mm`) are one rod, whatever their principal axes say (see `join_rods_end_to_end`;
    #: chosen on the real VAL films with implants drawn on, 2026-12-06); 0: off.
    rod_join_gap_mm: float = 10.0
    rod_join_offset_mm: float = 8.0
    cage_merge_mm: float = 9.0
    plate_merge_mm: float = 10.0
    #: "other implant": metal not covered by a classified instance, as a fraction of its area.
    other_uncovered_fraction: float = 0.7
    #: Per complication: the instance score (see `complication_score`) above which it is reported.
    complication_threshold: dict[str, float] = field(
        default_factory=lambda: {c.value: 0.5 for c in Complication}
    )
    #: Implants closer than this to the image border (or the unexposed area) are "at the edge".
    border_mm: float = 2.0
    #: Disc-space cage classifier (`hardware_discs`): a disc holds a cage at this probability or above.
    cage_disc_threshold: float = 0.5
    #: When set, cages come from a scan along the spine (`hardware_discs.scan_discs`), kept at this
    #: probability or above; else from the disc spaces between the vertebrae found, at `cage_disc_threshold`.
    cage_scan_threshold: float | None = None
    #: A cage on a film where no other spinal implant is found is kept only at this probability or above
    #: (one false cage was the commonest noise on real films without implants); None: no stricter test.
    cage_alone_threshold: float | None = None
    #: Frontal views: a screw piece with at least this fraction of its pixels on a cage found is the cage's
    #: marker or edge, not a screw (22 of 161 false screws on the real VAL films with implants drawn on lay on
    #: cages; 0.2 chosen there and on 200 training samples, 2026-12-06); 0: off.
    screw_on_cage_fraction: float = 0.2
    #: Lateral views: a screw piece with at least this fraction of its pixels within `ROD_NEAR_MM` of a rod
    #: found, whose axis lies within `screw_on_rod_max_angle_deg` of the rod's local course, is a stretch of
    #: that rod (a lateral screw crosses the rod; see `screws_along_rods`; chosen on 200 training samples,
    #: 2026-12-06); 0: off.
    screw_on_rod_fraction: float = 0.5
    screw_on_rod_max_angle_deg: float = 30.0
    #: Complications never reported, whatever their score (measured no better than chance on held-out data);
    #: an image showing an implant they apply to says "<complication> not assessed".
    not_assessed: tuple[str, ...] = ()
    #: Frontal views: a piece whose pixels, within the rows the vertebrae cover, all lie farther than this
    #: many vertebral-body widths from the spine's midline is not spinal hardware (brace buckles and snaps,
    #: skin markers); 0 switches the test off.
    max_off_spine_widths: float = 1.0
    #: Implant kinds this model version does not name (measured mostly wrong on held-out data): their pieces
    #: are reported as "other implant" (metal whose kind is not named), not as a kind a reader would trust.
    not_named: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Per-kind tables given in part keep the defaults for the kinds not named.
        defaults = {"pedicle screw": 12.0, "rod": 30.0, "interbody cage": 4.0, "plate": 40.0, "other implant": 40.0}
        object.__setattr__(self, "min_area_mm2", {**defaults, **self.min_area_mm2})
        object.__setattr__(self, "complication_threshold", {**{c.value: 0.5 for c in Complication}, **self.complication_threshold})
        known = {c.value for c in Complication}
        unknown = set(self.not_assessed) - known
        if unknown:
            raise ValueError(f"not_assessed: unknown complications {sorted(unknown)} (known: {sorted(known)})")
        object.__setattr__(self, "not_assessed", tuple(self.not_assessed))
        kinds = {k.value for k in ImplantKind if k is not ImplantKind.OTHER}
        if set(self.not_named) - kinds:
            raise ValueError(f"not_named: unknown implant kinds {sorted(set(self.not_named) - kinds)} (known: {sorted(kinds)})")
        object.__setattr__(self, "not_named", tuple(self.not_named))

    @classmethod
    def from_dict(cls, data: dict | None) -> HardwareParams:
        """Parameters from model.json (unknown keys are an error naming them)."""
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown hardware post-processing parameters: {', '.join(sorted(unknown))}")
        return cls(**data)

    def as_dict(self) -> dict:
        """For model.json."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ------------------------------------------------------------------------------------------ pieces


@dataclass
class Piece:
    """One implant instance on the network grid."""

    kind: ImplantKind
    mask: np.ndarray  # bool crop on the network grid
    offset: tuple[int, int]  # (row, column) of the crop
    score: float = 1.0
    complication_scores: dict[Complication, float] = field(default_factory=dict)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def coords(self) -> np.ndarray:
        """(n, 2) network-grid (row, column) pixel-centre coordinates of the mask."""
        return part_coords(self.mask, self.offset)

    def dense(self, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        h, w = self.mask.shape
        out[self.offset[0] : self.offset[0] + h, self.offset[1] : self.offset[1] + w] = self.mask
        return out


def part_coords(mask: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """(n, 2) (row, column) pixel-centre coordinates of a crop's pixels, offset into the full grid."""
    rr, cc = np.nonzero(mask)
    return np.stack([rr + offset[0] + 0.5, cc + offset[1] + 0.5], axis=1)


def part_xy(mask: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """The same pixel centres as `part_coords` in (x, y) order (column, row), as drawing and patch frames use."""
    return part_coords(mask, offset)[:, ::-1].astype(np.float64)


def centroid_xy(mask: np.ndarray, offset: tuple[int, int]) -> tuple[float, float]:
    """(x, y) centre of a non-empty crop's pixels in the full grid (SCOORD: pixel centre = index + 0.5)."""
    cx, cy = part_xy(mask, offset).mean(axis=0)
    return float(cx), float(cy)


def rod_course(xy: np.ndarray, step_px: float) -> np.ndarray:
    """(k, 2) (x, y) points along a rod about every `step_px`: the mean of its pixels in bands of rows (a rod
    runs cranio-caudally, so a band of rows crosses it once even where it bends). Fewer than two points when
    the rod is shorter than a band."""
    if not len(xy):
        return np.zeros((0, 2))
    ys = xy[:, 1]
    top, bottom = ys.min(), ys.max()
    n = max(2, int(math.ceil((bottom - top) / max(step_px, 1.0))) + 1)
    edges = np.linspace(top, bottom + 1e-6, n + 1)
    band = np.clip(np.searchsorted(edges, ys, side="right") - 1, 0, n - 1)
    return np.array([xy[band == k].mean(axis=0) for k in range(n) if (band == k).any()]).reshape(-1, 2)


#: At most this many candidate components per class are considered (an image never shows more implants;
#: the cap bounds the time spent on a noisy probability map).
MAX_COMPONENTS = 120


def _piece_from(kind: ImplantKind, mask: np.ndarray, offset: tuple[int, int], prob: np.ndarray) -> Piece:
    """A piece from a crop (trimmed to its bounding box); score = mean class probability inside."""
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = np.ascontiguousarray(mask[r0:r1, c0:c1])
    off = (int(offset[0] + r0), int(offset[1] + c0))
    region = prob[off[0] : off[0] + crop.shape[0], off[1] : off[1] + crop.shape[1]]
    return Piece(kind, crop, off, score=round(float(region[crop].mean()), 3))


def components(labels: np.ndarray, n: int, min_px: float = 0.0, max_n: int = MAX_COMPONENTS) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """(crop mask, offset) of each labelled component with >= `min_px` pixels, largest first, at most `max_n`."""
    if n == 0:
        return []
    sizes = ndimage.sum_labels(np.ones(labels.shape, dtype=np.int32), labels, index=np.arange(1, n + 1))
    order = [k for k in np.argsort(sizes)[::-1] if sizes[k] >= min_px][:max_n]
    boxes = ndimage.find_objects(labels)
    out = []
    for k in order:
        sl = boxes[k]
        if sl is None:
            continue
        out.append((labels[sl] == k + 1, (sl[0].start, sl[1].start)))
    return out


def principal_axis(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(centre, unit direction, unit normal, length, width) of a point cloud (rows of (r, c) or (x, y))."""
    centre = coords.mean(axis=0)
    if len(coords) < 2:
        return centre, np.array([1.0, 0.0]), np.array([0.0, 1.0]), 1.0, 1.0
    cov = np.cov((coords - centre).T)
    vals, vecs = np.linalg.eigh(cov)
    d = vecs[:, 1]
    n = vecs[:, 0]
    t = (coords - centre) @ d
    s = (coords - centre) @ n
    return centre, d, n, float(t.max() - t.min() + 1.0), float(s.max() - s.min() + 1.0)


def screw_pieces(prob: np.ndarray, mm: float, params: HardwareParams) -> list[Piece]:
    """Pedicle screws: components of the screw map, split at screw-centre peaks by a watershed."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    mask = prob[SCREW] >= params.class_threshold
    if not mask.any():
        return []
    centre = ndimage.gaussian_filter(prob[SCREW_CENTRE], 0.7)
    min_dist = max(1, int(round(params.centre_min_distance_mm / mm)))
    comps, n = ndimage.label(mask)
    peaks = peak_local_max(centre, min_distance=min_dist, threshold_abs=params.centre_threshold, labels=comps, num_peaks=4 * MAX_COMPONENTS)
    markers = np.zeros(mask.shape, dtype=np.int32)
    next_id = 1
    for r, c in peaks:
        markers[r, c] = next_id
        next_id += 1
    # Components without a peak keep one marker at their most central pixel.
    have = set(np.unique(comps[markers > 0]).tolist()) - {0}
    min_px = params.min_area_mm2[ImplantKind.PEDICLE_SCREW.value] / (mm * mm)
    for crop, off in components(comps, n, min_px):
        k = int(comps[off[0] + np.nonzero(crop)[0][0], off[1] + np.nonzero(crop)[1][0]])
        if k in have:
            continue
        dist = ndimage.distance_transform_edt(crop)
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        markers[off[0] + r, off[1] + c] = next_id
        next_id += 1
    labels = watershed(-centre, markers, mask=mask)
    return [_piece_from(ImplantKind.PEDICLE_SCREW, crop, off, prob[SCREW]) for crop, off in components(labels, next_id - 1, min_px)]


def _endpoints(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centre, d, _, _, _ = principal_axis(coords)
    t = (coords - centre) @ d
    return coords[int(np.argmin(t))], coords[int(np.argmax(t))], d


def union_find(n: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """The group root of each of `n` items linked (directly or through others) by the index `pairs`."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    return [find(i) for i in range(n)]


def merge_crops(parts: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> tuple[np.ndarray, tuple[int, int]]:
    """One crop holding several (crop, offset) parts."""
    r0 = min(o[0] for _, o in parts)
    c0 = min(o[1] for _, o in parts)
    r1 = max(o[0] + m.shape[0] for m, o in parts)
    c1 = max(o[1] + m.shape[1] for m, o in parts)
    out = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for m, o in parts:
        out[o[0] - r0 : o[0] - r0 + m.shape[0], o[1] - c0 : o[1] - c0 + m.shape[1]] |= m
    return out, (r0, c0)


def merge_joined(parts: Sequence[tuple[np.ndarray, tuple[int, int]]], pairs: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """One crop per group of `parts` linked (directly or through others) by the index `pairs`."""
    roots = union_find(len(parts), pairs)
    return [merge_crops([parts[k] for k, r in enumerate(roots) if r == root]) for root in sorted(set(roots))]


def rod_pieces(prob: np.ndarray, mm: float, params: HardwareParams) -> list[Piece]:
    """Rods: components of the rod map; pieces that continue each other (end to end, along their
    direction) are one rod, whether a screw head or a fracture interrupts them."""
    mask = prob[ROD] >= params.class_threshold
    if not mask.any():
        return []
    comps, n = ndimage.label(mask, structure=np.ones((3, 3)))
    parts = components(comps, n, 0.3 * params.min_area_mm2[ImplantKind.ROD.value] / (mm * mm), max_n=60)
    if not parts:
        return []
    ends = []
    for crop, off in parts:
        ends.append(_endpoints(part_coords(crop, off)))
    max_gap = params.rod_merge_mm / mm
    cos_lim = math.cos(math.radians(params.rod_merge_angle_deg))
    pairs = []
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            ai, bi, di = ends[i]
            aj, bj, dj = ends[j]
            best = min(((p, q) for p in (ai, bi) for q in (aj, bj)), key=lambda pq: float(np.linalg.norm(pq[0] - pq[1])))
            gap = best[1] - best[0]
            dist = float(np.linalg.norm(gap))
            if dist > max_gap:
                continue
            if dist < 2.0:
                pairs.append((i, j))
                continue
            u = gap / dist
            # Both pieces must point across the gap (a rod continues straight-ish through it).
            if abs(float(u @ di)) >= cos_lim and abs(float(u @ dj)) >= cos_lim:
                pairs.append((i, j))
    merged = merge_joined(parts, pairs)
    if params.rod_hug_mm > 0:
        merged = absorb_hugging_rods(merged, params.rod_hug_mm / mm)
    if params.rod_join_gap_mm > 0:
        merged = join_rods_end_to_end(merged, params.rod_join_gap_mm / mm, params.rod_join_offset_mm / mm, ROD_END_MM / mm)
    min_px = params.min_area_mm2[ImplantKind.ROD.value] / (mm * mm)
    return [_piece_from(ImplantKind.ROD, crop, off, prob[ROD]) for crop, off in merged if crop.sum() >= min_px]


#: Share of a rod piece's pixels that must lie near a larger piece for `absorb_hugging_rods` to join them.
ROD_HUG_FRACTION = 0.3


def absorb_hugging_rods(parts: Sequence[tuple[np.ndarray, tuple[int, int]]], near_px: float) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Rod pieces (crop, offset) with each piece that lies alongside a larger one joined to it.

    The end-to-end merge of `rod_pieces` misses pieces that run beside a rod or touch its middle (seen on
    the real films with implants drawn on: most false rods were such fragments of a rod found whole). A
    piece joins the largest larger piece that has `ROD_HUG_FRACTION` of its pixels within `near_px`, and a
    piece that has joined another takes in no more: a short piece near both rods (a cross-link) joins one
    of them and never makes the left and right rods one. A second rod running within `near_px` of the first
    (a satellite or tandem rod of a revision) would be reported as part of it."""
    from scipy.spatial import cKDTree

    order = sorted(range(len(parts)), key=lambda k: -int(parts[k][0].sum()))
    coords = [part_coords(*parts[k]) for k in order]
    trees = [cKDTree(c) for c in coords]
    owner = list(range(len(order)))  # index (in `order`) of the piece each one joins
    for j in range(1, len(order)):
        for i in range(j):
            if owner[i] != i:
                continue
            dist, _ = trees[i].query(coords[j], distance_upper_bound=near_px)
            if np.isfinite(dist).mean() >= ROD_HUG_FRACTION:
                owner[j] = i
                break
    groups: dict[int, list[tuple[np.ndarray, tuple[int, int]]]] = {}
    for j, k in enumerate(order):
        groups.setdefault(owner[j], []).append(parts[k])
    return [merge_crops(group) for group in groups.values()]


#: `join_rods_end_to_end`: a rod's end column is the mean column of its pixels within this many mm of its end row.
ROD_END_MM = 6.0
#: `join_rods_end_to_end`: pieces sharing more than this fraction of the shorter one's rows lie side by side
#: (the left and the right rod), not end to end.
ROD_JOIN_ROW_OVERLAP = 0.25


def join_rods_end_to_end(parts: Sequence[tuple[np.ndarray, tuple[int, int]]], gap_px: float, offset_px: float,
                         end_px: float) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Rod pieces (crop, offset) with the pieces that continue each other down the spine joined.

    `rod_pieces` joins pieces whose principal axes both point across the gap; a short or wide piece (a rod
    stretch with a screw head on it) has no reliable axis, and on the real VAL films with implants drawn on
    (2026-12-06) such fragments of a rod found whole were a third of the false rods. Here a rod runs
    cranio-caudally: two pieces are one rod when one ends at most `gap_px` rows above where the other starts
    (or overlaps it by at most `ROD_JOIN_ROW_OVERLAP` of the shorter's rows) and their end columns there
    are within `offset_px`. The left and right rods share their rows, so they are never joined this way."""
    if len(parts) < 2:
        return list(parts)
    coords = [part_coords(*p) for p in parts]
    spans = []
    for c in coords:
        r = c[:, 0]
        top, bottom = float(r.min()), float(r.max())
        spans.append((top, bottom, float(c[r <= top + end_px, 1].mean()), float(c[r >= bottom - end_px, 1].mean())))
    pairs = []
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            (ti, bi, cti, cbi), (tj, bj, ctj, cbj) = spans[i], spans[j]
            shared = max(0.0, min(bi, bj) - max(ti, tj))
            if shared > ROD_JOIN_ROW_OVERLAP * (min(bi - ti, bj - tj) + 1.0):
                continue
            upper_first = (ti + bi) <= (tj + bj)
            gap, off = (tj - bi, abs(ctj - cbi)) if upper_first else (ti - bj, abs(cti - cbj))
            if gap <= gap_px and off <= offset_px:
                pairs.append((i, j))
    return merge_joined(parts, pairs)


def clustered_pieces(prob: np.ndarray, channel: int, kind: ImplantKind, mm: float, merge_mm: float, params: HardwareParams) -> list[Piece]:
    """Cages and plates: components of the class map, clustered when closer than `merge_mm` (a PEEK cage
    shows only its marker pins and a faint box, so its map may come in pieces)."""
    mask = prob[channel] >= params.class_threshold
    if not mask.any():
        return []
    radius = max(1, int(round(0.5 * merge_mm / mm)))
    grown = ndimage.binary_dilation(mask, structure=_disk(radius))
    groups, n = ndimage.label(grown)
    groups[~mask] = 0
    min_px = params.min_area_mm2[kind.value] / (mm * mm)
    return [_piece_from(kind, crop, off, prob[channel]) for crop, off in components(groups, n, min_px)]


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def other_pieces(prob: np.ndarray, classified: Sequence[Piece], mm: float, params: HardwareParams) -> list[Piece]:
    """Implant-like metal that no class claims ("other implant")."""
    metal = prob[METAL] >= params.metal_threshold
    if not metal.any():
        return []
    covered = np.zeros(metal.shape, dtype=bool)
    for p in classified:
        h, w = p.mask.shape
        covered[p.offset[0] : p.offset[0] + h, p.offset[1] : p.offset[1] + w] |= p.mask
    covered = ndimage.binary_dilation(covered, iterations=2)
    comps, n = ndimage.label(metal)
    min_px = params.min_area_mm2[ImplantKind.OTHER.value] / (mm * mm)
    out = []
    for crop, off in components(comps, n, min_px):
        free = crop & ~covered[off[0] : off[0] + crop.shape[0], off[1] : off[1] + crop.shape[1]]
        if free.sum() >= params.other_uncovered_fraction * crop.sum() and free.sum() >= min_px:
            out.append(_piece_from(ImplantKind.OTHER, free, off, prob[METAL]))
    return out


#: `screws_along_rods`: a screw pixel this close to a rod pixel lies on the rod.
ROD_NEAR_MM = 2.0
#: `screws_along_rods`: the rod's local course is the axis of its pixels within this distance of the screw's centre.
ROD_COURSE_RADIUS_MM = 15.0


def screws_along_rods(pieces: Sequence[Piece], mm: float, fraction: float, max_angle_deg: float) -> dict[int, int]:
    """{screw index: rod index} for the screw pieces that lie along a rod: at least `fraction` of their
    pixels within `ROD_NEAR_MM` of a rod piece (the rod holding most of them) and their axis within
    `max_angle_deg` of the rods' local course.

    For lateral views. There a pedicle screw runs front to back across the posterior rod, while a stretch
    of rod read as a screw runs along it: of the 172 false lateral screws on 200 training samples
    (2026-12-06), 56 lay on a rod and along it at 0.5 / 30 degrees, and no true one did. Not for frontal
    views, where screws project nearly end-on over the rod line and their axes say little (there the same
    test held two to four times as many true screws as false ones)."""
    from scipy.spatial import cKDTree

    rod_ids = [k for k, p in enumerate(pieces) if p.kind is ImplantKind.ROD]
    if fraction <= 0 or not rod_ids:
        return {}
    parts = [part_coords(pieces[k].mask, pieces[k].offset) for k in rod_ids]
    rod_rc = np.concatenate(parts)
    owner = np.repeat(np.arange(len(rod_ids)), [len(c) for c in parts])
    tree = cKDTree(rod_rc)
    cos_max = math.cos(math.radians(max_angle_deg))
    out: dict[int, int] = {}
    for k, p in enumerate(pieces):
        if p.kind is not ImplantKind.PEDICLE_SCREW:
            continue
        coords = part_coords(p.mask, p.offset)
        dist, idx = tree.query(coords, distance_upper_bound=ROD_NEAR_MM / mm)
        near_rod = np.isfinite(dist)
        if near_rod.mean() < fraction:
            continue
        centre, d, _, _, _ = principal_axis(coords)
        near = tree.query_ball_point(centre, ROD_COURSE_RADIUS_MM / mm)
        if len(near) < 3:
            continue
        _, rod_d, _, _, _ = principal_axis(rod_rc[near])
        if abs(float(d @ rod_d)) >= cos_max:
            out[k] = rod_ids[int(np.bincount(owner[idx[near_rod]]).argmax())]
    return out


def drop_faint_screws(pieces: list[Piece], min_score: float) -> list[Piece]:
    """`pieces` without the screws scoring below `min_score` when some screw, rod or plate reaches it: beside a
    confident construct a faint screw is mostly a false one, while a film on which everything is faint is left
    to `min_score` and `min_total_mm2` (dropping its screws too would answer more constructs "no implants")."""
    anchored = any(p.score >= min_score for p in pieces if p.kind in (ImplantKind.PEDICLE_SCREW, ImplantKind.ROD, ImplantKind.PLATE))
    if not anchored:
        return pieces
    return [p for p in pieces if p.kind is not ImplantKind.PEDICLE_SCREW or p.score >= min_score]


def find_pieces(prob: np.ndarray, mm: float, params: HardwareParams) -> list[Piece]:
    """Every implant instance on the network grid (screws, rods, cages, plates, other metal)."""
    pieces = screw_pieces(prob, mm, params)
    pieces += rod_pieces(prob, mm, params)
    pieces += clustered_pieces(prob, CAGE, ImplantKind.INTERBODY_CAGE, mm, params.cage_merge_mm, params)
    pieces += clustered_pieces(prob, PLATE, ImplantKind.PLATE, mm, params.plate_merge_mm, params)
    pieces += other_pieces(prob, pieces, mm, params)
    pieces = [p for p in pieces if p.score >= params.min_score]
    pieces = drop_faint_screws(pieces, params.screw_min_score)
    for p in pieces:
        if p.kind.value in params.not_named:
            p.kind = ImplantKind.OTHER
    total = sum(p.area for p in pieces) * mm * mm
    if total < params.min_total_mm2:
        return []
    return pieces


# ----------------------------------------------------------------------------------- complications


def complication_score(prob: np.ndarray, piece: Piece, channel: int, ring_px: int = 2) -> float:
    """Instance score of one complication: the mean of the top half of the complication map over the
    instance grown by `ring_px` (a halo lies just outside the screw)."""
    pad = ring_px + 1
    r0, c0 = piece.offset
    h, w = piece.mask.shape
    R0, C0 = max(r0 - pad, 0), max(c0 - pad, 0)
    R1, C1 = min(r0 + h + pad, prob.shape[1]), min(c0 + w + pad, prob.shape[2])
    local = np.zeros((R1 - R0, C1 - C0), dtype=bool)
    local[r0 - R0 : r0 - R0 + h, c0 - C0 : c0 - C0 + w] = piece.mask
    if ring_px:
        local = ndimage.binary_dilation(local, iterations=ring_px)
    values = np.sort(prob[channel, R0:R1, C0:C1][local])
    if values.size == 0:
        return 0.0
    return float(values[values.size // 2 :].mean())


def rod_fracture_score(prob: np.ndarray, piece: Piece, ring_px: int = 4) -> tuple[float, tuple[float, float] | None]:
    """Score of a rod fracture (the smoothed map's maximum near the rod) and where (network row, column)."""
    pad = ring_px + 1
    r0, c0 = piece.offset
    h, w = piece.mask.shape
    R0, C0 = max(r0 - pad, 0), max(c0 - pad, 0)
    R1, C1 = min(r0 + h + pad, prob.shape[1]), min(c0 + w + pad, prob.shape[2])
    local = np.zeros((R1 - R0, C1 - C0), dtype=bool)
    local[r0 - R0 : r0 - R0 + h, c0 - C0 : c0 - C0 + w] = piece.mask
    local = ndimage.binary_dilation(local, iterations=ring_px)
    smooth = ndimage.uniform_filter(prob[ROD_FRACTURE, R0:R1, C0:C1], size=3)
    smooth = np.where(local, smooth, 0.0)
    k = int(np.argmax(smooth))
    r, c = np.unravel_index(k, smooth.shape)
    return float(smooth[r, c]), (float(r + R0 + 0.5), float(c + C0 + 0.5))


def score_complications(prob: np.ndarray, pieces: Sequence[Piece]) -> dict[int, tuple[float, float] | None]:
    """Fill each piece's `complication_scores`; returns the rod-fracture location per rod piece index."""
    where: dict[int, tuple[float, float] | None] = {}
    for k, p in enumerate(pieces):
        for comp in FAILURE_MODES[p.kind]:
            if comp is Complication.ROD_FRACTURE:
                s, loc = rod_fracture_score(prob, p)
                where[k] = loc
            else:
                s = complication_score(prob, p, COMPLICATION_CHANNEL[comp], ring_px=2)
            p.complication_scores[comp] = round(s, 4)
    return where


# --------------------------------------------------------------------------------- levels and sides


@dataclass
class VertebraGeom:
    """A vertebra (or the sacrum, "S1") on the canonical source grid."""

    level: str | None
    centroid: tuple[float, float]  # (x, y) SCOORD
    mask: np.ndarray  # bool crop
    offset: tuple[int, int]  # (row, column)

    @property
    def height(self) -> float:
        return float(self.mask.any(axis=1).sum())

    @property
    def width(self) -> float:
        return float(self.mask.any(axis=0).sum())


def overlap(a_mask: np.ndarray, a_off: tuple[int, int], b_mask: np.ndarray, b_off: tuple[int, int]) -> int:
    """Pixels two offset crops share."""
    r0, c0 = max(a_off[0], b_off[0]), max(a_off[1], b_off[1])
    r1 = min(a_off[0] + a_mask.shape[0], b_off[0] + b_mask.shape[0])
    c1 = min(a_off[1] + a_mask.shape[1], b_off[1] + b_mask.shape[1])
    if r1 <= r0 or c1 <= c0:
        return 0
    a = a_mask[r0 - a_off[0] : r1 - a_off[0], c0 - a_off[1] : c1 - a_off[1]]
    b = b_mask[r0 - b_off[0] : r1 - b_off[0], c0 - b_off[1] : c1 - b_off[1]]
    return int((a & b).sum())


def spine_midline(vertebrae: Sequence[VertebraGeom]) -> tuple[np.ndarray, np.ndarray] | None:
    """(y, x) samples of the spine's midline, top to bottom, from the vertebra centroids (>= 1 vertebra)."""
    pts = sorted((v.centroid[1], v.centroid[0]) for v in vertebrae if v.level != "S1" or len(vertebrae) == 1)
    if not pts:
        return None
    ys = np.array([p[0] for p in pts])
    xs = np.array([p[1] for p in pts])
    return ys, xs


def beside_spine(mask: np.ndarray, offset: tuple[int, int], vertebrae: Sequence[VertebraGeom], widths: float) -> bool:
    """True when a piece (frontal view) lies beside the spine rather than on it: it sits within the rows
    the vertebrae span, from the top one's centre to 2.5 steps above the lowest one's, and none of its
    pixels comes within `widths` median body widths of the midline through the vertebra centres.

    Measured on the real radiographs (2026-12-05): most "implants" found on films without any were the
    buckles and snaps of scoliosis braces, two to four body widths out. Pedicle screws, rods (even bent
    along a scoliotic curve) and plates reach the vertebrae. Iliac screws do not, but they sit at the
    height of the upper sacrum, which the vertebra chain often takes for one or two more vertebrae on real
    films: the lowest 2.5 steps are therefore never judged. Fewer than three vertebrae: False."""
    bodies = [v for v in vertebrae if v.level != "S1"]
    if widths <= 0 or len(bodies) < 3:
        return False
    midline = spine_midline(bodies)
    if midline is None:
        return False
    ys, xs = midline
    rr, cc = np.nonzero(mask)
    if not len(rr):
        return False
    y = rr + offset[0] + 0.5
    x = cc + offset[1] + 0.5
    step = float(np.median(np.diff(ys))) if len(ys) >= 2 else 0.0
    if y.min() < ys[0] or y.max() > ys[-1] - 2.5 * step:
        return False
    body_width = float(np.median([v.width for v in bodies]))
    return bool(np.min(np.abs(x - np.interp(y, ys, xs))) > widths * body_width)


def midline_x(midline: tuple[np.ndarray, np.ndarray] | None, y: float) -> float | None:
    """Midline column at row `y` (held constant beyond the end vertebrae)."""
    if midline is None:
        return None
    ys, xs = midline
    return float(np.interp(y, ys, xs))


def _local_step(vertebrae: Sequence[VertebraGeom], y: float) -> float:
    named = sorted(v.centroid[1] for v in vertebrae)
    if len(named) >= 2:
        steps = np.diff(named)
        mids = (np.array(named[:-1]) + np.array(named[1:])) / 2
        return float(steps[int(np.argmin(np.abs(mids - y)))])
    if named:
        return max(vertebrae[0].height * 1.3, 1.0)
    return float("nan")


def screw_level(mask: np.ndarray, offset: tuple[int, int], centroid: Point, tip: Point | None, vertebrae: Sequence[VertebraGeom]) -> VertebraGeom | None:
    """The vertebra a screw belongs to: the body its shaft (tip half) projects into, else the nearest
    vertebra within half a step along the spine; None when nothing is close."""
    if not vertebrae:
        return None
    probe, probe_off = mask, offset
    if tip is not None:
        # Tip half of the screw: pixels nearer the tip than the centroid is.
        rr, cc = np.nonzero(mask)
        px, py = cc + offset[1] + 0.5, rr + offset[0] + 0.5
        keep = (px - tip[0]) ** 2 + (py - tip[1]) ** 2 <= (centroid[0] - tip[0]) ** 2 + (centroid[1] - tip[1]) ** 2
        if keep.sum() >= 4:
            probe = np.zeros_like(mask)
            probe[rr[keep], cc[keep]] = True
    hits = [(overlap(probe, probe_off, v.mask, v.offset), v) for v in vertebrae]
    best_n, best = max(hits, key=lambda h: h[0])
    if best_n >= max(3, 0.1 * probe.sum()):
        return best
    y = (tip or centroid)[1]
    step = _local_step(vertebrae, y)
    nearest = min(vertebrae, key=lambda v: abs(v.centroid[1] - y))
    if np.isfinite(step) and abs(nearest.centroid[1] - y) <= 0.5 * step:
        return nearest
    return None


def level_near(y: float, vertebrae: Sequence[VertebraGeom]) -> str | None:
    """The level of the vertebra nearest to row `y` along the spine (within one step), None when that
    vertebra is unnamed or none is close: the nearest NAMED one may be far away (with only the sacrum
    named, every rod gap read "near S1")."""
    if not vertebrae:
        return None
    nearest = min(vertebrae, key=lambda v: abs(v.centroid[1] - y))
    step = _local_step(vertebrae, y)
    if not np.isfinite(step) or abs(nearest.centroid[1] - y) > step:
        return None
    return nearest.level


def disc_levels(centroid: Point, vertebrae: Sequence[VertebraGeom]) -> tuple[str, ...]:
    """The two named vertebrae a cage (or disc-level implant) sits between, cranial first; () if unknown."""
    named = sorted((v for v in vertebrae if v.level), key=lambda v: v.centroid[1])
    y = centroid[1]
    above = [v for v in named if v.centroid[1] <= y]
    below = [v for v in named if v.centroid[1] > y]
    upper = above[-1] if above else None
    lower = below[0] if below else None
    step = _local_step(named, y) if named else float("nan")
    # The `.level` tests never fail (`named` has only named vertebrae); they narrow `str | None` for mypy.
    if (upper is not None and lower is not None and upper.level and lower.level
            and level_index(lower.level) == level_index(upper.level) + 1):
        return (upper.level, lower.level)
    # One neighbour named and close: the other is the next level along the spine.
    if upper is not None and upper.level and np.isfinite(step) and y - upper.centroid[1] <= 0.9 * step:
        i = level_index(upper.level)
        if i + 1 < len(LEVELS):
            return (upper.level, LEVELS[i + 1])
    if lower is not None and lower.level and np.isfinite(step) and lower.centroid[1] - y <= 0.9 * step:
        i = level_index(lower.level)
        if i >= 1:
            return (LEVELS[i - 1], lower.level)
    return ()


def covered_levels(y0: float, y1: float, vertebrae: Sequence[VertebraGeom], min_fraction: float = 0.25) -> tuple[str, ...]:
    """Named vertebrae whose body rows overlap [y0, y1] by at least `min_fraction` of their height."""
    out = []
    for v in vertebrae:
        if not v.level:
            continue
        rows = np.nonzero(v.mask.any(axis=1))[0] + v.offset[0]
        if not len(rows):
            continue
        top, bottom = rows.min(), rows.max() + 1
        inter = max(0.0, min(bottom, y1) - max(top, y0))
        if inter >= min_fraction * (bottom - top):
            out.append(v.level)
    return tuple(sorted(set(out), key=level_index))


def image_side(x: float, mid: float | None, midline_tol: float) -> int | None:
    """Which side of the midline column `mid` the column `x` lies on in the image (-1 / +1), None when the
    midline is unknown or `x` is too close to it to say."""
    if mid is None or abs(x - mid) <= 0.25 * midline_tol:
        return None
    return 1 if x > mid else -1


def side_of(x: float, mid: float | None, left_sign: int | None, midline_tol: float, midline_allowed: bool) -> Side:
    """Patient side of a point at column `x` given the midline column and which way the patient's left is."""
    if mid is None:
        return Side.UNKNOWN
    if midline_allowed and abs(x - mid) <= midline_tol:
        return Side.MIDLINE
    column = image_side(x, mid, midline_tol)
    if left_sign is None or column is None:
        return Side.UNKNOWN
    return Side.LEFT if column * left_sign > 0 else Side.RIGHT


# ------------------------------------------------------------------------------------------- words


def compact_span(upper: str, lower: str) -> str:
    """Disc-level spelling: ("L4", "L5") -> "L4–5", ("L5", "S1") -> "L5–S1", ("T12", "L1") -> "T12–L1"."""
    if upper[0] == lower[0] and lower != "S1":
        return f"{upper}–{lower[1:]}"
    return f"{upper}–{lower}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class ImplantSummary:
    """What `instrumentation_text` needs of one implant."""

    kind: ImplantKind
    levels: tuple[str, ...]
    #: Rank (top to bottom) of the vertebra a screw was assigned to, named or not; None when unassigned.
    vertebra: int | None = None
    #: Frontal views: the image side of the spine's midline (-1 / +1), None when unknown.
    column: int | None = None


def vertebrae_spanned(implants: Sequence[ImplantSummary]) -> int | None:
    """How many vertebrae the pedicle screws span, top screw to bottom screw, counted on the vertebra chain
    whether or not its levels are named (a skipped level inside a construct still counts); None if unknown."""
    ranks = [i.vertebra for i in implants if i.kind is ImplantKind.PEDICLE_SCREW and i.vertebra is not None]
    if len(set(ranks)) < 2:
        return None
    return max(ranks) - min(ranks) + 1


def _rods_text(rods: Sequence[ImplantSummary]) -> str:
    """Rods on a frontal view.  The network often finds a long rod in pieces (where it runs under screw heads
    and hooks, measured on the real postoperative film: two rods in 8 pieces), and "8 rods" is not what is
    on the film: more pieces than sides of the spine holding them are reported as pieces (a real rod fracture
    is a finding of its own)."""
    known = all(r.column is not None for r in rods)
    columns = {r.column for r in rods} if known else set()
    if len(rods) <= (len(columns) if known else 2):  # sides unknown: two rods may well be one per side
        return _plural(len(rods), "rod")
    if not known:
        return f"{len(rods)} rod pieces"
    where = "rods on both sides" if len(columns) == 2 else "rod on one side"
    return f"{where} ({len(rods)} pieces)"


def instrumentation_text(implants: Sequence[ImplantSummary], view: str | None) -> str:
    """How a surgeon would say it, e.g. "posterior instrumentation L3–S1: 8 pedicle screws, 2 rods;
    interbody cages L4–5, L5–S1".  Lateral views overlap left and right, so counts are not given there."""
    if not implants:
        return ""
    lateral = view == "LAT"
    screws = [i for i in implants if i.kind is ImplantKind.PEDICLE_SCREW]
    rods = [i for i in implants if i.kind is ImplantKind.ROD]
    cages = [i for i in implants if i.kind is ImplantKind.INTERBODY_CAGE]
    plates = [i for i in implants if i.kind is ImplantKind.PLATE]
    others = [i for i in implants if i.kind is ImplantKind.OTHER]
    parts: list[str] = []
    if screws or rods:
        levels = sorted({lv for s in screws for lv in s.levels}, key=level_index)
        if not levels:
            levels = sorted({lv for r in rods for lv in r.levels}, key=level_index)
        span = vertebrae_spanned(implants)
        if levels:
            head = f"posterior instrumentation {level_span(levels)}"
        elif span:
            head = f"posterior instrumentation across {span} vertebrae (levels not named)"
        else:
            head = "posterior instrumentation (levels not named)"
        if lateral:
            screw_levels = {lv for s in screws for lv in s.levels}
            items = []
            if screws:
                items.append(f"pedicle screws at {_plural(len(screw_levels), 'level')}" if screw_levels else "pedicle screws")
            if rods:
                items.append("rods")
            parts.append(f"{head}: {', '.join(items)} (lateral view: left and right overlap, counts from a frontal view)")
        else:
            items = []
            if screws:
                unnamed = sum(1 for s in screws if not s.levels)
                text = _plural(len(screws), "pedicle screw")
                if unnamed and levels:
                    text += f" ({unnamed} at unnamed levels)"
                items.append(text)
            if rods:
                items.append(_rods_text(rods))
            parts.append(f"{head}: {', '.join(items)}")
    if cages:
        discs = sorted({c.levels for c in cages if len(c.levels) == 2}, key=lambda lv: level_index(lv[0]))
        word = "interbody cages" if len(cages) > 1 else "interbody cage"
        if discs:
            text = f"{word} {', '.join(compact_span(*d) for d in discs)}"
            unnamed = sum(1 for c in cages if len(c.levels) != 2)
            if unnamed:
                text += f" (+{unnamed} at unnamed levels)"
        else:
            text = f"{word} (levels not named)"
        parts.append(text)
    for p in plates:
        if len(p.levels) >= 2:
            ordered = sorted(p.levels, key=level_index)
            parts.append(f"anterior plate {compact_span(ordered[0], ordered[-1])}")
        elif p.levels:
            parts.append(f"anterior plate {p.levels[0]}")
    unnamed_plates = sum(1 for p in plates if not p.levels)
    if unnamed_plates:
        parts.append(f"{'anterior plate' if unnamed_plates == 1 else f'{unnamed_plates} anterior plates'} (levels not named)")
    if others:
        parts.append(_plural(len(others), "other implant"))
    return "; ".join(parts)
