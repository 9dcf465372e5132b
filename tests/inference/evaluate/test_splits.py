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
