"""The viewer stack the OHIF test runs: Orthanc with DICOMweb, OHIF's dist, and a server for both.

* OHIF comes from the npm package ``@ohif/app@3.13.2`` (its prebuilt ``dist/``), fetched with
  ``npm pack`` on first use into ``.viewer/`` at the repository root (ignored by git), so a fresh
  clone works and later runs are offline.
* Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) runs on free loopback ports with a throw-away
  storage directory; objects go in through its REST API.
* `OhifServer` serves the dist and proxies DICOMweb to Orthanc on one origin (no CORS):
  ``/app-config.js`` is generated (the dist's own points at a demo server); ``/dicom-web/...`` and
  ``/wado...`` are forwarded, rewriting a comma-separated ``includefield`` into repeated parameters
  because the DICOMweb plugin 1.7 of Debian 12 ignores ``includefield=a%2Cb`` as a whole (the
  study list would lose its descriptions); any other path is a dist file, or ``index.html`` for
  OHIF's client-side routes.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# tests/ holds the peers' helpers; `make install` runs this file as a script, where it is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peers import REPO, free_port, wait_for  # noqa: E402

OHIF_VERSION = "3.13.2"
OHIF_CACHE = REPO / ".viewer" / f"ohif-{OHIF_VERSION}"
ORTHANC_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def fetch_ohif() -> Path:
    """The OHIF dist, fetched with `npm pack` into the git-ignored cache by `make install` (or on first use)."""
    dist = OHIF_CACHE / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: cannot fetch the OHIF dist")
    OHIF_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OHIF_CACHE.parent) as tmp:
        subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"], cwd=tmp, check=True,
                       capture_output=True, timeout=600)
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        staged = Path(tmp) / "package"
        if not (staged / "dist" / "index.html").is_file():
            raise RuntimeError(f"{tarball.name} has no dist/index.html")
        if OHIF_CACHE.exists():
            shutil.rmtree(OHIF_CACHE)
        staged.rename(OHIF_CACHE)  # atomic within one file system: a half-unpacked cache is never used
    return dist


def _dicomweb_plugin() -> Path:
    for folder in ORTHANC_PLUGIN_DIRS:
        for candidate in sorted(folder.glob("libOrthancDicomWeb.so*")):
            return candidate
    raise RuntimeError("the Orthanc DICOMweb plugin (Debian orthanc-dicomweb) is not installed")


class Orthanc:
    """An Orthanc process with its DICOMweb plugin, on free ports."""

    def __init__(self, root: Path) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        storage = root / "storage"
        storage.mkdir()
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "VIEWER-TEST", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "StorageCompression": False, "Plugins": [str(_dicomweb_plugin())],
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": "VIEWERTEST",
            "DicomPort": self.dicom_port, "UnknownSopClassAccepted": True, "SyncStorageArea": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }))
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "TCP_NODELAY": "1"})
        wait_for(self._answers, timeout=30, what=f"Orthanc on port {self.http_port}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {self.log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/system", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def upload(self, path: Path) -> dict:
        """POST one DICOM file to /instances; returns Orthanc's answer."""
        req = urllib.request.Request(f"{self.url}/instances", data=path.read_bytes(),
                                     headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            urllib.request.urlopen(urllib.request.Request(f"{self.url}/tools/shutdown", method="POST"), timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)



_PROXIED = ("/dicom-web", "/wado")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "accept-encoding"}
_TYPES = {".js": "application/javascript", ".mjs": "application/javascript", ".wasm": "application/wasm",
          ".json": "application/json", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test)',
      name: 'orthanc',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      wadoUriRoot: window.location.origin + '/wado',
      qidoSupportsIncludeField: true,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


def split_includefield(path: str) -> str:
    """``includefield=a%2Cb`` -> ``includefield=a&includefield=b`` (see the module docstring)."""
    base, sep, query = path.partition("?")
    if not sep or "includefield" not in query.lower():
        return path
    parts = []
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if eq and key.lower() == "includefield":
            parts += [f"includefield={urllib.parse.quote(v, safe='')}"
                      for v in urllib.parse.unquote(value).split(",") if v]
        else:
            parts.append(part)
    return f"{base}?{'&'.join(parts)}"


def _handler(dist: Path, orthanc_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def _headers(self, status: int, content_type: str, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
            # Cross-origin isolation gives cornerstone SharedArrayBuffer (its decoders use it).
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn = http.client.HTTPConnection("127.0.0.1", orthanc_port, timeout=60)
            try:
                conn.request(self.command, split_includefield(self.path), body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.end_headers()
            self.wfile.write(data)

        def _static(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path == "/app-config.js":
                data = APP_CONFIG.encode()
                self._headers(200, "application/javascript", len(data))
                self.wfile.write(data)
                return
            target = (dist / path.lstrip("/")).resolve()
            if not target.is_file() or dist not in target.parents:
                target = dist / "index.html"  # OHIF's client-side routes (/viewer, ...)
            data = target.read_bytes()
            content_type = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self._headers(200, content_type, len(data))
            self.wfile.write(data)

        def _route(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if any(path == p or path.startswith(p + "/") for p in _PROXIED) or path.startswith("/wado"):
                self._proxy()
            else:
                self._static()

        do_GET = _route
        do_POST = _route
        do_HEAD = _route

    return Handler


class OhifServer:
    """Serve `dist` and proxy DICOMweb to Orthanc's HTTP port, on a free loopback port."""

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(dist.resolve(), orthanc_port))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


if __name__ == "__main__":
    # `make install` fetches the viewer here, so `make test` itself downloads nothing.
    print(fetch_ohif())
