"""The instance and output store: ``<data_dir>/instances/<Study>/<Series>/<SOP>.dcm`` and
``<data_dir>/outputs/<Study>/<kind>/<SOP>.dcm``, written atomically (tmp + fdatasync + rename).

A file is either absent or complete: the SCP acknowledges an instance only after `write_atomic`
returned, so a crash at any moment never leaves a half-written instance under its final name.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from dicom_node.errors import StorageError

log = logging.getLogger("dicom_node.storage")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_component(uid: str) -> str:
    """A UID usable as a file name; anything that is not a well-formed UID is replaced by its digest."""
    uid = (uid or "").strip().rstrip("\x00")
    if 0 < len(uid) <= 64 and _UID.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _serial_from_key(key: bytes) -> str:
    return "SPN-" + hmac.new(key, b"device serial number", hashlib.sha256).hexdigest()[:16].upper()


def existing_installation_serial(root: Path) -> str | None:
    """The serial `Store.installation_serial` gives the installation in `root`, if it has one already; None
    when `root` holds no (sound) installation key.  Creates nothing: for tools run beside a node's data."""
    path = Path(root) / "installation.key"
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s cannot be read (%s): the installation's device serial is not used", path, exc.strerror or exc)
        return None
    if len(key) != 32:
        # The node itself refuses to start on it (`Store.secret`); a tool beside it says so and goes on.
        log.warning("%s is damaged (%d bytes, not 32): the installation's device serial is not used", path, len(key))
        return None
    return _serial_from_key(key)


class Store:
    """Files under `root`.

    `durability` (see `settings.NodeSettings.durability`): "data" fdatasyncs each file before it is renamed
    into place, "full" also fsyncs the directory, "os" leaves both to the kernel.
    """

    def __init__(self, root: Path, *, durability: str = "data") -> None:
        if durability not in ("full", "data", "os"):
            raise ValueError(f"durability must be full, data or os, got {durability!r}")
        self.root = Path(root)
        self.sync_data = durability in ("full", "data")
        self.sync_dir = durability == "full"
        self.instances = self.root / "instances"
        self.outputs = self.root / "outputs"
        self.tmp = self.root / "tmp"
        self._dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._counter = 0
        try:
            for d in (self.instances, self.outputs, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the store under {self.root}: {exc.strerror or exc}") from exc

    def secret(self, name: str) -> bytes:
        """A random 32-byte key kept in ``<root>/<name>.key`` (created on first use, readable by the node's
        user only).  It stays outside the database on purpose: a copy of the database alone reveals nothing
        the key protects."""
        path = self.root / f"{name}.key"
        try:
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(os.urandom(32))
                    fh.flush()
                    os.fsync(fh.fileno())
            key = path.read_bytes()
        except FileExistsError:
            key = path.read_bytes()  # another process created it first
        except OSError as exc:
            raise StorageError(f"cannot create or read {path}: {exc.strerror or exc}") from exc
        if len(key) != 32:
            raise StorageError(f"{path} is damaged ({len(key)} bytes, not 32): delete it to start a new one")
        return key

    def installation_serial(self) -> str:
        """A device serial number of this installation (its data directory), stable across restarts: derived
        from ``installation.key``, so two nodes never write the same Device Observer UID."""
        return _serial_from_key(self.secret("installation"))

    def clean_tmp(self) -> int:
        """Remove temporary files left by a crash (never acknowledged, so nothing is lost); returns count."""
        n = 0
        for p in self.tmp.iterdir():
            try:
                p.unlink()
                n += 1
            except OSError as exc:
                log.warning("cannot delete the temporary file %s: %s", p, exc.strerror or exc)
        return n

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where a received instance lives."""
        return self.instances / safe_component(study_uid) / safe_component(series_uid) / f"{safe_component(sop_uid)}.dcm"

    def output_path(self, study_uid: str, kind: str, sop_uid: str) -> Path:
        """Where an output lives."""
        return self.outputs / safe_component(study_uid) / kind / f"{safe_component(sop_uid)}.dcm"

    def _ensure_dir(self, d: Path) -> None:
        if d in self._dirs:
            return
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._dirs.add(d)

    def _open_tmp(self, tmp: Path) -> BinaryIO:
        """`tmp` opened for writing; the temporary folder made again if it was deleted under the running node."""
        try:
            return open(tmp, "wb", buffering=0)
        except FileNotFoundError:
            self.tmp.mkdir(parents=True, exist_ok=True)
            return open(tmp, "wb", buffering=0)

    def _tmp_name(self) -> Path:
        with self._lock:
            self._counter += 1
            n = self._counter
        return self.tmp / f"{os.getpid()}-{threading.get_ident()}-{n}.part"

    def write_atomic(self, path: Path, chunks: Iterable[bytes | memoryview]) -> int:
        """Write `chunks` to `path` atomically; returns the size.  Raises `StorageError` on any OS error."""
        tmp = self._tmp_name()
        try:
            self._ensure_dir(path.parent)
            size = 0
            with self._open_tmp(tmp) as fh:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = fh.write(view)
                        size += written
                        view = view[written:]
                if self.sync_data:
                    os.fdatasync(fh.fileno())
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                # The folder was deleted under the running node (an operator freeing space): the cache of
                # folders made said it was there. Made again, once.
                with self._lock:
                    self._dirs.discard(path.parent)
                self._ensure_dir(path.parent)
                os.replace(tmp, path)
            if self.sync_dir:
                fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return size
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StorageError(f"cannot write {path.name}: {exc.strerror or exc}", errno=exc.errno) from exc

    def stray_copies(self, study_uid: str, sop_uid: str, held_at: str | None) -> list[Path]:
        """Files of instance `sop_uid` under study `study_uid` other than `held_at` (where the database holds it):
        the copy a move to another study leaves when the node stops between recording the move and deleting it."""
        folder = self.instances / safe_component(study_uid)
        return [p for p in folder.glob(f"*/{safe_component(sop_uid)}.dcm") if str(p) != held_at]

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Delete files (retention); missing files are fine. Returns how many were removed."""
        n = 0
        for p in paths:
            try:
                Path(p).unlink()
                n += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                # The database has forgotten the file already: this line is the only trace of it left on disk.
                log.warning("retention: cannot delete %s: %s", p, exc.strerror or exc)
        return n
