"""DRR core, label projection, determinism, deformities and the cache builder, on phantoms."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from inference.results import LEVELS, FractureShape, GenantGrade
from inference.synth.build import iter_cache
from inference.synth.build import main as build_main
from inference.synth.drr import VIEW_AXES, Projection, attenuation, beam_grid, label_maps, project, resample
from inference.synth.phantom import make_phantom
from inference.synth.render import render_sample
from inference.synth.sample import SynthSample, level_code
from inference.synth.warp import plan_deformation


def test_same_seed_same_sample(small_config):
    a = render_sample(7, small_config)
    b = render_sample(7, small_config)
    c = render_sample(8, small_config)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.body, b.body) and np.array_equal(a.vertebra, b.vertebra)
    assert a.meta == b.meta
    assert [v.centroid for v in a.vertebrae] == [v.centroid for v in b.vertebrae]
    assert not np.array_equal(a.image, c.image) or a.image.shape != c.image.shape


def test_sample_contract_and_round_trip(small_config):
    s = render_sample(3, replace(small_config, force=(("view", "LAT"),)))
    assert s.image.dtype == np.float32 and 0.0 <= s.image.min() and s.image.max() <= 1.0
    assert s.body.shape == s.vertebra.shape == s.implants.shape == s.image.shape
    assert s.body.dtype == np.int16 and s.view == "LAT"
    assert s.pixel_spacing_mm[0] > 0.3
    codes = set(np.unique(s.body)) - {0}
    assert codes and all(1 <= c <= len(LEVELS) for c in codes)
    # Body pixels are part of the whole-vertebra map (the vertebra includes its body).
    assert np.mean(s.vertebra[s.body > 0] > 0) > 0.97
    lat = [v for v in s.vertebrae if v.corners and v.visible_fraction > 0.9]
    assert lat, "lateral views carry body corners"
    for v in lat:
        assert v.heights_mm is not None and all(8.0 < h < 40.0 for h in v.heights_mm)
        # Anterior corners lie on the same side of the centroid (the patient faces one way).
        xs = [v.corners["anterior_superior"][0], v.corners["anterior_inferior"][0]]
        ps = [v.corners["posterior_superior"][0], v.corners["posterior_inferior"][0]]
        assert np.sign(np.mean(xs) - v.centroid[0]) == -np.sign(np.mean(ps) - v.centroid[0])
    back = SynthSample.from_arrays(s.to_arrays(prefix="x_"), prefix="x_")
    assert np.array_equal(back.body, s.body) and back.vertebrae == s.vertebrae and back.meta == json.loads(json.dumps(s.meta))
    assert np.abs(back.image - s.image).max() < 1e-4


def test_labels_align_with_projected_bone():
    """Projected body labels sit on the bright vertebral bodies, and each centroid keypoint on its own body."""
    anatomy = make_phantom(11, "T10", "S1", 3.0)
    centre = anatomy.vertebrae["L3"].centroid
    proj = Projection("AP", 1100.0, 1000.0, 200, 160, 1.4, tuple(centre), tuple(map(tuple, VIEW_AXES["AP"])))
    grid = beam_grid(proj, anatomy, 2.0)
    hu, lab = resample(anatomy, proj, grid)
    line = project(attenuation(hu, 75.0), proj, grid).numpy()
    body, vert, _ = label_maps(lab, proj, grid)
    assert body.max() > 0
    # Bone adds attenuation: body pixels against their lateral neighbourhood (soft tissue only).
    inside = line[body > 0].mean()
    cols = np.flatnonzero((body > 0).any(axis=0))
    beside = line[:, np.r_[max(0, cols[0] - 30) : max(0, cols[0] - 10), cols[-1] + 10 : min(160, cols[-1] + 30)]]
    assert inside > beside.mean() + 0.3
    for level in ("L1", "L2", "L3", "L4"):
        x, y = proj.to_pixels(anatomy.vertebrae[level].centroid[None])[0]
        assert body[int(y), int(x)] == level_code(level)


@pytest.mark.parametrize(
    ("shape", "loss", "grade"),
    [
        (FractureShape.WEDGE, 0.15, GenantGrade.NORMAL),
        (FractureShape.WEDGE, 0.32, GenantGrade.MODERATE),
        (FractureShape.CRUSH, 0.5, GenantGrade.SEVERE),
        (FractureShape.BICONCAVE, 0.5, GenantGrade.SEVERE),
    ],
)
def test_deformity_height_loss_matches_request(shape, loss, grade):
    from inference.synth.warp import grade_of

    anatomy = make_phantom(11, "T10", "S1", 3.0)
    d = plan_deformation(anatomy, np.random.default_rng(0), anchor="L3", p_curvature=0.0, forced_fracture=("L2", shape, loss))
    h0 = np.array(anatomy.vertebrae["L2"].heights)
    h1, _ = d.measure("L2")
    lost = 100.0 * (1.0 - np.array(h1) / h0)
    worst = {FractureShape.WEDGE: 0, FractureShape.BICONCAVE: 1, FractureShape.CRUSH: 2}[shape]
    assert abs(lost[worst] - 100 * loss) < 8.0, lost
    assert int(np.argmax(lost)) == worst or shape is FractureShape.CRUSH
    assert grade_of(d.fractures["L2"], tuple(h0), tuple(h1))[0] is grade
    # Neighbours keep their shape (rigid), within the measurement's partial-volume noise.
    for lv in ("L1", "L3"):
        ratio = np.array(d.measure(lv)[0]) / np.array(anatomy.vertebrae[lv].heights)
        assert np.all(np.abs(ratio - 1.0) < 0.1), (lv, ratio)


def test_forced_fracture_recorded_in_sample(small_config):
    cfg = replace(small_config, force=(("view", "LAT"), ("fracture", ("L2", FractureShape.WEDGE, 0.45))), shift=0.0)
    s = render_sample(5, cfg)
    l2 = next(v for v in s.vertebrae if v.level == "L2")
    assert l2.shape is FractureShape.WEDGE and l2.grade is GenantGrade.SEVERE
    assert 37.0 < l2.height_loss_pct < 53.0
    assert l2.heights_mm[0] < 0.75 * l2.heights_mm[2]


def test_build_cli_writes_shards_and_manifest(tmp_path):
    out = tmp_path / "cache"
    args = ["--data", str(tmp_path / "no-data"), "--out", str(out), "--count", "3", "--seed", "4", "--shard-size", "2",
            "--max-side", "200", "--out-px", "256,300", "--render-px", "200", "--implants-prob", "0"]
    assert build_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 3 and len(manifest["shards"]) == 2
    assert manifest["counts"]["source"] == {"phantom": 3}
    samples = list(iter_cache(out))
    assert len(samples) == 3 and all(max(s.image.shape) <= 200 for s in samples)
    assert [s.meta["seed"] for s in samples] == [4 * 10_000_000 + i for i in range(3)]


@pytest.mark.parametrize(
    ("view", "force", "kinds", "complication"),
    [
        ("AP", ("posterior", "cage"), {"pedicle screw", "rod", "interbody cage"}, None),
        ("LAT", ("posterior", "loosening", "rod_fracture"), {"pedicle screw", "rod"}, "rod fracture"),
        ("LAT", ("plate",), {"plate"}, None),
    ],
)
def test_implants_present_in_labels_where_inserted(small_config, view, force, kinds, complication):
    cfg = replace(small_config, p_implants=1.0, shift=0.0, force=(("view", view), ("implants", force)))
    s = render_sample(21, cfg)
    assert s.implant_specs, "forced implants are in the field"
    assert {sp.kind.value for sp in s.implant_specs} <= kinds
    assert {sp.kind.value for sp in s.implant_specs} & kinds
    for idx, spec in enumerate(s.implant_specs, start=1):
        pixels = s.implants == idx
        assert pixels.any(), spec
        # Metal is bright where it is labelled.
        assert s.image[pixels].mean() > np.median(s.image) + 0.05, spec
        if spec.kind.value == "pedicle screw":
            assert spec.side.value in ("left", "right") and len(spec.levels) == 1
        if spec.kind.value == "rod":
            assert len(spec.levels) >= 2
    if complication:
        assert any(complication in [c.value for c in sp.complications] for sp in s.implant_specs)
    assert set(np.unique(s.implants)) == set(range(len(s.implant_specs) + 1))


@pytest.mark.parametrize("p", [0.0, 1e-9])
def test_no_implants_means_empty_map(small_config, p):
    s = render_sample(2, replace(small_config, p_implants=p))
    assert not s.implant_specs and not s.implants.any()
