"""Training targets of the hardware network, on small phantom radiographs with implants from the data engine."""

from __future__ import annotations

import functools

import numpy as np

from inference.radiograph.hardware_post import CHANNELS, LOOSENING, METAL, PLATE, ROD, SCREW, SCREW_CENTRE
from inference.radiograph.hardware_targets import dense_targets, make_item, rod_gap
from inference.results import Complication, ImplantKind
from inference.synth.render import SynthConfig, render_sample


@functools.lru_cache(maxsize=4)
def _sample(seed: int, view: str, implants: tuple[str, ...]):  # noqa: ANN202
    config = SynthConfig(
        data_dir=None, sources=(("phantom", 1.0),), fields=(("lumbar", 1.0),), phantom_variants=2, phantom_span=("T10", "S1"),
        phantom_spacing=3.0, render_px=256, out_px=(300, 300), p_implants=1.0, shift=0.0, p_flip=0.0,
        force=(("view", view), ("implants", implants)),
    )
    return render_sample(seed, config)


def test_posterior_construct_targets() -> None:
    sample = _sample(5, "AP", ("posterior", "loosening"))
    item = make_item(sample)
    target, weight = dense_targets(item)
    assert target.shape == (len(CHANNELS), *item.image.shape) and weight.shape == target.shape
    screws = [s for s in sample.implant_specs if s.kind is ImplantKind.PEDICLE_SCREW]
    assert screws and target[SCREW].sum() > 0 and target[ROD].sum() > 0
    # Metal is the union of the classes; nothing is plate here.
    assert np.all(target[METAL] >= target[SCREW]) and np.all(target[METAL] >= target[ROD]) and target[PLATE].sum() == 0
    # One centre peak per screw that shows.
    shown = sum(1 for k, s in enumerate(sample.implant_specs) if s.kind is ImplantKind.PEDICLE_SCREW and (sample.implants == k + 1).sum() >= 3)
    assert len(item.centres) == shown
    assert np.isclose(target[SCREW_CENTRE].max(), 1.0, atol=0.05)
    # The loosened screws (forced) are marked, and only near screws.
    assert any(Complication.SCREW_LOOSENING in s.complications for s in screws)
    assert target[LOOSENING].sum() > 0
    assert target[LOOSENING][target[METAL] == 0].sum() < target[LOOSENING].sum()
    assert "screw loosening" in item.complications and item.n_implants == len(sample.implant_specs)


def testrod_gap_is_found_between_two_pieces() -> None:
    rod = np.zeros((60, 20), dtype=bool)
    rod[5:28, 8:12] = True
    rod[31:55, 9:13] = True
    gap = rod_gap(rod, rod)
    assert gap is not None and 27 <= gap[0] <= 32 and 8 <= gap[1] <= 13
    whole = np.zeros((60, 20), dtype=bool)
    whole[5:55, 8:12] = True
    assert rod_gap(whole, whole) is None


def test_image_without_implants_has_empty_targets() -> None:
    sample = _sample(6, "LAT", ("posterior",))
    sample.implants[:] = 0
    sample.implant_specs.clear()
    target, weight = dense_targets(make_item(sample))
    assert target.sum() == 0 and weight.min() == 1.0
