"""Configuration: one TOML file, validated once at start into frozen objects that are passed down.

Precedence, lowest first: the embedded default (`dicom_node/default_node.toml`) or the file given with
``--config`` / ``DICOM_NODE_CONFIG``, then environment variables (``DICOM_NODE_AE_TITLE``, ...), then CLI
flags.  Every problem is reported as ``key: what is wrong`` naming the key as it is written in the file,
e.g. ``destinations[0] (pacs).port: Input should be less than or equal to 65535, got 70000``.  Nothing else
in the node reads the environment or a configuration file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigError

#: Output kinds a destination can take (the values of ``reports.OutputKind``).
OUTPUT_KINDS: tuple[str, ...] = ("seg", "sr", "sc", "pr")

ENV_PREFIX = "DICOM_NODE_"

_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_ae_title(value: str) -> str:
    title = value.strip()
    if not title or not _AE_CHARS.match(title):
        raise ValueError(f"must be 1-16 printable ASCII characters without backslash, got {value!r}")
    return title


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


#: Host names as resolvers take them, underscores included (Docker services, Windows hosts use them).
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def _check_host(value: str) -> str:
    """An IP address or a host name: "10.20.4.312" and "127.0.0.1:104" (a port in the host) are refused."""
    if not value:
        raise ValueError("must not be empty")
    try:
        return str(ipaddress.ip_address(value.strip("[]")))  # "[::1]" as the socket layer wants it: "::1"
    except ValueError:
        pass
    if ":" in value:
        raise ValueError("is not an IP address or host name (the port goes in 'port')")
    if re.fullmatch(r"[0-9.]+", value) or not _HOSTNAME.match(value):
        raise ValueError("is not an IP address or host name")
    return value


class NodeSettings(_Section):
    """The local Application Entity and where it keeps its data."""

    ae_title: str = "AINODE"
    bind_host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    #: SQLite database and instance store; relative paths are resolved against the working directory.
    data_dir: Path = Path("var")
    max_associations: int = Field(16, ge=1, le=512)
    #: Largest P-DATA PDU the node accepts (bytes); 0 = unlimited.  Large PDUs cut per-PDU overhead.
    max_pdu_bytes: int = Field(4_194_304, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(120.0, gt=0)
    #: When an acknowledged instance is safe.  "data": its bytes are fdatasync'ed before the answer, the
    #: directory entry and database row reach the disk within seconds (what Orthanc's SyncStorageArea does);
    #: "full": also the directory and a synchronous=FULL database commit (survives power loss at any moment,
    #: about half the ingest rate); "os": no sync (survives a crash of the node, not of the machine).
    durability: Literal["full", "data", "os"] = "data"

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("bind_host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty (use 0.0.0.0 for every interface)")
        return value


class Peer(_Section):
    """A calling AE allowed to associate; `host` (IP or name) restricts where it may connect from."""

    ae_title: str
    host: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("host")
    @classmethod
    def _peer_host(cls, value: str | None) -> str | None:
        return None if value is None else _check_host(value)


class PeersSettings(_Section):
    """Who may send to the node.  Unknown calling AEs are rejected unless `accept_any` is true."""

    accept_any: bool = False
    allow: tuple[Peer, ...] = ()


class Destination(_Section):
    """A DICOM peer that receives the node's outputs."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    outputs: tuple[Literal["seg", "sr", "sc", "pr"], ...] = OUTPUT_KINDS  # type: ignore[assignment]
    seg_format: Literal["binary", "labelmap"] = "binary"
    seg_compression: Literal["none", "jpeg2000"] = "none"
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: Most instances sent on one association.
    batch_size: int = Field(100, ge=1, le=10_000)
    #: After the sender corrects a study's patient identity, send this destination an IHE IOCM rejection note
    #: (Key Object Selection, "Incorrect Modality Worklist Entry") listing the outputs it got under the old one.
    #: For archives that implement IOCM (they hide, then delete, what the note lists); off: a WARNING only.
    reject_superseded: bool = False

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must be letters, digits, '_', '.', '-' (up to 64), got {value!r}")
        return value

    @field_validator("host")
    @classmethod
    def _dest_host(cls, value: str) -> str:
        return _check_host(value)

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"must list at least one of {', '.join(OUTPUT_KINDS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a kind twice: {list(value)}")
        return value

    @property
    def address(self) -> str:
        """``AET@HOST:PORT``."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class DeliverySettings(_Section):
    """Retry policy of the outbound queue."""

    max_attempts: int = Field(20, ge=1)
    backoff_initial_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(900.0, gt=0)
    #: Fraction of each delay drawn at random (0.25 = +-25 %) so that many queues do not retry in step.
    jitter: float = Field(0.25, ge=0, le=1)
    connect_timeout_s: float = Field(10.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliverySettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s ({self.backoff_initial_s})")
        return self


class Match(_Section):
    """Criteria on DICOM attributes, all of which must hold for an instance (absent = any value).

    Lists match any of their values exactly (case-insensitive); ``*_description`` and
    ``body_part_examined`` are regular expressions searched case-insensitively; ``image_type`` lists
    values that must all be present in ImageType.
    """

    modality: tuple[str, ...] = ()
    body_part_examined: str | None = None
    view_position: tuple[str, ...] = ()
    series_description: str | None = None
    study_description: str | None = None
    image_type: tuple[str, ...] = ()
    sop_class_uid: tuple[str, ...] = ()
    calling_ae_title: tuple[str, ...] = ()

    @field_validator("body_part_examined", "series_description", "study_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression ({exc})") from None
        return value


class Rule(_Section):
    """A routing rule: instances matching any of `match` go to `analyses`, outputs to `destinations`."""

    name: str
    analyses: tuple[str, ...] = Field(min_length=1)
    #: Destination names; absent = every configured destination.
    destinations: tuple[str, ...] | None = None
    #: When a study this rule selects is complete: at association release, or after `stable_age_s` quiet.
    complete_on: Literal["association-release", "stable-age"] = "stable-age"
    match: tuple[Match, ...] = Field(min_length=1)
    #: An instance any of these tables accepts is left out, whichever match table selected it.
    exclude: tuple[Match, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must be letters, digits, '_', '.', '-' (up to 64), got {value!r}")
        return value


class AssemblySettings(_Section):
    """Study completeness."""

    #: A study is complete when no instance arrived for this long (rules may complete earlier).
    stable_age_s: float = Field(30.0, gt=0)
    sweep_interval_s: float = Field(1.0, gt=0)


class RetentionSettings(_Section):
    """How long received instances and produced outputs stay on disk after delivery (0 = forever)."""

    instances_days: float = Field(7.0, ge=0)
    outputs_days: float = Field(30.0, ge=0)
    purge_interval_s: float = Field(3600.0, gt=0)


class ModelsSettings(_Section):
    """Where model folders are found and which modules register extra analyses."""

    #: Extra model roots searched after the built-in `inference/models`.
    roots: tuple[Path, ...] = ()
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    #: Python modules imported at start that call `inference.analyses.register` (site-specific analyses).
    plugins: tuple[str, ...] = ()


class LoggingSettings(_Section):
    """Log verbosity.  Patient names and IDs never appear unless `phi` is true."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    phi: bool = False


