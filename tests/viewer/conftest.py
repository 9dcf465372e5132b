"""Fixtures of the OHIF test: Orthanc + DICOMweb, the OHIF server, headless Chromium (see viewer_stack)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from viewer_stack import CHROMIUM, CHROMIUM_ARGS, OhifServer, Orthanc, fetch_ohif


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    return fetch_ohif()


@pytest.fixture(scope="session")
def viewer_orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ohif(ohif_dist, viewer_orthanc) -> Iterator[str]:
    with OhifServer(ohif_dist, viewer_orthanc.http_port) as server:
        yield server.url


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is not installed (make install installs the Debian package 'chromium')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
