"""What the JSON API and the pages show, built from the database, the settings and the stored files.

Patient data: the database holds no patient name, ID or birth date.  With ``[http] show_phi = true`` they
are read from a study's stored files for display only (never written anywhere); otherwise nothing here
reads them and no answer contains them.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import __version__
from dicom_node.db import STUDY_STATES
from dicom_node.routing import InstanceHeaders, route

if TYPE_CHECKING:
    from dicom_node.service import NodeService

#: Patient attributes shown when show_phi is on (keyword -> API field).
PHI_FIELDS = {
    "PatientName": "patient_name", "PatientID": "patient_id", "PatientBirthDate": "birth_date",
    "PatientSex": "sex", "AccessionNumber": "accession_number", "StudyDate": "study_date",
}
THUMB_SIZES = {"thumb": 360, "full": 1600}
#: Why a superseded Secondary Capture is not shown: the sender corrected the patient identity or moved an image
#: out of the study since, so it may show another patient's film.
SUPERSEDED_IMAGE = ("superseded: made before the sender corrected the patient identity or moved an image out of the"
                    " study; not shown")


def parse_when(value: str | None, *, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (a local day; `end` = the start of the next day, so the day is included) or an ISO 8601
    date-time -> Unix time; ValueError naming the value."""
    if not value:
        return None
    value = value.strip()
    try:
        if len(value) == 10:
            day = datetime.strptime(value, "%Y-%m-%d")
            return (day + timedelta(days=1) if end else day).astimezone().timestamp()
        return datetime.fromisoformat(value).astimezone().timestamp()
    except (ValueError, OverflowError):  # OverflowError: the day after 9999-12-31
        raise ValueError(f"expected a date YYYY-MM-DD or an ISO 8601 time, got {value!r}") from None


def audit_entry(e: dict[str, Any]) -> dict[str, Any]:
    """An audit row for display and export: its fields plus `time` (ISO 8601), delivery status in hex."""
    out = dict(e)
    out["time"] = iso(e["at"])
    if e.get("status") is not None and e["kind"] == "delivery":
        out["status"] = f"0x{int(e['status']):04X}"
    return out


def iso(t: float | None) -> str | None:
    """Local time with its UTC offset, to the second."""
    if t is None:
        return None
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


