"""The node database: SQLite in WAL mode through sqlite-utils, numbered migrations, small named queries.

One connection per thread (SQLite connections must not be shared across threads while in use), a busy
timeout so concurrent writers wait instead of failing, and every write transaction opened with
``BEGIN IMMEDIATE`` so that two writers never deadlock on a read-to-write upgrade (the usual source of
"database is locked" under concurrent associations).

The queries at the bottom are the only SQL outside the migrations; the CLI and the web API reuse them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from dicom_node.errors import DatabaseError, InstanceConflict

# Study states, in the order a study moves through them (see README "Operations").
RECEIVED, COMPLETE, ANALYSING, ENCODED, DELIVERED, FAILED, UNROUTED = (
    "received", "complete", "analysing", "encoded", "delivered", "failed", "unrouted",
)
STUDY_STATES = (RECEIVED, COMPLETE, ANALYSING, ENCODED, DELIVERED, FAILED, UNROUTED)
# Delivery states.
PENDING, SENDING = "pending", "sending"
#: The middle of the reason of a study its deliveries failed ("2 output(s) not delivered; pacs: ...").
NOT_DELIVERED = " output(s) not delivered; "
DELIVERY_STATES = (PENDING, SENDING, DELIVERED, FAILED)

MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "initial schema",
        """
        CREATE TABLE associations (
            id INTEGER PRIMARY KEY,
            calling_ae TEXT NOT NULL,
            called_ae TEXT NOT NULL,
            peer_host TEXT,
            peer_port INTEGER,
            started_at REAL NOT NULL,
            ended_at REAL,
            state TEXT NOT NULL,            -- open, released, aborted, rejected
            instances INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            reason TEXT,
            assembled INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX associations_pending ON associations(state, assembled);

        CREATE TABLE studies (
            study_instance_uid TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            reason TEXT,
            instance_count INTEGER NOT NULL DEFAULT 0,
            generation INTEGER NOT NULL DEFAULT 0,      -- bumped by every new source instance
            analysing_generation INTEGER,               -- generation being / last analysed
            first_received_at REAL NOT NULL,
            last_received_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX studies_state ON studies(state, last_received_at);

        CREATE TABLE instances (
            sop_instance_uid TEXT PRIMARY KEY,
            study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            transfer_syntax_uid TEXT NOT NULL,
            modality TEXT,
            body_part_examined TEXT,
            view_position TEXT,
            series_description TEXT,
            study_description TEXT,
            image_type TEXT,
            calling_ae TEXT,
            association_id INTEGER,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            received_at REAL NOT NULL,
            own_output INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX instances_study ON instances(study_instance_uid);
        CREATE INDEX instances_association ON instances(association_id);

        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            study_instance_uid TEXT NOT NULL,
            analysis TEXT NOT NULL,
            rule TEXT NOT NULL,
            input_key TEXT NOT NULL,         -- digest of the sorted analysed SOP Instance UIDs
            generation INTEGER NOT NULL,
            state TEXT NOT NULL,             -- analysing, encoded, delivered, failed
            reason TEXT,
            summary TEXT,                    -- StudyResult.summary() as JSON (no patient data)
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (study_instance_uid, analysis, input_key)
        );

        CREATE TABLE outputs (
            sop_instance_uid TEXT PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            study_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            transfer_syntax_uid TEXT NOT NULL,
            kind TEXT NOT NULL,              -- seg, sr, sc, pr
            variant TEXT NOT NULL,           -- encoding options, e.g. binary/none
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX outputs_study ON outputs(study_instance_uid, kind);

        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            output_sop_instance_uid TEXT NOT NULL REFERENCES outputs(sop_instance_uid),
            destination TEXT NOT NULL,
            study_instance_uid TEXT NOT NULL,
            state TEXT NOT NULL,             -- pending, sending, delivered, failed
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_status INTEGER,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            delivered_at REAL,
            UNIQUE (output_sop_instance_uid, destination)
        );
        CREATE INDEX deliveries_due ON deliveries(destination, state, next_attempt_at);
        CREATE INDEX deliveries_study ON deliveries(study_instance_uid);
        """,
    ),
    (
        "output retention",
        """
        ALTER TABLE outputs ADD COLUMN purged_at REAL;   -- file deleted by retention; the row stays
        """,
    ),
    (
        "audit trail, counters, analysis time",
        """
        -- One row per finished association, delivery attempt and operator action (README "Operator dashboard").
        CREATE TABLE audit_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,              -- association, delivery, action
            action TEXT NOT NULL,            -- association: released/aborted/rejected; delivery: delivered/retry/
                                             -- failed/interrupted; action: retry/reanalyse/echo/login
            actor TEXT NOT NULL,             -- calling AE title, 'node', 'token:<id>' or 'user:<name>'
            peer TEXT,                       -- host:port of the other side
            destination TEXT,
            study_instance_uid TEXT,
            target TEXT,                     -- association id, output SOP Instance UID, or what an action acted on
            instances INTEGER,
            failures INTEGER,
            status INTEGER,                  -- last DIMSE status of a delivery
            outcome TEXT NOT NULL,           -- ok, failed, refused
            detail TEXT
        );
        CREATE INDEX audit_events_at ON audit_events(at);
        CREATE INDEX audit_events_study ON audit_events(study_instance_uid);

        -- Monotonic totals kept by the trigger below, so /metrics counters survive restarts and cost O(1).
        CREATE TABLE counters (
            metric TEXT NOT NULL,
            a TEXT NOT NULL DEFAULT '',
            b TEXT NOT NULL DEFAULT '',
            value REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (metric, a, b)
        );
        CREATE TRIGGER audit_events_count AFTER INSERT ON audit_events BEGIN
            INSERT INTO counters (metric, a, b, value) SELECT 'associations', '', NEW.action, 1
                WHERE NEW.kind = 'association' ON CONFLICT (metric, a, b) DO UPDATE SET value = value + 1;
            INSERT INTO counters (metric, a, b, value) SELECT 'instances_received', NEW.actor, '', NEW.instances
                WHERE NEW.kind = 'association' AND NEW.instances > 0
                ON CONFLICT (metric, a, b) DO UPDATE SET value = value + excluded.value;
            INSERT INTO counters (metric, a, b, value) SELECT 'store_failures', NEW.actor, '', NEW.failures
                WHERE NEW.kind = 'association' AND NEW.failures > 0
                ON CONFLICT (metric, a, b) DO UPDATE SET value = value + excluded.value;
            INSERT INTO counters (metric, a, b, value) SELECT 'deliveries', NEW.destination, NEW.action, 1
                WHERE NEW.kind = 'delivery' ON CONFLICT (metric, a, b) DO UPDATE SET value = value + 1;
            INSERT INTO counters (metric, a, b, value) SELECT 'last_delivered_at', NEW.destination, '', NEW.at
                WHERE NEW.kind = 'delivery' AND NEW.action = 'delivered'
                ON CONFLICT (metric, a, b) DO UPDATE SET value = max(value, excluded.value);
            INSERT INTO counters (metric, a, b, value) SELECT 'actions', NEW.action, NEW.outcome, 1
                WHERE NEW.kind = 'action' ON CONFLICT (metric, a, b) DO UPDATE SET value = value + 1;
        END;

        -- What happened before this migration, so that the trail and the totals start complete.
        INSERT INTO audit_events (at, kind, action, actor, peer, target, instances, failures, outcome, detail)
            SELECT coalesce(ended_at, started_at), 'association', state, calling_ae,
                   coalesce(peer_host, '') || ':' || coalesce(peer_port, ''), CAST(id AS TEXT), instances, failures,
                   CASE WHEN state = 'released' AND failures = 0 THEN 'ok' ELSE 'failed' END, reason
            FROM associations WHERE state <> 'open' ORDER BY id;
        INSERT INTO audit_events (at, kind, action, actor, destination, study_instance_uid, target, status, outcome,
                                  detail)
            SELECT coalesce(delivered_at, updated_at), 'delivery', state, 'node', destination, study_instance_uid,
                   output_sop_instance_uid, last_status, CASE state WHEN 'delivered' THEN 'ok' ELSE 'failed' END,
                   last_error
            FROM deliveries WHERE state IN ('delivered', 'failed') ORDER BY coalesce(delivered_at, updated_at), id;

        -- From now on the database records them itself, in the same transaction as the change.
        CREATE TRIGGER audit_association_end AFTER UPDATE OF state ON associations
        WHEN OLD.state = 'open' AND NEW.state <> 'open' BEGIN
            INSERT INTO audit_events (at, kind, action, actor, peer, target, instances, failures, outcome, detail)
            VALUES (coalesce(NEW.ended_at, NEW.started_at), 'association', NEW.state, NEW.calling_ae,
                    coalesce(NEW.peer_host, '') || ':' || coalesce(NEW.peer_port, ''), CAST(NEW.id AS TEXT),
                    NEW.instances, NEW.failures,
                    CASE WHEN NEW.state = 'released' AND NEW.failures = 0 THEN 'ok' ELSE 'failed' END, NEW.reason);
        END;
        CREATE TRIGGER audit_association_rejected AFTER INSERT ON associations WHEN NEW.state = 'rejected' BEGIN
            INSERT INTO audit_events (at, kind, action, actor, peer, target, instances, failures, outcome, detail)
            VALUES (NEW.started_at, 'association', 'rejected', NEW.calling_ae,
                    coalesce(NEW.peer_host, '') || ':' || coalesce(NEW.peer_port, ''), CAST(NEW.id AS TEXT), 0, 0,
                    'refused', NEW.reason);
        END;
        CREATE TRIGGER audit_delivery AFTER UPDATE OF state ON deliveries
        WHEN OLD.state = 'sending' AND NEW.state <> 'sending' BEGIN
            INSERT INTO audit_events (at, kind, action, actor, destination, study_instance_uid, target, status,
                                      outcome, detail)
            VALUES (NEW.updated_at, 'delivery',
                    CASE WHEN NEW.state <> 'pending' THEN NEW.state
                         WHEN NEW.next_attempt_at <> OLD.next_attempt_at THEN 'retry' ELSE 'interrupted' END,
                    'node', NEW.destination, NEW.study_instance_uid, NEW.output_sop_instance_uid, NEW.last_status,
                    CASE NEW.state WHEN 'delivered' THEN 'ok' ELSE 'failed' END,
                    CASE WHEN NEW.state = 'delivered' THEN NULL
                         WHEN NEW.state = 'pending' AND NEW.next_attempt_at = OLD.next_attempt_at
                         THEN 'node stopped while sending' ELSE NEW.last_error END);
        END;

        ALTER TABLE jobs ADD COLUMN analysis_seconds REAL;    -- wall time of the analysis run (not encoding)
        CREATE INDEX studies_received ON studies(first_received_at);
        CREATE INDEX studies_updated ON studies(updated_at);
        CREATE INDEX deliveries_updated ON deliveries(updated_at);
        CREATE TABLE probes (name TEXT PRIMARY KEY, at REAL NOT NULL);    -- /readyz writes here
        """,
    ),
    (
        "analyses cut by a crash, counted",
        """
        -- Analyses of the study the node died during, in a row (reset when one ends); see Database.recover.
        ALTER TABLE studies ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        "one patient per study",
        """
        -- Keyed digest of PatientID and IssuerOfPatientID (see patient_key): compares the patients of a
        -- study's instances without keeping their IDs. The study's is its current patient.
        ALTER TABLE studies ADD COLUMN patient_key TEXT;
        ALTER TABLE instances ADD COLUMN patient_key TEXT;
        -- When retention deleted the study's instances: a later analysis sees only what arrived after it.
        ALTER TABLE studies ADD COLUMN instances_purged_at REAL;
        -- Studies retention emptied before this column existed.
        UPDATE studies SET instances_purged_at = updated_at WHERE state IN ('delivered', 'unrouted')
            AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_instance_uid = studies.study_instance_uid);
        -- Facts about the node itself, e.g. which key the patient digests were made with.
        CREATE TABLE node_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    ),
    (
        "corrected patient identities",
        """
        -- Keyed digest of the patient identity an instance's outputs copy (see identity_key): a re-sent
        -- instance whose digest changed (a corrected name, ID, birth date, sex or accession number) re-opens
        -- its study.
        ALTER TABLE instances ADD COLUMN identity_key TEXT;
        -- How many times the sender corrected the study's identity: part of its jobs' keys and its outputs'
        -- UIDs, so every correction (also back to an earlier identity) gets new objects.
        ALTER TABLE studies ADD COLUMN identity_epoch INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN identity_epoch INTEGER NOT NULL DEFAULT 0;
        -- A delivery of an earlier epoch's output that went out (or may have: state 'withdrawn' after an
        -- attempt): the rejection note queued for it, or '' once the log warned of it.  Undelivered ones are
        -- withdrawn (state 'withdrawn', audited), never sent.
        ALTER TABLE deliveries ADD COLUMN superseded_note TEXT;
        """,
    ),
    (
        "job inputs",
        """
        -- The instances a job analysed (its input_key is their digest): an image the sender moves out of the
        -- study supersedes only the results that read it. Jobs from before have none recorded: any move
        -- supersedes them, as it did.
        CREATE TABLE job_inputs (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            sop_instance_uid TEXT NOT NULL,
            PRIMARY KEY (job_id, sop_instance_uid)
        ) WITHOUT ROWID;
        CREATE INDEX job_inputs_by_instance ON job_inputs (sop_instance_uid);
        """,
    ),
)


def one_line(text: str | None) -> str | None:
    """A reason as one line: a decoder's multi-line error broke `status`'s one line per study."""
    return None if text is None else " ".join(text.split())


def patient_key(secret: bytes, study_instance_uid: str, patient_id: str, issuer: str) -> str:
    """Who an instance belongs to, as the database keeps it: an HMAC-SHA256 of PatientID and IssuerOfPatientID
    under the node's secret (`Store.secret`, kept outside the database) and the Study UID.  Two instances of
    one study compare; without the secret the short IDs hospitals use cannot be found again by trying them
    all, and one patient's keys in two studies do not link them."""
    text = "\x00".join((study_instance_uid, patient_id.strip(), issuer.strip()))
    return hmac.new(secret, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]