class ProducerSettings(_Section):
    """Identity written into every output (Manufacturer, DeviceSerialNumber, InstitutionName)."""

    #: Empty: made for the installation (`Store.installation_serial`), so nodes never share a device identity.
    device_serial_number: str = ""
    institution_name: str | None = None


class HttpToken(_Section):
    """An API / dashboard token; `id` names who used it in the audit trail (the token itself is never logged)."""

    id: str
    token: str = Field(min_length=16)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must be letters, digits, '_', '.', '-' (up to 64), got {value!r}")
        return value


class HttpUser(_Section):
    """A basic-auth user; `password_hash` is what ``dicom-node http hash-password`` prints (PBKDF2-SHA256)."""

    name: str
    password_hash: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must be letters, digits, '_', '.', '-' (up to 64), got {value!r}")
        return value

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, value: str) -> str:
        parts = value.split("$")
        if len(parts) != 4 or parts[0] != "pbkdf2_sha256" or not parts[1].isdigit():
            raise ValueError("must be pbkdf2_sha256$<iterations>$<salt>$<hash> (make one with"
                             " `dicom-node http hash-password`)")
        return value


class HttpSettings(_Section):
    """The operator surface: dashboard, JSON API, /healthz, /readyz, /metrics.

    Without an ``[http]`` section there is no HTTP server (the shipped configuration has one).  Every path
    except /healthz needs one of `tokens` (``Authorization: Bearer``) or `users` (basic auth); with neither
    configured the node creates ``<data_dir>/http-token`` on first start and accepts that token.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8480, ge=0, le=65535)
    tokens: tuple[HttpToken, ...] = ()
    users: tuple[HttpUser, ...] = ()
    #: Show patient name, ID, birth date, accession number and study date (read from the stored files).
    show_phi: bool = False
    #: /readyz fails when the data directory's file system has less free space than this.
    min_free_disk_mb: float = Field(1024.0, ge=0)
    #: Dashboard pages poll the JSON API this often (0 = no auto-refresh).
    refresh_s: float = Field(3.0, ge=0)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty (use 0.0.0.0 for every interface)")
        return value


class Settings(_Section):
    """The whole validated configuration."""

    node: NodeSettings = NodeSettings()
    peers: PeersSettings = PeersSettings()
    destinations: tuple[Destination, ...] = ()
    delivery: DeliverySettings = DeliverySettings()
    rules: tuple[Rule, ...] = ()
    assembly: AssemblySettings = AssemblySettings()
    retention: RetentionSettings = RetentionSettings()
    models: ModelsSettings = ModelsSettings()
    logging: LoggingSettings = LoggingSettings()
    producer: ProducerSettings = ProducerSettings()
    http: HttpSettings = HttpSettings()

    def destination(self, name: str) -> Destination:
        """The destination called `name` (KeyError if none)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def rule_destinations(self, rule: Rule) -> tuple[Destination, ...]:
        """Destinations a rule sends to (every destination when the rule names none)."""
        if rule.destinations is None:
            return self.destinations
        return tuple(self.destination(n) for n in rule.destinations)

    @property
    def data_dir(self) -> Path:
        """Absolute data directory."""
        return self.node.data_dir.expanduser().resolve()


