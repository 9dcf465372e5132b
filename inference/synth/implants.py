"""Spinal implants placed in the (deformed) anatomy and projected exactly: pedicle screws, rods, interbody
cages, anterior plates, and their failure modes.

Implants are solid primitives (cylinders, boxes, spheres) in 3D.  Their line integrals are computed
analytically per detector ray (chord length x attenuation), which is the same as inserting them into the
volume before projection, but sharp at any pixel size: a 5 mm screw is only two voxels of the resampled
CT grid.  The attenuation added is the implant's minus that of the tissue it displaces.

Materials (linear attenuation at the spectrum's effective energy, NIST XCOM mass attenuation x density):
titanium alloy (4.4 g/cm3), cobalt-chrome (8.3), stainless steel (7.9), PEEK (1.32, nearly radiolucent,
with tantalum marker pins, 16.6).

Hooks: the cranial level of a posterior construct may hold laminar hooks instead of pedicle screws (a solid
block seating the rod, its set screw, and a blade under the lamina), as long thoracic constructs often end.
They belong to their rod's instance: the rod-fracture classifier must learn that a wide block at a rod's end
is hardware, not a gap (a real postoperative film raised a false rod fracture there).

Failure modes: screw loosening (a radiolucent halo of 1-2.5 mm around the shaft: bone replaced by soft
tissue), screw breakage (the shaft split with a gap and the tip part tilted), rod fracture (a gap with
offset between two heads), cage subsidence (the cage sunk 2-5 mm into an endplate).

The planner works on `Frame`s (a vertebra's centre, axes and size), so it serves CT and phantom anatomy
(`insert_implants`) as well as real radiographs, where frames come from the vertebra boxes
(`inference.synth.real`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference.results import Complication, ImplantKind, Side
from inference.synth.sample import ImplantSpec

# Mass attenuation (cm^2/g) at 40, 50, 60, 80 keV and density (g/cm^3).
_MATERIALS = {
    "titanium": ((2.21, 1.21, 0.766, 0.405), 4.43),
    "cobalt-chrome": ((3.30, 1.85, 1.15, 0.58), 8.3),
    "stainless steel": ((3.63, 1.96, 1.21, 0.60), 7.9),
    "tantalum": ((8.2, 4.5, 2.8, 1.3), 16.6),
    "peek": ((0.24, 0.21, 0.19, 0.175), 1.32),
}
_E = np.array([40.0, 50.0, 60.0, 80.0])


def material_mu(material: str, kvp: float) -> float:
    """Linear attenuation (1/mm) of `material` at the effective energy of a `kvp` spectrum (~0.6 kVp)."""
    mass, rho = _MATERIALS[material]
    e = 0.6 * kvp
    return float(np.exp(np.interp(e, _E, np.log(mass)))) * rho / 10.0


def tissue_mu(hu: float, kvp: float) -> float:
    """Attenuation of tissue of `hu` (same model as `drr.attenuation`)."""
    from inference.synth.drr import bone_scale, mu_water

    mw = mu_water(kvp)
    return mw * (1.0 + (bone_scale(kvp) if hu > 0 else 1.0) * hu / 1000.0)


@dataclass
class Primitive:
    """A solid: "cyl" (p0, axis, length, radius), "box" (centre, axes rows, half sizes), "sphere" (centre, r)."""

    shape: str
    instance: int
    mu: float
    p0: np.ndarray
    axis: np.ndarray | None = None
    length: float = 0.0
    radius: float = 0.0
    axes: np.ndarray | None = None
    half: np.ndarray | None = None
    inner_radius: float = 0.0  # hollow cylinder (halo: the annulus between inner_radius and radius)
    thread_pitch: float = 0.0  # threads: the outer 25 % of the radius is modulated along the axis
    label: bool = True  # part of the instance's label (halos are not)

    def bounds(self) -> tuple[np.ndarray, float]:
        """Bounding sphere (centre, radius)."""
        if self.shape == "cyl":
            assert self.axis is not None, "a cylinder has an axis"
            return self.p0 + 0.5 * self.length * self.axis, 0.5 * self.length + self.radius
        if self.shape == "box":
            assert self.half is not None, "a box has half sizes"
            return self.p0, float(np.linalg.norm(self.half))
        return self.p0, self.radius


@dataclass
class Frame:
    """A vertebra's pose for implant planning (world or beam coordinates, mm)."""

    key: str  # level name, or "box3" on real radiographs
    centre: np.ndarray  # body centroid
    axes: np.ndarray  # rows lateral (patient left), anterior, superior
    width: float
    depth: float
    height: float
    a_post: float  # posterior wall along anterior axis, from the centre (negative)
    level: str | None = None


