"""A retrain keeps off what an evaluation switched off: the trainers rewrite model.json, and their defaults
report everything (level names, fracture grades, every complication, plates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.registry import ModelRegistry


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

    shipped = ModelRegistry().spec("spine-xr-vertebrae").metadata
    assert shipped["postprocess"]["name_levels"] is False and shipped["fracture_grading"] is False
    out = _replaced(tmp_path, "spine-xr-vertebrae")
    meta = write_model_folder(out, tmp_path / "best.pt", {"command": "test"}, None, common.switches_source(None, out))
    written = json.loads((out / "model.json").read_text())
    assert written == meta and written["sha256"] != shipped["sha256"]
    assert written["postprocess"]["name_levels"] is False and written["fracture_grading"] is False
    assert written["switched_off"] == shipped["switched_off"] and written["switched_off_in"] == shipped["version"]
    # Asked for explicitly: everything on, for an evaluation to read before anyone ships it.
    fresh = write_model_folder(tmp_path / "fresh", tmp_path / "best.pt", {}, None, common.switches_source("none", out))
    assert fresh["postprocess"]["name_levels"] is True and "fracture_grading" not in fresh and "switched_off" not in fresh


def test_a_hardware_retrain_keeps_its_failure_modes_unassessed_and_plates_unnamed(tmp_path: Path) -> None:
    from inference.radiograph.hardware_post import HardwareParams
    from inference.train.hardware import write_model_folder

    shipped = ModelRegistry().spec("spine-xr-hardware").metadata
    out = _replaced(tmp_path, "spine-xr-hardware")
    meta = write_model_folder(out, tmp_path / "best.pt", {}, HardwareParams(not_assessed=("screw loosening",)), out)
    assert meta["postprocess"]["not_named"] == ["plate"]
    assert meta["postprocess"]["not_assessed"] == sorted(shipped["postprocess"]["not_assessed"])
    assert set(meta["switched_off"]) == set(shipped["switched_off"])
    HardwareParams(**{k: v for k, v in meta["postprocess"].items() if k in ("not_assessed", "not_named")})  # still valid


def test_switches_of_another_model_are_refused(tmp_path: Path) -> None:
    from inference.train import common

    out = _replaced(tmp_path, "spine-xr-hardware")
    with pytest.raises(SystemExit, match="not 'spine-xr-vertebrae'"):
        common.carry_switches({"name": "spine-xr-vertebrae"}, out)
