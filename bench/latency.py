"""Latency: association release of a one-image DX study -> last output acknowledged by the destination.

The node runs as ``dicom-node serve`` sending every output kind (SEG, SR, SC, PR) to Orthanc (TCP_NODELAY).
Timestamps come from the node's own database: the association's release (``associations.ended_at``),
the outputs being recorded (``outputs.created_at``, after analysis and encoding) and each delivery's
acknowledgement (``deliveries.delivered_at``).  The first study warms up (model loading) and is not counted.

Uses the analysis "spine-xr" when it is installed; otherwise the node's test analysis (a tiny torch
model through the same registry and pipeline), and says so: the number then measures the node, not the
radiograph models.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
from pathlib import Path

from bench.common import REPO, peers, percentile, write_node_config


def _analysis() -> tuple[str, str]:
    from inference import analyses
    from inference.registry import ModelRegistry

    why = "'spine-xr' is not registered"
    if "spine-xr" in analyses.available():
        try:
            analyses.create("spine-xr", ModelRegistry()).models()  # its model folders must be present
            return "spine-xr", "spine-xr (the radiograph models)"
        except Exception as exc:  # noqa: BLE001 - any reason it cannot run is the reason we say
            why = f"'spine-xr' cannot run yet ({type(exc).__name__}: {exc})"
    return "node-test-vertebrae", f"node-test-vertebrae, because {why}: this measures the node, not the models"


def _study(folder: Path, k: int, rows: int, columns: int) -> Path:
    import node_test_analysis

    from inference.synth.dicom import Patient, radiograph_dataset

    folder.mkdir(parents=True, exist_ok=True)
    ds = radiograph_dataset(node_test_analysis.spine_like_pixels(rows, columns, blocks=5, seed=k),
                            seed=f"bench-latency-{k}", patient=Patient(patient_id=f"LAT{k:03d}"),
                            view_position="LL", body_part="LSPINE")
    path = folder / f"lat{k:03d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def run(work: Path, studies: int = 10, rows: int = 2048, columns: int = 1536) -> dict:
    """Measure `studies` one-image studies (plus one warm-up); returns the numbers."""
    name, label = _analysis()
    pacs = peers.Orthanc(work / "orthanc", nodelay=True).start()
    port = peers.free_port()
    data = work / "node-data"
    models = work / "models"
    plugins: list[str] = []
    roots: list[str] = []
    if name == "node-test-vertebrae":
        import node_test_analysis

        node_test_analysis.write_model_folder(models)
        plugins, roots = ["node_test_analysis"], [str(models)]
    cfg = write_node_config(work / "node.toml", {
        "node": {"ae_title": "AINODE", "port": port, "data_dir": str(data)},
        "peers": {"accept_any": True},
        "models": {"roots": roots, "plugins": plugins},
        "logging": {"level": "WARNING"},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        "rules": [{"name": "spine", "analyses": [name], "complete_on": "association-release",
                   "match": [{"modality": ["DX", "CR"], "body_part_examined": "SPINE"}]}],
    })
    node = peers.NodeProcess(cfg, port, extra_pythonpath=[REPO / "tests" / "dicom_node"]).start()
    db_path = data / "node.sqlite"
    rows_out = []
    try:
        for k in range(studies + 1):
            f = _study(work / "in", k, rows, columns)
            peers.storescu([f], port, calling="BENCH")
            con = sqlite3.connect(db_path, timeout=30)
            try:
                def settled(con: sqlite3.Connection = con, n: int = k + 1) -> bool:
                    sql = "SELECT count(*) FROM studies WHERE state IN ('delivered', 'failed')"
                    return bool(con.execute(sql).fetchone()[0] == n)

                peers.wait_for(settled, 300, interval=0.02, what=f"study {k} delivered")
                failed = con.execute("SELECT reason FROM studies WHERE state = 'failed'").fetchone()
                if failed:
                    raise RuntimeError(f"study failed: {failed[0]}")
                released = con.execute("SELECT max(ended_at) FROM associations WHERE instances > 0").fetchone()[0]
                encoded = con.execute("SELECT max(created_at) FROM outputs").fetchone()[0]
                acked, outputs = con.execute(
                    "SELECT max(delivered_at), count(*) FROM deliveries WHERE study_instance_uid ="
                    " (SELECT study_instance_uid FROM jobs ORDER BY id DESC LIMIT 1)").fetchone()
            finally:
                con.close()
            if k > 0:
                rows_out.append({"total": acked - released, "to_encoded": encoded - released,
                                 "delivery": acked - encoded, "outputs": outputs})
    finally:
        node.stop()
        pacs.stop()
    totals = [r["total"] for r in rows_out]
    return {
        "analysis": label, "studies": len(rows_out), "image": f"{rows}x{columns}",
        "outputs_per_study": rows_out[0]["outputs"],
        "p50_s": percentile(totals, 50), "p90_s": percentile(totals, 90), "max_s": max(totals),
        "p50_release_to_encoded_s": percentile([r["to_encoded"] for r in rows_out], 50),
        "p50_delivery_s": percentile([r["delivery"] for r in rows_out], 50),
    }


def report(res: dict) -> list[str]:
    return [
        f"  analysis: {res['analysis']}",
        f"  {res['studies']} one-image DX studies ({res['image']}), {res['outputs_per_study']} outputs each",
        f"  release -> last output acknowledged: p50 {res['p50_s']:.2f} s, p90 {res['p90_s']:.2f} s,"
        f" max {res['max_s']:.2f} s (goal p50 <= 3 s with the real models)",
        f"    of which release -> outputs encoded p50 {res['p50_release_to_encoded_s']:.2f} s,"
        f" encoded -> acknowledged p50 {res['p50_delivery_s']:.2f} s",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        print("\n".join(report(run(work, args.studies))))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