@dataclass
class Plan:
    """Implants of one sample: primitives and the spec of each instance (1-based index = position + 1)."""

    primitives: list[Primitive] = field(default_factory=list)
    specs: list[ImplantSpec] = field(default_factory=list)
    #: points along each instance (for visibility), same order as specs
    points: list[np.ndarray] = field(default_factory=list)

    def add(self, spec: ImplantSpec, prims: list[Primitive], pts: np.ndarray) -> int:
        idx = len(self.specs) + 1
        for p in prims:
            p.instance = idx
        self.primitives += prims
        self.specs.append(spec)
        self.points.append(pts)
        return idx


def _cyl(p0, p1, r, mu, **kw) -> Primitive:
    v = np.asarray(p1, float) - np.asarray(p0, float)
    L = float(np.linalg.norm(v))
    return Primitive("cyl", 0, mu, np.asarray(p0, float), v / max(L, 1e-6), L, r, **kw)


def _levels(frames: list[Frame], idx: list[int]) -> tuple[str, ...]:
    return tuple(level for i in idx if (level := frames[i].level))


def plan_implants(
    frames: list[Frame], rng: np.random.Generator, kvp: float, *, force: tuple[str, ...] = (), hook_prob: float = 0.0,
    rod_fracture_prob: float = 0.1,
) -> Plan:
    """Draw a construct on `frames` (ordered cranial to caudal): posterior screws + rods (+ cages),
    an anterior plate, or standalone cages, with failure modes.

    A posterior construct of three or more levels ends cranially in hooks with probability `hook_prob` (or
    when "hooks" is forced).  At 0 no extra random number is drawn, so older caches render the same.  Each
    rod breaks with probability `rod_fracture_prob` (or when "rod_fracture" is forced).
    """
    plan = Plan()
    n = len(frames)
    if n < 2:
        return plan
    kinds = set(force)
    if not kinds:
        r = rng.random()
        kinds = {"posterior"} if r < 0.7 else ({"plate"} if r < 0.85 else {"cage"})
        if "posterior" in kinds and rng.random() < 0.45:
            kinds.add("cage")
    mu_soft = tissue_mu(40.0, kvp)
    mu_bone = tissue_mu(250.0, kvp)
    # Screws and plates: titanium alloy (sometimes stainless steel); rods: titanium or cobalt-chrome.
    metal = "titanium" if rng.random() < 0.85 else "stainless steel"
    screw_metal = metal
    rod_metal = "titanium" if rng.random() < 0.6 else "cobalt-chrome"
    # ---- which levels
    span = int(min(n, 1 + rng.choice([1, 1, 2, 2, 3, 4, 5, 7, 10])))
    start = int(rng.integers(0, n - span + 1))
    if span < 2:
        span = 2
        start = min(start, n - 2)
    run = list(range(start, start + span))
    if "posterior" in kinds:
        heads: dict[float, list[np.ndarray]] = {-1.0: [], 1.0: []}
        hooked = len(run) >= 3 and ("hooks" in force or (hook_prob > 0.0 and rng.random() < hook_prob))
        hooks: dict[float, tuple[list[Primitive], np.ndarray]] = {}
        for i in run:
            f = frames[i]
            for side in (-1.0, 1.0):
                if hooked and i == run[0]:
                    head, prims, pts = _hook(f, side, rng, material_mu(screw_metal, kvp) - mu_bone)
                    hooks[side] = (prims, pts)
                    heads[side].append(head)
                    continue
                if len(run) > 3 and rng.random() < 0.05:
                    continue  # a skipped screw in a long construct
                comps = []
                if rng.random() < 0.1 or "loosening" in force:
                    comps.append(Complication.SCREW_LOOSENING)
                if rng.random() < 0.05 or "breakage" in force:
                    comps.append(Complication.SCREW_BREAKAGE)
                head, prims, pts, details = _pedicle_screw(f, side, rng, material_mu(screw_metal, kvp) - mu_bone, mu_bone - mu_soft, comps)
                side_enum = Side.LEFT if side > 0 else Side.RIGHT
                details["material"] = screw_metal
                plan.add(ImplantSpec(ImplantKind.PEDICLE_SCREW, _levels(frames, [i]), side_enum, tuple(comps), details), prims, pts)
                heads[side].append(head)
        for side, hs in heads.items():
            if len(hs) < 2:
                continue
            broken = rng.random() < rod_fracture_prob or "rod_fracture" in force
            prims, pts, details = _rod(np.array(hs), frames, run, side, rng, material_mu(rod_metal, kvp) - mu_soft, broken)
            details["material"] = rod_metal
            if side in hooks:  # the hook is part of the rod's instance (it seats the rod's cranial end)
                prims = prims + hooks[side][0]
                pts = np.vstack([pts, hooks[side][1]])
                details["hooks"] = 1
            rod_comps = (Complication.ROD_FRACTURE,) if broken else ()
            plan.add(
                ImplantSpec(ImplantKind.ROD, _levels(frames, run), Side.LEFT if side > 0 else Side.RIGHT, rod_comps,
                            details),
                prims,
                pts,
            )
    if "cage" in kinds:
        discs = [i for i in run[:-1]] if "posterior" in kinds else [int(rng.integers(0, n - 1))]
        k = int(rng.integers(1, min(3, len(discs)) + 1))
        for i in sorted(rng.choice(discs, size=k, replace=False)):
            subs = rng.random() < 0.15 or "subsidence" in force
            for spec, prims, pts in _cages(frames[i], frames[i + 1], rng, kvp, subs):
                spec = ImplantSpec(spec.kind, _levels(frames, [i, i + 1]), spec.side, spec.complications, spec.details)
                plan.add(spec, prims, pts)
    if "plate" in kinds:
        i = int(rng.integers(0, n - 1))
        j = min(n - 1, i + int(rng.integers(1, 3)))
        prims, pts, details = _plate(frames, i, j, rng, material_mu(metal, kvp) - mu_soft, material_mu(metal, kvp) - mu_bone)
        details["material"] = metal
        plan.add(ImplantSpec(ImplantKind.PLATE, _levels(frames, list(range(i, j + 1))), Side.MIDLINE, (), details), prims, pts)
    return plan


