"""Fixtures of the node's tests."""

from __future__ import annotations

from pathlib import Path

import node_test_analysis
import pytest


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding the test analysis's model folder (model.json + weights + sha256)."""
    root = tmp_path_factory.mktemp("models")
    node_test_analysis.write_model_folder(root)
    return root
