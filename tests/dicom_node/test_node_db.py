"""The node database: migrations, state machine, recovery, concurrency."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dicom_node.db import MAX_INTERRUPTED_ANALYSES, MIGRATIONS, Database, InstanceRecord

if TYPE_CHECKING:
    from dicom_node.pipeline import Pipeline


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "node.sqlite", synchronous_full=False)
    yield d
    d.close()


def rec(sop: str, study: str = "1.2.3", assoc: int | None = None, own: bool = False) -> InstanceRecord:
    return InstanceRecord(sop, study, study + ".1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1", "DX",
                          "LSPINE", "LL", "", "", "ORIGINAL\\PRIMARY", "MOD", assoc, f"/x/{sop}.dcm", 10, own)


def test_migrations_are_recorded_and_idempotent(db: Database) -> None:
    assert db.schema_version() == len(MIGRATIONS)
    assert db.migrate() == []
    assert db.one("SELECT journal_mode AS m FROM pragma_journal_mode")["m"] == "wal"


def test_study_state_machine_and_generation_guard(db: Database) -> None:
    assert db.record_instance(rec("1.1")) and not db.record_instance(rec("1.1"))
    assert db.study("1.2.3")["generation"] == 1
    assert db.mark_complete("1.2.3")
    gen = db.claim_study("1.2.3")
    assert gen == 1 and db.claim_study("1.2.3") is None
    # A new instance while analysing re-opens the study; the stale analysis may not close it.
    db.record_instance(rec("1.2"))
    assert not db.finish_study("1.2.3", gen, "encoded")
    assert db.study("1.2.3")["state"] == "received"
    db.mark_complete("1.2.3")
    gen2 = db.claim_study("1.2.3")
    assert gen2 == 2 and db.finish_study("1.2.3", gen2, "encoded")



def test_an_instance_arriving_in_another_study_moves_there_and_the_first_study_is_answered(db: Database) -> None:
    """The sender split a misfiled film off, or merged two studies: the first study loses the instance, its
    results (which read it) are superseded like those of a corrected identity, and it is analysed again without
    it; with nothing left it ends unrouted. A move into another patient's study is refused and changes nothing."""
    from dicom_node.db import MOVED_AWAY
    from dicom_node.errors import InstanceConflict

    db.record_instance(_identified("1.1", "A"))
    db.record_instance(_identified("1.2", "A"))
    first = _analysed(db, "1.2.3", ["1.1", "1.2"], 0)
    delivery = db.one("SELECT id FROM deliveries")["id"]
    db.mark_sending([delivery])
    db.mark_delivered(delivery, 0)
    db.record_instance(dataclasses.replace(_identified("9.9", "C", study="7.7.7"), patient_key="q"))
    with pytest.raises(InstanceConflict, match="PatientID differs"):
        db.record_instance(_identified("1.1", "A", study="7.7.7"))  # into another patient's study: refused
    assert db.instance_study("1.1") == "1.2.3" and db.identity_epoch("1.2.3") == 0
    assert db.record_instance(_identified("1.1", "B", study="4.5.6"))
    assert db.instance_study("1.1") == "4.5.6" and db.study("4.5.6")["state"] == "received"
    study = db.study("1.2.3")
    assert (study["state"], study["instance_count"], db.identity_epoch("1.2.3")) == ("received", 1, 1)
    assert [r["id"] for r in db.superseded_deliveries("1.2.3")] == [delivery]  # the PACS holds it: answered
    assert db.one("SELECT reason FROM jobs WHERE id = ?", (first["id"],))["reason"].startswith("superseded")
    # Its last instance moved as well: nothing to analyse; the earlier results stay answered.
    assert db.record_instance(_identified("1.2", "B", study="4.5.6"))
    assert (db.study("1.2.3")["state"], db.study("1.2.3")["reason"]) == ("unrouted", MOVED_AWAY)
    assert db.source_instances("1.2.3") == [] and len(db.source_instances("4.5.6")) == 2
    assert [e["target"] for e in db.audit_events(kinds=["action"])] == ["1.1", "1.2"]
    assert db.purge_outputs(time.time() + 1) == ["/o/x.dcm"]  # its outputs go with retention, as a settled study's
    # A node's own output never moves: its UID names the object the node made.
    db.record_instance(rec("8.8", study="4.5.6", own=True))
    with pytest.raises(InstanceConflict, match="already held in another study"):
        db.record_instance(rec("8.8", study="1.2.3", own=True))
    assert not db.record_instance(_identified("1.1", "B", study="4.5.6"))  # a resend in its own study
    # No output UID is taken over by another study's job (its PACS copy would be that study's).
    db.mark_complete("4.5.6")
    gen = db.claim_study("4.5.6")
    job = db.start_job("4.5.6", "a", "r", "key-moved", gen, 0)
    taken = {"sop_instance_uid": first["output"], "study_instance_uid": "4.5.6", "series_instance_uid": "5",
             "sop_class_uid": "x", "transfer_syntax_uid": "y", "kind": "sr", "variant": "any", "path": "/o/y.dcm", "size": 1}
    with pytest.raises(ValueError, match="already one of study 1.2.3"):
        db.record_outputs(job["id"], {"analysis": "a"}, [taken], [], generation=gen)


def test_own_outputs_do_not_open_studies(db: Database) -> None:
    db.record_instance(rec("9.9", study="7.7", own=True))
    assert db.study("7.7") is None


def _job_with_delivery(db: Database) -> tuple[int, int]:
    db.record_instance(rec("1.1"))
    db.mark_complete("1.2.3")
    gen = db.claim_study("1.2.3")
    job = db.start_job("1.2.3", "a", "r", "key", gen)
    out = {"sop_instance_uid": "5.5", "study_instance_uid": "1.2.3", "series_instance_uid": "5", "sop_class_uid": "x",
           "transfer_syntax_uid": "y", "kind": "sr", "variant": "any", "path": "/o/5.5.dcm", "size": 1}
    assert db.record_outputs(job["id"], {"analysis": "a"}, [out], [("5.5", "pacs")]) == 1
    db.finish_study("1.2.3", gen, "encoded")
    return job["id"], db.one("SELECT id FROM deliveries")["id"]



