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
