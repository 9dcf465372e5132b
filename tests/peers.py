"""Real DICOM peers for tests and benchmarks: Orthanc, dcmtk storescp, dcmtk storescu/echoscu, and the
node itself as a subprocess.  Everything runs on free loopback ports; nothing is mocked.

Use through the fixtures in ``tests/conftest.py`` (``orthanc``, ``orthanc_factory``, ``storescp``) or
directly (benchmarks).  Waiting is always `wait_for(condition, timeout)`, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


class PeerError(RuntimeError):
    """A peer did not start or did not answer."""


def _which_dcmtk(tool: str) -> str | None:
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve())
    return shutil.which(tool, path=path)


def dcmtk(tool: str) -> str:
    """Path of the DCMTK program `tool` ("storescu", ...), never the venv's: pynetdicom installs console
    scripts of the same names (other options) into the venv's bin, which an activated venv puts first."""
    return _which_dcmtk(tool) or tool


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a peer that is starting may refuse
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def stays(condition: Callable[[], bool], seconds: float, interval: float = 0.1) -> bool:
    """True when `condition` holds at every poll for `seconds` (to show something does NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return bool(condition())


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on `port`."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def nodelay_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for dcmtk tools and Orthanc with Nagle disabled (see the field notes)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------------------- dcmtk


def storescu(files: Sequence[Path | str], port: int, *, called: str = "AINODE", calling: str = "STORESCU",
             host: str = "127.0.0.1", extra: Sequence[str] = (), timeout: float = 300.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """Send `files` on one association with dcmtk storescu (TCP_NODELAY=1, only the needed contexts)."""
    cmd = [dcmtk("storescu"), "-aet", calling, "-aec", called, "-R", *extra, host, str(port), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=nodelay_env())
    if check and proc.returncode != 0:
        raise PeerError(f"storescu failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def echoscu(port: int, *, called: str = "AINODE", calling: str = "ECHOSCU", host: str = "127.0.0.1",
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk echoscu (never raises for a failed echo: look at returncode)."""
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", called, host, str(port)], capture_output=True,
                          text=True, timeout=timeout, env=nodelay_env())


class StoreSCP:
    """dcmtk storescp writing into `folder` (one process; `+B` bypasses its own file buffering)."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "STORESCP",
                 extra: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), *self.extra, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=nodelay_env(),
        )
        wait_for(lambda: port_open(self.port), 20, what=f"storescp on port {self.port}")
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# --------------------------------------------------------------------------------------- Orthanc


class Orthanc:
    """An Orthanc test PACS with its own storage in `folder`, DICOM and HTTP on free loopback ports."""

    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None, nodelay: bool = True, check_called_aet: bool = False,
                 extra_config: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.nodelay = nodelay
        self.check_called_aet = check_called_aet
        self.extra_config = extra_config or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        store = self.folder / "db"
        cfg = {
            "Name": "TEST-PACS", "StorageDirectory": str(store), "IndexDirectory": str(store),
            "StorageCompression": False, "Plugins": [], "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": True,
            "DicomAet": self.ae_title, "DicomPort": self.dicom_port, "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": True,
            "DicomModalities": {}, "StableAge": 5, "SyncStorageArea": True, "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg_path = self.folder / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        wait_for(lambda: not port_open(self.dicom_port) and not port_open(self.http_port), 20,
                 what="Orthanc ports to be free")
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        env = nodelay_env() if self.nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        self.proc = subprocess.Popen(["Orthanc", str(cfg_path)], stdout=log, stderr=log, env=env)
        try:
            wait_for(lambda: self.get("/system") and port_open(self.dicom_port), 30, what="Orthanc to start")
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill (the test PACS keeps nothing worth a clean shutdown) and wait for the ports to close."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        wait_for(lambda: not port_open(self.dicom_port) and not port_open(self.http_port), 20,
                 what="Orthanc ports to close")

    # REST --------------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: bytes | str) -> Any:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read())

    def study_id(self, study_instance_uid: str) -> str | None:
        for hit in self.post("/tools/lookup", study_instance_uid):
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study with its tags (simplified), [] if the study is unknown."""
        sid = self.study_id(study_instance_uid)
        if sid is None:
            return []
        out = []
        for inst in self.get(f"/studies/{sid}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append(tags)
        return out

    def instance_count(self) -> int:
        return len(self.get("/instances"))

    def modality_counts(self, study_instance_uid: str) -> dict[str, int]:
        """Instances per Modality in a study (SEG, SR, OT/SC, PR, DX ...)."""
        sid = self.study_id(study_instance_uid)
        if sid is None:
            return {}
        counts: dict[str, int] = {}
        for series in self.get(f"/studies/{sid}/series"):
            modality = series["MainDicomTags"].get("Modality", "")
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
        return counts


# ---------------------------------------------------------------------------------- node process


def dicom_node_executable() -> list[str]:
    """How to run the CLI: the installed console script if present, else ``python -m dicom_node.cli``."""
    exe = VENV_BIN / "dicom-node"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dicom_node.cli"]


def repo_env(*extra_pythonpath: Path | str, **variables: str) -> dict[str, str]:
    """The environment for a node subprocess: this checkout first on PYTHONPATH (a venv's editable install may
    point at another clone of the repository), then `extra_pythonpath` and the caller's, plus `variables`."""
    env = dict(os.environ, **variables)
    paths = [str(REPO), *(str(p) for p in extra_pythonpath)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class NodeProcess:
    """``dicom-node serve --config FILE`` as a real subprocess (so a test can ``kill -9`` it)."""

    def __init__(self, config: Path, port: int, *, ae_title: str = "AINODE", extra_pythonpath: Sequence[Path] = (),
                 log_path: Path | None = None) -> None:
        self.config = Path(config)
        self.port = port
        self.ae_title = ae_title
        self.extra_pythonpath = list(extra_pythonpath)
        self.log_path = log_path or self.config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        env = repo_env(*self.extra_pythonpath)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([*dicom_node_executable(), "serve", "--config", str(self.config)],
                                     stdout=log, stderr=log, env=env, cwd=str(self.config.parent))
        wait_for(lambda: self._alive() and echoscu(self.port, called=self.ae_title).returncode == 0, timeout,
                 interval=0.1, what=f"dicom-node on port {self.port} (log: {self.log_path})")
        return self

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise PeerError(f"dicom-node exited early; log: {self.log_text()[-2000:]}")
        return True

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def dcmtk_available() -> bool:
    return all(_which_dcmtk(t) for t in ("storescu", "storescp", "echoscu"))


def orthanc_available() -> bool:
    return shutil.which("Orthanc") is not None