def _pedicle_screw(f: Frame, side: float, rng, mu_net: float, mu_halo: float, comps: list[Complication]):
    lat, ant, sup = f.axes
    lumbar = f.width > 38.0
    diameter = float(np.clip(rng.normal(6.8 if lumbar else 5.2, 0.7), 4.5, 8.5))
    medial = np.radians(rng.uniform(8.0, 22.0) if lumbar else rng.uniform(3.0, 12.0))
    cranial = np.radians(rng.normal(0.0, 5.0))
    d = np.cos(medial) * ant - side * np.sin(medial) * lat
    d = np.cos(cranial) * d + np.sin(cranial) * sup
    d /= np.linalg.norm(d)
    isthmus = f.centre + (f.a_post - 0.22 * f.depth) * ant + side * 0.34 * f.width * lat + 0.05 * f.height * sup
    entry = isthmus - 16.0 * d
    reach = float(np.dot(f.centre + (f.a_post + f.depth) * ant - entry, d)) - 3.0  # stop short of the anterior cortex
    length = float(np.clip(min(rng.uniform(30.0, 55.0), reach), 25.0, 55.0))
    tip = entry + length * d
    r = diameter / 2
    prims: list[Primitive] = []
    details = {"diameter_mm": round(diameter, 2), "length_mm": round(length, 1)}
    if Complication.SCREW_BREAKAGE in comps:
        at = rng.uniform(0.25, 0.45) * length
        gap = rng.uniform(0.6, 2.0)
        b = entry + at * d
        prims.append(_cyl(entry, b, r, mu_net, thread_pitch=2.5))
        tilt = rng.normal(0.0, 0.08, size=3)
        d2 = d + tilt - np.dot(tilt, d) * d
        d2 /= np.linalg.norm(d2)
        b2 = b + gap * d
        prims.append(_cyl(b2, b2 + (length - at - gap) * d2, r, mu_net, thread_pitch=2.5))
        details["break_at_mm"] = round(at, 1)
        details["gap_mm"] = round(gap, 2)
    else:
        prims.append(_cyl(entry, tip, r, mu_net, thread_pitch=2.5))
    if Complication.SCREW_LOOSENING in comps:
        halo = rng.uniform(1.0, 2.5)
        prims.append(_cyl(entry + 8.0 * d, tip + 1.0 * d, r + halo, -mu_halo, inner_radius=r, label=False))
        details["halo_mm"] = round(halo, 2)
    # Polyaxial head (tulip) sitting on the entry point, opening dorsally.
    head_c = entry - 6.0 * d
    prims.append(_cyl(head_c - 6.0 * ant, head_c + 4.0 * ant, 5.5, mu_net * 0.6))  # hollow: rod seat
    pts = np.stack([entry + t * (tip - entry) for t in np.linspace(0, 1, 6)] + [head_c])
    return head_c - 3.0 * ant, prims, pts, details


