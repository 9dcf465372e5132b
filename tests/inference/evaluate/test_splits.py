"""Which real films each shipped model learnt from (`inference.splits`), and the intervals the cards quote."""

from __future__ import annotations

from inference import splits
from inference.evaluate import metrics as M


def test_films_of_one_patient_share_a_key() -> None:
    a = "sunhl-1th-30-Dec-2016-159-A-AP_jpg.rf.0123.jpg"
    c = "sunhl-1th-30-Dec-2016-159-C-AP_jpg.rf.4567.jpg"
    assert splits.patient_key(a) == splits.patient_key(c) != splits.patient_key("sunhl-1th-30-Dec-2016-160-A-AP_jpg.rf.89.jpg")
    assert splits.patient_key("N11-S-21-F_1_0_jpg.rf.1.jpg") == splits.patient_key("N11-S-21-F_1_1_jpg.rf.2.jpg")
    assert splits.patient_key("Image_140_jpg.rf.1.jpg") != splits.patient_key("Image_14_jpg.rf.1.jpg")


def test_a_film_whose_patient_was_seen_is_not_unseen() -> None:
    a, c, other = "x-159-A-AP_jpg.rf.1.jpg", "x-159-C-AP_jpg.rf.2.jpg", "x-160-A-AP_jpg.rf.3.jpg"
    assert splits.patient_disjoint([a, other], seen=[c]) == [other]


def test_the_vertebra_model_saw_its_cache_films_whatever_its_split_says() -> None:
    names = [f"Image_{k:03d}_jpg.rf.{k}.jpg" for k in range(400)]
    test = [n for n in names if splits.vertebra_split(n) == "test"]
    meta = {"training": {"data": {"synthetic": {"manifest": {"provenance": {"real_images": {
        "files": [f"radiographs/cadma_train/images/{test[0]}"]}}}}}}}
    seen = splits.vertebra_seen(names, meta)
    assert test[0] in seen and test[1] not in seen
    unseen = splits.unseen_by_both(names, meta)
    assert test[0] not in unseen
    assert all(splits.vertebra_split(n) == "test" and splits.hardware_split(n) == "test" for n in unseen)


def test_a_fine_tune_has_seen_what_the_model_it_started_from_saw(tmp_path) -> None:
    """The trainer records the model an --init-weights file belongs to; its cache films and its train and val
    split (by its own scheme) count as seen by the fine-tune, whose own cache may draw on no real film."""
    import json

    from inference.train.common import init_model_record

    names = [f"Image_{k:03d}_jpg.rf.{k}.jpg" for k in range(400)]
    test = [n for n in names if splits.split_of(n, "cadma-v1") == "test" and splits.split_of(n) == "test"]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"weights")
    parent = {"name": "spine-xr-vertebrae", "version": "1.0+parent", "training": {"data": {
        "real": {"split_scheme": "cadma-v1"},
        "synthetic": {"manifest": {"provenance": {"real_images": {"files": [f"images/{test[0]}"]}}}}}}}
    from inference.registry import sha256_file

    digest = sha256_file(folder / "weights.pt")
    (folder / "model.json").write_text(json.dumps({**parent, "sha256": "not these weights"}))
    assert init_model_record(folder / "weights.pt", digest) is None  # a model.json of other weights says nothing
    (folder / "model.json").write_text(json.dumps({**parent, "sha256": digest}))
    record = init_model_record(folder / "weights.pt", digest)
    assert record == parent
    child = {"training": {"initialised_from": {"path": "x", "sha256": "y", "model": record},
                          "data": {"real": {"split_scheme": splits.TRAINING_SCHEME}}}}
    assert [r.get("version") for r in splits.lineage(child)] == [None, "1.0+parent"]
    seen = set(splits.vertebra_seen(names, child))
    assert test[0] in seen and test[1] not in seen
    # The parent's train split (cadma-v1) is seen even where the child's split (patient-v2) calls a film test.
    assert any(splits.split_of(n) == "test" and splits.split_of(n, "cadma-v1") == "train" for n in seen)
    assert splits.cache_films(child) == [test[0]]
    # An ancestor recorded without its training (an old or hand-made model.json) adds its legacy split, no crash.
    bare = {"training": {"initialised_from": {"model": {"version": "old", "training": None}}}}
    assert splits.cache_films(bare) == [] and splits.vertebra_seen(names, bare)


