"""The node's background jobs: stopping while a job is running and waking another."""

from __future__ import annotations

import threading
from pathlib import Path

from apscheduler.schedulers.base import STATE_STOPPED
from nodekit import node_config, settings_from
from peers import free_port, wait_for

from dicom_node.db import Database
from dicom_node.scheduler import NodeScheduler
from dicom_node.storage import Store


class _SlowPipeline:
    """Finishes its study only once the scheduler has begun to shut down, then reports work done (which wakes
    the delivery jobs, as a real analysis that queued deliveries does)."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def process_pending(self, limit: int = 1) -> int:
        self.calls += 1
        if self.calls > 1:
            return 0
        self.running.set()
        self.release.wait(30)
        return 1


class _NoDeliveries:
    def deliver_due(self, dest) -> int:  # noqa: ANN001
        return 0


def test_stop_while_an_analysis_finishes_and_wakes_the_senders_returns(tmp_path: Path) -> None:
    """SIGTERM during an analysis hung the node for ever: apscheduler's shutdown holds its job-store lock while
    it waits for the running job, and that job's wake of the senders needed the same lock."""
    raw = node_config(tmp_path / "data", free_port(), destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    settings = settings_from(raw)
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.data_dir / "node.sqlite")
    pipeline = _SlowPipeline()
    scheduler = NodeScheduler(settings, db, Store(settings.data_dir), pipeline, _NoDeliveries())  # type: ignore[arg-type]
    scheduler.start()
    try:
        wait_for(pipeline.running.is_set, 20, what="the pipeline job to start")
        stopper = threading.Thread(target=scheduler.stop, daemon=True)
        stopper.start()
        wait_for(lambda: scheduler._scheduler.state == STATE_STOPPED, 20, what="the shutdown to begin")
        pipeline.release.set()
        stopper.join(30)
        assert not stopper.is_alive(), "stop() did not return: the shutdown and the running job wait on each other"
    finally:
        pipeline.release.set()
        db.close()