def _hook(f: Frame, side: float, rng, mu_net: float) -> tuple[np.ndarray, list[Primitive], np.ndarray]:
    """Laminar hook(s) on `f`: (rod seat point, primitives, points for visibility).

    A hook's body is a solid block (~9 x 10 x 13 mm) with a set screw on its dorsal face; its blade (6 mm wide,
    2 mm thick) reaches under the lamina cranially or caudally.  Half the time a second hook facing the other
    way sits beside it (a claw).  On an AP film that is a dense block on the rod, up to three times its width.
    """
    lat, ant, sup = f.axes
    seat = (f.centre + (f.a_post - 0.22 * f.depth - 20.0) * ant + side * rng.uniform(0.28, 0.36) * f.width * lat
            + rng.uniform(0.0, 0.3) * f.height * sup)
    axes = np.stack([lat, ant, sup])
    way = 1.0 if rng.random() < 0.5 else -1.0  # up- or down-going blade
    bodies = [(seat, way)]
    if rng.random() < 0.5:
        bodies.append((seat + side * rng.uniform(7.0, 10.0) * lat + rng.uniform(-4.0, 4.0) * sup, -way))
    prims, pts = [], []
    for centre, w in bodies:
        half = np.array([rng.uniform(4.0, 5.0), rng.uniform(4.5, 5.5), rng.uniform(5.5, 7.0)])
        blade_c = centre + (half[1] + 3.0) * ant + w * (half[2] + 2.0) * sup
        prims += [
            Primitive("box", 0, mu_net, centre.copy(), axes=axes, half=half),
            Primitive("box", 0, mu_net, centre + (half[1] + 1.5) * ant + w * 0.5 * half[2] * sup, axes=axes,
                      half=np.array([3.0, 1.5, 0.5 * half[2] + 1.0])),
            Primitive("box", 0, mu_net, blade_c, axes=axes, half=np.array([3.0, 1.0, 5.0])),
            _cyl(centre - (half[1] + 2.0) * ant, centre - (half[1] - 3.0) * ant, 4.0, mu_net),
        ]
        pts += [centre, blade_c]
    return seat - 1.0 * ant, prims, np.stack(pts)


