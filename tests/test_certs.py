"""telemetry-certs: the certificates it makes carry a real mutual-TLS handshake."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import threading

import pytest
from click.testing import CliRunner
from cryptography import x509

from query import certs


def make(tmp_path, *args):
    result = CliRunner().invoke(certs.main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture
def tls_dir(tmp_path):
    d = tmp_path / "tls"
    assert make(tmp_path, "init", d, "--dns", "localhost", "--ip", "127.0.0.1").exit_code == 0
    assert make(tmp_path, "client", d, "alice").exit_code == 0
    return d


def handshake(tls_dir, client_cert: str | None) -> str:
    """One mTLS handshake on 127.0.0.1; returns the client CN the server saw."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
    server_ctx.load_verify_locations(tls_dir / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    if client_cert:
        client_ctx.load_cert_chain(tls_dir / f"{client_cert}.pem", tls_dir / f"{client_cert}.key")
    seen: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    subject = dict(x[0] for x in tls.getpeercert()["subject"])
                    seen.append(subject["commonName"])
                    tls.sendall(b"hello\n")
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    data = tls.recv(16)  # TLS 1.3: a refused client cert surfaces here
                    if not data:
                        raise ssl.SSLError("closed")
        finally:
            thread.join(5)
    return seen[0]


def test_server_and_client_certificates_complete_mutual_tls(tls_dir):
    assert handshake(tls_dir, "alice") == "alice"


def test_server_refuses_a_client_without_certificate(tls_dir):
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        handshake(tls_dir, None)


def test_keys_are_private_and_choices_are_as_documented(tls_dir):
    for name in ("ca.key", "server.key", "alice.key"):
        assert stat.S_IMODE((tls_dir / name).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((tls_dir / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    alice = x509.load_pem_x509_certificate((tls_dir / "alice.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    life = server.not_valid_after_utc - server.not_valid_before_utc
    assert life == datetime.timedelta(days=certs.SERVER_DAYS)
    assert alice.not_valid_after_utc - alice.not_valid_before_utc == datetime.timedelta(days=certs.CLIENT_DAYS)
    assert server.public_key().curve.name == "secp256r1"


def test_usage_errors_are_one_line(tmp_path):
    result = make(tmp_path, "init", tmp_path / "x")
    assert result.exit_code == 2 and "at least one --dns or --ip" in result.output
    result = make(tmp_path, "init", tmp_path / "x", "--ip", "not-an-ip")
    assert result.exit_code == 2 and "'not-an-ip' is not an IP address" in result.output
    result = make(tmp_path, "client", tmp_path / "empty", "bob")
    assert result.exit_code == 1 and "create the CA first" in result.output
    assert "Traceback" not in result.output


def test_init_refuses_to_replace_a_ca_by_accident(tls_dir, tmp_path):
    result = make(tmp_path, "init", tls_dir, "--dns", "localhost")
    assert result.exit_code == 1 and "use --force" in result.output


def test_server_renews_the_server_certificate_under_the_same_ca(tls_dir, tmp_path):
    old = x509.load_pem_x509_certificate((tls_dir / "server.pem").read_bytes())
    ca_before = (tls_dir / "ca.pem").read_bytes()
    result = make(tmp_path, "server", tls_dir, "--dns", "localhost", "--ip", "127.0.0.1", "--days", "30")
    assert result.exit_code == 0, result.output
    new = x509.load_pem_x509_certificate((tls_dir / "server.pem").read_bytes())
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc - new.not_valid_before_utc == datetime.timedelta(days=30)
    assert (tls_dir / "ca.pem").read_bytes() == ca_before
    assert stat.S_IMODE((tls_dir / "server.key").stat().st_mode) == 0o600
    assert handshake(tls_dir, "alice") == "alice"  # the old client certificate still works
    result = make(tmp_path, "server", tls_dir)
    assert result.exit_code == 2 and "at least one --dns or --ip" in result.output
    result = make(tmp_path, "server", tmp_path / "empty", "--dns", "localhost")
    assert result.exit_code == 1 and "create the CA first" in result.output


def test_a_directory_that_cannot_be_written_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args in (["init", blocker / "tls", "--dns", "localhost"], ["server", blocker / "tls", "--dns", "localhost"]):
        result = make(tmp_path, *args)
        assert result.exit_code == 2, result.output
        assert f"cannot write {blocker / 'tls'}" in result.output and "Traceback" not in result.output
