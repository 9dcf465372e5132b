"""Who is calling: bearer tokens, basic-auth users and the dashboard's session cookie.

Every path except /healthz, /login and /static needs one of them.  A browser session is a cookie
``<token id>.<HMAC(token, id)>``: it survives restarts of the node and dies when its token is changed or
removed.  Requests that change something (POST) and ride on credentials a browser adds by itself (cookie or
basic auth) must also carry ``X-Requested-With: dicom-node``, which a page of another site cannot set
without a CORS pre-flight the node never grants (cross-site request forgery).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.settings import HttpSettings

SESSION_COOKIE = "dicom_node_session"
CSRF_HEADER = "x-requested-with"
CSRF_VALUE = "dicom-node"
TOKEN_FILE = "http-token"
PBKDF2_ITERATIONS = 310_000
#: A verified basic-auth header is remembered this long: browsers resend it with every request (each poll
#: of a page), and one PBKDF2 check costs a few hundred ms of CPU.
BASIC_CACHE_S = 300.0
#: Wrong passwords for one user name within this window, after which that name's basic-auth attempts are
#: refused unchecked until the window has passed: each check costs a PBKDF2 computation, and 40 threads
#: guessing kept both cores busy (bearer tokens and sessions are not affected).
BASIC_MAX_FAILURES = 5
BASIC_FAILURE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    kind: str  # "token" or "user"
    name: str
    via: str  # "bearer", "cookie" or "basic"

    @property
    def actor(self) -> str:
        """How the audit trail names the caller, e.g. ``token:monitoring`` or ``user:alice``."""
        return f"{self.kind}:{self.name}"

    @property
    def ambient(self) -> bool:
        """True when the browser sends these credentials by itself (cookie, basic): CSRF applies."""
        return self.via in ("cookie", "basic")


def hash_password(password: str, *, salt: str | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<hash>`` for ``[http] users``."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches a `hash_password` string."""
    try:
        scheme, iterations, salt, expected = encoded.split("$")
    except ValueError:
        return False
    if scheme != "pbkdf2_sha256":
        return False
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), int(iterations))
    return hmac.compare_digest(base64.b64encode(digest).decode(), expected)


def local_token(data_dir: Path) -> str:
    """The token of ``<data_dir>/http-token``, created (owner-readable only) if absent."""
    path = Path(data_dir) / TOKEN_FILE
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= 16:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


class Authenticator:
    """Checks credentials against the configured tokens and users (constant-time comparisons)."""

    def __init__(self, http: HttpSettings, extra_tokens: dict[str, str] | None = None) -> None:
        self.tokens: dict[str, str] = {t.id: t.token for t in http.tokens}
        self.tokens.update(extra_tokens or {})
        self.users: dict[str, str] = {u.name: u.password_hash for u in http.users}
        self._key = secrets.token_bytes(32)  # keys the cache below; never leaves the process
        self._verified: dict[bytes, tuple[str, float]] = {}
        self._failures: dict[str, list[float]] = {}  # user name -> times of recent wrong passwords
        self._lock = threading.Lock()
        self._hashing = threading.Semaphore(1)  # one PBKDF2 check at a time: a core stays free for the node

    @property
    def accepts_tokens(self) -> bool:
        """True when the login page can be used."""
        return bool(self.tokens)

    def token_id(self, token: str) -> str | None:
        """The id of `token`, or None."""
        found = None
        for ident, value in self.tokens.items():
            if hmac.compare_digest(value.encode(), token.encode()):
                found = ident
        return found

    def session_value(self, token_id: str) -> str:
        """The cookie value for a session opened with token `token_id`."""
        mac = hmac.new(self.tokens[token_id].encode(), f"dicom-node-session:{token_id}".encode(), "sha256")
        return f"{token_id}.{mac.hexdigest()}"

    def from_headers(self, authorization: str | None, cookie: str | None) -> Principal | None:
        """The caller named by an Authorization header or a session cookie, or None."""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            scheme = scheme.lower()
            value = value.strip()
            if scheme == "bearer" and value:
                ident = self.token_id(value)
                return Principal("token", ident, "bearer") if ident else None
            if scheme == "basic" and value:
                return self._basic(value)
        if cookie:
            ident, _, _mac = cookie.partition(".")
            if ident in self.tokens and hmac.compare_digest(self.session_value(ident).encode(), cookie.encode()):
                return Principal("token", ident, "cookie")
        return None

    def _basic(self, value: str) -> Principal | None:
        digest = hmac.new(self._key, value.encode(), "sha256").digest()
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(digest)
        if hit and hit[1] > now:
            return Principal("user", hit[0], "basic")
        try:
            name, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        encoded = self.users.get(name)
        if not encoded:
            return None
        with self._lock:
            recent = [t for t in self._failures.get(name, []) if t > now - BASIC_FAILURE_WINDOW_S]
            self._failures[name] = recent
        if len(recent) >= BASIC_MAX_FAILURES:
            return None
        with self._hashing:
            ok = verify_password(password, encoded)
        if not ok:
            with self._lock:
                self._failures.setdefault(name, []).append(now)
            return None
        with self._lock:
            if len(self._verified) > 1000:
                self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
            self._verified[digest] = (name, now + BASIC_CACHE_S)
        return Principal("user", name, "basic")

    def challenge(self) -> str:
        """The WWW-Authenticate header value of a 401 answer."""
        schemes = ['Bearer realm="dicom-node"']
        if self.users:
            schemes.insert(0, 'Basic realm="dicom-node", charset="UTF-8"')
        return ", ".join(schemes)
