"""The sending side: a durable outbound queue drained over C-STORE, one association per batch.

Each batch proposes exactly the (SOP class, transfer syntax) pairs it sends, one presentation context
per pair.  Every response status is checked:

* 0x0000 and the warnings 0xB000-0xB007 (and 0x0111 "duplicate SOP instance": the peer has it) -> delivered;
* transient (connection refused, timeout, abort, DIMSE timeout, A-ASSOCIATE-RJ rejected-transient,
  0xA7xx out of resources) -> retried with exponential backoff and jitter, at most ``max_attempts``;
* permanent (A-ASSOCIATE-RJ rejected-permanent, presentation context refused, 0xA9xx, 0xCxxx and any
  other failure) -> failed at once, shown by ``dicom-node status``, re-queued by ``dicom-node retry``.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.db import STRANDED_RETRY_S, UNREACHED_PREFIX, Database
from dicom_node.errors import redact
from dicom_node.scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, set_tcp_nodelay
from dicom_node.settings import DeliverySettings, Destination, Settings

log = logging.getLogger("dicom_node.scu")

OK, TRANSIENT, PERMANENT = "ok", "transient", "permanent"
DUPLICATE_SOP_INSTANCE = 0x0111

_REJECT_REASONS: dict[tuple[Any, Any], str] = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def status_meaning(status: int) -> str:
    """A C-STORE failure status as an operator reads it (PS3.4 B.2.3 and PS3.7 C), "" for others."""
    named = {0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
             0x0211: "unrecognized operation", 0x0213: "resource limitation"}
    if status in named:
        return f"({named[status]})"
    if 0xA700 <= status <= 0xA7FF:
        return "(out of resources: the destination is full or busy; retried)"
    if 0xA900 <= status <= 0xA9FF:
        return "(data set does not match SOP class)"
    if 0xC000 <= status <= 0xCFFF:
        return "(cannot understand)"
    return ""


def refusal_message(dest: Destination, item: Item) -> str:
    """Why a destination took no presentation context for an output, by name, with what to change."""
    sop = UID(item.sop_class_uid)
    syntax = UID(item.transfer_syntax_uid)
    hint = ""
    if sop == "1.2.840.10008.5.1.4.1.1.66.7":  # Label Map Segmentation Storage
        hint = '; it may not know this newer SOP class: seg_format = "binary" sends a Segmentation Storage'
    elif syntax.is_compressed:
        hint = '; seg_compression = "none" sends it uncompressed'
    name = sop.name if sop.name != str(sop) else _NEWER_SOP_CLASSES.get(str(sop), "SOP class")
    return f"{dest.address} refused {name} ({sop}) in {syntax.name}{hint}"


#: SOP classes newer than pydicom's dictionary.
_NEWER_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage"}


def classify_status(status: int) -> str:
    """OK / TRANSIENT / PERMANENT for a C-STORE response status (PS3.4 Annex B.2.3)."""
    if status == 0x0000 or 0xB000 <= status <= 0xB007 or status == DUPLICATE_SOP_INSTANCE:
        return OK
    if 0xA700 <= status <= 0xA7FF:
        return TRANSIENT
    return PERMANENT


def backoff_delay(attempts: int, policy: DeliverySettings, rng: random.Random) -> float:
    """Delay before attempt `attempts + 1`: initial * 2^(attempts-1), capped, +-jitter."""
    base = min(policy.backoff_max_s, policy.backoff_initial_s * (2 ** max(0, attempts - 1)))
    return max(0.0, base * (1.0 + policy.jitter * rng.uniform(-1.0, 1.0)))


@dataclass(frozen=True)
class Item:
    """One file to send."""

    key: Any
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class ItemResult:
    """What happened to one item."""

    key: Any
    outcome: str
    status: int | None
    message: str
    #: False when no association was established at all: the destination failed, not this item.
    associated: bool = True


def _tls_args(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls_ca_file) if dest.tls_ca_file else None)
    if dest.tls_cert_file:
        ctx.load_cert_chain(str(dest.tls_cert_file), str(dest.tls_key_file) if dest.tls_key_file else None)
    return ctx, dest.host


def _make_ae(calling_ae: str, policy: DeliverySettings) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = policy.acse_timeout_s
    ae.dimse_timeout = policy.dimse_timeout_s
    ae.network_timeout = policy.dimse_timeout_s
    ae.connection_timeout = policy.connect_timeout_s
    return ae


def _associate(ae: AE, dest: Destination) -> tuple[Any, bool]:
    """Request an association; returns it and whether the TCP connection was ever opened."""
    opened: list[bool] = []

    def on_open(event: Any) -> None:
        opened.append(True)
        set_tcp_nodelay(event)

    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls_args(dest),
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    return assoc, bool(opened)


def _tls_handshake_failure(dest: Destination, timeout: float = 5.0) -> tuple[str, str] | None:
    """Why a TLS connection to `dest` fails, when its port accepts TCP (None when it does not, or the handshake
    now succeeds).  pynetdicom reports every failure alike; this tells a configuration mismatch, which no
    retry mends (a certificate not trusted, a peer not speaking TLS at all), from a peer that is restarting
    or overloaded (a reset, a timeout), which a retry may."""
    args = _tls_args(dest)
    assert args is not None
    context, hostname = args
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=hostname):
                    return None
            except ssl.SSLCertVerificationError as exc:
                return PERMANENT, (f"TLS with {dest.address}: its certificate is not trusted ({exc.verify_message}):"
                                   " check tls_ca_file")
            except ssl.SSLError as exc:
                if exc.reason in ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "RECORD_LAYER_FAILURE") or (
                        exc.reason or "").startswith(("TLSV1_ALERT", "SSLV3_ALERT")):
                    return PERMANENT, (f"TLS handshake with {dest.address} refused ({exc.reason}): does it speak DICOM"
                                       " TLS on that port, and accept our certificate (tls_cert_file)?")
                return TRANSIENT, (f"TLS handshake with {dest.address} failed ({exc.reason or exc}) although its port"
                                   " accepts connections: retried; if it lasts, check it speaks DICOM TLS there")
            except OSError as exc:
                return TRANSIENT, (f"TLS handshake with {dest.address} cut ({exc.strerror or exc}) although its port"
                                   " accepts connections: retried; if it lasts, check it speaks DICOM TLS there")
    except OSError:
        return None  # no TCP connection either: an ordinary network failure


def _refused_contexts(assoc: Any) -> str:
    try:
        if assoc.accepted_contexts:
            return ""
        return ", ".join(sorted({str(cx.abstract_syntax.name) for cx in assoc.rejected_contexts}))
    except Exception:  # noqa: BLE001 - no negotiation happened
        return ""


def _association_failure(assoc: Any, dest: Destination, connected: bool = True) -> tuple[str, str]:
    if not connected:
        if dest.tls:
            if (tls := _tls_handshake_failure(dest)) is not None:
                return tls
        return TRANSIENT, f"{UNREACHED_PREFIX}{dest.address} (refused or timed out)"
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result = getattr(prim, "result", None)
        source = getattr(prim, "result_source", None)
        diag = getattr(prim, "diagnostic", None)
        why = _REJECT_REASONS.get((source, diag), f"source {source}, diagnostic {diag}")
        kind = "permanently" if result == 1 else "transiently"
        return (PERMANENT if result == 1 else TRANSIENT), f"association rejected {kind} by {dest.address}: {why}"
    refused = _refused_contexts(assoc)
    if refused:
        # pynetdicom aborts an association in which the peer accepted no presentation context.
        return PERMANENT, f"{dest.address} refused every proposed presentation context ({refused})"
    if assoc.is_aborted:
        return TRANSIENT, f"association aborted by {dest.address}"
    return TRANSIENT, f"{UNREACHED_PREFIX}{dest.address} (refused or timed out)"


def send_batch(calling_ae: str, dest: Destination, items: Sequence[Item], policy: DeliverySettings, *,
               on_association: Callable[[Any, bool], None] | None = None) -> list[ItemResult]:
    """Send `items` on one association; one result per item (never raises for network trouble).
    `on_association(assoc, open)` is told when the association is up and when it is done (see `Sender.stop`)."""
    if not items:
        return []
    ae = _make_ae(calling_ae, policy)
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items})
    if len(pairs) > 128:
        raise ValueError("a batch may need at most 128 presentation contexts")
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, [ts])
    try:
        assoc, connected = _associate(ae, dest)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [ItemResult(i.key, TRANSIENT, None, f"{UNREACHED_PREFIX}{dest.address}: {exc}", associated=False)
                for i in items]
    if not assoc.is_established:
        outcome, message = _association_failure(assoc, dest, connected)
        return [ItemResult(i.key, outcome, None, message, associated=False) for i in items]
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    results: list[ItemResult] = []
    if on_association is not None:
        on_association(assoc, True)
    try:
        for n, item in enumerate(items):
            if not assoc.is_established:
                results.extend(ItemResult(i.key, TRANSIENT, None, f"association with {dest.address} ended early")
                               for i in items[n:])
                break
            if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                results.append(ItemResult(item.key, PERMANENT, None, refusal_message(dest, item)))
                continue
            try:
                ds = pydicom.dcmread(item.path)
            except Exception as exc:  # noqa: BLE001 - our own file vanished or is damaged
                results.append(ItemResult(item.key, PERMANENT, None, f"cannot read {item.path.name}: {exc}"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except Exception as exc:  # noqa: BLE001 - e.g. a data set pynetdicom cannot encode
                results.append(ItemResult(item.key, TRANSIENT, None,
                                          f"cannot send {item.path.name}: {type(exc).__name__}: {redact(str(exc))}"))
                continue
            status = getattr(rsp, "Status", None)
            if status is None:
                # DIMSE timeout or abort: the reply may or may not have been sent; resend on a new association.
                results.append(ItemResult(item.key, TRANSIENT, None,
                                          f"no C-STORE response from {dest.address} (timeout or abort)"))
                results.extend(ItemResult(i.key, TRANSIENT, None, f"association with {dest.address} ended early")
                               for i in items[n + 1:])
                assoc.abort()
                break
            outcome = classify_status(int(status))
            comment = str(rsp.get("ErrorComment", "") or "")
            meaning = status_meaning(int(status))
            msg = (f"status 0x{int(status):04X}" + (f" {meaning}" if meaning else "") + (f" ({comment})" if comment else "")
                   + f" from {dest.address}")
            results.append(ItemResult(item.key, outcome, int(status), msg))
    finally:
        if on_association is not None:
            on_association(assoc, False)
        if assoc.is_established:
            assoc.release()
    return results


def echo(calling_ae: str, dest: Destination, policy: DeliverySettings) -> tuple[bool, str]:
    """C-ECHO `dest`; returns (ok, one-line message)."""
    ae = _make_ae(calling_ae, policy)
    ae.add_requested_context(Verification)
    try:
        assoc, connected = _associate(ae, dest)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return False, f"{UNREACHED_PREFIX}{dest.address}: {exc}"
    if not assoc.is_established:
        return False, _association_failure(assoc, dest, connected)[1]
    try:
        rsp = assoc.send_c_echo()
        status = getattr(rsp, "Status", None)
        if status is None:
            return False, f"no C-ECHO response from {dest.address}"
        return status == 0, f"C-ECHO {dest.address}: status 0x{int(status):04X}"
    finally:
        if assoc.is_established:
            assoc.release()


def _abort(assoc: Any) -> None:
    """Abort an association another thread may be sending on.  pynetdicom wakes a C-STORE waiting for its
    response when the peer aborts, not when we do: the (None, None) "no message" item ends that wait now
    rather than at the DIMSE timeout."""
    assoc.abort()
    assoc.dimse.msg_queue.put((None, None))


class Sender:
    """Drains the delivery queue of each destination."""

    def __init__(self, settings: Settings, db: Database, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.db = db
        self.rng = rng or random.Random()
        self._stopping = threading.Event()
        self._open: set[Any] = set()  # associations sending right now
        self._open_lock = threading.Lock()

    def stop(self) -> None:
        """Send nothing more and abort the batches under way (their unconfirmed outputs stay queued): a
        stalled PACS would otherwise hold the node's stop for the whole DIMSE timeout."""
        self._stopping.set()
        with self._open_lock:
            open_now = list(self._open)
        for assoc in open_now:
            _abort(assoc)

    def _track(self, assoc: Any, is_open: bool) -> None:
        with self._open_lock:
            if is_open:
                self._open.add(assoc)
            else:
                self._open.discard(assoc)
        if is_open and self._stopping.is_set():
            _abort(assoc)  # stop() came between the association and its registration

    def deliver_due(self, dest: Destination, now: float | None = None) -> int:
        """Send one batch of due deliveries to `dest`; returns how many were attempted."""
        if self._stopping.is_set():
            return 0
        now = time.time() if now is None else now
        # This destination's job runs alone: a row `sending` now is one whose outcome a failed write lost.
        if released := self.db.release_stranded_deliveries(dest.name, time.time() - STRANDED_RETRY_S):
            log.info("%s: %d delivery(ies) left sending by a failed write queued again", dest.name, released)
        rows = self.db.due_deliveries(dest.name, now, dest.batch_size)
        if not rows:
            return 0
        # At most 128 presentation contexts per association: keep the first 128 distinct pairs.
        pairs: list[tuple[str, str]] = []
        batch = []
        for r in rows:
            pair = (r["sop_class_uid"], r["transfer_syntax_uid"])
            if pair not in pairs:
                if len(pairs) == 128:
                    continue
                pairs.append(pair)
            batch.append(r)
        self.db.mark_sending([r["id"] for r in batch])
        items = [Item(r, Path(r["path"]), r["sop_class_uid"], r["transfer_syntax_uid"]) for r in batch]
        started = time.monotonic()
        try:
            results = send_batch(self.settings.node.ae_title, dest, items, self.settings.delivery,
                                 on_association=self._track)
        except Exception as exc:  # noqa: BLE001 - never leave rows 'sending' until the next restart
            log.exception("%s: sending failed", dest.name)
            message = f"internal error {type(exc).__name__}: {redact(str(exc))}"
            results = [ItemResult(i.key, TRANSIENT, None, message) for i in items]
        delivered = 0
        next_try = float("inf")
        given_up: list[tuple[dict[str, Any], str]] = []
        stopped = self._stopping.is_set()
        if stopped:
            # Aborted by our own stop: the destination did nothing wrong, so no attempt is counted against
            # it (the last allowed one would otherwise fail the delivery for good).
            self.db.give_back_attempts([r.key["id"] for r in results if r.outcome == TRANSIENT])
        for res in results:
            row = res.key
            if stopped and res.outcome == TRANSIENT:
                continue
            if res.outcome == OK:
                self.db.mark_delivered(row["id"], res.status or 0)
                delivered += 1
            elif res.outcome == TRANSIENT and row["attempts"] + 1 < self.settings.delivery.max_attempts:
                at = time.time() + backoff_delay(row["attempts"] + 1, self.settings.delivery, self.rng)
                self.db.mark_retry(row["id"], at, res.message, res.status)
                next_try = min(next_try, at)
            else:
                reason = res.message if res.outcome == PERMANENT else (
                    f"gave up after {row['attempts'] + 1} attempts: {res.message}")
                if self.db.mark_failed(row["id"], reason, res.status):
                    given_up.append((row, reason))  # (not one withdrawn: its identity was corrected meanwhile)
        if delivered and any(r["attempts"] > 0 for r in batch):
            # The destination is back: what waits out a backoff for it goes now, not in up to backoff_max_s.
            self.db.expedite(dest.name)
        elif not stopped and next_try < float("inf") and all(
                r.outcome == TRANSIENT and not r.associated for r in results):
            # No association at all (down, refusing, busy): the destination is out, not these outputs. The
            # rest of its queue waits with this batch and counts the attempt too (made on its behalf), so an
            # outage costs one association attempt per backoff step, not one per output on timers of their
            # own, and max_attempts ends them together.
            if deferred := self.db.defer_destination(dest.name, next_try, results[0].message):
                log.info("%s: unreachable, %d other output(s) wait with this batch until %s", dest.name, deferred,
                         time.strftime("%H:%M:%S", time.localtime(next_try)))
        failed = [r for r in results if r.outcome != OK]
        if stopped and failed:
            # Our own stop cut the batch (the abort reads as 'no response' to pynetdicom): not the peer's doing.
            log.info("%s: the node is stopping: %d of %d output(s) sent, the others go at the next start", dest.name,
                     delivered, len(results))
        elif failed:
            log.warning("%s: %d of %d sent, %d not (%s): %s", dest.name, delivered, len(results), len(failed),
                        failed[0].outcome, failed[0].message)
        else:
            log.info("%s: %d output(s) delivered in %.2f s", dest.name, delivered, time.monotonic() - started)
        # A delivery failed for good is the one event an operator reading only the log must not miss.
        for study in dict.fromkeys(row["study_instance_uid"] for row, _ in given_up):
            reasons = [reason for row, reason in given_up if row["study_instance_uid"] == study]
            log.error("%s: %d output(s) of study %s not delivered, failed for good: %s (dicom-node retry "
                      "re-queues them)", dest.name, len(reasons), study, reasons[0])
        self.db.settle_delivered_studies({r["study_instance_uid"] for r in batch})
        return len(batch)

