"""Signed wire v1 datagrams: HMAC-SHA-256-128 over the exact bytes sent. No sockets, no clock.

A signed datagram is one msgpack array `[key_id, body, tag]` whose `body` is a
plain v1 map, byte for byte as `wire.encode` (or a C encoder) wrote it, and
whose `tag` is HMAC-SHA-256(key, every byte before the tag), truncated to 16
bytes (RFC 4868's HMAC-SHA-256-128).  The envelope sits at fixed offsets, so
`verify` finds the body by slicing, authenticates before anything parses the
body, and compares tags in constant time.  Replay protection from (boot, seq)
is collector/replay.py's job; docs/PROTOCOL.md ("Signed datagrams") is the contract,
with a test vector.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat

from . import wire
from .errors import ConfigError, DecodeError, EncodeError

SIGNED_MARKER = 0x93  # fixarray of 3: a plain v1 datagram starts with a map header instead
TAG_BYTES = 16  # RFC 4868 HMAC-SHA-256-128; RFC 2104 section 5: keep at least half the hash
_TAG_HEADER = b"\xc4\x10"  # bin8, 16 bytes
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64  # SHA-256's block size: longer keys would only be hashed down
MAX_KEY_ID_BYTES = 64
# Key ids: the sensor id alphabet plus "@", which sensor ids cannot contain, so
# "s1@2026" can only be a key of sensor "s1" (see key_allows).
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._:/@-]{1,64}\Z")
_KEY_LINE_RE = re.compile(r"\s*([^=\s]+)\s*=\s*([0-9A-Fa-f]+)\s*\Z")

# Reasons a signed datagram is rejected before its body is decoded; the body
# then gets wire.REASONS, and decode_signed adds "wrong_key" (a key used for
# another sensor's id).  "replayed" is the replay window's verdict, not ours.
REASONS = ("too_large", "not_signed", "bad_envelope", "unknown_key", "bad_mac", "wrong_key")

_MAX_KEY_FILE_BYTES = 1 << 20  # ~10000 keys; a bigger file is a wrong path, not a key file

# Smallest envelope: 93, fixstr(1) key id, a 1-byte body, c4 10, tag.
_MIN_SIGNED_BYTES = 1 + 2 + 1 + 2 + TAG_BYTES


def _key_id_header(key_id: bytes) -> bytes:
    # The smallest str form, as every msgpack encoder writes it: fixstr up to
    # 31 bytes, str8 from 32.  Only these two are accepted on the wire.
    n = len(key_id)
    return bytes((0xA0 | n,)) if n < 32 else bytes((0xD9, n))


def _tag(key: bytes, signed_part: bytes) -> bytes:
    return hmac.digest(key, signed_part, hashlib.sha256)[:TAG_BYTES]


def sign(body: bytes, key_id: str, key: bytes) -> bytes:
    """Wrap a plain v1 datagram `body` into a signed datagram.

    `body` is not re-encoded or checked beyond its size (the simulator may
    sign deliberately bad bodies); the collector decodes it after verifying.
    """
    if type(key_id) is not str or _KEY_ID_RE.match(key_id) is None:
        raise EncodeError(f"key id {key_id!r:.80} must be 1-64 of [A-Za-z0-9._:/@-]")
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise EncodeError(f"key must be {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes, not {len(key)}")
    if not body:
        raise EncodeError("empty body")
    kid = key_id.encode("ascii")
    signed_part = b"".join((b"\x93", _key_id_header(kid), kid, body, _TAG_HEADER))
    data = signed_part + _tag(key, signed_part)
    if len(data) > wire.MAX_DATAGRAM_BYTES:
        raise EncodeError(f"signed datagram is {len(data)} bytes, over {wire.MAX_DATAGRAM_BYTES}")
    return data


def verify(data: bytes, keyring: dict[str, bytes]) -> tuple[bytes, str]:
    """Authenticate a signed datagram: returns (body bytes, key id) or raises DecodeError.

    Nothing of the body is parsed here; pass it to wire.decode (or use
    decode_signed, which also checks which sensor the key may speak for).
    """
    n = len(data)
    if n > wire.MAX_DATAGRAM_BYTES:
        raise DecodeError("too_large", f"{n} bytes > {wire.MAX_DATAGRAM_BYTES}")
    if n == 0 or data[0] != SIGNED_MARKER:
        raise DecodeError("not_signed", "not a signed datagram (first byte is not 0x93)")
    h = data[1] if n > 1 else 0
    if 0xA1 <= h <= 0xBF:  # fixstr of 1-31 bytes
        kid_start, kid_len = 2, h & 0x1F
    elif h == 0xD9 and n > 2 and 32 <= data[2] <= MAX_KEY_ID_BYTES:  # str8 of 32-64 bytes
        kid_start, kid_len = 3, data[2]
    else:
        raise DecodeError("bad_envelope", "key id is not a 1-64 byte str in its smallest form")
    body_start = kid_start + kid_len
    tag_start = n - TAG_BYTES
    if n < _MIN_SIGNED_BYTES or body_start + 1 > tag_start - 2 or data[tag_start - 2 : tag_start] != _TAG_HEADER:
        raise DecodeError("bad_envelope", "no 16-byte bin tag after the body")
    try:
        key_id = bytes(data[kid_start:body_start]).decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("bad_envelope", "key id is not ASCII") from None
    if _KEY_ID_RE.match(key_id) is None:
        raise DecodeError("bad_envelope", f"bad key id {key_id!r}")
    key = keyring.get(key_id)
    if key is None:
        raise DecodeError("unknown_key", f"no key {key_id!r}")
    if not hmac.compare_digest(_tag(key, data[:tag_start]), data[tag_start:]):
        raise DecodeError("bad_mac", f"tag does not match key {key_id!r}")
    return bytes(data[body_start : tag_start - 2]), key_id


def refuse_plain(data: bytes) -> DecodeError:
    """The verdict on a plain datagram when signatures are required (--require-auth).

    The size check comes first, as for every datagram (docs/PROTOCOL.md,
    "Verification"): an oversized plain datagram is `too_large`, not
    `not_signed`, so the counters say what an operator must look at.
    """
    n = len(data)
    if n > wire.MAX_DATAGRAM_BYTES:
        return DecodeError("too_large", f"{n} bytes > {wire.MAX_DATAGRAM_BYTES}")
    return DecodeError("not_signed", "a plain datagram, and --require-auth is on")


def key_allows(key_id: str, sensor: str) -> bool:
    """A key speaks for one sensor: its id is the sensor id, optionally + "@" + a suffix."""
    return key_id.partition("@")[0] == sensor


def decode_signed(data: bytes, keyring: dict[str, bytes]) -> tuple[wire.Datagram, str]:
    """verify, then wire.decode the body, then check the key may speak for its sensor.

    Raises DecodeError with a reason from REASONS or wire.REASONS; a signed
    datagram without `boot` is "bad_boot", because replay protection needs it.
    """
    body, key_id = verify(data, keyring)
    datagram = wire.decode(body)
    if not key_allows(key_id, datagram.sensor):
        raise DecodeError("wrong_key", f"key {key_id!r} may not sign for {datagram.sensor!r}")
    if datagram.boot is None:
        raise DecodeError("bad_boot", "a signed datagram must carry boot")
    return datagram, key_id


def parse_key(text: str) -> bytes:
    """A key from its hex form (as on the command line or in the key file)."""
    text = text.strip()
    if len(text) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", text):
        raise ConfigError("a key must be an even number of hex digits")
    key = bytes.fromhex(text)
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(
            f"a key must be {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes "
            f"({2 * MIN_KEY_BYTES}-{2 * MAX_KEY_BYTES} hex digits), not {len(key)}"
        )
    return key


def load_keys(path: str | os.PathLike) -> dict[str, bytes]:
    """Read a key file: one `key_id = hex` per line, `#` comments and blank lines allowed.

    Refuses a file that others may read or anyone but its owner may write (as
    ssh does for private keys).  Error messages name the file and line, never
    a key.  Returns a new dict, so a reload can swap it in whole.
    """
    try:
        # O_NONBLOCK: a FIFO in place of the file must not hang a start or a reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # the file we read, not whatever the path names later
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"key file {path}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise ConfigError(
                f"key file {path} is mode {mode:04o}, readable or writable by others: run chmod 600 {path}"
            )
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_KEY_FILE_BYTES:
                raise ConfigError(f"key file {path}: over {_MAX_KEY_FILE_BYTES} bytes")
        raw = b"".join(chunks)
    except OSError as exc:
        # A read error (EIO on failing flash) is the file's fault like any
        # other: at start one line and exit 2, on SIGHUP the old keys stay.
        raise ConfigError(f"key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    from .config import decode_utf8

    lines = decode_utf8(raw, f"key file {path}").splitlines()
    keys: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        content = line.split("#", 1)[0]
        if not content.strip():
            continue
        where = f"key file {path} line {number}"
        m = _KEY_LINE_RE.match(content)
        if m is None:
            raise ConfigError(f"{where}: expected `key_id = hex`")
        key_id, hex_key = m.groups()
        if _KEY_ID_RE.match(key_id) is None:
            raise ConfigError(f"{where}: key id must be 1-64 of [A-Za-z0-9._:/@-]")
        if key_id in keys:
            raise ConfigError(f"{where}: key id {key_id} appears twice")
        try:
            keys[key_id] = parse_key(hex_key)
        except ConfigError as exc:
            raise ConfigError(f"{where} (key {key_id}): {exc}") from None
    return keys