def test_a_study_the_node_keeps_dying_on_is_failed_at_the_third_restart_and_retry_runs_it_again(db: Database) -> None:
    """kill -9 (or the OOM killer) during an analysis: the study is analysed again at start, but a study that
    takes the node down every time would make a restart loop without end."""
    db.record_instance(rec("1.1"))
    db.mark_complete("1.2.3")
    for restart in range(1, MAX_INTERRUPTED_ANALYSES):
        assert db.claim_study("1.2.3") is not None
        assert db.recover()["studies_reanalysed"] == 1
        assert db.study("1.2.3")["state"] == "complete" and db.study("1.2.3")["interrupted"] == restart
    db.claim_study("1.2.3")
    assert db.recover()["studies_failed_after_interruptions"] == 1
    study = db.study("1.2.3")
    assert study["state"] == "failed" and study["reason"].startswith(f"analysis interrupted {MAX_INTERRUPTED_ANALYSES} times")
    assert "dicom-node retry" in study["reason"]
    assert db.requeue_failed_studies() == 1
    assert db.study("1.2.3")["state"] == "complete" and db.study("1.2.3")["interrupted"] == 0
    # An analysis that ends (here: fails on its own) clears the count: only interruptions in a row count.
    gen = db.claim_study("1.2.3")
    db.recover()
    gen = db.claim_study("1.2.3")
    assert db.finish_study("1.2.3", gen, "failed", "bad pixels")
    assert db.study("1.2.3")["interrupted"] == 0

def test_recovery_after_crash_resends_and_settles(db: Database) -> None:
    _, delivery = _job_with_delivery(db)
    db.mark_sending([delivery])
    assert db.recover()["deliveries_resent"] == 1
    assert db.one("SELECT state FROM deliveries")["state"] == "pending"
    # Killed between the last delivery and the study update: settling at start closes the study.
    db.mark_delivered(delivery, 0)
    assert db.study("1.2.3")["state"] == "encoded"
    db.settle_delivered_studies()
    assert db.study("1.2.3")["state"] == "delivered"
    assert db.one("SELECT state FROM jobs")["state"] == "delivered"


def test_failed_delivery_fails_study_and_retry_requeues(db: Database) -> None:
    _, delivery = _job_with_delivery(db)
    db.mark_sending([delivery])
    db.mark_failed(delivery, "association rejected permanently", None)
    db.settle_delivered_studies()
    assert db.study("1.2.3")["state"] == "failed" and "rejected permanently" in db.study("1.2.3")["reason"]
    # The analysis did not fail: its job stays encoded (a PACS outage must not read as failed analyses).
    assert db.one("SELECT state FROM jobs")["state"] == "encoded"
    assert db.queue_depth()[0]["failed"] == 1
    assert db.requeue_failed() == 1
    assert db.study("1.2.3")["state"] == "encoded"
    assert db.one("SELECT state, attempts FROM deliveries") == {"state": "pending", "attempts": 0}
    db.mark_sending([delivery])
    db.mark_delivered(delivery, 0)
    db.settle_delivered_studies()
    assert db.study("1.2.3")["state"] == "delivered" and db.one("SELECT state FROM jobs")["state"] == "delivered"
    # An operator asks for a re-analysis: the job it replaces is superseded, not failed, in the metrics.
    assert db.request_reanalysis("1.2.3") is None
    assert db.job_counts() == [{"analysis": "a", "state": "superseded", "n": 1}]


def test_a_second_identical_job_is_not_run_again(db: Database) -> None:
    job_id, _ = _job_with_delivery(db)
    again = db.start_job("1.2.3", "a", "r", "key", 1)
    assert again["id"] == job_id and again["state"] == "encoded"


def test_concurrent_writers_never_see_database_is_locked(tmp_path: Path) -> None:
    db = Database(tmp_path / "c.sqlite")
    errors: list[Exception] = []

    def writer(k: int) -> None:
        try:
            aid = db.open_association(f"S{k}", "AINODE", "127.0.0.1", 1000 + k)
            for i in range(50):
                db.record_instance(rec(f"{k}.{i}", study=f"9.{k}", assoc=aid))
            db.end_association(aid, "released")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert db.one("SELECT count(*) AS n FROM instances")["n"] == 400
    assert db.study_counts()["received"] == 8
    db.close()


def _version_one_database(path: Path) -> sqlite3.Connection:
    """A database as the first release of the node left it (open, for the test to change further)."""
    from dicom_node.db import _statements

    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
    for stmt in _statements(MIGRATIONS[0][1]):
        con.execute(stmt)
    con.execute("INSERT INTO schema_migrations VALUES (1, 'initial schema', 0)")
    con.commit()
    return con


