"""uvicorn on a thread of the node process, on a socket bound before it starts (so a busy port fails the
node's start with a clear reason, and port 0 works for tests)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

log = logging.getLogger("dicom_node.web")


class HttpServer:
    """Serves an ASGI `app` on `host`:`port` until `stop`."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Bind, listen and serve; returns once requests are answered.  OSError when the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"the HTTP server on {self.url} stopped while starting")
            if time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.01)  # a start-up wait inside the process, not a test sleep

    @property
    def port(self) -> int:
        """The bound port."""
        if self._sock is None:
            return self.requested_port
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Finish requests under way (a few seconds at most) and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None
