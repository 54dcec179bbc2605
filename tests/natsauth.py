"""NATS identities for the auth tests, made here with the `nkeys` package nats-py depends on.

An NKey is an ed25519 key pair; its seed is the 32-byte private seed with a
two-byte prefix (seed and role), a CRC-16 and base32 (`SU...` for a user), its
public key the role prefix, the verify key, a CRC-16, base32 (`U...`).  For
decentralized auth (a creds file) the server trusts an operator JWT; it signs
an account JWT (JetStream enabled, no limits), which signs a user JWT: each a
JWT whose header is {"typ":"JWT","alg":"ed25519-nkey"} and whose signature is
ed25519 over "header.payload" by the issuer's key (nats-io/jwt v2).  The server
loads the account from a MEMORY resolver preloaded in its configuration.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass

import nkeys


@dataclass(frozen=True)
class Identity:
    seed: str  # SU..., SA..., SO...: the secret
    public: str  # U..., A..., O...

    def sign(self, data: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return kp.sign(data)
        finally:
            kp.wipe()


def identity(prefix: int = nkeys.PREFIX_BYTE_USER) -> Identity:
    """A fresh key pair of this role (nkeys.PREFIX_BYTE_USER, _ACCOUNT, _OPERATOR)."""
    seed = nkeys.encode_seed(os.urandom(32), prefix).decode()
    kp = nkeys.from_seed(bytearray(seed.encode()))
    try:
        return Identity(seed, kp.public_key.decode())
    finally:
        kp.wipe()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(issuer: Identity, subject: str, name: str, nats: dict) -> str:
    claims = {"jti": "", "iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject, "nats": nats}
    # the id the Go library writes: base32 of SHA-512/256 over the claims without it
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{head}.{body}.{_b64(issuer.sign(f'{head}.{body}'.encode()))}"


UNLIMITED_ACCOUNT = {
    "limits": {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    },
    "default_permissions": {"pub": {}, "sub": {}},
    "type": "account",
    "version": 2,
}


@dataclass(frozen=True)
class Operator:
    """An operator, one account with JetStream, and users of it; `server_conf` trusts them."""

    operator: Identity
    account: Identity
    system: Identity
    jwts: dict[str, str]  # the operator's and each account's, by public key

    @classmethod
    def make(cls) -> Operator:
        op = identity(nkeys.PREFIX_BYTE_OPERATOR)
        acc = identity(nkeys.PREFIX_BYTE_ACCOUNT)
        system = identity(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs the server's system account
        jwts = {
            op.public: jwt(op, op.public, "fleet-operator", {"type": "operator", "version": 2}),
            acc.public: jwt(op, acc.public, "telemetry", UNLIMITED_ACCOUNT),
            system.public: jwt(op, system.public, "SYS", {"type": "account", "version": 2}),
        }
        return cls(op, acc, system, jwts)

    def server_conf(self) -> str:
        preload = ", ".join(f'{k}: "{self.jwts[k]}"' for k in (self.account.public, self.system.public))
        return (
            f'operator: "{self.jwts[self.operator.public]}"\nsystem_account: {self.system.public}\n'
            f"resolver: MEMORY\nresolver_preload: {{ {preload} }}\n"
        )

    def creds(self, name: str, signer: Identity | None = None) -> tuple[str, Identity]:
        """A user's creds file text (its JWT, signed by the account unless `signer` says
        otherwise, and its seed, as `nsc generate creds` writes it), and the user."""
        user = identity()
        nats = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}
        token = jwt(signer or self.account, user.public, name, nats)
        text = (
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n"
        )
        return text, user
