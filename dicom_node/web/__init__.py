"""The node's operator surface: dashboard pages, JSON API, /healthz, /readyz and /metrics.

`create_app(service)` builds the FastAPI application of a running `NodeService`; `HttpServer` serves it
on a thread of the node process.
"""

from dicom_node.web.app import create_app
from dicom_node.web.server import HttpServer

__all__ = ["HttpServer", "create_app"]
