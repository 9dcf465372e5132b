"""Deformations of the anatomy: an articulated spine (curvature) and vertebral compression deformities.

Model: every vertebra moves rigidly (`rigid[level]`, original -> deformed world).  Between two vertebrae
a joint at the disc centre bends (lateral bend, flexion/extension, axial twist); transforms are chained
from an anchor vertebra (the one in the middle of the field stays put).  A point of the deformed space
belongs to the segment between its two neighbouring disc planes, with a smooth hand-over across each disc
whose width grows with the distance from the spine (so soft tissue far from the spine shears gently);
its original position is the weighted mix of the inverse rigid transforms of the segments.

A compression deformity of vertebra i compresses its body along its superior axis inside its own frame
(`Fracture`): wedge (anterior height lost, falling linearly to zero at the posterior wall; the superior
endplate tilts), biconcave (both endplates sink in the middle, rims kept) or crush (the whole superior
endplate drops).  For wedge and crush the column above follows the endplate (a joint rotation about the
posterior-superior edge, or a translation), so the disc above keeps its height; biconcave endplates are
filled by the neighbouring discs.  Truth heights are measured afterwards on the deformed body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference.results import LEVELS, FractureShape, GenantGrade
from inference.synth.anatomy import Anatomy, measure_body


def rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix about a unit `axis`."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


@dataclass
class Rigid:
    """x -> R x + t."""

    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return p @ self.R.T + self.t

    def inverse(self, p: np.ndarray) -> np.ndarray:
        return (p - self.t) @ self.R

    def compose(self, other: Rigid) -> Rigid:
        """self after other."""
        return Rigid(self.R @ other.R, self.R @ other.t + self.t)

    def inv(self) -> Rigid:
        return Rigid(self.R.T, -self.R.T @ self.t)

    @staticmethod
    def about(centre: np.ndarray, R: np.ndarray) -> Rigid:
        return Rigid(R, centre - R @ centre)


@dataclass
class Fracture:
    """Compression deformity of one vertebral body (original frame of that vertebra)."""

    level: str
    shape: FractureShape
    loss: float  # fraction of the body height lost at the most affected position (0.1 .. 0.6)
    # filled by Deformation: frame and extents of the body
    centroid: np.ndarray | None = None
    axes: np.ndarray | None = None
    a_range: tuple[float, float] = (0.0, 0.0)
    half_h: float = 12.0
    half_w: float = 20.0

    def profile(self, a: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Height lost at the top and at the bottom endplate (mm) at local (a, lateral)."""
        a_post, a_ant = self.a_range
        depth = a_ant - a_post
        height = 2 * self.half_h
        # Footprint taper: full inside the body outline, fading over 6 mm outside (posterior: at the wall).
        fa = np.clip((a - a_post) / 3.0, 0.0, 1.0) * np.clip(1.0 - (a - a_ant) / 12.0, 0.0, 1.0)
        fl = np.clip(1.0 - (np.abs(lat) - self.half_w) / 8.0, 0.0, 1.0)
        foot = fa * fl
        if self.shape is FractureShape.WEDGE:
            lin = np.clip((a - a_post) / depth, 0.0, 1.0)
            lin = lin / 0.88  # 100 % of the loss at the anterior measurement line (12 % in from the front)
            top = self.loss * height * np.clip(lin, 0.0, 1.15) * fl * np.clip(1.0 - (a - a_ant) / 12.0, 0.0, 1.0)
            return top, np.zeros_like(top)
        if self.shape is FractureShape.BICONCAVE:
            ra = (a - 0.5 * (a_ant + a_post)) / (0.5 * depth)
            rl = lat / self.half_w
            bowl = np.clip(1.0 - (ra**2 + rl**2) / 0.64, 0.0, 1.0)  # rims (outer 20 %) keep their height
            dip = 0.5 * self.loss * height * bowl
            return dip, dip
        top = self.loss * height * foot  # crush: the whole endplate drops
        return top, np.zeros_like(top)


