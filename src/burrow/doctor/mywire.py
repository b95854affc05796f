"""The MySQL/MariaDB client/server packets the doctor needs, sans-I/O.

A packet is ``length:3 (LE) seq:1 payload``. The server speaks first (HandshakeV10, or an ERR
packet when it refuses the host); the doctor answers with an SSLRequest when TLS is wanted, then
HandshakeResponse41, and follows AuthSwitch / AuthMoreData for the two password plugins.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

CLIENT_LONG_PASSWORD: Final = 0x1
CLIENT_CONNECT_WITH_DB: Final = 0x8
CLIENT_PROTOCOL_41: Final = 0x200
CLIENT_SSL: Final = 0x800
CLIENT_TRANSACTIONS: Final = 0x2000
CLIENT_SECURE_CONNECTION: Final = 0x8000
CLIENT_MULTI_RESULTS: Final = 0x20000
CLIENT_PLUGIN_AUTH: Final = 0x80000
CLIENT_PLUGIN_AUTH_LENENC: Final = 0x200000

BASE_CAPABILITIES: Final = (
    CLIENT_LONG_PASSWORD
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
)
MAX_PACKET: Final = (1 << 20) + 4096  # the payload ladder's largest row, plus framing
CHARSET_UTF8MB4: Final = 45

NATIVE: Final = "mysql_native_password"
CACHING_SHA2: Final = "caching_sha2_password"


class MyWireError(Exception):
    """The bytes are not a well-formed MySQL packet (or one larger than the doctor accepts)."""


class PacketReader:
    """Splits the stream into (seq, payload); holds at most one incomplete packet."""

    def __init__(self, limit: int = MAX_PACKET) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[int, bytes] | None:
        if len(self._buf) < 4:
            return None
        length = self._buf[0] | self._buf[1] << 8 | self._buf[2] << 16
        if length > self._limit:
            raise MyWireError(f"packet of {length} bytes is over the limit")
        if len(self._buf) < 4 + length:
            return None
        seq = self._buf[3]
        payload = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        return seq, payload


def packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes((seq & 0xFF,)) + payload


@dataclass(frozen=True, slots=True)
class Handshake:
    protocol: int
    server_version: str
    connection_id: int
    capabilities: int
    charset: int
    scramble: bytes
    auth_plugin: str

    @property
    def offers_tls(self) -> bool:
        return bool(self.capabilities & CLIENT_SSL)

    @property
    def product(self) -> str:
        """``MariaDB 10.11.6`` or ``MySQL 8.0.36`` (MariaDB's ``5.5.5-`` prefix dropped)."""
        version = self.server_version.removeprefix("5.5.5-")
        if "mariadb" in version.lower():
            return f"MariaDB {version.split('-')[0]}"
        return f"MySQL {version}"


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ERR packet: error number, SQLSTATE and message."""

    code: int
    sqlstate: str
    message: str

    def describe(self) -> str:
        return f"error {self.code} ({self.sqlstate or 'HY000'}): {self.message}"


def is_err(payload: bytes) -> bool:
    return payload[:1] == b"\xff"


def is_ok(payload: bytes) -> bool:
    return payload[:1] == b"\x00"


def is_eof(payload: bytes) -> bool:
    return payload[:1] == b"\xfe" and len(payload) < 9


def parse_err(payload: bytes) -> ServerError:
    if len(payload) < 3 or payload[0] != 0xFF:
        raise MyWireError("not an ERR packet")
    (code,) = struct.unpack_from("<H", payload, 1)
    rest = payload[3:]
    state = ""
    if rest[:1] == b"#" and len(rest) >= 6:
        state, rest = rest[1:6].decode("ascii", "replace"), rest[6:]
    return ServerError(code, state, rest.decode("utf-8", "replace"))


def parse_handshake(payload: bytes) -> Handshake:
    """HandshakeV10; raises MyWireError on anything else (an ERR is the caller's to check)."""
    if not payload or payload[0] != 10:
        raise MyWireError("not a HandshakeV10 packet")
    end = payload.find(b"\0", 1)
    if end < 0 or len(payload) < end + 1 + 4 + 8 + 1 + 2:
        raise MyWireError("truncated handshake")
    version = payload[1:end].decode("utf-8", "replace")
    pos = end + 1
    (conn_id,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    scramble = payload[pos : pos + 8]
    pos += 9  # 8 bytes + filler
    (caps_low,) = struct.unpack_from("<H", payload, pos)
    pos += 2
    charset, caps_high, auth_len = 0, 0, 0
    if len(payload) >= pos + 1 + 2 + 2 + 1 + 10:
        charset = payload[pos]
        (caps_high,) = struct.unpack_from("<H", payload, pos + 3)
        auth_len = payload[pos + 5]
        pos += 16
    caps = caps_low | caps_high << 16
    plugin = ""
    if caps & CLIENT_SECURE_CONNECTION:
        part2 = max(13, auth_len - 8)
        scramble += payload[pos : pos + part2].rstrip(b"\0")
        pos += part2
    if caps & CLIENT_PLUGIN_AUTH:
        plugin = payload[pos:].split(b"\0", 1)[0].decode("ascii", "replace")
    return Handshake(10, version, conn_id, caps, charset, scramble[:20], plugin or NATIVE)


def ssl_request(capabilities: int, seq: int = 1) -> bytes:
    payload = struct.pack("<IIB23s", capabilities | CLIENT_SSL, MAX_PACKET, CHARSET_UTF8MB4, b"")
    return packet(seq, payload)


def handshake_response(
    capabilities: int,
    user: str,
    auth: bytes,
    plugin: str,
    database: str | None,
    seq: int,
) -> bytes:
    caps = capabilities | (CLIENT_CONNECT_WITH_DB if database else 0)
    payload = struct.pack("<IIB23s", caps, MAX_PACKET, CHARSET_UTF8MB4, b"")
    payload += user.encode() + b"\0" + bytes((len(auth),)) + auth
    if database:
        payload += database.encode() + b"\0"
    payload += plugin.encode() + b"\0"
    return packet(seq, payload)


def scramble_native(password: str, nonce: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw)))."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password.encode()).digest()
    stage2 = hashlib.sha1(stage1).digest()
    mix = hashlib.sha1(nonce[:20] + stage2).digest()
    return bytes(a ^ b for a, b in zip(stage1, mix, strict=True))


def scramble_sha2(password: str, nonce: bytes) -> bytes:
    """caching_sha2_password fast path: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)."""
    if not password:
        return b""
    p1 = hashlib.sha256(password.encode()).digest()
    p2 = hashlib.sha256(p1).digest()
    mix = hashlib.sha256(p2 + nonce[:20]).digest()
    return bytes(a ^ b for a, b in zip(p1, mix, strict=True))


def scramble_for(plugin: str, password: str, nonce: bytes) -> bytes | None:
    """The auth response for ``plugin``, None when the doctor does not speak it."""
    if plugin == NATIVE:
        return scramble_native(password, nonce)
    if plugin == CACHING_SHA2:
        return scramble_sha2(password, nonce)
    return None


def parse_auth_switch(payload: bytes) -> tuple[str, bytes]:
    """AuthSwitchRequest (0xFE): (plugin, new nonce)."""
    name, _, data = payload[1:].partition(b"\0")
    return name.decode("ascii", "replace"), data.rstrip(b"\0")


def rsa_encrypt_password(password: str, nonce: bytes, pem: bytes) -> bytes:
    """caching_sha2 full auth without TLS: (password + NUL) XOR nonce, RSA-OAEP with the
    server's public key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise MyWireError("the server's public key is not RSA")
    raw = password.encode() + b"\0"
    mixed = bytes(b ^ nonce[i % len(nonce)] for i, b in enumerate(raw))
    return key.encrypt(
        mixed, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    )


def com_query(sql: str) -> bytes:
    return packet(0, b"\x03" + sql.encode())


def com_quit() -> bytes:
    return packet(0, b"\x01")


def lenenc(data: bytes, pos: int) -> tuple[int | None, int]:
    """A length-encoded integer at ``pos``: (value, next position); None for NULL (0xFB)."""
    if pos >= len(data):
        raise MyWireError("truncated length-encoded integer")
    first = data[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFB:
        return None, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > len(data):
        raise MyWireError("bad length-encoded integer")
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def parse_text_row(payload: bytes) -> list[bytes | None]:
    values: list[bytes | None] = []
    pos = 0
    while pos < len(payload):
        size, pos = lenenc(payload, pos)
        if size is None:
            values.append(None)
            continue
        if pos + size > len(payload):
            raise MyWireError("truncated row value")
        values.append(payload[pos : pos + size])
        pos += size
    return values