#: The identity whose correction makes a study's outputs new objects (and the old ones superseded): who the
#: patient is and which order the study answers.  Not every value an output copies: a new film taken at
#: another PatientAge, or a header another sender rewrote, is no correction.
CORRECTABLE_IDENTITY = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                        "AccessionNumber")


def identity_key(secret: bytes, study_instance_uid: str, identity_digest: str) -> str:
    """Keyed digest of an instance's `CORRECTABLE_IDENTITY` (`identity_digest`, see `scp._identity_key`): the
    database can tell that a re-sent instance's identity was corrected without holding it."""
    text = "\x00".join(("identity", study_instance_uid, identity_digest))
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def secret_fingerprint(secret: bytes) -> str:
    """What the database records of the secret: which one made its patient keys (not the secret itself)."""
    return hashlib.sha256(b"patient-key-fingerprint\x00" + secret).hexdigest()[:16]


def _other_patient(execute: Callable[..., sqlite3.Cursor], study_instance_uid: str, key: str) -> bool:
    """True when the study is on record with a patient key other than `key`."""
    row = execute("SELECT patient_key FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)).fetchone()
    return row is not None and row[0] is not None and row[0] != key


#: How a delivery error begins when no association was made (the SCU's wording): nothing of it reached the peer.
UNREACHED_PREFIX = "cannot connect to "

#: The audit detail of a delivery withdrawn because its study's identity was corrected (or an image moved out of
#: it), and the reason of the job that made it.
WITHDRAWN_DETAIL = ("not sent: made under a patient identity the sender has corrected since, or from an image it has"
                    " moved to another study")
SUPERSEDED_BY_IDENTITY = ("superseded: the sender corrected the patient identity, or moved an image to another study;"
                          " analysed again")
#: The reason of a study every instance of which the sender moved to other studies.
MOVED_AWAY = "every instance was moved to another study by the sender; its earlier results are superseded"
#: ... when no result was made from them (films no rule analyses): results it has stand.
MOVED_AWAY_UNREAD = ("every instance was moved to another study by the sender; no result was made from them, so any"
                     " earlier results stand")
MOVED_AWAY_AFTER_RETENTION = ("the instances retention kept were moved to another study by the sender; its earlier"
                              " results are superseded")
#: The reason of a study with no instance left, an image of which its results read (removed by retention since)
#: arrived in another study.
MOVED_AFTER_PURGE = ("an image its results were made from arrived in another study after retention had removed this"
                     " study's images (moved by the sender); its earlier results are superseded")
#: The reason of a job an operator's re-analysis replaced.
REANALYSIS_REQUESTED = "re-analysis requested"


def _withdraw_superseded(execute: Callable[..., sqlite3.Cursor], study_instance_uid: str, now: float) -> int:
    """Drop the undelivered deliveries of the study's outputs made in an earlier identity epoch (audited as
    'withdrawn'; rejection notes excepted: they are about the earlier identity) and mark those jobs superseded:
    after a corrected patient name or ID, outputs carrying the old one must not reach a PACS.  Returns how
    many deliveries."""
    epoch_row = execute("SELECT identity_epoch FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)).fetchone()
    if epoch_row is None:
        return 0
    epoch = int(epoch_row[0])
    stale = execute(
        "SELECT d.id, d.destination, d.output_sop_instance_uid FROM deliveries d JOIN outputs o ON"
        " o.sop_instance_uid = d.output_sop_instance_uid JOIN jobs j ON j.id = o.job_id"
        " WHERE d.study_instance_uid = ? AND d.state IN ('pending', 'failed') AND o.kind != 'kos'"
        " AND j.identity_epoch != ?", (study_instance_uid, epoch),
    ).fetchall()
    for delivery_id, destination, sop_uid in stale:
        # Kept as 'withdrawn' (not deleted): one that was attempted may have reached the PACS (a timeout after
        # the C-STORE went out), and is answered like a delivered one.
        execute("UPDATE deliveries SET state = 'withdrawn', updated_at = ? WHERE id = ?", (now, delivery_id))
        execute("INSERT INTO audit_events (at, kind, action, actor, destination, study_instance_uid, target,"
                " outcome, detail) VALUES (?, 'delivery', 'withdrawn', 'node', ?, ?, ?, 'ok', ?)",
                (now, destination, study_instance_uid, sop_uid, WITHDRAWN_DETAIL))
    execute("UPDATE jobs SET state = 'failed', reason = ?, updated_at = ? WHERE study_instance_uid = ?"
            " AND state IN ('analysing', 'encoded') AND identity_epoch != ?",
            (SUPERSEDED_BY_IDENTITY, now, study_instance_uid, epoch))
    return len(stale)


def _read_in_current_epoch(execute: Callable[..., sqlite3.Cursor], study_instance_uid: str, sop_instance_uid: str) -> bool:
    """True when outputs of the study's current identity epoch were made from `sop_instance_uid` (or by a job
    whose inputs were not recorded, which may have)."""
    return execute(
        "SELECT 1 FROM jobs j JOIN studies s ON s.study_instance_uid = j.study_instance_uid"
        " WHERE j.study_instance_uid = ? AND j.identity_epoch = s.identity_epoch AND j.summary IS NOT NULL"
        " AND (EXISTS (SELECT 1 FROM job_inputs i WHERE i.job_id = j.id AND i.sop_instance_uid = ?)"
        " OR NOT EXISTS (SELECT 1 FROM job_inputs i WHERE i.job_id = j.id))",
        (study_instance_uid, sop_instance_uid),
    ).fetchone() is not None


def _analysed_in_current_epoch(execute: Callable[..., sqlite3.Cursor], study_instance_uid: str) -> bool:
    """True when the study's current identity epoch has recorded outputs (jobs with a summary)."""
    return execute(
        "SELECT 1 FROM jobs j JOIN studies s ON s.study_instance_uid = j.study_instance_uid"
        " WHERE j.study_instance_uid = ? AND j.identity_epoch = s.identity_epoch AND j.summary IS NOT NULL",
        (study_instance_uid,),
    ).fetchone() is not None


def _move_out(execute: Callable[..., sqlite3.Cursor], sop_instance_uid: str, study_instance_uid: str,
              to_study: str, actor: str, now: float, *, held: bool = True) -> bool:
    """The sender moved instance `sop_instance_uid` from `study_instance_uid` to `to_study` (a misfiled film
    split off, two studies merged): one UID names one instance, so the first study loses it. If outputs of the
    current epoch were made from that image (perhaps another patient's), a new epoch starts as after a corrected
    identity (new UIDs; the undelivered ones withdrawn, the delivered ones answered); an image no job read leaves
    them standing. The study is analysed again without it; with no instance left it ends unrouted. Audited.
    `held` False: retention had removed the image (only its jobs' inputs name it).  Returns whether outputs
    were superseded."""
    execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
    superseded = _read_in_current_epoch(execute, study_instance_uid, sop_instance_uid)
    if superseded:
        execute("UPDATE studies SET identity_epoch = identity_epoch + 1 WHERE study_instance_uid = ?", (study_instance_uid,))
        _withdraw_superseded(execute, study_instance_uid, now)
    left = execute("SELECT count(*) FROM instances WHERE study_instance_uid = ? AND own_output = 0",
                   (study_instance_uid,)).fetchone()[0]
    purged = execute("SELECT instances_purged_at IS NOT NULL FROM studies WHERE study_instance_uid = ?",
                     (study_instance_uid,)).fetchone()[0]
    # Results stand when this epoch has some (the move superseded none); else earlier ones were superseded, now or
    # by an earlier move or correction (epoch > 0), or there were none.
    stand = not superseded and _analysed_in_current_epoch(execute, study_instance_uid)
    epoch = execute("SELECT identity_epoch FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)).fetchone()[0]
    if stand or not epoch:
        reason = MOVED_AWAY_UNREAD
    else:
        reason = MOVED_AFTER_PURGE if not held else MOVED_AWAY_AFTER_RETENTION if purged else MOVED_AWAY
    execute("UPDATE studies SET state = ?, reason = ?, instance_count = max(instance_count - ?, 0),"
            " generation = generation + 1, last_received_at = ?, updated_at = ? WHERE study_instance_uid = ?",
            ("received" if left else "unrouted", None if left else reason, int(held), now, now, study_instance_uid))
    execute("INSERT INTO audit_events (at, kind, action, actor, study_instance_uid, target, outcome, detail)"
            " VALUES (?, 'action', 'moved', ?, ?, ?, 'ok', ?)",
            (now, actor, study_instance_uid, sop_instance_uid, f"moved to study {to_study} by the sender"))
    return superseded


def patient_conflict_reason(study_instance_uid: str) -> str:
    """Why an instance of another patient than its study's is refused."""
    return (f"PatientID differs from the study's other instances (study {study_instance_uid}): not stored,"
            " so that one study never mixes two patients (re-send the study's instances with the corrected"
            " identity, or give the image its own study)")


def conflict_reason(sop_instance_uid: str, held_in: str) -> str:
    """Why an instance whose UID the node holds in another study is refused."""
    return f"SOPInstanceUID already held in another study (instance {sop_instance_uid}, study {held_in})"


def _mark_answered(execute: Callable[..., sqlite3.Cursor], delivery_ids: Sequence[int], note: str) -> None:
    """Superseded deliveries answered: by the rejection note with UID `note`, or ("") by a warning."""
    for delivery_id in delivery_ids:
        execute("UPDATE deliveries SET superseded_note = ? WHERE id = ?", (note, delivery_id))


def _insert_output(execute: Callable[..., sqlite3.Cursor], out: dict[str, Any], job_id: int, now: float) -> None:
    """Record a written output of job `job_id` (one written again, with the same UID, replaces its row; never
    one of another study: a UID names one object, and that study's PACS copy must keep what it is)."""
    held = execute("SELECT study_instance_uid FROM outputs WHERE sop_instance_uid = ?", (out["sop_instance_uid"],)).fetchone()
    if held is not None and held[0] != out["study_instance_uid"]:
        raise ValueError(f"output UID {out['sop_instance_uid']} is already one of study {held[0]}'s")
    execute(
        "INSERT INTO outputs (sop_instance_uid, job_id, study_instance_uid, series_instance_uid,"
        " sop_class_uid, transfer_syntax_uid, kind, variant, path, size, created_at)"
        " VALUES (:sop_instance_uid, :job_id, :study_instance_uid, :series_instance_uid, :sop_class_uid,"
        " :transfer_syntax_uid, :kind, :variant, :path, :size, :created_at)"
        " ON CONFLICT(sop_instance_uid) DO UPDATE SET job_id = excluded.job_id, path = excluded.path,"
        " size = excluded.size, transfer_syntax_uid = excluded.transfer_syntax_uid,"
        " variant = excluded.variant, purged_at = NULL",  # written again: retention owns it again
        {**out, "job_id": job_id, "created_at": now},
    )


#: Columns `Database.query` leaves out of its rows: digests made with the node's secret are for comparing
#: inside the database, not for `status --json` or the API.
_KEYED_DIGESTS = frozenset({"patient_key", "identity_key"})

#: A study whose analysis the node died during this many times in a row (e.g. killed for memory by an
#: enormous image) is failed at the next start instead of being run again: a restart loop would never end.
MAX_INTERRUPTED_ANALYSES = 3

#: Work a failed write left half-done (a study `analysing`, a delivery `sending`, with nothing working on it:
#: a full disk) is taken up again after this long, not only at the next start.
STRANDED_RETRY_S = 60.0
#: SQL (jobs ``j``, studies ``s``): an output of job ``j`` was made under an identity its study has corrected since
#: (or from an image since moved out): superseded.  The delivery queue, the rejection notes and the pages use it
#: (`_withdraw_superseded` compares with the epoch it was given).
SUPERSEDED_SQL = "j.identity_epoch != s.identity_epoch"
#: How the reason of a study waiting for its outputs to be written begins (see `Pipeline`).
WAITING_PREFIX = "waiting to retry: "


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP records about one received instance (headers routing needs, no patient data)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part_examined: str
    view_position: str
    series_description: str
    study_description: str
    image_type: str
    calling_ae: str
    association_id: int | None
    path: str
    size: int
    own_output: bool = False
    patient_key: str | None = None  # see `patient_key`
    identity_key: str | None = None  # see `identity_key`


#: Below this much free space, a database that cannot be opened is said to be on a full disk (SQLite reports
#: only "disk I/O error" when its journal cannot grow).
FULL_DISK_BYTES = 16 * 1024 * 1024


def _space_hint(path: Path) -> str:
    """What to do when the file system holding the database is (nearly) full; "" otherwise."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    except OSError:
        return ""
    if free >= FULL_DISK_BYTES:
        return ""
    return (f" (the file system holding it has {free // 1024} KiB free: free space there, e.g. old logs or the"
            " outputs and instances retention would delete, then start again)")


class Database:
    """The node database at `path` (created and migrated on open).

    `read_only` opens an existing database for looking only (``dicom-node status``, ``audit export``): no
    write lock is ever taken from a running node, and nothing is migrated; a database whose schema is not
    this version's is refused with the reason."""

    def __init__(self, path: Path | str, *, synchronous_full: bool = True, busy_timeout_s: float = 60.0,
                 read_only: bool = False) -> None:
        self.path = Path(path)
        self.synchronous_full = synchronous_full
        self.busy_timeout_s = busy_timeout_s
        self.read_only = read_only
        self._local = threading.local()
        # Every connection with the thread that owns it: pynetdicom runs each association on a new thread,
        # so connections of finished threads are closed when the next one opens (no descriptor leak).
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        try:
            if read_only:
                self._check_schema()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.migrate()
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.path}: {exc}{_space_hint(self.path)}") from exc

    def _check_schema(self) -> None:
        have, want = self.schema_version(), len(MIGRATIONS)
        if have < want:
            raise DatabaseError(f"{self.path}: schema version {have}, this dicom-node reads {want}: start this"
                                " version's `dicom-node serve` once to migrate it")
        if have > want:
            raise DatabaseError(f"{self.path}: schema version {have} was written by a newer dicom-node"
                                f" (this one reads {want})")

    # ------------------------------------------------------------------ connections and transactions

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self.read_only:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                       timeout=self.busy_timeout_s, check_same_thread=False)
            else:
                conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            if not self.read_only:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {'FULL' if self.synchronous_full else 'NORMAL'}")
                conn.execute("PRAGMA foreign_keys = ON")
            db = sqlite_utils.Database(conn, execute_plugins=False)
            self._local.db = db
            with self._lock:
                alive = []
                for thread, other in self._all:
                    if thread.is_alive():
                        alive.append((thread, other))
                    else:
                        _close_quietly(other)
                alive.append((threading.current_thread(), conn))
                self._all = alive
        return db

    @property
    def open_connections(self) -> int:
        """Connections currently open (one per live thread that used the database)."""
        with self._lock:
            return len(self._all)

    @contextmanager
    def tx(self) -> Iterator[sqlite_utils.Database]:
        """A write transaction (``BEGIN IMMEDIATE``: takes the write lock up front, waits on busy)."""
        db = self.db
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
        else:
            try:
                db.conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself only after some errors (a full disk, an I/O error); after others
                # (busy) the transaction stays open, and this thread's connection would keep the write lock.
                if db.conn.in_transaction:
                    db.conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for _, conn in self._all:
                _close_quietly(conn)
            self._all.clear()
        self._local = threading.local()

    def migrate(self) -> list[int]:
        """Apply pending migrations in order; returns the versions applied."""
        applied: list[int] = []
        with self.tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at REAL NOT NULL)"
            )
            done = {r["version"] for r in db.query("SELECT version FROM schema_migrations")}
            for version, (name, sql) in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in _statements(sql):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))
                applied.append(version)
        return applied

    def schema_version(self) -> int:
        """Highest applied migration."""
        row = self.one("SELECT max(version) AS v FROM schema_migrations")
        return int(row["v"] or 0) if row else 0

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, without the patient and identity keys: rows read here end up in `status --json`, the
        dashboard and its API, and the keys, though keyed, are derived from a PatientID (the patient and
        identity checks read them with their own statements)."""
        return [{k: v for k, v in row.items() if k not in _KEYED_DIGESTS} for row in self.db.query(sql, params)]

    def one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        """First row or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------ associations

    def open_association(self, calling_ae: str, called_ae: str, host: str | None, port: int | None) -> int:
        """Record an accepted association; returns its id."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO associations (calling_ae, called_ae, peer_host, peer_port, started_at, state)"
                " VALUES (?, ?, ?, ?, ?, 'open')",
                (calling_ae, called_ae, host, port, time.time()),
            )
            return int(cur.lastrowid or 0)

    def record_rejected_association(self, calling_ae: str, called_ae: str, host: str | None, port: int | None,
                                    reason: str) -> None:
        """Audit a rejected association request."""
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT INTO associations (calling_ae, called_ae, peer_host, peer_port, started_at, ended_at,"
                " state, reason, assembled) VALUES (?, ?, ?, ?, ?, ?, 'rejected', ?, 1)",
                (calling_ae, called_ae, host, port, now, now, reason),
            )

    def end_association(self, association_id: int, state: str, reason: str | None = None) -> dict[str, Any] | None:
        """Mark an association released or aborted (the assembly sweep then looks at its studies); returns its
        row as ended (for the log line)."""
        with self.tx() as db:
            db.execute(
                "UPDATE associations SET state = ?, ended_at = ?, reason = coalesce(?, reason) WHERE id = ?",
                (state, time.time(), reason, association_id),
            )
        return self.one("SELECT calling_ae, peer_host, started_at, ended_at, instances, failures FROM associations"
                        " WHERE id = ?", (association_id,))

    def count_failure(self, association_id: int | None) -> None:
        """One more C-STORE answered with a failure on this association."""
        if association_id is None:
            return
        with self.tx() as db:
            db.execute("UPDATE associations SET failures = failures + 1 WHERE id = ?", (association_id,))

    def ended_unassembled_associations(self) -> list[dict[str, Any]]:
        """Released or aborted associations whose studies completeness has not looked at yet."""
        return self.query(
            "SELECT id, state FROM associations WHERE state IN ('released', 'aborted') AND assembled = 0 ORDER BY id"
        )

    def association_studies(self, association_id: int) -> list[str]:
        """Studies that received source instances on an association."""
        return [r["study_instance_uid"] for r in self.query(
            "SELECT DISTINCT study_instance_uid FROM instances WHERE association_id = ? AND own_output = 0",
            (association_id,),
        )]

    def study_still_arriving(self, study_instance_uid: str, except_association: int) -> bool:
        """True when another association that brought instances of the study is still open (the study is
        sent over several associations at once: one of them ending does not make it complete)."""
        return self.one(
            "SELECT 1 AS x FROM instances i JOIN associations a ON a.id = i.association_id WHERE"
            " i.study_instance_uid = ? AND a.state = 'open' AND a.id != ? LIMIT 1",
            (study_instance_uid, except_association),
        ) is not None

    def mark_assembled(self, association_id: int) -> None:
        """Completeness has handled this association."""
        with self.tx() as db:
            db.execute("UPDATE associations SET assembled = 1 WHERE id = ?", (association_id,))

    # --------------------------------------------------------------------------------- instances

    def record_instance(self, rec: InstanceRecord, moves: list[tuple[str, bool]] | None = None) -> bool:
        """Record a stored instance; returns True if it is new.  A new source instance (re)opens its study.
        An instance that arrives in another study than the one holding it (or whose results read it) moved:
        `moves` gets (the study it left, whether outputs made from it were superseded) for each."""
        now = time.time()
        with self.tx() as db:
            row = db.execute(
                "SELECT study_instance_uid, patient_key, identity_key, own_output FROM instances"
                " WHERE sop_instance_uid = ?", (rec.sop_instance_uid,),
            ).fetchone()
            if row is not None and row[0] != rec.study_instance_uid:
                if rec.own_output or row[3]:
                    raise InstanceConflict(conflict_reason(rec.sop_instance_uid, row[0]))
                # One UID names one instance: arriving in another study, the sender moved it there (the new
                # study's patient check below still applies; a refusal rolls the move back).
                superseded = _move_out(db.execute, rec.sop_instance_uid, row[0], rec.study_instance_uid,
                                       rec.calling_ae, now)
                if moves is not None:
                    moves.append((row[0], superseded))
                row = None
            elif row is None and not rec.own_output:
                # Retention removed the instance, but the jobs name what they read: arriving in another study,
                # it was moved there, and results made from it (perhaps another patient's film) are superseded.
                for (held_in,) in db.execute(
                        "SELECT DISTINCT j.study_instance_uid FROM job_inputs i JOIN jobs j ON j.id = i.job_id"
                        " WHERE i.sop_instance_uid = ? AND j.study_instance_uid != ?",
                        (rec.sop_instance_uid, rec.study_instance_uid)).fetchall():
                    if _read_in_current_epoch(db.execute, held_in, rec.sop_instance_uid):
                        _move_out(db.execute, rec.sop_instance_uid, held_in, rec.study_instance_uid, rec.calling_ae,
                                  now, held=False)
                        if moves is not None:
                            moves.append((held_in, True))
            existed = row is not None
            corrected = new_identity = False
            if not rec.own_output and rec.patient_key is not None:
                if not existed and _other_patient(db.execute, rec.study_instance_uid, rec.patient_key):
                    raise InstanceConflict(patient_conflict_reason(rec.study_instance_uid))
                # A re-sent instance may change patient, or the name, birth date or accession number its
                # outputs copy (the sender corrected the identity): the study re-opens.  (A new instance that
                # differs is no correction: a film taken at another age, a header rewritten by another sender.)
                corrected = existed and ((row[1] is not None and row[1] != rec.patient_key)
                                         or (row[2] is not None and rec.identity_key is not None
                                             and row[2] != rec.identity_key))
                # A correction starts a new identity epoch once the current one has recorded outputs (they copy
                # an identity now corrected); until then corrections join the current epoch (the study's other
                # films re-sent corrected, header variants): its first outputs will copy the corrected identity.
                new_identity = corrected and _analysed_in_current_epoch(db.execute, rec.study_instance_uid)
            db.execute(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid,"
                " transfer_syntax_uid, modality, body_part_examined, view_position, series_description,"
                " study_description, image_type, calling_ae, association_id, path, size, received_at, own_output,"
                " patient_key, identity_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(sop_instance_uid) DO UPDATE SET transfer_syntax_uid = excluded.transfer_syntax_uid,"
                " path = excluded.path, size = excluded.size, received_at = excluded.received_at,"
                " association_id = excluded.association_id, patient_key = excluded.patient_key,"
                " identity_key = excluded.identity_key",
                (rec.sop_instance_uid, rec.study_instance_uid, rec.series_instance_uid, rec.sop_class_uid,
                 rec.transfer_syntax_uid, rec.modality, rec.body_part_examined, rec.view_position,
                 rec.series_description, rec.study_description, rec.image_type, rec.calling_ae,
                 rec.association_id, rec.path, rec.size, now, int(rec.own_output), rec.patient_key,
                 rec.identity_key),
            )
            if rec.association_id is not None:
                db.execute("UPDATE associations SET instances = instances + 1 WHERE id = ?", (rec.association_id,))
            if rec.own_output:
                return not existed
            if not existed or corrected:
                # A corrected identity re-opens the study like a new instance: its outputs carry the identity.
                db.execute(
                    "INSERT INTO studies (study_instance_uid, state, instance_count, generation, first_received_at,"
                    " last_received_at, updated_at, patient_key) VALUES (?, 'received', 1, 1, ?, ?, ?, ?)"
                    " ON CONFLICT(study_instance_uid) DO UPDATE SET state = 'received', reason = NULL,"
                    " instance_count = instance_count + ?, generation = generation + 1,"
                    " last_received_at = excluded.last_received_at, updated_at = excluded.updated_at,"
                    " patient_key = coalesce(excluded.patient_key, patient_key)",
                    (rec.study_instance_uid, now, now, now, rec.patient_key, 0 if existed else 1),
                )
                if new_identity:
                    db.execute("UPDATE studies SET identity_epoch = identity_epoch + 1 WHERE study_instance_uid = ?",
                               (rec.study_instance_uid,))
                    _withdraw_superseded(db.execute, rec.study_instance_uid, now)
            else:
                # A resend of a known instance keeps the study where it is, but delays a stable-age decision.
                db.execute(
                    "UPDATE studies SET last_received_at = ? WHERE study_instance_uid = ? AND state = 'received'",
                    (now, rec.study_instance_uid),
                )
            return not existed

    def adopt_patient_secret(self, fingerprint: str) -> bool:
        """Record which secret makes the patient keys; if another one made the keys on record (the key file
        was lost or replaced), they cannot be compared any more and are forgotten.  Returns True if so."""
        with self.tx() as db:
            row = db.execute("SELECT value FROM node_meta WHERE name = 'patient_key_secret'").fetchone()
            if row is not None and row[0] == fingerprint:
                return False
            forgot = row is not None
            if forgot:
                db.execute("UPDATE studies SET patient_key = NULL")
                db.execute("UPDATE instances SET patient_key = NULL, identity_key = NULL")
            db.execute("INSERT INTO node_meta (name, value) VALUES ('patient_key_secret', ?) ON CONFLICT(name)"
                       " DO UPDATE SET value = excluded.value", (fingerprint,))
            return forgot

    def patient_conflict(self, study_instance_uid: str, key: str) -> bool:
        """True when a new instance of patient `key` would join a study of another patient (the SCP asks before
        writing the file, for an instance it does not hold; `record_instance` checks again in its transaction)."""
        return _other_patient(self.db.execute, study_instance_uid, key)

    def instance_study(self, sop_instance_uid: str) -> str | None:
        """The study the node holds instance `sop_instance_uid` in, if any."""
        row = self.one("SELECT study_instance_uid FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return row["study_instance_uid"] if row else None

    def is_known_output(self, sop_instance_uid: str) -> bool:
        """True when the node produced an instance with this UID."""
        return self.one("SELECT 1 AS x FROM outputs WHERE sop_instance_uid = ?", (sop_instance_uid,)) is not None

    def source_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Source (not own-output) instances of a study, in arrival order."""
        return self.query(
            "SELECT * FROM instances WHERE study_instance_uid = ? AND own_output = 0 ORDER BY received_at, rowid",
            (study_instance_uid,),
        )

    def moved_instances(self) -> list[tuple[str, str]]:
        """(study it left, SOP Instance UID) of every instance the sender moved to another study (audited)."""
        return [(r["study_instance_uid"], r["target"]) for r in self.query(
            "SELECT DISTINCT study_instance_uid, target FROM audit_events WHERE kind = 'action' AND action = 'moved'")]

    def instance_file(self, sop_instance_uid: str) -> str | None:
        """The file the node holds instance `sop_instance_uid` in, if any."""
        row = self.db.execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return None if row is None else str(row[0])

    def held_without_identity_key(self, sop_instance_uid: str) -> str | None:
        """The file of an instance the node holds without an identity key (stored before it kept them, or before
        the key secret changed), else None: the SCP computes the key from it before a re-send replaces it."""
        row = self.db.execute("SELECT path FROM instances WHERE sop_instance_uid = ? AND own_output = 0"
                              " AND identity_key IS NULL", (sop_instance_uid,)).fetchone()
        return None if row is None else str(row[0])

    def fill_identity_key(self, sop_instance_uid: str, key: str) -> None:
        """Record the identity key of a held instance that had none (see `held_without_identity_key`)."""
        with self.tx() as db:
            db.execute("UPDATE instances SET identity_key = ? WHERE sop_instance_uid = ? AND identity_key IS NULL",
                       (key, sop_instance_uid))

    def identity_epoch(self, study_instance_uid: str) -> int:
        """How many times the sender corrected the study's patient identity (0: never)."""
        row = self.db.execute("SELECT identity_epoch FROM studies WHERE study_instance_uid = ?",
                              (study_instance_uid,)).fetchone()
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------------------------- studies

    def study(self, study_instance_uid: str) -> dict[str, Any] | None:
        """One study row."""
        return self.one("SELECT * FROM studies WHERE study_instance_uid = ?", (study_instance_uid,))

    def mark_complete(self, study_instance_uid: str, *, expected_state: str = RECEIVED) -> bool:
        """received -> complete (only from `expected_state`); True if it moved."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE studies SET state = 'complete', reason = NULL, updated_at = ? WHERE study_instance_uid = ?"
                " AND state = ?",
                (time.time(), study_instance_uid, expected_state),
            )
            return cur.rowcount > 0

    def stable_studies(self, quiet_since: float) -> list[str]:
        """Studies still `received` whose last instance arrived before `quiet_since`."""
        return [r["study_instance_uid"] for r in self.query(
            "SELECT study_instance_uid FROM studies WHERE state = 'received' AND last_received_at <= ?"
            " ORDER BY last_received_at",
            (quiet_since,),
        )]

    def complete_studies(self, limit: int = 50) -> list[str]:
        """Studies waiting for the pipeline, oldest first."""
        return [r["study_instance_uid"] for r in self.query(
            "SELECT study_instance_uid FROM studies WHERE state = 'complete' ORDER BY updated_at LIMIT ?", (limit,)
        )]

    def claim_study(self, study_instance_uid: str) -> int | None:
        """complete -> analysing; returns the generation being analysed, or None if someone else moved it."""
        with self.tx() as db:
            row = db.execute(
                "SELECT generation FROM studies WHERE study_instance_uid = ? AND state = 'complete'",
                (study_instance_uid,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE studies SET state = 'analysing', analysing_generation = ?, reason = NULL, updated_at = ?"
                " WHERE study_instance_uid = ?",
                (row[0], time.time(), study_instance_uid),
            )
            return int(row[0])

    def finish_study(self, study_instance_uid: str, generation: int, state: str, reason: str | None = None) -> bool:
        """analysing -> `state`, unless new instances arrived meanwhile (then it stays `received`)."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE studies SET state = ?, reason = ?, interrupted = 0, updated_at = ? WHERE study_instance_uid = ?"
                " AND state = 'analysing' AND generation = ?",
                (state, one_line(reason), time.time(), study_instance_uid, generation),
            )
            return cur.rowcount > 0

    def settle_delivered_studies(self, study_uids: Iterable[str] | None = None) -> None:
        """encoded -> delivered (every delivery done) or failed (some delivery failed for good)."""
        uids = list(study_uids) if study_uids is not None else [
            r["study_instance_uid"] for r in self.query("SELECT study_instance_uid FROM studies WHERE state = 'encoded'")
        ]
        now = time.time()
        for uid in uids:
            with self.tx() as db:
                counts = {r[0]: r[1] for r in db.execute(
                    "SELECT state, count(*) FROM deliveries WHERE study_instance_uid = ? GROUP BY state", (uid,)
                ).fetchall()}
                if counts.get(PENDING) or counts.get(SENDING):
                    continue
                if counts.get(FAILED):
                    err = db.execute(
                        "SELECT destination, last_error FROM deliveries WHERE study_instance_uid = ? AND state = 'failed'"
                        " ORDER BY updated_at DESC LIMIT 1", (uid,),
                    ).fetchone()
                    reason = f"{counts[FAILED]}{NOT_DELIVERED}{err[0]}: {err[1]}"
                    db.execute(
                        "UPDATE studies SET state = 'failed', reason = ?, updated_at = ? WHERE study_instance_uid = ?"
                        " AND state IN ('encoded', 'delivered')", (reason, now, uid),
                    )
                else:
                    # A study failed by its deliveries is delivered once they are; one whose analysis failed stays
                    # failed (a rejection note of its earlier outputs may go out meanwhile).
                    db.execute(
                        "UPDATE studies SET state = 'delivered', reason = NULL, updated_at = ? WHERE study_instance_uid = ?"
                        " AND (state = 'encoded' OR (state = 'failed' AND reason LIKE ?))", (now, uid, f"%{NOT_DELIVERED}%"),
                    )
                # Jobs follow their study to 'delivered'. A delivery failed for good leaves them 'encoded': the
                # analysis did not fail (a PACS outage counted as failed analyses, and a job 'failed' so never
                # came back to 'delivered' after a successful retry).
                db.execute(
                    "UPDATE jobs SET state = 'delivered', updated_at = ? WHERE study_instance_uid = ? AND state = 'encoded'"
                    " AND (SELECT state FROM studies WHERE study_instance_uid = ?) = 'delivered'",
                    (now, uid, uid),
                )

    # -------------------------------------------------------------------------------------- jobs

    def start_job(self, study_instance_uid: str, analysis: str, rule: str, input_key: str, generation: int,
                  identity_epoch: int = 0, sop_instance_uids: Sequence[str] = ()) -> dict[str, Any]:
        """The job row for this exact input (created as `analysing` if new, with its instances
        `sop_instance_uids`, whose digest `input_key` is), of the study's `identity_epoch`."""
        now = time.time()
        with self.tx() as db:
            db.execute(
                "INSERT INTO jobs (study_instance_uid, analysis, rule, input_key, generation, state, created_at,"
                " updated_at, identity_epoch) VALUES (?, ?, ?, ?, ?, 'analysing', ?, ?, ?)"
                " ON CONFLICT(study_instance_uid, analysis, input_key) DO NOTHING",
                (study_instance_uid, analysis, rule, input_key, generation, now, now, identity_epoch),
            )
            row = db.execute(
                "SELECT * FROM jobs WHERE study_instance_uid = ? AND analysis = ? AND input_key = ?",
                (study_instance_uid, analysis, input_key),
            )
            cols = [c[0] for c in row.description]
            job = dict(zip(cols, row.fetchone(), strict=True))
            # Also for a job made before inputs were recorded, run again (its key is the digest of these UIDs).
            for uid in sop_instance_uids:
                db.execute("INSERT OR IGNORE INTO job_inputs (job_id, sop_instance_uid) VALUES (?, ?)", (job["id"], uid))
            return job

    def fail_job(self, job_id: int, reason: str) -> None:
        """A job failed for good (reason shown in status)."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET state = 'failed', reason = ?, updated_at = ? WHERE id = ?",
                       (one_line(reason), time.time(), job_id))

    def record_outputs(self, job_id: int, summary: dict[str, Any], outputs: Sequence[dict[str, Any]],
                       deliveries: Sequence[tuple[str, str]], *, generation: int | None = None) -> int | None:
        """Outputs written + deliveries queued + job `encoded`, in one transaction; returns deliveries added.

        `deliveries` are (output SOP Instance UID, destination) pairs; a pair already delivered is not
        queued again (same deterministic UID = same object).  With `generation` (the study's when the
        analysis claimed it): if instances arrived since, nothing is recorded, the job is marked superseded
        and None returned: the study is analysed again with them, and outputs of the older set would only
        reach the PACS to be replaced.
        """
        now = time.time()
        added = 0
        with self.tx() as db:
            if generation is not None:
                row = db.execute("SELECT generation FROM studies WHERE study_instance_uid = ?",
                                 (outputs[0]["study_instance_uid"] if outputs else "",)).fetchone()
                if outputs and (row is None or row[0] != generation):
                    db.execute("UPDATE jobs SET state = 'failed', reason = 'superseded: instances arrived during"
                               " the analysis', updated_at = ? WHERE id = ?", (now, job_id))
                    return None
            for out in outputs:
                _insert_output(db.execute, out, job_id, now)
            study = outputs[0]["study_instance_uid"] if outputs else None
            for sop_uid, destination in deliveries:
                cur = db.execute(
                    "INSERT INTO deliveries (output_sop_instance_uid, destination, study_instance_uid, state,"
                    " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)"
                    " ON CONFLICT(output_sop_instance_uid, destination) DO UPDATE SET state = 'pending',"
                    " attempts = 0, next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at"
                    " WHERE deliveries.state = 'failed'",
                    (sop_uid, destination, study, now, now, now),
                )
                added += cur.rowcount
            if study is not None:
                _withdraw_superseded(db.execute, study, now)
            db.execute(
                "UPDATE jobs SET state = 'encoded', reason = NULL, summary = ?, updated_at = ? WHERE id = ?",
                (json.dumps(summary), now, job_id),
            )
        return added

    def superseded_deliveries(self, study_instance_uid: str | None = None) -> list[dict[str, Any]]:
        """Deliveries that went out with an output of an earlier identity epoch than their study's and that no
        rejection note or warning has answered yet (rejection notes themselves left out): (id, destination,
        study_instance_uid, identity_epoch of the output, sop_instance_uid, job_id, path, purged_at).  They stay in
        that PACS under the old identity until its patient correction, or a rejection note, removes them."""
        one = " AND d.study_instance_uid = ?" if study_instance_uid else ""
        return self.query(
            "SELECT d.id, d.destination, d.study_instance_uid, j.identity_epoch, o.sop_instance_uid, o.job_id, o.path,"
            " o.purged_at FROM studies s JOIN deliveries d ON d.study_instance_uid = s.study_instance_uid"
            " JOIN outputs o ON o.sop_instance_uid = d.output_sop_instance_uid JOIN jobs j ON j.id = o.job_id"
            " WHERE s.identity_epoch > 0 AND (d.state = 'delivered' OR (d.state = 'withdrawn' AND d.attempts > 0"
            " AND coalesce(d.last_error, '') NOT LIKE '" + UNREACHED_PREFIX + "%'))"
            " AND d.superseded_note IS NULL AND o.kind != 'kos'"
            " AND " + SUPERSEDED_SQL + one
            + " ORDER BY d.study_instance_uid, d.destination, j.identity_epoch, o.sop_instance_uid",
            (study_instance_uid,) if study_instance_uid else (),
        )

    def answer_superseded(self, delivery_ids: Sequence[int], note_sop_instance_uid: str = "", *,
                          left: str = "", outcome: str = "ok") -> None:
        """Record that `delivery_ids` were answered: by the rejection note with this UID, or ("") a warning,
        audited per output (action 'superseded', detail `left`: why it stays at its destination; `outcome`
        'failed' where a note was wanted) so the study's log shows it, not only the node's."""
        now = time.time()
        with self.tx() as db:
            _mark_answered(db.execute, delivery_ids, note_sop_instance_uid)
            if note_sop_instance_uid:
                return
            for delivery_id in delivery_ids:
                db.execute(
                    "INSERT INTO audit_events (at, kind, action, actor, destination, study_instance_uid, target,"
                    " outcome, detail) SELECT ?, 'delivery', 'superseded', 'node', destination, study_instance_uid,"
                    " output_sop_instance_uid, ?, ? FROM deliveries WHERE id = ?",
                    (now, outcome, left or None, delivery_id))

    def record_rejection_note(self, job_id: int, output: dict[str, Any], destination: str,
                              answers: Sequence[int]) -> bool:
        """A rejection note written for `destination` (an output of job `job_id`, kind 'kos'), its delivery queued
        and the deliveries it `answers` marked, in one transaction; False if that note was queued before (the
        same rejected set gives the same note)."""
        now = time.time()
        with self.tx() as db:
            _insert_output(db.execute, {**output, "kind": "kos", "variant": "any"}, job_id, now)
            cur = db.execute(
                "INSERT INTO deliveries (output_sop_instance_uid, destination, study_instance_uid, state,"
                " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)"
                " ON CONFLICT(output_sop_instance_uid, destination) DO NOTHING",
                (output["sop_instance_uid"], destination, output["study_instance_uid"], now, now, now),
            )
            _mark_answered(db.execute, answers, output["sop_instance_uid"])
            return cur.rowcount > 0

    def latest_output(self, study_instance_uid: str, analysis: str, kind: str, *, before_job: int,
                      identity_epoch: int = 0) -> dict[str, Any] | None:
        """Newest output of `kind` from an earlier job of the same analysis and identity epoch (the predecessor
        of a new SR: a report made under a patient identity since corrected is another patient's)."""
        return self.one(
            "SELECT o.* FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE o.study_instance_uid = ? AND j.analysis = ?"
            " AND o.kind = ? AND j.id != ? AND j.identity_epoch = ? ORDER BY o.created_at DESC, j.id DESC LIMIT 1",
            (study_instance_uid, analysis, kind, before_job, identity_epoch),
        )

    # -------------------------------------------------------------------------------- deliveries

    def due_deliveries(self, destination: str, now: float, limit: int) -> list[dict[str, Any]]:
        """Pending deliveries whose time has come, joined with their output file, oldest first.  Outputs of a
        patient identity corrected since are withdrawn first: one being sent when its job was superseded came
        back to the queue afterwards."""
        stale = self.query(
            "SELECT DISTINCT d.study_instance_uid FROM deliveries d JOIN studies s ON s.study_instance_uid ="
            " d.study_instance_uid JOIN outputs o ON o.sop_instance_uid = d.output_sop_instance_uid JOIN jobs j ON"
            " j.id = o.job_id WHERE d.destination = ? AND d.state = 'pending' AND s.identity_epoch > 0"
            " AND " + SUPERSEDED_SQL + " AND o.kind != 'kos'", (destination,))
        if stale:  # (the write lock only when there is something to withdraw: C-STOREs need it too)
            with self.tx() as db:
                for row in stale:
                    _withdraw_superseded(db.execute, row["study_instance_uid"], now)
        return self.query(
            "SELECT d.id, d.output_sop_instance_uid, d.attempts, d.study_instance_uid, o.path, o.sop_class_uid,"
            " o.transfer_syntax_uid, o.kind FROM deliveries d JOIN outputs o ON o.sop_instance_uid ="
            " d.output_sop_instance_uid WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at <= ?"
            " ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (destination, now, limit),
        )

    def mark_sending(self, ids: Sequence[int]) -> None:
        """pending -> sending (an attempt is under way)."""
        with self.tx() as db:
            for i in ids:
                db.execute("UPDATE deliveries SET state = 'sending', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                           (time.time(), i))

    def give_back_attempts(self, ids: Sequence[int]) -> None:
        """sending -> pending without counting the attempt: the node stopped it, not the destination.  Its
        next_attempt_at (already due) stays, which the audit trigger reads as 'interrupted', not 'retry'."""
        now = time.time()
        with self.tx() as db:
            for i in ids:
                db.execute("UPDATE deliveries SET state = 'pending', attempts = max(attempts - 1, 0),"
                           " updated_at = ? WHERE id = ? AND state = 'sending'", (now, i))

    def mark_delivered(self, delivery_id: int, status: int) -> None:
        """sending -> delivered."""
        now = time.time()
        with self.tx() as db:
            db.execute(
                "UPDATE deliveries SET state = 'delivered', last_status = ?, last_error = NULL, delivered_at = ?,"
                " updated_at = ? WHERE id = ?", (status, now, now, delivery_id),
            )

    def expedite(self, destination: str) -> int:
        """Pending deliveries to `destination` waiting out a backoff become due now (it answers again)."""
        now = time.time()
        with self.tx() as db:
            return db.execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE destination = ? AND state = 'pending'"
                " AND next_attempt_at > ?", (now, destination, now),
            ).rowcount

    def defer_destination(self, destination: str, until: float, error: str) -> int:
        """Pending deliveries to `destination` due before `until` wait until then: it gave no association, so
        the attempt made for the batch counts for them too (with its error); returns how many."""
        with self.tx() as db:
            return db.execute(
                "UPDATE deliveries SET next_attempt_at = ?, attempts = attempts + 1, last_error = ? WHERE"
                " destination = ? AND state = 'pending' AND next_attempt_at < ?",
                (until, one_line(error), destination, until),
            ).rowcount

    def mark_retry(self, delivery_id: int, next_attempt_at: float, error: str, status: int | None) -> None:
        """sending -> pending again, later."""
        with self.tx() as db:
            db.execute(
                "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, last_error = ?, last_status = ?,"
                " updated_at = ? WHERE id = ?", (next_attempt_at, one_line(error), status, time.time(), delivery_id),
            )

    def mark_failed(self, delivery_id: int, error: str, status: int | None) -> bool:
        """sending -> failed for good (until `retry`); withdrawn instead when its output is of an identity the
        sender corrected while it was being sent (it must not be sent again, nor fail its study): then False."""
        now = time.time()
        with self.tx() as db:
            db.execute(
                "UPDATE deliveries SET state = 'failed', last_error = ?, last_status = ?, updated_at = ? WHERE id = ?",
                (one_line(error), status, now, delivery_id),
            )
            row = db.execute("SELECT study_instance_uid FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is not None:
                _withdraw_superseded(db.execute, row[0], now)
            state = db.execute("SELECT state FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            return state is not None and state[0] == FAILED

    def requeue_failed(self, destination: str | None = None, study_instance_uid: str | None = None) -> int:
        """failed deliveries -> pending now (``dicom-node retry``); their studies go back to `encoded`."""
        now = time.time()
        where, params = ["state = 'failed'"], []
        if destination:
            where.append("destination = ?")
            params.append(destination)
        if study_instance_uid:
            where.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        with self.tx() as db:
            studies = [r[0] for r in db.execute(
                f"SELECT DISTINCT study_instance_uid FROM deliveries WHERE {' AND '.join(where)}", params).fetchall()]
            for uid in studies:
                _withdraw_superseded(db.execute, uid, now)  # an output of a corrected identity is never re-sent
            cur = db.execute(
                f"UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"
                f" WHERE {' AND '.join(where)}", [now, now, *params],
            )
            for uid in studies:
                db.execute("UPDATE studies SET state = 'encoded', reason = NULL, updated_at = ? WHERE study_instance_uid = ?"
                           " AND state IN ('failed', 'delivered')", (now, uid))
                db.execute("UPDATE jobs SET state = 'encoded', updated_at = ? WHERE study_instance_uid = ?"
                           " AND state IN ('failed', 'delivered') AND summary IS NOT NULL AND identity_epoch ="
                           " (SELECT identity_epoch FROM studies WHERE study_instance_uid = ?)", (now, uid, uid))
            return cur.rowcount

    def requeue_failed_studies(self, study_instance_uid: str | None = None) -> int:
        """Studies that failed before delivery (analysis errors) -> complete again (``dicom-node retry``, or the
        dashboard for one study); returns how many moved."""
        one = "" if study_instance_uid is None else " AND study_instance_uid = ?"
        with self.tx() as db:
            cur = db.execute(
                "UPDATE studies SET state = 'complete', reason = NULL, interrupted = 0, updated_at = ? WHERE state = 'failed'"
                " AND study_instance_uid NOT IN (SELECT study_instance_uid FROM deliveries WHERE state = 'failed')" + one,
                (time.time(),) + (() if study_instance_uid is None else (study_instance_uid,)),
            )
            return cur.rowcount

    # ---------------------------------------------------------------------------------- recovery

    def release_stranded_studies(self, claimed_before: float) -> int:
        """Studies left `analysing` by a pipeline step whose last database write failed (a full disk) ->
        `complete` again; returns how many.  Called only when no analysis is under way in this process, with
        a cut-off that spaces out attempts while the disk is still full."""
        # Looked for first without the write lock: this runs every pass, and C-STOREs need that lock.
        if self.one("SELECT 1 AS x FROM studies WHERE state = 'analysing' AND updated_at < ? LIMIT 1",
                    (claimed_before,)) is None:
            return 0
        with self.tx() as db:
            return db.execute(
                "UPDATE studies SET state = 'complete', updated_at = ? WHERE state = 'analysing' AND updated_at < ?",
                (time.time(), claimed_before),
            ).rowcount

    def release_stranded_deliveries(self, destination: str, marked_before: float) -> int:
        """Deliveries to `destination` left `sending` by a send whose outcome could not be recorded ->
        `pending` (sent again; the PACS replaces what it has); returns how many.  Called only between
        batches of that destination."""
        if self.one("SELECT 1 AS x FROM deliveries WHERE destination = ? AND state = 'sending' AND updated_at < ?"
                    " LIMIT 1", (destination, marked_before)) is None:
            return 0  # (looked for without the write lock, as above)
        # next_attempt_at stays (it was due when the send began): the audit reads 'interrupted', not 'retry'.
        with self.tx() as db:
            return db.execute(
                "UPDATE deliveries SET state = 'pending', updated_at = ? WHERE destination = ?"
                " AND state = 'sending' AND updated_at < ?", (time.time(), destination, marked_before),
            ).rowcount

    def note_study(self, study_instance_uid: str, reason: str) -> None:
        """Say why a study waits (shown by status); its time is now, so `release_stranded_studies` waits from the
        failure, not from the claim."""
        with self.tx() as db:
            db.execute("UPDATE studies SET reason = ?, updated_at = ? WHERE study_instance_uid = ?",
                       (one_line(reason), time.time(), study_instance_uid))

    def waiting_for_storage(self) -> list[dict[str, Any]]:
        """Studies whose outputs could not be written, waiting to retry (`note_study` with `WAITING_PREFIX`),
        oldest first."""
        return self.query("SELECT study_instance_uid, reason FROM studies WHERE state = 'analysing' AND reason LIKE ?"
                          " ORDER BY updated_at", (WAITING_PREFIX + "%",))

    def recover(self) -> dict[str, int]:
        """After a crash: interrupted work goes back one step so it is redone exactly once; a study whose
        analysis was cut `MAX_INTERRUPTED_ANALYSES` times in a row is failed instead (``dicom-node retry``)."""
        now = time.time()
        with self.tx() as db:
            # A study waiting for room on the disk (WAITING_PREFIX) was not being analysed when the node stopped.
            db.execute("UPDATE studies SET interrupted = interrupted + 1 WHERE state = 'analysing'"
                       " AND (reason IS NULL OR reason NOT LIKE ?)", (WAITING_PREFIX + "%",))
            given_up = db.execute(
                "UPDATE studies SET state = 'failed', interrupted = 0, updated_at = ?, reason = 'analysis interrupted '"
                " || interrupted || ' times in a row (the node stopped or crashed during it, e.g. out of memory): not"
                " started again automatically; dicom-node retry runs it again' WHERE state = 'analysing' AND"
                " interrupted >= ?", (now, MAX_INTERRUPTED_ANALYSES),
            ).rowcount
            a = db.execute("UPDATE studies SET state = 'complete', updated_at = ? WHERE state = 'analysing'", (now,)).rowcount
            b = db.execute("UPDATE deliveries SET state = 'pending', updated_at = ? WHERE state = 'sending'", (now,)).rowcount
            c = db.execute(
                "UPDATE associations SET state = 'aborted', ended_at = ?, reason = 'node stopped during association'"
                " WHERE state = 'open'", (now,),
            ).rowcount
            db.execute("DELETE FROM job_inputs WHERE job_id IN (SELECT id FROM jobs WHERE state = 'analysing')")
            db.execute("DELETE FROM jobs WHERE state = 'analysing'")
        return {"studies_reanalysed": a, "studies_failed_after_interruptions": given_up, "deliveries_resent": b,
                "associations_closed": c}

    # ------------------------------------------------------------------------ status (CLI, web API)

    def study_counts(self) -> dict[str, int]:
        """Number of studies in each state (every state listed)."""
        counts = {s: 0 for s in STUDY_STATES}
        for r in self.query("SELECT state, count(*) AS n FROM studies GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    def queue_depth(self) -> list[dict[str, Any]]:
        """Per destination: pending / sending / delivered / failed counts and the last error."""
        rows = self.query(
            "SELECT destination, sum(state = 'pending') AS pending, sum(state = 'sending') AS sending,"
            " sum(state = 'delivered') AS delivered, sum(state = 'failed') AS failed,"
            " min(CASE WHEN state = 'pending' THEN next_attempt_at END) AS next_attempt_at FROM deliveries"
            " GROUP BY destination ORDER BY destination"
        )
        for r in rows:
            err = self.one(
                "SELECT last_error, last_status, updated_at FROM deliveries WHERE destination = ? AND last_error IS NOT NULL"
                " ORDER BY updated_at DESC LIMIT 1", (r["destination"],),
            )
            r["last_error"] = err["last_error"] if err else None
            r["last_error_at"] = err["updated_at"] if err else None
        return rows

    def recent_studies(self, limit: int = 20, state: str | None = None) -> list[dict[str, Any]]:
        """Latest studies (optionally in one state), newest first."""
        if state:
            return self.query("SELECT * FROM studies WHERE state = ? ORDER BY updated_at DESC LIMIT ?", (state, limit))
        return self.query("SELECT * FROM studies ORDER BY updated_at DESC LIMIT ?", (limit,))

    def study_detail(self, study_instance_uid: str) -> dict[str, Any] | None:
        """A study with its jobs, outputs and deliveries (for status pages)."""
        study = self.study(study_instance_uid)
        if study is None:
            return None
        study["jobs"] = self.query("SELECT * FROM jobs WHERE study_instance_uid = ? ORDER BY id", (study_instance_uid,))
        for job in study["jobs"]:
            job["summary"] = json.loads(job["summary"]) if job.get("summary") else None
        study["outputs"] = self.query(
            "SELECT o.*, coalesce(" + SUPERSEDED_SQL + ", 0) AS superseded FROM outputs o LEFT JOIN jobs j ON j.id = o.job_id"
            " LEFT JOIN studies s ON s.study_instance_uid = o.study_instance_uid WHERE o.study_instance_uid = ?"
            " ORDER BY o.kind", (study_instance_uid,))
        study["deliveries"] = self.query(
            "SELECT * FROM deliveries WHERE study_instance_uid = ? ORDER BY destination, id", (study_instance_uid,)
        )
        return study

    def output_superseded(self, sop_instance_uid: str) -> bool:
        """True for an output made in an earlier identity epoch of its study (`SUPERSEDED_SQL`)."""
        row = self.one("SELECT " + SUPERSEDED_SQL + " AS old FROM outputs o JOIN jobs j ON j.id = o.job_id JOIN studies s"
                       " ON s.study_instance_uid = o.study_instance_uid WHERE o.sop_instance_uid = ?", (sop_instance_uid,))
        return bool(row and row["old"])

    def recent_associations(self, limit: int = 20) -> list[dict[str, Any]]:
        """Latest associations (audit)."""
        return self.query("SELECT * FROM associations ORDER BY id DESC LIMIT ?", (limit,))

    # ------------------------------------------------------------------ operator surface (web, CLI)

    def record_action(self, action: str, actor: str, outcome: str, *, target: str | None = None,
                      study_instance_uid: str | None = None, destination: str | None = None,
                      peer: str | None = None, detail: str | None = None) -> int:
        """Audit an operator action (who, what, on what, outcome); returns the event id."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO audit_events (at, kind, action, actor, peer, destination, study_instance_uid, target,"
                " outcome, detail) VALUES (?, 'action', ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), action, actor, peer, destination, study_instance_uid, target, outcome, detail),
            )
            return int(cur.lastrowid or 0)

    def record_retry(self, actor: str, deliveries: int, analyses: int | None = None, *, target: str,
                     study_instance_uid: str | None = None, destination: str | None = None) -> None:
        """Audit a retry: what it re-queued (`analyses` None: deliveries only were asked for), or that there was
        nothing to retry (refused)."""
        done = bool(deliveries or analyses)
        if done:
            detail = f"re-queued {deliveries} delivery(ies)" + ("" if analyses is None else f", {analyses} analysis(es)")
        else:
            detail = "nothing to retry: no failed delivery" + ("" if analyses is None else " or analysis")
        self.record_action("retry", actor, "ok" if done else "refused", target=target, study_instance_uid=study_instance_uid,
                           destination=destination, detail=detail)

    def audit_events(self, *, since: float | None = None, until: float | None = None,
                     kinds: Sequence[str] = (), study_instance_uid: str | None = None,
                     limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        """Audit trail rows (associations, deliveries, operator actions) in time order."""
        where: list[str] = ["1"]
        params: list[Any] = []
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if until is not None:
            where.append("at < ?")
            params.append(until)
        if kinds:
            where.append(f"kind IN ({', '.join('?' for _ in kinds)})")
            params.extend(kinds)
        if study_instance_uid:
            where.append("study_instance_uid = ?")
            params.append(study_instance_uid)
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM audit_events WHERE {' AND '.join(where)} ORDER BY at {order}, id {order}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self.query(sql, params)

    def counters(self) -> list[dict[str, Any]]:
        """Monotonic totals (metric, a, b, value) kept by the audit trigger."""
        return self.query("SELECT metric, a, b, value FROM counters ORDER BY metric, a, b")

    def open_association_instances(self) -> dict[str, int]:
        """Instances received so far on associations still open, by calling AE (not yet in `counters`)."""
        return {r["calling_ae"]: int(r["n"] or 0) for r in self.query(
            "SELECT calling_ae, sum(instances) AS n FROM associations WHERE state = 'open' GROUP BY calling_ae")}

    def open_associations(self) -> int:
        """Associations currently open."""
        row = self.one("SELECT count(*) AS n FROM associations WHERE state = 'open'")
        return int(row["n"]) if row else 0

    def record_analysis_seconds(self, study_instance_uid: str, analysis: str, input_key: str, seconds: float) -> None:
        """Wall time of the analysis run of one job (the job is identified by its input)."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET analysis_seconds = ? WHERE study_instance_uid = ? AND analysis = ?"
                       " AND input_key = ?", (seconds, study_instance_uid, analysis, input_key))

    def job_counts(self) -> list[dict[str, Any]]:
        """Jobs per analysis and state. A job that newer work replaced (instances that arrived during its
        analysis, a corrected patient identity, a re-analysis asked for) is kept as 'failed' so that it is never
        taken for done, but counts as 'superseded': nothing in it failed, and an alert on failed jobs must not
        fire for it."""
        return self.query(
            "SELECT analysis, CASE WHEN state = 'failed' AND (reason LIKE 'superseded:%' OR reason = ?)"
            " THEN 'superseded' ELSE state END AS state, count(*) AS n FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
            (REANALYSIS_REQUESTED,))

    def oldest_waiting(self) -> dict[str, float]:
        """Per unsettled study state, the oldest `updated_at` (how long the longest-waiting study has waited)."""
        return {r["state"]: r["t"] for r in self.query(
            "SELECT state, min(updated_at) AS t FROM studies WHERE state IN ('received', 'complete', 'analysing',"
            " 'encoded') GROUP BY state")}

    def oldest_pending_deliveries(self) -> dict[str, float]:
        """Per destination, when the oldest delivery still pending or sending was queued."""
        return {r["destination"]: r["t"] for r in self.query(
            "SELECT destination, min(created_at) AS t FROM deliveries WHERE state IN ('pending', 'sending')"
            " GROUP BY destination")}

    def last_received_at(self) -> float | None:
        """When the last source instance arrived."""
        row = self.one("SELECT max(last_received_at) AS t FROM studies")
        return row["t"] if row else None

    def activity_since(self, since: float) -> dict[str, Any]:
        """Throughput for the overview: associations, instances, studies settled, deliveries, failures."""
        ev = {(r["kind"], r["action"]): (int(r["n"]), int(r["instances"] or 0)) for r in self.query(
            "SELECT kind, action, count(*) AS n, sum(instances) AS instances FROM audit_events WHERE at >= ?"
            " GROUP BY kind, action", (since,))}
        studies = {r["state"]: int(r["n"]) for r in self.query(
            "SELECT state, count(*) AS n FROM studies WHERE updated_at >= ? GROUP BY state", (since,))}
        seconds = self.one("SELECT count(*) AS n, avg(analysis_seconds) AS mean, max(analysis_seconds) AS worst"
                           " FROM jobs WHERE updated_at >= ? AND analysis_seconds IS NOT NULL", (since,))
        return {
            "since": since,
            "associations": sum(n for (k, _), (n, _i) in ev.items() if k == "association"),
            "associations_rejected": ev.get(("association", "rejected"), (0, 0))[0],
            "instances_received": sum(i for (k, _), (_n, i) in ev.items() if k == "association")
            + sum(self.open_association_instances().values()),
            "studies_received": int((self.one("SELECT count(*) AS n FROM studies WHERE first_received_at >= ?",
                                              (since,)) or {"n": 0})["n"]),
            "studies_delivered": studies.get(DELIVERED, 0),
            "studies_failed": studies.get(FAILED, 0),
            "deliveries": ev.get(("delivery", "delivered"), (0, 0))[0],
            "delivery_failures": ev.get(("delivery", "failed"), (0, 0))[0] + ev.get(("delivery", "retry"), (0, 0))[0],
            "analyses": int(seconds["n"]) if seconds else 0,
            "analysis_seconds_mean": seconds["mean"] if seconds else None,
            "analysis_seconds_max": seconds["worst"] if seconds else None,
        }

    def studies_page(self, *, state: str | None = None, flagged: bool | None = None, since: float | None = None,
                     until: float | None = None, uid_prefix: str | None = None, limit: int = 50,
                     offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Studies for the list view, newest activity first, with their latest result summaries;
        returns (total matching, rows).  `since` / `until` filter on when the study was first received."""
        where: list[str] = ["1"]
        params: list[Any] = []
        if state:
            where.append("s.state = ?")
            params.append(state)
        if since is not None:
            where.append("s.first_received_at >= ?")
            params.append(since)
        if until is not None:
            where.append("s.first_received_at < ?")
            params.append(until)
        if uid_prefix:
            where.append("s.study_instance_uid LIKE ? ESCAPE '!'")
            params.append(uid_prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%")
        if flagged is not None:
            # Flagged: the latest result of any of the study's analyses says so.
            where.append(("" if flagged else "NOT ") + "EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid ="
                         " s.study_instance_uid AND json_extract(j.summary, '$.flagged') = 1 AND j.id = (SELECT"
                         " max(k.id) FROM jobs k WHERE k.study_instance_uid = j.study_instance_uid AND k.analysis ="
                         " j.analysis AND k.summary IS NOT NULL))")
        cond = " AND ".join(where)
        total = int((self.one(f"SELECT count(*) AS n FROM studies s WHERE {cond}", params) or {"n": 0})["n"])
        rows = self.query(
            "SELECT s.*, (SELECT group_concat(DISTINCT i.modality) FROM instances i WHERE i.study_instance_uid ="
            " s.study_instance_uid AND i.own_output = 0) AS modalities, (SELECT i.study_description FROM instances i"
            " WHERE i.study_instance_uid = s.study_instance_uid AND i.own_output = 0 LIMIT 1) AS study_description,"
            " (SELECT count(*) FROM deliveries d WHERE d.study_instance_uid = s.study_instance_uid"
            " AND d.state != 'withdrawn') AS deliveries,"  # (one withdrawn will never be delivered: not owed)
            " (SELECT count(*) FROM deliveries d WHERE d.study_instance_uid = s.study_instance_uid AND d.state ="
            f" 'delivered') AS delivered FROM studies s WHERE {cond} ORDER BY s.updated_at DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        summaries = self.latest_summaries([r["study_instance_uid"] for r in rows])
        for r in rows:
            r["results"] = summaries.get(r["study_instance_uid"], [])
        return total, rows

    def latest_summaries(self, study_uids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Per study, the latest result summary of each analysis (jobs that produced one)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for start in range(0, len(study_uids), 500):
            chunk = list(study_uids[start:start + 500])
            for r in self.query(
                "SELECT study_instance_uid, analysis, state, summary, analysis_seconds FROM jobs WHERE summary IS NOT"
                f" NULL AND study_instance_uid IN ({', '.join('?' for _ in chunk)}) ORDER BY id", chunk,
            ):
                summary = json.loads(r["summary"])
                summary["job_state"] = r["state"]
                summary["analysis_seconds"] = r["analysis_seconds"]
                out.setdefault(r["study_instance_uid"], {})[r["analysis"]] = summary
        return {uid: list(by_analysis.values()) for uid, by_analysis in out.items()}

    def study_associations(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Associations that brought a study's source instances (while the instance rows exist)."""
        return self.query(
            "SELECT a.*, count(i.sop_instance_uid) AS study_instances FROM associations a JOIN instances i ON"
            " i.association_id = a.id WHERE i.study_instance_uid = ? AND i.own_output = 0 GROUP BY a.id ORDER BY a.id",
            (study_instance_uid,),
        )

    def request_reanalysis(self, study_instance_uid: str) -> str | None:
        """Send a settled study (delivered, failed, unrouted) back to `complete` so the pipeline routes and
        analyses it again through its usual states; returns None, or why it cannot be done now.

        Its earlier jobs are marked superseded (state failed) so that the pipeline runs them again instead of
        skipping an input it has seen; outputs that come out identical keep their UIDs and are not resent.
        """
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state FROM studies WHERE study_instance_uid = ?", (study_instance_uid,)).fetchone()
            if row is None:
                return "no such study"
            if row[0] not in (DELIVERED, FAILED, UNROUTED):
                return f"the study is {row[0]}; re-analyse once it is delivered, failed or unrouted"
            if db.execute("SELECT 1 FROM deliveries WHERE study_instance_uid = ? AND state IN ('pending', 'sending')",
                          (study_instance_uid,)).fetchone():
                return "deliveries of this study are still under way"
            db.execute("UPDATE jobs SET state = 'failed', reason = ?, updated_at = ? WHERE study_instance_uid = ?",
                       (REANALYSIS_REQUESTED, now, study_instance_uid))
            db.execute("UPDATE studies SET state = 'complete', reason = NULL, interrupted = 0, updated_at = ? WHERE"
                       " study_instance_uid = ?", (now, study_instance_uid))
        return None

    def change_marks(self) -> dict[str, Any]:
        """Cheap markers that move whenever a study, a delivery or the audit trail changes (page refresh)."""
        row = self.one("SELECT (SELECT max(updated_at) FROM studies) AS studies, (SELECT max(updated_at) FROM"
                       " deliveries) AS deliveries, (SELECT max(id) FROM audit_events) AS audit,"
                       " (SELECT count(*) FROM studies) AS study_count")
        return dict(row or {})

    def probe_writable(self, timeout_s: float = 2.0) -> str | None:
        """Write one row on a fresh connection with a short lock timeout; None when it worked, else why."""
        try:
            conn = sqlite3.connect(str(self.path), timeout=timeout_s)
        except sqlite3.Error as exc:
            return f"cannot open {self.path.name}: {exc}"
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO probes (name, at) VALUES ('readyz', ?) ON CONFLICT(name) DO UPDATE SET"
                         " at = excluded.at", (time.time(),))
            conn.execute("COMMIT")
            return None
        except sqlite3.Error as exc:
            return f"{self.path.name} not writable: {exc}"
        finally:
            _close_quietly(conn)

    # ------------------------------------------------------------------------------- retention

    def purgeable_studies(self, delivered_before: float) -> list[str]:
        """Delivered (or unrouted) studies last touched before the cut-off that still hold instances (the
        others were purged already: every pass would otherwise take the write lock once per study ever seen)."""
        return [r["study_instance_uid"] for r in self.query(
            "SELECT study_instance_uid FROM studies s WHERE state IN ('delivered', 'unrouted') AND updated_at < ?"
            " AND EXISTS (SELECT 1 FROM instances i WHERE i.study_instance_uid = s.study_instance_uid)",
            (delivered_before,),
        )]

    def purge_outputs(self, created_before: float) -> list[str]:
        """Mark outputs of settled studies (an unrouted one had outputs when all its images were moved out)
        older than the cut-off purged; returns their file paths.

        An output some destination has not received (its delivery failed) is kept: `dicom-node retry` must
        still find it. The rows stay so that an output coming back from PACS is still recognised as the
        node's own.
        """
        with self.tx() as db:
            rows = db.execute(
                "SELECT o.sop_instance_uid, o.path FROM outputs o JOIN studies s ON s.study_instance_uid ="
                " o.study_instance_uid WHERE o.purged_at IS NULL AND o.created_at < ? AND s.state IN"
                " ('delivered', 'failed', 'unrouted') AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE"
                " d.output_sop_instance_uid = o.sop_instance_uid AND d.state NOT IN ('delivered', 'withdrawn'))",
                (created_before,),
            ).fetchall()
            now = time.time()
            for sop, _ in rows:
                db.execute("UPDATE outputs SET purged_at = ? WHERE sop_instance_uid = ?", (now, sop))
            return [path for _, path in rows]

    def forget_instances(self, study_instance_uid: str) -> list[str]:
        """Drop a study's instance rows; returns their file paths (the caller deletes the files)."""
        with self.tx() as db:
            paths = [r[0] for r in db.execute(
                "SELECT path FROM instances WHERE study_instance_uid = ?", (study_instance_uid,)).fetchall()]
            db.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_instance_uid,))
            db.execute("UPDATE studies SET instances_purged_at = ? WHERE study_instance_uid = ?",
                       (time.time(), study_instance_uid))
            return paths


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def _statements(script: str) -> list[str]:
    # sqlite3.complete_statement knows that a trigger's inner ';' do not end the CREATE TRIGGER.
    out, buf = [], []
    for line in script.splitlines():
        code = line.split("--", 1)[0]
        buf.append(code)
        if code.rstrip().endswith(";") and sqlite3.complete_statement("\n".join(buf)):
            stmt = "\n".join(buf).strip()
            if stmt.strip(";").strip():
                out.append(stmt)
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return out
