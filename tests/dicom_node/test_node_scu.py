"""The sender against real pynetdicom peers that answer with chosen statuses, refuse contexts or stall."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from nodekit import make_study
from peers import free_port
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from dicom_node.scu import OK, PERMANENT, TRANSIENT, Item, send_batch
from dicom_node.settings import DeliverySettings, Destination


@pytest.fixture
def peer() -> Iterator[Callable[..., tuple[Destination, list[str]]]]:
    """Start a pynetdicom Storage SCP whose C-STORE answer comes from `status(ds, n)`."""
    servers = []

    def start(status: Callable[[pydicom.Dataset, int], int], sop_class: str = DigitalXRayImageStorageForPresentation):
        stored: list[str] = []
        calls = [0]

        def on_store(event) -> int:  # noqa: ANN001
            calls[0] += 1
            ds = event.dataset
            code = status(ds, calls[0])
            if code in (0, 0xB000):
                stored.append(str(ds.SOPInstanceUID))
            return code

        ae = AE(ae_title="PEER")
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]))
        return Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port), stored

    yield start
    for s in servers:
        s.shutdown()


def _items(tmp_path: Path, n: int) -> list[Item]:
    return [Item(p, p, str(pydicom.dcmread(p).SOPClassUID), ExplicitVRLittleEndian)
            for p in make_study(tmp_path / "in", "scu", images=n)]


def test_each_status_is_classified(peer, tmp_path: Path) -> None:
    codes = {1: 0x0000, 2: 0xB000, 3: 0xA700, 4: 0xC000, 5: 0xA900}
    dest, stored = peer(lambda ds, n: codes[n])
    results = send_batch("AINODE", dest, _items(tmp_path, 5), DeliverySettings())
    assert [r.outcome for r in results] == [OK, OK, TRANSIENT, PERMANENT, PERMANENT]
    assert [r.status for r in results] == [0x0000, 0xB000, 0xA700, 0xC000, 0xA900]
    assert "status 0xC000" in results[3].message and len(stored) == 2


def test_refused_context_is_permanent(peer, tmp_path: Path) -> None:
    dest, stored = peer(lambda ds, n: 0, sop_class=CTImageStorage)
    results = send_batch("AINODE", dest, _items(tmp_path, 1), DeliverySettings())
    assert results[0].outcome == PERMANENT and "refused every proposed presentation context" in results[0].message
    assert stored == []


def test_dimse_timeout_is_transient_and_a_resend_completes(peer, tmp_path: Path) -> None:
    release = threading.Event()

    def stall_first(ds: pydicom.Dataset, n: int) -> int:
        if n == 1:
            release.wait(10)  # the peer is stuck on the first instance
        return 0

    dest, stored = peer(stall_first)
    items = _items(tmp_path, 3)
    first = send_batch("AINODE", dest, items, DeliverySettings(dimse_timeout_s=1.0))
    release.set()
    # Transient, not OK: the sender gave up before the peer answered (it answers only after `release`).
    assert [r.outcome for r in first] == [TRANSIENT] * 3
    assert "no C-STORE response" in first[0].message and "ended early" in first[1].message
    second = send_batch("AINODE", dest, items, DeliverySettings(dimse_timeout_s=30.0))
    assert [r.outcome for r in second] == [OK] * 3
    assert set(stored) == {str(pydicom.dcmread(i.path).SOPInstanceUID) for i in items}


def test_partly_refused_contexts_fail_only_those_items(peer, tmp_path: Path) -> None:
    dest, stored = peer(lambda ds, n: 0)  # DX only
    dx = _items(tmp_path, 1)
    ct_path = tmp_path / "ct.dcm"
    ds = pydicom.dcmread(dx[0].path)
    ds.SOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77"
    ds.save_as(ct_path, enforce_file_format=True)
    items = [Item(ct_path, ct_path, CTImageStorage, ExplicitVRLittleEndian), *dx]
    results = send_batch("AINODE", dest, items, DeliverySettings())
    assert [r.outcome for r in results] == [PERMANENT, OK]
    assert f"refused CT Image Storage ({CTImageStorage}) in Explicit VR Little Endian" in results[0].message, results[0].message
    assert len(stored) == 1
