"""Synthetic studies (from `reports.examples`) and their encoded outputs, built once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reports import build_outputs, examples

DCIODVFY = Path(sys.executable).parent / "dciodvfy"


@pytest.fixture(scope="session")
def cases() -> dict[str, examples.Case]:
    return {c.name: c for c in (examples.lateral_dx(), examples.ap_cr(), examples.ct())}


@pytest.fixture(scope="session")
def outputs(cases):
    return {name: build_outputs(case.result, case.sources) for name, case in cases.items()}


def run_dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for a file."""
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


@pytest.fixture(scope="session")
def dciodvfy():
    """The validator, as a function of a path returning (errors, warnings)."""
    return run_dciodvfy
