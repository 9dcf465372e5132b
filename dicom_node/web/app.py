"""The FastAPI application: /healthz, /readyz, /metrics, the JSON API under /api and the dashboard pages.

Pages are rendered on the server with Jinja2; ``static/app.js`` polls the JSON API and swaps in the
page's main section when something changed (``X-Fragment: 1`` asks for that section only).  No build step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt

from dicom_node import __version__
from dicom_node.db import STUDY_STATES
from dicom_node.web import auth
from dicom_node.web.health import as_json, readiness
from dicom_node.web.metrics import CONTENT_TYPE
from dicom_node.web.views import Views, iso, parse_when

if TYPE_CHECKING:
    from dicom_node.service import NodeService

log = logging.getLogger("dicom_node.web")

HERE = Path(__file__).resolve().parent
PUBLIC_PATHS = ("/healthz", "/login", "/logout", "/static/", "/favicon.ico")
AUDIT_KINDS = ("association", "delivery", "action")
#: Largest page offset asked of the database (its integers end at 2**63; no node holds more studies).
MAX_OFFSET = 10**9
#: The studies filter `q`: the beginning of a Study Instance UID (the SCP accepts no other kind of UID).
_UID_PREFIX = re.compile(r"[0-9.]{1,64}")
# Only the node's own scripts, styles and images: DICOM text shown on the pages can never run as code.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self';"
       " frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _parse_when(value: str | None, *, end: bool = False) -> float | None:
    try:
        return parse_when(value, end=end)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def _parse_flagged(value: str | None) -> bool | None:
    if value in (None, "", "any"):
        return None
    if value.lower() in ("1", "true", "yes", "flagged"):
        return True
    if value.lower() in ("0", "false", "no", "not-flagged"):
        return False
    raise HTTPException(400, f"flagged must be true, false or any, got {value!r}")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(value: str | None) -> str:
    """ISO time -> ``YYYY-MM-DD HH:MM:SS`` (local)."""
    if not value:
        return "-"
    return value[:19].replace("T", " ")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def create_app(service: NodeService) -> FastAPI:
    """The application for one running node."""
    http = service.settings.http
    extra: dict[str, str] = {}
    if not http.tokens and not http.users:
        extra["local"] = auth.local_token(service.settings.data_dir)
    authenticator = auth.Authenticator(http, extra)
    views = Views(service)
    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")

    app = FastAPI(title="dicom-node", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.service = service
    app.state.views = views
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.filters["size"] = _size
    env.filters["seconds"] = _seconds
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str)
    env.globals.update(version=__version__, ae_title=service.settings.node.ae_title, states=STUDY_STATES,
                       refresh_s=http.refresh_s, show_phi=http.show_phi)

    # ------------------------------------------------------------------------------ security

    def _is_page(path: str) -> bool:
        return not (path.startswith("/api/") or path in ("/metrics", "/readyz"))

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path == "/" or not path.startswith(PUBLIC_PATHS):
            principal = await asyncio.to_thread(
                authenticator.from_headers, request.headers.get("authorization"),
                request.cookies.get(auth.SESSION_COOKIE))
            if principal is None:
                service.metrics.auth_failures.labels("page" if _is_page(path) else path.split("/")[1] or "page").inc()
                if _is_page(path) and request.method == "GET" and authenticator.accepts_tokens:
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
                return JSONResponse({"detail": "authentication required"}, status_code=401,
                                    headers={"WWW-Authenticate": authenticator.challenge()})
            if request.method not in ("GET", "HEAD", "OPTIONS") and principal.ambient and \
                    request.headers.get(auth.CSRF_HEADER) != auth.CSRF_VALUE:
                return JSONResponse({"detail": f"missing header {auth.CSRF_HEADER}: {auth.CSRF_VALUE}"},
                                    status_code=403)
            request.state.principal = principal
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        if not path.startswith("/api/docs"):  # Swagger UI loads its assets from a CDN
            response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    def actor(request: Request) -> str:
        return request.state.principal.actor

    # ------------------------------------------------------------------------- health, metrics

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        """Alive: the process answers (no authentication, no patient or configuration data)."""
        return {"status": "ok"}

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready to receive and deliver: 200, or 503 naming the failing checks."""
        body = as_json(readiness(service))
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    # ----------------------------------------------------------------------------------- API

    @app.get("/api/overview")
    def api_overview() -> dict[str, Any]:
        return views.overview()

    @app.get("/api/changes")
    def api_changes() -> dict[str, Any]:
        """Markers that move when anything shown changes (what the pages poll)."""
        marks = service.db.change_marks()
        marks["analyses"] = dict(service.analyser.status)
        return marks

    def _studies(request: Request) -> dict[str, Any]:
        q = request.query_params
        try:
            limit = min(500, max(1, int(q.get("limit") or 50)))
            offset = min(MAX_OFFSET, max(0, int(q.get("offset") or 0)))  # SQLite integers end at 2**63
        except ValueError:
            raise HTTPException(400, "limit and offset must be integers") from None
        prefix = (q.get("q") or "").strip()
        if prefix and not _UID_PREFIX.fullmatch(prefix):
            raise HTTPException(400, "q must be the beginning of a Study Instance UID (digits and dots, at most 64)")
        try:
            return views.studies(state=q.get("state") or None, flagged=_parse_flagged(q.get("flagged")),
                                 since=_parse_when(q.get("since")), until=_parse_when(q.get("until"), end=True),
                                 uid_prefix=prefix or None, limit=limit, offset=offset)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/api/studies")
    def api_studies(request: Request) -> dict[str, Any]:
        """Studies, newest activity first.  Filters: state, flagged (true/false), since/until (received,
        YYYY-MM-DD inclusive), q (Study Instance UID prefix), limit, offset."""
        return _studies(request)

    @app.get("/api/studies/{study_uid}")
    def api_study(study_uid: str) -> dict[str, Any]:
        detail = views.study(study_uid)
        if detail is None:
            raise HTTPException(404, f"no study {study_uid}")
        return detail

    @app.get("/api/studies/{study_uid}/outputs/{sop_uid}/image.png")
    def api_output_image(study_uid: str, sop_uid: str, size: str = "thumb") -> Response:
        data, why = views.output_image(study_uid, sop_uid, size)
        if data is None:
            status = (400 if why.startswith("size must") else 404 if "no such" in why
                      else 403 if "show_phi" in why or "burned-in" in why else 410)
            raise HTTPException(status, why)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/studies/{study_uid}/retry")
    def api_retry_study(study_uid: str, request: Request) -> dict[str, Any]:
        """Re-queue the study's failed deliveries (or its failed analysis)."""
        if service.db.study(study_uid) is None:
            _refused(request, "retry", study_uid, f"no study {study_uid}")
        done = service.retry_study(study_uid, actor(request))
        if not done["deliveries"] and not done["studies"]:
            raise HTTPException(409, "nothing to retry: the study has no failed delivery or analysis")
        return {"requeued": done}

    @app.post("/api/studies/{study_uid}/reanalyse")
    def api_reanalyse(study_uid: str, request: Request) -> dict[str, Any]:
        """Route and analyse the study again (through complete -> analysing -> encoded -> delivered)."""
        why = service.reanalyse_study(study_uid, actor(request))
        if why == "no such study":
            raise HTTPException(404, f"no study {study_uid}")
        if why:
            raise HTTPException(409, why)
        return {"state": "complete"}

    @app.get("/api/destinations")
    async def api_destinations(request: Request, echo: bool = False) -> dict[str, Any]:
        """Destinations with their queues; ``?echo=true`` also C-ECHOes each (in parallel, audited)."""
        dests = await asyncio.to_thread(views.destinations)
        if echo:
            who = actor(request)
            results = await asyncio.gather(*(asyncio.to_thread(service.echo_destination, d["name"], who)
                                             for d in dests))
            for d, (ok, message) in zip(dests, results, strict=True):
                d["echo"] = {"ok": ok, "message": message}
        return {"destinations": dests}

    def _refused(request: Request, action: str, target: str, why: str) -> None:
        """Audit an action on something that does not exist (the audit keeps every action, refused or not),
        then answer 404."""
        service.db.record_action(action, actor(request), "refused", target=target, detail=why)
        raise HTTPException(404, why)

    def _destination(name: str, request: Request, action: str) -> None:
        try:
            service.settings.destination(name)
        except KeyError:
            _refused(request, action, name, f"no destination {name}")

    @app.post("/api/destinations/{name}/echo")
    def api_echo(name: str, request: Request) -> dict[str, Any]:
        """C-ECHO one destination."""
        _destination(name, request, "echo")
        ok, message = service.echo_destination(name, actor(request))
        return {"ok": ok, "message": message}

    @app.post("/api/destinations/{name}/retry")
    def api_retry_destination(name: str, request: Request) -> dict[str, Any]:
        """Re-queue every failed delivery to one destination."""
        _destination(name, request, "retry")
        return {"requeued": service.retry_destination(name, actor(request))}

    @app.get("/api/audit")
    def api_audit(since: str | None = None, until: str | None = None, kind: str | None = None,
                  limit: int = 200) -> dict[str, Any]:
        """The audit trail, newest first."""
        kinds = [k for k in (kind or "").split(",") if k]
        bad = [k for k in kinds if k not in AUDIT_KINDS]
        if bad:
            raise HTTPException(400, f"kind must be among {', '.join(AUDIT_KINDS)}, got {', '.join(bad)}")
        rows = service.db.audit_events(since=_parse_when(since), until=_parse_when(until, end=True), kinds=kinds,
                                       limit=min(max(1, limit), 10_000), newest_first=True)
        return {"events": [views.audit_entry(r) for r in rows]}

    @app.get("/api/config")
    def api_config() -> dict[str, Any]:
        """The running configuration (read-only; secrets masked)."""
        return views.configuration()

    @app.get("/api/models")
    def api_models() -> dict[str, Any]:
        return views.models()

    @app.get("/api/models/{name}/card")
    def api_model_card(name: str) -> Response:
        entry, card = views.model_card(name)
        if entry is None:
            raise HTTPException(404, f"no model {name}")
        if card is None:
            raise HTTPException(404, f"no model card yet for {name}")
        return Response(card, media_type="text/markdown; charset=utf-8")

    # --------------------------------------------------------------------------------- pages

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        fragment = request.headers.get("x-fragment") == "1"
        principal = getattr(request.state, "principal", None)
        return templates.TemplateResponse(request, name, {
            "fragment": fragment, "who": principal.actor if principal else None,
            "via": principal.via if principal else None, **context}, status_code=context.get("status", 200))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(request: Request) -> HTMLResponse:
        return page(request, "overview.html", o=views.overview(), poll="/api/changes", nav="overview")

    @app.get("/studies", response_class=HTMLResponse, include_in_schema=False)
    def studies_page(request: Request) -> HTMLResponse:
        q = request.query_params
        result = _studies(request)
        filters = {k: q.get(k) or "" for k in ("state", "flagged", "since", "until", "q")}
        page_query = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
        return page(request, "studies.html", r=result, filters=filters, poll="/api/changes", nav="studies",
                    page_query=page_query)

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(study_uid: str, request: Request) -> HTMLResponse:
        detail = views.study(study_uid)
        if detail is None:
            return page(request, "error.html", status=404, message=f"No study {study_uid} on this node.",
                        nav="studies")
        return page(request, "study.html", s=detail, poll=f"/api/studies/{study_uid}", nav="studies")

    @app.get("/destinations", response_class=HTMLResponse, include_in_schema=False)
    def destinations_page(request: Request) -> HTMLResponse:
        return page(request, "destinations.html", dests=views.destinations(), poll="/api/changes",
                    nav="destinations")

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, kind: str | None = None, since: str | None = None,
                   until: str | None = None) -> HTMLResponse:
        kinds = [k for k in (kind or "").split(",") if k in AUDIT_KINDS]
        rows = service.db.audit_events(since=_parse_when(since), until=_parse_when(until, end=True), kinds=kinds,
                                       limit=500, newest_first=True)
        return page(request, "audit.html", events=[views.audit_entry(r) for r in rows],
                    filters={"kind": kind or "", "since": since or "", "until": until or ""}, nav="audit")

    @app.get("/config", response_class=HTMLResponse, include_in_schema=False)
    def config_page(request: Request) -> HTMLResponse:
        return page(request, "config.html", c=views.configuration(), nav="config")

    @app.get("/models", response_class=HTMLResponse, include_in_schema=False)
    def models_page(request: Request) -> HTMLResponse:
        return page(request, "models.html", m=views.models(), nav="models")

    @app.get("/models/{name}", response_class=HTMLResponse, include_in_schema=False)
    def model_card_page(name: str, request: Request) -> HTMLResponse:
        entry, card = views.model_card(name)
        if entry is None:
            return page(request, "error.html", status=404, message=f"No model folder named {name}.", nav="models")
        return page(request, "model_card.html", model=entry, card_html=markdown.render(card) if card else None,
                    nav="models")

    # --------------------------------------------------------------------------------- login

    def _safe_next(target: str | None) -> str:
        return target if target and target.startswith("/") and not target.startswith("//") else "/"

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str | None = None, failed: int = 0) -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {
            "next": _safe_next(next), "failed": bool(failed), "tokens": authenticator.accepts_tokens,
            "users": bool(authenticator.users), "fragment": False, "who": None, "nav": None,
            "local_token_file": str(service.settings.data_dir / auth.TOKEN_FILE) if "local" in extra else None})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # A urlencoded form of two fields: parsed here rather than pulling in python-multipart.
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        token = (form.get("token") or [""])[0]
        target = _safe_next((form.get("next") or ["/"])[0])
        ident = authenticator.token_id(token) if token else None
        peer = f"{request.client.host}:{request.client.port}" if request.client else None
        if ident is None:
            await asyncio.to_thread(service.db.record_action, "login", "unknown", "refused", peer=peer,
                                    detail="wrong token")
            return RedirectResponse(f"/login?failed=1&next={quote(target)}", status_code=303)
        await asyncio.to_thread(service.db.record_action, "login", f"token:{ident}", "ok", peer=peer)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(auth.SESSION_COOKIE, authenticator.session_value(ident), httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
        return response

    @app.get("/login/basic", include_in_schema=False)
    def login_basic(request: Request, next: str | None = None) -> Response:
        """Makes the browser ask for a user name and password, then goes on."""
        principal = authenticator.from_headers(request.headers.get("authorization"), None)
        if principal is None:
            return Response("user name and password required", status_code=401,
                            headers={"WWW-Authenticate": authenticator.challenge()})
        return RedirectResponse(_safe_next(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(auth.SESSION_COOKIE, path="/")
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if _is_page(request.url.path) and request.method == "GET":
            return templates.TemplateResponse(request, "error.html", {
                "status": exc.status_code, "message": exc.detail, "fragment": False, "nav": None,
                "who": None}, status_code=exc.status_code)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    app.state.iso = iso
    return app
