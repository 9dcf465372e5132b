"""DICOM TLS towards a destination: dcmtk storescp with ``+tls`` (server and client certificates)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from nodekit import make_study
from peers import StoreSCP

from dicom_node.scu import OK, TRANSIENT, Item, echo, send_batch
from dicom_node.settings import DeliverySettings, Destination

pytestmark = pytest.mark.e2e


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


@pytest.fixture
def tls_storescp(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    server_key, server_cert = _self_signed(tmp_path, "server")
    client_key, client_cert = _self_signed(tmp_path, "client")
    scp = StoreSCP(tmp_path / "received", extra=["+tls", str(server_key), str(server_cert), "-rc",
                                                  "+cf", str(client_cert)]).start()
    yield scp, {"tls_ca_file": server_cert, "tls_cert_file": client_cert, "tls_key_file": client_key}
    scp.stop()


def test_echo_and_store_over_tls_with_client_certificate(tls_storescp, tmp_path: Path) -> None:
    scp, files = tls_storescp
    dest = Destination(name="tls", ae_title=scp.ae_title, host="localhost", port=scp.port, tls=True, **files)
    policy = DeliverySettings(connect_timeout_s=5)
    ok, message = echo("AINODE", dest, policy)
    assert ok, message
    study = make_study(tmp_path / "in", "tls", images=2)
    items = [Item(p, p, str(pydicom.dcmread(p).SOPClassUID), "1.2.840.10008.1.2.1") for p in study]
    results = send_batch("AINODE", dest, items, policy)
    assert [r.outcome for r in results] == [OK, OK], [r.message for r in results]
    assert len(scp.files()) == 2


def test_tls_with_an_untrusted_server_certificate_fails(tls_storescp, tmp_path: Path) -> None:
    scp, files = tls_storescp
    _, other_ca = _self_signed(tmp_path, "other")
    dest = Destination(name="tls", ae_title=scp.ae_title, host="localhost", port=scp.port, tls=True,
                       tls_ca_file=other_ca, tls_cert_file=files["tls_cert_file"], tls_key_file=files["tls_key_file"])
    ok, message = echo("AINODE", dest, DeliverySettings(connect_timeout_s=5))
    # The handshake fails certificate verification while the port answers: a configuration problem, said so.
    assert not ok and message == (f"TLS with {scp.ae_title}@localhost:{scp.port}: its certificate is not trusted"
                                  " (self-signed certificate): check tls_ca_file"), message
    assert scp.files() == []


def test_tls_towards_a_plain_dicom_port_says_what_to_check(tmp_path: Path) -> None:
    """tls = true on a destination that speaks plain DICOM read 'cannot connect (refused or timed out)', a
    network problem. A plain DICOM port resets the handshake, as an overloaded TLS peer may: it is retried,
    but the message says the port answers and what to check."""
    scp = StoreSCP(tmp_path / "received").start()
    try:
        dest = Destination(name="plain", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port, tls=True)
        study = make_study(tmp_path / "in", "tls-plain", images=1)
        items = [Item(p, p, str(pydicom.dcmread(p).SOPClassUID), "1.2.840.10008.1.2.1") for p in study]
        (result,) = send_batch("AINODE", dest, items, DeliverySettings(connect_timeout_s=5))
        assert result.outcome == TRANSIENT and not result.associated
        assert result.message.startswith(f"TLS handshake with {dest.address} cut") and "speaks DICOM TLS" in result.message
        plain = Destination(name="plain", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)
        assert echo("AINODE", plain, DeliverySettings(connect_timeout_s=5))[0]
    finally:
        scp.stop()