@dataclass
class Deformation:
    """Original <-> deformed mapping of one anatomy for one sample."""

    anatomy: Anatomy
    rigid: dict[str, Rigid]
    fractures: dict[str, Fracture] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    _planes: list = field(default_factory=list)

    @property
    def identity(self) -> bool:
        return not self.record.get("curvature") and not self.fractures

    def centroid(self, level: str) -> np.ndarray:
        """Deformed body centroid."""
        geo = self.anatomy.vertebrae[level]
        return self.rigid[level](geo.centroid[None])[0]

    def forward_points(self, level: str, pts: np.ndarray) -> np.ndarray:
        """Deformed positions of original points of vertebra `level` (rigid; fractured bodies compressed)."""
        fr = self.fractures.get(level)
        if fr is not None:
            pts = _compress_forward(fr, pts)
        return self.rigid[level](pts)

    def inverse(self, pts: np.ndarray) -> np.ndarray:
        """Original positions of deformed world points (N, 3)."""
        if self.identity:
            return pts
        levels = [lv for lv in self.anatomy.levels() if lv in self.rigid]
        n = len(levels)
        if n == 1:
            return self._segment_inverse(levels[0], pts)
        # Disc planes k between levels[k] (above) and levels[k+1] (below), in deformed space.
        logits = []
        for k in range(n - 1):
            q, nrm = self._planes[k]
            rel = pts - q
            d = rel @ nrm
            r = np.linalg.norm(rel - d[:, None] * nrm, axis=1)
            tau = 2.0 + 0.12 * r
            logits.append(d / tau)
        sig = [1.0 / (1.0 + np.exp(-np.clip(z, -40, 40))) for z in logits]  # 1 above the disc
        out = np.zeros_like(pts)
        total = np.zeros(len(pts))
        for i, lv in enumerate(levels):
            w = np.ones(len(pts))
            if i > 0:
                w = w * (1.0 - sig[i - 1])  # below the disc above
            if i < n - 1:
                w = w * sig[i]  # above the disc below
            keep = w > 1e-4
            if not keep.any():
                continue
            out[keep] += w[keep, None] * self._segment_inverse(lv, pts[keep])
            total[keep] += w[keep]
        total = np.maximum(total, 1e-9)
        return out / total[:, None]

    def _segment_inverse(self, level: str, pts: np.ndarray) -> np.ndarray:
        p = self.rigid[level].inverse(pts)
        fr = self.fractures.get(level)
        return _compress_inverse(fr, p) if fr is not None else p

    def finalize(self) -> None:
        """Precompute the deformed disc planes."""
        geo = self.anatomy.vertebrae
        levels = [lv for lv in self.anatomy.levels() if lv in self.rigid]
        self._planes = []
        for up, lo in zip(levels[:-1], levels[1:], strict=True):
            q0 = 0.5 * (geo[up].centroid + geo[lo].centroid)
            q = 0.5 * (self.rigid[up](q0[None])[0] + self.rigid[lo](q0[None])[0])
            n = self.rigid[up].R @ geo[up].superior + self.rigid[lo].R @ geo[lo].superior
            self._planes.append((q, n / np.linalg.norm(n)))

    def measure(self, level: str):
        """(heights, points) of the deformed body of `level`, measured in 3D (see `measure_body`)."""
        geo = self.anatomy.vertebrae[level]
        sampler = self.anatomy.body_sampler(level)
        rig = self.rigid[level]
        axes = geo.axes @ rig.R.T
        return measure_body(lambda p: sampler(self.inverse(p)), rig(geo.centroid[None])[0], axes, geo.a_range)


def _local(fr: Fracture, pts: np.ndarray) -> np.ndarray:
    assert fr.centroid is not None and fr.axes is not None, "the Deformation sets a fracture's frame first"
    return (pts - fr.centroid) @ fr.axes.T  # (l, a, s)


def _compress_inverse(fr: Fracture, pts: np.ndarray) -> np.ndarray:
    """Compressed-body frame -> original (the body stretched back, the discs beside it unchanged)."""
    loc = _local(fr, pts)
    lat, a, s = loc[:, 0], loc[:, 1], loc[:, 2]
    top, bot = fr.profile(a, lat)
    H = fr.half_h
    t_new, b_new = H - top, -H + bot
    s0 = s.copy()
    inside = (s <= t_new) & (s >= b_new)
    s0[inside] = -H + (s[inside] - b_new[inside]) * (2 * H) / np.maximum(t_new - b_new, 1e-3)[inside]
    if fr.shape is FractureShape.BICONCAVE:
        # Neighbouring discs fill the dips: stretch the band between the dip and 1.6 H back to the rim.
        reach = 1.6 * H
        up = (s > t_new) & (s < reach)
        s0[up] = H + (s[up] - t_new[up]) * (reach - H) / np.maximum(reach - t_new[up], 1e-3)
        dn = (s < b_new) & (s > -reach)
        s0[dn] = -H - (b_new[dn] - s[dn]) * (reach - H) / np.maximum(b_new[dn] + reach, 1e-3)
    else:
        above = s > t_new
        s0[above] = s[above] + top[above]  # the column above came down with the endplate
    loc[:, 2] = s0
    return loc @ fr.axes + fr.centroid


