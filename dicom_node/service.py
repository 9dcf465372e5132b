"""The running node: database, store, SCP, pipeline, senders and scheduler wired from one `Settings`."""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path

from dicom_node.db import Database
from dicom_node.pipeline import Analyser, Pipeline
from dicom_node.scheduler import NodeScheduler
from dicom_node.scp import StorageSCP
from dicom_node.scu import Sender
from dicom_node.settings import Settings
from dicom_node.storage import Store
from inference.registry import BUILTIN_MODELS, ModelRegistry

log = logging.getLogger("dicom_node")

DB_NAME = "node.sqlite"


def open_database(settings: Settings) -> Database:
    """The node database in the configured data directory (created and migrated if needed)."""
    return Database(settings.data_dir / DB_NAME, synchronous_full=settings.node.durability == "full")


def load_plugins(settings: Settings) -> None:
    """Import the configured analysis plugin modules (they call `inference.analyses.register`)."""
    for module in settings.models.plugins:
        importlib.import_module(module)


def make_registry(settings: Settings) -> ModelRegistry:
    """Model registry over the built-in models and the configured roots."""
    return ModelRegistry(roots=(BUILTIN_MODELS, *(Path(r).expanduser() for r in settings.models.roots)),
                         device=settings.models.device)


class NodeService:
    """Everything `dicom-node serve` runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = open_database(settings)
        self.store = Store(settings.data_dir, durability=settings.node.durability)
        load_plugins(settings)
        self.registry = make_registry(settings)
        self.analyser = Analyser(self.registry)
        self.pipeline = Pipeline(settings, self.db, self.store, self.analyser)
        self.sender = Sender(settings, self.db)
        self.scp = StorageSCP(settings, self.db, self.store, on_association_end=lambda: self.scheduler.wake("assembly"))
        self.scheduler = NodeScheduler(settings, self.db, self.store, self.pipeline, self.sender,
                                       tune_polling=self.scp.relax_idle_associations)

    def start(self) -> None:
        """Recover from an earlier stop, then start the jobs and listen."""
        recovered = self.db.recover()
        # A crash between the last delivery of a study and its state change leaves it `encoded` with
        # nothing left to send: settle those now.
        self.db.settle_delivered_studies()
        cleaned = self.store.clean_tmp()
        if any(recovered.values()) or cleaned:
            log.info("recovered after restart: %s, %d temporary file(s) removed", recovered, cleaned)
        self.scheduler.start()
        self.scp.start()
        # Load the models in the background: the node listens at once, the first study does not pay for it.
        names = [a for rule in self.settings.rules for a in rule.analyses]
        threading.Thread(target=self.analyser.warm_up, args=(names,), name="warm-up", daemon=True).start()

    def stop(self) -> None:
        """Stop listening, then stop the jobs (safe to call after a failed start)."""
        self.scp.stop()
        try:
            self.scheduler.stop()
        except Exception:  # noqa: BLE001 - never started
            pass
        self.db.close()