# ----------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line (None / empty = not given)."""

    ae_title: str | None = None
    port: int | None = None
    bind_host: str | None = None
    data_dir: str | None = None
    destinations: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    accept_any: bool | None = None
    log_level: str | None = None
    http_port: int | None = None
    http_token: str | None = None


def default_config_text() -> str:
    """The embedded default configuration (what ``dicom-node serve`` uses without ``--config``)."""
    return resources.files("dicom_node").joinpath("default_node.toml").read_text(encoding="utf-8")


_DEST_SPEC = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def parse_destination_spec(spec: str, name: str | None = None) -> dict[str, Any]:
    """``AET@HOST:PORT`` -> a destination table; raises `ConfigError` naming the spec."""
    m = _DEST_SPEC.match(spec.strip())
    if not m:
        raise ConfigError([f"destination {spec!r}: expected AET@HOST:PORT"], "command line")
    host = m["host"].strip("[]")
    return {"name": name or re.sub(r"[^A-Za-z0-9_.-]", "_", m["aet"]).lower(), "ae_title": m["aet"],
            "host": host, "port": int(m["port"])}


def parse_peer_spec(spec: str) -> dict[str, Any]:
    """``AET[@HOST]`` -> a peer table."""
    aet, _, host = spec.strip().partition("@")
    if not aet:
        raise ConfigError([f"allow {spec!r}: expected AET or AET@HOST"], "command line")
    return {"ae_title": aet, "host": host or None}


#: Environment variables (after ``DICOM_NODE_``) and the keys they set.
_ENV_KEYS: dict[str, tuple[str, str]] = {
    "AE_TITLE": ("node", "ae_title"),
    "BIND_HOST": ("node", "bind_host"),
    "PORT": ("node", "port"),
    "DATA_DIR": ("node", "data_dir"),
    "ACCEPT_ANY": ("peers", "accept_any"),
    "LOG_LEVEL": ("logging", "level"),
    "HTTP_PORT": ("http", "port"),
}


