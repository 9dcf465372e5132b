"""Crash safety: ``kill -9`` of a real ``dicom-node serve`` process during ingest and during delivery.

After each restart every acknowledged instance is analysed and every output reaches the PACS exactly
once (exact counts per study in Orthanc).
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from nodekit import HERE, make_study, node_config, write_config
from peers import (
    NodeProcess,
    Orthanc,
    dcmtk,
    dicom_node_executable,
    echoscu,
    free_port,
    nodelay_env,
    repo_env,
    storescu,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STUDIES, IMAGES = 20, 5  # 100 instances


def _count(db_path: Path, sql: str) -> int:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute(sql).fetchone()[0] or 0)
    finally:
        con.close()


def test_kill9_during_ingest_and_during_delivery_loses_and_duplicates_nothing(
        tmp_path: Path, model_root: Path, orthanc_factory, request: pytest.FixtureRequest) -> None:
    # Orthanc with Nagle on is slow to acknowledge (~50 ms an instance): delivery lasts long enough to be cut.
    pacs: Orthanc = orthanc_factory(nodelay=False)
    port = free_port()
    data = tmp_path / "data"
    raw = node_config(data, port, model_root=model_root, stable_age_s=600.0, destinations=[
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port,
         "outputs": ["sr", "sc"], "batch_size": 8}])
    config = write_config(tmp_path / "node.toml", raw)
    db_path = data / "node.sqlite"
    node = NodeProcess(config, port, extra_pythonpath=[HERE])
    request.addfinalizer(node.stop)  # a failed assertion must not leave a serving node behind
    node.start()

    studies = [make_study(tmp_path / "in" / f"s{k:02d}", f"crash{k:02d}", images=IMAGES, rows=96, columns=64)
               for k in range(STUDIES)]
    files = [f for study in studies for f in study]

    # 1. kill -9 in the middle of one association carrying 100 instances.
    sender = subprocess.Popen([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "AINODE", "-R", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=nodelay_env())
    wait_for(lambda: _count(db_path, "SELECT count(*) FROM instances") >= 30, 60, interval=0.01,
             what="30 instances received")
    node.kill9()
    sender.communicate(timeout=60)
    assert sender.returncode != 0, "storescu should have seen the node die"
    stored = _count(db_path, "SELECT count(*) FROM instances")
    assert 30 <= stored < len(files)
    con = sqlite3.connect(db_path)
    for (path,) in con.execute("SELECT path FROM instances"):
        ds = pydicom.dcmread(path)  # every acknowledged instance is complete on disk
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    con.close()
    # Patient data on disk: nothing the node wrote is open to other local users (serve sets umask 027).
    exposed = [p for p in [data, *data.rglob("*")] if p.stat().st_mode & 0o007]
    assert not exposed, exposed[:5]

    # The modality retries the whole transfer after the node is back.
    node.start()
    storescu(files, port, calling="MODALITY")
    assert _count(db_path, "SELECT count(*) FROM instances") == len(files)

    # 2. kill -9 while outputs are being delivered.
    total = STUDIES * (1 + IMAGES)
    wait_for(lambda: _count(db_path, "SELECT count(*) FROM deliveries WHERE state = 'delivered'") >= 10, 120,
             interval=0.02, what="delivery under way")
    delivered_before_kill = _count(db_path, "SELECT count(*) FROM deliveries WHERE state = 'delivered'")
    node.kill9()
    assert delivered_before_kill < total, "delivery finished before the kill: make the PACS slower"

    node.start()
    wait_for(lambda: _count(db_path, "SELECT count(*) FROM studies WHERE state = 'delivered'") == STUDIES, 180,
             interval=0.2, what=f"all {STUDIES} studies delivered")
    assert _count(db_path, "SELECT count(*) FROM deliveries") == total
    assert _count(db_path, "SELECT count(*) FROM outputs") == total

    # Exact counts at the PACS: one SR and one SC per image in every study, nothing else.
    for study in studies:
        uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        assert pacs.modality_counts(uid) == {"SR": 1, "OT": IMAGES}, uid
    assert pacs.instance_count() == total
    node.stop()

    # Logs carry no patient names or IDs.
    log = node.log_text()
    assert "TEST^CRASH" not in log and "ID-crash" not in log


def test_a_second_node_on_the_same_data_directory_refuses_to_start_and_touches_nothing(
        tmp_path: Path, model_root: Path, request: pytest.FixtureRequest) -> None:
    """A second `serve` (a port clash, a second unit) ran the restart recovery on the running node's database
    before failing to listen: its open association was marked aborted, its deliveries re-queued."""
    data = tmp_path / "data"
    port = free_port()
    config = write_config(tmp_path / "node.toml", node_config(data, port, model_root=model_root, stable_age_s=600.0))
    node = NodeProcess(config, port, extra_pythonpath=[HERE])
    request.addfinalizer(node.stop)
    node.start()
    # An association held open while the second node tries to start.
    from pynetdicom import AE

    client = AE(ae_title="HOLDER")
    client.add_requested_context("1.2.840.10008.1.1")
    held = client.associate("127.0.0.1", port, ae_title="AINODE")
    request.addfinalizer(held.release)
    assert held.is_established
    wait_for(lambda: _count(data / "node.sqlite", "SELECT count(*) FROM associations WHERE state = 'open'") == 1, 10,
             what="the held association on record")
    other_port = free_port()
    second_config = write_config(tmp_path / "second.toml", node_config(data, other_port, model_root=model_root))
    second = subprocess.run([*dicom_node_executable(), "serve", "--config", str(second_config)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=repo_env(HERE))
    assert second.returncode != 0
    assert f"another dicom-node (pid {node.proc.pid})" in second.stderr, second.stderr
    assert _count(data / "node.sqlite", "SELECT count(*) FROM associations WHERE state = 'open'") == 1
    assert echoscu(port).returncode == 0  # the first node serves on
