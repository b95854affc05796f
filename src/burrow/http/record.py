"""What the HTTP proxy tells the inspector about each request: one ``Exchange`` per request,
filled in as it streams, with bodies kept only up to ``BODY_CAP`` (sizes are always exact)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

BODY_CAP = 1024 * 1024
_ids = itertools.count(1)


def next_id() -> str:
    return f"req_{int(time.time() * 1000):x}_{next(_ids)}"


@dataclass(eq=False)
class Exchange:
    """One request and its response, as seen by the agent."""

    tunnel: str
    method: str
    target: str
    http_version: str
    request_headers: list[tuple[str, str]]
    client: str  # the visitor's address, "IP:PORT"
    id: str = field(default_factory=next_id)
    started: float = field(default_factory=time.time)
    request_body: bytearray = field(default_factory=bytearray)
    request_size: int = 0
    status: int | None = None
    reason: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytearray = field(default_factory=bytearray)
    response_size: int = 0
    duration: float | None = None  # seconds, set when the response ends
    error: str | None = None  # why the exchange failed, if it did
    replay_of: str | None = None

    def add_request_body(self, chunk: bytes | bytearray | memoryview) -> None:
        self.request_size += len(chunk)
        room = BODY_CAP - len(self.request_body)
        if room > 0:
            self.request_body += chunk[:room]

    def add_response_body(self, chunk: bytes | bytearray | memoryview) -> None:
        self.response_size += len(chunk)
        room = BODY_CAP - len(self.response_body)
        if room > 0:
            self.response_body += chunk[:room]

    @property
    def request_truncated(self) -> bool:
        return self.request_size > len(self.request_body)

    @property
    def response_truncated(self) -> bool:
        return self.response_size > len(self.response_body)


class Recorder(Protocol):
    """Receives exchanges; the inspector implements it. Calls come from the event loop."""

    #: Whether the exchanges' headers are read as text (the inspector's are): the proxy decodes
    #: them per request only for a recorder that says so.
    shows_headers: bool

    def begin(self, exchange: Exchange) -> None: ...

    def end(self, exchange: Exchange) -> None: ...


def text_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Headers as an ``Exchange`` keeps them (latin-1, the HTTP/1.1 wire charset)."""
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