def _compress_forward(fr: Fracture, pts: np.ndarray) -> np.ndarray:
    """Original -> compressed (for points of the body itself)."""
    loc = _local(fr, pts)
    lat, a, s = loc[:, 0], loc[:, 1], loc[:, 2]
    top, bot = fr.profile(a, lat)
    H = fr.half_h
    t_new, b_new = H - top, -H + bot
    loc[:, 2] = b_new + (np.clip(s, -H, H) + H) * (t_new - b_new) / (2 * H) + (s - np.clip(s, -H, H))
    return loc @ fr.axes + fr.centroid


def plan_deformation(
    anatomy: Anatomy,
    rng: np.random.Generator,
    *,
    anchor: str,
    p_curvature: float = 0.6,
    p_fracture: float = 0.35,
    max_fractures: int = 2,
    fracture_levels: tuple[str, ...] | None = None,
    forced_fracture: tuple[str, FractureShape, float] | None = None,
) -> Deformation:
    """Draw a deformation: curvature changes (scoliosis / kyphosis / lordosis) and compression deformities."""
    levels = anatomy.levels()
    geo = anatomy.vertebrae
    n = len(levels)
    record: dict = {}
    # Joint angles (deg) at disc k between levels[k] and levels[k+1]: lateral, flexion (+ = kyphotic), twist.
    lat = np.zeros(max(n - 1, 0))
    flex = np.zeros_like(lat)
    twist = np.zeros_like(lat)
    offs = np.zeros((max(n - 1, 0), 3))
    if n > 2 and rng.random() < p_curvature:
        curv: dict[str, list[float] | float] = {}
        if rng.random() < 0.7:  # scoliosis: one or two lateral curves (C / S)
            n_curves = 1 if rng.random() < 0.55 else 2
            cobbs: list[float] = []
            for c in range(n_curves):
                apex = rng.uniform(0.2, 0.8) * (n - 2) if n_curves == 1 else (c + rng.uniform(0.25, 0.75)) * (n - 2) / 2
                span = rng.uniform(2.5, 5.0)
                cobb = rng.uniform(8.0, 55.0) * (1 if rng.random() < 0.5 else -1)
                if n_curves == 2 and c == 1:
                    cobb = -np.sign(cobbs[0]) * abs(cobb) * rng.uniform(0.6, 1.0)
                k = np.arange(n - 1)
                bump = np.exp(-0.5 * ((k - apex) / span) ** 2)
                lat += cobb * bump / bump.sum()
                # Apical vertebrae rotate axially toward the convexity (about a third of the Cobb angle).
                twist += 0.35 * cobb * np.gradient(bump / bump.max())
                cobbs.append(float(cobb))
            curv["scoliosis_cobb_deg"] = [round(c, 1) for c in cobbs]
        if rng.random() < 0.7:  # sagittal: kyphosis / lordosis change spread over the levels
            delta = rng.normal(0.0, 12.0)
            k = np.arange(n - 1)
            centre = rng.uniform(0, n - 2)
            bump = np.exp(-0.5 * ((k - centre) / rng.uniform(2.0, 5.0)) ** 2)
            flex += delta * bump / bump.sum()
            curv["sagittal_change_deg"] = round(float(delta), 1)
        flex += rng.normal(0.0, 0.8, size=flex.shape)  # small segmental irregularity
        lat += rng.normal(0.0, 0.5, size=lat.shape)
        record["curvature"] = curv
    fractures: dict[str, Fracture] = {}
    candidates = [lv for lv in (fracture_levels or levels) if lv in geo and geo[lv].complete and lv != "S1"]
    if forced_fracture is not None:
        lv, shape, loss = forced_fracture
        fractures[lv] = Fracture(lv, shape, loss)
    elif candidates and rng.random() < p_fracture:
        for lv in rng.choice(candidates, size=min(len(candidates), int(rng.integers(1, max_fractures + 1))), replace=False):
            shape = [FractureShape.WEDGE, FractureShape.BICONCAVE, FractureShape.CRUSH][int(rng.choice(3, p=[0.55, 0.25, 0.2]))]
            loss = float(rng.uniform(0.10, 0.60))
            fractures[str(lv)] = Fracture(str(lv), shape, loss)
    for lv, fr in fractures.items():
        g = geo[lv]
        fr.centroid, fr.axes, fr.a_range = g.centroid, g.axes, g.a_range
        fr.half_h = 0.5 * float(np.mean(g.heights)) if g.heights else 12.0
        rel = (g.points - g.centroid) @ g.axes.T
        fr.half_w = float(np.percentile(np.abs(rel[:, 0]), 90))
        i = levels.index(lv)
        if i > 0 and fr.shape is not FractureShape.BICONCAVE:
            # The column above sits on the sunken endplate: joint at disc i-1 gets the endplate's motion.
            a_post, a_ant = g.a_range
            drop = fr.loss * 2 * fr.half_h
            if fr.shape is FractureShape.WEDGE:
                angle = np.degrees(np.arctan2(drop / 0.88, a_ant - a_post))
                flex[i - 1] += angle
                # Part of the focal kyphosis is compensated over the next discs up.
                comp = rng.uniform(0.0, 0.6) * angle
                for j in range(max(0, i - 3), i - 1):
                    flex[j] -= comp / max(1, (i - 1) - max(0, i - 3))
            else:
                offs[i - 1] = -drop * g.superior
    record["fractures"] = {lv: {"shape": f.shape.value, "loss": round(f.loss, 3)} for lv, f in fractures.items()}
    rigid = _chain(anatomy, levels, anchor if anchor in levels else levels[n // 2], lat, flex, twist, offs, fractures)
    deformation = Deformation(anatomy=anatomy, rigid=rigid, fractures=fractures, record=record)
    deformation.finalize()
    return deformation


def _joint(anatomy: Anatomy, up: str, lo: str, lat: float, flex: float, twist: float, off: np.ndarray, fr_lo: Fracture | None) -> Rigid:
    """Motion of `up` relative to `lo` at their disc (in original coordinates)."""
    g_up, g_lo = anatomy.vertebrae[up], anatomy.vertebrae[lo]
    q = 0.5 * (g_up.centroid + g_lo.centroid)
    ax = 0.5 * (g_up.axes + g_lo.axes)
    R = rotation(ax[2], np.radians(twist)) @ rotation(ax[1], np.radians(lat)) @ rotation(ax[0], np.radians(flex))
    centre = q
    if fr_lo is not None and fr_lo.shape is FractureShape.WEDGE:
        # Hinge at the posterior-superior edge of the wedged body.
        a_post = fr_lo.a_range[0]
        centre = g_lo.centroid + a_post * g_lo.anterior + fr_lo.half_h * g_lo.superior
    j = Rigid.about(centre, R)
    return Rigid(j.R, j.t + off)


def _chain(anatomy, levels, anchor, lat, flex, twist, offs, fractures) -> dict[str, Rigid]:
    rigid = {anchor: Rigid()}
    a = levels.index(anchor)
    for k in range(a - 1, -1, -1):  # upward: T_k = T_{k+1} o J_k
        J = _joint(anatomy, levels[k], levels[k + 1], lat[k], flex[k], twist[k], offs[k], fractures.get(levels[k + 1]))
        rigid[levels[k]] = rigid[levels[k + 1]].compose(J)
    for k in range(a, len(levels) - 1):  # downward: T_{k+1} = T_k o J_k^-1
        J = _joint(anatomy, levels[k], levels[k + 1], lat[k], flex[k], twist[k], offs[k], fractures.get(levels[k + 1]))
        rigid[levels[k + 1]] = rigid[levels[k]].compose(J.inv())
    return rigid


def identity_deformation(anatomy: Anatomy) -> Deformation:
    """No deformation."""
    d = Deformation(anatomy=anatomy, rigid={lv: Rigid() for lv in anatomy.levels()})
    d.finalize()
    return d


def grade_of(fracture: Fracture | None, heights0, heights1) -> tuple[GenantGrade, FractureShape, float]:
    """Genant grade, shape and largest height loss (%) from original vs deformed heights."""
    if heights0 is None or heights1 is None:
        if fracture is None:
            return GenantGrade.NORMAL, FractureShape.NONE, 0.0
        pct = 100.0 * fracture.loss
        return GenantGrade.from_height_loss(pct), fracture.shape, pct
    losses = [100.0 * max(0.0, 1.0 - h1 / h0) for h0, h1 in zip(heights0, heights1, strict=True)]
    pct = max(losses)
    if fracture is None:
        return GenantGrade.NORMAL, FractureShape.NONE, round(pct, 1)
    return GenantGrade.from_height_loss(pct), fracture.shape, round(pct, 1)


__all__ = ["LEVELS", "Deformation", "Fracture", "Rigid", "grade_of", "identity_deformation", "plan_deformation"]
