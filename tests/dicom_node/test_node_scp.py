"""The Storage SCP against real senders (dcmtk storescu / echoscu, pynetdicom) over real sockets."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest
from nodekit import make_study, node_config, settings_from
from peers import dcmtk, echoscu, free_port, storescu, wait_for
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from dicom_node.db import Database
from dicom_node.scp import CANNOT_UNDERSTAND, StorageSCP
from dicom_node.storage import Store


@pytest.fixture
def scp(tmp_path: Path, request: pytest.FixtureRequest):
    """An in-process SCP (no pipeline) with its database and store."""
    opts = getattr(request, "param", {})
    settings = settings_from(node_config(tmp_path / "data", free_port(), **opts))
    db = Database(settings.data_dir / "node.sqlite")
    store = Store(settings.data_dir, durability=settings.node.durability)
    server = StorageSCP(settings, db, store)
    server.start()
    yield server
    server.stop()
    db.close()


def test_storescu_instance_is_stored_byte_exact_and_recorded(scp: StorageSCP, tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", "scp1", images=3)
    storescu(files, scp.port)
    rows = scp.db.query("SELECT * FROM instances ORDER BY sop_instance_uid")
    assert len(rows) == 3
    for path in files:
        src = pydicom.dcmread(path)
        row = scp.db.one("SELECT * FROM instances WHERE sop_instance_uid = ?", (src.SOPInstanceUID,))
        assert row is not None and row["calling_ae"] == "STORESCU" and row["modality"] == "DX"
        stored = pydicom.dcmread(row["path"])
        assert stored.PatientID == src.PatientID and stored.StudyInstanceUID == src.StudyInstanceUID
        assert stored.PixelData == src.PixelData
        assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
    study = scp.db.study(str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert study["state"] == "received" and study["instance_count"] == 3
    wait_for(lambda: scp.db.one("SELECT state FROM associations WHERE instances = 3")["state"] == "released",
             10, what="association recorded as released")
    # A resend of the same instances changes nothing: no new study generation.
    storescu(files, scp.port)
    assert scp.db.study(study["study_instance_uid"])["generation"] == 3


def test_tcp_nodelay_is_set_on_accepted_sockets(scp: StorageSCP) -> None:
    ae = AE(ae_title="NODELAYCHECK")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="AINODE")
    try:
        assert assoc.is_established
        server_side = wait_for(lambda: scp.active_associations, 5, what="server-side association")
        sock = server_side[0].dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        assoc.release()


@pytest.mark.parametrize("scp", [{"accept_any": False, "allow": [{"ae_title": "PACS"}]}], indirect=True)
def test_unknown_calling_ae_is_rejected_and_audited(scp: StorageSCP) -> None:
    bad = echoscu(scp.port, calling="INTRUDER")
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr or "Association Rejected" in bad.stderr, bad.stderr
    assert echoscu(scp.port, calling="PACS").returncode == 0
    row = scp.db.one("SELECT * FROM associations WHERE state = 'rejected'")
    assert row["calling_ae"] == "INTRUDER" and "not an allowed peer" in row["reason"]


@pytest.mark.parametrize("scp", [{"accept_any": False, "allow": [{"ae_title": "PACS", "host": "10.9.9.9"}]}],
                         indirect=True)
def test_allowed_ae_from_wrong_host_is_rejected(scp: StorageSCP) -> None:
    assert echoscu(scp.port, calling="PACS").returncode != 0
    # The record says where it is allowed from ("not an allowed peer" sent IT looking for a missing entry).
    row = wait_for(lambda: scp.db.one("SELECT reason FROM associations WHERE state = 'rejected'"), 5, what="recorded")
    assert row["reason"] == "calling AE 'PACS' connected from 127.0.0.1, but is allowed only from 10.9.9.9 (peers.allow)"



def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the node has closed (or reset) our end of the connection."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("scp", [{"max_associations": 2, "network_timeout_s": 2.0, "acse_timeout_s": 3.0}], indirect=True)
def test_connections_stalled_inside_a_pdu_are_closed_and_free_their_slots(scp: StorageSCP) -> None:
    """A PDU header announcing 1000 bytes, then silence, held a slot for ever (before the allow list; with a
    4 GiB length it was the same, now refused at once: see the next test)."""
    stalled = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(b"\x01\x00" + (1000).to_bytes(4, "big"))
        wait_for(lambda: all(_closed_by_peer(s) for s in stalled), 30, interval=0.2,
                 what="the stalled connections closed by the node")
        # Their association threads end at the ACSE timeout (no A-ASSOCIATE-RQ came): the slots come back.
        wait_for(lambda: echoscu(scp.port).returncode == 0, 20, interval=0.2, what="a C-ECHO accepted again")
    finally:
        for sock in stalled:
            sock.close()


def test_a_pdu_longer_than_the_node_reads_closes_the_connection_at_once(scp: StorageSCP) -> None:
    """A 600 MiB PDU (its length field, then zeros) grew the node's memory as the zeros arrived."""
    with socket.create_connection(("127.0.0.1", scp.port)) as sock:
        sock.sendall(b"\x01\x00" + (600 * 2**20).to_bytes(4, "big") + b"\x00" * 65536)
        wait_for(lambda: _closed_by_peer(sock), 10, interval=0.1, what="the oversized PDU's connection closed")
    wait_for(lambda: echoscu(scp.port).returncode == 0, 20, interval=0.2, what="a C-ECHO accepted again")

