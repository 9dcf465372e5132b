"""The hardware training's hard negatives and fine-tuning, and how leave-one-patient-out repeats a fine-tuned
recipe (no training run here: a tiny stand-in network and recorded commands)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.evaluate.hardware import fold_commands, recipe_args, reporting_as_shipped, training_stages
from inference.radiograph.hardware_post import CHANNELS, METAL, PLATE, HardwareParams
from inference.radiograph.hardware_targets import TargetItem
from inference.registry import sha256_file
from inference.train.hardware import mine_hard_negatives, read_init_weights


class BrightIsPlate(torch.nn.Module):
    """Stand-in network: bright pixels are plate metal, everything else nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], len(CHANNELS), *x.shape[2:]), -10.0)
        for ch in (METAL, PLATE):
            logits[:, ch] = 40.0 * (x[:, 0] - 0.5)
        return logits


def _real(image: np.ndarray, key: str) -> TargetItem:
    return TargetItem(image.astype(np.float16), np.zeros(image.shape, np.uint16), np.zeros((0, 2), np.float32), "AP", "real", "cadma",
                      meta={"key": key})


def test_hard_negatives_are_the_real_images_where_the_network_finds_implants() -> None:
    dark = np.full((64, 64), 0.2)
    buckle = dark.copy()
    buckle[20:44, 24:40] = 0.9  # a 24 x 16 mm bright block: a "plate" at 1 mm per pixel
    hard = mine_hard_negatives(BrightIsPlate(), [_real(dark, "plain"), _real(buckle, "brace"), _real(dark, "plain 2")])
    assert [item.meta["key"] for item in hard] == ["brace"]
    # Its training crops are centred on the false implant.
    np.testing.assert_allclose(hard[0].meta["anchors"], [[32.0, 32.0]])


def test_fine_tuning_starts_from_a_model_folders_segmentation_network(tmp_path: Path) -> None:
    state = {"final_conv.bias": torch.arange(3.0)}
    torch.save({"segmentation": state, "complications": {"w": torch.zeros(1)}}, tmp_path / "weights.pt")
    meta = {"version": "1.0+abc", "sha256": sha256_file(tmp_path / "weights.pt"),
            "training": {"command": "python -m x --iterations 9", "metrics": 1}}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded, record = read_init_weights(tmp_path / "weights.pt")
    assert torch.equal(loaded["final_conv.bias"], state["final_conv.bias"])
    assert record["version"] == "1.0+abc"
    assert record["training"] == {"command": "python -m x --iterations 9"}
    assert record["sha256"] == meta["sha256"]


def test_a_model_json_describing_other_weights_gives_the_start_no_training_record(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Weights copied over a model folder: its model.json's training is not theirs, so leave-one-patient-out
    (which repeats the recorded base recipe) refuses rather than repeat the wrong run."""
    torch.save({"segmentation": {"final_conv.bias": torch.zeros(3)}}, tmp_path / "weights.pt")
    (tmp_path / "model.json").write_text(json.dumps({"version": "1.0+abc", "sha256": "0" * 64,
                                                     "training": {"command": "python -m x"}}))
    _, record = read_init_weights(tmp_path / "weights.pt")
    assert "version" not in record and "training" not in record
    assert "no model.json describes" in caplog.text
    with pytest.raises(ValueError, match="not recorded"):
        training_stages({"command": "python -m inference.train.hardware --init-weights w", "base_training": record})


def test_leave_one_patient_out_repeats_both_stages_of_a_fine_tuned_model(tmp_path: Path) -> None:
    """A fold of a fine-tuned model trains the base recipe, then fine-tunes ITS OWN base (never the shipped
    weights, which have seen the left-out patient)."""
    base = "python -m inference.train.hardware --data d --cache c --out m --threads 1 --max-minutes 80 --disc-iterations 1200"
    tuned = (base + " --init-weights m/weights.pt --iterations 600 --lr 0.0005 --hard-negative-share 0.15 --work w")
    training = {"command": tuned, "base_training": {"version": "1.0+abc", "training": {"command": base}}}
    stages = training_stages(training)
    assert stages == [recipe_args(base), recipe_args(tuned)]
    assert "--hard-negative-share" in stages[1] and "--init-weights" not in stages[1]
    first, second = fold_commands(Path("d"), Path("c"), tmp_path / "without-x", "x", stages)
    assert first[first.index("--out") + 1] == str(tmp_path / "without-x" / "stage-1")
    assert second[second.index("--out") + 1] == str(tmp_path / "without-x")
    assert second[second.index("--init-weights") + 1] == str(tmp_path / "without-x" / "stage-1" / "weights.pt")
    assert "--init-weights" not in first
    for cmd in (first, second):
        assert cmd[cmd.index("--exclude-sources") + 1] == "x,stitched"
    # A fold trains on the real films the cache drew its overlays on; later stages inherit that split.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text('{"provenance": {"real_images": {"files": ["f.jpg"]}}}')
    first, second = fold_commands(Path("d"), cache, tmp_path / "without-x", "x", stages)
    assert first[first.index("--split-scheme") + 1] == "real-v1" and "--split-scheme" not in second
    # A model trained in one run keeps one stage.
    assert training_stages({"command": base}) == [recipe_args(base)]
    # Fine-tuned from weights whose training is not recorded: not silently the fine-tune alone.
    with pytest.raises(ValueError, match="not recorded"):
        training_stages({"command": tuned, "base_training": {"weights": "work/best.pt"}})


def test_folds_report_what_the_shipped_model_reports() -> None:
    """A failure mode switched off, or a kind un-named, after training (model.json, same weights) is so in the
    folds too; the fold's own tuned values stay, and its recipe is not changed (no retraining)."""
    fold = HardwareParams(min_score=0.7, not_assessed=("screw loosening", "screw breakage"))
    shipped = HardwareParams(min_score=0.8, not_assessed=("screw loosening", "screw breakage", "rod fracture"), not_named=("plate",))
    params = reporting_as_shipped(fold, shipped)
    assert params.not_assessed == ("screw loosening", "screw breakage", "rod fracture") and params.not_named == ("plate",)
    assert params.min_score == 0.7
    # Everything reported again: nothing switched off in the fold either.
    assert reporting_as_shipped(params, HardwareParams()).not_assessed == ()
    trained = "python -m inference.train.hardware --threads 1 --not-assessed 'screw loosening,screw breakage'"
    assert training_stages({"command": trained}) == [["--threads", "1", "--not-assessed", "screw loosening,screw breakage", "--disc-iterations", "0"]]