def test_second_migration_applies_to_a_version_one_database(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _version_one_database(path).close()
    db = Database(path)
    assert db.schema_version() == len(MIGRATIONS)
    assert "purged_at" in {r["name"] for r in db.query("SELECT name FROM pragma_table_info('outputs')")}
    db.close()


def test_read_only_opening_reads_beside_a_writer_and_never_writes(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.errors import DatabaseError

    path = tmp_path / "node.sqlite"
    node = Database(path)
    node.record_instance(rec("1.1"))
    node.close()  # a stopped node: SQLite has removed its WAL files
    looking = Database(path, read_only=True)
    assert looking.study("1.2.3")["instance_count"] == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        looking.db.conn.execute("DELETE FROM studies")
    node = Database(path)
    with node.tx() as conn:  # a running node in the middle of a write
        conn.execute("UPDATE studies SET instance_count = 5")
        assert Database(path, read_only=True, busy_timeout_s=0.5).study("1.2.3")["instance_count"] == 1
    assert looking.study("1.2.3")["instance_count"] == 5
    looking.close()
    node.close()
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # not a node database: said so, not created
    with pytest.raises(DatabaseError, match="no such table"):
        Database(empty, read_only=True)


def test_read_only_opening_refuses_a_schema_of_another_version(tmp_path: Path) -> None:
    from dicom_node.errors import DatabaseError

    path = tmp_path / "old.sqlite"
    con = _version_one_database(path)
    with pytest.raises(DatabaseError, match=f"schema version 1, this dicom-node reads {len(MIGRATIONS)}"):
        Database(path, read_only=True)
    con.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    con.commit()
    con.close()
    with pytest.raises(DatabaseError, match="written by a newer dicom-node"):
        Database(path, read_only=True)


def test_output_retention_keeps_rows_of_purged_files(db: Database) -> None:
    import time

    job_id, delivery = _job_with_delivery(db)
    assert db.purge_outputs(time.time() + 1) == []  # still to be delivered: kept
    db.mark_delivered(delivery, 0)
    db.settle_delivered_studies()
    assert db.purge_outputs(time.time() + 1) == ["/o/5.5.dcm"]
    assert db.purge_outputs(time.time() + 1) == []
    assert db.is_known_output("5.5")


def test_a_study_whose_instances_are_purged_is_not_offered_to_retention_again(db: Database) -> None:
    import time

    _, delivery = _job_with_delivery(db)
    db.mark_delivered(delivery, 0)
    db.settle_delivered_studies()
    assert db.purgeable_studies(time.time() + 1) == ["1.2.3"]
    assert db.forget_instances("1.2.3")
    assert db.purgeable_studies(time.time() + 1) == []


def test_outputs_whose_delivery_failed_are_kept_for_retry(db: Database) -> None:
    import time

    _, delivery = _job_with_delivery(db)
    db.mark_sending([delivery])
    db.mark_failed(delivery, "PACS down for hours", None)
    db.settle_delivered_studies()
    assert db.study("1.2.3")["state"] == "failed"
    assert db.purge_outputs(time.time() + 1) == []
    assert db.requeue_failed() == 1


def test_connections_of_finished_threads_are_closed(db: Database) -> None:
    def use() -> None:
        db.study_counts()

    for _ in range(30):
        t = threading.Thread(target=use)
        t.start()
        t.join()
    db.study_counts()  # this thread's connection prunes the dead ones
    assert db.open_connections <= 2


def test_expedite_makes_backed_off_deliveries_due(db: Database) -> None:
    import time

    _, delivery = _job_with_delivery(db)
    db.mark_sending([delivery])
    db.mark_retry(delivery, time.time() + 600, "cannot connect", None)
    assert db.due_deliveries("pacs", time.time(), 10) == []
    assert db.expedite("pacs") == 1
    assert [r["id"] for r in db.due_deliveries("pacs", time.time(), 10)] == [delivery]


def test_a_commit_that_fails_leaves_no_transaction_open(db: Database) -> None:
    import sqlite3

    # A deferred foreign key fails at COMMIT, and SQLite then keeps the transaction (and the write lock).
    with pytest.raises(sqlite3.IntegrityError):
        with db.tx() as conn:
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute("INSERT INTO deliveries (output_sop_instance_uid, destination, study_instance_uid, state,"
                         " next_attempt_at, created_at, updated_at) VALUES ('9.9', 'pacs', '1.2.3', 'pending', 0, 0, 0)")
    assert not db.db.conn.in_transaction
    assert db.record_instance(rec("1.1"))  # the next write transaction starts


def test_work_a_failed_write_left_half_done_is_released_after_the_wait(db: Database) -> None:
    import time

    _, delivery = _job_with_delivery(db)
    db.mark_sending([delivery])  # ... and recording the outcome failed
    assert db.release_stranded_deliveries("pacs", time.time() - 60) == 0  # too recent: spaced out
    assert db.release_stranded_deliveries("other", time.time() + 1) == 0  # another destination's queue
    assert db.release_stranded_deliveries("pacs", time.time() + 1) == 1
    assert db.one("SELECT state FROM deliveries")["state"] == "pending"
    db.record_instance(rec("7.1", study="7.7"))
    assert db.mark_complete("7.7") and db.claim_study("7.7") is not None  # ... and finishing it failed
    assert db.release_stranded_studies(time.time() - 60) == 0
    assert db.release_stranded_studies(time.time() + 1) == 1
    assert db.study("7.7")["state"] == "complete"


def test_outputs_of_an_analysis_overtaken_by_new_instances_are_not_recorded_or_sent(db: Database) -> None:
    db.record_instance(rec("1.1"))
    db.mark_complete("1.2.3")
    gen = db.claim_study("1.2.3")
    job = db.start_job("1.2.3", "a", "r", "key", gen)
    db.record_instance(rec("1.2"))  # a second view arrives while the first is analysed
    out = {"sop_instance_uid": "5.5", "study_instance_uid": "1.2.3", "series_instance_uid": "5", "sop_class_uid": "x",
           "transfer_syntax_uid": "y", "kind": "sr", "variant": "any", "path": "/o/5.5.dcm", "size": 1}
    assert db.record_outputs(job["id"], {"analysis": "a"}, [out], [("5.5", "pacs")], generation=gen) is None
    assert db.query("SELECT * FROM outputs") == [] and db.query("SELECT * FROM deliveries") == []
    assert db.one("SELECT state, reason FROM jobs") == {"state": "failed",
                                                        "reason": "superseded: instances arrived during the analysis"}
    assert db.study("1.2.3")["state"] == "received"


def test_a_study_sent_over_two_associations_at_once_completes_when_the_last_one_ends(tmp_path: Path) -> None:
    from nodekit import node_config, settings_from

    from dicom_node.assembly import complete_released

    db = Database(tmp_path / "node.sqlite")
    settings = settings_from(node_config(tmp_path / "data", 11112))
    a = db.open_association("MODA", "AINODE", "127.0.0.1", 1)
    b = db.open_association("MODB", "AINODE", "127.0.0.1", 2)
    body = {"modality": "DX", "body_part_examined": "SPINE"}
    db.record_instance(dataclasses.replace(rec("1.1", assoc=a), **body))
    db.record_instance(dataclasses.replace(rec("1.2", assoc=b), **body))
    db.end_association(a, "released")
    assert complete_released(db, settings) == []  # b still sends to it
    assert db.study("1.2.3")["state"] == "received"
    db.end_association(b, "released")
    assert complete_released(db, settings) == ["1.2.3"]
    db.close()


def test_the_store_makes_again_folders_deleted_under_the_running_node(tmp_path: Path) -> None:
    """An operator freeing space may delete a study's folder, or the temporary one, while the node runs; the
    store remembered the folders it had made, so every later write there failed until a restart."""
    import errno
    import shutil

    from dicom_node.errors import StorageError
    from dicom_node.storage import Store

    store = Store(tmp_path / "store")
    first = store.output_path("1.2.3", "sr", "1.2.3.1")
    store.write_atomic(first, [b"one"])
    shutil.rmtree(store.outputs / "1.2.3")
    shutil.rmtree(store.tmp)
    second = store.output_path("1.2.3", "sr", "1.2.3.2")
    assert store.write_atomic(second, [b"two", b"!"]) == 4 and second.read_bytes() == b"two!"
    assert not first.exists() and list(store.tmp.iterdir()) == []
    # A failure of the store as a whole is told apart from one of a single file or folder.
    assert StorageError("full", errno=errno.ENOSPC).store_wide and StorageError("ro", errno=errno.EROFS).store_wide
    assert not StorageError("denied", errno=errno.EACCES).store_wide and not StorageError("no errno").store_wide


def test_patient_keys_need_the_node_secret_and_a_new_secret_forgets_them(db: Database, tmp_path: Path) -> None:
    import hashlib
    import os
    import stat

    from dicom_node.db import patient_key, secret_fingerprint
    from dicom_node.storage import Store

    store = Store(tmp_path / "store")
    secret = store.secret("patient-key")
    assert store.secret("patient-key") == secret  # created once, read after
    assert stat.S_IMODE(os.stat(store.root / "patient-key.key").st_mode) == 0o600
    key = patient_key(secret, "1.2.3", "0482913", "")
    # Short hospital IDs cannot be found again by hashing every candidate: the key needs the secret.
    assert key != hashlib.sha256("\x00".join(("1.2.3", "0482913", "")).encode()).hexdigest()[:32]
    assert key != patient_key(os.urandom(32), "1.2.3", "0482913", "")
    assert key != patient_key(secret, "1.2.4", "0482913", "")  # one patient's studies are not linked
    assert not db.adopt_patient_secret(secret_fingerprint(secret))  # first secret: recorded
    db.record_instance(dataclasses.replace(rec("1.1"), patient_key=key))
    assert not db.adopt_patient_secret(secret_fingerprint(secret))  # same secret: keys kept
    def on_record(table: str) -> object:
        return db.db.execute(f"SELECT patient_key FROM {table}").fetchone()[0]

    assert on_record("studies") == key
    # Rows read for the operator surfaces (status --json, the dashboard's API) never carry it.
    assert "patient_key" not in db.study("1.2.3") and all("patient_key" not in r for r in db.recent_studies())
    assert db.adopt_patient_secret(secret_fingerprint(os.urandom(32)))  # key file lost: keys forgotten
    assert on_record("studies") is None and on_record("instances") is None


def test_restarts_while_a_study_waits_for_the_disk_do_not_count_as_interrupted_analyses(db: Database) -> None:
    from dicom_node.db import WAITING_PREFIX

    db.record_instance(rec("1.1"))
    for _ in range(MAX_INTERRUPTED_ANALYSES + 1):
        assert db.mark_complete("1.2.3") or db.study("1.2.3")["state"] == "complete"
        assert db.claim_study("1.2.3") is not None
        db.note_study("1.2.3", f"{WAITING_PREFIX}spine-xr: cannot write 1.dcm: No space left on device")
        db.recover()  # a restart loop while the disk is full
        assert db.study("1.2.3")["state"] == "complete"
    assert db.study("1.2.3")["interrupted"] == 0


def test_an_output_written_again_after_retention_is_retention_s_again(db: Database) -> None:
    import time

    job_id, delivery = _job_with_delivery(db)
    db.mark_delivered(delivery, 0)
    db.settle_delivered_studies()
    assert db.purge_outputs(time.time() + 1) == ["/o/5.5.dcm"]
    out = {"sop_instance_uid": "5.5", "study_instance_uid": "1.2.3", "series_instance_uid": "5", "sop_class_uid": "x",
           "transfer_syntax_uid": "y", "kind": "sr", "variant": "any", "path": "/o/5.5.dcm", "size": 1}
    db.record_outputs(job_id, {"analysis": "a"}, [out], [])  # a re-analysis writes the same object again
    assert db.one("SELECT purged_at FROM outputs")["purged_at"] is None
    assert db.purge_outputs(time.time() + 1) == ["/o/5.5.dcm"]


def test_reasons_are_kept_on_one_line(db: Database) -> None:
    """A decoder's multi-line error broke `status`, which prints one line per study."""
    db.record_instance(rec("1.1"))
    db.mark_complete("1.2.3")
    generation = db.claim_study("1.2.3")
    assert db.finish_study("1.2.3", generation, "failed", "spine-xr: pixel data could not be read (line one\n  line two)")
    assert db.study("1.2.3")["reason"] == "spine-xr: pixel data could not be read (line one line two)"


def test_a_send_the_node_stopped_is_audited_as_interrupted_not_as_a_failed_retry(db: Database) -> None:
    """SIGTERM during a delivery: the audit read 'retry', outcome 'failed', and the retry metric went up."""
    _, delivery = _job_with_delivery(db)
    db.mark_sending([delivery])
    db.give_back_attempts([delivery])
    event = db.one("SELECT action, detail FROM audit_events WHERE kind = 'delivery'")
    assert event == {"action": "interrupted", "detail": "node stopped while sending"}
    assert db.one("SELECT state, attempts FROM deliveries") == {"state": "pending", "attempts": 0}


def test_each_installation_has_its_own_device_serial_number(tmp_path: Path) -> None:
    """Every node wrote DeviceSerialNumber '0', so all installations shared one Device Observer UID in their
    reports; without a configured serial each data directory makes its own, kept across restarts."""
    from dicom_node.pipeline import Pipeline
    from dicom_node.settings import validate
    from dicom_node.storage import Store

    first, second = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert first.installation_serial() == Store(tmp_path / "a").installation_serial() != second.installation_serial()
    pipeline = Pipeline(validate({}), None, first, None)  # type: ignore[arg-type]
    assert pipeline.producer().device_serial_number == first.installation_serial()
    configured = Pipeline(validate({"producer": {"device_serial_number": "SPINEAI-01"}}), None, first, None)  # type: ignore[arg-type]
    assert configured.producer().device_serial_number == "SPINEAI-01"
    assert configured.producer().device_uid != pipeline.producer().device_uid


def test_a_tool_beside_a_node_reads_its_serial_without_creating_or_trusting_a_damaged_key(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """`dicom-node analyze` writes the installation's serial; where there is no key it creates none, and a
    damaged key (the node refuses to start on it) is named in a warning instead of read as a serial."""
    from dicom_node.storage import Store, existing_installation_serial

    assert existing_installation_serial(tmp_path) is None and not (tmp_path / "installation.key").exists()
    serial = Store(tmp_path).installation_serial()
    assert existing_installation_serial(tmp_path) == serial
    (tmp_path / "installation.key").write_bytes(b"short")
    assert existing_installation_serial(tmp_path) is None
    assert "installation.key is damaged (5 bytes, not 32)" in caplog.text


def test_an_unreachable_destination_holds_its_whole_queue_with_the_batch_it_failed(db: Database, tmp_path: Path) -> None:
    """After an outage each output retried on a timer of its own: one association per output ('0 of 1 sent'
    over and over). A batch that gets no association at all now takes the rest of the queue along."""
    import socket
    import time

    from dicom_node.scu import Sender
    from dicom_node.settings import validate

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = validate({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                           "batch_size": 1}], "delivery": {"connect_timeout_s": 2}})
    db.record_instance(rec("1.1"))
    db.mark_complete("1.2.3")
    gen = db.claim_study("1.2.3")
    job = db.start_job("1.2.3", "a", "r", "key", gen)
    outs = [{"sop_instance_uid": f"5.{k}", "study_instance_uid": "1.2.3", "series_instance_uid": "5",
             "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34", "transfer_syntax_uid": "1.2.840.10008.1.2.1", "kind": "sr",
             "variant": "any", "path": str(tmp_path / f"5.{k}.dcm"), "size": 1} for k in range(3)]
    db.record_outputs(job["id"], {"analysis": "a"}, outs, [(o["sop_instance_uid"], "pacs") for o in outs])
    sender = Sender(settings, db)
    assert sender.deliver_due(settings.destinations[0]) == 1
    rows = db.query("SELECT attempts, next_attempt_at, last_error FROM deliveries ORDER BY id")
    # The others wait with the batch tried, until its next attempt, and count the attempt made for them, so
    # max_attempts ends them together rather than one batch after another.
    assert [r["attempts"] for r in rows] == [1, 1, 1]
    assert rows[1]["next_attempt_at"] == rows[2]["next_attempt_at"] >= rows[0]["next_attempt_at"] > time.time()
    assert all("cannot connect" in r["last_error"] for r in rows)
    assert db.due_deliveries("pacs", time.time(), 10) == []


def test_a_failure_of_one_output_does_not_hold_the_rest_of_the_queue(db: Database, tmp_path: Path) -> None:
    """Only a batch that got no association at all defers the queue: an output that fails on its own (an
    unreadable file here, or a timeout on one large object) leaves the others where they are."""
    import time
    from unittest import mock

    from dicom_node import scu
    from dicom_node.settings import validate

    settings = validate({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                                           "batch_size": 1}]})
    db.record_instance(rec("1.1"))
    db.mark_complete("1.2.3")
    job = db.start_job("1.2.3", "a", "r", "key", db.claim_study("1.2.3"))
    outs = [{"sop_instance_uid": f"6.{k}", "study_instance_uid": "1.2.3", "series_instance_uid": "6",
             "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34", "transfer_syntax_uid": "1.2.840.10008.1.2.1", "kind": "sr",
             "variant": "any", "path": str(tmp_path / f"6.{k}.dcm"), "size": 1} for k in range(2)]
    db.record_outputs(job["id"], {"analysis": "a"}, outs, [(o["sop_instance_uid"], "pacs") for o in outs])
    one_failed = lambda *a, **k: [scu.ItemResult(i.key, scu.TRANSIENT, None, "no C-STORE response") for i in a[2]]  # noqa: E731
    with mock.patch.object(scu, "send_batch", one_failed):
        assert scu.Sender(settings, db).deliver_due(settings.destinations[0]) == 1
    assert [r["attempts"] for r in db.query("SELECT attempts FROM deliveries ORDER BY id")] == [1, 0]
    assert len(db.due_deliveries("pacs", time.time(), 10)) == 1  # the other is still due now