def _rod(heads: np.ndarray, frames, run, side, rng, mu_net: float, broken: bool):
    """A rod bent through the screw heads (a smooth curve), extending beyond the end heads."""
    from scipy.interpolate import make_interp_spline

    order = np.argsort([-np.dot(h, frames[run[0]].axes[2]) for h in heads])  # cranial first
    hs = heads[order]
    ext = rng.uniform(5.0, 15.0)
    t0 = hs[0] + ext * (hs[0] - hs[1]) / np.linalg.norm(hs[0] - hs[1])
    t1 = hs[-1] + ext * (hs[-1] - hs[-2]) / np.linalg.norm(hs[-1] - hs[-2])
    ctrl = np.vstack([t0, hs, t1])
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1))])
    spline = make_interp_spline(s, ctrl, k=min(3, len(ctrl) - 1))
    samples = spline(np.linspace(0, s[-1], max(6, int(s[-1] / 8.0))))
    r = float(rng.choice([2.75, 3.0, 3.175]))
    prims = []
    details = {"diameter_mm": round(2 * r, 2), "length_mm": round(float(s[-1]), 1)}
    cut = None
    if broken:
        k = int(rng.integers(1, len(samples) - 2))
        cut = k
        details["fracture_segment"] = k
    offset = np.zeros(3)
    for k in range(len(samples) - 1):
        a, b = samples[k] + offset, samples[k + 1] + offset
        if cut is not None and k == cut:
            gap = rng.uniform(1.0, 4.0)
            mid = 0.5 * (a + b)
            u = (b - a) / np.linalg.norm(b - a)
            prims.append(_cyl(a, mid - 0.5 * gap * u, r, mu_net))
            offset = rng.normal(0.0, 1.5, size=3)
            prims.append(_cyl(mid + 0.5 * gap * u + offset, b + offset, r, mu_net))
            details["gap_mm"] = round(gap, 2)
            continue
        # Slight overlap of segments avoids seams; the doubled sliver is sub-millimetre.
        prims.append(_cyl(a, b + 0.01 * (b - a), r, mu_net))
    return prims, samples, details


def _cages(upper: Frame, lower: Frame, rng, kvp: float, subsided: bool):
    """Interbody cage(s) in the disc between `upper` and `lower`: one TLIF/ALIF cage or a PLIF pair."""
    lat, ant, sup = 0.5 * (upper.axes + lower.axes)
    sup = sup / np.linalg.norm(sup)
    top = upper.centre - 0.5 * upper.height * upper.axes[2]
    bottom = lower.centre + 0.5 * lower.height * lower.axes[2]
    disc_c = 0.5 * (top + bottom)
    disc_h = float(np.clip(np.dot(top - bottom, sup), 6.0, 16.0))
    peek = rng.random() < 0.65
    mu_disc = tissue_mu(80.0, kvp)
    style = str(rng.choice(["tlif", "plif", "alif"]))
    out = []
    boxes = []
    w = 0.5 * (upper.width + lower.width)
    if style == "plif":
        for sign in (-1.0, 1.0):
            boxes.append((disc_c + sign * 0.22 * w * lat, np.array([5.0, 12.0, 0.5 * disc_h]), Side.LEFT if sign > 0 else Side.RIGHT))
    elif style == "tlif":
        boxes.append((disc_c + rng.normal(0, 3) * lat, np.array([0.3 * w, 5.5, 0.5 * disc_h]), Side.MIDLINE))
    else:
        boxes.append((disc_c + 0.1 * upper.depth * ant, np.array([0.38 * w, 0.36 * upper.depth, 0.5 * disc_h]), Side.MIDLINE))
    for centre, half, side in boxes:
        details = {"style": style, "material": "peek" if peek else "titanium"}
        comps: tuple[Complication, ...] = ()
        if subsided:
            sink = rng.uniform(2.0, 5.0)
            centre = centre - sink * sup
            details["subsidence_mm"] = round(sink, 1)
            comps = (Complication.CAGE_SUBSIDENCE,)
        axes = np.stack([lat, ant, sup])
        prims = []
        if peek:
            prims.append(Primitive("box", 0, material_mu("peek", kvp) - mu_disc, centre, axes=axes, half=half.copy()))
            mu_ta = material_mu("tantalum", kvp) - mu_disc
            for k in range(int(rng.integers(2, 4))):
                pos = centre + rng.uniform(-0.7, 0.7) * half[0] * lat + (-0.8 + 1.6 * k / 2) * half[1] * ant
                prims.append(_cyl(pos - 0.8 * half[2] * sup, pos + 0.8 * half[2] * sup, 0.5, mu_ta))
        else:
            mu_ti = material_mu("titanium", kvp) - mu_disc
            wall = 1.2
            # Hollow titanium cage: four walls (a box frame), open top and bottom for bone graft.
            for ax_i, sgn in ((0, -1), (0, 1), (1, -1), (1, 1)):
                c = centre + sgn * (half[ax_i] - wall / 2) * axes[ax_i]
                hh = half.copy()
                hh[ax_i] = wall / 2
                prims.append(Primitive("box", 0, mu_ti, c, axes=axes, half=hh))
        pts = np.stack([centre + sx * half[0] * lat + sy * half[1] * ant for sx in (-1, 1) for sy in (-1, 1)] + [centre])
        out.append((ImplantSpec(ImplantKind.INTERBODY_CAGE, (), side, comps, details), prims, pts))
    return out