def _encode(ds: pydicom.Dataset) -> bytes:
    """The data set encoded Explicit VR Little Endian, without file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _send_raw(port: int, payload: bytes, sop_uid: str = "1.2.3.4.5.6.7", folder: Path | None = None,
              ts: str = ExplicitVRLittleEndian) -> int:
    """The status code of `_store_raw`."""
    return int(_store_raw(port, payload, sop_uid, folder, ts).Status)


def _store_raw(port: int, payload: bytes, sop_uid: str = "1.2.3.4.5.6.7", folder: Path | None = None,
               ts: str = ExplicitVRLittleEndian) -> pydicom.Dataset:
    """C-STORE `payload` as the data set, bytes exactly as given (pynetdicom streams a file's body unparsed
    when STORE_SEND_CHUNKED_DATASET is on, so the file holds valid file meta and then `payload`); the status."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(fp, meta)
    path = Path(tempfile.mkstemp(suffix=".dcm", dir=folder)[1])
    path.write_bytes(fp.getvalue() + payload)
    ae = AE(ae_title="RAWSENDER")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
        path.unlink()


def test_malformed_and_truncated_data_sets_are_refused_and_node_stays_up(scp: StorageSCP, tmp_path: Path) -> None:
    # Garbage: a tag claiming a value longer than the data set.
    assert _send_raw(scp.port, b"\x08\x00\x18\x00UI\xff\x00" + b"1.2" + b"\x00" * 3) == CANNOT_UNDERSTAND
    # A real image cut in the middle of its pixel data.
    path = make_study(tmp_path / "in", "trunc", images=1)[0]
    ds = pydicom.dcmread(path)
    encoded = _encode(ds)
    status = _store_raw(scp.port, encoded[: len(encoded) - 5000], str(ds.SOPInstanceUID))
    assert status.Status == CANNOT_UNDERSTAND
    # The sender is told why, not only that (Error Comment; LO, 64 characters).
    assert status.ErrorComment.startswith("Pixel Data declares") and len(status.ErrorComment) <= 64
    # Identity missing entirely.
    empty = pydicom.Dataset()
    empty.Modality = "DX"
    status = _store_raw(scp.port, _encode(empty))
    assert status.Status == CANNOT_UNDERSTAND and status.ErrorComment.startswith("data set lacks SOPClassUID")
    assert scp.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 0
    assert scp.db.query("SELECT sum(failures) AS n FROM associations")[0]["n"] == 3
    # The node is alive and still stores good data.
    assert echoscu(scp.port).returncode == 0
    storescu([path], scp.port)
    assert scp.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 1



