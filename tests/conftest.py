"""Shared fixtures: real DICOM peers on free loopback ports (see `peers.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers import Orthanc, StoreSCP, dcmtk_available, orthanc_available


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthanc instances (``factory(name="pacs", **Orthanc kwargs)``); all are killed at teardown."""
    if not orthanc_available():
        pytest.fail("Orthanc is not installed (make install installs the Debian package 'orthanc')")
    started: list[Orthanc] = []

    def factory(name: str = "pacs", **kwargs: object) -> Orthanc:
        pacs = Orthanc(tmp_path / f"orthanc-{name}", **kwargs)  # type: ignore[arg-type]
        started.append(pacs)
        return pacs.start()

    yield factory
    for pacs in started:
        pacs.stop()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    """One running Orthanc (AE ORTHANC) with TCP_NODELAY."""
    return orthanc_factory()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A running dcmtk storescp (AE STORESCP) writing into a temporary folder."""
    if not dcmtk_available():
        pytest.fail("dcmtk is not installed (make install installs the Debian package 'dcmtk')")
    scp = StoreSCP(tmp_path / "storescp").start()
    yield scp
    scp.stop()
