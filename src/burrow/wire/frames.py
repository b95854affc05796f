"""The frame codec: a fixed 10-byte header, then a payload whose size is bounded per type.

    +--------+--------+-----------------+-----------------+
    | type:8 | flags:8| stream id:32    | length:32       |  payload (length bytes)
    +--------+--------+-----------------+-----------------+

The decoder keeps at most one incomplete frame, so memory is bounded by the largest payload
allowed for the frame being read; an oversized length is refused as soon as the header is in.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

from burrow.wire.errors import FrameTooLarge, UnknownFrameType

HEADER: Final = struct.Struct(">BBII")
HEADER_SIZE: Final = HEADER.size

#: Largest DATA payload a peer may send; senders use at most ``MAX_DATA_CHUNK``.
MAX_DATA_PAYLOAD: Final = 1 << 20
MAX_DATA_CHUNK: Final = 256 * 1024
#: Largest payload of any frame that carries metadata (handshake, control, open, reset).
MAX_META_PAYLOAD: Final = 16 * 1024


class FrameType(IntEnum):
    DATA = 0x00
    WINDOW = 0x01
    OPEN = 0x02
    ACCEPT = 0x03
    FIN = 0x04
    RESET = 0x05
    PING = 0x06
    PONG = 0x07
    CONTROL = 0x08
    GOAWAY = 0x09
    HELLO = 0x10
    CHALLENGE = 0x11
    AUTH = 0x12
    WELCOME = 0x13
    REJECT = 0x14


#: ``FrameType.DATA`` as a literal, for the compiled hot paths: it compares as a machine int,
#: where the enum member is an attribute lookup and a rich comparison per frame.
DATA_TYPE: Final = 0
#: One method lookup less per read.
_unpack_header: Final = HEADER.unpack_from

_LIMITS: Final[dict[int, int]] = {t.value: MAX_META_PAYLOAD for t in FrameType}
_LIMITS[FrameType.DATA] = MAX_DATA_PAYLOAD
_LIMITS[FrameType.WINDOW] = 4
_LIMITS[FrameType.ACCEPT] = 0
_LIMITS[FrameType.FIN] = 0
_LIMITS[FrameType.PING] = 8
_LIMITS[FrameType.PONG] = 8


def payload_limit(frame_type: int) -> int:
    """The largest payload allowed for ``frame_type``; raise if the type is unknown."""
    try:
        return _LIMITS[frame_type]
    except KeyError:
        raise UnknownFrameType(f"unknown frame type 0x{frame_type:02x}") from None


def encode_header(frame_type: int, stream_id: int, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(frame_type, flags, stream_id, length)


def encode_frame(frame_type: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One whole frame; for DATA, prefer ``encode_header`` and write the payload separately."""
    limit = payload_limit(frame_type)
    if len(payload) > limit:
        raise FrameTooLarge(
            f"{FrameType(frame_type).name} payload of {len(payload)} bytes > {limit}"
        )
    return HEADER.pack(frame_type, 0, stream_id, len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into ``(type, stream_id, payload)`` tuples.

    DATA payloads are streamed: a DATA frame that spans reads comes out as several tuples
    whose payloads add up to the frame's, each a zero-copy ``memoryview`` of the caller's
    bytes, so bulk data is never buffered here. Other frames (at most ``MAX_META_PAYLOAD``)
    are buffered until whole. A consumer that keeps a payload beyond the call must copy it.
    """

    __slots__ = ("_buffer", "_data_remaining", "_data_stream")

    def __init__(self) -> None:
        self._buffer = bytearray()  # a partial header, or a partial non-DATA frame
        self._data_remaining = 0  # bytes of the current DATA payload still to come
        self._data_stream = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (bounded by the header plus one meta payload)."""
        return len(self._buffer)

    def feed(self, data: bytes | memoryview) -> list[tuple[int, int, memoryview | bytes]]:
        frames: list[tuple[int, int, memoryview | bytes]] = []
        view = memoryview(data)
        size = len(view)
        pos = 0
        unpack = _unpack_header
        limits = _LIMITS
        buf = self._buffer
        while pos < size:
            if self._data_remaining:
                take = min(self._data_remaining, size - pos)
                frames.append((DATA_TYPE, self._data_stream, view[pos : pos + take]))
                self._data_remaining -= take
                pos += take
                continue
            if buf:
                if len(buf) < HEADER_SIZE:
                    take = min(HEADER_SIZE - len(buf), size - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < HEADER_SIZE:
                        break
                frame_type, _flags, stream_id, length = unpack(buf, 0)
                self._check(frame_type, length)
                if frame_type == DATA_TYPE:
                    buf.clear()
                    self._start_data(frames, stream_id, length)
                    continue
                take = min(HEADER_SIZE + length - len(buf), size - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) == HEADER_SIZE + length:
                    frames.append((frame_type, stream_id, bytes(buf[HEADER_SIZE:])))
                    buf.clear()
                continue
            if size - pos < HEADER_SIZE:
                buf += view[pos:]
                break
            frame_type, _flags, stream_id, length = unpack(view, pos)
            limit = limits.get(frame_type)
            if limit is None or length > limit:
                self._check(frame_type, length)
            if frame_type == DATA_TYPE:
                pos += HEADER_SIZE
                take = min(length, size - pos)
                if take or not length:
                    frames.append((DATA_TYPE, stream_id, view[pos : pos + take]))
                pos += take
                if take < length:
                    self._data_remaining = length - take
                    self._data_stream = stream_id
                continue
            end = pos + HEADER_SIZE + length
            if end > size:
                buf += view[pos:]
                break
            frames.append((frame_type, stream_id, view[pos + HEADER_SIZE : end]))
            pos = end
        return frames

    def _start_data(
        self, frames: list[tuple[int, int, memoryview | bytes]], stream_id: int, length: int
    ) -> None:
        if length:
            self._data_remaining = length
            self._data_stream = stream_id
        else:
            frames.append((DATA_TYPE, stream_id, b""))

    @staticmethod
    def _check(frame_type: int, length: int) -> None:
        limit = payload_limit(frame_type)
        if length > limit:
            raise FrameTooLarge(
                f"{FrameType(frame_type).name} frame announces {length} bytes > limit {limit}"
            )
