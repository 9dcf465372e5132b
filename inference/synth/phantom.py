"""Procedural spine phantoms: a parametric 3D spine (bodies, discs, pedicles, laminae, spinous and
transverse processes, ribs, sacrum and iliac wings) in a soft-tissue torso with lungs and bowel gas.

They give shape variety the two CTs cannot (vertebra sizes, disc heights, sagittal profile, body
habitus), go through the same projector, deformations and implants, and are the only anatomy the tests
use (tests never read the shared data).  Everything is drawn from the seed.

The spine is built as a chain from the sacrum upward: each level has a body (elliptic cylinder with a
cortical shell, slightly waisted), a disc above it, and a neural arch; the sagittal profile follows
lordosis / kyphosis angles spread over the levels.
"""

from __future__ import annotations

import functools

import numpy as np

from inference.results import LEVELS
from inference.synth.anatomy import BODY_BIT, Anatomy, compute_geometry

#: Body width, depth, height (mm) and disc height by region, interpolated along the column.
_SIZES = {
    "C3": (18.0, 16.0, 13.0, 5.0),
    "C7": (24.0, 17.0, 14.0, 5.0),
    "T1": (26.0, 18.0, 16.0, 4.0),
    "T6": (30.0, 24.0, 19.0, 4.5),
    "T12": (40.0, 30.0, 24.0, 7.0),
    "L3": (47.0, 34.0, 26.0, 10.0),
    "L5": (50.0, 35.0, 26.0, 11.0),
}


def _size(level: str) -> np.ndarray:
    keys = sorted(_SIZES, key=LEVELS.index)
    idx = [LEVELS.index(k) for k in keys]
    vals = np.array([_SIZES[k] for k in keys])
    i = LEVELS.index(level)
    return np.array([np.interp(i, idx, vals[:, c]) for c in range(4)])