def test_a_database_on_a_full_disk_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite says only "disk I/O error" when its journal cannot grow: the operator must learn the disk is full."""
    from collections import namedtuple

    from dicom_node import db as db_module
    from dicom_node.errors import DatabaseError

    (tmp_path / "node.sqlite").mkdir()  # cannot be opened as a database
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(db_module.shutil, "disk_usage", lambda _: usage(10 << 20, 10 << 20, 4096))
    with pytest.raises(DatabaseError, match=r"has 4 KiB free: free space there"):
        Database(tmp_path / "node.sqlite")
    monkeypatch.undo()
    with pytest.raises(DatabaseError) as plenty:
        Database(tmp_path / "node.sqlite")
    assert "free" not in str(plenty.value)


def _identified(sop: str, identity: str, study: str = "1.2.3") -> InstanceRecord:
    return dataclasses.replace(rec(sop, study), patient_key="p", identity_key=identity)


def _analysed(db: Database, study: str, sops: list[str], epoch: int, deliver_to: str = "pacs",
              inputs: list[str] | None = None) -> dict:
    """A job of the study's current epoch with one output queued for `deliver_to` (as the pipeline records it;
    `inputs`: the instances it read, none recorded by default, as for a job from before they were)."""
    db.mark_complete(study)
    gen = db.claim_study(study)
    job = db.start_job(study, "a", "r", f"key-{epoch}-{len(sops)}", gen, db.identity_epoch(study), inputs or ())
    out = {"sop_instance_uid": f"5.{epoch}.{len(sops)}", "study_instance_uid": study, "series_instance_uid": "5",
           "sop_class_uid": "x", "transfer_syntax_uid": "y", "kind": "sr", "variant": "any", "path": "/o/x.dcm", "size": 1}
    assert db.record_outputs(job["id"], {"analysis": "a"}, [out], [(out["sop_instance_uid"], deliver_to)], generation=gen) == 1
    db.finish_study(study, gen, "encoded")
    return {**job, "output": out["sop_instance_uid"]}


def test_a_move_supersedes_only_results_that_read_the_moved_image(db: Database) -> None:
    """An image no job read (a film no rule analyses) moves out: the results stand. The one they read moves
    out: they are superseded (a new epoch, the undelivered output withdrawn)."""
    from dicom_node.db import MOVED_AWAY, MOVED_AWAY_UNREAD

    for sop in ("1.1", "1.2"):
        db.record_instance(_identified(sop, "A"))
    _analysed(db, "1.2.3", ["1.1"], 0, inputs=["1.1"])
    moves: list[tuple[str, bool]] = []
    db.record_instance(_identified("1.2", "B", study="4.5.6"), moves)
    assert moves == [("1.2.3", False)]
    assert db.identity_epoch("1.2.3") == 0 and db.study("1.2.3")["state"] == "received"
    assert [d["state"] for d in db.query("SELECT state FROM deliveries")] == ["pending"]
    moves.clear()
    db.record_instance(_identified("1.1", "B", study="4.5.6"), moves)
    assert moves == [("1.2.3", True)]
    assert db.identity_epoch("1.2.3") == 1
    assert [d["state"] for d in db.query("SELECT state FROM deliveries")] == ["withdrawn"]
    assert (db.study("1.2.3")["state"], db.study("1.2.3")["reason"]) == ("unrouted", MOVED_AWAY)
    # A study's only film, which nothing was made from, moved: its reason does not claim superseded results.
    db.record_instance(_identified("8.1", "A", study="8.8"))
    db.record_instance(_identified("8.1", "A", study="9.9"))
    assert (db.study("8.8")["state"], db.study("8.8")["reason"]) == ("unrouted", MOVED_AWAY_UNREAD)
    # A crash during an analysis leaves no inputs of the job it deletes.
    db.record_instance(_identified("2.1", "C", study="2.2.2"))
    db.mark_complete("2.2.2")
    db.start_job("2.2.2", "a", "r", "k", db.claim_study("2.2.2"), 0, ["2.1"])
    db.recover()
    assert db.one("SELECT count(*) AS n FROM job_inputs")["n"] == 1


def test_an_image_arriving_in_another_study_after_retention_supersedes_the_results_made_from_it(db: Database) -> None:
    """Retention removed the study's images; then the sender moved one of them to its own patient's study. The
    node no longer held it, so the move went unnoticed and the report made from it stayed. The jobs' inputs
    still name it."""
    from dicom_node.db import MOVED_AFTER_PURGE

    db.record_instance(_identified("1.1", "A"))
    db.record_instance(_identified("3.1", "A"))  # a film no result reads
    _analysed(db, "1.2.3", ["1.1"], 0, inputs=["1.1"])
    delivery = db.one("SELECT id FROM deliveries")["id"]
    db.mark_sending([delivery])
    db.mark_delivered(delivery, 0)
    db.forget_instances("1.2.3")
    # Sent again into its own study: no move.
    assert db.record_instance(_identified("1.1", "A"))
    assert db.identity_epoch("1.2.3") == 0
    db.forget_instances("1.2.3")
    moves: list[tuple[str, bool]] = []
    assert db.record_instance(_identified("1.1", "B", study="4.5.6"), moves)
    assert moves == [("1.2.3", True)]
    study = db.study("1.2.3")
    assert (study["state"], study["reason"], db.identity_epoch("1.2.3")) == ("unrouted", MOVED_AFTER_PURGE, 1)
    assert [r["id"] for r in db.superseded_deliveries("1.2.3")] == [delivery]
    assert db.moved_instances() == [("1.2.3", "1.1")]
    # A film of the same study that no result read, arriving elsewhere after retention: nothing to supersede.
    moves.clear()
    db.record_instance(_identified("3.1", "A", study="7.7"), moves)
    assert moves == [] and db.identity_epoch("1.2.3") == 1 and db.moved_instances() == [("1.2.3", "1.1")]


def test_a_correction_starts_an_identity_epoch_once_and_withdraws_what_the_old_one_queued(db: Database) -> None:
    db.record_instance(_identified("1.1", "A"))
    db.record_instance(_identified("1.2", "A"))
    first = _analysed(db, "1.2.3", ["1.1", "1.2"], 0)
    assert db.identity_epoch("1.2.3") == 0
    # The sender re-sends both images with the corrected patient: one new epoch, not one per image ...
    db.record_instance(_identified("1.1", "B"))
    assert db.identity_epoch("1.2.3") == 1
    # ... and the old epoch's undelivered output is withdrawn at once, audited, its job superseded.
    assert [d["state"] for d in db.query("SELECT * FROM deliveries")] == ["withdrawn"]
    assert db.one("SELECT action, target FROM audit_events WHERE action = 'withdrawn'")["target"] == first["output"]
    assert db.one("SELECT state, reason FROM jobs WHERE id = ?", (first["id"],))["reason"].startswith("superseded")
    db.record_instance(_identified("1.2", "B"))
    assert db.identity_epoch("1.2.3") == 1
    second = _analysed(db, "1.2.3", ["1.1", "1.2"], 1)
    # Corrected back (A -> B -> A): a new epoch again, so its outputs are new objects no note has rejected.
    db.record_instance(_identified("1.1", "A"))
    db.record_instance(_identified("1.2", "A"))
    assert db.identity_epoch("1.2.3") == 2
    assert [d["state"] for d in db.query("SELECT * FROM deliveries")] == ["withdrawn"] * 2  # B's queued one too
    third = _analysed(db, "1.2.3", ["1.1", "1.2"], 2)
    assert third["id"] not in (first["id"], second["id"])
    assert [r["output_sop_instance_uid"] for r in db.query("SELECT * FROM deliveries WHERE state = 'pending'")] == [
        third["output"]]
    # Never attempted: nothing of them can be in a PACS, nothing to answer.
    assert db.superseded_deliveries() == []
    # Nothing failed: an alert on failed jobs stays quiet.
    assert db.job_counts() == [{"analysis": "a", "state": "encoded", "n": 1}, {"analysis": "a", "state": "superseded", "n": 2}]

    # A report's predecessor is one of its own epoch only.
    assert db.latest_output("1.2.3", "a", "sr", before_job=third["id"], identity_epoch=2) is None


def test_a_new_film_that_differs_is_no_correction(db: Database) -> None:
    """Another film of the patient (taken at another age, or relayed by a PACS that rewrote its header) is
    a new instance: the study re-opens as for any new film, and nothing is withdrawn or superseded."""
    db.record_instance(_identified("1.1", "A"))
    first = _analysed(db, "1.2.3", ["1.1"], 0)
    db.record_instance(_identified("1.2", "A-other-header"))
    assert db.identity_epoch("1.2.3") == 0 and db.study("1.2.3")["state"] == "received"
    assert len(db.query("SELECT * FROM deliveries")) == 1
    assert db.one("SELECT state FROM jobs WHERE id = ?", (first["id"],))["state"] == "encoded"


def test_an_old_identity_output_that_failed_or_went_out_meanwhile_is_never_re_sent_and_gets_answered(db: Database) -> None:
    db.record_instance(_identified("1.1", "A"))
    first = _analysed(db, "1.2.3", ["1.1"], 0)
    delivery = db.one("SELECT id FROM deliveries")["id"]
    db.mark_sending([delivery])  # in flight when the correction arrives: it cannot be withdrawn now
    db.record_instance(_identified("1.1", "B"))
    assert db.one("SELECT state FROM deliveries")["state"] == "sending"
    # It fails for good: withdrawn, not failed (it must neither fail the study nor be re-sent by `retry`) ...
    db.mark_failed(delivery, "rejected permanently", 0xC000)
    assert [d["state"] for d in db.query("SELECT * FROM deliveries")] == ["withdrawn"]
    assert db.requeue_failed() == 0
    # ... and, attempted, it may have reached the PACS (a timeout after the C-STORE went out): to be answered.
    assert [r["id"] for r in db.superseded_deliveries("1.2.3")] == [delivery]
    db.answer_superseded([delivery])
    assert db.one("SELECT state FROM jobs WHERE id = ?", (first["id"],))["state"] == "failed"
    assert db.one("SELECT count(*) AS n FROM audit_events WHERE action = 'withdrawn'")["n"] == 1
    # Had it gone out instead, it is one to answer (a rejection note or a warning), once.
    db.record_instance(_identified("1.2", "B"))
    second = _analysed(db, "1.2.3", ["1.1", "1.2"], 1)
    late = db.one("SELECT id FROM deliveries WHERE output_sop_instance_uid = ?", (second["output"],))["id"]
    db.mark_sending([late])
    db.mark_delivered(late, 0)
    db.record_instance(_identified("1.1", "C"))
    rows = db.superseded_deliveries("1.2.3")
    assert [r["id"] for r in rows] == [late] and rows[0]["identity_epoch"] == 1
    db.answer_superseded([late])
    assert db.superseded_deliveries() == []


def test_a_correction_after_the_epoch_made_outputs_starts_another_and_variants_before_join_it(db: Database) -> None:
    db.record_instance(_identified("1.1", "A"))
    db.record_instance(_identified("1.2", "A"))
    _analysed(db, "1.2.3", ["1.1", "1.2"], 0)
    db.record_instance(_identified("1.2", "B"))  # corrected in two associations, the later film first ...
    db.record_instance(_identified("1.1", "B'"))  # ... and the other with a header variant: one correction
    assert db.identity_epoch("1.2.3") == 1
    _analysed(db, "1.2.3", ["1.1", "1.2"], 1)  # (its outputs may have copied a value corrected only now)
    db.record_instance(_identified("1.1", "B"))  # a correction after epoch 1 made outputs: a new epoch
    assert db.identity_epoch("1.2.3") == 2


def _delivered_then_corrected(db: Database, tmp_path: Path) -> Pipeline:
    """A pipeline (no analyser) over a study whose one output went to 'pacs' (a destination taking rejection
    notes) before the sender corrected the patient identity: one delivery to answer."""
    from nodekit import make_study

    from dicom_node.pipeline import Pipeline
    from dicom_node.settings import validate
    from dicom_node.storage import Store

    delivered = make_study(tmp_path / "out", "delivered")[0]  # stands for an output the node sent
    db.record_instance(_identified("1.1", "A"))
    _analysed(db, "1.2.3", ["1.1"], 0)
    with db.tx() as tx:
        tx.execute("UPDATE outputs SET path = ?", (str(delivered),))
    delivery = db.one("SELECT id FROM deliveries")["id"]
    db.mark_sending([delivery])
    db.mark_delivered(delivery, 0)
    db.record_instance(_identified("1.1", "B"))
    settings = validate({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                                           "reject_superseded": True}]})
    return Pipeline(settings, db, Store(tmp_path / "data"), None)  # type: ignore[arg-type]


def test_a_rejection_note_that_cannot_be_written_waits_as_a_study_does(
        db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk made every 2-s pipeline pass try the note again and log an ERROR: thousands of lines an
    hour onto the disk that is full. It now waits STRANDED_RETRY_S, like a study's outputs."""
    import logging

    from dicom_node.db import STRANDED_RETRY_S
    from dicom_node.errors import StorageError

    caplog.set_level(logging.INFO, logger="dicom_node")
    pipeline = _delivered_then_corrected(db, tmp_path)
    store = pipeline.store
    now = [1000.0]
    pipeline.clock = lambda: now[0]

    def full(*_: object, **__: object) -> int:
        raise StorageError("No space left on device")

    real_write = store.write_atomic
    store.write_atomic = full  # type: ignore[method-assign]
    assert pipeline.answer_superseded() == 0
    now[0] += STRANDED_RETRY_S - 1
    assert pipeline.answer_superseded() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no rejection note for pacs (again in 60 s)" in errors[0]
    # Space again, and the wait over: the note is made, once.
    store.write_atomic = real_write  # type: ignore[method-assign]
    assert pipeline.answer_superseded() == 0
    now[0] += 1
    assert pipeline.answer_superseded() == 1
    assert db.one("SELECT count(*) AS n FROM outputs WHERE kind = 'kos'")["n"] == 1
    assert db.superseded_deliveries() == [] and pipeline.answer_superseded() == 0


