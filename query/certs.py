"""`telemetry-certs`: a private CA, the gateway's server certificate, client certificates.

Mutual TLS on the query port needs three kinds of certificate; this makes them
with the `cryptography` library (no crypto of our own) so an operator needs
neither openssl recipes nor a PKI.  Choices, and why:
- ECDSA P-256 keys with SHA-256 signatures: small, fast on a gateway's CPU,
  accepted by every TLS 1.2+ stack.
- The CA lives 10 years and may only sign end-entity certificates
  (pathlen 0); server certificates 825 days (the longest lifetime common
  clients accept); client certificates 1 year, so a lost laptop ages out.
- Private keys are written 0600 and never printed.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 365
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: no window in which the key is readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: str, issuer: x509.Name | None, public_key, days: int, not_before=None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    start = not_before or (_now() - datetime.timedelta(minutes=5))  # tolerate small clock skew
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(directory: Path, name: str = "gateway-telemetry CA", days: int = CA_DAYS) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(name, None, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_key(directory / "ca.key", key)
    _write_cert(directory / "ca.pem", cert)


def _load_ca(directory: Path):
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise click.ClickException(
            f"{exc.filename} not found: create the CA first with 'telemetry-certs init {directory}'"
        ) from None
    return cert, key


def issue(
    directory: Path,
    stem: str,
    common_name: str,
    *,
    server: bool,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    days: int,
    not_before: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Sign a server or client certificate with the CA in `directory`."""
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca_cert.subject, key.public_key(), days, not_before)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


@contextlib.contextmanager
def _writing(directory: Path):
    """A directory that cannot be made or written is one line (exit 2), not a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or directory
        raise click.BadParameter(f"cannot write {where}: {exc.strerror or exc}", param_hint="DIRECTORY") from None


def _check_ips(ctx, param, values):
    for value in values:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not an IP address") from None
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gateway-telemetry")
def main() -> None:
    """Create the certificates for mutual TLS on the query port.

    \b
    Example:
      telemetry-certs init /etc/gateway-telemetry/tls --dns gw1.example.net --ip 192.0.2.10
      telemetry-certs client /etc/gateway-telemetry/tls alice
      telemetry-certs server /etc/gateway-telemetry/tls --dns gw1.example.net --ip 192.0.2.10
    """


def _server_certificate_options(command):
    """--dns, --ip and --days: what names the gateway in its server certificate, and for how long."""
    command = click.option(
        "--days",
        type=click.IntRange(1, 3650),
        default=SERVER_DAYS,
        show_default=True,
        help="Server certificate lifetime.",
    )(command)
    command = click.option("--ip", multiple=True, callback=_check_ips, help="IP address of the gateway (repeatable).")(
        command
    )
    return click.option("--dns", multiple=True, help="DNS name of the gateway (repeatable).")(command)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_server_certificate_options
@click.option("--force", is_flag=True, help="Replace an existing CA (invalidates every issued certificate).")
def init(directory: Path, dns: tuple[str, ...], ip: tuple[str, ...], days: int, force: bool) -> None:
    """Create a CA and the gateway's server certificate in DIRECTORY.

    Writes ca.pem/ca.key and server.pem/server.key (keys 0600).  Name the
    gateway as clients will address it: every --dns and --ip becomes a
    subjectAltName checked by the client.  Keep ca.key offline if you can.

    \b
    Example:
      telemetry-certs init ./tls --dns localhost --ip 127.0.0.1 --ip ::1
    """
    if not dns and not ip:
        raise click.UsageError("name the gateway with at least one --dns or --ip (clients verify it)")
    if (directory / "ca.key").exists() and not force:
        raise click.ClickException(f"{directory / 'ca.key'} exists: use --force to replace the CA")
    with _writing(directory):
        make_ca(directory)
        issue(directory, "server", (dns or ip)[0], server=True, dns=dns, ips=ip, days=days)
    click.echo(f"wrote {directory}/ca.pem, ca.key, server.pem, server.key", err=True)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_server_certificate_options
def server(directory: Path, dns: tuple[str, ...], ip: tuple[str, ...], days: int) -> None:
    """Renew the server certificate: a new server.pem/server.key from the CA in DIRECTORY.

    The CA stays, so clients need nothing new.  Give the same --dns and --ip
    as at `init` (or new ones); server.key is written 0600 again.

    \b
    Example:
      telemetry-certs server ./tls --dns localhost --ip 127.0.0.1 --ip ::1
    """
    if not dns and not ip:
        raise click.UsageError("name the gateway with at least one --dns or --ip (clients verify it)")
    with _writing(directory):
        cert_path, key_path = issue(directory, "server", (dns or ip)[0], server=True, dns=dns, ips=ip, days=days)
    click.echo(f"wrote {cert_path}, {key_path}", err=True)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option(
    "--days", type=click.IntRange(1, 3650), default=CLIENT_DAYS, show_default=True, help="Client certificate lifetime."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing NAME.key and NAME.pem (the old pair stops "
    "being yours to hand out; it stays valid until it expires).",
)
def client(directory: Path, name: str, days: int, force: bool) -> None:
    """Issue a client certificate NAME.pem/NAME.key signed by the CA in DIRECTORY.

    Hand the person NAME.pem, NAME.key and ca.pem; they pass them to
    telemetry-query as --cert, --key and --ca.

    \b
    Example:
      telemetry-certs client ./tls alice
    """
    if not _NAME_RE.match(name) or name in ("ca", "server"):
        raise click.BadParameter("use 1-64 of [A-Za-z0-9._-], not 'ca' or 'server'", param_hint="NAME")
    existing = [p for p in (directory / f"{name}.key", directory / f"{name}.pem") if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{existing[0]} exists: pick another NAME, or use --force to replace it")
    with _writing(directory):
        cert_path, key_path = issue(directory, name, name, server=False, days=days)
    click.echo(f"wrote {cert_path}, {key_path}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
