"""RFC 6455 WebSocket framing, sans-I/O: frames to bytes and bytes to frames, with a limit per
frame checked at the header and a limit per reassembled message.

The Lambda side needs a WebSocket client with nothing but the standard library (the HTTP
handler holds a connection to its own API); the emulator needs a server that closes exactly
where API Gateway does (a frame over 32 KB or a message over 128 KB: 1009; a binary frame:
1003). Both use this codec; the agent uses the ``websockets`` library, so each side of the
emulator is checked against an independent implementation.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Final

CONT: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
_DATA: Final = frozenset({CONT, TEXT, BINARY})
_CONTROL: Final = frozenset({CLOSE, PING, PONG})
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Close codes (RFC 6455 §7.4.1).
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
UNSUPPORTED: Final = 1003
INVALID_DATA: Final = 1007
TOO_BIG: Final = 1009


class WsError(Exception):
    """The peer broke the framing; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


def _xor(data: bytes, mask: bytes) -> bytes:
    """Mask or unmask in C speed: one big-integer XOR instead of a loop per byte."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool) -> bytes:
    """One frame; clients mask (``masked``), servers do not."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if masked:
        mask = os.urandom(4)
        return bytes(head) + mask + _xor(payload, mask)
    return bytes(head) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


class FrameParser:
    """Bytes in, frames out. ``masked`` is what the peer must do (a server parses masked
    client frames); a frame whose payload is over ``max_frame`` raises 1009 at its header."""

    def __init__(self, *, masked: bool, max_frame: int) -> None:
        self.masked = masked
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        out: list[Frame] = []
        while True:
            frame = self._one()
            if frame is None:
                return out
            out.append(frame)

    def _one(self) -> Frame | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        if first & 0x70:
            raise WsError(PROTOCOL_ERROR, "reserved bits set without an extension")
        opcode = first & 0x0F
        if opcode not in _DATA and opcode not in _CONTROL:
            raise WsError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        masked = bool(second & 0x80)
        if masked != self.masked:
            raise WsError(PROTOCOL_ERROR, "frame masking is wrong for this side")
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = struct.unpack_from("!H", buf, 2)[0]
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = struct.unpack_from("!Q", buf, 2)[0]
            offset = 10
        fin = bool(first & 0x80)
        if opcode in _CONTROL and (length > 125 or not fin):
            raise WsError(PROTOCOL_ERROR, "control frames are short and unfragmented")
        if length > self.max_frame:
            raise WsError(TOO_BIG, f"frame of {length} bytes is over {self.max_frame}")
        mask = b""
        if masked:
            if len(buf) < offset + 4:
                return None
            mask = bytes(buf[offset : offset + 4])
            offset += 4
        if len(buf) < offset + length:
            return None
        body = bytes(buf[offset : offset + length])
        del buf[: offset + length]
        return Frame(fin, opcode, _xor(body, mask) if masked else body)


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message (``opcode`` TEXT or BINARY) or a control frame."""

    opcode: int
    data: bytes


class Assembler:
    """Frames in, messages out: fragments joined, a message over ``max_message`` raises 1009;
    control frames pass through between fragments."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._opcode: int | None = None
        self._parts: list[bytes] = []
        self._size = 0

    def push(self, frame: Frame) -> Message | None:
        if frame.opcode in _CONTROL:
            return Message(frame.opcode, frame.payload)
        if frame.opcode == CONT:
            if self._opcode is None:
                raise WsError(PROTOCOL_ERROR, "continuation without a message")
        elif self._opcode is not None:
            raise WsError(PROTOCOL_ERROR, "new message before the last one ended")
        else:
            self._opcode = frame.opcode
        self._size += len(frame.payload)
        if self._size > self.max_message:
            raise WsError(TOO_BIG, f"message over {self.max_message} bytes")
        self._parts.append(frame.payload)
        if not frame.fin:
            return None
        message = Message(self._opcode, b"".join(self._parts))
        self._opcode, self._parts, self._size = None, [], 0
        return message


# --- the opening handshake ---------------------------------------------------------------------


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def client_request(host: str, path: str, key: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(head: bytes, key: str) -> tuple[int, str]:
    """``(status, reason)`` of the server's answer; 101 only if the accept key matches."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise WsError(PROTOCOL_ERROR, "not an HTTP answer to the upgrade")
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    if status == 101:
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("sec-websocket-accept") != accept_key(key):
            raise WsError(PROTOCOL_ERROR, "the server's Sec-WebSocket-Accept does not match")
    return status, reason
