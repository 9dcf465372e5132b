"""process_study: route -> analyse -> encode -> write outputs -> queue deliveries, one DB state per step.

A study moves ``complete -> analysing -> encoded -> delivered`` (or ``unrouted`` / ``failed`` with the
reason).  Outputs carry UIDs derived from their sources and the model versions, so running the same
input twice (e.g. after ``kill -9`` during analysis) writes the same objects and queues nothing new;
instances arriving later make a new input whose SR names the earlier SR as its predecessor, while the
per-image SEG / SC / PR of unchanged images keep their UIDs and replace themselves.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicom_node.db import (
    ANALYSING,
    CORRECTABLE_IDENTITY,
    ENCODED,
    FAILED,
    STRANDED_RETRY_S,
    UNROUTED,
    WAITING_PREFIX,
    Database,
)
from dicom_node.errors import NodeError, PipelineError, StorageError, redact, redact_all
from dicom_node.routing import InstanceHeaders, RuleMatch, route
from dicom_node.settings import Destination, Rule, Settings
from dicom_node.storage import Store, existing_installation_serial
from inference import analyses
from inference.registry import ModelError, ModelRegistry

log = logging.getLogger("dicom_node.pipeline")

#: Failures raised on purpose with a reason that says it all; anything else under a PipelineError is a crash
#: whose traceback goes to the log.
_REPORTED_ERRORS = (NodeError, ModelError, analyses.AnalysisError)


@dataclass(frozen=True)
class EncodedFile:
    """One output object written to disk."""

    kind: str
    variant: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int

    def row(self) -> dict[str, Any]:
        """The `outputs` row the database records for it."""
        return {"sop_instance_uid": self.sop_instance_uid, "study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid, "sop_class_uid": self.sop_class_uid,
                "transfer_syntax_uid": self.transfer_syntax_uid, "kind": self.kind, "variant": self.variant,
                "path": str(self.path), "size": self.size}


def describe(exc: BaseException) -> str:
    """One line for an error: the node's and the model packages' own messages as they are, anything else
    (pydicom, highdicom, torch ...) as ``Type: message`` with quoted values redacted."""
    if isinstance(exc, (PipelineError, ModelError, analyses.AnalysisError)):
        return str(exc)
    return f"{type(exc).__name__}: {redact(str(exc))}"


def input_key(sop_instance_uids: Sequence[str], identity_epoch: int = 0) -> str:
    """Digest of the analysed instance set and the study's identity epoch (the identity of a job's input): the
    same images re-sent with a corrected patient name or ID are a new input."""
    text = "\n".join(sorted(sop_instance_uids))
    if identity_epoch:
        text += f"\nidentity epoch {identity_epoch}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_output(row: dict[str, Any]) -> Dataset | None:
    """The headers of an output the node wrote (None when retention removed it, or it cannot be read)."""
    if row.get("purged_at") is not None:
        return None
    try:
        return pydicom.dcmread(row["path"], stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None


def _sent_identity(ds: Dataset) -> tuple[str, ...]:
    """The patient and order identity an output was sent under (a rejection note carries one)."""
    return tuple(str(ds.get(keyword, "")) for keyword in CORRECTABLE_IDENTITY)


def job_key(db: Database, study_instance_uid: str, sop_instance_uids: Sequence[str]) -> tuple[str, int]:
    """(input key, identity epoch) of a job over these instances of the study, as recorded now."""
    epoch = db.identity_epoch(study_instance_uid)
    return input_key(sop_instance_uids, epoch), epoch


def variant_of(dest: Destination | None) -> str:
    """Encoding-options label of a destination (outputs differ only by SEG options)."""
    if dest is None:
        return "binary/none"
    return f"{dest.seg_format}/{dest.seg_compression}"


def encode_bytes(ds: Dataset) -> bytes:
    """A dataset in the DICOM file format."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read_datasets(paths: Sequence[str | Path]) -> list[Dataset]:
    """Read source instances with their pixel data; PipelineError names the unreadable file."""
    out: list[Dataset] = []
    for p in paths:
        try:
            out.append(pydicom.dcmread(p))
        except Exception as exc:  # noqa: BLE001 - any read failure is one reason
            raise PipelineError(f"cannot read {Path(p).name}: {type(exc).__name__}: {redact(str(exc))}") from exc
    return out