def _env_overrides(env: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for suffix, key in _ENV_KEYS.items():
        text = env.get(ENV_PREFIX + suffix)
        if text is None or text == "":
            continue
        value: Any = text.strip().lower() in ("1", "true", "yes", "on") if key == ("peers", "accept_any") else text
        out.append((key, value))
    return out


def _set(raw: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    section = raw.setdefault(key[0], {})
    if not isinstance(section, dict):
        raise ConfigError([f"{key[0]}: must be a table"])
    section[key[1]] = value


def _merge_overrides(raw: dict[str, Any], env: Mapping[str, str], cli: Overrides) -> dict[str, Any]:
    raw = dict(raw)
    for key, value in _env_overrides(env):
        _set(raw, key, value)
    for key, value in (
        (("node", "ae_title"), cli.ae_title),
        (("node", "port"), cli.port),
        (("node", "bind_host"), cli.bind_host),
        (("node", "data_dir"), cli.data_dir),
        (("peers", "accept_any"), cli.accept_any),
        (("logging", "level"), cli.log_level),
    ):
        if value is not None:
            _set(raw, key, value)
    if cli.http_port is not None:
        # Asking for a port means asking for the server.
        _set(raw, ("http", "port"), cli.http_port)
        _set(raw, ("http", "enabled"), True)
    token = cli.http_token or env.get(ENV_PREFIX + "HTTP_TOKEN") or None
    if token:
        http = dict(raw.get("http") or {})
        http["tokens"] = [*http.get("tokens", []), {"id": "cli" if cli.http_token else "env", "token": token}]
        raw["http"] = http
    if cli.allow:
        peers = dict(raw.get("peers") or {})
        peers["allow"] = [*peers.get("allow", []), *(parse_peer_spec(s) for s in cli.allow)]
        raw["peers"] = peers
    if cli.destinations:
        dests = list(raw.get("destinations") or [])
        taken = {d.get("name") for d in dests if isinstance(d, dict)}
        for spec in cli.destinations:
            table = parse_destination_spec(spec)
            base, n = table["name"], 2
            while table["name"] in taken:
                table["name"] = f"{base}-{n}"
                n += 1
            taken.add(table["name"])
            dests.append(table)
        raw["destinations"] = dests
    return raw


def _key_of(raw: Any, loc: Sequence[int | str]) -> str:
    """Spell a pydantic error location as the TOML key, naming list items by their `name` if they have one."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            try:
                node = node[item]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label += f" ({node['name']})"
            except (IndexError, KeyError, TypeError):
                node = None
            parts.append(label)
        else:
            try:
                node = node.get(item) if isinstance(node, dict) else None
            except AttributeError:
                node = None
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


#: Keys whose values are secrets: problems with them never quote the value.
_SECRET_KEYS = ("token", "password_hash")


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return "unknown key (check the spelling against config/node.toml)"
    if kind == "missing":
        return "is required"
    msg = msg.removeprefix("Value error, ")
    given = err.get("input")
    loc = tuple(err.get("loc") or ())
    if loc and loc[-1] in _SECRET_KEYS:
        return msg  # never echo a secret into a terminal or a log
    if kind not in ("missing",) and not isinstance(given, (dict, list)) and "got" not in msg:
        msg += f", got {given!r}"
    return msg


def _cross_checks(raw: Mapping[str, Any]) -> list[str]:
    """Problems between sections (checked on the raw tables so they are found alongside field errors)."""
    problems: list[str] = []
    dests = raw.get("destinations") or []
    names = [d.get("name") for d in dests if isinstance(d, dict)]
    for i, name in enumerate(names):
        if name is not None and names.index(name) != i:
            problems.append(f"destinations[{i}] ({name}).name: used by more than one destination")
    for i, d in enumerate(dests):
        if isinstance(d, dict) and d.get("tls"):
            for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                value = d.get(key)
                if value and not Path(value).expanduser().is_file():
                    problems.append(f"destinations[{i}] ({d.get('name')}).{key}: file not found: {value}")
    http: dict[str, Any] = raw["http"] if isinstance(raw.get("http"), dict) else {}
    for key, field in (("tokens", "id"), ("users", "name")):
        items = [t.get(field) for t in http.get(key) or [] if isinstance(t, dict)]
        for i, value in enumerate(items):
            if value is not None and items.index(value) != i:
                problems.append(f"http.{key}[{i}].{field}: {value!r} used more than once")
    node: dict[str, Any] = raw["node"] if isinstance(raw.get("node"), dict) else {}
    if http.get("enabled") and http.get("port") not in (None, 0) and http.get("port") == node.get("port", 11112):
        problems.append(f"http.port: {http.get('port')} is also the DICOM port (node.port)")
    rules = raw.get("rules") or []
    rule_names = [r.get("name") for r in rules if isinstance(r, dict)]
    for i, r in enumerate(rules):
        if not isinstance(r, dict):
            continue
        if r.get("name") is not None and rule_names.index(r.get("name")) != i:
            problems.append(f"rules[{i}] ({r.get('name')}).name: used by more than one rule")
        for dest in r.get("destinations") or []:
            if dest not in names:
                problems.append(
                    f"rules[{i}] ({r.get('name')}).destinations: no destination named {dest!r}"
                    f" (defined: {', '.join(map(str, names)) or 'none'})"
                )
    return problems


def validate(raw: Mapping[str, Any], source: str = "configuration") -> Settings:
    """Validate raw tables into `Settings`; raises `ConfigError` listing every problem."""
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose only item failed is also reported "too short": keep the item's error alone.
        deeper = [tuple(e["loc"]) for e in errors]
        for e in errors:
            loc = tuple(e["loc"])
            if e["type"] == "too_short" and any(len(d) > len(loc) and d[: len(loc)] == loc for d in deeper):
                continue
            problems.append(f"{_key_of(raw, loc)}: {_message(e)}")
    problems.extend(_cross_checks(raw))
    if problems or settings is None:
        raise ConfigError(problems, source)
    return settings


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; raises `ConfigError` with the file, line and problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text; raises `ConfigError` naming `source`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], source) from None


def load(config: Path | None = None, *, env: Mapping[str, str] | None = None,
         overrides: Overrides = Overrides()) -> Settings:
    """Read the configuration once: file (or the embedded default) < environment < CLI overrides."""
    env = os.environ if env is None else env
    if config is None and env.get(ENV_PREFIX + "CONFIG"):
        config = Path(env[ENV_PREFIX + "CONFIG"])
    if config is None:
        raw, source = parse_toml(default_config_text(), "embedded default"), "embedded default configuration"
    else:
        raw, source = read_toml(config), str(config)
    given = _override_names(env, overrides)
    if given:
        # A problem may lie in an override, not in the file: the file's name alone would send one looking there.
        source = f"{source} with {', '.join(given)}"
    return validate(_merge_overrides(raw, env, overrides), source)


def _override_names(env: Mapping[str, str], cli: Overrides) -> list[str]:
    """The environment variables and command-line options that override the file, as the user typed them."""
    names = [ENV_PREFIX + s for s in (*_ENV_KEYS, "HTTP_TOKEN") if env.get(ENV_PREFIX + s)]
    flags = {"--ae-title": cli.ae_title, "--port": cli.port, "--bind-host": cli.bind_host, "--data-dir": cli.data_dir,
             "--destination": cli.destinations, "--allow": cli.allow, "--accept-any": cli.accept_any,
             "--http-port": cli.http_port, "--http-token": cli.http_token}
    return names + [flag for flag, value in flags.items() if value not in (None, (), "")]


def problems_for(settings: Settings, available_analyses: Sequence[str]) -> list[str]:
    """What makes a valid file unusable on this installation (``config check`` exits 2): analyses a rule
    names that are not installed (every study the rule selects would fail)."""
    out = []
    for i, rule in enumerate(settings.rules):
        for name in rule.analyses:
            if name not in available_analyses:
                out.append(f"rules[{i}] ({rule.name}).analyses: analysis {name!r} is not installed"
                           f" (installed: {', '.join(available_analyses) or 'none'})")
    return out


def warnings_for(settings: Settings, available_analyses: Sequence[str]) -> list[str]:
    """Things that are valid but probably not what was meant (printed by ``config check``)."""
    out: list[str] = []
    if settings.peers.accept_any and not _is_loopback(settings.node.bind_host):
        out.append(f"peers.accept_any: any calling AE may store to {settings.node.bind_host}:{settings.node.port}")
    if not settings.peers.accept_any and not settings.peers.allow:
        out.append("peers.allow: empty and accept_any is false, so every association will be rejected")
    if not settings.rules:
        out.append("rules: none; every study is stored and recorded 'unrouted', none is analysed")
    node = settings.node
    for dest in settings.destinations:
        if dest.port == node.port and dest.ae_title == node.ae_title and (
                _is_loopback(dest.host) or dest.host in (node.bind_host, "0.0.0.0")):
            out.append(f"destinations ({dest.name}): {dest.address} is this node itself; its outputs would come back to it")
        if dest.seg_format == "binary" and dest.seg_compression == "jpeg2000" and "seg" in dest.outputs:
            out.append(f"destinations ({dest.name}): a BINARY SEG in JPEG 2000 (1 bit per pixel) is read by few"
                       " decoders; seg_format = \"labelmap\" compresses well and is read more widely")
    if not settings.destinations:
        out.append("destinations: none configured; outputs are kept in the data directory only")
    if settings.http.enabled and not _is_loopback(settings.http.host):
        out.append(f"http.host: the dashboard listens on {settings.http.host} without TLS; tokens and passwords"
                   " cross the network in clear text unless a TLS reverse proxy fronts it")
    if settings.http.enabled and settings.http.show_phi:
        out.append("http.show_phi: patient names, IDs and birth dates are shown to every dashboard user")
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
