"""Delivery policy (pure): status classes and backoff."""

from __future__ import annotations

import random

from dicom_node.scu import OK, PERMANENT, TRANSIENT, backoff_delay, classify_status, status_meaning
from dicom_node.settings import DeliverySettings


def test_status_classes() -> None:
    assert [classify_status(s) for s in (0x0000, 0xB000, 0xB007, 0x0111)] == [OK] * 4
    assert [classify_status(s) for s in (0xA700, 0xA7FF)] == [TRANSIENT] * 2
    assert [classify_status(s) for s in (0xA900, 0xC000, 0xC211, 0x0122, 0xB008)] == [PERMANENT] * 5


def test_failure_statuses_are_named_for_the_operator() -> None:
    assert status_meaning(0xA700) == "(out of resources: the destination is full or busy; retried)"
    assert status_meaning(0xC211) == "(cannot understand)" and status_meaning(0xA900).startswith("(data set")
    assert status_meaning(0x0122) == "(SOP class not supported)" and status_meaning(0x0000) == ""


def test_backoff_grows_exponentially_capped_with_jitter() -> None:
    policy = DeliverySettings(backoff_initial_s=2, backoff_max_s=60, jitter=0.25)
    rng = random.Random(1)
    delays = [backoff_delay(n, policy, rng) for n in range(1, 10)]
    for n, d in enumerate(delays, start=1):
        base = min(60, 2 * 2 ** (n - 1))
        assert 0.75 * base <= d <= 1.25 * base
    assert len({round(d, 6) for d in delays}) == len(delays)
    assert backoff_delay(1, DeliverySettings(jitter=0), rng) == 5.0


def test_a_refused_output_is_named_with_what_to_change() -> None:
    from pathlib import Path

    from dicom_node.scu import Item, refusal_message
    from dicom_node.settings import Destination

    dest = Destination(name="pacs", ae_title="PACS", host="10.0.0.5", port=104)
    labelmap = Item(1, Path("x.dcm"), "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.1.2.1")
    assert refusal_message(dest, labelmap) == (
        'PACS@10.0.0.5:104 refused Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7) in Explicit VR Little'
        ' Endian; it may not know this newer SOP class: seg_format = "binary" sends a Segmentation Storage')
    j2k = Item(1, Path("x.dcm"), "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.1.2.4.90")
    assert 'seg_compression = "none"' in refusal_message(dest, j2k)
