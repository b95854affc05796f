"""Redis's RESP2/RESP3, sans-I/O: commands out, replies in, every size and depth bounded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_BULK: Final = (1 << 20) + 4096  # the payload ladder's largest ECHO
MAX_ITEMS: Final = 1024
MAX_DEPTH: Final = 8
MAX_LINE: Final = 64 * 1024
_AGGREGATES: Final = frozenset(b"*%~>|")
_LINES: Final = frozenset(b"+-:,#_(")
_BULKS: Final = frozenset(b"$!=")
FIRST_BYTES: Final = _AGGREGATES | _LINES | _BULKS


class RespError(Exception):
    """The bytes are not RESP, or a reply is larger or deeper than the doctor accepts."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """``-NOAUTH Authentication required.``: ``code`` is the first word."""

    text: str

    @property
    def code(self) -> str:
        return self.text.split(" ", 1)[0]


Reply = str | bytes | int | float | bool | None | ErrorReply | list["Reply"] | dict[str, "Reply"]


def command(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class ReplyReader:
    """Feed bytes; ``next()`` gives one whole reply, or raises ``NeedMore`` internally."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_BULK + MAX_LINE:
            raise RespError("reply larger than the doctor accepts")

    def next(self) -> Reply | _Incomplete:
        """A reply, or ``INCOMPLETE`` until more bytes arrive."""
        try:
            value, end = self._parse(0, 0)
        except _NeedMore:
            return INCOMPLETE
        del self._buf[:end]
        return value

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE:
                raise RespError("line too long")
            raise _NeedMore
        return bytes(self._buf[pos:end]), end + 2

    def _int(self, raw: bytes) -> int:
        try:
            return int(raw)
        except ValueError:
            raise RespError(f"bad integer {raw[:20]!r}") from None

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if depth > MAX_DEPTH:
            raise RespError("reply nested too deeply")
        if pos >= len(self._buf):
            raise _NeedMore
        kind = self._buf[pos]
        if kind not in FIRST_BYTES:
            raise RespError(f"not RESP: first byte {bytes((kind,))!r}")
        line, nxt = self._line(pos + 1)
        text = line.decode("utf-8", "replace")
        if kind == ord("+"):
            return text, nxt
        if kind == ord("-"):
            return ErrorReply(text), nxt
        if kind == ord(":") or kind == ord("("):
            return self._int(line), nxt
        if kind == ord(","):
            try:
                return float(text), nxt
            except ValueError:
                raise RespError("bad double") from None
        if kind == ord("#"):
            return text == "t", nxt
        if kind == ord("_"):
            return None, nxt
        if kind in _BULKS:
            size = self._int(line)
            if size < 0:
                return None, nxt
            if size > MAX_BULK:
                raise RespError(f"bulk string of {size} bytes is over the limit")
            if len(self._buf) < nxt + size + 2:
                raise _NeedMore
            data = bytes(self._buf[nxt : nxt + size])
            if kind == ord("!"):
                return ErrorReply(data.decode("utf-8", "replace")), nxt + size + 2
            return data, nxt + size + 2
        count = self._int(line)
        if count < 0:
            return None, nxt
        if count > MAX_ITEMS:
            raise RespError(f"aggregate of {count} items is over the limit")
        items: list[Reply] = []
        width = 2 if kind in (ord("%"), ord("|")) else 1
        for _ in range(count * width):
            item, nxt = self._parse(nxt, depth + 1)
            items.append(item)
        if width == 2:
            return {_key(items[i]): items[i + 1] for i in range(0, len(items), 2)}, nxt
        return items, nxt


def _key(value: Reply) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _NeedMore(Exception):
    pass


class _Incomplete:
    def __repr__(self) -> str:
        return "INCOMPLETE"


INCOMPLETE: Final = _Incomplete()