class _Lru:
    """A small thread-safe LRU cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


class Views:
    """Builds every answer of the API and the pages for one running node."""

    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.settings = service.settings
        self.db = service.db
        self.show_phi = service.settings.http.show_phi
        self._phi = _Lru(4096)
        self._images = _Lru(64)

    # ----------------------------------------------------------------------------- patient data

    def _study_files(self, study_uid: str) -> list[Path]:
        rows = self.db.query("SELECT path FROM instances WHERE study_instance_uid = ? AND own_output = 0 LIMIT 3",
                             (study_uid,))
        rows += self.db.query("SELECT path FROM outputs WHERE study_instance_uid = ? AND purged_at IS NULL LIMIT 3",
                              (study_uid,))
        return [Path(r["path"]) for r in rows]

    def patient(self, study_uid: str) -> dict[str, str] | None:
        """Patient attributes of a study from its stored files (only when show_phi is on)."""
        if not self.show_phi:
            return None
        cached = self._phi.get(study_uid)
        if cached is not None:
            return dict(cached)
        import pydicom

        info: dict[str, str] = {}
        for path in self._study_files(study_uid):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(PHI_FIELDS))
            except Exception:  # noqa: BLE001 - a purged or damaged file: try the next one
                continue
            info = {field: str(ds.get(kw, "") or "") for kw, field in PHI_FIELDS.items()}
            break
        if info:
            self._phi.put(study_uid, info)
        return dict(info) or {"patient_name": "", "patient_id": "", "unavailable": "files purged by retention"}

    # ----------------------------------------------------------------------------------- studies

    def study_summary(self, row: dict[str, Any]) -> dict[str, Any]:
        """One line of the studies list."""
        results = row.get("results") or []
        findings = [f for r in results for f in r.get("findings", [])]
        out = {
            "study_instance_uid": row["study_instance_uid"],
            "state": row["state"],
            "reason": row.get("reason"),
            "instances": row["instance_count"],
            "modalities": sorted(filter(None, (row.get("modalities") or "").split(","))),
            "study_description": row.get("study_description") or "",
            "first_received_at": iso(row["first_received_at"]),
            "last_received_at": iso(row["last_received_at"]),
            "updated_at": iso(row["updated_at"]),
            "flagged": any(r.get("flagged") for r in results),
            "verdicts": [{"analysis": r.get("analysis"), "verdict": r.get("verdict"), "hardware": r.get("hardware"),
                          "flagged": bool(r.get("flagged"))} for r in results],
            "findings": len(findings),
            "deliveries": {"delivered": row.get("delivered", 0), "total": row.get("deliveries", 0)},
        }
        patient = self.patient(row["study_instance_uid"])
        if patient is not None:
            out["patient"] = patient
        return out

    def studies(self, *, state: str | None = None, flagged: bool | None = None, since: float | None = None,
                until: float | None = None, uid_prefix: str | None = None, limit: int = 50,
                offset: int = 0) -> dict[str, Any]:
        """The studies list with its filters."""
        if state and state not in STUDY_STATES:
            raise ValueError(f"state must be one of {', '.join(STUDY_STATES)}, got {state!r}")
        total, rows = self.db.studies_page(state=state, flagged=flagged, since=since, until=until,
                                           uid_prefix=uid_prefix, limit=limit, offset=offset)
        return {"total": total, "limit": limit, "offset": offset, "show_phi": self.show_phi,
                "studies": [self.study_summary(r) for r in rows]}

    def routing_decision(self, study_uid: str, instance_rows: list[dict[str, Any]],
                         jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """Which rules select the study under the current configuration, and what the node applied."""
        applied = sorted({(j["rule"], j["analysis"]) for j in jobs})
        if not instance_rows:
            return {"evaluated": False, "note": "instance rows removed by retention; showing the rules applied",
                    "matches": [], "applied": [{"rule": r, "analysis": a} for r, a in applied], "reason": None}
        decision = route([InstanceHeaders.from_row(r) for r in instance_rows], self.settings.rules)
        matches = []
        for m in decision.matches:
            try:
                dests = [d.name for d in self.settings.rule_destinations(m.rule)]
            except KeyError:
                dests = []
            matches.append({"rule": m.rule.name, "analyses": list(m.rule.analyses), "destinations": dests,
                            "complete_on": m.rule.complete_on, "instances_selected": len(m.sop_instance_uids)})
        return {"evaluated": True, "routed": decision.routed, "reason": decision.reason or None, "matches": matches,
                "applied": [{"rule": r, "analysis": a} for r, a in applied]}

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """Everything about one study: state, routing decision, results, outputs, deliveries, its log."""
        detail = self.db.study_detail(study_uid)
        if detail is None:
            return None
        instance_rows = self.db.source_instances(study_uid)
        series: dict[str, dict[str, Any]] = {}
        for r in instance_rows:
            s = series.setdefault(r["series_instance_uid"], {
                "series_instance_uid": r["series_instance_uid"], "modality": r["modality"],
                "body_part_examined": r["body_part_examined"], "series_description": r["series_description"],
                "instances": 0, "view_positions": set()})
            s["instances"] += 1
            if r["view_position"]:
                s["view_positions"].add(r["view_position"])
        for s in series.values():
            s["view_positions"] = sorted(s["view_positions"])
        jobs = []
        for j in detail["jobs"]:
            summary = j.get("summary") or {}
            jobs.append({
                "id": j["id"], "analysis": j["analysis"], "rule": j["rule"], "state": j["state"], "reason": j["reason"],
                "analysis_seconds": j.get("analysis_seconds"), "created_at": iso(j["created_at"]),
                "updated_at": iso(j["updated_at"]), "verdict": summary.get("verdict"),
                "hardware": summary.get("hardware"), "flagged": bool(summary.get("flagged")),
                "reasons": summary.get("reasons", []), "instrumentation": summary.get("instrumentation"),
                "models": summary.get("models", []), "findings": summary.get("findings", []),
                "images": summary.get("images", []),
            })
        by_sop = {o["sop_instance_uid"]: o for o in detail["outputs"]}
        outputs = []
        for o in detail["outputs"]:
            item = {"sop_instance_uid": o["sop_instance_uid"], "series_instance_uid": o["series_instance_uid"],
                    "sop_class_uid": o["sop_class_uid"], "kind": o["kind"], "variant": o["variant"],
                    "size": o["size"], "created_at": iso(o["created_at"]), "purged": o.get("purged_at") is not None,
                    "job_id": o["job_id"]}
            if o["kind"] == "sc" and not item["purged"] and not o["superseded"]:
                item["thumbnail"] = f"/api/studies/{study_uid}/outputs/{o['sop_instance_uid']}/image.png"
            outputs.append(item)
        deliveries = [{
            "id": d["id"], "destination": d["destination"], "output_sop_instance_uid": d["output_sop_instance_uid"],
            "kind": by_sop.get(d["output_sop_instance_uid"], {}).get("kind"), "state": d["state"],
            "attempts": d["attempts"], "last_status": (f"0x{d['last_status']:04X}" if d["last_status"] is not None
                                                       else None),
            "last_error": d["last_error"], "next_attempt_at": iso(d["next_attempt_at"]) if d["state"] == "pending"
            else None, "delivered_at": iso(d["delivered_at"]), "updated_at": iso(d["updated_at"]),
        } for d in detail["deliveries"]]
        log = [self.audit_entry(e) for e in self.db.audit_events(study_instance_uid=study_uid, newest_first=True,
                                                                 limit=500)]
        associations = [{
            "id": a["id"], "calling_ae": a["calling_ae"], "peer": f"{a['peer_host']}:{a['peer_port']}",
            "started_at": iso(a["started_at"]), "ended_at": iso(a["ended_at"]), "state": a["state"],
            "instances": a["instances"], "study_instances": a["study_instances"], "failures": a["failures"],
        } for a in self.db.study_associations(study_uid)]
        state = detail["state"]
        out = {
            "study_instance_uid": study_uid, "state": state, "reason": detail["reason"],
            "instances": detail["instance_count"], "first_received_at": iso(detail["first_received_at"]),
            "last_received_at": iso(detail["last_received_at"]), "updated_at": iso(detail["updated_at"]),
            "study_description": next((r["study_description"] for r in instance_rows if r["study_description"]), ""),
            "series": list(series.values()), "associations": associations,
            "routing": self.routing_decision(study_uid, instance_rows, detail["jobs"]),
            "results": jobs, "flagged": any(j["flagged"] for j in jobs if j["state"] != "failed"),
            "outputs": outputs, "deliveries": deliveries, "log": log,
            "actions": {
                "retry": state == "failed",
                "reanalyse": state in ("delivered", "failed", "unrouted")
                and not any(d["state"] in ("pending", "sending") for d in deliveries),
            },
        }
        patient = self.patient(study_uid)
        if patient is not None:
            out["patient"] = patient
        return out

    # ----------------------------------------------------------------------------------- images

    def output_image(self, study_uid: str, sop_uid: str, size: str = "thumb") -> tuple[bytes | None, str]:
        """PNG of a Secondary Capture output, or (None, why not)."""
        if size not in THUMB_SIZES:
            return None, f"size must be one of {', '.join(THUMB_SIZES)}"
        row = self.db.one("SELECT * FROM outputs WHERE sop_instance_uid = ? AND study_instance_uid = ?",
                          (sop_uid, study_uid))
        if row is None or row["kind"] != "sc":
            return None, "no such Secondary Capture output"
        if row["purged_at"] is not None:
            return None, "the file was removed by retention"
        if self.db.output_superseded(sop_uid):
            # Perhaps of another patient's film (moved out since) or under a corrected identity: not this study's.
            return None, SUPERSEDED_IMAGE
        if not self.show_phi:
            why = self._burned_in_patient_text(study_uid)
            if why:
                return None, why
        key = (sop_uid, size)
        cached = self._images.get(key)
        if cached is not None:
            return cached, ""
        import pydicom
        from PIL import Image

        try:
            ds = pydicom.dcmread(row["path"])
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001
            return None, f"cannot read the output ({type(exc).__name__})"
        img = Image.fromarray(pixels)
        img.thumbnail((THUMB_SIZES[size], THUMB_SIZES[size]))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        data = buf.getvalue()
        self._images.put(key, data)
        return data, ""

    def _burned_in_patient_text(self, study_uid: str) -> str | None:
        """Why an image must not be shown without show_phi (its source may carry burned-in patient text)."""
        import pydicom

        rows = self.db.query("SELECT path FROM instances WHERE study_instance_uid = ? AND own_output = 0",
                             (study_uid,))
        if not rows:
            return "the source images were removed by retention, so burned-in patient text cannot be ruled out"
        for r in rows:
            try:
                ds = pydicom.dcmread(r["path"], stop_before_pixels=True, specific_tags=["BurnedInAnnotation"])
            except Exception:  # noqa: BLE001
                return "a source image cannot be read to rule out burned-in patient text"
            if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
                return "a source image declares burned-in annotation (may show patient data); needs show_phi"
        return None

    # ------------------------------------------------------------------------------ destinations

    def destinations(self) -> list[dict[str, Any]]:
        """Configured destinations with their queues."""
        queues = {r["destination"]: r for r in self.db.queue_depth()}
        oldest = self.db.oldest_pending_deliveries()
        last = {r["a"]: r["value"] for r in self.db.counters() if r["metric"] == "last_delivered_at"}
        now = time.time()
        out = []
        for d in self.settings.destinations:
            q = queues.get(d.name, {})
            out.append({
                "name": d.name, "ae_title": d.ae_title, "host": d.host, "port": d.port, "address": d.address,
                "outputs": list(d.outputs), "seg_format": d.seg_format, "seg_compression": d.seg_compression,
                "tls": d.tls, "batch_size": d.batch_size,
                "queue": {k: q.get(k) or 0 for k in ("pending", "sending", "delivered", "failed")},
                "next_attempt_at": iso(max(q["next_attempt_at"], now)) if q.get("pending") and q.get("next_attempt_at")
                else None,
                "oldest_pending_age_s": round(now - oldest[d.name], 1) if d.name in oldest else None,
                "last_delivered_at": iso(last.get(d.name)),
                "last_error": q.get("last_error"), "last_error_at": iso(q.get("last_error_at")),
            })
        return out

    # ---------------------------------------------------------------------------------- overview

    def overview(self) -> dict[str, Any]:
        """The front page: node identity, readiness, studies by state, queues, throughput, problems."""
        from dicom_node.web.health import as_json, readiness

        now = time.time()
        s = self.service
        node = self.settings.node
        failed_total, failed = self.db.studies_page(state="failed", limit=5)
        return {
            "node": {"ae_title": node.ae_title, "dicom": f"{node.bind_host}:{s.scp.port}", "version": __version__,
                     "started_at": iso(s.started_at), "uptime_s": round(now - s.started_at),
                     "data_dir": str(self.settings.data_dir), "show_phi": self.show_phi},
            "readiness": as_json(readiness(s)),
            "studies": self.db.study_counts(),
            "destinations": self.destinations(),
            "activity": {"last_hour": self._activity(now - 3600), "last_24h": self._activity(now - 86400)},
            "last_received_at": iso(self.db.last_received_at()),
            "failed_studies": {"total": failed_total, "latest": [self.study_summary(r) for r in failed]},
            "recent": [self.study_summary(r) for r in self.db.studies_page(limit=10)[1]],
        }

    def _activity(self, since: float) -> dict[str, Any]:
        a = self.db.activity_since(since)
        a["since"] = iso(a["since"])
        return a

    # -------------------------------------------------------------------------------------- audit

    audit_entry = staticmethod(audit_entry)

    # ------------------------------------------------------------------------------------ config

    def configuration(self) -> dict[str, Any]:
        """The running configuration, secrets replaced by '***'."""
        raw = self.settings.model_dump(mode="json")
        http = raw.get("http", {})
        http["tokens"] = [{"id": t["id"], "token": "***"} for t in http.get("tokens", [])]
        http["users"] = [{"name": u["name"], "password_hash": "***"} for u in http.get("users", [])]
        raw["data_dir_resolved"] = str(self.settings.data_dir)
        http_server = getattr(self.service, "http", None)
        raw["listening"] = {"dicom_port": self.service.scp.port,
                            "dashboard": http_server.url if http_server is not None else None}
        return raw

    # ------------------------------------------------------------------------------------ models

    def models(self) -> dict[str, Any]:
        """Model folders found by the registry, their cards, and the analyses the rules name."""
        from inference import analyses

        s = self.service
        loaded = set(s.registry.loaded())
        models, problem = [], None
        try:
            specs = s.registry.specs()
        except Exception as exc:  # noqa: BLE001 - a malformed model.json
            specs, problem = {}, str(exc)
        for name, spec in sorted(specs.items()):
            card = spec.folder / "MODEL_CARD.md"
            meta = spec.metadata
            models.append({
                "name": name, "version": spec.version, "task": meta.get("task"), "folder": str(spec.folder),
                "weights": spec.weights.name, "sha256": spec.sha256, "loaded": name in loaded,
                "has_card": card.is_file(), "metrics": meta.get("metrics"),
            })
        try:
            available = analyses.available()
        except Exception as exc:  # noqa: BLE001
            available, problem = [], problem or str(exc)
        return {
            "models": models, "problem": problem, "roots": [str(r) for r in s.registry.roots],
            "analyses": [{"name": n, "routed": n in s.routed_analyses(),
                          "status": s.analyser.status.get(n, "loading" if n in s.routed_analyses() else "not routed")}
                         for n in sorted(set(available) | set(s.routed_analyses()))],
        }

    def model_card(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(model entry, card markdown or None) for a model folder the registry knows."""
        try:
            spec = self.service.registry.spec(name)
        except Exception:  # noqa: BLE001 - unknown name
            return None, None
        entry = next((m for m in self.models()["models"] if m["name"] == name), None)
        card = spec.folder / "MODEL_CARD.md"
        try:
            return entry, card.read_text(encoding="utf-8")
        except OSError:
            return entry, None
