"""Weak training targets from the boxes of real radiographs: what is supervised and what is left unknown."""

from __future__ import annotations

import numpy as np

from inference.radiograph.network import BODY, CENTRE, SACRUM
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
