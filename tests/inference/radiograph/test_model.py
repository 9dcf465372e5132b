"""The vertebra model's passes: the size correction, the second pass at a larger zoom and its mix with the first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.radiograph import preprocess
from inference.radiograph.model import (
    SHIPPED_SECOND_PASS,
    TARGET_STEP_PX,
    SecondPass,
    VertebraModel,
    corrected_zoom,
    first_zoom,
    is_long_field,
)
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


def test_no_re_zoom_for_vertebrae_of_the_trained_size_or_a_short_chain() -> None:
    assert corrected_zoom([22.0, 24.0, 21.0, 23.0], long_field=True) is None
    assert corrected_zoom([60.0, 62.0], long_field=False) is None  # three vertebrae say too little about their size


def test_small_vertebrae_are_enlarged_to_the_target_step() -> None:
    assert corrected_zoom([10.0, 11.0, 10.0, 11.0, 10.0], long_field=True) == pytest.approx(TARGET_STEP_PX / 10.0)


@pytest.mark.parametrize("long_field", [True, False])
def test_uniformly_large_vertebrae_are_shrunk_to_the_target_step(long_field: bool) -> None:
    steps = [45.0, 47.0, 49.0, 51.0, 53.0]
    assert corrected_zoom(steps, long_field) == pytest.approx(TARGET_STEP_PX / 49.0)


def test_a_whole_spine_is_not_shrunk_by_its_large_lumbar_vertebrae() -> None:
    # The real postoperative film at 1248 px: median step 34.1 px, upper thoracic 24-28 px, lower lumbar 41-44 px.
    # Shrinking until the median met the target merged the thoracic vertebrae.
    steps = [23.9, 24.8, 27.9, 28.1, 28.8, 31.2, 31.6, 34.1, 34.1, 34.7, 34.8, 36.9, 36.9, 41.1, 42.8, 44.3]
    assert np.median(steps) > 34.0
    assert corrected_zoom(steps, long_field=True) is None
    # On a single-cassette field the same steps are one size of vertebra, split or not: the median decides.
    assert corrected_zoom(steps, long_field=False) == pytest.approx(TARGET_STEP_PX / np.median(steps))


def test_long_field_by_the_physical_aspect() -> None:
    assert is_long_field((416, 229), None)  # a whole-spine export
    assert not is_long_field((576, 484), None)  # a lumbar cassette, about as wide as tall
    assert not is_long_field((400, 200), (0.2, 0.4))  # square in millimetres


def test_a_square_field_without_spacing_starts_as_one_cassette() -> None:
    # Without calibration the long side maps to a 72 cm whole-spine field; one about as wide as tall is one
    # 43 cm cassette, so its first pass runs at 430 / 720 of that scale.
    assert first_zoom((576, 484), None) == pytest.approx(430.0 / (preprocess.UNCALIBRATED_LONG_SIDE * preprocess.TARGET_SPACING_MM))
    assert first_zoom((416, 229), None) == 1.0  # a long field keeps the whole-spine assumption
    assert first_zoom((576, 484), (0.2, 0.2)) == 1.0  # a calibrated one keeps its spacing
    net = SizeReader()
    _, scale, _, zoom = VertebraModel(net).detect(_image(600, 500), None)
    assert scale[0] == pytest.approx(first_zoom((600, 500), None) * preprocess.UNCALIBRATED_LONG_SIDE / 600, rel=0.01)
    assert zoom == 1.0  # the start is not a size correction


def test_a_model_asked_for_by_two_threads_at_once_is_built_once() -> None:
    import threading

    from inference.registry import ModelRegistry

    registry = ModelRegistry()
    started, release = threading.Event(), threading.Event()
    builds: list[str] = []

    def build(spec, device):  # the start-up warm-up and the first study, say
        builds.append(spec.name)
        started.set()
        release.wait(10)
        return object()

    results: list[object] = []
    first = threading.Thread(target=lambda: results.append(registry.load("spine-xr-vertebrae", build)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(registry.load("spine-xr-vertebrae", build)))
    second.start()
    second.join(0.5)  # it cannot finish before the first build does: give it time to get as far as it can
    release.set()
    first.join(10)
    second.join(10)
    assert builds == ["spine-xr-vertebrae"]
    assert len(results) == 2 and results[0] is results[1]
