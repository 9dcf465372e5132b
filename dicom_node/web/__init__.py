"""The node's operator surface: dashboard pages, JSON API, /healthz, /readyz and /metrics.

`create_app(service)` builds the FastAPI application of a running `NodeService`; `HttpServer` serves it
on a thread of the node process.  Imported lazily so that one-shot CLI commands do not load FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HttpServer", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from dicom_node.web.app import create_app

        return create_app
    if name == "HttpServer":
        from dicom_node.web.server import HttpServer

        return HttpServer
    raise AttributeError(name)
