"""Structureless images: the "nothing here" examples the vertebra trainer shows its network."""

from __future__ import annotations

import numpy as np
import pytest

from inference.radiograph import preprocess
from inference.radiograph.network import BODY, CENTRE, VERTEBRA
from inference.synth.negatives import KINDS, structureless, structureless_set
from inference.train import targets
from inference.train.vertebrae import NEGATIVE_MIN_SIDE, prepare_structureless


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
    target, weight = targets.real_targets(item.image.shape, item.boxes)
    assert item.boxes.shape == (0, 4) and len(item.anchors) == 0
    # Mirrored out past a training crop: no crop sees the black outside of a small image.
    assert min(item.image.shape) >= NEGATIVE_MIN_SIDE
    assert not target.any()
    # Every vertebra channel is supervised everywhere: "no body, no centre" is taught, not left unknown.
    for channel in (BODY, VERTEBRA, CENTRE):
        assert weight[channel].min() == 1.0
