"""Weak training targets from the boxes of real radiographs: what is supervised and what is left unknown."""

from __future__ import annotations

import numpy as np

from inference.radiograph.network import BODY, CENTRE, L5, SACRUM
from inference.train import targets


def _boxes(count: int = 5, step: float = 30.0, top: float = 40.0) -> np.ndarray:
    rows = top + step * np.arange(count)
    return np.stack([np.full(count, 40.0), rows - 11, np.full(count, 80.0), rows + 11], axis=1)


def test_below_the_l5_box_is_sacrum_and_no_vertebra() -> None:
    boxes = _boxes()
    target, weight = targets.real_targets((260, 120), boxes, sacrum_hint=True)
    l5_row = (boxes[-1, 1] + boxes[-1, 3]) / 2
    s1 = (int(l5_row + 1.15 * 30), 60)
    assert target[SACRUM][s1] == 1.0 and weight[SACRUM][s1] == 1.0
    # No vertebra centre or body is to be found in the sacrum: supervised as background, not unknown.
    assert target[CENTRE][s1] < 0.05 and weight[CENTRE][s1] == 1.0
    assert target[BODY][s1] == 0.0 and weight[BODY][s1] == 1.0
    # Above the top box the cervical spine is unlabelled: unknown.
    above = (int(boxes[0, 1] - 15), 60)
    assert weight[CENTRE][above] == 0.0 and weight[BODY][above] == 0.0


def test_without_the_hint_below_the_bottom_box_is_unknown() -> None:
    boxes = _boxes()
    target, weight = targets.real_targets((260, 120), boxes, sacrum_hint=False)
    below = (int((boxes[-1, 1] + boxes[-1, 3]) / 2 + 1.15 * 30), 60)
    assert weight[CENTRE][below] == 0.0 and weight[BODY][below] == 0.0
    assert not target[SACRUM].any() and weight[SACRUM][below] == 0.0


def test_l5_heatmap_peaks_on_the_bottom_box_only() -> None:
    boxes = _boxes()
    target, weight = targets.real_targets((260, 120), boxes, sacrum_hint=True)
    peak = np.unravel_index(int(np.argmax(target[L5])), target[L5].shape)
    assert boxes[-1, 1] <= peak[0] <= boxes[-1, 3] and boxes[-1, 0] <= peak[1] <= boxes[-1, 2]
    l4 = (int((boxes[-2, 1] + boxes[-2, 3]) / 2), 60)
    assert target[L5][l4] < 0.01 and weight[L5][l4] == 1.0  # L4 is taught as "not L5"
    # Without the hint the bottom box may not be L5: the channel is not supervised at all.
    _, weight = targets.real_targets((260, 120), boxes, sacrum_hint=False)
    assert not weight[L5].any()


def _labels(levels: dict[int, tuple[int, int]], shape: tuple[int, int] = (200, 100)) -> np.ndarray:
    body = np.zeros(shape, np.int8)
    for code, (row, rows) in levels.items():
        body[row : row + rows, 35:65] = code
    return body


def test_synthetic_l5_heatmap_follows_the_level_name() -> None:
    body = _labels({targets.L5_CODE - 1: (40, 20), targets.L5_CODE: (70, 20), targets.S1_CODE: (100, 40)})
    marked, ignored = targets.body_centres(body)
    target, weight = targets.synth_targets(body, body, marked, ignored)
    peak = np.unravel_index(int(np.argmax(target[L5])), target[L5].shape)
    assert 70 <= peak[0] < 90 and 35 <= peak[1] < 65 and target[L5][peak] > 0.9
    assert target[L5][50, 50] < 0.01 and weight[L5][50, 50] == 1.0  # L4 is not L5
    # L5 cut by the image edge: unknown around it rather than "not L5".
    cut = _labels({targets.L5_CODE - 1: (40, 20), targets.L5_CODE: (185, 15)})
    marked, ignored = targets.body_centres(cut)
    target, weight = targets.synth_targets(cut, cut, marked, ignored)
    assert not target[L5].any() and weight[L5][192, 50] == 0.0 and weight[L5][50, 50] == 1.0
    # No L5 in the field: background everywhere it is known.
    upper = _labels({targets.L5_CODE - 3: (40, 20), targets.L5_CODE - 2: (70, 20)})
    marked, ignored = targets.body_centres(upper)
    target, weight = targets.synth_targets(upper, upper, marked, ignored)
    assert not target[L5].any() and weight[L5].all()