def _plate(frames, i, j, rng, mu_plate: float, mu_screw: float):
    """Anterior plate over the bodies i..j with two screws into each end body."""
    fi, fj = frames[i], frames[j]
    ant = 0.5 * (fi.axes[1] + fj.axes[1])
    ant /= np.linalg.norm(ant)
    lat = 0.5 * (fi.axes[0] + fj.axes[0])
    a_i = fi.centre + (fi.a_post + fi.depth + 2.0) * fi.axes[1] + 0.35 * fi.height * fi.axes[2]
    a_j = fj.centre + (fj.a_post + fj.depth + 2.0) * fj.axes[1] - 0.35 * fj.height * fj.axes[2]
    centre = 0.5 * (a_i + a_j)
    sup = a_i - a_j
    length = float(np.linalg.norm(sup)) + 14.0
    sup /= np.linalg.norm(sup)
    lat = lat - np.dot(lat, sup) * sup
    lat /= np.linalg.norm(lat)
    ant = np.cross(sup, lat)
    width = float(np.clip(0.45 * fi.width, 14.0, 26.0))
    thick = rng.uniform(2.0, 3.2)
    prims = [Primitive("box", 0, mu_plate, centre, axes=np.stack([lat, ant, sup]), half=np.array([width / 2, thick / 2, length / 2]))]
    screw_len = float(np.clip(0.6 * fi.depth, 12.0, 30.0))
    for end, f in ((a_i, fi), (a_j, fj)):
        for side in (-1.0, 1.0):
            p = end + side * 0.3 * width * lat
            q = p - screw_len * f.axes[1] - side * 0.1 * screw_len * lat
            prims.append(_cyl(p, q, 2.0, mu_screw, thread_pitch=1.8))
    pts = np.stack([centre + t * sup * length / 2 + s * lat * width / 2 for t in (-1, 0, 1) for s in (-1, 1)])
    return prims, pts, {"length_mm": round(length, 1), "width_mm": round(width, 1), "screws": 4}


# --------------------------------------------------------------------------------------- projection


#: path length (mm) through an implant that labels a pixel even where the implant shows no contrast
LABEL_CHORD_MM = 0.5


