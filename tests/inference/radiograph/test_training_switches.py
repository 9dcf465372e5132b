"""A retrain keeps off what an evaluation switched off: the trainers rewrite model.json, and their defaults
report everything (level names, fracture grades, every complication, plates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.registry import ModelRegistry

VERTEBRAE, HARDWARE = "spine-xr-vertebrae", "spine-xr-hardware"


def _replaced(tmp_path: Path, name: str) -> Path:
    """A model folder as `make train-*` finds it: the shipped model the run replaces."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copyfile(ModelRegistry().spec(name).folder / "model.json", folder / "model.json")
    (tmp_path / "best.pt").write_bytes(b"new weights")
    return folder


def test_a_vertebra_retrain_keeps_level_names_and_fracture_grades_off(tmp_path: Path) -> None:
    from inference.train import common
    from inference.train.vertebrae import write_model_folder

    shipped = ModelRegistry().spec(VERTEBRAE).metadata
    assert shipped["postprocess"]["name_levels"] is False and shipped["fracture_grading"] is False
    out = _replaced(tmp_path, VERTEBRAE)
    meta = write_model_folder(out, tmp_path / "best.pt", {"command": "test"}, None, common.switches_source(None, out, VERTEBRAE))
    written = json.loads((out / "model.json").read_text())
    assert written == meta and written["sha256"] != shipped["sha256"]
    assert written["postprocess"]["name_levels"] is False and written["fracture_grading"] is False
    assert written["switched_off"] == shipped["switched_off"]
    assert written["switched_off_in"] == shipped.get("switched_off_in", shipped["version"])  # where it was decided
    # Into a new folder (a run beside the shipped model): the installed model's switches.
    assert common.switches_source(None, tmp_path / "new", VERTEBRAE) == ModelRegistry().spec(VERTEBRAE).folder
    # Asked for explicitly: everything on, for an evaluation to read before anyone ships it.
    fresh = write_model_folder(tmp_path / "fresh", tmp_path / "best.pt", {}, None, common.switches_source("none", out, VERTEBRAE))
    assert fresh["postprocess"]["name_levels"] is True and "fracture_grading" not in fresh and "switched_off" not in fresh


def test_a_hardware_retrain_keeps_its_failure_modes_unassessed_and_plates_unnamed(tmp_path: Path) -> None:
    from inference.radiograph.hardware_post import HardwareParams
    from inference.train.hardware import write_model_folder

    shipped = ModelRegistry().spec(HARDWARE).metadata
    out = _replaced(tmp_path, HARDWARE)
    meta = write_model_folder(out, tmp_path / "best.pt", {}, HardwareParams(not_assessed=("screw loosening",)), out)
    assert meta["postprocess"]["not_named"] == ["plate"]
    assert meta["postprocess"]["not_assessed"] == sorted(shipped["postprocess"]["not_assessed"])
    assert set(meta["switched_off"]) == set(shipped["switched_off"])
    HardwareParams(**{k: v for k, v in meta["postprocess"].items() if k in ("not_assessed", "not_named")})  # still valid


@pytest.mark.parametrize("trainer", ["vertebrae", "hardware"])
def test_a_switches_source_that_cannot_apply_stops_the_run_before_it_trains(tmp_path: Path, trainer: str) -> None:
    """Hours of training must not end in a folder with new weights under its old model.json."""
    import importlib

    module = importlib.import_module(f"inference.train.{trainer}")
    other = _replaced(tmp_path, HARDWARE if trainer == "vertebrae" else VERTEBRAE)
    out = tmp_path / "out"
    for wrong, message in ((other, "not '"), (tmp_path / "typo", "model.json not found")):
        with pytest.raises(SystemExit, match=message):
            module.main(["--data", str(tmp_path), "--cache", str(tmp_path), "--out", str(out), "--switches-from", str(wrong),
                         "--work", str(tmp_path / "work")])
    assert not out.exists()
    # ... nor when the folder it replaces cannot apply (checked before the weights are copied).
    (out).mkdir()
    (out / "model.json").write_text(json.dumps({"name": "something-else"}))
    with pytest.raises(SystemExit, match="its switches do not apply"):
        params = None if trainer == "vertebrae" else importlib.import_module("inference.radiograph.hardware_post").HardwareParams()
        module.write_model_folder(out, tmp_path / "best.pt", {}, params, out)
    assert not (out / "weights.pt").exists()
