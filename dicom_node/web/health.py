"""/readyz: can this node do its job right now?  Each check names what is wrong."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dicom_node.db import WAITING_PREFIX

if TYPE_CHECKING:
    from dicom_node.service import NodeService


@dataclass(frozen=True)
class Check:
    """One readiness check."""

    name: str
    ok: bool
    detail: str


def readiness(service: NodeService) -> list[Check]:
    """Database writable, disk space above the threshold, no study waiting for its outputs to be written, the
    routed analyses' models loaded, DICOM listener bound, background jobs running."""
    checks: list[Check] = []
    problem = service.db.probe_writable()
    checks.append(Check("database", problem is None, problem or f"{service.db.path.name} writable"))

    threshold = service.settings.http.min_free_disk_mb * 1024 * 1024
    try:
        free = shutil.disk_usage(service.settings.data_dir).free
        ok = free >= threshold
        detail = (f"{free / 2**30:.1f} GiB free in {service.settings.data_dir}"
                  + ("" if ok else f", below the threshold of {service.settings.http.min_free_disk_mb:.0f} MB"))
    except OSError as exc:
        ok, detail = False, f"cannot measure free space of {service.settings.data_dir}: {exc.strerror or exc}"
    checks.append(Check("disk", ok, detail))
    # Apart from the free space: a read-only or broken data directory fails every write with room to spare.
    waiting = service.db.waiting_for_storage()
    detail = "no study waits for its outputs to be written"
    if waiting:
        first = waiting[0]
        detail = (f"{len(waiting)} study(ies) wait for their outputs to be written; {first['study_instance_uid']}:"
                  f" {first['reason'].removeprefix(WAITING_PREFIX)}")
    checks.append(Check("outputs", not waiting, detail))

    names = service.routed_analyses()
    if not names:
        checks.append(Check("models", True, "no routing rule names an analysis"))
    else:
        bad = {n: service.analyser.status.get(n, "loading") for n in names}
        bad = {n: st for n, st in bad.items() if st != "ready"}
        if bad:
            detail = "; ".join(f"{n}: {'models still loading' if st == 'loading' else st}" for n, st in bad.items())
        else:
            detail = "loaded: " + ", ".join(names)
        checks.append(Check("models", not bad, detail))

    bound = service.listener_bound()
    node = service.settings.node
    checks.append(Check("dicom_listener", bound, f"{node.ae_title} on {node.bind_host}:{service.scp.port}"
                        + ("" if bound else " is not listening")))
    running = service.scheduler_running()
    checks.append(Check("scheduler", running, "background jobs running" if running else "background jobs stopped"))
    return checks


def as_json(checks: list[Check]) -> dict[str, Any]:
    """Body of the /readyz answer."""
    failing = [c.name for c in checks if not c.ok]
    return {"ready": not failing, "failing": failing, "checks": [asdict(c) for c in checks]}
