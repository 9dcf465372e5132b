"""`render_sample(seed, config)`: one synthetic radiograph with its label maps and truth, deterministic by seed.

Steps: pick an anatomy (CT or phantom), field (lumbar / thoracolumbar / thoracic / whole spine) and view
(AP / lateral); draw a deformation (curvature, compression deformities) and implants; draw the cone-beam
geometry (SID, object-detector distance, patient rotation and tilt, detector roll); resample the deformed
volume onto the beam grid once; project attenuation (DRR) and labels; form the image (exposure, scatter,
noise, vendor processing, artefacts); resize to the output matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inference.results import LEVELS, FractureShape, GenantGrade
from inference.synth import augment
from inference.synth.anatomy import Anatomy
from inference.synth.drr import VIEW_AXES, Projection, attenuation, beam_grid, label_maps, project, resample
from inference.synth.sample import CORNER_NAMES, SynthSample, VertebraSpec
from inference.synth.warp import Deformation, grade_of, identity_deformation, plan_deformation, rotation

FIELDS = {
    # name: (levels the field is centred on, height range mm at isocentre, aspect (cols/rows) range)
    "lumbar": (("L2", "L3", "L4"), (240.0, 400.0), (0.65, 1.0)),
    "thoracolumbar": (("T11", "T12", "L1"), (320.0, 440.0), (0.6, 0.95)),
    "thoracic": (("T6", "T7", "T8"), (320.0, 440.0), (0.7, 1.0)),
    "whole": (("T9", "T10", "T11"), (560.0, 900.0), (0.33, 0.6)),
}
SOURCE_FIELDS = {
    "ts-abdomen": ("lumbar",),
    "dd-chest": ("thoracolumbar", "thoracic"),
    "stitched": ("lumbar", "thoracolumbar", "thoracic", "whole"),
    "phantom": ("lumbar", "thoracolumbar", "thoracic", "whole"),
}


@dataclass(frozen=True)
class SynthConfig:
    """What `render_sample` draws from.  Weights need not sum to 1."""

    #: Shared data folder with ct/ (None: phantoms only, as in tests).
    data_dir: str | None = None
    sources: tuple[tuple[str, float], ...] = (("ts-abdomen", 1.0), ("dd-chest", 0.8), ("stitched", 1.4), ("phantom", 0.8))
    views: tuple[tuple[str, float], ...] = (("AP", 0.5), ("LAT", 0.5))
    fields: tuple[tuple[str, float], ...] = (("lumbar", 1.0), ("thoracolumbar", 0.8), ("thoracic", 0.4), ("whole", 0.8))
    #: Longest side of the DRR before resizing to the output matrix.
    render_px: int = 512
    #: Range of the output's longest side (pixels); the image is resized to it before noise/processing.
    out_px: tuple[int, int] = (400, 1024)
    #: If set, the finished sample is downscaled so its longest side is at most this (training caches).
    max_px: int | None = None
    p_curvature: float = 0.6
    p_fracture: float = 0.35
    p_implants: float = 0.0
    #: Of posterior constructs of >= 3 levels, the share ending cranially in hooks (`implants.plan_implants`).
    p_hooks: float = 0.0
    #: Probability that a rod of a posterior construct is fractured (complication training caches raise it).
    p_rod_fracture: float = 0.1
    p_flip: float = 0.5
    #: Partial coverage: fraction of the field height the centre may move up or down.
    shift: float = 0.22
    looks: tuple[tuple[str, float], ...] = (("clahe", 0.5), ("grid_lines", 0.25), ("lead_marker", 0.6), ("text", 0.4), ("jpeg", 0.3))
    #: Phantoms: how many different ones a process cycles through (each is cached), their span and grid.
    phantom_variants: int = 12
    phantom_span: tuple[str, str] = ("C3", "S1")
    phantom_spacing: float = 2.5
    #: Force settings (tests, demos): view, field, source, fracture=(level, shape, loss), implants (list of names).
    force: tuple[tuple[str, Any], ...] = ()

    def forced(self, key: str, default: Any = None) -> Any:
        return dict(self.force).get(key, default)


def _choice(rng: np.random.Generator, weighted: tuple[tuple[str, float], ...] | list[tuple[str, float]]) -> str:
    names = [n for n, _ in weighted]
    w = np.array([float(v) for _, v in weighted])
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def get_anatomy(source: str, config: SynthConfig, rng: np.random.Generator) -> Anatomy:
    """The anatomy for `source`: a CT of the data folder (cached) or a fresh phantom."""
    if source == "phantom":
        from inference.synth.phantom import make_phantom

        top, bottom = config.phantom_span
        return make_phantom(int(rng.integers(0, config.phantom_variants)), top, bottom, config.phantom_spacing)
    if config.data_dir is None:
        raise ValueError(f"source {source!r} needs SynthConfig.data_dir (the shared data folder)")
    from inference.synth.anatomy import load_ct_anatomies

    return load_ct_anatomies(str(config.data_dir))[source]


def render_sample(seed: int, config: SynthConfig = SynthConfig()) -> SynthSample:
    """Render one sample; the same (seed, config) always gives the same sample."""
    torch.set_num_threads(1)
    rng = np.random.default_rng([int(seed), 0x5EED])
    sources = [(s, w) for s, w in config.sources if s == "phantom" or config.data_dir is not None]
    source = config.forced("source") or _choice(rng, sources)
    anatomy = get_anatomy(source, config, rng)
    view = config.forced("view") or _choice(rng, config.views)
    allowed = [(f, w) for f, w in config.fields if f in SOURCE_FIELDS[source]] or [(SOURCE_FIELDS[source][0], 1.0)]
    field_name = config.forced("field") or _choice(rng, allowed)
    centre_levels, height_range, aspect_range = FIELDS[field_name]
    present = anatomy.levels()
    centre_level = str(rng.choice([lv for lv in centre_levels if lv in present] or present[len(present) // 2 : len(present) // 2 + 1]))

    forced_fracture = config.forced("fracture")
    if forced_fracture is not None or rng.random() < max(config.p_curvature, config.p_fracture):
        deformation = plan_deformation(
            anatomy,
            rng,
            anchor=centre_level,
            p_curvature=config.p_curvature if config.forced("curvature", True) else 0.0,
            p_fracture=config.p_fracture,
            forced_fracture=forced_fracture,
            # Deformities where the film will be: within four levels of the field's centre.
            fracture_levels=tuple(present[max(0, present.index(centre_level) - 4) : present.index(centre_level) + 5]),
        )
    else:
        deformation = identity_deformation(anatomy)

    # ---- field and geometry
    centre = deformation.centroid(centre_level)
    if field_name == "whole":
        top = deformation.centroid(present[0])
        bottom = deformation.centroid(present[-1])
        span = abs(top[2] - bottom[2]) + 80.0
        height = float(np.clip(span * rng.uniform(0.95, 1.15), *height_range))
        centre = 0.5 * (top + bottom)
    else:
        height = float(rng.uniform(*height_range))
    aspect = float(rng.uniform(*aspect_range))
    shift = np.array([rng.normal(0, 12.0), 0.0, rng.uniform(-config.shift, config.shift) * height])
    if view == "LAT":
        shift = np.array([0.0, rng.normal(0, 12.0), shift[2]])
    iso = centre + shift
    # Keep the field inside the CT's cranio-caudal coverage: real radiographs never show air above the
    # abdomen.  Fields longer than the volume are shortened.
    lo, hi = anatomy.bounds()
    z_lo, z_hi = lo[2] + 5.0, hi[2] - 5.0
    height = float(min(height, 0.98 * (z_hi - z_lo)))
    iso[2] = float(np.clip(iso[2], z_lo + height / 2, z_hi - height / 2))
    sid = float(rng.uniform(1000.0, 1200.0) if field_name != "whole" else rng.uniform(1500.0, 1850.0))
    odd = float(rng.uniform(60.0, 160.0) if view == "AP" else rng.uniform(150.0, 260.0))
    sod = sid - odd
    yaw, tilt, roll = rng.normal(0.0, 4.0), rng.normal(0.0, 3.0), rng.normal(0.0, 2.5)
    axes = VIEW_AXES[view].copy()
    R = rotation(np.array([0.0, 0.0, 1.0]), math.radians(yaw)) @ rotation(axes[0], math.radians(tilt))
    axes = axes @ R.T
    axes = np.stack([rotation(axes[2], math.radians(roll)) @ a for a in axes])
    rows = config.render_px if aspect <= 1.0 else int(round(config.render_px / aspect))
    cols = int(round(rows * aspect))
    pixel_mm = height / rows
    proj = Projection(view, sid, sod, rows, cols, pixel_mm, tuple(iso), tuple(map(tuple, axes)))

    # ---- volume -> DRR and labels
    h = float(np.clip(1.5 * pixel_mm, 1.8, 3.0))
    grid = beam_grid(proj, anatomy, h)
    while grid.nu * grid.nv * grid.nw > 6e6:
        h *= 1.12
        grid = beam_grid(proj, anatomy, h)
    hu, lab = resample(anatomy, proj, grid, None if deformation.identity else deformation.inverse)
    kvp = float(rng.uniform(70.0, 90.0))
    bone_gain = float(rng.uniform(1.0, 1.6))
    mu = attenuation(hu, kvp, bone_gain)
    plan = None
    implants = np.zeros((rows, cols), np.int16)
    metal = np.zeros((rows, cols), np.float32)
    line = project(mu, proj, grid).numpy()
    if config.p_implants > 0 or config.forced("implants"):
        from inference.synth.implants import insert_implants

        plan, implant_map, implant_line = insert_implants(anatomy, deformation, proj, grid, mu, rng, config, kvp=kvp)
        if implant_map is not None:
            implants = implant_map
            line = line + implant_line
            metal = implant_line
    body, vert, _ = label_maps(lab, proj, grid)

    # ---- output matrix and look
    out_long = int(rng.integers(config.out_px[0], config.out_px[1] + 1))
    scale = out_long / max(rows, cols)
    out_shape = (max(8, int(round(rows * scale))), max(8, int(round(cols * scale))))
    spacing = (height / out_shape[0], pixel_mm * cols / out_shape[1])
    line_o = augment.resize(line, out_shape)
    body_o = augment.resize(body, out_shape, order=0)
    vert_o = augment.resize(vert, out_shape, order=0)
    impl_o = augment.resize(implants, out_shape, order=0)
    metal_o = augment.resize(metal, out_shape) > 0.3
    look: dict[str, Any] = {}
    collimation = augment.collimation_mask(out_shape, rng, look)
    hidden = collimation < 0.5  # anatomy behind the collimator blades is not shown: not a target
    body_o, vert_o, impl_o = (np.where(hidden, 0, a) for a in (body_o, vert_o, impl_o))
    sx, sy = out_shape[1] / cols, out_shape[0] / rows
    vertebrae = _vertebra_specs(anatomy, deformation, proj, view, collimation, (sx, sy))
    flip = rng.random() < config.p_flip
    orientation = ["L", "F"] if view == "AP" else ["A", "F"]
    if flip:  # before the look, so burned-in text reads correctly
        line_o, body_o, vert_o, impl_o, collimation, metal_o = (
            a[:, ::-1].copy() for a in (line_o, body_o, vert_o, impl_o, collimation, metal_o)
        )
        orientation[0] = {"L": "R", "A": "P"}[orientation[0]]
        for v in vertebrae:
            v.centroid = (round(out_shape[1] - v.centroid[0], 2), v.centroid[1])
            if v.corners:
                v.corners = {k: (round(out_shape[1] - p[0], 2), p[1]) for k, p in v.corners.items()}
    image = augment.expose(line_o, spacing[0], rng, look, collimation=collimation, exclude=metal_o)
    image = augment.finish(image, spacing[0], rng, look, dict(config.looks))
    meta = {
        "seed": int(seed),
        "source": source,
        "provenance": anatomy.provenance,
        "field": field_name,
        "centre_level": centre_level,
        "geometry": {
            "sid_mm": round(sid, 1),
            "sod_mm": round(sod, 1),
            "magnification": round(sid / sod, 4),
            "yaw_deg": round(float(yaw), 2),
            "tilt_deg": round(float(tilt), 2),
            "roll_deg": round(float(roll), 2),
            "kvp": round(kvp, 1),
            "bone_gain": round(bone_gain, 3),
            "field_height_mm": round(height, 1),
            "render_shape": [rows, cols],
            "grid_mm": round(h, 3),
        },
        "patient_orientation": orientation,
        "flipped": bool(flip),
        "deformation": deformation.record,
        "look": look,
        "levels_in_image": sorted({LEVELS[c - 1] for c in np.unique(vert_o) if c > 0}, key=LEVELS.index),
    }
    implant_specs, impl_o = _visible_implants(plan, impl_o, proj, collimation, (sx, sy), flip)
    meta["implants"] = [dict(s.details) for s in implant_specs]
    sample = SynthSample(
        image=image,
        pixel_spacing_mm=(round(spacing[0], 5), round(spacing[1], 5)),
        view=view,
        body=body_o.astype(np.int16),
        vertebra=vert_o.astype(np.int16),
        implants=impl_o.astype(np.int16),
        implant_specs=implant_specs,
        vertebrae=vertebrae,
        meta=meta,
    )
    if config.max_px and max(out_shape) > config.max_px:
        sample = downscale(sample, config.max_px)
    return sample


def _visible_implants(plan, impl_map: np.ndarray, proj: Projection, collimation: np.ndarray, scale, flipped: bool):
    """Keep the implant instances with pixels in the (collimated) image, renumbered 1..n in plan order."""
    from dataclasses import replace as dc_replace

    if plan is None or not plan.specs:
        return [], np.zeros_like(impl_map, dtype=np.int16)
    sx, sy = scale
    rows, cols = collimation.shape
    present = set(np.unique(impl_map)) - {0}
    out = np.zeros_like(impl_map, dtype=np.int16)
    specs = []
    for idx, spec in enumerate(plan.specs, start=1):
        if idx not in present:
            continue
        px = proj.to_pixels(plan.points[idx - 1]) * [sx, sy]
        if flipped:
            px[:, 0] = cols - px[:, 0]
        inside = (px[:, 0] >= 0) & (px[:, 0] < cols) & (px[:, 1] >= 0) & (px[:, 1] < rows)
        ci = px[inside].astype(int)
        vis = np.zeros(len(px), bool)
        vis[inside] = collimation[ci[:, 1], ci[:, 0]] > 0.5
        details = dict(spec.details)
        details["visible_fraction"] = round(float(vis.mean()), 3)
        specs.append(dc_replace(spec, details=details))
        out[impl_map == idx] = len(specs)
    return specs, out


def _vertebra_specs(anatomy: Anatomy, deformation: Deformation, proj: Projection, view: str, collimation: np.ndarray, scale) -> list[VertebraSpec]:
    sx, sy = scale
    out_rows, out_cols = collimation.shape
    specs = []
    for level in anatomy.levels():
        geo = anatomy.vertebrae[level]
        assert geo.points is not None, "a loaded anatomy has each vertebra's points"
        pts = proj.to_pixels(deformation.forward_points(level, geo.points))
        px = pts * [sx, sy]
        inside = (px[:, 0] >= 0) & (px[:, 0] < out_cols) & (px[:, 1] >= 0) & (px[:, 1] < out_rows)
        vis = np.zeros(len(px), bool)
        ci = px[inside].astype(int)
        vis[inside] = collimation[ci[:, 1], ci[:, 0]] > 0.5
        visible = float(vis.mean())
        if visible <= 0.0:
            continue
        c = proj.to_pixels(deformation.centroid(level)[None])[0] * [sx, sy]
        heights = corners = None
        fracture = deformation.fractures.get(level)
        if geo.complete and geo.heights is not None:
            if deformation.identity:
                h3, pts3 = geo.heights, geo.corners
            else:
                h3, pts3 = deformation.measure(level)
            anterior, middle, posterior = (round(float(x), 2) for x in h3)
            heights = (anterior, middle, posterior)
            grade, shape, loss = grade_of(fracture, geo.heights, heights)
            if view == "LAT":
                names = [*CORNER_NAMES, "middle_superior", "middle_inferior"]
                xy = proj.to_pixels(np.stack([pts3[n] for n in names])) * [sx, sy]
                corners = {n: (round(float(p[0]), 2), round(float(p[1]), 2)) for n, p in zip(names, xy, strict=True)}
        else:
            grade, shape, loss = grade_of(fracture, None, None)
        specs.append(
            VertebraSpec(
                level=level,
                centroid=(round(float(c[0]), 2), round(float(c[1]), 2)),
                corners=corners,
                heights_mm=heights,
                grade=grade if fracture is not None else GenantGrade.NORMAL,
                shape=shape if fracture is not None else FractureShape.NONE,
                height_loss_pct=float(loss),
                visible_fraction=round(visible, 3),
            )
        )
    return specs


def downscale(sample: SynthSample, max_px: int) -> SynthSample:
    """Shrink a sample so its longest side is `max_px` (area for the image, nearest for labels)."""
    rows, cols = sample.image.shape
    f = max_px / max(rows, cols)
    if f >= 1.0:
        return sample
    shape = (max(8, int(round(rows * f))), max(8, int(round(cols * f))))
    fx, fy = shape[1] / cols, shape[0] / rows

    def pt(p):
        return (round(p[0] * fx, 2), round(p[1] * fy, 2))

    verts = [
        VertebraSpec(
            v.level, pt(v.centroid), None if v.corners is None else {k: pt(p) for k, p in v.corners.items()},
            v.heights_mm, v.grade, v.shape, v.height_loss_pct, v.visible_fraction,
        )
        for v in sample.vertebrae
    ]
    meta = dict(sample.meta)
    meta["downscaled_from"] = [rows, cols]
    if "boxes" in meta:
        meta["boxes"] = [[b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy] for b in meta["boxes"]]
    return SynthSample(
        image=augment.resize(sample.image, shape),
        pixel_spacing_mm=(sample.pixel_spacing_mm[0] * rows / shape[0], sample.pixel_spacing_mm[1] * cols / shape[1]),
        view=sample.view,
        body=augment.resize(sample.body, shape, order=0),
        vertebra=augment.resize(sample.vertebra, shape, order=0),
        implants=augment.resize(sample.implants, shape, order=0),
        implant_specs=sample.implant_specs,
        vertebrae=verts,
        meta=meta,
    )