def _store(port: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_a_known_instance_uid_in_another_study_was_moved_there_and_leaves_the_first_study(
        scp: StorageSCP, tmp_path: Path) -> None:
    """A misfiled film split off into its own patient's study keeps its SOP Instance UID. Refusing it (as the
    node did) left the first study's results reading another patient's film, and the right study unanalysed:
    one UID names one instance, so the last study it arrives in is where it is."""
    first, kept = make_study(tmp_path / "a", "dup-a", images=2)
    storescu([first, kept], scp.port)
    study_uid = str(pydicom.dcmread(first).StudyInstanceUID)
    held = scp.db.one("SELECT * FROM instances WHERE sop_instance_uid = ?", (str(pydicom.dcmread(first).SOPInstanceUID),))
    other = pydicom.dcmread(first)
    other.StudyInstanceUID = other.StudyInstanceUID + ".9"
    other.PatientID, other.PatientName = "SOMEONE-ELSE", "ELSE^SOMEONE"
    assert _store(scp.port, other).Status == 0
    moved = scp.db.one("SELECT * FROM instances WHERE sop_instance_uid = ?", (held["sop_instance_uid"],))
    assert moved["study_instance_uid"] == str(other.StudyInstanceUID) and pydicom.dcmread(moved["path"]).PatientID == "SOMEONE-ELSE"
    assert not Path(held["path"]).exists()  # the first study holds no copy of it
    assert [r["sop_instance_uid"] for r in scp.db.source_instances(study_uid)] == [str(pydicom.dcmread(kept).SOPInstanceUID)]
    assert scp.db.study(study_uid)["state"] == "received" and scp.db.study(study_uid)["instance_count"] == 1
    assert scp.db.one("SELECT actor, detail FROM audit_events WHERE action = 'moved'") == {
        "actor": "PYNETDICOM", "detail": f"moved to study {other.StudyInstanceUID} by the sender"}
    # An output of ours under another study's UID is no move: its UID names only the object the node made.
    own = pydicom.dcmread(kept)
    own.StudyInstanceUID = study_uid + ".8"
    with mock.patch.object(scp.db, "is_known_output", return_value=True):
        status = _store(scp.port, own)
    assert status.Status == CANNOT_UNDERSTAND and status.ErrorComment.startswith("SOPInstanceUID already held in another study")


def test_two_associations_sending_one_instance_under_two_studies_leave_every_record_with_its_file(
        scp: StorageSCP, tmp_path: Path) -> None:
    """Each C-STORE of a SOP Instance UID decides from what it finds held (same study, or moved from another)
    and, for a move, removes the old file after recording: one of the same UID from another association in
    between deleted a live file or left one no record names. They take turns now."""
    x, k = make_study(tmp_path / "a", "race", images=2)
    storescu([x, k], scp.port)
    s1 = str(pydicom.dcmread(x).StudyInstanceUID)
    moved = pydicom.dcmread(x)
    moved.StudyInstanceUID = s1 + ".9"
    real, other, results = scp.db.record_instance, [], []
    reached, moved_in = threading.Event(), threading.Event()

    def record_then_race(rec, moves=None):  # noqa: ANN001, ANN202
        if other:  # the second C-STORE: it got this far (before, it did while the move was still unrecorded)
            reached.set()
            moved_in.wait(30)
            return real(rec, moves)
        # The move is about to be recorded: the same instance arrives under its first study again, and is given
        # the time to reach its own recording (it cannot while the move holds the instance: then this waits out).
        other.append(threading.Thread(target=lambda: results.append(_store(scp.port, pydicom.dcmread(x)).Status)))
        other[0].start()
        reached.wait(3)
        try:
            return real(rec, moves)
        finally:
            moved_in.set()

    with mock.patch.object(scp.db, "record_instance", record_then_race):
        assert _store(scp.port, moved).Status == 0
        other[0].join(60)
    assert results == [0]
    on_record = {r["path"] for r in scp.db.query("SELECT path FROM instances")}
    assert all(Path(p).exists() for p in on_record)
    assert {str(p) for p in (tmp_path / "data" / "instances").rglob("*.dcm")} == on_record
    assert scp.db.instance_study(str(moved.SOPInstanceUID)) == s1  # the last one to arrive


def test_a_new_instance_of_another_patient_in_a_study_is_refused_and_a_corrected_resend_reopens_it(
        scp: StorageSCP, tmp_path: Path) -> None:
    """A misfiled image (or, after retention forgot a study's instances, a reused Study UID) would put two
    patients in one study: in its outputs, or as the predecessor of another patient's report."""
    first, second = make_study(tmp_path / "a", "mixed", images=2)
    storescu([first], scp.port)
    study_uid = str(pydicom.dcmread(first).StudyInstanceUID)
    misfiled = pydicom.dcmread(second)
    misfiled.PatientID, misfiled.PatientName = "SOMEONE-ELSE", "ELSE^SOMEONE"
    status = _store(scp.port, misfiled)
    assert status.Status == CANNOT_UNDERSTAND
    assert status.ErrorComment.startswith("PatientID differs from the study's other instances")
    assert scp.db.study(study_uid)["instance_count"] == 1
    assert not any("SOMEONE" in str(pydicom.dcmread(p).PatientID) for p in (tmp_path / "data").rglob("*.dcm"))
    assert "SOMEONE" not in str(scp.db.query("SELECT * FROM instances")) + str(scp.db.query("SELECT * FROM studies"))
    assert _store(scp.port, pydicom.dcmread(second)).Status == 0  # the study's own patient: taken
    # The sender corrects the patient of the whole study: the re-sent instances are taken, the study re-opens.
    assert scp.db.mark_complete(study_uid)
    generation = scp.db.claim_study(study_uid)  # being analysed when the correction arrives
    assert generation is not None
    for path in (first, second):
        corrected = pydicom.dcmread(path)
        corrected.PatientID = "CORRECTED-1"
        assert _store(scp.port, corrected).Status == 0
    study = scp.db.study(study_uid)
    assert study["state"] == "received" and study["generation"] > generation and study["instance_count"] == 2
    # Retention forgets the instances, not the study's patient.
    scp.db.forget_instances(study_uid)
    assert _store(scp.port, pydicom.dcmread(second)).Status == CANNOT_UNDERSTAND  # the old identity now


def test_a_resend_reopens_its_study_only_when_the_identity_its_outputs_copy_changed(
        scp: StorageSCP, tmp_path: Path) -> None:
    path = make_study(tmp_path / "a", "resend", images=1)[0]
    study_uid = str(pydicom.dcmread(path).StudyInstanceUID)
    assert _store(scp.port, pydicom.dcmread(path)).Status == 0
    assert scp.db.mark_complete(study_uid)
    generation = scp.db.claim_study(study_uid)
    assert _store(scp.port, pydicom.dcmread(path)).Status == 0  # the same instance again: nothing to redo
    assert scp.db.study(study_uid)["state"] == "analysing" and scp.db.study(study_uid)["generation"] == generation
    corrected = pydicom.dcmread(path)
    corrected.AccessionNumber = "ACC-FIXED"  # the order was corrected in the RIS; the outputs copy it
    assert _store(scp.port, corrected).Status == 0
    study = scp.db.study(study_uid)
    assert study["state"] == "received" and study["generation"] > generation
    # The database holds a keyed digest of it, never the values, and does not hand it out.
    assert "ACC-FIXED" not in str(scp.db.db.query("SELECT * FROM instances"))
    assert all("identity_key" not in row for row in scp.db.query("SELECT * FROM instances"))


def test_a_corrected_name_of_an_instance_held_from_before_identity_keys_is_seen(scp: StorageSCP, tmp_path: Path) -> None:
    """Instances stored by an earlier version (or before the key secret changed) have no identity key: the SCP
    takes the held file's before the re-send replaces it."""
    path = make_study(tmp_path / "a", "legacy", images=1)[0]
    study_uid = str(pydicom.dcmread(path).StudyInstanceUID)
    assert _store(scp.port, pydicom.dcmread(path)).Status == 0
    with scp.db.tx() as db:
        db.execute("UPDATE instances SET identity_key = NULL")
    assert scp.db.mark_complete(study_uid)
    generation = scp.db.claim_study(study_uid)
    assert _store(scp.port, pydicom.dcmread(path)).Status == 0  # the same again: still nothing to redo
    assert scp.db.study(study_uid)["state"] == "analysing"
    corrected = pydicom.dcmread(path)
    corrected.PatientName = "RIGHT^NAME"
    assert _store(scp.port, corrected).Status == 0
    assert scp.db.study(study_uid)["state"] == "received" and scp.db.study(study_uid)["generation"] > generation


@pytest.mark.parametrize("study_uid", ["hello/world?x#y", "../../../../tmp/pwned", "1.2.3.4.700.é", "1." + "2" * 70])
def test_a_study_uid_that_is_not_a_uid_is_refused(scp: StorageSCP, tmp_path: Path, study_uid: str) -> None:
    ds = pydicom.dcmread(make_study(tmp_path / "in", "baduid", images=1)[0])
    ds.StudyInstanceUID = "1.2.3"  # replaced in the raw bytes below: pydicom would refuse to write some of these
    raw = _encode(ds).replace(b"\x20\x00\x0d\x00UI\x06\x001.2.3\x00", _uid_element(study_uid))
    status = _store_raw(scp.port, raw, str(ds.SOPInstanceUID))
    assert status.Status == CANNOT_UNDERSTAND  # not 0xA700, which a sender would retry for ever
    assert status.ErrorComment == "StudyInstanceUID is not a UID (digits and dots, at most 64)"
    assert scp.db.one("SELECT count(*) AS n FROM instances")["n"] == 0


def _uid_element(value: str) -> bytes:
    """(0020,000D) Study Instance UID, Explicit VR Little Endian, with `value`'s UTF-8 bytes as they are."""
    data = value.encode("utf-8")
    data += b"\x00" * (len(data) % 2)
    return b"\x20\x00\x0d\x00UI" + len(data).to_bytes(2, "little") + data

def test_disk_failure_answers_out_of_resources(scp: StorageSCP, tmp_path: Path) -> None:
    files = make_study(tmp_path / "in", "diskfail", images=1)
    scp.store.tmp.rmdir()  # a file where the tmp folder was makes every write fail (a deleted folder is made again)
    scp.store.tmp.write_bytes(b"")
    assert _store(scp.port, pydicom.dcmread(files[0])).Status == 0xA700
    scp.store.tmp.unlink()
    scp.store.tmp.mkdir()
    storescu(files, scp.port)
    assert scp.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 1


def test_an_instance_the_database_cannot_record_leaves_no_file_but_an_earlier_copy_stays(
        scp: StorageSCP, tmp_path: Path, monkeypatch) -> None:
    import sqlite3

    first, second = make_study(tmp_path / "in", "dbfull", images=2)
    storescu([first], scp.port)
    held = Path(scp.db.one("SELECT path FROM instances")["path"])

    def full(rec: Any) -> bool:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(scp.db, "record_instance", full)
    assert _store(scp.port, pydicom.dcmread(second)).Status == 0xA700
    assert sorted(p.name for p in (tmp_path / "data").rglob("*.dcm")) == [held.name]  # no orphan
    assert _store(scp.port, pydicom.dcmread(first)).Status == 0xA700  # a re-send of a stored instance
    assert held.is_file()  # its acknowledged copy is not deleted


@pytest.mark.slow
def test_eight_concurrent_associations_of_fifty_instances(scp: StorageSCP, tmp_path: Path) -> None:
    batches = [make_study(tmp_path / f"c{k}", f"conc{k}", images=50, rows=64, columns=64) for k in range(8)]
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"SENDER{k}", "-aec", "AINODE", "-R", "127.0.0.1", str(scp.port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, files in enumerate(batches)]
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=240)
        if p.returncode != 0:
            errors.append(err[-500:])
    assert not errors, errors
    assert scp.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 400
    assert scp.db.query("SELECT count(*) AS n FROM studies")[0]["n"] == 8
    assert {r["instances"] for r in scp.db.query("SELECT instances FROM associations")} == {50}
    assert scp.db.query("SELECT sum(failures) AS n FROM associations")[0]["n"] == 0


