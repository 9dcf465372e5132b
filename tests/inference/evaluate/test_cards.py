"""The shipped model cards: rendered from model.json (nobody edits them by hand), opening with where the model fails."""

from __future__ import annotations

from pathlib import Path

from inference.registry import ModelRegistry


def _glance(card: str) -> str:
    return card[card.index("## At a glance") : card.index("## What it does")]


def test_the_hardware_card_is_rendered_from_model_json_and_opens_with_where_it_fails() -> None:
    """Before any detail a reader learns which failure modes are not assessed and how films without implants fare."""
    from inference.evaluate.hardware import render_card

    spec = ModelRegistry().spec("spine-xr-hardware")
    meta = spec.metadata
    card = render_card({**meta, "_folder": str(spec.folder)}, meta["metrics"])
    assert Path(spec.folder / "MODEL_CARD.md").read_text() == card
    glance = _glance(card)
    for failure in meta["postprocess"]["not_assessed"]:
        assert failure in glance
    plain = meta["metrics"]["real_plain_test"]
    assert f'answered "no implants": {100 * plain["said_no_implants"]:.1f} % of {plain["images"]}' in glance


def test_the_vertebra_card_is_rendered_from_model_json_and_says_what_is_switched_off() -> None:
    from inference.evaluate.card import render_card

    spec = ModelRegistry().spec("spine-xr-vertebrae")
    meta = spec.metadata
    card = render_card(meta, meta["metrics"])
    assert Path(spec.folder / "MODEL_CARD.md").read_text() == card
    glance = _glance(card)
    real = meta["metrics"]["real_test"]["centroid_in_box"]
    assert f"F1 {real['f1']:.3f}" in glance
    assert ("Level names are switched off" in glance) is (not meta["postprocess"].get("name_levels", True))
    assert ("Heights and fracture grades are switched off" in glance) is (not meta.get("fracture_grading", True))


def test_the_hardware_card_says_how_far_the_rows_move_on_a_second_hold_out() -> None:
    """A second synthetic hold-out drawn like the first is set beside it, row by row, and the glance names its cage
    numbers: the cage rows rest on a few dozen cages and must not be read as one precise figure."""
    from inference.evaluate.hardware import render_card

    spec = ModelRegistry().spec("spine-xr-hardware")
    meta = spec.metadata
    second = meta["metrics"].get("synthetic_second_holdout")
    assert second, "the shipped card is evaluated on a second hold-out too"
    card = render_card({**meta, "_folder": str(spec.folder)}, meta["metrics"])
    assert f"F1 {second['cage_discs_vertebra_model']['f1']:.3f}" in _glance(card)
    section = card[card.index("### A second synthetic hold-out") :]
    lateral = second["cage_discs_vertebra_model_by_view"]["LAT"]
    assert f"| {lateral['f1']:.3f} ({lateral['precision']:.3f} / {lateral['recall']:.3f}) |" in section.split("\n\n### ")[0]


def test_sections_carried_over_from_an_earlier_evaluation_say_so(tmp_path: Path) -> None:
    """An evaluation that does not re-run the leave-one-patient-out folds (hours of training) keeps the earlier
    ones, and the card dates them, instead of silently dropping or passing them off as measured now."""
    import json

    import pytest

    from inference.evaluate.card import carry_over, carry_source, render_card

    spec = ModelRegistry().spec("spine-xr-vertebrae")
    meta = spec.metadata
    earlier = meta["metrics"]
    keys = ("leave_one_patient_out", "lateral_leave_one_patient_out")
    (tmp_path / "model.json").write_text(json.dumps(meta))
    measured_now = {k: v for k, v in earlier.items() if "leave_one_patient_out" not in k} | {
        "evaluated": "2027-01-01", "model_version": "1.0+new"}
    assert carry_over(measured_now, carry_source(tmp_path / "model.json", meta["name"], keys), keys) == list(keys)
    assert measured_now["leave_one_patient_out"] == earlier["leave_one_patient_out"]
    card = render_card(meta, measured_now)
    lopo = card[card.index("### Leave one CT patient out") :]
    # Dated where the folds were measured (the shipped metrics may carry them from an evaluation before theirs).
    measured = (earlier.get("carried_over") or {}).get("leave_one_patient_out") or earlier
    assert f"measured by the evaluation of {measured['evaluated']} (model {measured['model_version']})" in lopo
    assert "do not depend on this model's weights" in lopo
    assert "the vertebra network that found the centroids was that model's" in card
    # Carried again from the evaluation that carried them: still dated where they were measured.
    (tmp_path / "model.json").write_text(json.dumps({**meta, "metrics": measured_now}))
    again: dict = {"evaluated": "2027-02-01"}
    carry_over(again, carry_source(tmp_path / "model.json", meta["name"], keys), keys)
    assert again["carried_over"] == measured_now["carried_over"]
    # What this evaluation measured is never replaced; another model's file, or one without folds, is refused.
    assert carry_over(dict(measured_now), earlier, keys) == []
    assert "Not re-run" not in render_card(meta, {k: v for k, v in earlier.items() if k != "carried_over"})
    hardware = ModelRegistry().spec("spine-xr-hardware").folder / "model.json"
    with pytest.raises(SystemExit, match="not 'spine-xr-vertebrae'"):
        carry_source(hardware, meta["name"], keys)
    (tmp_path / "model.json").write_text(json.dumps({**meta, "metrics": {}}))
    with pytest.raises(SystemExit, match="holds none of"):
        carry_source(tmp_path / "model.json", meta["name"], keys)


def test_the_vertebra_card_says_how_many_vertebrae_it_finds_in_images_without_anatomy() -> None:
    from inference.evaluate.card import render_card

    meta = ModelRegistry().spec("spine-xr-vertebrae").metadata
    row = {"images": 4, "images_with_vertebrae": 1, "vertebrae_mean": 0.75, "vertebrae_max": 3}
    metrics = {**meta["metrics"], "structureless": {"seed": 7919, **row, "by_kind": {"noise": row}}}
    card = render_card(meta, metrics)
    assert "vertebrae reported on 1 of 4 images, 0.75 per image on average, up to 3" in _glance(card)
    assert "| noise | 4 | 1 | 0.75 | 3 |" in card and "| all | 4 | 1 | 0.75 | 3 |" in card
    clean = {**metrics, "structureless": {**metrics["structureless"], "images_with_vertebrae": 0}}
    assert "contrast gate" not in _glance(render_card(meta, clean))


def test_the_hardware_card_says_what_it_answers_on_images_without_anatomy() -> None:
    from inference.evaluate.hardware import render_card

    spec = ModelRegistry().spec("spine-xr-hardware")
    meta = spec.metadata
    blank = {"seed": 7919, "images": 40, "status": {"no implants": 38, "not assessable": 2}, "images_with_implants_found": 2,
             "said_no_implants": 0.95}
    card = render_card({**meta, "_folder": str(spec.folder)}, {**meta["metrics"], "structureless": blank})
    assert 'answered "no implants" 95.0 % of 40; implants found on 2.' in _glance(card)
