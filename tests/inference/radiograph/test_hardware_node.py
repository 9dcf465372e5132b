"""Postoperative screening route end to end, with the node's DEFAULT configuration and the shipped models:
dcmtk storescu -> node (routing rule "postop-spine-radiograph" -> "spine-xr": vertebrae + fractures +
hardware) -> SEG / SR / SC / PR -> Orthanc, checked through the node's database and the files it sent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import VENV_BIN, Orthanc, free_port, storescu, wait_for
from test_hardware_model import as_dicom, postop

pytestmark = pytest.mark.e2e


def _node_settings(tmp_path: Path, pacs: Orthanc) -> Any:
    from dicom_node.settings import default_config_text, parse_toml, validate

    raw = parse_toml(default_config_text(), "default configuration")
    raw["node"].update({"port": free_port(), "data_dir": str(tmp_path / "node")})
    raw["http"]["enabled"] = False
    raw["delivery"].update({"backoff_initial_s": 0.3, "backoff_max_s": 2.0})
    raw["assembly"]["sweep_interval_s"] = 0.5
    raw["destinations"] = [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]
    return validate(raw, "test configuration from the default")


def _walk(items: Any) -> Any:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_postoperative_radiograph_comes_back_with_hardware(tmp_path: Path, orthanc: Orthanc) -> None:
    from dicom_node.service import NodeService

    ds = as_dicom(postop(21, "AP", "lumbar", ("posterior", "cage")), "hw-node")
    assert ds.BodyPartExamined == "LSPINE"  # what the default routing rule matches
    path = tmp_path / "postop.dcm"
    ds.save_as(path, enforce_file_format=True)

    service = NodeService(_node_settings(tmp_path, orthanc))
    service.start()
    try:
        assert "spine-xr" in service.routed_analyses()
        storescu([path], service.scp.port)
        study_uid = str(ds.StudyInstanceUID)
        want = {"SEG": 1, "SR": 1, "OT": 1, "PR": 1}

        def outputs() -> dict[str, int]:
            return {k: v for k, v in orthanc.modality_counts(study_uid).items() if k != "DX"}

        wait_for(lambda: outputs() == want, 120, what=f"outputs {want} in Orthanc (has {outputs()})")
        wait_for(lambda: service.db.study(study_uid)["state"] == "delivered", 30, what="study delivered")
        study = service.db.study_detail(study_uid)
    finally:
        service.stop()

    summary = study["jobs"][0]["summary"]
    assert [m["name"] for m in summary["models"]] == ["spine-xr-vertebrae", "spine-xr-hardware"]
    assert summary["hardware"] in ("hardware intact", "possible complication", "not assessable")
    assert summary["instrumentation"].startswith("posterior instrumentation")
    assert summary["images"][0]["implants"] >= 5
    assert summary["flagged"] == (summary["hardware"] == "possible complication" or summary["verdict"] == "finding present")

    files = {o["kind"]: o["path"] for o in study["outputs"]}
    for kind, out in files.items():
        proc = subprocess.run([str(VENV_BIN / "dciodvfy"), out], capture_output=True, text=True, timeout=60)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
        assert not errors, f"{kind}: {errors[:5]}"
    seg = pydicom.dcmread(files["seg"])
    meanings = {s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in seg.SegmentSequence}
    assert "Bone Screw" in meanings and "Spinal rod" in meanings
    sr = pydicom.dcmread(files["sr"])
    texts = []
    for item in _walk(sr.ContentSequence):
        if "TextValue" in item:
            texts.append(str(item.TextValue))
        if "ConceptCodeSequence" in item:
            texts.append(str(item.ConceptCodeSequence[0].CodeMeaning))
    joined = " | ".join(texts)
    assert any(t in joined for t in ("Hardware intact", "Possible hardware complication", "Hardware not assessable"))
    assert summary["instrumentation"] in joined
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientID == ds.PatientID
