"""The broker edge: how both sides connect to NATS, and what a failure means in one line.

Secrets come from files only (password-file, token-file, creds-file,
nkey-seed-file), each refused when others may read it, so they never appear
in a command line (`ps`) or in the environment of a unit; no log line prints
them.  TLS is verified against `ca` (or the system's CAs), TLS 1.2 at least,
with an optional client certificate.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.js.api import StorageType, StreamConfig

from ..errors import ConfigError


@dataclass(frozen=True)
class BrokerSettings:
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    stream: str = "TELEMETRY"
    subject_prefix: str = "telemetry"
    create_stream: bool = True
    replicas: int = 1
    duplicate_window: float = 120.0
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    connect_timeout: float = 5.0


def _private_file(path: str, what: str) -> str:
    """The path of a credentials file that exists, is a file, and that others cannot read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path}: not a regular file")
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(
            f"{what} {path} may be read or written by others: chmod 0640 {path} "
            "(owner root or the service user, group telemetry)"
        )
    return path


def _read_secret(path: str, what: str) -> str:
    _private_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    if not value or "\n" in value:
        raise ConfigError(f"{what} {path}: expected one non-empty line")
    return value


def _user_seed_ok(seed: bytes) -> bool:
    """Whether `seed` is an NKey user seed (SU...: base32 of the seed and user prefixes, 32
    bytes, CRC-16; nkeys.decode_seed does not check the CRC, so it is checked here)."""
    import nkeys

    try:
        raw = base64.b32decode(seed + b"=" * (-len(seed) % 8))
        prefix, key = nkeys.decode_seed(bytes(seed))
    except Exception:  # binascii's errors and nkeys' own: not a seed either way
        return False
    return prefix == nkeys.PREFIX_BYTE_USER and len(key) == 32 and nkeys.crc16_checksum(raw[:-2]) == raw[-2:]


def _nkey_seed_file(path: str) -> str:
    """The path of a private file holding one NKey user seed; checked here, because nats-py
    would otherwise fail the same way on every connect attempt, for ever."""
    _private_file(path, "nkey-seed-file")
    try:
        with open(path, "rb") as f:
            seed = f.read(4096).strip()
    except OSError as exc:
        raise ConfigError(f"nkey-seed-file {path}: cannot read it ({exc.strerror})") from None
    if not _user_seed_ok(seed):
        raise ConfigError(
            f"nkey-seed-file {path}: not an NKey user seed (one line starting SU, as `nk -gen user` or `nsc` writes it)"
        )
    return path


def _creds_file(path: str) -> str:
    """The path of a private NATS credentials file: a user JWT block and a user seed block,
    as `nsc generate creds` writes them (nats-py loops or fails on each connect otherwise)."""
    _private_file(path, "creds-file")
    try:
        with open(path, "rb") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError as exc:
        raise ConfigError(f"creds-file {path}: cannot read it ({exc.strerror})") from None

    def after(marker: bytes) -> bytes | None:
        for i, line in enumerate(lines[:-1]):
            if marker in line:
                return lines[i + 1].strip()
        return None

    jwt, seed = after(b"BEGIN NATS USER JWT"), after(b"BEGIN USER NKEY SEED")
    if not jwt or jwt.count(b".") != 2:
        raise ConfigError(
            f"creds-file {path}: no user JWT (a -----BEGIN NATS USER JWT----- block, as `nsc generate creds` writes)"
        )
    if seed is None or not _user_seed_ok(seed):
        raise ConfigError(f"creds-file {path}: no NKey user seed (a -----BEGIN USER NKEY SEED----- block with SU...)")
    return path


