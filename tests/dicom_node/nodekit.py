"""Helpers for the node's tests: configuration files, synthetic studies, an in-process node."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import node_test_analysis

from dicom_node.settings import Settings, validate
from inference.synth.dicom import Patient, radiograph_dataset

HERE = Path(__file__).resolve().parent

#: The analysis the end-to-end tests route to; set NODE_E2E_ANALYSIS=spine-xr to run them on the real model.
E2E_ANALYSIS = os.environ.get("NODE_E2E_ANALYSIS", node_test_analysis.NAME)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(raw: dict[str, Any]) -> str:
    """Serialise the subset of TOML the node config uses (tables, arrays of tables, inline values)."""
    lines: list[str] = []
    for key, value in raw.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in value.items())
            lines.append("")
    for key, value in raw.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                nested = {k: v for k, v in item.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items() if k not in nested)
                for nk, nv in nested.items():
                    for sub in nv:
                        lines.append(f"[[{key}.{nk}]]")
                        lines.extend(f"{k} = {toml_value(v)}" for k, v in sub.items())
                lines.append("")
    return "\n".join(lines) + "\n"


def node_config(data_dir: Path, port: int, *, model_root: Path | None = None,
                destinations: Sequence[dict[str, Any]] = (), accept_any: bool = True,
                allow: Sequence[dict[str, Any]] = (), analysis: str = E2E_ANALYSIS,
                complete_on: str = "association-release", stable_age_s: float = 30.0,
                backoff_initial_s: float = 0.3, backoff_max_s: float = 2.0, max_attempts: int = 20,
                durability: str = "data", dimse_timeout_s: float = 30.0,
                retention: dict[str, float] | None = None, max_associations: int = 16,
                network_timeout_s: float = 120.0, acse_timeout_s: float = 30.0) -> dict[str, Any]:
    """Raw configuration tables for a test node (valid input for `settings.validate` / TOML)."""
    return {
        "node": {"ae_title": "AINODE", "bind_host": "127.0.0.1", "port": port, "data_dir": str(data_dir),
                 "durability": durability, "dimse_timeout_s": dimse_timeout_s,
                 "max_associations": max_associations, "network_timeout_s": network_timeout_s,
                 "acse_timeout_s": acse_timeout_s},
        "peers": {"accept_any": accept_any, "allow": list(allow)},
        "delivery": {"backoff_initial_s": backoff_initial_s, "backoff_max_s": backoff_max_s,
                     "max_attempts": max_attempts, "jitter": 0.1, "connect_timeout_s": 15.0,
                     "dimse_timeout_s": dimse_timeout_s},
        "assembly": {"stable_age_s": stable_age_s, "sweep_interval_s": 0.5},
        "models": {"roots": [str(model_root)] if model_root else [], "plugins": ["node_test_analysis"]},
        "logging": {"level": "INFO"},
        "retention": dict(retention or {}),
        "destinations": [dict(d) for d in destinations],
        "rules": [{
            "name": "spine-radiographs", "analyses": [analysis], "complete_on": complete_on,
            "match": [{"modality": ["DX", "CR"], "body_part_examined": "SPINE"}],
        }],
    }


def settings_from(raw: dict[str, Any]) -> Settings:
    return validate(raw, "test configuration")


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(to_toml(raw))
    return path


def make_study(folder: Path, seed: str, images: int = 1, *, rows: int = 128, columns: int = 96,
               patient: Patient | None = None, modality: str = "DX", body_part: str = "LSPINE",
               first_instance: int = 1) -> list[Path]:
    """Write a synthetic spine radiograph study (`images` instances, one series) and return the files."""
    folder.mkdir(parents=True, exist_ok=True)
    patient = patient or Patient(name=f"TEST^{seed.upper()}", patient_id=f"ID-{seed}")
    out = []
    for i in range(first_instance, first_instance + images):
        ds = radiograph_dataset(
            node_test_analysis.spine_like_pixels(rows, columns, seed=i), seed=seed, instance_number=i,
            patient=patient, modality=modality, body_part=body_part,
        )
        path = folder / f"{seed}-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


@contextmanager
def running_node(settings: Settings) -> Iterator[Any]:
    """An in-process `NodeService` (real sockets, scheduler, pipeline); stopped on exit."""
    from dicom_node.service import NodeService

    service = NodeService(settings)
    service.start()
    try:
        yield service
    finally:
        service.stop()
