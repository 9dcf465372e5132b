"""Fast tests of the operator surface's parts: [http] settings, credentials, the audit trail and its
counters as the database records them, time filters."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from dicom_node.db import Database, InstanceRecord
from dicom_node.errors import ConfigError
from dicom_node.settings import Overrides, load, validate
from dicom_node.web.auth import Authenticator, hash_password, local_token, verify_password
from dicom_node.web.views import parse_when


def _http(**kw: object) -> dict:
    return {"http": {"enabled": True, **kw}}


def test_http_settings_defaults_and_problems() -> None:
    s = load(env={})
    assert (s.http.enabled, s.http.host, s.http.port, s.http.show_phi) == (True, "127.0.0.1", 8480, False)
    assert validate({}).http.enabled is False  # no [http] section: no server
    with pytest.raises(ConfigError) as err:
        validate({"node": {"port": 9000}, "http": {"enabled": True, "port": 9000,
                                                   "tokens": [{"id": "a", "token": "x" * 16},
                                                              {"id": "a", "token": "y" * 16},
                                                              {"id": "b", "token": "short"}],
                                                   "users": [{"name": "u", "password_hash": "plain"}]}})
    text = "\n".join(err.value.problems)
    assert "http.tokens[2].token: String should have at least 16 characters" in text
    assert "http.users[0] (u).password_hash: must be pbkdf2_sha256" in text and "hash-password" in text
    assert "short" not in text and "plain" not in text  # secrets are never echoed
    assert "http.tokens[1].id: 'a' used more than once" in text
    assert "http.port: 9000 is also the DICOM port" in text


def test_cli_and_environment_enable_http_and_add_tokens() -> None:
    s = load(env={}, overrides=Overrides(http_port=9123, http_token="t" * 20))
    assert s.http.enabled and s.http.port == 9123
    assert [(t.id, t.token) for t in s.http.tokens] == [("cli", "t" * 20)]
    s = load(env={"DICOM_NODE_HTTP_PORT": "9124", "DICOM_NODE_HTTP_TOKEN": "e" * 20})
    assert s.http.port == 9124 and [t.id for t in s.http.tokens] == ["env"]


def test_passwords_tokens_and_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = hash_password("correct horse", iterations=1000)
    assert verify_password("correct horse", encoded) and not verify_password("wrong", encoded)
    http = validate(_http(tokens=[{"id": "ops", "token": "o" * 20}],
                          users=[{"name": "alice", "password_hash": encoded}])).http
    a = Authenticator(http)
    assert a.from_headers(f"Bearer {'o' * 20}", None).actor == "token:ops"
    assert a.from_headers("Bearer " + "o" * 19, None) is None
    basic = base64.b64encode(b"alice:correct horse").decode()
    p = a.from_headers(f"Basic {basic}", None)
    assert p.actor == "user:alice" and p.ambient
    assert a.from_headers("Basic " + base64.b64encode(b"alice:nope").decode(), None) is None
    # The verified header is remembered (browsers resend it with every poll), the wrong one is not.
    assert len(a._verified) == 1 and a.from_headers(f"Basic {basic}", None).actor == "user:alice"
    # Guessing: after BASIC_MAX_FAILURES wrong passwords in the window, that name is refused unchecked (no
    # PBKDF2 per guess), even with the right password; the cached header above and tokens still work.
    from dicom_node.web import auth

    guesses = [0]
    real_verify = auth.verify_password

    def counting_verify(password: str, encoded: str) -> bool:
        guesses[0] += 1
        return real_verify(password, encoded)

    monkeypatch.setattr(auth, "verify_password", counting_verify)
    fresh = Authenticator(http)
    for k in range(auth.BASIC_MAX_FAILURES + 3):
        assert fresh.from_headers("Basic " + base64.b64encode(f"alice:guess{k}".encode()).decode(), None) is None
    assert guesses[0] == auth.BASIC_MAX_FAILURES
    assert fresh.from_headers(f"Basic {basic}", None) is None and guesses[0] == auth.BASIC_MAX_FAILURES
    assert fresh.from_headers(f"Bearer {'o' * 20}", None).actor == "token:ops"
    fresh._failures["alice"] = [t - auth.BASIC_FAILURE_WINDOW_S for t in fresh._failures["alice"]]  # a minute on
    assert fresh.from_headers(f"Basic {basic}", None).actor == "user:alice"
    cookie = a.session_value("ops")
    assert a.from_headers(None, cookie).via == "cookie"
    assert a.from_headers(None, "ops." + "0" * 64) is None
    # Changing the token ends the sessions opened with it.
    b = Authenticator(validate(_http(tokens=[{"id": "ops", "token": "n" * 20}])).http)
    assert b.from_headers(None, cookie) is None
    # The local token file: created once, private, stable.
    t1 = local_token(tmp_path)
    assert (tmp_path / "http-token").stat().st_mode & 0o777 == 0o600
    assert local_token(tmp_path) == t1 and len(t1) >= 16


def _instance(uid: str, study: str, assoc: int) -> InstanceRecord:
    return InstanceRecord(uid, study, study + ".1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1", "DX",
                          "LSPINE", "LL", "", "", "", "MOD1", assoc, f"/x/{uid}.dcm", 10)


def test_audit_trail_and_counters_follow_the_database(tmp_path: Path) -> None:
    db = Database(tmp_path / "node.sqlite")
    a = db.open_association("MOD1", "AINODE", "10.0.0.8", 40000)
    for i in range(3):
        db.record_instance(_instance(f"1.2.3.{i}", "1.2.3", a))
    assert db.open_association_instances() == {"MOD1": 3}
    assert db.counters() == []  # nothing ended yet
    db.end_association(a, "released")
    db.record_rejected_association("EVIL", "AINODE", "10.0.0.9", 40001, "calling AE 'EVIL' is not an allowed peer")
    job = db.start_job("1.2.3", "x", "rule", "k", 1)
    db.record_outputs(job["id"], {"flagged": True}, [{
        "sop_instance_uid": "9.9", "study_instance_uid": "1.2.3", "series_instance_uid": "9", "sop_class_uid": "1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "kind": "sr", "variant": "any", "path": "/o", "size": 1}],
        [("9.9", "pacs")])
    (d,) = db.due_deliveries("pacs", time.time() + 1, 10)
    db.mark_sending([d["id"]])
    db.mark_retry(d["id"], time.time() + 5, "cannot connect to PACS@h:1", None)
    db.mark_sending([d["id"]])
    db.mark_failed(d["id"], "status 0xC000 from PACS@h:1", 0xC000)
    db.requeue_failed(destination="pacs")
    db.record_action("retry", "token:ops", "ok", target="pacs", destination="pacs")
    db.mark_sending([d["id"]])
    db.recover()  # a restart while sending: the attempt is 'interrupted'
    db.mark_sending([d["id"]])
    db.mark_delivered(d["id"], 0)

    events = db.audit_events()
    assert [(e["kind"], e["action"], e["outcome"]) for e in events] == [
        ("association", "released", "ok"), ("association", "rejected", "refused"), ("delivery", "retry", "failed"),
        ("delivery", "failed", "failed"), ("action", "retry", "ok"), ("delivery", "interrupted", "failed"),
        ("delivery", "delivered", "ok")]
    assert events[0]["instances"] == 3 and events[0]["peer"] == "10.0.0.8:40000"
    assert events[3]["status"] == 0xC000 and "0xC000" in events[3]["detail"]
    counters = {(c["metric"], c["a"], c["b"]): c["value"] for c in db.counters()}
    assert counters[("instances_received", "MOD1", "")] == 3
    assert counters[("associations", "", "released")] == 1 and counters[("associations", "", "rejected")] == 1
    for outcome in ("retry", "failed", "interrupted", "delivered"):
        assert counters[("deliveries", "pacs", outcome)] == 1
    assert counters[("actions", "retry", "ok")] == 1
    assert counters[("last_delivered_at", "pacs", "")] == pytest.approx(time.time(), abs=60)
    assert db.open_association_instances() == {}


def test_migration_backfills_the_trail_of_an_older_database(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node import db as dbmod

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
    for version, (name, sql) in enumerate(dbmod.MIGRATIONS[:2], start=1):
        for stmt in dbmod._statements(sql):
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))
    conn.execute("INSERT INTO associations (calling_ae, called_ae, started_at, ended_at, state, instances)"
                 " VALUES ('OLDPACS', 'AINODE', 1, 2, 'released', 7)")
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.schema_version() == len(dbmod.MIGRATIONS)
    assert [(e["actor"], e["instances"]) for e in db.audit_events(kinds=["association"])] == [("OLDPACS", 7)]
    assert {(c["metric"], c["a"]): c["value"] for c in db.counters()}[("instances_received", "OLDPACS")] == 7


def test_time_filters() -> None:
    day = parse_when("2026-11-20")
    assert parse_when("2026-11-20", end=True) - day == pytest.approx(86400, abs=3600)  # DST days differ by 1 h
    assert parse_when("2026-11-20T10:00:00+00:00") == pytest.approx(1795168800)
    assert parse_when(None) is None
    with pytest.raises(ValueError, match="2026-13-01"):
        parse_when("2026-13-01")
