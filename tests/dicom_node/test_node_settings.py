"""Configuration: the shipped files agree, errors name the key, precedence file < env < CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.settings import (
    ConfigError,
    Overrides,
    default_config_text,
    load,
    parse_destination_spec,
    parse_toml,
    problems_for,
    validate,
    warnings_for,
)

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_and_annotated_config_agree() -> None:
    embedded = validate(parse_toml(default_config_text(), "embedded"))
    annotated = load(REPO / "config" / "node.toml", env={})
    assert embedded == annotated


def test_default_routes_spine_radiographs_on_release() -> None:
    settings = load(env={})
    rule = settings.rules[0]
    assert rule.analyses == ("spine-xr",) and rule.complete_on == "association-release"
    assert settings.peers.accept_any and settings.node.bind_host == "127.0.0.1"


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate(raw)
    return err.value.problems


def test_every_problem_names_its_key() -> None:
    problems = _problems({
        "node": {"ae_title": "", "port": "eleven", "max_pdu_bytes": -1},
        "peers": {"allow": [{"host": "10.0.0.1"}]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104, "seg_format": "pretty"},
                         {"name": "pacs", "ae_title": "P2", "host": "h", "port": 105}],
        "rules": [{"name": "r", "analyses": ["a"], "match": [{"modality": "DX", "bogus": 1}]}],
    })
    text = "\n".join(problems)
    for key in ("node.ae_title", "node.port", "node.max_pdu_bytes", "peers.allow[0].ae_title: is required",
                "destinations[0] (pacs).seg_format", "destinations[1] (pacs).name: used by more than one",
                "rules[0] (r).match[0].bogus: unknown key"):
        assert key in text, f"{key!r} not in:\n{text}"


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nae_title = "FROMFILE"\nport = 2000\ndata_dir = "file-data"\n')
    assert load(cfg, env={}).node.ae_title == "FROMFILE"
    env = {"DICOM_NODE_AE_TITLE": "FROMENV", "DICOM_NODE_PORT": "3000"}
    s = load(cfg, env=env)
    assert (s.node.ae_title, s.node.port, str(s.node.data_dir)) == ("FROMENV", 3000, "file-data")
    s = load(cfg, env=env, overrides=Overrides(ae_title="FROMCLI", destinations=("PACS@10.1.2.3:104",),
                                               allow=("MOD1", "MOD2@10.0.0.9"), accept_any=False))
    assert (s.node.ae_title, s.node.port) == ("FROMCLI", 3000)
    assert s.destinations[0].address == "PACS@10.1.2.3:104" and s.destinations[0].name == "pacs"
    assert [(p.ae_title, p.host) for p in s.peers.allow] == [("MOD1", None), ("MOD2", "10.0.0.9")]
    # DICOM_NODE_CONFIG names the file when --config is absent.
    assert load(env={"DICOM_NODE_CONFIG": str(cfg)}).node.ae_title == "FROMFILE"


def test_env_value_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load(env={"DICOM_NODE_PORT": "http"})
    assert err.value.problems[0].startswith("node.port:")
    # The message says the value came from the environment, not only which file was read.
    assert "embedded default configuration with DICOM_NODE_PORT" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(env={}, overrides=Overrides(http_port=11112))
    assert "with --http-port" in str(err.value)


def test_destination_specs() -> None:
    assert parse_destination_spec("ORTHANC@[::1]:4242")["host"] == "::1"
    for bad in ("ORTHANC@host", "@h:1", "A@h:port"):
        with pytest.raises(ConfigError, match="expected AET@HOST:PORT"):
            parse_destination_spec(bad)


def test_settings_are_frozen() -> None:
    s = load(env={})
    with pytest.raises(ValidationError):
        s.node.port = 1  # type: ignore[misc]


def test_warnings_for_risky_but_valid_settings() -> None:
    s = validate({"node": {"bind_host": "0.0.0.0"}, "peers": {"accept_any": True},
                  "rules": [{"name": "r", "analyses": ["nope"], "match": [{"modality": ["DX"]}]}]})
    text = "\n".join(warnings_for(s, ["other"]))
    assert "accept_any" in text and "destinations: none" in text
    assert "rules: none" not in text
    assert "rules: none; every study is stored and recorded 'unrouted'" in "\n".join(warnings_for(validate({}), []))
    # An analysis that is not installed is a problem, not a warning: every study the rule selects would fail.
    assert problems_for(s, ["other"]) == ["rules[0] (r).analyses: analysis 'nope' is not installed (installed: other)"]
    loop = validate({"destinations": [{"name": "self", "ae_title": "AINODE", "host": "127.0.0.1", "port": 11112,
                                       "seg_compression": "jpeg2000"}]})
    text = "\n".join(warnings_for(loop, []))
    assert "is this node itself" in text and "BINARY SEG in JPEG 2000" in text


@pytest.mark.parametrize("host", ["127.0.0.1:104", "10.20.4.312", "pacs host", ""])
def test_a_host_that_is_no_address_or_name_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=r"destinations\[0\] \(pacs\).host"):
        validate({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": host, "port": 104}]})
    with pytest.raises(ConfigError, match=r"peers.allow\[0\].host"):
        validate({"peers": {"allow": [{"ae_title": "PACS", "host": host}]}})


@pytest.mark.parametrize(("host", "stored"), [("pacs.hospital.local", "pacs.hospital.local"), ("pacs_01", "pacs_01"),
                                           ("10.0.0.5", "10.0.0.5"), ("[::1]", "::1"), ("fe80::1", "fe80::1")])
def test_addresses_and_host_names_are_taken_as_the_socket_layer_wants_them(host: str, stored: str) -> None:
    settings = validate({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": host, "port": 104}]})
    assert settings.destinations[0].host == stored


def test_backoff_cannot_end_below_where_it_starts() -> None:
    with pytest.raises(ConfigError, match="backoff_max_s .* is below backoff_initial_s"):
        validate({"delivery": {"backoff_initial_s": 600, "backoff_max_s": 60}})


@pytest.mark.parametrize("example", sorted((REPO / "config" / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_example_configurations_are_valid(example: Path) -> None:
    settings = load(example, env={})
    assert settings.rules and settings.destinations
    assert not settings.peers.accept_any
