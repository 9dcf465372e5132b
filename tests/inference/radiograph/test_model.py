"""The vertebra model's passes: the second pass at a larger zoom and its mix with the first (fake network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.radiograph import preprocess
from inference.radiograph.model import SHIPPED_SECOND_PASS, SecondPass, VertebraModel
from inference.radiograph.network import CHANNELS


class SizeReader(torch.nn.Module):
    """Answers every channel with a logit that depends on the padded input's height, and records the heights."""

    def __init__(self) -> None:
        super().__init__()
        self.heights: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.heights.append(int(x.shape[-2]))
        logit = 1.0 if len(self.heights) == 1 else -1.0
        return torch.full((1, len(CHANNELS), *x.shape[-2:]), logit)


def _image(rows: int = 400, cols: int = 240) -> np.ndarray:
    return np.random.default_rng(0).random((rows, cols)).astype(np.float32)


def test_one_pass_without_a_second_pass() -> None:
    net = SizeReader()
    prob, scale, _, zoom = VertebraModel(net).detect(_image(), (1.25, 1.25))
    assert len(net.heights) == 1 and zoom == 1.0 and scale == (1.0, 1.0)
    assert prob[0].mean() == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-6)


def test_second_pass_is_larger_and_mixed_with_the_first_by_its_weight() -> None:
    net = SizeReader()
    model = VertebraModel(net, second_pass=SecondPass(factor=1.3, weight=0.75))
    prob, scale, _, zoom = model.detect(_image(), (1.25, 1.25))
    assert len(net.heights) == 2 and net.heights[1] > 1.25 * net.heights[0]
    assert zoom == 1.0  # no size correction was needed: the factor is not reported as one
    assert scale == pytest.approx((520 / 400, 312 / 240))
    assert prob.shape[1:] == (520, 312)
    first, second = 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))
    assert np.allclose(prob, 0.75 * second + 0.25 * first, atol=1e-5)


def test_second_pass_skipped_where_the_network_side_cap_leaves_no_room() -> None:
    # A long film at full scale already fills the capped network grid: a second pass would repeat the first.
    net = SizeReader()
    model = VertebraModel(net, second_pass=SecondPass(factor=1.3, weight=0.75))
    rows = preprocess.MAX_NETWORK_SIDE + 200
    model.detect(_image(rows, 300), (1.25, 1.25))
    assert len(net.heights) == 1


def test_second_pass_read_from_model_json() -> None:
    assert SecondPass.from_dict(None) == SecondPass(1.0, 1.0)
    assert SecondPass.from_dict({"factor": 1.3, "weight": 0.75}) == SecondPass(1.3, 0.75)
    from inference.registry import ModelRegistry

    model = VertebraModel.from_registry(ModelRegistry())
    assert model.second_pass == SHIPPED_SECOND_PASS