def test_outputs_that_make_no_valid_rejection_note_are_warned_about_once_not_retried(
        db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A note the encoder refuses (ValueError) fails the same way at every try: it was retried every minute,
    forever, with an ERROR each time. It is now named once, and the outputs are answered by the warning that
    they stay at the destination."""
    import logging

    import reports.kos

    caplog.set_level(logging.INFO, logger="dicom_node")
    pipeline = _delivered_then_corrected(db, tmp_path)

    def refused(*_: object, **__: object) -> None:
        raise ValueError("Evidence of a KOS must be in one study")

    monkeypatch.setattr(reports.kos, "build_rejection_note", refused)
    assert pipeline.answer_superseded() == 1
    assert pipeline.answer_superseded() == 0 and db.superseded_deliveries() == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot make a rejection note: ValueError: Evidence of a KOS" in errors[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "they make no valid note" in warnings[0]
    assert db.one("SELECT count(*) AS n FROM outputs WHERE kind = 'kos'")["n"] == 0
    # The study's log says so too (an operator reads that, not the node's log).
    event = db.one("SELECT * FROM audit_events WHERE action = 'superseded'")
    assert (event["study_instance_uid"], event["destination"], event["outcome"]) == ("1.2.3", "pacs", "failed")
    assert "no rejection note can list it: it stays at pacs" in event["detail"]


def test_a_moved_instances_old_copy_left_by_a_stop_is_removed_at_the_next_start(db: Database, tmp_path: Path) -> None:
    """The SCP deletes the old file after the move is recorded; a stop in between left a copy (perhaps another
    patient's film) that no record names, so retention never removed it. The next start does."""
    from dicom_node.service import left_over_copies
    from dicom_node.storage import Store

    store = Store(tmp_path / "data")
    first, moved = store.instance_path("1.2.3", "1.2.3.1", "1.1"), store.instance_path("4.5.6", "4.5.6.1", "1.1")
    kept = store.instance_path("1.2.3", "1.2.3.1", "1.2")
    for path in (first, moved, kept):
        store.write_atomic(path, (b"DICM",))
    db.record_instance(dataclasses.replace(_identified("1.1", "A"), path=str(first)))
    db.record_instance(dataclasses.replace(_identified("1.2", "A"), path=str(kept)))
    db.record_instance(dataclasses.replace(_identified("1.1", "A", study="4.5.6"), path=str(moved)))  # ... and stop
    assert left_over_copies(db, store) == [first]
    store.remove(left_over_copies(db, store))
    assert not first.exists() and moved.exists() and kept.exists()
    # Moved back: the copy in the second study is the left-over one now.
    first_again = store.instance_path("1.2.3", "1.2.3.1", "1.1")
    store.write_atomic(first_again, (b"DICM",))
    db.record_instance(dataclasses.replace(_identified("1.1", "A"), path=str(first_again)))
    assert left_over_copies(db, store) == [moved]
