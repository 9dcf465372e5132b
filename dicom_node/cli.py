"""``dicom-node``: serve, analyze, echo, send, status, retry, audit export, config check, http hash-password.

Every failure ends with a one-line reason on stderr and a non-zero exit code:
1 = the operation failed (peer refused, analysis failed ...), 2 = bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import __version__
from dicom_node.errors import ConfigError, NodeError, redact
from dicom_node.settings import (
    Destination,
    Overrides,
    Settings,
    load,
    parse_destination_spec,
)

if TYPE_CHECKING:
    from dicom_node.db import Database

log = logging.getLogger("dicom_node")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """Tracebacks with the quoted values of their exception messages redacted (see `redact`): a traceback is
    what an operator needs to report a bug, and its last line can quote a patient's data."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        # A frame line ('  File "...", line N, in f') and the source line after it are code; every other line
        # (messages, their continuation lines, chained-exception headers) is redacted.
        out: list[str] = []
        code_next = False
        for line in super().formatException(ei).split("\n"):
            frame = line.startswith("  File \"")
            out.append(line if frame or code_next else redact(line))
            code_next = frame
        return "\n".join(out)


def _configure_logging(settings: Settings | None, verbose: bool = False, one_shot: bool = False) -> None:
    """Log format and levels; `one_shot` commands print their own one-line outcome, so only warnings show."""
    level = "DEBUG" if verbose else ("WARNING" if one_shot else (settings.logging.level if settings else "INFO"))
    phi = bool(settings and settings.logging.phi)
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT, stream=sys.stderr, force=True)
    if not phi:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    # pynetdicom logs every PDU at INFO and a refused connection at ERROR (our own messages carry the
    # reason): keep it to warnings when serving, silent for one-shot commands, everything when debugging.
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if level == "DEBUG" else (logging.CRITICAL if one_shot else logging.WARNING))
    logging.getLogger("pynetdicom.transport").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
    # highdicom narrates every attribute it copies at INFO.
    logging.getLogger("highdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = phi
    _config.LOG_RESPONSE_IDENTIFIERS = phi
    # pydicom's validation messages quote element values (a malformed PatientName, say): they go through
    # logging, and are kept out of the log unless `phi` allows patient data there.
    logging.captureWarnings(True)
    quiet = logging.WARNING if phi or level == "DEBUG" else logging.CRITICAL
    for name in ("pydicom", "py.warnings"):
        logging.getLogger(name).setLevel(quiet)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration (default: the embedded default)")
    p.add_argument("--ae-title", help="our AE title")
    p.add_argument("--port", type=int, help="port to listen on")
    p.add_argument("--bind-host", help="interface to listen on")
    p.add_argument("--data-dir", help="database and store directory")
    p.add_argument("--destination", action="append", default=[], metavar="AET@HOST:PORT",
                   help="add a destination (repeatable)")
    p.add_argument("--allow", action="append", default=[], metavar="AET[@HOST]", help="allow a calling AE (repeatable)")
    p.add_argument("--accept-any", action="store_true", default=None, help="accept any calling AE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (public for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="dicom-node", description="DICOM-native AI node for spine imaging")
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="receive, analyse and deliver until stopped")
    _common(p)
    p.add_argument("--http-port", type=int, help="serve the dashboard, API and metrics on this port (enables [http])")
    p.add_argument("--http-token", help="accept this bearer token (id 'cli'; at least 16 characters)")

    p = sub.add_parser("analyze", help="run routing, analyses and encoders on files; write the outputs")
    _common(p)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")
    p.add_argument("--out", type=Path, required=True, help="folder for the output .dcm files")

    p = sub.add_parser("echo", help="C-ECHO a peer")
    _common(p)
    p.add_argument("target", metavar="AET@HOST:PORT")

    p = sub.add_parser("send", help="C-STORE files to a peer")
    _common(p)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")
    p.add_argument("--to", required=True, metavar="AET@HOST:PORT")

    p = sub.add_parser("status", help="studies by state, queue depth and last errors per destination")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--studies", type=int, default=10, help="how many recent studies to list")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a study or delivery has failed (for monitoring scripts); 0 otherwise")

    p = sub.add_parser("retry", help="re-queue failed deliveries (and studies whose analysis failed)")
    _common(p)
    p.add_argument("--destination-name", help="only this destination")

    p = sub.add_parser("audit", help="the audit trail: associations, deliveries, operator actions")
    asub = p.add_subparsers(dest="audit_command", required=True)
    a = asub.add_parser("export", help="write the audit trail as CSV or JSON")
    _common(a)
    a.add_argument("--format", choices=("csv", "json"), default="csv")
    a.add_argument("--since", help="from this day (YYYY-MM-DD, local) or time (ISO 8601)")
    a.add_argument("--until", help="up to and including this day, or before this time")
    a.add_argument("--kind", action="append", choices=("association", "delivery", "action"), default=[],
                   help="only these kinds (repeatable)")
    a.add_argument("--out", type=Path, help="file to write (default: standard output)")

    p = sub.add_parser("http", help="dashboard helpers")
    hsub = p.add_subparsers(dest="http_command", required=True)
    h = hsub.add_parser("hash-password", help="print a password hash for [http] users (reads the password"
                        " from standard input, or asks)")
    h.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a configuration file and print every problem")
    c.add_argument("file", type=Path)
    c.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