def project_primitives(prims: list[Primitive], proj, n_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """Line integral image (rows, cols) of the primitives and the instance map: the implant contributing the
    most attenuation, else (radiolucent parts) the one with the longest path through it.

    `proj` is a `drr.Projection`; primitives are in world coordinates.
    """
    rows, cols = proj.rows, proj.cols
    total = np.zeros((rows, cols), np.float32)
    per_inst = np.zeros((n_instances + 1, rows, cols), np.float32) if n_instances else None
    footprint = np.zeros_like(per_inst) if per_inst is not None else None
    src = np.array([0.0, 0.0, -proj.sod])
    for p in prims:
        c, rad = p.bounds()
        cb = proj.to_beam(c[None])[0]
        m = proj.sod / (proj.sod + cb[2])
        cx, cy = cb[0] * m / proj.pixel_mm + cols / 2, cb[1] * m / proj.pixel_mm + rows / 2
        rpx = rad * m * 1.1 / proj.pixel_mm + 2
        c0, c1 = max(0, int(cx - rpx)), min(cols, int(cx + rpx) + 1)
        r0, r1 = max(0, int(cy - rpx)), min(rows, int(cy + rpx) + 1)
        if c1 <= c0 or r1 <= r0:
            continue
        u = (np.arange(c0, c1) + 0.5 - cols / 2) * proj.pixel_mm
        v = (np.arange(r0, r1) + 0.5 - rows / 2) * proj.pixel_mm
        U, V = np.meshgrid(u, v)
        d = np.stack([U, V, np.full_like(U, proj.sod)], axis=-1)
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        chord = _chord(p, proj, src, d)
        contrib = (chord * p.mu).astype(np.float32)
        total[r0:r1, c0:c1] += contrib
        if per_inst is not None and footprint is not None and p.label:  # (both None, or neither)
            per_inst[p.instance, r0:r1, c0:c1] += contrib
            footprint[p.instance, r0:r1, c0:c1] += chord.astype(np.float32)
    if per_inst is None or footprint is None:
        return total, np.zeros((rows, cols), np.int16)
    best = per_inst.argmax(axis=0).astype(np.int16)
    best[per_inst.max(axis=0) < 0.05] = 0
    # Where no implant shows by contrast, the footprint still belongs to its implant: a PEEK body is nearly as
    # dense as the disc it replaces, so by contrast alone it was labelled only where the beam happened to cross
    # enough of it (kVp and view dependent) and a cage's label was a few marker pins on one image, a box on
    # the next.  Metal keeps the pixels it shows on.
    body = footprint.argmax(axis=0).astype(np.int16)
    fill = (best == 0) & (footprint.max(axis=0) >= LABEL_CHORD_MM)
    best[fill] = body[fill]
    return total, best


def _chord(p: Primitive, proj, src: np.ndarray, d: np.ndarray) -> np.ndarray:
    axes = np.array(proj.axes)
    if p.shape == "cyl":
        a = axes @ p.axis
        p0 = proj.to_beam(p.p0[None])[0]
        outer = _cyl_chord(src - p0, d, a, p.length, p.radius, p.thread_pitch)
        if p.inner_radius > 0:
            outer = outer - _cyl_chord(src - p0, d, a, p.length, p.inner_radius, 0.0)
        return outer
    if p.shape == "sphere":
        w = src - proj.to_beam(p.p0[None])[0]
        b = d @ w
        disc = b**2 - (w @ w - p.radius**2)
        return 2.0 * np.sqrt(np.maximum(disc, 0.0))
    # box: slab method in the box frame
    assert p.axes is not None and p.half is not None, "a box has axes and half sizes"
    c = proj.to_beam(p.p0[None])[0]
    bx = p.axes @ axes.T  # box axes in beam coordinates (rows)
    o = bx @ (src - c)
    dd = d @ bx.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-p.half - o) / dd
        t2 = (p.half - o) / dd
    tmin = np.nanmax(np.where(np.isfinite(t1), np.minimum(t1, t2), -np.inf), axis=-1)
    tmax = np.nanmin(np.where(np.isfinite(t1), np.maximum(t1, t2), np.inf), axis=-1)
    inside_par = np.all(np.isfinite(t1) | (np.abs(o) <= p.half), axis=-1)
    return np.where(inside_par, np.maximum(tmax - tmin, 0.0), 0.0)


