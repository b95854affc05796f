"""Bytes for one stream that wait for the peer's credit: the shared part of every stream writer.

A socket bridge, a relay's join half and a channel all send on a stream the same way: at once
while the stream has credit and the session is not backed up, and otherwise in order once a
WINDOW (or the session's resume) arrives. What waits here is bounded by its owner, which stops
its own source (pauses a socket, withholds a peer's credit, makes ``drain()`` wait) while
anything waits.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from burrow.net.connection import SessionConnection


class Outbox:
    __slots__ = ("_chunks", "conn", "size", "stream_id")

    def __init__(self, conn: SessionConnection, stream_id: int = 0) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._chunks: deque[bytes | memoryview] = deque()
        self.size = 0  # bytes waiting

    def __bool__(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return self.size

    def send(self, data: bytes | memoryview) -> int:
        """Send what credit allows and keep the rest; how many bytes went now. ``data`` must
        stay valid while kept: a view of a reused buffer has to be copied by the caller."""
        sent = 0 if self._chunks else self.conn.send(self.stream_id, data)
        if sent < len(data):
            rest = data[sent:] if sent else data
            self._chunks.append(rest)
            self.size += len(rest)
        return sent

    def pump(self) -> int:
        """Send waiting bytes within the credit; how many went."""
        moved = 0
        chunks = self._chunks
        conn = self.conn
        while chunks:
            chunk = chunks[0]
            sent = conn.send(self.stream_id, chunk)
            moved += sent
            if sent < len(chunk):
                chunks[0] = chunk[sent:]
                break
            chunks.popleft()
        self.size -= moved
        return moved

    def clear(self) -> None:
        self._chunks.clear()
        self.size = 0