def _overrides(args: argparse.Namespace) -> Overrides:
    return Overrides(
        ae_title=getattr(args, "ae_title", None), port=getattr(args, "port", None),
        bind_host=getattr(args, "bind_host", None), data_dir=getattr(args, "data_dir", None),
        destinations=tuple(getattr(args, "destination", []) or ()), allow=tuple(getattr(args, "allow", []) or ()),
        accept_any=getattr(args, "accept_any", None), http_port=getattr(args, "http_port", None),
        http_token=getattr(args, "http_token", None),
    )


def _files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise NodeError(f"{p}: no such file or folder")
    return out


def _target(spec: str) -> Destination:
    table = parse_destination_spec(spec, name="target")
    return Destination(**table)


# --------------------------------------------------------------------------------------- commands


#: What `serve` creates (received instances, outputs, the database) is patient data: no access for other users.
SERVE_UMASK = 0o027


def cmd_serve(settings: Settings) -> int:
    from dicom_node.service import NodeService

    os.umask(SERVE_UMASK)
    service = NodeService(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start()
    except OSError as exc:
        service.stop()
        raise NodeError(f"cannot listen on {settings.node.bind_host}:{settings.node.port}: {exc.strerror or exc}") from exc
    except NodeError:
        service.stop()
        raise
    print(f"dicom-node {__version__}: {settings.node.ae_title} listening on {settings.node.bind_host}:"
          f"{service.scp.port}, data in {settings.data_dir}", file=sys.stderr, flush=True)
    if service.http is not None:
        from dicom_node.web.auth import TOKEN_FILE

        where = "" if settings.http.tokens or settings.http.users else \
            f" (sign in with the token in {settings.data_dir / TOKEN_FILE})"
        print(f"dicom-node: dashboard on {service.http.url}/{where}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()
    return EXIT_OK


def _by_study(files: Sequence[Path]) -> dict[str, list[Path]]:
    """Files grouped by StudyInstanceUID (headers only), in order of first appearance."""
    import pydicom

    from dicom_node.progress import progress

    groups: dict[str, list[Path]] = {}
    for f in progress(files, desc="reading headers", unit="file"):
        try:
            key = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                      .get("StudyInstanceUID", ""))
        except Exception:  # noqa: BLE001 - analysing it reports why it cannot be read
            key = f"unreadable:{f}"
        groups.setdefault(key, []).append(f)
    return groups


def cmd_analyze(settings: Settings, paths: Sequence[Path], out: Path) -> int:
    from dicom_node.pipeline import Analyser, analyze_offline, describe
    from dicom_node.progress import progress
    from dicom_node.service import load_plugins, make_registry

    load_plugins(settings)
    studies = _by_study(_files(paths))
    analyser = Analyser(make_registry(settings))
    written: list[Path] = []
    failed: list[str] = []
    # One study at a time: progress per study, and only one study's pixels in memory. A study that fails is
    # reported and the others still run, as in the node.
    with progress(total=len(studies), desc="analysing", unit="study") as bar:
        for study, files in studies.items():
            try:
                written.extend(analyze_offline(settings, analyser, files, out))
            except Exception as exc:  # noqa: BLE001 - any failure of one study is reported with its reason
                failed.append(study)
                named = f"study {study or '(no StudyInstanceUID)'}: "
                reason = describe(exc)  # (the routing's reason names the study already)
                print(reason if reason.startswith(named) else named + reason, file=sys.stderr)
            bar.update()
    for p in written:
        print(p)
    if failed:
        raise NodeError(f"{len(failed)} of {len(studies)} studies not analysed (reasons above)")
    return EXIT_OK


def cmd_echo(settings: Settings, target: str) -> int:
    from dicom_node.scu import echo

    ok, message = echo(settings.node.ae_title, _target(target), settings.delivery)
    print(message, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_send(settings: Settings, paths: Sequence[Path], target: str) -> int:
    import pydicom

    from dicom_node.scu import OK, Item, send_batch

    dest = _target(target)
    items = []
    for f in _files(paths):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            items.append(Item(f, f, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001
            raise NodeError(f"{f}: not a DICOM file ({type(exc).__name__}: {exc})") from exc
    failed = 0
    for start in range(0, len(items), dest.batch_size):
        for res in send_batch(settings.node.ae_title, dest, items[start:start + dest.batch_size], settings.delivery):
            if res.outcome != OK:
                failed += 1
                print(f"{res.key}: {res.message}", file=sys.stderr)
    print(f"sent {len(items) - failed} of {len(items)} to {dest.address}")
    if failed:
        raise NodeError(f"{failed} of {len(items)} file(s) not stored by {dest.address}")
    return EXIT_OK


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _status_report(db: Database, n_studies: int) -> dict[str, Any]:
    """What `status` shows, read from the database."""
    report: dict[str, Any] = {
        "studies": db.study_counts(),
        "destinations": db.queue_depth(),
        "recent_studies": db.recent_studies(n_studies),
        "recent_associations": db.recent_associations(5),
    }
    n_flagged, flagged = db.studies_page(flagged=True, limit=n_studies)
    report["flagged_total"] = n_flagged
    report["flagged_studies"] = [
        {"study_instance_uid": s["study_instance_uid"], "updated_at": s["updated_at"], "state": s["state"],
         "results": [{k: r.get(k) for k in ("analysis", "verdict", "hardware", "instrumentation", "findings")}
                     for r in s["results"] if r.get("flagged")]}
        for s in flagged
    ]
    return report


def cmd_status(settings: Settings, as_json: bool, n_studies: int, check: bool = False) -> int:
    from dicom_node.service import DB_NAME, open_database

    if not (settings.data_dir / DB_NAME).exists():
        raise NodeError(f"no node database in {settings.data_dir} (has the node run with this --data-dir?)")
    db = open_database(settings, read_only=True)
    try:
        report = _status_report(db, n_studies)
    finally:
        db.close()
    counts = report["studies"]
    failing = bool(counts.get("failed") or any(d["failed"] for d in report["destinations"]))
    outcome = EXIT_FAILED if check and failing else EXIT_OK
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return outcome
    print("studies: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("destinations:")
    if not report["destinations"]:
        print("  (no deliveries yet)")
    for d in report["destinations"]:
        line = f"  {d['destination']}: pending {d['pending']}"
        if d["pending"] and d["next_attempt_at"]:
            line += f" (next attempt {_when(max(d['next_attempt_at'], time.time()))})"
        line += f", sending {d['sending']}, delivered {d['delivered']}, failed {d['failed']}"
        if d["last_error"]:
            line += f"; last error {_when(d['last_error_at'])}: {d['last_error']}"
        print(line)
    # What a radiologist must look at first: a possible hardware complication or a new fracture.
    print(f"flagged studies: {report['flagged_total']}" + (" (newest first)" if report["flagged_total"] else ""))
    for s in report["flagged_studies"]:
        for r in s["results"]:
            what = "; ".join(f["description"] or f["kind"] for f in r["findings"]) or r["verdict"]
            hardware = f", hardware {r['hardware']}" if r["hardware"] else ""
            print(f"  {_when(s['updated_at'])} {s['study_instance_uid']} [{r['analysis']}{hardware}] {what}")
    print("recent studies:")
    for s in report["recent_studies"]:
        reason = f" ({s['reason']})" if s["reason"] else ""
        print(f"  {_when(s['updated_at'])} {s['study_instance_uid']} {s['state']}, {s['instance_count']} instance(s){reason}")
    if failing:
        print("to send failed deliveries and run failed analyses again, once the cause is mended: dicom-node retry")
    return outcome


def cmd_retry(settings: Settings, destination: str | None) -> int:
    from dicom_node.service import DB_NAME, open_database

    if not (settings.data_dir / DB_NAME).exists():
        raise NodeError(f"no node database in {settings.data_dir}")
    db = open_database(settings)
    try:
        n = db.requeue_failed(destination=destination)
        m = db.requeue_failed_studies() if destination is None else 0
        db.record_retry(f"cli:{_os_user()}", n, m, target=destination or "all", destination=destination)
    finally:
        db.close()
    print(f"re-queued {n} delivery(ies) and {m} study(ies); a running node picks them up within seconds")
    return EXIT_OK


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return "unknown"


AUDIT_COLUMNS = ("id", "time", "kind", "action", "actor", "peer", "destination", "study_instance_uid", "target",
                 "instances", "failures", "status", "outcome", "detail")


def cmd_audit_export(settings: Settings, fmt: str, since: str | None, until: str | None, kinds: Sequence[str],
                     out: Path | None) -> int:
    import csv

    from dicom_node.service import DB_NAME, open_database
    from dicom_node.web.views import audit_entry, parse_when

    if not (settings.data_dir / DB_NAME).exists():
        raise NodeError(f"no node database in {settings.data_dir}")
    try:
        t0, t1 = parse_when(since), parse_when(until, end=True)
    except ValueError as exc:
        raise ConfigError([str(exc)], "command line") from None
    db = open_database(settings, read_only=True)
    try:
        rows = [audit_entry(r) for r in db.audit_events(since=t0, until=t1, kinds=kinds)]
    finally:
        db.close()
    fh = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115 - closed below
    try:
        if fmt == "json":
            json.dump([{k: r.get(k) for k in AUDIT_COLUMNS} for r in rows], fh, indent=1)
            fh.write("\n")
        else:
            writer = csv.DictWriter(fh, fieldnames=AUDIT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    finally:
        if out:
            fh.close()
    if out:
        print(f"{len(rows)} event(s) written to {out}", file=sys.stderr)
    return EXIT_OK


def cmd_hash_password() -> int:
    import getpass

    from dicom_node.web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise NodeError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise NodeError("use at least 8 characters")
    print(hash_password(password))
    return EXIT_OK


def cmd_config_check(path: Path) -> int:
    """Validate the file as `serve` would read it (with the DICOM_NODE_* environment), on this machine: the
    analyses installed and the data directory writable by this user (the systemd unit runs it first)."""
    from inference import analyses

    try:
        settings = load(path)
    except ConfigError as exc:
        # The source names the environment variables in effect: a problem may lie in one of them.
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        print(f"{exc.source}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    try:
        load_plugins_quietly(settings)
        available = analyses.available()
    except Exception as exc:  # noqa: BLE001
        print(f"{path}: models.plugins: cannot import ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_USAGE
    from dicom_node.settings import problems_for, warnings_for

    problems = problems_for(settings, available)
    data_problem = _data_dir_problem(settings.data_dir)
    if data_problem:
        problems.append(f"node.data_dir: {data_problem}")
    for w in warnings_for(settings, available):
        print(f"{path}: warning: {w}")
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: OK ({len(settings.destinations)} destination(s), {len(settings.rules)} rule(s))")
    if not settings.node.data_dir.expanduser().is_absolute():
        # `serve` resolves it from its own working directory, which may not be this shell's.
        print(f"{path}: note: node.data_dir {str(settings.node.data_dir)!r} is relative; checked {settings.data_dir}"
              " (from this directory); serve keeps its data under its own working directory")
    return EXIT_OK


def _data_dir_problem(data_dir: Path) -> str | None:
    """Why this user could not keep the node's data in `data_dir` (None when it can)."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == data_dir else f" (to create {data_dir})"
        return f"{existing} is not writable by this user{what}"
    return None


def load_plugins_quietly(settings: Settings) -> None:
    from dicom_node.service import load_plugins

    load_plugins(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            _configure_logging(None)
            return cmd_config_check(args.file)
        if args.command == "http":
            return cmd_hash_password()
        settings = load(args.config, overrides=_overrides(args))
        _configure_logging(settings, args.verbose, one_shot=args.command != "serve")
        if args.command == "serve":
            return cmd_serve(settings)
        if args.command == "analyze":
            return cmd_analyze(settings, args.paths, args.out)
        if args.command == "echo":
            return cmd_echo(settings, args.target)
        if args.command == "send":
            return cmd_send(settings, args.paths, args.to)
        if args.command == "status":
            return cmd_status(settings, args.json, args.studies, args.check)
        if args.command == "retry":
            return cmd_retry(settings, args.destination_name)
        if args.command == "audit":
            return cmd_audit_export(settings, args.format, args.since, args.until, args.kind, args.out)
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        for problem in exc.problems[1:]:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except NodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        # `dicom-node status | head`: the reader has what it wanted. Quiet, as other Unix tools are.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for operators
        log.debug("unexpected error", exc_info=True)
        print(f"dicom-node: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
