"""The JSON API, health, readiness, metrics and audit of a running node (real sockets: dcmtk storescu in,
dcmtk storescp out, HTTP over loopback)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import TOKEN, destination
from nodekit import make_study
from peers import dicom_node_executable, free_port, port_open, repo_env, storescu, wait_for

from dicom_node.web.auth import hash_password
from inference.synth.dicom import Patient

pytestmark = pytest.mark.e2e

PATIENT = Patient(name="DOE^JANE^Q", patient_id="PHI-4711-X", birth_date="19471103", accession="ACC-PHI-88",
                  study_description="XR LSPINE FLAG")


def study_state(node, uid: str) -> str:
    return node.api(f"/api/studies/{uid}")["state"]


def metric(text: str, name: str, **labels: str) -> float | None:
    """Value of one sample of the Prometheus text `text` (None when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def test_everything_but_healthz_needs_credentials(web_node_factory) -> None:
    alice = hash_password("alice-secret", iterations=1000)
    node = web_node_factory(http={"users": [{"name": "alice", "password_hash": alice}]})
    with httpx.Client(base_url=node.url, timeout=10, follow_redirects=False) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        for path in ("/readyz", "/metrics", "/api/studies", "/api/overview", "/api/config", "/api/audit",
                     "/api/destinations", "/api/models", "/api/studies/1.2.3"):
            rsp = anon.get(path)
            assert rsp.status_code == 401, path
            assert "Bearer" in rsp.headers["www-authenticate"] and "Basic" in rsp.headers["www-authenticate"]
        for path in ("/api/studies/1.2.3/retry", "/api/studies/1.2.3/reanalyse", "/api/destinations/x/echo"):
            assert anon.post(path).status_code == 401, path
        for page in ("/", "/studies", "/config", "/audit", "/models"):
            rsp = anon.get(page)
            assert rsp.status_code == 303 and rsp.headers["location"].startswith("/login?next="), page
        assert anon.get("/readyz", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        bad = base64.b64encode(b"alice:nope").decode()
        assert anon.get("/api/studies", headers={"Authorization": f"Basic {bad}"}).status_code == 401
        good = base64.b64encode(b"alice:alice-secret").decode()
        assert anon.get("/api/studies", headers={"Authorization": f"Basic {good}"}).status_code == 200
        # Basic auth is sent by browsers on their own: changing requests need the CSRF header too.
        assert anon.post("/api/studies/1.2.3/retry", headers={"Authorization": f"Basic {good}"}).status_code == 403
        assert anon.post("/api/studies/1.2.3/retry", headers={"Authorization": f"Basic {good}",
                                                              "X-Requested-With": "dicom-node"}).status_code == 404
        # Login with the token: a session cookie, audited; a wrong token is refused and audited too.
        assert anon.post("/login", data={"token": "nope", "next": "/studies"}).headers["location"].startswith(
            "/login?failed=1")
        rsp = anon.post("/login", data={"token": TOKEN, "next": "//evil.example/"})
        assert rsp.status_code == 303 and rsp.headers["location"] == "/"
        cookie = rsp.cookies["dicom_node_session"]
        assert "httponly" in rsp.headers["set-cookie"].lower() and "samesite=strict" in rsp.headers["set-cookie"].lower()
    with httpx.Client(base_url=node.url, timeout=10, cookies={"dicom_node_session": cookie}) as browser:
        assert browser.get("/studies").status_code == 200
        assert browser.post("/api/destinations/x/retry").status_code == 403
    actions = node.api("/api/audit?kind=action")["events"]
    assert [(e["action"], e["actor"], e["outcome"]) for e in actions] == [
        ("login", "token:ops", "ok"), ("login", "unknown", "refused"), ("retry", "user:alice", "refused")]
    metrics = node.client().get("/metrics").text
    assert metric(metrics, "dicom_node_http_auth_failures_total", path_group="api") >= 9


def test_a_study_from_storescu_to_storescp_through_the_api(web_node_factory, storescp_factory, tmp_path) -> None:
    pacs = storescp_factory()
    node = web_node_factory(destinations=[destination("pacs", pacs.port)])
    files = make_study(tmp_path / "in", "api1", images=2, patient=PATIENT)
    storescu(files, node.port)
    uid = node.api("/api/studies")["studies"][0]["study_instance_uid"]
    wait_for(lambda: study_state(node, uid) == "delivered", 60, what="study delivered")

    listing = node.api("/api/studies")
    (row,) = listing["studies"]
    assert row["flagged"] and row["findings"] == 2 and row["deliveries"] == {"delivered": 7, "total": 7}
    assert row["verdicts"] == [{"analysis": "web-test-screening", "verdict": "finding present", "hardware": None,
                                "flagged": True}]
    assert node.api("/api/studies?flagged=true")["total"] == 1 and node.api("/api/studies?flagged=false")["total"] == 0
    # The same flag in `dicom-node status`, with what was found, for IT working from a shell.
    status = subprocess.run([*dicom_node_executable(), "status", "--data-dir", str(node.service.settings.data_dir)],
                            capture_output=True, text=True, timeout=60, env=repo_env())
    assert status.returncode == 0, status.stderr
    flagged_lines = status.stdout.split("flagged studies: 1", 1)[1].split("recent studies:", 1)[0]
    assert uid in flagged_lines and "anterior height loss 30 % (test)" in flagged_lines
    assert "DOE^JANE" not in status.stdout and "PHI-4711-X" not in status.stdout  # no patient data on the console
    assert node.api("/api/studies?state=failed")["total"] == 0
    assert node.api(f"/api/studies?q={uid[:12]}")["total"] == 1
    today = row["first_received_at"][:10]
    assert node.api(f"/api/studies?since={today}&until={today}")["total"] == 1
    assert node.api("/api/studies?until=2000-01-01")["total"] == 0
    with node.client() as c:
        assert c.get("/api/studies?since=yesterday").status_code == 400
        assert c.get("/api/studies?state=lost").status_code == 400
        # Odd values are the caller's mistake (400), never a server error (they gave 500 before).
        for odd in ("q=" + "1" * 60000, "q=%25", "q=hello", "until=9999-12-31", "offset=" + "9" * 30):
            answer = c.get(f"/api/studies?{odd}")
            assert answer.status_code in (200, 400), (odd[:30], answer.status_code)
        assert c.get("/api/studies?offset=" + "9" * 30).json()["studies"] == []

    s = node.api(f"/api/studies/{uid}")
    assert s["routing"]["routed"] and s["routing"]["matches"][0]["destinations"] == ["pacs"]
    assert s["routing"]["matches"][0]["instances_selected"] == 2
    (job,) = s["results"]
    assert job["state"] == "delivered" and job["analysis_seconds"] > 0
    assert [f["kind"] for f in job["findings"]] == ["vertebral compression fracture"] * 2
    assert sorted(o["kind"] for o in s["outputs"]) == ["pr", "pr", "sc", "sc", "seg", "seg", "sr"]
    assert {d["state"] for d in s["deliveries"]} == {"delivered"} and len(s["deliveries"]) == 7
    assert [e["action"] for e in s["log"]].count("delivered") == 7
    assert s["associations"][0]["calling_ae"] == "STORESCU" and s["associations"][0]["study_instances"] == 2
    assert len(pacs.files()) == 7

    # The annotated Secondary Capture as a PNG thumbnail (the synthetic source has no burned-in text).
    sc = next(o for o in s["outputs"] if o["kind"] == "sc")
    with node.client() as c:
        png = c.get(sc["thumbnail"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get(sc["thumbnail"] + "?size=full").status_code == 200
        seg = next(o for o in s["outputs"] if o["kind"] == "seg")
        assert c.get(f"/api/studies/{uid}/outputs/{seg['sop_instance_uid']}/image.png").status_code == 404

    # Patient data never leaves the node without show_phi: not in the API, not in any page.
    with node.client() as c:
        bodies = [c.get(p).text for p in ("/api/studies", f"/api/studies/{uid}", "/api/overview", "/api/audit",
                                           "/", "/studies", f"/studies/{uid}", "/audit", "/metrics")]
    for body in bodies:
        for value in ("DOE^JANE", "DOE", "PHI-4711-X", "19471103", "ACC-PHI-88"):
            assert value not in body

    # The node records an association's end in its release handler, which may run after storescu has exited
    # (seen on a loaded machine): wait for it, then read the metrics once.
    wait_for(lambda: metric(node.client().get("/metrics").text, "dicom_node_associations_total", state="released"), 30,
             what="association end recorded")
    text = node.client().get("/metrics").text
    assert metric(text, "dicom_node_instances_received_total", calling_ae="STORESCU") == 2
    assert metric(text, "dicom_node_associations_total", state="released") == 1
    assert metric(text, "dicom_node_delivery_attempts_total", destination="pacs", outcome="delivered") == 7
    assert metric(text, "dicom_node_studies", state="delivered") == 1
    assert metric(text, "dicom_node_delivery_queue", destination="pacs", state="pending") == 0
    assert metric(text, "dicom_node_oldest_pending_delivery_age_seconds", destination="pacs") == 0
    assert metric(text, "dicom_node_analysis_seconds_count", analysis="web-test-screening", outcome="ok") == 1
    assert metric(text, "dicom_node_analysis_ready", analysis="web-test-screening") == 1
    assert metric(text, "dicom_node_dicom_listener_up") == 1 and metric(text, "dicom_node_disk_free_bytes") > 0
    assert metric(text, "dicom_node_last_delivery_timestamp_seconds", destination="pacs") > 0


def test_phi_is_shown_only_when_enabled(web_node_factory, tmp_path) -> None:
    node = web_node_factory(http={"show_phi": True})
    hostile = Patient(name=PATIENT.name, patient_id=PATIENT.patient_id, birth_date=PATIENT.birth_date,
                      accession=PATIENT.accession, study_description='XR <script>alert(1)</script> SPINE')
    storescu(make_study(tmp_path / "in", "phi1", images=1, patient=hostile), node.port)
    uid = wait_for(lambda: node.api("/api/studies")["studies"], 30, what="study listed")[0]["study_instance_uid"]
    s = node.api(f"/api/studies/{uid}")
    assert s["patient"]["patient_name"] == "DOE^JANE^Q" and s["patient"]["patient_id"] == "PHI-4711-X"
    assert s["patient"]["birth_date"] == "19471103" and s["patient"]["accession_number"] == "ACC-PHI-88"
    assert node.api("/api/studies")["studies"][0]["patient"]["patient_id"] == "PHI-4711-X"
    with node.client() as c:
        page = c.get(f"/studies/{uid}")
        assert "DOE^JANE^Q" in page.text
        # DICOM text is data, never markup: escaped, and the policy allows only the node's own scripts.
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
    # ... and the database still holds none of it.
    dump = "\n".join(node.service.db.db.conn.iterdump())
    assert "PHI-4711-X" not in dump and "DOE^JANE" not in dump


def test_retry_a_failed_delivery_once_the_destination_is_back(web_node_factory, storescp_factory, tmp_path) -> None:
    port = free_port()
    node = web_node_factory(destinations=[destination("pacs", port)], max_attempts=2, backoff_initial_s=0.2,
                            backoff_max_s=0.2)
    storescu(make_study(tmp_path / "in", "retry1", images=1), node.port)
    uid = wait_for(lambda: node.api("/api/studies")["studies"], 30, what="study listed")[0]["study_instance_uid"]
    wait_for(lambda: study_state(node, uid) == "failed", 60, what="study failed (destination down)")
    s = node.api(f"/api/studies/{uid}")
    assert s["actions"]["retry"] and "not delivered" in s["reason"]
    assert {d["state"] for d in s["deliveries"]} == {"failed"}
    assert all("cannot connect" in d["last_error"] for d in s["deliveries"])
    dests = node.api("/api/destinations")["destinations"]
    assert dests[0]["queue"]["failed"] == 4 and "cannot connect" in dests[0]["last_error"]
    echo = node.post("/api/destinations/pacs/echo").json()
    assert echo["ok"] is False and "cannot connect" in echo["message"]

    pacs = storescp_factory(port=port)  # the destination comes back on its address
    assert node.post("/api/destinations/pacs/echo").json()["ok"] is True
    rsp = node.post(f"/api/studies/{uid}/retry")
    assert rsp.status_code == 200 and rsp.json()["requeued"] == {"deliveries": 4, "studies": 0}
    wait_for(lambda: study_state(node, uid) == "delivered", 60, what="study delivered after retry")
    assert len(pacs.files()) == 4
    assert node.post(f"/api/studies/{uid}/retry").status_code == 409  # nothing left to retry

    log = node.api(f"/api/studies/{uid}")["log"]
    kinds = [(e["kind"], e["action"]) for e in reversed(log)]
    # While the destination was down: each output tried twice (one retry, then failed).  After the operator's
    # retry all four were delivered; a resend on a new association may come first (seen under load: pynetdicom
    # 3.0.4's reactor took a C-STORE response off the queue, the send timed out and was retried), never a failure.
    operator_retry = kinds.index(("action", "retry"))
    down = kinds[:operator_retry]
    after = [k for k in kinds[operator_retry + 1:] if k[0] == "delivery"]
    assert down.count(("delivery", "retry")) == 4 and down.count(("delivery", "failed")) == 4
    assert after.count(("delivery", "delivered")) == 4 and set(after) <= {("delivery", "delivered"), ("delivery", "retry")}
    resent = after.count(("delivery", "retry"))
    retry = next(e for e in log if e["kind"] == "action")
    assert retry["actor"] == "token:ops" and retry["study_instance_uid"] == uid
    text = node.client().get("/metrics").text
    assert metric(text, "dicom_node_delivery_attempts_total", destination="pacs", outcome="failed") == 4
    assert metric(text, "dicom_node_delivery_attempts_total", destination="pacs", outcome="retry") == 4 + resent
    assert metric(text, "dicom_node_operator_actions_total", action="echo", outcome="failed") == 1
    assert metric(text, "dicom_node_operator_actions_total", action="retry", outcome="ok") == 1


def test_reanalyse_goes_through_the_pipeline_and_counters_survive_a_restart(web_node_factory, tmp_path) -> None:
    node = web_node_factory()
    storescu(make_study(tmp_path / "in", "re1", images=1), node.port)
    uid = wait_for(lambda: node.api("/api/studies")["studies"], 30, what="study listed")[0]["study_instance_uid"]
    wait_for(lambda: study_state(node, uid) == "delivered", 60, what="study settled")
    first = node.api(f"/api/studies/{uid}")["results"][0]
    rsp = node.post(f"/api/studies/{uid}/reanalyse")
    assert rsp.status_code == 200 and rsp.json() == {"state": "complete"}
    wait_for(lambda: study_state(node, uid) == "delivered", 60, what="study analysed again")
    again = node.api(f"/api/studies/{uid}")
    assert again["results"][0]["id"] == first["id"] and again["results"][0]["state"] == "delivered"
    assert again["results"][0]["updated_at"] >= first["updated_at"]
    text = node.client().get("/metrics").text
    assert metric(text, "dicom_node_analysis_seconds_count", analysis="web-test-screening", outcome="ok") == 2
    assert [e["actor"] for e in again["log"] if e["action"] == "reanalyse"] == ["token:ops"]
    assert node.post("/api/studies/1.2.3.4/reanalyse").status_code == 404

    data_dir = node.data_dir
    node.service.stop()
    restarted = web_node_factory(data_dir=data_dir)
    text = restarted.client().get("/metrics").text
    assert metric(text, "dicom_node_instances_received_total", calling_ae="STORESCU") == 1
    assert metric(text, "dicom_node_operator_actions_total", action="reanalyse", outcome="ok") == 1
    assert metric(text, "dicom_node_studies", state="delivered") == 1
    # The histogram is process-lifetime, as documented.
    assert metric(text, "dicom_node_analysis_seconds_count", analysis="web-test-screening", outcome="ok") is None


def test_readyz_names_the_failing_checks(web_node_factory) -> None:
    node = web_node_factory(http={"min_free_disk_mb": 1e12}, analysis="no-such-analysis")
    wait_for(lambda: node.service.analyser.status.get("no-such-analysis") not in (None, "loading"), 30,
             what="warm-up to give up")
    with node.client() as c:
        rsp = c.get("/readyz")
    body = rsp.json()
    assert rsp.status_code == 503 and body["failing"] == ["disk", "models"]
    checks = {c["name"]: c for c in body["checks"]}
    assert "below the threshold" in checks["disk"]["detail"]
    assert "unknown analysis 'no-such-analysis'" in checks["models"]["detail"]
    assert checks["database"]["ok"] and checks["dicom_listener"]["ok"] and checks["scheduler"]["ok"]
    models = node.api("/api/models")
    assert any(m["name"] == "node-test-blockfinder" and not m["has_card"] for m in models["models"])
    with node.client() as c:
        assert "no model card yet" in c.get("/models").text
        assert c.get("/models/node-test-blockfinder").status_code == 200
        assert c.get("/api/models/node-test-blockfinder/card").status_code == 404
    cfg = node.api("/api/config")
    assert cfg["http"]["tokens"] == [{"id": "ops", "token": "***"}] and TOKEN not in json.dumps(cfg)


def test_serve_subprocess_with_http_flags_and_audit_export(tmp_path: Path, model_root: Path) -> None:
    from conftest import web_config
    from nodekit import write_config

    raw = web_config(tmp_path / "data", model_root=model_root)
    del raw["http"]  # only the command-line flags enable it here
    config = write_config(tmp_path / "node.toml", raw)
    http_port = free_port()
    env = repo_env(Path(__file__).parent, Path(__file__).parents[1] / "dicom_node")
    proc = subprocess.Popen([*dicom_node_executable(), "serve", "--config", str(config), "--http-port",
                             str(http_port), "--http-token", "flag-token-0123456789"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_open(http_port), 60, what="dashboard port")
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(url + "/readyz").status_code == 401
        headers = {"Authorization": "Bearer flag-token-0123456789"}
        wait_for(lambda: httpx.get(url + "/readyz", headers=headers).status_code == 200, 60, what="ready")
        storescu(make_study(tmp_path / "in", "cli1", images=1), raw["node"]["port"])
        wait_for(lambda: httpx.get(url + "/api/studies?state=delivered", headers=headers).json()["total"] == 1, 60,
                 what="study settled")
        assert httpx.post(url + "/api/destinations/none/retry", headers=headers).status_code == 404  # audited
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"dashboard on http://127.0.0.1:{http_port}/" in err

    run = [*dicom_node_executable(), "audit", "export", "--config", str(config)]
    out = subprocess.run([*run, "--format", "csv"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["kind"], r["action"], r["actor"], r["instances"]) for r in rows] == [
        ("association", "released", "STORESCU", "1"), ("action", "retry", "token:cli", "")]
    assert rows[0]["time"].startswith(rows[0]["time"][:4]) and "T" in rows[0]["time"]
    # `dicom-node retry` is an operator action too, recorded with the Unix user who ran it.
    retry = subprocess.run([*dicom_node_executable(), "retry", "--config", str(config)], capture_output=True,
                           text=True, timeout=60, env=env)
    assert retry.returncode == 0, retry.stderr
    out = subprocess.run([*run, "--format", "json", "--kind", "action", "--out", str(tmp_path / "a.json")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "2 event(s) written" in out.stderr
    refused_404, action = json.loads((tmp_path / "a.json").read_text())
    assert refused_404["detail"] == "no destination none" and refused_404["outcome"] == "refused"
    assert action["action"] == "retry" and action["actor"].startswith("cli:")
    assert action["outcome"] == "refused" and action["detail"].startswith("nothing to retry") and action["kind"] == "action"
    bad = subprocess.run([*run, "--since", "last week"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "expected a date YYYY-MM-DD" in bad.stderr


def test_model_cards_are_rendered_as_markdown_without_raw_html(web_node_factory, model_root: Path,
                                                                tmp_path: Path) -> None:
    import hashlib
    import shutil

    root = tmp_path / "models"
    shutil.copytree(model_root, root)
    folder = root / "carded"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"not loaded by this test")
    (folder / "model.json").write_text(json.dumps({
        "name": "carded", "version": "2.1.0", "task": "a model with a card", "weights": "weights.pt",
        "sha256": hashlib.sha256(b"not loaded by this test").hexdigest()}))
    (folder / "MODEL_CARD.md").write_text("# Carded 2.1.0\n\n| metric | value |\n|---|---|\n| Dice | 0.91 |\n\n"
                                          "<script>alert(1)</script>\n")
    node = web_node_factory(model_root=root)
    models = {m["name"]: m for m in node.api("/api/models")["models"]}
    assert models["carded"]["has_card"] and not models["carded"]["loaded"]
    assert not models["node-test-blockfinder"]["has_card"]
    with node.client() as c:
        page = c.get("/models/carded").text
        assert "<h1>Carded 2.1.0</h1>" in page and "<td>Dice</td>" in page and "<td>0.91</td>" in page
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
        assert c.get("/api/models/carded/card").text.startswith("# Carded 2.1.0")
        assert c.get("/models/nothing-here").status_code == 404


def test_an_action_on_something_that_does_not_exist_is_audited_as_refused(web_node_factory) -> None:
    """The audit keeps every action, refused or not: a retry of an unknown study answered 404 unrecorded."""
    node = web_node_factory()
    assert node.post("/api/studies/1.2.3.4/retry").status_code == 404
    assert node.post("/api/destinations/nowhere/echo").status_code == 404
    refused = node.service.db.query("SELECT action, outcome, target, detail FROM audit_events WHERE kind = 'action'")
    assert refused == [{"action": "retry", "outcome": "refused", "target": "1.2.3.4", "detail": "no study 1.2.3.4"},
                       {"action": "echo", "outcome": "refused", "target": "nowhere", "detail": "no destination nowhere"}]
