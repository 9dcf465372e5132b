"""Fixtures of the OHIF test: Orthanc + DICOMweb, the OHIF server, headless Chromium (see viewer_stack)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from viewer_stack import OhifServer, Orthanc, fetch_ohif


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

