"""End to end: dcmtk storescu -> node (real SCP, scheduler, pipeline, registry, encoders, SCU) -> Orthanc.

The node runs in-process here (tests that kill it are in test_node_crash.py); every hop is a real
association on loopback and results are checked through Orthanc's REST API.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from nodekit import E2E_ANALYSIS, make_study, node_config, running_node, settings_from
from peers import VENV_BIN, Orthanc, dcmtk, free_port, repo_env, stays, storescu, wait_for

from dicom_node import assembly

pytestmark = pytest.mark.e2e

# Outputs the test analysis produces per image (SEG, SC, PR) and per study (SR).
PER_IMAGE = {"SEG": 1, "OT": 1, "PR": 1}


@pytest.fixture
def node_factory(tmp_path: Path, model_root: Path) -> Iterator[Callable[..., Any]]:
    """Start in-process nodes: ``factory(destinations=[...], **node_config kwargs)``."""
    stack: list[Any] = []

    def factory(**kwargs: Any) -> Any:
        raw = node_config(tmp_path / f"node{len(stack)}", free_port(), model_root=model_root, **kwargs)
        cm = running_node(settings_from(raw))
        service = cm.__enter__()
        stack.append(cm)
        return service

    yield factory
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def pacs_destination(pacs: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port, **extra}


def expected_counts(images: int) -> dict[str, int]:
    counts = {k: v * images for k, v in PER_IMAGE.items()}
    counts["SR"] = 1
    return counts


def outputs_of(pacs: Orthanc, study_uid: str) -> dict[str, int]:
    return {k: v for k, v in pacs.modality_counts(study_uid).items() if k != "DX"}


def test_study_results_land_in_the_same_study_in_orthanc(node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    node = node_factory(destinations=[pacs_destination(orthanc)])
    files = make_study(tmp_path / "in", "e2e1", images=2)
    source = pydicom.dcmread(files[0])
    storescu(files, node.scp.port)

    want = expected_counts(2)
    wait_for(lambda: outputs_of(orthanc, source.StudyInstanceUID) == want, 90,
             what=f"outputs {want} in Orthanc (has {outputs_of(orthanc, source.StudyInstanceUID)})")
    for tags in orthanc.study_instances(source.StudyInstanceUID):
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags["PatientID"] == source.PatientID
        assert tags["PatientName"] == str(source.PatientName)
        assert tags.get("AccessionNumber", "") == source.AccessionNumber
    wait_for(lambda: node.db.study(source.StudyInstanceUID)["state"] == "delivered", 20, what="study delivered")
    study = node.db.study_detail(source.StudyInstanceUID)
    assert [j["state"] for j in study["jobs"]] == ["delivered"]
    assert study["jobs"][0]["summary"]["analysis"] == E2E_ANALYSIS
    assert {d["state"] for d in study["deliveries"]} == {"delivered"}
    assert len(study["deliveries"]) == sum(want.values())

    # Every emitted object passes dciodvfy without errors and round-trips through pydicom.
    for out in study["outputs"]:
        proc = subprocess.run([str(VENV_BIN / "dciodvfy"), out["path"]], capture_output=True, text=True)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
        assert not errors, f"{out['kind']}: {errors[:5]}"
        ds = pydicom.dcmread(out["path"])
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID


def test_new_instance_after_analysis_replaces_outputs_with_a_successor_report(
        node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    node = node_factory(destinations=[pacs_destination(orthanc)])
    first = make_study(tmp_path / "a", "late", images=1)
    study_uid = str(pydicom.dcmread(first[0]).StudyInstanceUID)
    storescu(first, node.scp.port)
    wait_for(lambda: outputs_of(orthanc, study_uid) == expected_counts(1), 60, what="first outputs")
    first_sr = node.db.one("SELECT sop_instance_uid FROM outputs WHERE kind = 'sr'")["sop_instance_uid"]
    first_seg = node.db.one("SELECT sop_instance_uid FROM outputs WHERE kind = 'seg'")["sop_instance_uid"]

    second = make_study(tmp_path / "b", "late", images=1, first_instance=2)
    later = pydicom.dcmread(second[0])
    later.PatientAge, later.PatientWeight = "071Y", 80  # a later film: no identity correction
    later.save_as(second[0])
    storescu(second, node.scp.port)
    # Re-analysis: a new SR naming the first as predecessor, one more SEG and PR for the new image only, and
    # a new SC for both images (an SC draws the study's verdict, so it is a new object when that can change;
    # the first SC stays in the PACS).
    want = {"SEG": 2, "OT": 3, "PR": 2, "SR": 2}
    wait_for(lambda: outputs_of(orthanc, study_uid) == want, 60,
             what=f"re-analysis outputs {want} (has {outputs_of(orthanc, study_uid)})")
    srs = node.db.query("SELECT * FROM outputs WHERE kind = 'sr' ORDER BY created_at")
    assert len(srs) == 2 and srs[0]["sop_instance_uid"] == first_sr
    new_sr = pydicom.dcmread(srs[1]["path"])
    predecessor = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first_sr
    segs = {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs WHERE kind = 'seg'")}
    assert first_seg in segs and len(segs) == 2
    assert node.db.identity_epoch(study_uid) == 0 and not node.db.query("SELECT * FROM audit_events WHERE action = 'withdrawn'")
    assert stays(lambda: outputs_of(orthanc, study_uid) == want, 1.0)


def test_destination_down_then_up_delivers_everything(node_factory, orthanc_factory, tmp_path: Path) -> None:
    dicom_port, http_port = free_port(), free_port()
    dest = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
    node = node_factory(destinations=[dest])
    files = make_study(tmp_path / "in", "down", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)

    def retried() -> bool:
        rows = node.db.query("SELECT attempts, state, last_error FROM deliveries")
        return bool(rows) and all(r["attempts"] >= 2 and r["state"] == "pending" for r in rows)

    wait_for(retried, 60, what="deliveries retried while the destination is down")
    err = node.db.one("SELECT last_error FROM deliveries")["last_error"]
    assert "cannot connect" in err
    assert node.db.study(study_uid)["state"] == "encoded"

    pacs = orthanc_factory(dicom_port=dicom_port, http_port=http_port)
    wait_for(lambda: outputs_of(pacs, study_uid) == expected_counts(1), 60, what="outputs after the PACS came up")
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 20, what="study delivered")


def test_a_corrected_patient_identity_gets_new_outputs_and_the_old_ones_never_reach_the_pacs(
        node_factory, orthanc_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The modality sent the study under the wrong patient while the PACS was down, then re-sent it corrected:
    the PACS must get the outputs once, under the corrected patient, the report with no predecessor of the
    other patient's."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    dicom_port, http_port = free_port(), free_port()
    node = node_factory(destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}])
    files = make_study(tmp_path / "in", "wrongpatient", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "encoded"
             and all(r["attempts"] >= 1 for r in node.db.query("SELECT attempts FROM deliveries")),
             60, what="outputs queued and tried while the PACS is down")
    first = {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs")}
    queued = node.db.one("SELECT count(*) AS n FROM deliveries")["n"]

    fixed = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = "CORRECTED-7", "RIGHT^PATIENT"
        fixed.append(tmp_path / f"fixed-{path.name}")
        ds.save_as(fixed[-1])
    storescu(fixed, node.scp.port)

    def reanalysed() -> bool:
        jobs = node.db.query("SELECT state FROM jobs ORDER BY id")
        return [j["state"] for j in jobs] == ["failed", "encoded"] and node.db.study(study_uid)["state"] == "encoded"

    wait_for(reanalysed, 60, what="the study analysed again under the corrected identity")
    outputs = node.db.query("SELECT sop_instance_uid, kind, path FROM outputs")
    second = {r["sop_instance_uid"] for r in outputs} - first
    assert len(second) == len(first)  # every object anew: none keeps a UID the old patient's has
    assert {r["output_sop_instance_uid"] for r in node.db.query(
        "SELECT output_sop_instance_uid FROM deliveries WHERE state != 'withdrawn'")} <= second
    withdrawn = node.db.query("SELECT target, detail FROM audit_events WHERE action = 'withdrawn'")
    assert {w["target"] for w in withdrawn} == first and len(withdrawn) == queued
    assert "superseded" in node.db.one("SELECT reason FROM jobs ORDER BY id LIMIT 1")["reason"]
    new_sr = pydicom.dcmread(next(r["path"] for r in outputs if r["kind"] == "sr" and r["sop_instance_uid"] in second))
    assert new_sr.PatientID == "CORRECTED-7" and str(new_sr.PatientName) == "RIGHT^PATIENT"
    assert "PredecessorDocumentsSequence" not in new_sr  # the earlier report is another patient's

    pacs = orthanc_factory(dicom_port=dicom_port, http_port=http_port)
    wait_for(lambda: outputs_of(pacs, study_uid) == expected_counts(1), 60, what="outputs after the PACS came up")
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 20, what="study delivered")
    assert {t["PatientID"] for t in pacs.study_instances(study_uid)} == {"CORRECTED-7"}
    assert pacs.instance_count() == sum(expected_counts(1).values())
    assert not any(r.levelno >= logging.WARNING and "stay there until" in r.getMessage() for r in caplog.records)


def test_an_identity_corrected_and_corrected_back_while_the_pacs_is_down_reaches_it_once_as_it_ends(
        node_factory, orthanc_factory, tmp_path: Path) -> None:
    dicom_port, http_port = free_port(), free_port()
    node = node_factory(destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}])
    files = make_study(tmp_path / "in", "backandforth", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    right = pydicom.dcmread(files[0]).PatientID

    def send_as(patient_id: str, step: int) -> None:
        ds = pydicom.dcmread(files[0])
        ds.PatientID = patient_id
        ds.save_as(tmp_path / f"step{step}.dcm")
        storescu([tmp_path / f"step{step}.dcm"], node.scp.port)
        wait_for(lambda: node.db.identity_epoch(study_uid) == step and node.db.study(study_uid)["state"] == "encoded"
                 and node.db.one("SELECT count(*) AS n FROM jobs WHERE state = 'encoded'")["n"] == 1,
                 60, what=f"identity epoch {step} analysed")

    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "encoded", 60, what="first analysis")
    send_as("WRONG-9", 1)
    send_as(right, 2)  # corrected back: a third set of objects, none of them one a PACS was told about
    assert len({r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs")}) == 3 * sum(
        expected_counts(1).values())
    pacs = orthanc_factory(dicom_port=dicom_port, http_port=http_port)
    wait_for(lambda: outputs_of(pacs, study_uid) == expected_counts(1), 60, what="the last epoch's outputs only")
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 20, what="study delivered")
    assert {t["PatientID"] for t in pacs.study_instances(study_uid)} == {right}
    assert pacs.instance_count() == sum(expected_counts(1).values())


def _delivered(node: Any, files: list[Path]) -> str:
    """Send a study and wait until its outputs are delivered; returns its Study Instance UID."""
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="first outputs delivered")
    return study_uid


def _resend(node: Any, source: Path, path: Path, **corrections: str) -> None:
    """Re-send a held image with its header corrected, as a sender does."""
    ds = pydicom.dcmread(source)
    for keyword, value in corrections.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    storescu([path], node.scp.port)


def test_an_image_no_result_read_moved_out_of_the_study_leaves_its_results_standing(
        node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    """A chest film filed with a lumbar study, which no rule analyses, moved to its own patient's study: every
    result of the lumbar study was superseded (a rejection note, the same results again under new UIDs). Only
    results that read the moved image are: these did not."""
    node = node_factory(destinations=[pacs_destination(orthanc, reject_superseded=True)])
    spine = make_study(tmp_path / "in", "bystander", images=1)
    chest = make_study(tmp_path / "in", "bystander", images=1, body_part="CHEST", first_instance=2)
    study_uid = _delivered(node, spine + chest)
    assert pydicom.dcmread(chest[0]).StudyInstanceUID == study_uid
    first = {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs")}
    assert outputs_of(orthanc, study_uid) == expected_counts(1)
    new_study = study_uid + ".7"
    _resend(node, chest[0], tmp_path / "moved.dcm", StudyInstanceUID=new_study, PatientID="OTHER-PATIENT",
            PatientName="OTHER^PATIENT")
    wait_for(lambda: (node.db.study(new_study) or {}).get("state") == "unrouted", 30, what="the chest film's study")
    assert node.db.moved_instances() == [(study_uid, str(pydicom.dcmread(chest[0]).SOPInstanceUID))]
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="the lumbar study settled again")
    assert node.db.identity_epoch(study_uid) == 0
    assert {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs")} == first
    assert node.db.superseded_deliveries() == []
    assert {d["state"] for d in node.db.query("SELECT state FROM deliveries")} == {"delivered"}
    assert outputs_of(orthanc, study_uid) == expected_counts(1)


def test_outputs_of_a_study_whose_corrected_re_analysis_fails_are_still_answered(
        node_factory, orthanc: Orthanc, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One film of a two-film study was another patient's: the sender re-sends it under that patient. The study
    cannot be analysed (two patients), but its delivered report read that film: the PACS must be told."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    node = node_factory(destinations=[pacs_destination(orthanc, reject_superseded=True)])
    files = make_study(tmp_path / "in", "misfiled", images=2)
    study_uid = _delivered(node, files)
    _resend(node, files[1], tmp_path / "moved.dcm", PatientID="OTHER-PATIENT", PatientName="OTHER^PATIENT")
    wait_for(lambda: node.db.study(study_uid)["state"] == "failed", 60, what="re-analysis failing on two patients")
    assert "disagree on PatientID" in node.db.study(study_uid)["reason"]
    wait_for(lambda: outputs_of(orthanc, study_uid).get("KO") == 1, 30, what="the rejection note in the PACS")
    assert node.db.superseded_deliveries() == []


def test_a_film_split_off_into_its_own_patients_study_leaves_the_first_whose_results_are_made_again(
        node_factory, orthanc: Orthanc, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The PACS administrator moves a misfiled film to its own patient's study (same SOP Instance UID, new Study
    UID). The node refused it as a UID held in another study: the first study's report still read another
    patient's film, and the film's own study was never analysed."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    node = node_factory(destinations=[pacs_destination(orthanc, reject_superseded=True)])
    files = make_study(tmp_path / "in", "split", images=2)
    study_uid = _delivered(node, files)
    first = {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs")}
    new_study = study_uid + ".7"
    _resend(node, files[1], tmp_path / "moved.dcm", StudyInstanceUID=new_study, PatientID="OTHER-PATIENT",
            PatientName="OTHER^PATIENT")

    wait_for(lambda: outputs_of(orthanc, new_study) == expected_counts(1), 60,
             what=f"the moved film's own outputs in its study (has {outputs_of(orthanc, new_study)})")
    two, one = expected_counts(2), expected_counts(1)
    want = {k: two[k] + one[k] for k in two} | {"KO": 1}
    wait_for(lambda: outputs_of(orthanc, study_uid) == want, 60,
             what=f"the first study analysed again without it, and the note {want} (has {outputs_of(orthanc, study_uid)})")
    wait_for(lambda: node.db.study(study_uid)["state"] == node.db.study(new_study)["state"] == "delivered", 20,
             what="both studies delivered")
    moved_sop = str(pydicom.dcmread(files[1]).SOPInstanceUID)
    for tags in orthanc.study_instances(new_study):
        assert tags["PatientID"] == "OTHER-PATIENT"
    # The first study's new report reads only the film it kept; the note rejects exactly its first outputs.
    report = pydicom.dcmread(node.db.one("SELECT path FROM outputs WHERE kind = 'sr' AND study_instance_uid = ?"
                                         " ORDER BY created_at DESC", (study_uid,))["path"])
    evidence = {ref.ReferencedSOPInstanceUID for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert moved_sop not in evidence and str(pydicom.dcmread(files[0]).SOPInstanceUID) in evidence
    note = pydicom.dcmread(node.db.one("SELECT path FROM outputs WHERE kind = 'kos'")["path"])
    assert {ref.ReferencedSOPInstanceUID for study in note.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence} == first
    assert any("moved by the sender" in r.getMessage() for r in caplog.records)
    # The dashboard shows no superseded picture (one showed the moved film, another patient's, in this study).
    from dicom_node.web.views import SUPERSEDED_IMAGE, Views

    views = Views(node)
    shown = {o["sop_instance_uid"] for o in views.study(study_uid)["outputs"] if o.get("thumbnail")}
    old_sc = {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs WHERE kind = 'sc'")} & first
    assert old_sc and not shown & old_sc and len(shown) == 1
    assert all(views.output_image(study_uid, sop) == (None, SUPERSEDED_IMAGE) for sop in old_sc)
    assert views.output_image(study_uid, shown.pop())[0] is not None


@pytest.mark.parametrize("reject", [False, True], ids=["warning", "rejection-note"])
def test_a_name_corrected_after_delivery_sends_new_outputs_and_rejects_or_warns_of_the_old_ones(
        node_factory, orthanc: Orthanc, tmp_path: Path, caplog: pytest.LogCaptureFixture, reject: bool) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    node = node_factory(destinations=[pacs_destination(orthanc, reject_superseded=reject)])
    files = make_study(tmp_path / "in", "misspelt", images=1)
    study_uid = _delivered(node, files)
    _resend(node, files[0], tmp_path / "fixed.dcm", PatientName="SPELT^RIGHT")

    first = {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM outputs")}
    # The PACS keeps what it got; the new ones join (with, if asked for, the note rejecting the old ones).
    want = {k: 2 * v for k, v in expected_counts(1).items()} | ({"KO": 1} if reject else {})
    wait_for(lambda: outputs_of(orthanc, study_uid) == want, 60,
             what=f"outputs of the corrected name {want} (has {outputs_of(orthanc, study_uid)})")
    tags = orthanc.study_instances(study_uid)
    names = [t["PatientName"] for t in tags if t.get("Modality") not in ("DX", "KO")]
    assert names.count("SPELT^RIGHT") == sum(expected_counts(1).values())
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 20, what="study delivered")
    assert [j["state"] for j in node.db.query("SELECT state FROM jobs ORDER BY id")] == ["delivered", "delivered"]
    n = sum(expected_counts(1).values())
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    if reject:
        note = pydicom.dcmread(node.db.one("SELECT path FROM outputs WHERE kind = 'kos'")["path"])
        assert str(note.PatientName) == str(pydicom.dcmread(files[0]).PatientName)  # filed with what it rejects
        listed = {ref.ReferencedSOPInstanceUID for study in note.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
        assert listed == first
        assert any(f"rejection note for the {n} output(s) pacs got" in m and study_uid in m for m in messages)
        assert not any("stay there until" in m for m in messages)
    else:
        warning = next(m for m in messages if "stay there until" in m)
        assert study_uid in warning and f"{n} output(s)" in warning and "delivered to pacs" in warning
    assert not any("SPELT" in m for m in messages)  # names stay out of the log


def test_permanent_rejection_stops_at_once_shows_in_status_and_retry_requeues(
        node_factory, orthanc_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    pacs = orthanc_factory(check_called_aet=True)
    node = node_factory(destinations=[pacs_destination(pacs, ae_title="NOT_ORTHANC")])
    files = make_study(tmp_path / "in", "reject", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)

    wait_for(lambda: node.db.study(study_uid)["state"] == "failed", 60, what="study failed on permanent rejection")
    rows = node.db.query("SELECT attempts, state, last_error FROM deliveries")
    assert rows and all(r["state"] == "failed" and "rejected permanently" in r["last_error"] for r in rows)
    # One attempt - or two when a first association timed out on a loaded machine (a transient failure,
    # retried as it should be; seen once in CI): the permanent rejection ends it either way.
    assert all(r["attempts"] <= 2 for r in rows), rows
    # The log says so at ERROR, with the study (an operator reading only the journal must see it).
    assert any(r.levelno == logging.ERROR and "failed for good" in r.getMessage() and study_uid in r.getMessage()
               for r in caplog.records)
    first = node.db.one("SELECT sum(attempts) AS n FROM deliveries")["n"]
    # No retry loop after the rejection: attempts stay where they are.
    assert stays(lambda: node.db.one("SELECT sum(attempts) AS n FROM deliveries")["n"] == first, 2.0)

    data_dir = str(node.settings.data_dir)
    status = subprocess.run([str(VENV_BIN / "dicom-node"), "status", "--data-dir", data_dir],
                            capture_output=True, text=True, env=repo_env())
    assert status.returncode == 0, status.stderr
    assert "failed 1" in status.stdout and "rejected permanently" in status.stdout and "dicom-node retry" in status.stdout
    check = subprocess.run([str(VENV_BIN / "dicom-node"), "status", "--check", "--json", "--data-dir", data_dir],
                           capture_output=True, text=True, env=repo_env())
    assert check.returncode == 1, check.stderr  # for a monitoring script: something failed

    retry = subprocess.run([str(VENV_BIN / "dicom-node"), "retry", "--data-dir", data_dir],
                           capture_output=True, text=True, env=repo_env())
    assert retry.returncode == 0 and "re-queued" in retry.stdout
    wait_for(lambda: len(rows) <= (node.db.one("SELECT sum(attempts) AS n FROM deliveries WHERE state = 'failed'")["n"] or 0) <= 2 * len(rows)
             and node.db.study(study_uid)["state"] == "failed", 30, what="re-queued deliveries to fail again once")
    assert outputs_of(pacs, study_uid) == {}


def test_own_outputs_coming_back_are_stored_but_never_analysed(node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    node = node_factory(destinations=[pacs_destination(orthanc)])
    files = make_study(tmp_path / "in", "loop", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="study delivered")
    jobs_before = node.db.query("SELECT id FROM jobs")
    outputs = [r["path"] for r in node.db.query("SELECT path FROM outputs")]
    # PACS routing sends our results back to us.
    storescu(outputs, node.scp.port, calling="ORTHANC")
    own = node.db.query("SELECT * FROM instances WHERE own_output = 1")
    assert len(own) == len(outputs)
    study = node.db.study(study_uid)
    assert study["state"] == "delivered" and study["instance_count"] == 1
    assert stays(lambda: node.db.query("SELECT id FROM jobs") == jobs_before
                 and node.db.study(study_uid)["state"] == "delivered", 1.5)


def test_study_no_rule_matches_is_recorded_unrouted_with_the_reason(node_factory, tmp_path: Path) -> None:
    node = node_factory()
    files = make_study(tmp_path / "in", "chest", images=1, body_part="CHEST")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "unrouted", 30, what="study unrouted")
    reason = node.db.study(study_uid)["reason"]
    assert "no rule matched" in reason and "BodyPartExamined 'CHEST'" in reason


def test_retention_removes_files_of_delivered_studies_but_remembers_outputs(
        node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    tiny = 0.5 / 86400  # half a second, in days
    node = node_factory(destinations=[pacs_destination(orthanc)],
                        retention={"instances_days": tiny, "outputs_days": tiny})
    files = make_study(tmp_path / "in", "retention", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="study delivered")
    paths = [Path(r["path"]) for r in node.db.query("SELECT path FROM instances UNION ALL SELECT path FROM outputs")]
    assert all(p.exists() for p in paths)
    def purged() -> bool:
        node.scheduler.purge()  # besides the node's own retention job
        return not any(p.exists() for p in paths)

    wait_for(purged, 10, interval=0.2, what="files purged")
    assert node.scheduler.purge() == 0  # nothing left to remove
    assert node.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 0
    assert all(node.db.is_known_output(r["sop_instance_uid"]) for r in node.db.query("SELECT * FROM outputs"))
    # A later view of the study: analysed alone (the first image is gone), so its report stands beside the
    # first one instead of naming it as the report it replaces.
    storescu(make_study(tmp_path / "in", "retention", images=1, first_instance=2), node.scp.port)

    def srs() -> list[dict[str, Any]]:
        return [t for t in orthanc.study_instances(study_uid) if t["Modality"] == "SR"]

    wait_for(lambda: len(srs()) == 2, 60, what="the later view's SR")
    assert not any("PredecessorDocumentsSequence" in t for t in srs())


def test_a_film_moved_after_retention_removed_it_still_gets_its_old_report_rejected(
        node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    """Retention removes a study's images after a week; a misfiled film split off later went unnoticed: the
    node no longer held it, so its first study kept a report made from another patient's film. The jobs name
    what they read: the report is superseded and the PACS gets the rejection note."""
    from dicom_node.db import MOVED_AFTER_PURGE

    tiny = 0.5 / 86400  # half a second, in days
    node = node_factory(destinations=[pacs_destination(orthanc, reject_superseded=True)],
                        retention={"instances_days": tiny, "outputs_days": 30})
    files = make_study(tmp_path / "in", "latesplit", images=1)
    study_uid = _delivered(node, files)

    def purged() -> bool:
        node.scheduler.purge()
        return node.db.study(study_uid)["instances_purged_at"] is not None

    wait_for(purged, 10, interval=0.2, what="the study's images removed by retention")
    new_study = study_uid + ".7"
    _resend(node, files[0], tmp_path / "moved.dcm", StudyInstanceUID=new_study, PatientID="OTHER-PATIENT",
            PatientName="OTHER^PATIENT")
    wait_for(lambda: outputs_of(orthanc, study_uid).get("KO") == 1, 60,
             what=f"the rejection note in the first study (has {outputs_of(orthanc, study_uid)})")
    wait_for(lambda: (node.db.study(new_study) or {}).get("state") == "delivered", 60, what="the film's own study")
    study = node.db.study(study_uid)
    assert (study["state"], study["reason"]) == ("unrouted", MOVED_AFTER_PURGE)
    assert outputs_of(orthanc, new_study) == expected_counts(1)


def test_stable_age_rule_waits_for_quiet_then_analyses(node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    node = node_factory(destinations=[pacs_destination(orthanc)], complete_on="stable-age", stable_age_s=30.0)
    files = make_study(tmp_path / "in", "stable", images=2)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files[:1], node.scp.port)
    storescu(files[1:], node.scp.port)  # a second association into the same study
    wait_for(lambda: node.db.one("SELECT count(*) AS n FROM associations WHERE state = 'released'")["n"] == 2,
             10, what="both associations recorded as released")
    # Released twice, yet not complete: this rule waits until the study has been quiet for 30 s (judged
    # against the study's own clock, not the wall's, so a loaded machine cannot make it pass early).
    assert assembly.sweep(node.db, node.settings) == []
    assert node.db.study(study_uid)["state"] == "received"
    last = node.db.study(study_uid)["last_received_at"]
    assert assembly.complete_stable(node.db, node.settings, now=last + 29.0) == []
    assert assembly.complete_stable(node.db, node.settings, now=last + 31.0) == [study_uid]
    node.scheduler.wake("pipeline")
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="study delivered after quiet time")
    assert outputs_of(orthanc, study_uid) == expected_counts(2)


def test_each_destination_gets_its_own_outputs_and_seg_encoding(node_factory, orthanc_factory, tmp_path: Path) -> None:
    plain, packed, lm = orthanc_factory("plain"), orthanc_factory("packed"), orthanc_factory("lm")
    node = node_factory(destinations=[
        pacs_destination(plain, name="plain", outputs=["seg", "sr"]),
        # The same SEG as "plain" but compressed: one UID for both once made the second file overwrite the
        # first, and both deliveries failed on the transfer syntax on record.
        pacs_destination(packed, name="packed", outputs=["seg", "sc"], seg_compression="jpeg2000"),
        pacs_destination(lm, name="lm", outputs=["seg"], seg_format="labelmap"),
    ])
    files = make_study(tmp_path / "in", "variants", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="study delivered")
    assert outputs_of(plain, study_uid) == {"SEG": 1, "SR": 1}
    assert outputs_of(packed, study_uid) == {"SEG": 1, "OT": 1}
    assert outputs_of(lm, study_uid) == {"SEG": 1}
    segs = {r["variant"]: r for r in node.db.query("SELECT * FROM outputs WHERE kind = 'seg'")}
    assert set(segs) == {"binary/none", "binary/jpeg2000", "labelmap/none"}
    assert len({r["sop_instance_uid"] for r in segs.values()}) == 3
    assert len({r["path"] for r in segs.values()}) == 3
    assert segs["binary/jpeg2000"]["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.90"
    assert segs["binary/none"]["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
    for peer, variant in ((plain, "binary/none"), (packed, "binary/jpeg2000"), (lm, "labelmap/none")):
        (seg,) = [t for t in peer.study_instances(study_uid) if t["Modality"] == "SEG"]
        assert seg["SOPInstanceUID"] == segs[variant]["sop_instance_uid"]
    # Nothing is built twice: the PR no destination takes is not built at all, SR and SC once each.
    assert sorted(r["kind"] for r in node.db.query("SELECT kind FROM outputs")) == ["sc", "seg", "seg", "seg", "sr"]


class _BrokenAnalysis:
    """An analysis whose model crashes, to show a failing model fails the study, not the node."""

    name = "node-test-broken"

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def models(self) -> tuple:
        return ()

    def run(self, datasets: Any) -> Any:
        return self._crash()

    def _crash(self) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_failing_analysis_fails_the_study_with_the_reason_and_retry_reruns_it(node_factory, tmp_path: Path, caplog,
                                                                               monkeypatch) -> None:
    from inference import analyses

    monkeypatch.setitem(analyses._FACTORIES, _BrokenAnalysis.name, _BrokenAnalysis)
    caplog.set_level(logging.INFO, logger="dicom_node.pipeline")
    node = node_factory(analysis=_BrokenAnalysis.name)
    files = make_study(tmp_path / "in", "broken", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "failed", 30, what="study failed")
    assert "CUDA out of memory (simulated)" in node.db.study(study_uid)["reason"]
    # A crash, not a reported failure: the log keeps where it happened, for the bug report.
    (record,) = [r for r in caplog.records if "analysis node-test-broken failed" in r.getMessage()]
    assert record.exc_info and "_crash" in logging.Formatter().formatException(record.exc_info)
    assert node.db.one("SELECT state FROM jobs")["state"] == "failed"
    first_run = node.db.one("SELECT updated_at FROM jobs")["updated_at"]
    assert node.db.requeue_failed_studies() == 1
    wait_for(lambda: node.db.study(study_uid)["state"] == "failed"
             and node.db.one("SELECT updated_at FROM jobs")["updated_at"] > first_run, 30, what="re-run failed again")
    assert node.db.one("SELECT count(*) AS n FROM jobs")["n"] == 1
    from peers import echoscu

    assert echoscu(node.scp.port).returncode == 0


def test_aborted_association_does_not_complete_a_study_early(node_factory, tmp_path: Path) -> None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    node = node_factory(stable_age_s=30.0)  # rule: complete on association release
    path = make_study(tmp_path / "in", "aborted", images=1)[0]
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="FLAKYMOD")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.send_c_store(ds).Status == 0
    assoc.abort()  # the sender died: more instances may follow, so only the quiet time completes the study
    wait_for(lambda: node.db.one("SELECT state FROM associations WHERE calling_ae = 'FLAKYMOD'")["state"] == "aborted",
             10, what="association recorded as aborted")
    # A sweep after the abort leaves it waiting (clock-free: the quiet time is far off) ...
    assert assembly.sweep(node.db, node.settings) == []
    assert node.db.study(ds.StudyInstanceUID)["state"] == "received"
    # ... and its quiet time completes it.
    quiet = node.db.study(ds.StudyInstanceUID)["last_received_at"] + 30.0 + 1
    assert assembly.complete_stable(node.db, node.settings, now=quiet) == [ds.StudyInstanceUID]
    node.scheduler.wake("pipeline")
    wait_for(lambda: node.db.study(ds.StudyInstanceUID)["state"] in ("encoded", "delivered"), 30,
             what="study analysed after its quiet time")


@pytest.mark.slow
def test_concurrent_senders_while_the_pipeline_writes(node_factory, storescp, tmp_path: Path) -> None:
    """8 associations x 50 instances into a full node whose pipeline analyses and delivers meanwhile."""
    node = node_factory(destinations=[{"name": "scp", "ae_title": storescp.ae_title, "host": "127.0.0.1",
                                       "port": storescp.port, "outputs": ["sr"]}])
    batches = [make_study(tmp_path / f"c{k}", f"busy{k}", images=50, rows=48, columns=32) for k in range(8)]
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", f"SENDER{k}", "-aec", "AINODE", "-R", "127.0.0.1",
                               str(node.scp.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for k, files in enumerate(batches)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-500:]
    assert node.db.one("SELECT count(*) AS n FROM instances")["n"] == 400
    wait_for(lambda: node.db.study_counts()["delivered"] == 8, 180, interval=0.2, what="8 studies delivered")
    assert len(storescp.files()) == 8  # one SR per study
    assert node.db.one("SELECT sum(failures) AS n FROM associations")["n"] == 0


def test_compressed_input_is_analysed_and_reported(node_factory, orthanc: Orthanc, tmp_path: Path) -> None:
    from pydicom.uid import JPEG2000Lossless

    node = node_factory(destinations=[pacs_destination(orthanc)])
    path = make_study(tmp_path / "in", "j2k-e2e", images=1)[0]
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    storescu([path], node.scp.port, extra=["-xv"])  # propose JPEG 2000 lossless
    assert node.db.one("SELECT transfer_syntax_uid FROM instances")["transfer_syntax_uid"] == JPEG2000Lossless
    wait_for(lambda: outputs_of(orthanc, ds.StudyInstanceUID) == expected_counts(1), 60,
             what="outputs of a JPEG 2000 input in Orthanc")
    summary = node.db.study_detail(ds.StudyInstanceUID)["jobs"][0]["summary"]
    assert summary["images"][0]["vertebrae"]  # the model saw the decoded pixels


def test_models_are_loaded_at_start_and_missing_ones_reported(node_factory, caplog) -> None:

    from nodekit import node_test_analysis

    caplog.set_level(logging.INFO, logger="dicom_node.pipeline")
    node = node_factory()
    wait_for(lambda: node_test_analysis.MODEL in node.registry.loaded(), 30, what="test model loaded at start")
    problems = node.analyser.warm_up(["no-such-analysis"])
    assert "unknown analysis 'no-such-analysis'" in problems["no-such-analysis"]
    assert "analysis no-such-analysis cannot run" in caplog.text


def test_no_study_is_claimed_while_the_models_load(node_factory, tmp_path: Path) -> None:
    """A node killed while loading its models (a restart loop) must not leave a study `analysing`: the
    restart would count it as an analysis the node died during, and the third would fail it."""
    node = node_factory()
    wait_for(node.analyser.ready.is_set, 30, what="start-up warm-up done")
    node.analyser.ready.clear()  # as while the warm-up loads
    files = make_study(tmp_path / "in", "loading", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: node.db.study(study_uid)["state"] == "complete", 30, what="study complete")
    assert stays(lambda: node.db.study(study_uid)["state"] == "complete", 1.5)
    node.analyser.ready.set()
    node.scheduler.wake("pipeline")
    wait_for(lambda: node.db.study(study_uid)["state"] in ("encoded", "delivered"), 30, what="study analysed")


def _failing_output_writes(node: Any, monkeypatch: pytest.MonkeyPatch, error: int, studies: set[str] | None = None
                           ) -> threading.Event:
    """Make the node's writes of outputs (of `studies`, or all) fail with OS error `error` while the returned
    event is set, as the store reports it."""
    import os

    from dicom_node.errors import StorageError

    write = node.store.write_atomic
    failing = threading.Event()
    failing.set()

    def write_outputs(path: Path, chunks: Any) -> int:
        if failing.is_set() and node.store.outputs in path.parents and (studies is None or path.parents[1].name in studies):
            raise StorageError(f"cannot write {path.name}: {os.strerror(error)}", errno=error)
        return write(path, chunks)

    monkeypatch.setattr(node.store, "write_atomic", write_outputs)
    return failing


def test_outputs_that_cannot_be_written_are_retried_once_the_disk_has_room(node_factory, orthanc: Orthanc,
                                                                           tmp_path: Path, monkeypatch) -> None:
    """A full disk while the outputs are written is not the study's fault: it waits (with the reason in
    status and /readyz) and is taken up again, instead of failing for good.  The other studies wait meanwhile
    rather than each being analysed only to fail the same write."""
    import errno

    from dicom_node import pipeline
    from dicom_node.web.health import readiness

    monkeypatch.setattr(pipeline, "STRANDED_RETRY_S", 0.5)
    node = node_factory(destinations=[pacs_destination(orthanc)])
    now = [0.0]
    node.pipeline.clock = lambda: now[0]  # the pause after the failure ends when the test says so
    disk_full = _failing_output_writes(node, monkeypatch, errno.ENOSPC)
    files = make_study(tmp_path / "in", "diskfull", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    storescu(files, node.scp.port)
    wait_for(lambda: "waiting to retry" in (node.db.study(study_uid)["reason"] or ""), 30, what="study waiting")
    assert node.db.study(study_uid)["state"] == "analysing"
    assert "No space left on device" in node.db.study(study_uid)["reason"]
    # Readiness says so, though the free space (the disk check) may look fine, e.g. on a read-only mount.
    outputs = {c.name: c for c in readiness(node)}["outputs"]
    assert not outputs.ok and "No space left on device" in outputs.detail and study_uid in outputs.detail
    later = make_study(tmp_path / "in2", "diskfull2", images=1)
    later_uid = str(pydicom.dcmread(later[0]).StudyInstanceUID)
    storescu(later, node.scp.port)
    wait_for(lambda: (node.db.study(later_uid) or {}).get("state") == "complete", 30, what="second study complete")
    node.scheduler.wake("pipeline")
    assert stays(lambda: node.db.study(later_uid)["state"] == "complete", 1.5), "analysed while the disk is full"
    disk_full.clear()
    now[0] += 1.0
    node.scheduler.wake("pipeline")
    wait_for(lambda: all(node.db.study(u)["state"] == "delivered" for u in (study_uid, later_uid)), 60,
             what="both studies delivered once there is room")
    assert node.db.study(study_uid)["reason"] is None and node.db.study(later_uid)["reason"] is None
    assert {c.name: c for c in readiness(node)}["outputs"].ok


def test_a_study_whose_outputs_alone_cannot_be_written_holds_up_no_other(node_factory, orthanc: Orthanc,
                                                                         tmp_path: Path, monkeypatch) -> None:
    """A write that fails for one study's folder (its permissions) is not the disk: the other studies are
    analysed and delivered while that one waits, named by /readyz."""
    import errno

    from dicom_node import pipeline
    from dicom_node.web.health import readiness

    monkeypatch.setattr(pipeline, "STRANDED_RETRY_S", 0.5)
    node = node_factory(destinations=[pacs_destination(orthanc)])
    files = make_study(tmp_path / "in", "denied", images=1)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    denied = _failing_output_writes(node, monkeypatch, errno.EACCES, {study_uid})
    storescu(files, node.scp.port)
    wait_for(lambda: "Permission denied" in (node.db.study(study_uid)["reason"] or ""), 30, what="study waiting")
    other = make_study(tmp_path / "in2", "allowed", images=1)
    other_uid = str(pydicom.dcmread(other[0]).StudyInstanceUID)
    storescu(other, node.scp.port)
    wait_for(lambda: (node.db.study(other_uid) or {}).get("state") == "delivered", 60, what="the other study delivered")
    assert node.db.study(study_uid)["state"] in ("analysing", "complete")  # waiting, or just released to retry

    def named_by_readiness() -> bool:  # (between a release and the next try the study is briefly not waiting)
        outputs = {c.name: c for c in readiness(node)}["outputs"]
        return not outputs.ok and study_uid in outputs.detail and "Permission denied" in outputs.detail

    wait_for(named_by_readiness, 30, what="readiness naming the waiting study")
    denied.clear()
    wait_for(lambda: node.db.study(study_uid)["state"] == "delivered", 60, what="the study delivered once writable")
    assert {c.name: c for c in readiness(node)}["outputs"].ok


def test_stopping_aborts_an_idle_sender_and_a_stalled_delivery_instead_of_waiting_out_their_timeouts(
        node_factory, tmp_path: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    stalled, give_up = threading.Event(), threading.Event()

    def stall(event: Any) -> int:
        stalled.set()
        give_up.wait(90)  # a PACS that never answers
        return 0

    pacs = AE(ae_title="STALLPACS")
    pacs.supported_contexts = AllStoragePresentationContexts
    pacs_port = free_port()
    server = pacs.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, stall)])
    try:
        node = node_factory(destinations=[{"name": "pacs", "ae_title": "STALLPACS", "host": "127.0.0.1",
                                           "port": pacs_port}], dimse_timeout_s=120.0, network_timeout_s=120.0)
        storescu(make_study(tmp_path / "in", "stop", images=1), node.scp.port)
        assert stalled.wait(60), "no delivery started"
        modality = AE(ae_title="IDLEMOD")
        modality.add_requested_context(Verification)
        idle = modality.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
        assert idle.is_established
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        stopper.join(30)  # the timeouts above are 120 s: a stop that waits for them does not end here
        assert not stopper.is_alive(), "stop waited for the idle association or the stalled PACS"
        wait_for(lambda: idle.is_aborted, 10, what="the idle association aborted")
        # Nothing lost: what the PACS never confirmed is still queued for the next start, and the attempt
        # our stop cut short is not counted against the PACS.
        rows = node.db.query("SELECT state, attempts FROM deliveries")
        assert {r["state"] for r in rows} == {"pending"} and {r["attempts"] for r in rows} == {0}
    finally:
        give_up.set()
        server.shutdown()
