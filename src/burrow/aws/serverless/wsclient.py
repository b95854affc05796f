"""A blocking WebSocket client on the standard library, for the HTTP handler's own connection
to the relay's WebSocket API (a Lambda container handles one request at a time, so blocking
is the simple and cheap choice; the framing is ``wsframes``)."""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from typing import Final
from urllib.parse import urlsplit

from burrow.aws.serverless import wsframes
from burrow.aws.serverless.protocol import AWS_MAX_MESSAGE, SEND_FRAME, frames

MAX_HEAD: Final = 16 * 1024
READ: Final = 256 * 1024


class WsClosed(ConnectionError):
    """The connection ended (``code`` from the close frame, 1006 if none came)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class WsRefused(ConnectionError):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"websocket upgrade refused with HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


class WsClient:
    """One client connection: ``send_text``, ``recv`` (text messages), ``close``."""

    def __init__(self, url: str, headers: dict[str, str], *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a WebSocket URL: {url!r}")
        self.url = url
        self.host = parts.netloc
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        raw = socket.create_connection((parts.hostname, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        if parts.scheme == "wss":
            context = ssl.create_default_context()
            self.sock = context.wrap_socket(raw, server_hostname=parts.hostname)
        self.closed = False
        self.opened_at = time.monotonic()
        self.last_active = self.opened_at
        self.last_sent = self.opened_at  # API Gateway's idle limit counts what clients send
        self._parser = wsframes.FrameParser(masked=False, max_frame=AWS_MAX_MESSAGE)
        self._assembler = wsframes.Assembler(AWS_MAX_MESSAGE)
        self._messages: deque[str] = deque()
        try:
            self._handshake(parts.path or "/", headers, timeout)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, path: str, headers: dict[str, str], timeout: float) -> None:
        key = wsframes.new_key()
        self.sock.sendall(wsframes.client_request(self.host, path, key, headers))
        buffer = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD or time.monotonic() > deadline:
                raise wsframes.WsError(wsframes.PROTOCOL_ERROR, "no answer to the upgrade")
            chunk = self.sock.recv(READ)
            if not chunk:
                raise WsClosed(1006, "closed during the upgrade")
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        status, _ = wsframes.parse_response_head(head + b"\r\n", key)
        if status != 101:
            raise WsRefused(status, rest.decode("utf-8", "replace"))
        if rest:
            self._feed(rest)

    # --- sending --------------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """One message, fragmented into frames of at most ``SEND_FRAME`` bytes."""
        parts = frames(text, SEND_FRAME)
        out = bytearray()
        for i, part in enumerate(parts):
            opcode = wsframes.TEXT if i == 0 else wsframes.CONT
            out += wsframes.encode_frame(
                opcode, part.encode("ascii"), fin=i == len(parts) - 1, masked=True
            )
        self._send(bytes(out))

    def _send(self, data: bytes) -> None:
        if self.closed:
            raise WsClosed(1006, "already closed")
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.closed = True
            raise WsClosed(1006, str(exc)) from None
        self.last_active = self.last_sent = time.monotonic()

    # --- receiving ------------------------------------------------------------------------------

    def recv(self, timeout: float) -> str | None:
        """The next text message, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._messages:
            if self.closed:
                raise WsClosed(1006, "closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(READ)
            except (TimeoutError, ssl.SSLWantReadError):
                return None
            except OSError as exc:
                self.closed = True
                raise WsClosed(1006, str(exc)) from None
            if not data:
                self.closed = True
                raise WsClosed(1006, "the server closed the connection")
            self._feed(data)
        return self._messages.popleft()

    def alive(self) -> bool:
        """Whether the connection still looks open, reading whatever already arrived (after a
        Lambda freeze, a close from the server waits unread in the socket)."""
        if self.closed:
            return False
        try:
            self.sock.settimeout(0)
            for _ in range(64):  # bounded: what arrived while frozen is a few frames at most
                data = self.sock.recv(READ)
                if not data:
                    self.closed = True
                    return False
                self._feed(data)
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except (OSError, WsClosed):
            self.closed = True
        return not self.closed

    def _feed(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            for frame in self._parser.feed(data):
                message = self._assembler.push(frame)
                if message is None:
                    continue
                if message.opcode == wsframes.TEXT:
                    self._messages.append(message.data.decode("utf-8", "replace"))
                elif message.opcode == wsframes.PING:
                    self._send(wsframes.encode_frame(wsframes.PONG, message.data, masked=True))
                elif message.opcode == wsframes.CLOSE:
                    code = int.from_bytes(message.data[:2], "big") if message.data else 1005
                    self.close(code if code in (1000, 1001) else 1000)
                    if not self._messages:
                        raise WsClosed(code, message.data[2:].decode("utf-8", "replace"))
        except wsframes.WsError as exc:
            self.close(exc.code)
            raise WsClosed(exc.code, exc.reason) from None

    def close(self, code: int = wsframes.NORMAL) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(
                wsframes.encode_frame(wsframes.CLOSE, wsframes.close_payload(code), masked=True)
            )
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
