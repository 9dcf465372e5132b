"""Background work on an apscheduler `BackgroundScheduler`: completeness sweep, pipeline, one delivery
job per destination, retention purge.

Jobs run on an interval *and* can be woken at once (`wake`): the SCP wakes the sweep when an association
ends, the sweep wakes the pipeline, the pipeline wakes the senders.  A wake that arrives while the job is
running is not lost: the job loops until no wake is pending.  The durable state is the database, so a
missed wake only costs one interval.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import assembly
from dicom_node.db import Database
from dicom_node.pipeline import Pipeline
from dicom_node.scu import Sender
from dicom_node.settings import Destination, Settings
from dicom_node.storage import Store

log = logging.getLogger("dicom_node.scheduler")


class _Wakeable:
    """Runs `work` until it reports no more work and no wake is pending, or the node is stopping."""

    def __init__(self, name: str, work: Callable[[], int], stopping: threading.Event) -> None:
        self.name = name
        self.work = work
        self.pending = threading.Event()
        self.stopping = stopping

    def __call__(self) -> None:
        while not self.stopping.is_set():
            self.pending.clear()
            try:
                done = self.work()
            except Exception:  # noqa: BLE001 - a failing sweep must not kill the scheduler
                log.exception("%s failed", self.name)
                done = 0
            if not done and not self.pending.is_set():
                return


class NodeScheduler:
    """Owns the apscheduler instance and the node's periodic jobs."""

    def __init__(self, settings: Settings, db: Database, store: Store, pipeline: Pipeline, sender: Sender,
                 tune_polling: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.pipeline = pipeline
        self.sender = sender
        n_dest = len(settings.destinations)
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=4 + n_dest)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        # "maximum number of running instances reached" is expected when a wake meets a running job.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        self._jobs: dict[str, _Wakeable] = {}
        # Set (under `_wake_lock`) when stopping: from then on wakes are dropped. apscheduler's shutdown holds
        # its job-store lock while it waits for running jobs, so a job that woke another (`modify_job`, which
        # needs that lock) after shutdown began would wait for ever, and so would the shutdown.
        self._stopping = threading.Event()
        self._wake_lock = threading.Lock()
        self._add("assembly", self._assembly, settings.assembly.sweep_interval_s)
        self._add("pipeline", self._pipeline, 2.0)
        for dest in settings.destinations:
            self._add(f"deliver:{dest.name}", functools.partial(self._deliver, dest), 1.0)
        self._add("retention", self._purge, settings.retention.purge_interval_s)
        if tune_polling is not None:
            self._scheduler.add_job(tune_polling, "interval", seconds=0.5, id="polling", name="polling")

    def _add(self, name: str, work: Callable[[], int], interval: float) -> None:
        job = _Wakeable(name, work, self._stopping)
        self._jobs[name] = job
        self._scheduler.add_job(job, "interval", seconds=interval, id=name, name=name,
                                next_run_time=datetime.now() + timedelta(seconds=0.2))

    def start(self) -> None:
        """Start the jobs."""
        self._scheduler.start()

    def stop(self) -> None:
        """Stop; waits for running jobs to finish their current step (work they leave is in the database)."""
        with self._wake_lock:
            self._stopping.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def wake(self, name: str) -> None:
        """Run job `name` as soon as possible (nothing once stopping)."""
        job = self._jobs.get(name)
        if job is None:
            return
        job.pending.set()
        with self._wake_lock:
            if self._stopping.is_set():
                return
            try:
                self._scheduler.modify_job(name, next_run_time=datetime.now())
            except JobLookupError:
                pass  # gone with a shut-down scheduler; `pending` is set for any run still to come

    def wake_senders(self) -> None:
        """Wake every delivery job."""
        for name in self._jobs:
            if name.startswith("deliver:"):
                self.wake(name)

    # ----------------------------------------------------------------------------------- jobs

    def _assembly(self) -> int:
        completed = assembly.sweep(self.db, self.settings)
        if completed:
            self.wake("pipeline")
        return 0  # the sweep is idempotent: no need to loop

    def _pipeline(self) -> int:
        n = self.pipeline.process_pending(limit=1)
        # Outputs of a study whose identity was corrected since they went out (also while they were being sent)
        # are answered (a rejection note or a warning) whatever its new analysis does, and those a stop left.
        if self.pipeline.answer_superseded() or n:
            self.wake_senders()
        return n

    def _deliver(self, dest: Destination) -> int:
        return self.sender.deliver_due(dest)

    def purge(self) -> int:
        """Apply the retention policy once (also run every `purge_interval_s`); returns the files removed."""
        ret = self.settings.retention
        now = time.time()
        removed = 0
        if ret.instances_days > 0:
            for uid in self.db.purgeable_studies(now - ret.instances_days * 86400):
                removed += self.store.remove(self.db.forget_instances(uid))
        if ret.outputs_days > 0:
            removed += self.store.remove(self.db.purge_outputs(now - ret.outputs_days * 86400))
        if removed:
            log.info("retention: removed %d file(s)", removed)
        return removed

    def _purge(self) -> int:
        self.purge()
        return 0  # one pass is all: what it could not delete waits for the next interval
