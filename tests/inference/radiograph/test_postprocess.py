"""Chain post-processing on drawn probability maps: ordering, outliers, gaps, naming, separation."""

from __future__ import annotations

import numpy as np

from inference.radiograph import postprocess
from inference.radiograph.network import BODY, CENTRE, CHANNELS, L5, SACRUM, VERTEBRA
from inference.radiograph.postprocess import ChainParams


def _blob(shape, row, col, sigma):
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    return np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma**2))


def spine_probabilities(
    count: int = 12,
    step: float = 22.0,
    top: float = 30.0,
    shape: tuple[int, int] = (360, 200),
    sacrum: bool = True,
    drop: tuple[int, ...] = (),
    distractors: bool = True,
    sacrum_drop: float = 1.0,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Probability maps of a gently curved chain of `count` bodies (steps growing downwards), a sacrum below
    the last one (its centre `sacrum_drop` steps below), and rib-like / bowel-gas-like peaks off the chain."""
    prob = np.zeros((len(CHANNELS), *shape), dtype=np.float32)
    centres = []
    row = top
    for k in range(count):
        col = shape[1] / 2 + 12 * np.sin(k / 3)
        centres.append((row, col))
        row += step * (1 + 0.02 * k)
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    for k, (r, c) in enumerate(centres):
        if k in drop:
            continue
        body = (np.abs(cc - c) / 16) ** 4 + (np.abs(rr - r) / (0.36 * step)) ** 4 <= 1
        prob[BODY][body] = 0.95
        prob[VERTEBRA][body] = 0.95
        prob[CENTRE] = np.maximum(prob[CENTRE], 0.9 * _blob(shape, r, c, 3.0))
    if sacrum:
        # As the network draws it on projections: the promontory's top overlaps the lower part of L5.
        r, c = centres[-1]
        last = step * (1 + 0.02 * (count - 1))
        sac = (np.abs(cc - c) / 30) ** 2 + (np.abs(rr - (r + sacrum_drop * last)) / (0.8 * last)) ** 2 <= 1
        prob[SACRUM][sac] = 0.9
    if distractors:
        for r, c in ((centres[3][0] + 5, centres[3][1] + 70), (centres[6][0], centres[6][1] - 75), (centres[-1][0] + 10, 20.0)):
            prob[CENTRE] = np.maximum(prob[CENTRE], 0.8 * _blob(shape, r, c, 3.0))
            prob[BODY] = np.maximum(prob[BODY], 0.7 * (_blob(shape, r, c, 6.0) > 0.5))
    return prob, centres


def test_l5_heatmap_anchors_the_names_when_the_chain_runs_on_into_the_sacrum() -> None:
    # Eight bodies found, the last one a sacral segment taken for a vertebra (as on real radiographs); no
    # sacrum in the sacrum channel; the L5 heatmap marks the seventh.
    prob, centres = spine_probabilities(count=8, sacrum=False, distractors=False)
    prob[L5] = 0.8 * _blob(prob.shape[1:], *centres[6], 3.0) + 0.15 * _blob(prob.shape[1:], *centres[5], 3.0)
    det = postprocess.detect(prob, ChainParams(naming_anchor="l5"))
    assert det.levels == [None, None, "L1", "L2", "L3", "L4", "L5", None]
    # The sacrum rule names nothing here, and a second strong L5 candidate means no names either.
    assert postprocess.detect(prob, ChainParams()).levels == [None] * 8
    prob[L5] = np.maximum(prob[L5], 0.7 * _blob(prob.shape[1:], *centres[7], 3.0))
    det = postprocess.detect(prob, ChainParams(naming_anchor="l5"))
    assert det.levels == [None] * 8
    assert any("fifth lumbar" in n for n in det.notes)


def test_chain_names_levels_from_the_sacrum_and_drops_distractors() -> None:
    prob, centres = spine_probabilities()
    det = postprocess.detect(prob, ChainParams(name_max_levels=24))
    assert len(det.nodes) == 12
    for node, (r, c) in zip(det.nodes, centres, strict=True):
        assert abs(node.row + 0.5 - r) < 1.5 and abs(node.column + 0.5 - c) < 1.5
    assert det.sacrum_adjacent
    assert det.levels == ["T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    # One instance per vertebra, in chain order, each holding its own centre.
    for k, (r, c) in enumerate(centres):
        assert det.labels[int(r), int(c)] == k + 1
    assert 20 < det.step < 26


def test_names_stop_after_the_default_count_from_the_sacrum() -> None:
    det = postprocess.detect(spine_probabilities()[0])
    assert det.levels == [None] * 7 + ["L1", "L2", "L3", "L4", "L5"]
    assert any("level unknown" in n for n in det.notes)


def test_names_stop_at_a_missed_vertebra() -> None:
    # Counting across a gap was wrong more often than right on the hold-out: above it, "level unknown".
    prob, _ = spine_probabilities(drop=(5,))
    det = postprocess.detect(prob, ChainParams(name_max_levels=24))
    assert len(det.nodes) == 11
    assert [n.position for n in det.nodes][4:7] == [4, 6, 7]  # the dropped one is counted as missed
    assert det.levels == [None] * 5 + ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert any("not found" in n for n in det.notes)


def test_sacrum_a_whole_step_below_the_lowest_vertebra_is_not_counted_from() -> None:
    # Seen when L5 itself was missed: the sacrum's top lies about a step below L4's centre.
    prob, _ = spine_probabilities(sacrum_drop=1.8)
    det = postprocess.detect(prob)
    assert det.sacrum is not None and not det.sacrum_adjacent
    assert det.levels == [None] * 12


def test_weak_centre_with_visible_body_is_filled_in() -> None:
    prob, centres = spine_probabilities(distractors=False)
    r, c = centres[4]
    prob[CENTRE] = np.where(_blob(prob.shape[1:], r, c, 6.0) > 0.2, 0.05, prob[CENTRE])
    det = postprocess.detect(prob)
    assert len(det.nodes) == 12
    assert det.nodes[4].inferred


def test_no_sacrum_means_level_unknown() -> None:
    prob, _ = spine_probabilities(sacrum=False)
    det = postprocess.detect(prob)
    assert len(det.nodes) == 12
    assert det.levels == [None] * 12
    assert any("sacrum" in n for n in det.notes)


def test_sacrum_far_below_the_chain_is_not_used_for_naming() -> None:
    prob, centres = spine_probabilities(sacrum=False, shape=(440, 200))
    rr, cc = np.mgrid[0 : prob.shape[1], 0 : prob.shape[2]] + 0.5
    r, c = centres[-1]
    prob[SACRUM][(np.abs(cc - c) < 25) & (rr > r + 60) & (rr < r + 90)] = 0.9
    det = postprocess.detect(prob)
    assert det.sacrum is not None and not det.sacrum_adjacent
    assert det.levels == [None] * 12


def test_sacrum_signal_on_the_chest_or_beside_the_spine_is_not_reported() -> None:
    # Seen on real radiographs: the sacrum channel lit a mid-thoracic body or bowel gas beside the spine,
    # and the SEG and SC drew a "Sacrum" there.
    rr, cc = np.mgrid[0:360, 0:200] + 0.5
    for where in ("thoracic body", "beside the lower spine"):
        prob, centres = spine_probabilities(sacrum=False)
        r, c = centres[4] if where == "thoracic body" else (centres[-1][0] + 10, centres[-1][1] - 70)
        prob[SACRUM][(np.abs(cc - c) < 20) & (np.abs(rr - r) < 12)] = 0.9
        det = postprocess.detect(prob)
        assert len(det.nodes) == 12, where
        assert det.sacrum is None, where
    # The real one below the chain is still found next to the decoy.
    prob, centres = spine_probabilities()
    prob[SACRUM][(np.abs(cc - centres[4][1]) < 20) & (np.abs(rr - centres[4][0]) < 12)] = 0.9
    det = postprocess.detect(prob)
    rows, _ = np.nonzero(det.sacrum)
    assert det.sacrum_adjacent and rows.min() > centres[-1][0] - 20


def test_empty_maps() -> None:
    prob = np.zeros((len(CHANNELS), 64, 48), dtype=np.float32)
    det = postprocess.detect(prob)
    assert det.nodes == [] and det.levels == [] and not det.labels.any()


def test_touching_bodies_are_separated() -> None:
    prob, centres = spine_probabilities(count=4, distractors=False)
    # Fill the discs: one connected body region for all four.
    prob[BODY][int(centres[0][0]) : int(centres[-1][0]), 90:110] = 0.9
    det = postprocess.detect(prob)
    assert len(det.nodes) == 4
    assert len(np.unique(det.labels[det.labels > 0])) == 4


def test_params_from_dict_rejects_unknown_keys() -> None:
    assert postprocess.ChainParams.from_dict({"peak_threshold": 0.2}).peak_threshold == 0.2
    try:
        ChainParams.from_dict({"bogus": 1})
    except ValueError as exc:
        assert "bogus" in str(exc)
    else:
        raise AssertionError("unknown key accepted")