def _cyl_chord(w: np.ndarray, d: np.ndarray, a: np.ndarray, length: float, r: float, pitch: float) -> np.ndarray:
    """Chord of rays (origin o with w = o - p0, directions d (..., 3)) through a finite cylinder."""
    da = d @ a
    wa = float(w @ a)
    dp = d - da[..., None] * a
    wp = w - wa * a
    A = np.sum(dp * dp, axis=-1)
    B = 2.0 * (dp @ wp)
    C = float(wp @ wp) - r * r
    disc = B * B - 4 * A * C
    ok = (disc > 0) & (A > 1e-12)
    sq = np.sqrt(np.maximum(disc, 0.0))
    A_ = np.where(ok, A, 1.0)
    t1, t2 = (-B - sq) / (2 * A_), (-B + sq) / (2 * A_)
    with np.errstate(divide="ignore", invalid="ignore"):
        z0 = (0.0 - wa) / da
        z1 = (length - wa) / da
    zmin = np.where(np.abs(da) > 1e-9, np.minimum(z0, z1), -np.inf)
    zmax = np.where(np.abs(da) > 1e-9, np.maximum(z0, z1), np.inf)
    chord = np.where(ok, np.maximum(np.minimum(t2, zmax) - np.maximum(t1, zmin), 0.0), 0.0)
    if pitch > 0:
        # Threads: rays crossing the outer rim (shallow chords) are modulated along the axis.
        tm = 0.5 * (np.maximum(t1, zmin) + np.minimum(t2, zmax))
        z = wa + tm * da
        full = 2 * r
        rim = np.clip(1.0 - chord / (0.66 * full), 0.0, 1.0)
        chord = chord * (1.0 - 0.45 * rim * (0.5 + 0.5 * np.cos(2 * np.pi * z / pitch)))
    return chord


# ------------------------------------------------------------------------------------ CT / phantom


def frames_from_anatomy(anatomy, deformation) -> list[Frame]:
    """Deformed frames of the complete, non-sacral vertebrae plus S1 (screws go into the sacrum too)."""
    frames = []
    for level in anatomy.levels():
        geo = anatomy.vertebrae[level]
        if level.startswith("C") or (not geo.complete and level != "S1"):
            continue
        rig = deformation.rigid[level]
        rel = (geo.points - geo.centroid) @ geo.axes.T
        width = 2.0 * float(np.percentile(np.abs(rel[:, 0]), 95))
        height = float(np.mean(geo.heights)) if geo.heights else 2.0 * float(np.percentile(np.abs(rel[:, 2]), 90))
        a_post, a_ant = geo.a_range
        frames.append(
            Frame(
                key=level,
                centre=rig(geo.centroid[None])[0],
                axes=geo.axes @ rig.R.T,
                width=min(width, 55.0),
                depth=a_ant - a_post,
                height=height,
                a_post=a_post,
                level=level,
            )
        )
    return frames


def insert_implants(anatomy, deformation, proj, grid, mu, rng, config, *, kvp: float):
    """Plan implants (probability `config.p_implants`, or forced) and project them.

    Returns (specs, instance map at the projection's size, implant line integrals); the caller adds the line
    integrals to the DRR.  `grid` / `mu` are unused: implants are projected analytically.
    """
    force = tuple(config.forced("implants") or ())
    if not force and rng.random() >= config.p_implants:
        return None, None, None
    frames = frames_from_anatomy(anatomy, deformation)
    # Hardware goes where the film is: levels whose body centre projects inside the field (plus a margin).
    margin = 0.1 * max(proj.rows, proj.cols)
    xy = proj.to_pixels(np.stack([f.centre for f in frames])) if frames else np.zeros((0, 2))
    frames = [
        f for f, (x, y) in zip(frames, xy, strict=True)
        if -margin <= x < proj.cols + margin and -margin <= y < proj.rows + margin
    ]
    plan = plan_implants(frames, rng, kvp, force=force, hook_prob=config.p_hooks, rod_fracture_prob=config.p_rod_fracture)
    if not plan.specs:
        return None, None, None
    line, inst = project_primitives(plan.primitives, proj, len(plan.specs))
    return plan, inst, line