def _compressed_copies(src: Path, out: Path) -> dict[str, Path]:
    """JPEG 2000 (pydicom + openjpeg), RLE (pydicom), JPEG-LS and JPEG lossless (dcmtk) versions of `src`."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, uid in (("j2k", JPEG2000Lossless), ("rle", RLELossless)):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{len(made) + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.compress(uid)
        made[name] = out / f"{name}.dcm"
        ds.save_as(made[name], enforce_file_format=True)
    for name, tool, k in (("jls", "dcmcjpls", 3), ("jpeg", "dcmcjpeg", 4)):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        plain = out / f"{name}-plain.dcm"
        ds.save_as(plain, enforce_file_format=True)
        made[name] = out / f"{name}.dcm"
        subprocess.run([tool, str(plain), str(made[name])], check=True, capture_output=True)
    return made


def test_compressed_inputs_are_stored_as_sent_and_decodable(scp: StorageSCP, tmp_path: Path) -> None:
    src = make_study(tmp_path / "in", "comp", images=1)[0]
    original = pydicom.dcmread(src).pixel_array
    copies = _compressed_copies(src, tmp_path / "compressed")
    # storescu proposes a compressed syntax only when told to: one association per encoding.
    propose = {"j2k": "-xv", "rle": "-xr", "jls": "-xt", "jpeg": "-xs"}
    for name, path in copies.items():
        storescu([path], scp.port, extra=[propose[name]])
    for name, path in copies.items():
        sent = pydicom.dcmread(path)
        row = scp.db.one("SELECT * FROM instances WHERE sop_instance_uid = ?", (str(sent.SOPInstanceUID),))
        assert row is not None, name
        assert row["transfer_syntax_uid"] == str(sent.file_meta.TransferSyntaxUID), name
        assert sent.file_meta.TransferSyntaxUID.is_compressed, name
        stored = pydicom.dcmread(row["path"])
        assert (stored.pixel_array == original).all(), f"{name} did not decode to the original pixels"


def test_verification_and_concurrent_echo(scp: StorageSCP) -> None:
    results = []

    def run() -> None:
        results.append(echoscu(scp.port).returncode)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0, 0, 0]


@pytest.mark.parametrize("calling", ["STORESCU", "MOD", ""])
def test_file_meta_matches_pydicom(calling: str) -> None:
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    from dicom_node.scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, _file_meta

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if calling:
        meta.SourceApplicationEntityTitle = calling
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    ours = _file_meta(DigitalXRayImageStorageForPresentation, "1.2.826.0.1.3680043.2.1125.1",
                      UID(ExplicitVRLittleEndian), calling)
    assert ours == fp.getvalue()


def test_wrong_called_ae_is_rejected(scp: StorageSCP) -> None:
    proc = echoscu(scp.port, called="SOMEONEELSE")
    assert proc.returncode != 0 and "Called AE Title Not Recognized" in proc.stderr, proc.stderr
    row = wait_for(lambda: scp.db.one("SELECT * FROM associations WHERE state = 'rejected'"), 5, what="recorded")
    assert row["called_ae"] == "SOMEONEELSE"
    assert row["reason"] == f"called AE title not recognised: it asked for 'SOMEONEELSE', this node is {scp.settings.node.ae_title!r}"


@pytest.mark.parametrize("scp", [{"max_associations": 1}], indirect=True)
def test_association_limit_rejects_transiently(scp: StorageSCP) -> None:
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", scp.port, ae_title="AINODE")
    try:
        assert held.is_established
        wait_for(lambda: scp.active_associations, 5, what="first association active")
        second = AE(ae_title="SECOND")
        second.add_requested_context("1.2.840.10008.1.1")
        assoc = second.associate("127.0.0.1", scp.port, ae_title="AINODE")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, local limit exceeded
        # Recorded, so the audit trail and /metrics show senders turned away.
        row = wait_for(lambda: scp.db.one("SELECT * FROM associations WHERE state = 'rejected'"), 5,
                       what="the rejection recorded")
        assert row["calling_ae"] == "SECOND" and "local limit exceeded" in row["reason"]
    finally:
        held.release()
    assert echoscu(scp.port).returncode == 0


@pytest.mark.parametrize("scp", [{"max_associations": 2, "acse_timeout_s": 120.0}], indirect=True)
def test_connections_closed_before_associating_free_their_slots_at_once(scp: StorageSCP) -> None:
    """Port probes and load-balancer health checks (connect, close): each held a slot for acse_timeout_s."""
    for _ in range(10):
        socket.create_connection(("127.0.0.1", scp.port)).close()
    wait_for(lambda: not scp.active_associations, 10, what="the probes' slots freed")
    assert echoscu(scp.port).returncode == 0


def test_fast_polling_while_storing_relaxed_when_idle(scp: StorageSCP, tmp_path: Path) -> None:
    from dicom_node.scp import ACTIVE_POLL_S, IDLE_AFTER_S, IDLE_POLL_S

    path = make_study(tmp_path / "in", "poll", images=1)[0]
    ae = AE(ae_title="POLLCHECK")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="AINODE")
    try:
        server_side = wait_for(lambda: scp.active_associations, 5, what="server-side association")[0]
        assert server_side.dul._run_loop_delay == IDLE_POLL_S
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        assert server_side.dul._run_loop_delay == ACTIVE_POLL_S
        # Times relative to the last store, not the clock: a loaded machine must not make it idle already.
        last = server_side.node_last_store
        assert scp.relax_idle_associations(now=last + IDLE_AFTER_S / 2) == 0
        assert scp.relax_idle_associations(now=last + IDLE_AFTER_S + 1) == 1
        assert server_side.dul._run_loop_delay == IDLE_POLL_S
    finally:
        assoc.release()


def test_truncated_compressed_pixel_data_is_refused(scp: StorageSCP, tmp_path: Path) -> None:
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(make_study(tmp_path / "in", "j2ktrunc", images=1)[0])
    ds.compress(JPEG2000Lossless)
    encoded = _encode(ds)
    assert encoded.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # the sequence delimiter
    sop = str(ds.SOPInstanceUID)
    assert _send_raw(scp.port, encoded[:-300], sop, ts=JPEG2000Lossless) == CANNOT_UNDERSTAND
    assert _send_raw(scp.port, encoded, sop, ts=JPEG2000Lossless) == 0
    stored = pydicom.dcmread(scp.db.one("SELECT path FROM instances")["path"])
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless and stored.pixel_array.shape == (128, 96)


def test_deflated_input_is_stored_and_readable(scp: StorageSCP, tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = make_study(tmp_path / "in", "deflate", images=1)[0]
    ds = pydicom.dcmread(src)
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, implicit_vr=False, little_endian=True, enforce_file_format=True)
    ds = pydicom.dcmread(deflated)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    storescu([deflated], scp.port, extra=["-xd"])
    row = scp.db.one("SELECT * FROM instances")
    assert row["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian and row["modality"] == "DX"
    assert (pydicom.dcmread(row["path"]).pixel_array == pydicom.dcmread(src).pixel_array).all()



def test_a_deflated_data_set_that_expands_beyond_the_limit_is_refused(
        scp: StorageSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a megabyte of deflated zeros expands to a gigabyte, and the node held twice that while reading."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from dicom_node import scp as scp_module

    monkeypatch.setattr(scp_module, "MAX_INFLATED_BYTES", 2**20)  # the same check, at a test's size
    ds = pydicom.dcmread(make_study(tmp_path / "in", "bomb", images=1, rows=1024, columns=1024)[0])
    ds.PixelData = bytes(len(ds.PixelData))  # 2 MiB of zeros
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = packer.compress(_encode(ds)) + packer.flush()
    assert len(payload) < 2**20
    status = _store_raw(scp.port, payload, str(ds.SOPInstanceUID), ts=DeflatedExplicitVRLittleEndian)
    assert status.Status == CANNOT_UNDERSTAND and status.ErrorComment == "deflated data set expands beyond 1 MiB"
    assert scp.db.one("SELECT count(*) AS n FROM instances")["n"] == 0

def test_a_released_association_is_recorded_released_whichever_event_comes_first(scp: StorageSCP) -> None:
    """pynetdicom reports the peer closing the connection (its DUL thread) and the release (its association
    thread) independently; under load the close came first and a clean release was recorded as an abort.
    After the node has answered the release (state Sta13) the close leaves the verdict to the release event;
    a connection that drops while established (Sta6) is an abort."""
    from types import SimpleNamespace

    def event(state: str) -> SimpleNamespace:
        aid = scp.db.open_association("MODALITY", "AINODE", "127.0.0.1", 104)
        dul = SimpleNamespace(state_machine=SimpleNamespace(current_state=state))
        return SimpleNamespace(assoc=SimpleNamespace(node_association_id=aid, dul=dul, is_established=True,
                                                     requestor=SimpleNamespace(primitive=object())))

    def state(ev: SimpleNamespace) -> str:
        return scp.db.one("SELECT state FROM associations WHERE id = ?", (ev.assoc.node_association_id,))["state"]

    released = event("Sta13")
    scp._on_conn_close(released)
    assert state(released) == "open"
    scp._on_released(released)
    assert state(released) == "released"
    scp._on_conn_close(released)  # recorded once
    assert state(released) == "released"

    dropped = event("Sta6")
    scp._on_conn_close(dropped)
    assert state(dropped) == "aborted"


def test_a_long_reason_is_cut_at_a_word_in_the_error_comment() -> None:
    """64 characters of Error Comment cut '3048448 bytes' to '304844': the sender read a wrong number."""
    from dicom_node.scp import failure

    reason = "Pixel Data too short: 1000 of 3048448 bytes (1024x1488x1x1x16 bits) in the received data set"
    comment = failure(CANNOT_UNDERSTAND, reason).ErrorComment
    assert len(comment) <= 64 and comment.endswith("...") and "3048448" in comment
    assert comment == "Pixel Data too short: 1000 of 3048448 bytes..."


def test_the_identity_digest_ignores_padding_and_empty_name_components_only() -> None:
    from pydicom.dataset import Dataset

    from dicom_node.scp import _identity_key

    def key(**values: str) -> str:
        ds = Dataset()
        for keyword, value in {"PatientID": "ID1", "PatientName": "DOE^JOHN", **values}.items():
            setattr(ds, keyword, value)
        return _identity_key(b"secret", "1.2.3", ds)

    assert key() == key(PatientName="DOE^JOHN^^=") == key(PatientID="ID1 ")
    assert len({key(), key(PatientName="DOE^JANE"), key(AccessionNumber="A1"), key(PatientSex="F"),
                key(PatientBirthDate="19600101"), key(IssuerOfPatientID="HOSP")}) == 6
    assert key(PatientAge="071Y") == key()  # not an identity correction
