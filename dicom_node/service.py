"""The running node: database, store, SCP, pipeline, senders and scheduler wired from one `Settings`."""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.db import Database
from dicom_node.errors import NodeError
from dicom_node.pipeline import Pipeline
from dicom_node.scheduler import NodeScheduler
from dicom_node.scp import StorageSCP
from dicom_node.scu import Sender
from dicom_node.settings import Settings
from dicom_node.storage import Store
from inference.registry import BUILTIN_MODELS, ModelRegistry

log = logging.getLogger("dicom_node")

DB_NAME = "node.sqlite"
LOCK_NAME = "node.lock"


class DataDirLock:
    """One running node per data directory.  A second `serve` on the same directory (a port clash, a second
    unit) recovered 'after a restart' before failing to listen: it marked the running node's open
    associations aborted, put its deliveries back in the queue and removed its half-written files."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._file: Any = None

    def acquire(self) -> None:
        """Take the lock or raise `NodeError` naming the running node's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the node's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise NodeError(f"another dicom-node (pid {holder}) is running on the data directory {self.path.parent}: "
                            "stop it first, or give this one a data_dir of its own") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Give the lock up (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def open_database(settings: Settings, *, read_only: bool = False) -> Database:
    """The node database in the configured data directory (created and migrated if needed, unless
    `read_only`: see `Database`)."""
    return Database(settings.data_dir / DB_NAME, synchronous_full=settings.node.durability == "full",
                    read_only=read_only)


def load_plugins(settings: Settings) -> None:
    """Import the configured analysis plugin modules (they call `inference.analyses.register`)."""
    for module in settings.models.plugins:
        importlib.import_module(module)


def make_registry(settings: Settings) -> ModelRegistry:
    """Model registry over the built-in models and the configured roots."""
    return ModelRegistry(roots=(BUILTIN_MODELS, *(Path(r).expanduser() for r in settings.models.roots)),
                         device=settings.models.device)


def left_over_copies(db: Database, store: Store) -> list[Path]:
    """Files of moved instances left in the study they left (the node stopped between recording the move and
    deleting the old file): not on record, so retention would never delete them."""
    return [p for study, sop in db.moved_instances() for p in store.stray_copies(study, sop, db.instance_file(sop))]


class NodeService:
    """Everything `dicom-node serve` runs."""

    def __init__(self, settings: Settings) -> None:
        from dicom_node.web.metrics import MeteredAnalyser, NodeMetrics

        self.settings = settings
        self.started_at = time.time()
        # Before the database is opened (and migrated) or anything recovered: it may be another node's.
        self.lock = DataDirLock(settings.data_dir)
        self.lock.acquire()
        self.db = open_database(settings)
        self.store = Store(settings.data_dir, durability=settings.node.durability)
        load_plugins(settings)
        self.registry = make_registry(settings)
        self.metrics = NodeMetrics()
        self.analyser = MeteredAnalyser(self.registry, self.db, self.metrics)
        self.pipeline = Pipeline(settings, self.db, self.store, self.analyser)
        self.sender = Sender(settings, self.db)
        self.scp = StorageSCP(settings, self.db, self.store, on_association_end=lambda: self.scheduler.wake("assembly"))
        self.scheduler = NodeScheduler(settings, self.db, self.store, self.pipeline, self.sender,
                                       tune_polling=self.scp.relax_idle_associations)
        self.metrics.attach(self)
        self.http: Any = None

    def start(self) -> None:
        """Recover from an earlier stop, then start the jobs and listen."""
        recovered = self.db.recover()
        # A crash between the last delivery of a study and its state change leaves it `encoded` with
        # nothing left to send: settle those now.
        self.db.settle_delivered_studies()
        cleaned = self.store.clean_tmp()
        # A stop between recording a move and deleting the moved instance's old file leaves a copy nobody reads.
        cleaned += self.store.remove(left_over_copies(self.db, self.store))
        if any(recovered.values()) or cleaned:
            log.info("recovered after restart: %s, %d temporary or left-over file(s) removed", recovered, cleaned)
        self.analyser.ready.clear()  # no study is claimed until the warm-up below has loaded the models
        self.scheduler.start()
        self.scp.start()
        # Load the models in the background: the node listens at once, the first study does not pay for it.
        names = self.routed_analyses()
        for name in names:
            self.analyser.status.setdefault(name, "loading")

        def warm_up() -> None:
            self.analyser.warm_up(names)
            self.scheduler.wake("pipeline")  # studies that arrived while loading

        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        if self.settings.http.enabled:
            self._start_http()

    def _start_http(self) -> None:
        from dicom_node.web import HttpServer, create_app

        http = self.settings.http
        self.http = HttpServer(create_app(self), http.host, http.port)
        try:
            self.http.start()
        except OSError as exc:
            self.http = None
            raise NodeError(f"cannot listen for HTTP on {http.host}:{http.port}: {exc.strerror or exc}") from exc
        log.info("dashboard on %s", self.http.url)

    def stop(self) -> None:
        """Stop listening, then stop the jobs (safe to call after a failed start)."""
        if self.http is not None:
            self.http.stop()
            self.http = None
        self.scp.stop()
        self.sender.stop()
        try:
            self.scheduler.stop()
        except Exception:  # noqa: BLE001 - the database must still be closed; the failure is logged
            log.exception("stopping the scheduler failed")
        self.db.close()
        self.lock.release()

    # ------------------------------------------------------------------ state for the operator surface

    def routed_analyses(self) -> list[str]:
        """Analyses the routing rules name, in order, once each."""
        return list(dict.fromkeys(a for rule in self.settings.rules for a in rule.analyses))

    def listener_bound(self) -> bool:
        """True while the DICOM listener holds its socket."""
        server = getattr(self.scp, "_server", None)
        try:
            return server is not None and server.socket.fileno() >= 0
        except (AttributeError, OSError):
            return False

    def scheduler_running(self) -> bool:
        """True while the background jobs run."""
        return bool(getattr(self.scheduler._scheduler, "running", False))

    # --------------------------------------------------------------- operator actions (audited)

    def retry_study(self, study_instance_uid: str, actor: str) -> dict[str, int]:
        """Re-queue a study's failed deliveries, or its failed analysis; audited."""
        deliveries = self.db.requeue_failed(study_instance_uid=study_instance_uid)
        studies = self.db.requeue_failed_studies(study_instance_uid) if not deliveries else 0
        self.db.record_retry(actor, deliveries, studies, target=study_instance_uid, study_instance_uid=study_instance_uid)
        if deliveries:
            self.scheduler.wake_senders()
        if studies:
            self.scheduler.wake("pipeline")
        return {"deliveries": deliveries, "studies": studies}

    def retry_destination(self, name: str, actor: str) -> int:
        """Re-queue every failed delivery to destination `name`; audited."""
        n = self.db.requeue_failed(destination=name)
        self.db.record_retry(actor, n, target=name, destination=name)
        if n:
            self.scheduler.wake(f"deliver:{name}")
        return n

    def reanalyse_study(self, study_instance_uid: str, actor: str) -> str | None:
        """Send a settled study back through routing and analysis; None, or why not.  Audited either way."""
        why = self.db.request_reanalysis(study_instance_uid)
        self.db.record_action("reanalyse", actor, "ok" if why is None else "refused", target=study_instance_uid,
                              study_instance_uid=study_instance_uid, detail=why)
        if why is None:
            self.scheduler.wake("pipeline")
        return why

    def echo_destination(self, name: str, actor: str) -> tuple[bool, str]:
        """C-ECHO destination `name` (KeyError if unknown); audited."""
        from dicom_node.scu import echo

        dest = self.settings.destination(name)
        ok, message = echo(self.settings.node.ae_title, dest, self.settings.delivery)
        self.db.record_action("echo", actor, "ok" if ok else "failed", target=dest.address, destination=name,
                              detail=message)
        if ok:
            self.db.expedite(name)  # it answers: what waits out a backoff may go now
            self.scheduler.wake(f"deliver:{name}")
        return ok, message
