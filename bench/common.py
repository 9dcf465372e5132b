"""Shared benchmark plumbing: peers from ``tests/peers.py``, node configurations, timing helpers."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "tests", REPO / "tests" / "dicom_node"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import peers  # noqa: E402  (the real peers the tests use)
from nodekit import to_toml  # noqa: E402

__all__ = ["REPO", "peers", "to_toml", "percentile", "write_node_config"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


def write_node_config(path: Path, raw: dict) -> Path:
    """Write a node TOML configuration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(raw))
    return path
