"""Prometheus metrics of a running node.

Most values are read from the database at scrape time, so totals survive restarts and agree with the
audit trail: the ``*_total`` counters come from the `counters` table that a trigger keeps in step with
`audit_events`, gauges from the current rows.  Process-lifetime (reset at restart, as Prometheus
expects of a histogram; use ``rate()`` / ``increase()``): ``dicom_node_analysis_seconds`` and
``dicom_node_http_auth_failures_total``.  The full list is in the README, "Operator dashboard".
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from dicom_node import __version__
from dicom_node.db import DELIVERY_STATES, Database
from dicom_node.pipeline import Analyser, job_key

log = logging.getLogger("dicom_node.web.metrics")

if TYPE_CHECKING:
    from dicom_node.service import NodeService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series only repeat the start time for every label set.
disable_created_metrics()

#: Seconds; an analysis of one radiograph on 2 CPU cores takes about 1-10 s, a CT series longer.
ANALYSIS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class NodeMetrics:
    """The process-lifetime instruments plus a collector reading the database at every scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.analysis_seconds = Histogram(
            "dicom_node_analysis_seconds", "Wall time of one analysis run (models only, not encoding), since start",
            ("analysis", "models", "outcome"), buckets=ANALYSIS_BUCKETS, registry=self.registry,
        )
        self.auth_failures = Counter(
            "dicom_node_http_auth_failures", "HTTP requests refused for missing or wrong credentials, since start",
            ("path_group",), registry=self.registry,
        )

    def attach(self, service: NodeService) -> None:
        """Add the database-derived metrics of `service`."""
        self.registry.register(_ServiceCollector(service))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class MeteredAnalyser(Analyser):
    """The pipeline's `Analyser`, timing every run into the histogram and the job row, and remembering
    whether each analysis could be built (for /readyz and the models page)."""

    def __init__(self, registry: Any, db: Database, metrics: NodeMetrics) -> None:
        super().__init__(registry)
        self.db = db
        self.metrics = metrics
        #: analysis name -> "loading", "ready" or the one-line reason it cannot run.
        self.status: dict[str, str] = {}

    def warm_up(self, names: Sequence[str]) -> dict[str, str]:
        """Load each analysis's models, recording the outcome per analysis as it comes."""
        for name in dict.fromkeys(names):
            self.status.setdefault(name, "loading")
        problems: dict[str, str] = {}
        for name in dict.fromkeys(names):
            problems.update(super().warm_up([name]))
            self.status[name] = problems.get(name, "ready")
        return problems

    def run(self, name: str, datasets: Sequence[Any]) -> Any:
        started = time.monotonic()
        outcome = "failed"
        try:
            result = super().run(name, datasets)
            outcome = "ok"
            self.status[name] = "ready"
            return result
        finally:
            seconds = time.monotonic() - started
            self.metrics.analysis_seconds.labels(name, self._models(name), outcome).observe(seconds)
            try:
                uids = [str(ds.SOPInstanceUID) for ds in datasets]
                if uids:
                    study = str(datasets[0].StudyInstanceUID)
                    self.db.record_analysis_seconds(study, name, job_key(self.db, study, uids)[0],
                                                   seconds)
            except Exception:  # noqa: BLE001 - timing must never fail a study
                log.warning("could not record the analysis time of %s", name, exc_info=True)

    def _models(self, name: str) -> str:
        try:
            return ",".join(f"{m.name}@{m.version}" for m in self.get(name).models())
        except Exception:  # noqa: BLE001 - an analysis that cannot load its models
            return ""


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