@functools.lru_cache(maxsize=12)
def make_phantom(seed: int, top: str = "C3", bottom: str = "S1", spacing: float = 2.5) -> Anatomy:
    """A phantom spine `top`..`bottom` (S1 = sacrum) on a `spacing` mm grid, deterministic by `seed`."""
    rng = np.random.default_rng([int(seed), 0xFA7])
    levels = list(LEVELS[LEVELS.index(top) : LEVELS.index(bottom) + 1])
    scale = rng.uniform(0.88, 1.12)
    # ---- the chain, from the sacrum up, in the sagittal plane (y: posterior +, z: up +)
    lordosis = rng.uniform(30.0, 70.0)
    kyphosis = rng.uniform(20.0, 60.0)
    cervical = rng.uniform(0.0, 35.0)
    sacral_slope = rng.uniform(30.0, 50.0)
    seg_angle = {}
    for lv in levels:
        if lv.startswith("L") or lv == "S1":
            seg_angle[lv] = -lordosis / 5.0
        elif lv.startswith("T"):
            seg_angle[lv] = kyphosis / 12.0
        else:
            seg_angle[lv] = -cervical / 6.0
    lateral_drift = rng.normal(0.0, 0.6, size=len(levels))
    centres: dict[str, np.ndarray] = {}
    frames: dict[str, np.ndarray] = {}
    dims: dict[str, np.ndarray] = {}
    # Tilt of the superior axis from vertical, in the sagittal plane (deg, + = top leans anterior).
    theta = 0.9 * sacral_slope  # the sacral endplate faces anteriorly; lordosis turns the axis back
    phi = 0.0
    pos = np.array([0.0, 0.0, 0.0])
    for i, lv in enumerate(reversed(levels)):
        size = _size(lv if lv != "S1" else "L5") * scale * rng.uniform(0.94, 1.06, size=4)
        if lv == "S1":
            size = size * np.array([1.0, 1.0, 1.4, 1.0])
        dims[lv] = size
        t = np.radians(theta)
        p = np.radians(phi)
        sup = np.array([np.sin(p), -np.sin(t), np.cos(t) * np.cos(p)])
        sup /= np.linalg.norm(sup)
        ant = np.array([0.0, -np.cos(t), -np.sin(t)])  # anterior in the sagittal plane
        ant -= ant.dot(sup) * sup
        ant /= np.linalg.norm(ant)
        lat = np.cross(sup, ant)
        if i == 0:
            pos = np.array([0.0, 0.0, 0.0])
        else:
            prev = list(reversed(levels))[i - 1]
            step = 0.5 * dims[prev][2] + dims[prev][3] + 0.5 * size[2]
            pos = pos + step * 0.5 * (frames[prev][2] + sup)
        centres[lv], frames[lv] = pos.copy(), np.stack([lat, ant, sup])
        theta += seg_angle[lv] * rng.uniform(0.7, 1.3)
        phi += lateral_drift[len(levels) - 1 - i]
    # ---- grid covering the column, torso and pelvis
    pts = np.stack(list(centres.values()))
    zmin, zmax = pts[:, 2].min() - 110.0, pts[:, 2].max() + 40.0
    half_w = rng.uniform(140.0, 190.0) * scale
    y_lo, y_hi = pts[:, 1].min() - rng.uniform(170.0, 260.0), pts[:, 1].max() + 110.0
    origin = np.array([-half_w - 20.0, y_lo - 10.0, zmin])
    shape_xyz = np.ceil((np.array([half_w + 20.0, y_hi + 10.0, zmax]) - origin) / spacing).astype(int) + 1
    nz, ny, nx = shape_xyz[2], shape_xyz[1], shape_xyz[0]
    hu = np.full((nz, ny, nx), -1000.0, np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    xs = origin[0] + spacing * np.arange(nx)
    ys = origin[1] + spacing * np.arange(ny)
    zs = origin[2] + spacing * np.arange(nz)
    spine_y = np.interp(zs, pts[::-1, 2] if pts[0, 2] > pts[-1, 2] else pts[:, 2], pts[::-1, 1] if pts[0, 2] > pts[-1, 2] else pts[:, 1])
    _torso(hu, xs, ys, zs, spine_y, centres, levels, rng, scale, half_w)
    anatomy = Anatomy(
        name="phantom",
        hu=hu,
        labels=labels,
        spacing=np.array([spacing] * 3),
        origin=origin,
        provenance=f"procedural phantom seed {seed} ({top}-{bottom}, {spacing} mm)",
    )
    for lv in levels:
        _vertebra(anatomy, lv, centres[lv], frames[lv], dims[lv], rng)
    if "T12" in levels or "T1" in levels:
        for lv in levels:
            if lv.startswith("T"):
                for side in (-1.0, 1.0):
                    _rib(anatomy, lv, centres[lv], frames[lv], dims[lv], side, rng, scale)
    if "S1" in levels:
        _pelvis(anatomy, centres["S1"], frames["S1"], dims["S1"], rng, scale)
    compute_geometry(anatomy)
    return anatomy


def _torso(hu, xs, ys, zs, spine_y, centres, levels, rng, scale, half_w) -> None:
    """Soft-tissue torso (elliptic cross-sections), subcutaneous fat, lungs, bowel gas."""
    X, Y = np.meshgrid(xs, ys)  # (ny, nx)
    has_thorax = any(lv.startswith("T") for lv in levels)
    z_diaphragm = centres["T11"][2] if "T11" in centres else (centres[levels[0]][2] + 60.0)
    z_apex = centres["T1"][2] + 15.0 if "T1" in centres else z_diaphragm + 220.0
    depth_ab = rng.uniform(90.0, 150.0) * scale  # anterior abdominal wall distance from the spine
    fat = rng.uniform(8.0, 35.0)
    gas = [(rng.uniform(-90, 90), rng.uniform(-60, -10), rng.uniform(-150, 40), rng.uniform(10, 35)) for _ in range(int(rng.integers(3, 12)))]
    for k, z in enumerate(zs):
        cy = spine_y[k]
        neck = "C7" in centres and z > centres["T1"][2] + 10.0
        a = 60.0 * scale if neck else half_w * (0.9 if z > z_diaphragm else 1.0)
        front = cy - (45.0 * scale if neck else depth_ab + (25.0 if has_thorax and z > z_diaphragm else 0.0))
        back = cy + (45.0 if neck else 75.0 * scale)
        b = 0.5 * (back - front)
        yc = 0.5 * (back + front)
        r = (X / a) ** 2 + ((Y - yc) / b) ** 2
        body = r <= 1.0
        sl = hu[k]
        sl[body] = 35.0
        inner = ((X / max(a - fat, 10)) ** 2 + ((Y - yc) / max(b - fat, 10)) ** 2) > 1.0
        sl[body & inner] = -95.0
        if has_thorax and z_diaphragm - 10.0 < z < z_apex and not neck:
            dome = np.clip((z - z_diaphragm) / 40.0, 0.0, 1.0)
            taper = np.clip((z_apex - z) / 60.0, 0.2, 1.0)
            for side in (-1.0, 1.0):
                lx = side * 0.48 * a
                lung = ((X - lx) / (0.36 * a * taper)) ** 2 + ((Y - (yc - 0.05 * b)) / (0.72 * b)) ** 2 <= dome
                sl[lung & body] = -820.0
            heart = ((X - 0.15 * a) / (0.3 * a)) ** 2 + ((Y - (front + 0.35 * b)) / (0.35 * b)) ** 2 <= 1.0
            sl[heart & body & (z < z_diaphragm + 110.0)] = 45.0
        if not has_thorax or z < z_diaphragm - 10.0:
            for gx, gy, gz, gr in gas:
                dz = z - (centres[levels[-1]][2] + 80.0 + gz)
                if abs(dz) < gr:
                    rr = np.sqrt(gr**2 - dz**2)
                    blob = (X - gx) ** 2 + (Y - (cy + gy - 40.0)) ** 2 <= rr**2
                    sl[blob & body] = -900.0


def _local_grid(anatomy: Anatomy, centre: np.ndarray, radius: np.ndarray):
    """Index box and world points of the grid around `centre` (+- radius mm per axis)."""
    lo = np.floor((centre - radius - anatomy.origin) / anatomy.spacing).astype(int)
    hi = np.ceil((centre + radius - anatomy.origin) / anatomy.spacing).astype(int) + 1
    shape = np.array(anatomy.shape[::-1])
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        return None, None
    x = anatomy.origin[0] + anatomy.spacing[0] * np.arange(lo[0], hi[0])
    y = anatomy.origin[1] + anatomy.spacing[1] * np.arange(lo[1], hi[1])
    z = anatomy.origin[2] + anatomy.spacing[2] * np.arange(lo[2], hi[2])
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return box, np.stack([X, Y, Z], axis=-1)


def _paint(anatomy: Anatomy, box, occ: np.ndarray, value: float, code: int | None, body: bool = False) -> None:
    sub = anatomy.hu[box]
    # Partial-volume style fill: occupancy in [0, 1] blends toward the bone value.
    sub[:] = np.where(occ > 0, np.maximum(sub, sub * (1 - occ) + value * occ), sub)
    if code is not None:
        lab = anatomy.labels[box]
        inside = occ >= 0.5
        lab[inside] = code | (BODY_BIT if body else 0)


def _soft_occ(sd: np.ndarray, spacing: float) -> np.ndarray:
    """Occupancy from a signed distance (negative inside), smoothed over one voxel."""
    return np.clip(0.5 - sd / spacing, 0.0, 1.0)


def _vertebra(anatomy: Anatomy, level: str, c: np.ndarray, frame: np.ndarray, dims: np.ndarray, rng) -> None:
    lat, ant, sup = frame
    W, D, H, disc = dims
    code = LEVELS.index(level) + 1
    h = float(anatomy.spacing[0])
    box, P = _local_grid(anatomy, c, np.array([max(W, 60.0) * 1.1 + 20, max(W, 60.0) * 1.1 + 20, 50.0 + H]))
    if box is None:
        return
    rel = P - c
    l_, a_, s_ = rel @ lat, rel @ ant, rel @ sup
    cancellous = rng.uniform(130.0, 260.0)
    cortical = rng.uniform(700.0, 1100.0)
    sacrum = level == "S1"
    # Body: elliptic cylinder, waisted in the middle.
    waist = 1.0 - 0.06 * (1.0 - (2 * s_ / H) ** 2)
    rho = np.sqrt((l_ / (0.5 * W * waist)) ** 2 + (a_ / (0.5 * D)) ** 2)
    if sacrum:
        # Sacrum: the body tapers downward and widens into the alae at the top.
        taper = np.clip(0.5 + s_ / H, 0.25, 1.0)
        rho = np.sqrt((l_ / (0.5 * W * (0.8 + 1.4 * taper))) ** 2 + (a_ / (0.5 * D * taper + 1e-3)) ** 2)
    sd_body = np.maximum((rho - 1.0) * 0.5 * min(W, D), np.abs(s_) - 0.5 * H)
    occ = _soft_occ(sd_body, h)
    _paint(anatomy, box, occ, cancellous, code, body=True)
    shell = _soft_occ(np.abs(sd_body + 1.0) - 1.0, h) * occ
    _paint(anatomy, box, shell, cortical, None)
    # Disc above (no label).
    if not level.startswith("C1"):
        s_d = s_ - (0.5 * H + 0.5 * disc)
        rho_d = np.sqrt((l_ / (0.5 * W * 0.96)) ** 2 + (a_ / (0.5 * D * 0.96)) ** 2)
        sd_disc = np.maximum((rho_d - 1.0) * 0.5 * min(W, D), np.abs(s_d) - 0.5 * disc)
        dsc = _soft_occ(sd_disc, h)
        sub = anatomy.hu[box]
        sub[:] = np.where(dsc > 0.5, np.maximum(sub, 85.0), sub)
    if sacrum:
        return
    # Neural arch: canal, pedicles, laminae, spinous and transverse processes.
    canal_r = rng.uniform(7.0, 10.0) if not level.startswith("C") else 8.0
    a_canal = -0.5 * D - canal_r - 1.0
    ped_r = 0.12 * W + 1.5
    ped_x = canal_r + ped_r * 0.7
    ped_len = 2 * canal_r + 4
    parts = []
    for side in (-1.0, 1.0):
        # Pedicle: cylinder along -anterior from the body's posterior wall.
        d = np.sqrt((l_ - side * ped_x) ** 2 + (s_ - 0.1 * H) ** 2)
        along = -(a_ + 0.5 * D - 2.0)
        parts.append(np.maximum(d - ped_r, np.maximum(-along, along - ped_len)))
        # Transverse process.
        tp_len = 0.45 * W + rng.uniform(5.0, 15.0)
        d_tp = np.sqrt((a_ - (a_canal - canal_r * 0.3)) ** 2 + (s_ - 0.1 * H) ** 2)
        along_tp = side * l_ - ped_x
        parts.append(np.maximum(d_tp - (0.25 * ped_r + 2.5), np.maximum(-along_tp, along_tp - tp_len)))
    # Lamina: a ring segment behind the canal.
    r_c = np.sqrt(l_**2 + (a_ - a_canal) ** 2)
    lamina = np.maximum(np.abs(r_c - (canal_r + 3.0)) - 2.5, np.maximum(a_ - a_canal, np.abs(s_) - 0.42 * H))
    parts.append(lamina)
    # Spinous process: slab pointing posteriorly (and down in the thoracic spine).
    sp_len = {"C": 18.0, "T": 34.0, "L": 30.0}[level[0]] * rng.uniform(0.85, 1.15) * (1.5 if level == "C7" else 1.0)
    droop = 0.8 if level.startswith("T") else 0.15
    t_sp = -(a_ - (a_canal - canal_r))
    s_line = -droop * t_sp
    sp = np.maximum(np.maximum(np.abs(l_) - 3.0, np.abs(s_ - s_line) - 0.22 * H - 1.5), np.maximum(-t_sp, t_sp - sp_len))
    parts.append(sp)
    arch = np.minimum.reduce(parts)
    occ_a = _soft_occ(arch, h)
    _paint(anatomy, box, occ_a, rng.uniform(350.0, 650.0), code, body=False)


def _rib(anatomy: Anatomy, level: str, c, frame, dims, side: float, rng, scale: float) -> None:
    """A rib: a tube along an elliptic arc from the transverse process around to the front, sloping down."""
    lat, ant, sup = frame
    W, D, H, _ = dims
    t_idx = int(level[1:])
    reach = (60.0 + 10.0 * min(t_idx, 7) - 6.0 * max(0, t_idx - 8)) * scale
    depth = (70.0 + 8.0 * min(t_idx, 7)) * scale
    n = 40 if t_idx < 11 else 20
    ts = np.linspace(0.0, np.pi * (0.95 if t_idx < 11 else 0.55), n)
    start = c - (0.5 * D + 14.0) * ant + side * (0.5 * W + 8.0) * lat
    pts = (
        start[None]
        + side * reach * np.sin(ts)[:, None] * lat[None]
        + depth * (1 - np.cos(ts))[:, None] * ant[None]
        - (0.35 * depth * (1 - np.cos(ts)) + 6.0 * ts)[:, None] * sup[None]
    )
    r = rng.uniform(4.5, 6.5) * scale
    centre = pts.mean(axis=0)
    radius = np.abs(pts - centre).max(axis=0) + r + 3.0
    box, P = _local_grid(anatomy, centre, radius)
    if box is None:
        return
    # Distance to the centreline via a distance transform of the rasterised (densely sampled) arc.
    from scipy import ndimage

    h0 = float(anatomy.spacing[0])
    fine = np.concatenate([pts[k] + np.linspace(0, 1, 8)[:, None] * (pts[k + 1] - pts[k]) for k in range(n - 1)])
    idx = np.rint((fine - P[0, 0, 0]) / h0).astype(int)[:, ::-1]
    ok = np.all((idx >= 0) & (idx < np.array(P.shape[:3])), axis=1)
    seed_mask = np.ones(P.shape[:3], bool)
    seed_mask[tuple(idx[ok].T)] = False
    sd = ndimage.distance_transform_edt(seed_mask) * h0 - r
    h = float(anatomy.spacing[0])
    ring = _soft_occ(np.abs(sd + 1.2) - 1.2, h)
    core = _soft_occ(sd, h)
    sub = anatomy.hu[box]
    sub[:] = np.maximum(sub, np.where(core > 0, 120.0 * core + 600.0 * ring, sub))


def _pelvis(anatomy: Anatomy, c, frame, dims, rng, scale: float) -> None:
    """Iliac wings (thin curved plates) and femoral heads around the sacrum."""
    lat, ant, sup = frame
    W = dims[0]
    h = float(anatomy.spacing[0])
    box, P = _local_grid(anatomy, c - 40.0 * np.array([0, 0, 1.0]), np.array([170.0, 120.0, 140.0]) * scale)
    if box is None:
        return
    rel = P - c
    x, y, z = rel[..., 0], rel[..., 1], rel[..., 2]
    bone = np.zeros(P.shape[:3], np.float32)
    for side in (-1.0, 1.0):
        # Wing: a shell of an ellipsoid opening anteriorly, spanning from the SI joint outward and up.
        cx = side * (0.5 * W + 45.0 * scale)
        e = np.sqrt(((x - cx) / (70.0 * scale)) ** 2 + ((y + 15.0) / (45.0 * scale)) ** 2 + ((z - 10.0) / (75.0 * scale)) ** 2)
        shell = np.abs(e - 1.0) * 45.0 * scale - 3.0
        keep = (side * (x - cx) > -55.0 * scale) & (z > -60.0 * scale) & (y > -40.0 * scale)
        bone = np.maximum(bone, np.where(keep, _soft_occ(shell, h), 0.0))
        # Femoral head and neck.
        fh = np.array([side * (0.5 * W + 75.0 * scale), -45.0 * scale, -110.0 * scale])
        d = np.sqrt((x - fh[0]) ** 2 + (y - fh[1]) ** 2 + (z - fh[2]) ** 2) - 24.0 * scale
        bone = np.maximum(bone, _soft_occ(d, h))
        # Pubic rami / acetabular rim: a bar toward the midline in front.
        d2 = np.sqrt(((y + 75.0 * scale)) ** 2 + (z + 100.0 * scale) ** 2) - 9.0 * scale
        bone = np.maximum(bone, np.where(np.abs(x) < np.abs(fh[0]), _soft_occ(d2, h), 0.0))
    sub = anatomy.hu[box]
    sub[:] = np.maximum(sub, np.where(bone > 0, sub * (1 - bone) + 450.0 * bone, sub))
