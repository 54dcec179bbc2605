"""A small blocking client for the query protocol: TLS always verified, requests pipelined.

`QueryClient(host, port, ca=..., cert=..., key=...)` connects on first use;
`request(op, **params)` returns the result or raises ServerError(code,
message); `pipeline([...])` writes many requests in one send and returns the
responses in order.  Trouble reaching or trusting the server is a
ConnectError whose `kind` tells the caller which setting to fix
(dns, connect, verify, hostname, client_cert, tls, timeout, protocol).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from typing import Any

from collector.errors import TelemetryError

from .protocol import MAX_LINE_BYTES

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a 10,000-row page is ~1.5 MB; anything near this is not our server


class ServerError(TelemetryError):
    """The server answered ok=false."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectError(TelemetryError):
    """Cannot reach, trust or be trusted by the server; `kind` names what failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verifying TLS 1.2+ client context: the server's name and chain are always checked."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _tls_failure(exc: ssl.SSLError, host: str) -> ConnectError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or "").lower()
        if "hostname mismatch" in message or "ip address mismatch" in message:
            return ConnectError(
                "hostname", f"the server's certificate is not valid for {host!r} ({exc.verify_message})"
            )
        return ConnectError("verify", f"the server's certificate does not verify: {exc.verify_message}")
    reason = exc.reason or str(exc)
    if isinstance(exc, ssl.SSLEOFError):
        return ConnectError(
            "closed", f"{host} closed the TLS connection without a reason (it may want a client certificate)"
        )
    if reason in (
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    ):
        return ConnectError(
            "client_cert", f"the server refused the TLS handshake ({reason}): it wants a client certificate it trusts"
        )
    if reason in (
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    ):
        return ConnectError("client_cert", f"the server refused our client certificate ({reason})")
    return ConnectError("tls", f"TLS with {host} failed: {reason}")


class QueryClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = 10.0,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._ca, self._cert, self._key = ca, cert, key
        self._context = context
        self._sock: ssl.SSLSocket | None = None
        self._file = None
        self._next_id = 0

    def __enter__(self) -> QueryClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        for path in (self._ca, self._cert, self._key):
            if path is not None and not os.path.isfile(path):
                raise ConnectError("files", f"cannot read {path}: no such file")
        try:
            ctx = self._context or client_context(self._ca, self._cert, self._key)
        except OSError as exc:
            raise ConnectError(
                "files", f"cannot read the CA or client certificate/key: {exc.strerror or exc}"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError("files", f"cannot load the CA or client certificate/key: {exc.reason or exc}") from None
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except socket.gaierror as exc:  # before OSError: the name, not the server, is the problem
            raise ConnectError("dns", f"cannot resolve {self.host!r}: {exc.strerror or exc}") from None
        except UnicodeError:  # the idna codec refuses the name ('a..b', a label over 63 characters)
            raise ConnectError("dns", f"{self.host!r} is not a valid host name") from None
        except TimeoutError:
            raise ConnectError("timeout", f"cannot connect to {self.host}:{self.port}: timed out") from None
        except OSError as exc:
            raise ConnectError("connect", f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        try:
            sock = ctx.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLError as exc:
            raw.close()
            raise _tls_failure(exc, self.host) from None
        except TimeoutError:
            raw.close()
            raise ConnectError("timeout", f"TLS handshake with {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raw.close()
            raise ConnectError(
                "tls", f"TLS handshake with {self.host}:{self.port} failed: {exc.strerror or exc}"
            ) from None
        self._sock = sock
        self._file = sock.makefile("rb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send_raw(self, data: bytes) -> None:
        self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except ssl.SSLError as exc:
            raise _tls_failure(exc, self.host) from None
        except OSError as exc:
            raise ConnectError(
                "connect", f"connection to {self.host}:{self.port} lost: {exc.strerror or exc}"
            ) from None

    def read_response(self) -> dict[str, Any]:
        """The next response line, parsed (a refused client certificate under TLS 1.3 surfaces here)."""
        assert self._file is not None, "send a request first"
        try:
            line = self._file.readline(MAX_RESPONSE_BYTES)
        except ssl.SSLError as exc:
            raise _tls_failure(exc, self.host) from None
        except TimeoutError:
            raise ConnectError("timeout", f"no answer from {self.host}:{self.port} within {self.timeout:g}s") from None
        except OSError as exc:
            raise ConnectError(
                "connect", f"connection to {self.host}:{self.port} lost: {exc.strerror or exc}"
            ) from None
        if not line:
            raise ConnectError(
                "connect", f"{self.host}:{self.port} closed the connection (a client certificate it does not trust?)"
            )
        if not line.endswith(b"\n"):
            raise ConnectError("protocol", f"{self.host}:{self.port} sent an over-long or cut-off response")
        try:
            response = json.loads(line)
        except ValueError:
            raise ConnectError("protocol", f"{self.host}:{self.port} does not speak the query protocol") from None
        if not isinstance(response, dict) or "ok" not in response:
            raise ConnectError("protocol", f"{self.host}:{self.port} does not speak the query protocol")
        return response

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request object and return the whole response object."""
        line = json.dumps(request, allow_nan=False, separators=(",", ":")).encode() + b"\n"
        if len(line) - 1 > MAX_LINE_BYTES:  # the server's limit does not count the newline
            raise ValueError(f"request longer than {MAX_LINE_BYTES} bytes")
        self.send_raw(line)
        return self.read_response()

    def request(self, op: str, **params: Any) -> Any:
        self._next_id += 1
        response = self.call({"op": op, "id": self._next_id, **{k: v for k, v in params.items() if v is not None}})
        if response.get("id") != self._next_id:
            raise ConnectError("protocol", f"response id {response.get('id')!r} does not match request {self._next_id}")
        if not response["ok"]:
            error = response.get("error") or {}
            raise ServerError(str(error.get("code")), str(error.get("message")))
        return response.get("result")

    def set_read_timeout(self, seconds: float | None) -> None:
        """How long read_response waits for a line (a follow waits through quiet periods)."""
        self.connect()
        assert self._sock is not None
        self._sock.settimeout(seconds)

    def pipeline(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write all requests in one send, then read one response per request, in order."""
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in requests)
        self.send_raw(data)
        return [self.read_response() for _ in requests]
