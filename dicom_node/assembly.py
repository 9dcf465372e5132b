"""Study completeness: when has a study received everything it is going to get?

Two triggers, both recorded in the database so a restart loses neither:

* the association that delivered a study was *released* (not aborted), no other association bringing
  the same study is still open, and every routing rule that applies to the study says
  ``complete_on = "association-release"`` (e.g. single radiographs);
* no new instance arrived for ``assembly.stable_age_s`` (any study, whatever its rules).

An instance arriving after a study was analysed re-opens it (`Database.record_instance`), so it is
completed and analysed again; the new outputs replace the old ones (see `pipeline`).
"""

from __future__ import annotations

import logging
import time

from dicom_node.db import Database
from dicom_node.routing import InstanceHeaders, route
from dicom_node.settings import Settings

log = logging.getLogger("dicom_node.assembly")


def complete_released(db: Database, settings: Settings) -> list[str]:
    """Apply release-completion to every ended association not yet looked at; returns studies completed."""
    completed: list[str] = []
    for assoc in db.ended_unassembled_associations():
        if assoc["state"] == "released":
            for study_uid in db.association_studies(assoc["id"]):
                study = db.study(study_uid)
                if study is None or study["state"] != "received":
                    continue
                if db.study_still_arriving(study_uid, assoc["id"]):
                    continue  # its last association to end completes it (or, if that one aborts, stable age)
                headers = [InstanceHeaders.from_row(r) for r in db.source_instances(study_uid)]
                if route(headers, settings.rules).complete_on_release and db.mark_complete(study_uid):
                    completed.append(study_uid)
        db.mark_assembled(assoc["id"])
    if completed:
        log.info("%d study(ies) complete at association release: %s", len(completed), ", ".join(completed))
    return completed


def complete_stable(db: Database, settings: Settings, now: float | None = None) -> list[str]:
    """Complete every study that has been quiet for `stable_age_s`; returns studies completed."""
    now = time.time() if now is None else now
    completed = [uid for uid in db.stable_studies(now - settings.assembly.stable_age_s) if db.mark_complete(uid)]
    if completed:
        log.info("%d study(ies) complete after %.0f s without new instances: %s", len(completed),
                 settings.assembly.stable_age_s, ", ".join(completed))
    return completed


def sweep(db: Database, settings: Settings, now: float | None = None) -> list[str]:
    """Both triggers; returns every study completed."""
    return complete_released(db, settings) + complete_stable(db, settings, now)
