"""The agent's side of an answer (sans-I/O): the HTTP/1.1 response the proxy writes, decoded
into its head and body (Content-Length, chunked, or until the end), and the size that body
will have in the Lambda response's JSON, so the agent knows before sending whether it fits
inline or must go to S3.

The proxy (``burrow.http.proxy.serve_http``) writes well-formed HTTP; the decoder is still
strict and bounded, since a bug must not become an unbounded buffer.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Final

MAX_HEAD: Final = 64 * 1024
MAX_CHUNK_LINE: Final = 1024
MAX_TRAILERS: Final = 64 * 1024


class DecodeError(ValueError):
    """The response could not be decoded."""


def is_text(headers: list[list[str]] | list[tuple[str, str]]) -> bool:
    """Whether a response body may be returned to API Gateway as text (not base64): a textual
    type without a content coding. The agent uses the same rule to size answers."""
    kind = ""
    for name, value in headers:
        lower = name.lower()
        if lower == "content-encoding" and value.strip().lower() not in ("", "identity"):
            return False
        if lower == "content-type":
            kind = value.split(";", 1)[0].strip().lower()
    return (
        kind.startswith("text/")
        or kind
        in (
            "application/json",
            "application/javascript",
            "application/xml",
            "application/x-www-form-urlencoded",
            "image/svg+xml",
        )
        or kind.endswith(("+json", "+xml"))
    )


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: list[tuple[bytes, bytes]]


class ResponseDecoder:
    """Bytes in; ``Head``, body ``bytes`` and ``None`` (the end) out."""

    def __init__(self, method: str = "GET") -> None:
        self.method = method.upper()
        self._buffer = bytearray()
        self._state = "head"
        self._remaining = 0  # Content-Length or current chunk
        self.done = False

    def feed(self, data: bytes) -> list[Head | bytes | None]:
        self._buffer += data
        out: list[Head | bytes | None] = []
        while not self.done:
            before = (self._state, len(self._buffer))
            self._step(out)
            if (self._state, len(self._buffer)) == before:
                break
        return out

    def eof(self) -> list[Head | bytes | None]:
        """The proxy closed: the end of a close-delimited body; otherwise a cut answer."""
        if self.done:
            return []
        if self._state == "close":
            self.done = True
            return [None]
        raise DecodeError(f"the answer ended early (in {self._state})")

    def _step(self, out: list[Head | bytes | None]) -> None:
        buf = self._buffer
        state = self._state
        if state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise DecodeError("response head over 64 KiB")
                return
            head = self._parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            if 100 <= head.status < 200:
                return  # interim (100 Continue, 103 Early Hints): not relayed
            out.append(head)
            self._body_mode(head)
            if self._state == "none":
                self.done = True
                out.append(None)
        elif state in ("length", "close"):
            if not buf:
                return
            take = len(buf) if state == "close" else min(len(buf), self._remaining)
            out.append(bytes(buf[:take]))
            del buf[:take]
            if state == "length":
                self._remaining -= take
                if self._remaining == 0:
                    self.done = True
                    out.append(None)
        elif state == "chunk-size":
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    raise DecodeError("chunk size line too long")
                return
            line = bytes(buf[:end]).split(b";", 1)[0].strip()
            del buf[: end + 2]
            try:
                size = int(line, 16)
            except ValueError:
                raise DecodeError(f"bad chunk size {line[:20]!r}") from None
            if size < 0:
                raise DecodeError("bad chunk size")
            self._remaining = size
            self._state = "chunk" if size else "trailers"
        elif state == "chunk":
            if not buf:
                return
            take = min(len(buf), self._remaining)
            out.append(bytes(buf[:take]))
            del buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._state = "chunk-end"
        elif state == "chunk-end":
            if len(buf) < 2:
                return
            if buf[:2] != b"\r\n":
                raise DecodeError("chunk not followed by CRLF")
            del buf[:2]
            self._state = "chunk-size"
        elif state == "trailers":
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_TRAILERS:
                    raise DecodeError("trailers too large")
                return
            del buf[: end + 2]
            if end == 0:
                self.done = True
                out.append(None)

    def _parse_head(self, raw: bytes) -> Head:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise DecodeError(f"bad status line {lines[0][:40]!r}")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise DecodeError(f"bad header line {line[:40]!r}")
            headers.append((name, value.strip()))
        return Head(int(parts[1]), headers)

    def _body_mode(self, head: Head) -> None:
        names = {name.lower(): value for name, value in head.headers}
        if self.method == "HEAD" or head.status in (204, 304):
            self._state = "none"
        elif b"chunked" in names.get(b"transfer-encoding", b"").lower():
            self._state = "chunk-size"
        elif b"content-length" in names:
            try:
                self._remaining = int(names[b"content-length"])
            except ValueError:
                raise DecodeError("bad Content-Length") from None
            self._state = "length" if self._remaining else "none"
        else:
            self._state = "close"


# --- the size of a body in a Lambda response ---------------------------------------------------

# Byte classes for the JSON string size of UTF-8 text, escaped as ASCII (the worst the runtime
# may do): 1 plain, 2 short escapes, 6 \u00XX, 0 continuation bytes, 6 or 12 per character.
_CLASSES = bytearray(256)
for _b in range(256):
    if _b in b'"\\\b\f\n\r\t':
        _CLASSES[_b] = 1
    elif _b < 0x20:
        _CLASSES[_b] = 2
    elif _b < 0x80:
        _CLASSES[_b] = 0
    elif _b < 0xC0:
        _CLASSES[_b] = 3
    elif _b < 0xF0:
        _CLASSES[_b] = 4
    else:
        _CLASSES[_b] = 5
_TABLE: Final = bytes(_CLASSES)
_WEIGHTS: Final = (1, 2, 6, 0, 6, 12)


class BodySize:
    """The size a body will take in the Lambda response: as JSON text if it is textual and
    valid UTF-8 (the gateway's rule), else as base64."""

    def __init__(self, text: bool) -> None:
        self.text = text
        self.raw = 0
        self.as_text = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")() if text else None

    def add(self, data: bytes) -> None:
        self.raw += len(data)
        if self._decoder is None:
            return
        try:
            self._decoder.decode(data)
        except UnicodeDecodeError:
            self._decoder = None
            return
        classes = data.translate(_TABLE)
        self.as_text += sum(classes.count(i) * w for i, w in enumerate(_WEIGHTS) if w)

    def finish(self) -> None:
        if self._decoder is not None:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self._decoder = None

    @property
    def encoded(self) -> int:
        if self._decoder is not None:
            return self.as_text + 2
        return (self.raw + 2) // 3 * 4 + 2
