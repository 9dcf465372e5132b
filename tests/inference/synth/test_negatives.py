"""Structureless images: the "nothing here" examples the vertebra trainer shows its network."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from inference.radiograph import preprocess
from inference.radiograph.network import BODY, CENTRE, SACRUM, VERTEBRA
from inference.synth.negatives import KINDS, structureless, structureless_set
from inference.train.vertebrae import NEGATIVE_MIN_SIDE, prepare_structureless, render_item, split_batch


def test_the_set_is_the_same_for_a_seed_and_cycles_through_every_kind() -> None:
    first, again, other = structureless_set(8, 3), structureless_set(8, 3), structureless_set(8, 4)
    assert [s.kind for s in first] == list(KINDS) * 2
    assert all(np.array_equal(a.pixels, b.pixels) and a.spacing_mm == b.spacing_mm for a, b in zip(first, again, strict=True))
    assert not any(a.pixels.shape == b.pixels.shape and np.array_equal(a.pixels, b.pixels) for a, b in zip(first, other, strict=True))
    assert len({s.key for s in first}) == 8


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_a_radiograph_sized_image_with_contrast_but_no_shape(kind: str) -> None:
    image = structureless(np.random.default_rng(11), kind)
    rows, cols = image.pixels.shape
    assert 300 <= rows < 1400 and 0.5 * rows <= cols <= 1.1 * rows
    assert image.pixels.dtype == np.float32 and 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    # It reaches the network: the node's gate for blank images would stop it otherwise.
    assert preprocess.has_contrast(image.pixels)
    assert image.spacing_mm is None or 150 <= image.spacing_mm[0] * max(rows, cols) <= 450


def test_an_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown structureless kind 'ribs'"):
        structureless(np.random.default_rng(0), "ribs")


def test_the_trainer_gives_a_structureless_image_no_vertebra_to_find() -> None:
    item = prepare_structureless(structureless_set(1, 5)[0])
    _, target, weight = render_item(item, sacrum_hint=True)
    assert item.boxes.shape == (0, 4) and len(item.anchors) == 0
    # Mirrored out past a training crop: a crop holds far more image than the black outside of a small image.
    assert min(item.image.shape) >= NEGATIVE_MIN_SIDE
    assert not target.any()
    # Every channel is supervised everywhere: "no body, no centre, no sacrum" is taught, not left unknown.
    assert weight.min() == 1.0
    # A real film without boxes says nothing about its sacrum: that channel stays unknown there.
    _, _, real_weight = render_item(replace(item, structureless=False), sacrum_hint=True)
    assert real_weight[SACRUM].max() == 0.0 and all(real_weight[ch].min() == 1.0 for ch in (BODY, VERTEBRA, CENTRE))
    # `--structureless-channels centre,sacrum`: the outlines are left to the films that have them.
    _, _, some = render_item(item, sacrum_hint=True, structureless_channels=[CENTRE, SACRUM])
    assert some[CENTRE].min() == some[SACRUM].min() == 1.0 and some[BODY].max() == some[VERTEBRA].max() == 0.0


def test_the_evaluation_counts_the_vertebrae_found_per_kind() -> None:
    """`evaluate_structureless` on a stand-in model that finds one vertebra on every noise image, none elsewhere."""
    from types import SimpleNamespace

    from inference.evaluate.vertebrae import evaluate_structureless

    kinds = [s.kind for s in structureless_set(8, 7919)]  # the order the evaluation draws them in

    class NoiseSeer:
        def analyse(self, rad):  # noqa: ANN001, ANN202
            return SimpleNamespace(vertebrae=[rad] if kinds.pop(0) == "noise" else [])

    seer = NoiseSeer()
    result = evaluate_structureless(seer, count=8)  # type: ignore[arg-type]
    assert result["seed"] == 7919 and result["images"] == 8 and result["images_with_vertebrae"] == 2
    assert result["by_kind"]["noise"] == {"images": 2, "images_with_vertebrae": 2, "vertebrae_mean": 1.0, "vertebrae_max": 1}
    assert result["by_kind"]["stripes"]["images_with_vertebrae"] == 0 and result["vertebrae_mean"] == 0.25


@pytest.mark.parametrize("seed", [7919, 7919 - 5003])
def test_a_training_run_refuses_a_seed_that_draws_the_evaluation_set(tmp_path, capsys, seed: int) -> None:  # noqa: ANN001
    from inference.train import vertebrae

    with pytest.raises(SystemExit):
        vertebrae.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                        "--negative-fraction", "0.25", "--seed", str(seed), "--switches-from", "none"])
    assert "would train or validate on the structureless evaluation set" in capsys.readouterr().err


def test_structureless_places_come_from_the_share_named_first_then_the_other() -> None:
    """A batch of 4 real + 4 synthetic with 2 structureless images: by default the real share gives them up;
    `--negatives-from synthetic` keeps the real films; a share too small passes the rest to the other."""
    assert split_batch(4, 4, 2) == (2, 4)
    assert split_batch(4, 4, 2, "synthetic") == (4, 2)
    assert split_batch(1, 4, 3) == (0, 2)
    assert split_batch(4, 1, 3, "synthetic") == (2, 0)
    assert split_batch(4, 4, 0, "synthetic") == (4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        split_batch(1, 1, 3)