class Analyser:
    """Builds each analysis once (models load once through the registry) and runs it."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: Cleared while `warm_up` loads the models: no study is claimed meanwhile, so a node killed while
        #: loading (a restart loop) leaves no study `analysing` to be counted as interrupted by it.
        self.ready = threading.Event()
        self.ready.set()

    def get(self, name: str) -> Any:
        """The analysis called `name`; PipelineError if it does not exist."""
        with self._lock:
            if name not in self._cache:
                try:
                    self._cache[name] = analyses.create(name, self.registry)
                except analyses.AnalysisError as exc:
                    raise PipelineError(str(exc)) from exc
            return self._cache[name]

    def warm_up(self, names: Sequence[str]) -> dict[str, str]:
        """Build each analysis and load its models now (not at the first study); returns name -> problem
        for those that cannot run (one line each), and logs the outcome."""
        problems: dict[str, str] = {}
        self.ready.clear()
        try:
            for name in dict.fromkeys(names):
                try:
                    models = self.get(name).models()
                    log.info("analysis %s ready (%s)", name, ", ".join(f"{m.name} {m.version}" for m in models) or "no models")
                except Exception as exc:  # noqa: BLE001 - reported, studies routed to it will fail with the reason
                    problems[name] = describe(exc)
                    log.warning("analysis %s cannot run: %s", name, problems[name])
        finally:
            self.ready.set()
        return problems

    def run(self, name: str, datasets: Sequence[Dataset]) -> Any:
        """Run analysis `name`; PipelineError with a one-line reason on any failure."""
        analysis = self.get(name)
        try:
            return analysis.run(datasets)
        except Exception as exc:  # noqa: BLE001 - a model failure fails the job, not the node
            raise PipelineError(f"analysis {name!r} failed: {describe(exc)}") from exc


def build_encoded(result: Any, datasets: Sequence[Dataset], destinations: Sequence[Destination], *,
                  producer: Any, predecessor: Any = None) -> list[tuple[str, Any]]:
    """Encode `result` for every destination's needs: [(variant, EncodedOutput)].

    SR, SC and PR do not depend on encoding options, so they are built once; a SEG is built per distinct
    (seg_format, seg_compression).  Without destinations every kind is built with default options.
    """
    from reports import OutputKind, OutputOptions, build_outputs

    groups: dict[str, tuple[OutputOptions, set[str]]] = {}
    if not destinations:
        groups[variant_of(None)] = (OutputOptions(), {k.value for k in OutputKind})
    for dest in destinations:
        v = variant_of(dest)
        opts, kinds = groups.setdefault(v, (OutputOptions(dest.seg_format, dest.seg_compression), set()))
        kinds.update(dest.outputs)
    shared = set().union(*(k for _, k in groups.values())) - {"seg"}
    out: list[tuple[str, Any]] = []
    first = True
    created = datetime.datetime.now(datetime.UTC)  # one creation moment, whatever the variants
    for v, (opts, kinds) in groups.items():
        wanted = ({"seg"} & kinds) | (shared if first else set())
        first = False
        if not wanted:
            continue
        try:
            objs = build_outputs(result, datasets, kinds=[OutputKind(k) for k in sorted(wanted)], options=opts,
                                 producer=producer, predecessor_sr=predecessor, created=created)
        except Exception as exc:  # noqa: BLE001
            raise PipelineError(f"encoding outputs failed: {type(exc).__name__}: {redact(str(exc))}") from exc
        out.extend((v if o.kind.value == "seg" else "any", o) for o in objs)
    return out


class Pipeline:
    """Runs complete studies through routing, analysis and encoding; records every step."""

    def __init__(self, settings: Settings, db: Database, store: Store, analyser: Analyser) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.analyser = analyser
        self._producer: Any = None
        # A rejection note that could not be written (a full disk) waits STRANDED_RETRY_S, as a study's outputs
        # do, instead of being tried (and logged) at every 2-s pipeline pass: (study, destination) -> when.
        self._notes_due: dict[tuple[str, str], float] = {}
        # Outputs that could not be written because the whole store fails (full, over quota, read-only) pause
        # every study's analysis for STRANDED_RETRY_S: analysing the others (seconds each) only to fail the same
        # write would keep the CPU busy for nothing and log an error per study.  Until then, `process_pending`
        # does nothing.  (A failure of one file or folder, e.g. its permissions, holds up that study alone.)
        self._disk_wait_until = 0.0
        self.clock: Callable[[], float] = time.monotonic

    def producer(self) -> Any:
        """Producer identity for outputs; made once (the installation's serial is read from its key file)."""
        from reports import Producer

        if self._producer is None:
            serial = self.settings.producer.device_serial_number or self.store.installation_serial()
            self._producer = Producer(device_serial_number=serial, institution_name=self.settings.producer.institution_name)
        return self._producer

    def process_pending(self, limit: int = 50) -> int:
        """Process complete studies (oldest first); returns how many were processed (none while the models
        are still loading: see `Analyser.ready`)."""
        if not self.analyser.ready.is_set() or self.clock() < self._disk_wait_until:
            return 0
        # The pipeline job runs alone: a study `analysing` now is one a failed write left behind.
        if released := self.db.release_stranded_studies(time.time() - STRANDED_RETRY_S):
            log.info("%d study(ies) left analysing by a failed write taken up again", released)
        n = 0
        for uid in self.db.complete_studies(limit):
            state = self.process_study(uid)
            if self.clock() < self._disk_wait_until:
                break  # the store failed as a whole: the other studies wait for the next try
            # A study left waiting for the disk is not progress: counting it would run the next pass at once.
            if state not in (None, ANALYSING):
                n += 1
        return n

    def process_study(self, study_uid: str) -> str | None:
        """Analyse one complete study; returns its new state (None if another worker had it)."""
        generation = self.db.claim_study(study_uid)
        if generation is None:
            return None
        try:
            return self._process_claimed(study_uid, generation)
        except Exception as exc:  # noqa: BLE001 - never leave a study 'analysing' until the next restart
            log.exception("study %s: internal error", study_uid)
            self.db.finish_study(study_uid, generation, FAILED, f"internal error {type(exc).__name__}: {redact(str(exc))}")
            return FAILED

    def _process_claimed(self, study_uid: str, generation: int) -> str | None:
        started = time.monotonic()
        rows = self.db.source_instances(study_uid)
        routing = route([InstanceHeaders.from_row(r) for r in rows], self.settings.rules)
        if not routing.routed:
            self.db.finish_study(study_uid, generation, UNROUTED, routing.reason)
            log.info("study %s unrouted: %s", study_uid, routing.reason)
            return UNROUTED
        by_uid = {r["sop_instance_uid"]: r for r in rows}
        failures: list[str] = []
        for match in routing.matches:
            for name in match.rule.analyses:
                try:
                    if not self._run_job(study_uid, generation, match, name, by_uid):
                        # Superseded: the study is analysed again with the new instances, by every analysis.
                        return self._state(study_uid)
                except StorageError as exc:
                    # The outputs could not be written (a full or read-only disk): not the study's fault. It
                    # stays claimed, and `process_pending` takes it up again after STRANDED_RETRY_S.  (The pause
                    # comes first: the database may be on the same full disk.)
                    if exc.store_wide:
                        self._disk_wait_until = self.clock() + STRANDED_RETRY_S
                    reason = f"{WAITING_PREFIX}{name}: {exc}"
                    log.warning("study %s: %s (again in %.0f s%s)", study_uid, reason, STRANDED_RETRY_S,
                                "; the other studies wait too" if exc.store_wide else "")
                    self.db.note_study(study_uid, reason)
                    return ANALYSING
                except PipelineError as exc:
                    failures.append(f"{name}: {exc}")
                    # A model or encoder crash (not a failure the node reports on purpose) needs its traceback
                    # for a bug report; the log formatter redacts the values its messages quote.
                    unexpected = exc.__cause__ is not None and not isinstance(exc.__cause__, _REPORTED_ERRORS)
                    log.error("study %s, analysis %s failed: %s", study_uid, name, exc,
                              exc_info=exc.__cause__ if unexpected else None)
                except Exception as exc:  # noqa: BLE001 - a bug must fail the study, not strand it in 'analysing'
                    failures.append(f"{name}: internal error {type(exc).__name__}: {redact(str(exc))}")
                    log.exception("study %s, analysis %s: internal error", study_uid, name)
        if failures:
            self.db.finish_study(study_uid, generation, FAILED, "; ".join(failures))
            return FAILED
        if self.db.finish_study(study_uid, generation, ENCODED):
            self.db.settle_delivered_studies([study_uid])
        log.info("study %s encoded in %.2f s", study_uid, time.monotonic() - started)
        return self._state(study_uid)

    def _state(self, study_uid: str) -> str | None:
        state = self.db.study(study_uid)
        return state["state"] if state else None

    def _run_job(self, study_uid: str, generation: int, match: RuleMatch, name: str,
                 by_uid: dict[str, dict[str, Any]]) -> bool:
        """Run one analysis of the study and record its outputs; False if the study changed meanwhile."""
        rule: Rule = match.rule
        uids = sorted(match.sop_instance_uids)
        key, epoch = job_key(self.db, study_uid, uids)
        job = self.db.start_job(study_uid, name, rule.name, key, generation, epoch, uids)
        if job["state"] in ("encoded", "delivered"):
            return True  # this exact input was analysed and its deliveries queued already
        try:
            datasets = read_datasets([by_uid[u]["path"] for u in uids])
            # Every output UID derives from the epoch: a corrected identity's outputs are new objects.
            result = replace(self.analyser.run(name, datasets), identity_epoch=epoch)
            destinations = self.settings.rule_destinations(rule)
            predecessor = self._predecessor(study_uid, name, job["id"], epoch)
            encoded = build_encoded(result, datasets, destinations, producer=self.producer(), predecessor=predecessor)
            files = [self._write(v, o) for v, o in encoded]
        except Exception as exc:
            self.db.fail_job(job["id"], str(exc) if isinstance(exc, (PipelineError, StorageError))
                             else f"internal error {type(exc).__name__}: {redact(str(exc))}")
            raise
        pairs = []
        for dest in destinations:
            for f in files:
                if f.kind in dest.outputs and (f.kind != "seg" or f.variant == variant_of(dest)):
                    pairs.append((f.sop_instance_uid, dest.name))
        rows = [f.row() for f in files]
        # The summary's reasons and notes can quote a decoder's error message, which can quote a header value;
        # the database (and so `status` and the dashboard) keeps no patient data.
        added = self.db.record_outputs(job["id"], redact_all(result.summary()), rows, pairs, generation=generation)
        if added is None:
            # Files no recorded output points at are this run's alone (the others equal recorded ones).
            self.store.remove([f.path for f in files if not self.db.is_known_output(f.sop_instance_uid)])
            log.info("study %s: %s superseded, instances arrived during the analysis; analysed again with them",
                     study_uid, name)
            return False
        log.info("study %s: %s wrote %d output(s), queued %d delivery(ies)", study_uid, name, len(files), added)
        return True

    def answer_superseded(self) -> int:
        """Outputs delivered (or perhaps delivered) under a patient identity the sender corrected since (or made
        from an image it moved to another study since), in any
        study (the scheduler asks at every pipeline pass, whatever the corrected study's analysis does): for
        each destination that asks for it (`reject_superseded`), a rejection note (IHE IOCM) per identity they
        were sent under; for the others a WARNING, once, as the node cannot take back what a PACS holds.
        Returns how many deliveries were answered."""
        from reports.kos import build_rejection_note

        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in self.db.superseded_deliveries():
            groups.setdefault((row["study_instance_uid"], row["destination"]), []).append(row)
        answered = 0
        self._notes_due = {k: t for k, t in self._notes_due.items() if k in groups}  # (answered since)
        for (study, name), rows in groups.items():
            if self._notes_due.get((study, name), 0.0) > self.clock():
                continue
            self._notes_due.pop((study, name), None)
            try:
                rejecting = self.settings.destination(name).reject_superseded
            except KeyError:
                rejecting = False  # a destination since removed from the configuration
            unlisted = rows
            if rejecting:
                # One note per identity the outputs were sent under: IOCM files it with them, under theirs.
                by_identity: dict[tuple[str, ...], list[tuple[dict[str, Any], Dataset]]] = {}
                for row in rows:
                    held = _read_output(row)
                    if held is not None:
                        by_identity.setdefault(_sent_identity(held), []).append((row, held))
                listed: set[int] = set()  # noted now, or waiting for the disk
                for group in by_identity.values():
                    try:
                        note = build_rejection_note([ds for _, ds in group], producer=self.producer())
                        written = self._write_dataset("any", "kos", note)
                    except (OSError, StorageError) as exc:
                        listed.update(row["id"] for row, _ in group)
                        self._notes_due[(study, name)] = self.clock() + STRANDED_RETRY_S
                        log.error("study %s: no rejection note for %s (again in %.0f s): %s", study, name,
                                  STRANDED_RETRY_S, describe(exc))
                        continue
                    except ValueError as exc:
                        # The outputs cannot make a valid note: waiting changes nothing, so they are warned
                        # about below, once, instead of failing again every minute.
                        log.error("study %s: the %d output(s) %s got cannot make a rejection note: %s", study,
                                  len(group), name, describe(exc))
                        continue
                    listed.update(row["id"] for row, _ in group)
                    self.db.record_rejection_note(group[0][0]["job_id"], written.row(), name, [row["id"] for row, _ in group])
                    answered += len(group)
                    log.info("study %s: the sender corrected its patient identity or moved an image out; a rejection"
                             " note for the %d output(s) %s got is queued for it", study, len(group), name)
                # What no note can list (retention removed the file, it cannot be read, or it makes no valid
                # note) is warned about; a note that could not be written (a full disk) is tried again.
                unlisted = [row for row in rows if row["id"] not in listed]
            if unlisted:
                log.warning("study %s: the sender corrected its patient identity or moved an image out; %d output(s)"
                            " made before were (or may have been) delivered to %s and stay there until that PACS's"
                            " correction moves or deletes them%s", study, len(unlisted), name,
                            " (no rejection note can list them: their files are gone or unreadable, or they make no"
                            " valid note)" if rejecting else "")
                why = "no rejection note can list it" if rejecting else "this destination takes no rejection notes"
                self.db.answer_superseded(
                    [row["id"] for row in unlisted], outcome="failed" if rejecting else "ok",
                    left=f"superseded (the sender corrected the patient identity or moved an image out); {why}: it"
                         f" stays at {name} until that PACS's correction moves or deletes it")
                answered += len(unlisted)
        return answered

    def _predecessor(self, study_uid: str, analysis: str, job_id: int, epoch: int) -> Any:
        row = self.db.latest_output(study_uid, analysis, "sr", before_job=job_id, identity_epoch=epoch)
        if row is None:
            return None
        purged = (self.db.study(study_uid) or {}).get("instances_purged_at")
        if purged is not None and row["created_at"] < purged:
            # Retention deleted the images that report read: this analysis sees only what arrived since, so
            # its report stands beside the earlier one instead of replacing it.
            return None
        from reports import SopReference

        return SopReference(row["study_instance_uid"], row["series_instance_uid"], row["sop_class_uid"],
                            row["sop_instance_uid"])

    def _write(self, variant: str, output: Any) -> EncodedFile:
        return self._write_dataset(variant, output.kind.value, output.dataset)

    def _write_dataset(self, variant: str, kind: str, ds: Dataset) -> EncodedFile:
        sop = str(ds.SOPInstanceUID)
        path = self.store.output_path(str(ds.StudyInstanceUID), kind, sop)
        size = self.store.write_atomic(path, (encode_bytes(ds),))
        return EncodedFile(
            kind=kind, variant=variant, sop_instance_uid=sop, sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=path, size=size,
        )


def analyze_offline(settings: Settings, analyser: Analyser, paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """``dicom-node analyze``: the same routing, analyses and encoders on files, outputs written to `out_dir`.

    Files are grouped by study; every output kind is written once, with the default encoding options
    (binary, uncompressed SEG), whatever the destinations would get.  Their device serial is the configured
    one, else the installation's when `settings.data_dir` holds a node's data, else "0".  Returns the files
    written.
    """
    from reports import Producer

    datasets = read_datasets(paths)
    studies: dict[str, list[Dataset]] = {}
    for ds in datasets:
        studies.setdefault(str(ds.get("StudyInstanceUID", "")), []).append(ds)
    written: list[Path] = []
    # Beside the node's data directory, outputs carry the node's own serial (and so its Device Observer UID).
    serial = (settings.producer.device_serial_number or existing_installation_serial(settings.data_dir)
              or Producer().device_serial_number)
    producer = Producer(device_serial_number=serial, institution_name=settings.producer.institution_name)
    for study_uid, group in studies.items():
        routing = route([InstanceHeaders.from_dataset(d) for d in group], settings.rules)
        if not routing.routed:
            raise PipelineError(f"study {study_uid}: {routing.reason}")
        by_uid = {str(d.SOPInstanceUID): d for d in group}
        for match in routing.matches:
            selected = [by_uid[u] for u in match.sop_instance_uids]
            for name in match.rule.analyses:
                result = analyser.run(name, selected)
                for _, o in build_encoded(result, selected, (), producer=producer):
                    ds = o.dataset
                    path = out_dir / f"{o.kind.value}_{ds.SOPInstanceUID}.dcm"
                    out_dir.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(encode_bytes(ds))
                    written.append(path)
    return written
