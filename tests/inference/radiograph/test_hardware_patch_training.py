"""The complication classifier's training data: rod windows along the rods the segmentation finds, labelled by
the true gap under them, and the stage that trains it into a model folder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from phantoms import phantom
from scipy import ndimage

from inference.radiograph import hardware_patch_data
from inference.radiograph.hardware_patch_data import PatchBank, rod_gap_xy
from inference.results import Complication, ImplantKind


def _found(kind: ImplantKind, mask: np.ndarray) -> SimpleNamespace:
    """A found implant as `found_pieces` gives it: kind, mask crop and its offset."""
    sl = ndimage.find_objects(mask.astype(np.int32))[0]
    return SimpleNamespace(piece=SimpleNamespace(kind=kind), mask=mask[sl], offset=(sl[0].start, sl[1].start))


@pytest.fixture
def fractured() -> tuple:
    """A phantom with a posterior construct whose rod is fractured where the gap shows, and that rod's label."""
    sample = phantom(33, "AP", "lumbar", implants=("posterior", "rod_fracture"))
    joinable = np.isin(sample.implants, [k + 1 for k, s in enumerate(sample.implant_specs) if s.kind is ImplantKind.PEDICLE_SCREW])
    for k, spec in enumerate(sample.implant_specs):
        if spec.kind is ImplantKind.ROD and Complication.ROD_FRACTURE in spec.complications:
            if rod_gap_xy(sample.implants == k + 1, joinable, float(sample.pixel_spacing_mm[0])) is not None:
                return sample, k + 1
    pytest.fail("the phantom's fractured rod shows no gap: pick another seed")


def test_found_rods_are_labelled_by_the_true_gap_and_false_rods_are_negatives(fractured, monkeypatch) -> None:
    """The segmentation's rod pieces are what the classifier meets at run time: windows along a found piece
    over the fractured rod are positive near its gap only; a found 'rod' over no implant gives negatives."""
    sample, label = fractured
    rod = sample.implants == label
    spurious = np.zeros_like(rod)
    spurious[5:60, 5:12] = True  # a rod-like piece in the corner, over no implant
    assert not (sample.implants[spurious] > 0).any()
    monkeypatch.setattr(hardware_patch_data, "found_pieces", lambda model, s: [_found(ImplantKind.ROD, rod), _found(ImplantKind.ROD, spurious)])
    bank = PatchBank()
    assert bank.add_found_rods(None, sample) == 2
    items = bank.items["rod"]
    assert len(bank.images) == 1 and all(it.image == 0 for it in items)
    on_spurious = [it for it in items if it.offset == (5, 5)]
    on_rod = [it for it in items if it.offset != (5, 5)]
    assert on_spurious and not any(it.positive for it in on_spurious)
    positives = [it for it in on_rod if it.positive]
    assert 1 <= len(positives) < len(on_rod), "windows near the gap only"
    # Beside the true implants of the same sample, its image is kept once.
    both = PatchBank()
    image = both.add(sample)
    assert image == 0 and both.add_found_rods(None, sample, image) == 2
    assert len(both.images) == 1 and len(both.items["rod"]) > len(items)


def test_found_pieces_other_than_rods_add_nothing(fractured, monkeypatch) -> None:
    sample, _ = fractured
    screw = sample.implants == next(k + 1 for k, s in enumerate(sample.implant_specs) if s.kind is ImplantKind.PEDICLE_SCREW)
    monkeypatch.setattr(hardware_patch_data, "found_pieces", lambda model, s: [_found(ImplantKind.PEDICLE_SCREW, screw)])
    bank = PatchBank()
    assert bank.add_found_rods(None, sample) == 0
    assert not bank.items["rod"] and not bank.images


def test_the_stage_retrains_a_model_folders_classifier_and_keeps_the_rest(tmp_path) -> None:
    """`python -m inference.train.hardware_patches` on a tiny cache: the folder's weights gain a new classifier,
    its thresholds and record are rewritten, the segmentation, disc stage and other settings stay."""
    import json
    import shutil

    import torch

    from inference.registry import ModelRegistry
    from inference.synth.build import main as build_main
    from inference.train.hardware_patches import main as stage_main

    cache = tmp_path / "cache"
    assert build_main(["--data", str(tmp_path / "no-data"), "--out", str(cache), "--count", "4", "--seed", "5", "--max-side", "400",
                       "--out-px", "380,400", "--render-px", "256", "--implants-prob", "1", "--hooks-prob", "1", "--views", "AP"]) == 0
    folder = tmp_path / "model"
    shutil.copytree(ModelRegistry().spec("spine-xr-hardware").folder, folder)
    before = json.loads((folder / "model.json").read_text())
    old = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    assert stage_main(["--cache", str(cache), "--model", str(folder), "--iterations", "3", "--threads", "1", "--val-every", "2", "--found-rods"]) == 0
    after = json.loads((folder / "model.json").read_text())
    new = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    assert set(new) == set(old)
    assert all(torch.equal(new["segmentation"][k], v) for k, v in old["segmentation"].items())
    assert all(torch.equal(new["discs"][k], v) for k, v in old["discs"].items())
    assert any(not torch.equal(new["complications"][k], v) for k, v in old["complications"].items())
    record = after["training"]["complication_classifier"]
    assert record["iterations"] == 3 and record["found_rods"] and record["command"].startswith("python -m inference.train.hardware_patches")
    assert after["version"] != before["version"] and after["metrics"] == {}
    kept = {k: v for k, v in before["postprocess"].items() if k != "complication_threshold"}
    assert {k: after["postprocess"][k] for k in kept} == kept
    assert set(after["postprocess"]["complication_threshold"]) == set(before["postprocess"]["complication_threshold"])
