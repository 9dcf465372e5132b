"""Fixtures of the dashboard / API tests: in-process nodes with their HTTP server on free ports, real
DICOM peers (dcmtk storescp as the destination), headless Chromium."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The node's test kit (configs, synthetic studies, the block-finder test analysis) lives beside its tests.
NODE_TESTS = Path(__file__).resolve().parents[1] / "dicom_node"
if str(NODE_TESTS) not in sys.path:
    sys.path.insert(0, str(NODE_TESTS))

import httpx  # noqa: E402
import node_test_analysis  # noqa: E402
import web_test_analysis  # noqa: E402
from nodekit import node_config, running_node, settings_from  # noqa: E402
from peers import StoreSCP, free_port  # noqa: E402

TOKEN = "web-test-token-0123456789"
REPO = Path(__file__).resolve().parents[2]
#: Screenshots always go to the test's folder; UPDATE_SCREENSHOTS=1 also refreshes docs/images/dashboard_*.png.
DOC_IMAGES = REPO / "docs" / "images" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else None


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding the test analysis's model folder."""
    root = tmp_path_factory.mktemp("models")
    node_test_analysis.write_model_folder(root)
    return root


@dataclass
class WebNode:
    """A running in-process node and how to talk to it."""

    service: Any
    url: str
    token: str
    data_dir: Path

    @property
    def port(self) -> int:
        return int(self.service.scp.port)

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def api(self, path: str) -> Any:
        with self.client() as c:
            rsp = c.get(path)
            rsp.raise_for_status()
            return rsp.json()

    def post(self, path: str) -> httpx.Response:
        with self.client() as c:
            return c.post(path)


def web_config(data_dir: Path, *, model_root: Path, http: dict[str, Any] | None = None,
               analysis: str = web_test_analysis.NAME, **kwargs: Any) -> dict[str, Any]:
    """A node configuration with the HTTP server on a free port and the screening test analysis."""
    raw = node_config(data_dir, free_port(), model_root=model_root, analysis=analysis, **kwargs)
    raw["models"]["plugins"] = ["node_test_analysis", "web_test_analysis"]
    raw["http"] = {"enabled": True, "host": "127.0.0.1", "port": 0, "refresh_s": 0.5,
                   "tokens": [{"id": "ops", "token": TOKEN}], "min_free_disk_mb": 1.0, **(http or {})}
    return raw


@pytest.fixture
def web_node_factory(tmp_path: Path, model_root: Path) -> Iterator[Callable[..., WebNode]]:
    """Start in-process nodes: ``factory(destinations=[...], http={...}, **node_config kwargs)``."""
    stack: list[Any] = []

    def factory(data_dir: Path | None = None, **kwargs: Any) -> WebNode:
        data_dir = data_dir or tmp_path / f"node{len(stack)}"
        raw = web_config(data_dir, model_root=kwargs.pop("model_root", model_root), **kwargs)
        cm = running_node(settings_from(raw))
        service = cm.__enter__()
        stack.append(cm)
        return WebNode(service, service.http.url, TOKEN, data_dir)

    yield factory
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """dcmtk storescp destinations: ``factory(port=None)`` starts one (on a given port when it comes back up)."""
    started: list[StoreSCP] = []

    def factory(port: int | None = None) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"storescp{len(started)}", port=port).start()
        started.append(scp)
        return scp

    yield factory
    for scp in started:
        scp.stop()


def destination(name: str, port: int, **extra: Any) -> dict[str, Any]:
    """A destination table for a storescp on loopback."""
    return {"name": name, "ae_title": "STORESCP", "host": "127.0.0.1", "port": port, **extra}