def connect_options(s: BrokerSettings) -> dict:
    """nats.connect keyword arguments for these settings; reads and checks every file (ConfigError)."""
    opts: dict = {}
    methods = [
        n
        for n, v in (
            ("token-file", s.token_file),
            ("creds-file", s.creds_file),
            ("nkey-seed-file", s.nkey_seed_file),
            ("user", s.user),
        )
        if v
    ]
    if len(methods) > 1:
        raise ConfigError(f"choose one way to authenticate, not {' and '.join(methods)}")
    if s.password_file and not s.user:
        raise ConfigError("password-file needs user")
    if s.user:
        opts["user"] = s.user
        if s.password_file:
            opts["password"] = _read_secret(s.password_file, "password-file")
    if s.token_file:
        opts["token"] = _read_secret(s.token_file, "token-file")
    if s.creds_file:
        opts["user_credentials"] = _creds_file(s.creds_file)
    if s.nkey_seed_file:
        opts["nkeys_seed"] = _nkey_seed_file(s.nkey_seed_file)
    if (s.cert is None) != (s.key is None):
        raise ConfigError("cert and key go together (a client certificate and its private key)")
    tls = any(u.startswith("tls://") for u in s.servers) or s.ca or s.cert
    if tls:
        try:
            ctx = ssl.create_default_context(cafile=s.ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.cert:
                _private_file(s.key, "key")
                ctx.load_cert_chain(s.cert, s.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files (ca/cert/key): {exc}") from None
        opts["tls"] = ctx
    for url in s.servers:
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"server {url!r}: write nats://HOST:PORT or tls://HOST:PORT")
    return opts


def explain(exc: BaseException) -> str:
    """One line an operator can act on."""
    text = str(exc).strip() or type(exc).__name__
    low = text.lower()
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate did not verify ({exc.verify_message}): check ca and the server name"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or text}): check ca, cert, key and that the broker speaks TLS"
    if "authorization violation" in low or "authentication" in low or "user authentication" in low:
        return "the broker refused our credentials (authorization violation): check user/password-file, token-file, creds-file, nkey-seed-file"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is nats-server running and listening there?"
    if isinstance(exc, (nats.errors.NoServersError,)):
        return "no broker reachable (every server in 'servers' failed)"
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return "no JetStream stream takes these subjects (create the stream, or set create-stream = true)"
    if isinstance(exc, nats.js.errors.ServiceUnavailableError) or "jetstream not enabled" in low:
        return "JetStream is not available on this broker (start nats-server with -js)"
    if isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError)):
        return "timed out (the broker is slow, unreachable, or not a NATS server)"
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return "the connection to the broker was lost"
    if isinstance(exc, (nats.errors.UnexpectedEOF, ConnectionResetError, EOFError)):
        return "the connection was closed (the broker went away, or it is not a NATS server)"
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or text}"
    if "tls required but the server does not offer it" in low:
        return "the broker does not offer TLS although ca/cert or a tls:// URL asks for it: refusing to send anything in clear"
    if "expecting info" in low or "info message" in low or "protocol" in low:
        return f"the peer does not speak the NATS protocol: it sent no INFO greeting ({text})"
    return f"{type(exc).__name__}: {text}"


class _Client(nats.NATS):
    """nats-py's client, refusing a server that does not offer TLS when we asked for it.

    nats-py 2.16 upgrades to TLS only when the server's INFO says
    tls_required, and otherwise sends CONNECT (credentials included) in clear
    text even for a tls:// URL; this check runs on that INFO, before CONNECT."""

    require_tls = False

    async def _process_info(self, info, initial_connection=False):
        if self.require_tls and not info.get("tls_required"):
            raise nats.errors.Error("nats: TLS required but the server does not offer it")
        return await super()._process_info(info, initial_connection=initial_connection)


async def connect(s: BrokerSettings, opts: dict, name: str, server: str) -> nats.NATS:
    """Connect to one server, without the client's own reconnect logic: the caller
    owns retries (its backoff) and sees every failure."""
    errors: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:
        errors.append(exc)

    nc = _Client()
    nc.require_tls = "tls" in opts
    try:
        await nc.connect(
            servers=[server],
            name=name,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            connect_timeout=s.connect_timeout,
            error_cb=on_error,
            **opts,
        )
        return nc
    except Exception as exc:
        # NoServersError hides the cause; report the first real error seen.
        real = next((e for e in errors if not isinstance(e, nats.errors.NoServersError)), None)
        if isinstance(exc, nats.errors.NoServersError) and real is not None:
            raise real from None
        raise


async def ensure_stream(js, s: BrokerSettings) -> None:
    """The stream exists (created when allowed and missing)."""
    try:
        await js.stream_info(s.stream)
        return
    except nats.js.errors.NotFoundError:
        if not s.create_stream:
            raise ConfigError(
                f"stream {s.stream} does not exist on the broker (create it, or set create-stream = true)"
            ) from None
    await js.add_stream(
        StreamConfig(
            name=s.stream,
            subjects=[f"{s.subject_prefix}.>"],
            duplicate_window=s.duplicate_window,
            num_replicas=s.replicas,
            storage=StorageType.FILE,
        )
    )


async def watchful_sleep(seconds: float, stop: asyncio.Event, notify: Callable[[str], object]) -> None:
    """Wait `seconds`, or less if `stop` is set; pings the systemd watchdog each second
    meanwhile, so a daemon backing off is not taken for a hung one."""
    end = time.monotonic() + seconds
    while not stop.is_set():
        left = end - time.monotonic()
        if left <= 0:
            return
        notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(left, 1.0))
        except TimeoutError:
            pass