def test_intervals_widen_as_the_sample_shrinks() -> None:
    lo, hi = M.proportion_interval(127, 138)
    assert lo < 127 / 138 < hi and (hi - lo) < 0.1
    small = M.proportion_interval(8, 9)
    assert small[1] - small[0] > 0.3
    assert M.proportion_interval(0, 0) is None
    per_image = [(10, 1, 2), (8, 3, 1), (12, 0, 0), (5, 5, 5)] * 10
    f_lo, f_hi = M.f1_interval(per_image)
    assert f_lo < 2 * 350 / (2 * 350 + 90 + 80) < f_hi
    assert M.f1_interval([(1, 0, 0)]) is None


def test_a_model_is_scored_on_the_split_its_model_json_names() -> None:
    names = [f"Image_{k:03d}_jpg.rf.{k}.jpg" for k in range(400)]
    legacy: dict = {}
    retrained = {"training": {"data": {"real": {"split_scheme": splits.TRAINING_SCHEME}}}}
    assert [splits.vertebra_split(n, legacy) for n in names] == [splits.split_of(n, "cadma-v1") for n in names]
    assert [splits.hardware_split(n, legacy) for n in names] == [splits.split_of(n, "real-v1") for n in names]
    assert [splits.vertebra_split(n, retrained) for n in names] == [splits.split_of(n) for n in names]
    # Both models on the one split: every test film is unseen by both.
    both = splits.unseen_by_both(names, retrained, retrained)
    assert both == [n for n in names if splits.split_of(n) == "test"] and both
    assert len(splits.unseen_by_both(names, legacy, legacy)) < len(both)


def test_a_run_keeps_the_split_of_what_it_continues(tmp_path) -> None:
    import json

    import pytest
    import torch

    from inference.registry import sha256_file
    from inference.train import common

    work = tmp_path / "work"
    work.mkdir()
    assert common.split_scheme(None, work=work, fresh=False, init_weights=None, legacy="cadma-v1") == splits.TRAINING_SCHEME
    assert common.split_scheme("real-v1", work=work, fresh=False, init_weights=None, legacy="cadma-v1") == "real-v1"
    # A checkpoint written before schemes were recorded is the model's old scheme, resumed or re-tuned.
    torch.save({"step": 5}, work / "checkpoint.pt")
    assert common.split_scheme(None, work=work, fresh=False, init_weights=None, legacy="cadma-v1") == "cadma-v1"
    with pytest.raises(SystemExit, match="trained with split scheme cadma-v1, not patient-v2"):
        common.split_scheme("patient-v2", work=work, fresh=False, init_weights=None, legacy="cadma-v1")
    assert common.split_scheme("patient-v2", work=work, fresh=True, init_weights=None, legacy="cadma-v1") == "patient-v2"
    # Fine-tuning a model folder's weights: its model.json names the scheme.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"")
    meta = {"sha256": sha256_file(folder / "weights.pt"), "training": {"data": {"real": {"split_scheme": "real-v1"}}}}
    (folder / "model.json").write_text(json.dumps(meta))
    assert common.split_scheme(None, work=tmp_path / "new", fresh=False, init_weights=folder / "weights.pt",
                               legacy="cadma-v1") == "real-v1"
    # Weights copied over that folder: its model.json is another model's, and holds the run to nothing.
    (folder / "weights.pt").write_bytes(b"other weights")
    assert common.split_scheme("patient-v2", work=tmp_path / "new", fresh=False, init_weights=folder / "weights.pt",
                               legacy="cadma-v1") == "patient-v2"


def test_a_cache_drawing_on_another_splits_films_is_refused(tmp_path) -> None:
    import json

    import pytest

    from inference.train import common

    def cache(real: dict) -> object:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"provenance": {"real_images": real}}))
        return folder

    common.check_cache_scheme(cache({"files": []}), "patient-v2")  # no real films: any split
    common.check_cache_scheme(cache({"files": ["a.jpg"], "split_scheme": "patient-v2"}), "patient-v2")
    with pytest.raises(SystemExit, match="real-v1 split, the run uses patient-v2"):
        common.check_cache_scheme(cache({"files": ["a.jpg"]}), "patient-v2")  # built before schemes were recorded