class _ServiceCollector(Collector):
    """Reads the node's state at scrape time (a handful of indexed queries)."""

    def __init__(self, service: NodeService) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []  # built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        s = self.service
        db = s.db
        now = time.time()
        yield from self._identity(now)
        yield from self._counters(db)
        yield from self._state(db, now)
        yield from self._health(now)

    def _identity(self, now: float) -> Iterator[Any]:
        s = self.service
        info = InfoMetricFamily("dicom_node_build", "Version and identity of the node")
        info.add_metric([], {"version": __version__, "ae_title": s.settings.node.ae_title})
        yield info
        g = _gauge("dicom_node_start_time_seconds", "Unix time the node started")
        g.add_metric([], s.started_at)
        yield g

    def _counters(self, db: Database) -> Iterator[Any]:
        rows = db.counters()
        families: dict[str, tuple[CounterMetricFamily, Callable[[dict[str, Any]], list[str]]]] = {
            "instances_received": (_counter("dicom_node_instances_received", "Instances stored (C-STORE success),"
                                            " by calling AE title", ("calling_ae",)), lambda r: [r["a"]]),
            "store_failures": (_counter("dicom_node_store_failures", "C-STORE requests answered with a failure"
                                        " status, by calling AE title", ("calling_ae",)), lambda r: [r["a"]]),
            "associations": (_counter("dicom_node_associations", "Incoming associations that ended, by how they"
                                      " ended (released, aborted, rejected)", ("state",)), lambda r: [r["b"]]),
            "deliveries": (_counter("dicom_node_delivery_attempts", "Outcomes of delivery attempts per destination"
                                    " (delivered, retry, failed, interrupted)", ("destination", "outcome")),
                           lambda r: [r["a"], r["b"]]),
            "actions": (_counter("dicom_node_operator_actions", "Operator actions by action and outcome",
                                 ("action", "outcome")), lambda r: [r["a"], r["b"]]),
        }
        open_instances = db.open_association_instances()
        seen_ae: set[str] = set()
        last_delivered = _gauge("dicom_node_last_delivery_timestamp_seconds",
                                "Unix time of the last successful delivery, per destination", ("destination",))
        for r in rows:
            if r["metric"] == "last_delivered_at":
                last_delivered.add_metric([r["a"]], r["value"])
                continue
            fam = families.get(r["metric"])
            if fam is None:
                continue
            value = r["value"]
            if r["metric"] == "instances_received":
                seen_ae.add(r["a"])
                value += open_instances.get(r["a"], 0)  # associations still open count too
            fam[0].add_metric(fam[1](r), value)
        for ae, n in open_instances.items():
            if ae not in seen_ae and n:
                families["instances_received"][0].add_metric([ae], n)
        for family, _ in families.values():
            yield family
        yield last_delivered

    def _state(self, db: Database, now: float) -> Iterator[Any]:
        g = _gauge("dicom_node_studies", "Studies by state", ("state",))
        for state, n in db.study_counts().items():
            g.add_metric([state], n)
        yield g
        g = _gauge("dicom_node_jobs", "Analysis jobs by analysis and state", ("analysis", "state"))
        for r in db.job_counts():
            g.add_metric([r["analysis"], r["state"]], r["n"])
        yield g
        queue = _gauge("dicom_node_delivery_queue", "Deliveries by destination and state (pending + sending ="
                       " queue depth; failed = waiting for an operator retry)", ("destination", "state"))
        rows = {r["destination"]: r for r in db.queue_depth()}
        for dest in sorted({d.name for d in self.service.settings.destinations} | set(rows)):
            r = rows.get(dest, {})
            for state in DELIVERY_STATES:
                queue.add_metric([dest, state], r.get(state) or 0)
        yield queue
        oldest = db.oldest_pending_deliveries()
        g = _gauge("dicom_node_oldest_pending_delivery_age_seconds", "Age of the oldest delivery not yet done"
                   " (pending or sending), per destination; 0 when the queue is empty", ("destination",))
        for dest in sorted({d.name for d in self.service.settings.destinations} | set(oldest)):
            g.add_metric([dest], max(0.0, now - oldest[dest]) if dest in oldest else 0.0)
        yield g
        waiting = db.oldest_waiting()
        g = _gauge("dicom_node_oldest_study_age_seconds", "How long the longest-waiting study has been in each"
                   " unsettled state (received, complete, analysing, encoded); 0 when none", ("state",))
        for state in ("received", "complete", "analysing", "encoded"):
            g.add_metric([state], max(0.0, now - waiting[state]) if state in waiting else 0.0)
        yield g
        last = db.last_received_at()
        g = _gauge("dicom_node_last_received_timestamp_seconds", "Unix time the last source instance arrived"
                   " (0 = never)")
        g.add_metric([], last or 0.0)
        yield g
        g = _gauge("dicom_node_open_associations", "Incoming associations open now")
        g.add_metric([], db.open_associations())
        yield g

    def _health(self, now: float) -> Iterator[Any]:
        s = self.service
        try:
            usage = shutil.disk_usage(s.settings.data_dir)
            free, total = float(usage.free), float(usage.total)
        except OSError:
            free = total = float("nan")
        g = _gauge("dicom_node_disk_free_bytes", "Free space of the file system holding the data directory")
        g.add_metric([], free)
        yield g
        g = _gauge("dicom_node_disk_total_bytes", "Size of the file system holding the data directory")
        g.add_metric([], total)
        yield g
        size = 0.0
        for suffix in ("", "-wal"):
            try:
                size += (s.db.path.parent / (s.db.path.name + suffix)).stat().st_size
            except OSError:
                pass
        g = _gauge("dicom_node_database_bytes", "Size of node.sqlite plus its write-ahead log")
        g.add_metric([], size)
        yield g
        g = _gauge("dicom_node_dicom_listener_up", "1 when the DICOM listener is bound and serving")
        g.add_metric([], 1.0 if s.listener_bound() else 0.0)
        yield g
        g = _gauge("dicom_node_analysis_ready", "1 when an analysis named by a routing rule has its models loaded"
                   " (0 while loading or when it cannot run: /readyz says why)", ("analysis",))
        for name in s.routed_analyses():
            g.add_metric([name], 1.0 if s.analyser.status.get(name) == "ready" else 0.0)
        yield g
        g = _gauge("dicom_node_model_loaded", "1 when a model folder found by the registry is loaded in memory",
                   ("model", "version"))
        loaded = set(s.registry.loaded())
        try:
            specs = s.registry.specs()
        except Exception:  # noqa: BLE001 - a broken model.json is reported by /readyz
            specs = {}
        for name, spec in sorted(specs.items()):
            g.add_metric([name, spec.version], 1.0 if name in loaded else 0.0)
        yield g
