"""Implant label maps from `project_primitives`: footprints, metal winning where implants overlap, hooks."""

from __future__ import annotations

import numpy as np

from inference.results import Complication, ImplantKind
from inference.synth.drr import Projection
from inference.synth.implants import (
    Frame,
    Primitive,
    material_mu,
    plan_implants,
    project_primitives,
    tissue_mu,
)

KVP = 110.0


def _projection() -> Projection:
    """AP-like geometry: 1 mm pixels at the isocentre, beam along world z."""
    return Projection(view="AP", sid=1100.0, sod=1000.0, rows=80, cols=80, pixel_mm=1.0, iso=(0.0, 0.0, 0.0),
                      axes=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def _box(instance: int, mu: float, centre, half) -> Primitive:
    return Primitive("box", instance, mu, np.asarray(centre, float), axes=np.eye(3), half=np.asarray(half, float))


def _pin(instance: int, mu: float, x: float, y: float) -> Primitive:
    """A 1 mm marker pin along the beam."""
    return Primitive("cyl", instance, mu, np.array([x, y, -4.0]), np.array([0.0, 0.0, 1.0]), 8.0, 0.5)


def test_radiolucent_cage_is_labelled_as_its_whole_footprint():
    """A PEEK cage barely differs from the disc it replaces: its label is still the whole box, not only its
    tantalum marker pins (before: a few pins on one image, a box on the next, depending on kVp and view)."""
    mu_disc = tissue_mu(80.0, KVP)
    peek = material_mu("peek", KVP) - mu_disc
    assert abs(peek) * 8.0 < 0.05, "the premise: by contrast alone the box would not be labelled"
    prims = [_box(1, peek, (0, 0, 0), (12.0, 5.0, 4.0)), _pin(1, material_mu("tantalum", KVP) - mu_disc, -8.0, 0.0)]
    _, inst = project_primitives(prims, _projection(), 1)
    labelled = int((inst == 1).sum())
    footprint_px = 24 * 10  # 1 mm pixels at the isocentre, where the box sits
    assert 0.85 * footprint_px <= labelled <= 1.2 * footprint_px


def test_metal_keeps_its_pixels_over_a_radiolucent_implant():
    """Where a titanium rod crosses a PEEK cage, the rod (the one that shows) owns the pixels."""
    mu_disc = tissue_mu(80.0, KVP)
    cage = _box(1, material_mu("peek", KVP) - mu_disc, (0, 0, 0), (12.0, 5.0, 4.0))
    rod = _box(2, material_mu("titanium", KVP) - tissue_mu(0.0, KVP), (0, 0, -20.0), (2.5, 30.0, 2.5))
    _, inst = project_primitives([cage, rod], _projection(), 2)
    centre = inst[38:42, 38:42]
    assert (centre == 2).all()
    assert (inst == 1).sum() > 100 and (inst == 2).sum() > 300


def test_halo_is_never_labelled():
    """A loosening halo (label=False) changes the image but belongs to no implant."""
    halo = Primitive("cyl", 1, -0.02, np.array([0.0, 0.0, -10.0]), np.array([0.0, 0.0, 1.0]), 20.0, 4.0, label=False)
    total, inst = project_primitives([halo], _projection(), 1)
    assert total.min() < 0 and not inst.any()


def _lumbar_frames(n: int = 4) -> list[Frame]:
    """`n` lumbar vertebrae 32 mm apart, cranial first; beam along world z (anterior), superior = -y."""
    axes = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    return [Frame(f"L{i + 1}", np.array([0.0, -48.0 + 32.0 * i, 0.0]), axes, 45.0, 33.0, 26.0, -16.0, f"L{i + 1}") for i in range(n)]


def test_hooks_end_a_posterior_construct_as_part_of_its_rods():
    """Forced hooks on constructs of three or more levels: the cranial level holds no screw, each rod owns its
    hook, and on an AP film the hook is a block wider than the rod it seats (what the rod-fracture classifier
    must learn is not a gap).  Two-level constructs keep their screws."""
    frames = _lumbar_frames(6)
    proj = Projection(view="AP", sid=1100.0, sod=1000.0, rows=260, cols=120, pixel_mm=1.0, iso=(0.0, 0.0, 32.0),
                      axes=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    ratios = []
    for seed in range(8):
        plan = plan_implants(frames, np.random.default_rng(seed), KVP, force=("posterior", "hooks"))
        screws = [s for s in plan.specs if s.kind is ImplantKind.PEDICLE_SCREW]
        rods = [s for s in plan.specs if s.kind is ImplantKind.ROD]
        assert len(rods) == 2
        top = rods[0].levels[0]
        if len(rods[0].levels) < 3:
            assert not any(r.details.get("hooks") for r in rods) and any(s.levels == (top,) for s in screws)
            continue
        assert all(r.details.get("hooks") == 1 for r in rods)
        assert screws and all(s.levels != (top,) for s in screws)
        _, inst = project_primitives(plan.primitives, proj, len(plan.specs))
        for rod in rods:
            widths = (inst == plan.specs.index(rod) + 1).sum(axis=1)
            rows = np.nonzero(widths)[0]
            below = rows[rows > rows[0] + 25]  # the rod's course below its cranial end
            ratios.append(widths[rows[0] : rows[0] + 15].max() / np.median(widths[below]))
    assert len(ratios) >= 6
    assert min(ratios) >= 1.2 and np.median(ratios) >= 1.5, ratios


def test_no_hooks_unless_asked():
    """The default draws no hooks (and no extra random number: caches rendered before hooks stay the same)."""
    frames = _lumbar_frames()
    a = plan_implants(frames, np.random.default_rng(9), KVP, force=("posterior",))
    b = plan_implants(frames, np.random.default_rng(9), KVP, force=("posterior",), hook_prob=0.0)
    assert [s.details for s in a.specs] == [s.details for s in b.specs]
    assert not any(s.details.get("hooks") for s in a.specs)


def test_rod_fracture_probability_sets_how_often_rods_break():
    """Complication caches raise the share of fractured rods; the default keeps the old 10 %."""
    frames = _lumbar_frames()

    def broken(prob: float) -> list[bool]:
        out = []
        for seed in range(6):
            plan = plan_implants(frames, np.random.default_rng(seed), KVP, force=("posterior",), rod_fracture_prob=prob)
            out += [Complication.ROD_FRACTURE in s.complications for s in plan.specs if s.kind is ImplantKind.ROD]
        return out

    assert all(broken(1.0)) and not any(broken(0.0))
    plan = plan_implants(frames, np.random.default_rng(2), KVP, force=("posterior",))
    assert plan_implants(frames, np.random.default_rng(2), KVP, force=("posterior",), rod_fracture_prob=0.1).specs == plan.specs
