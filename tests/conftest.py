"""Shared fixtures: real DICOM peers on free loopback ports (see `peers.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


#: Debian's Chromium (make install installs it); playwright never downloads a browser here.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session, shared by the viewer and dashboard tests.

    Playwright's sync API runs its driver on an event loop of its own; a second ``sync_playwright()`` while
    the first is open fails ("Sync API inside the asyncio loop"), so there must be exactly one per process."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed (make install installs the Debian package 'chromium')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
