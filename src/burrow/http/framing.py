"""How an HTTP/1.1 message's body is delimited (RFC 9112 §6.3), as pure functions over heads:
no streams, no clock, no sockets.

A message whose length two parsers could read differently is how requests are smuggled: a
front that frames by Transfer-Encoding and a back end that trusts Content-Length see different
requests in the same bytes. So the rules here are strict. A request carrying both headers, two
different lengths, or a Transfer-Encoding whose last coding is not chunked (once) is refused
with 400, and the proxy then closes the connection. A response carrying both is framed by
Transfer-Encoding and loses its Content-Length before it is passed on (RFC 9112 §6.3 ¶3).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple

Header = tuple[bytes, bytes]

#: Longest Content-Length accepted (h11's limit too): 10**18 bytes is beyond any real body.
MAX_LENGTH_DIGITS = 18


class Body(enum.Enum):
    """The four ways a message body ends."""

    NONE = "no body"
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # the chunked coding's last chunk
    UNTIL_CLOSE = "until close"  # the sender closes the connection (responses only)


class Framing(NamedTuple):
    """A message's framing: ``body``; ``length`` for ``Body.LENGTH``; ``close`` when the sender
    ends the connection after this message (``Connection: close``)."""

    body: Body
    length: int = 0
    close: bool = False


class FramingError(ValueError):
    """The body's length cannot be trusted; ``str()`` says why in one line."""


NO_BODY = Framing(Body.NONE)
CHUNKED = Framing(Body.CHUNKED)


def request_framing(headers: Iterable[Header], http_version: bytes = b"1.1") -> Framing:
    """How a request's body ends; ``FramingError`` when it is ambiguous (answer 400 and close):
    Transfer-Encoding with Content-Length, Transfer-Encoding on HTTP/1.0 (RFC 9112 §6.1), a
    last coding other than chunked or chunked twice, Content-Length values that differ or are
    not a number."""
    lengths, codings, close = _scan(headers)
    if codings is not None:
        if http_version != b"1.1":
            raise FramingError(
                f"an HTTP/{http_version.decode('latin-1')} request cannot carry "
                "Transfer-Encoding (RFC 9112 §6.1)"
            )
        if lengths:
            raise FramingError(
                "the request carries both Transfer-Encoding and Content-Length, which two "
                "servers could read as different requests (RFC 9112 §6.3); send only one"
            )
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            raise FramingError(
                "the request's Transfer-Encoding must end in chunked, used once (RFC 9112 §6.3)"
            )
        return Framing(Body.CHUNKED, close=close)
    if lengths:
        return Framing(Body.LENGTH, _length(lengths, "request"), close)
    return Framing(Body.NONE, close=close)


def response_framing(headers: Iterable[Header], method: bytes, status: int) -> Framing:
    """How a response to ``method`` ends (RFC 9112 §6.3 ¶1-7); ``FramingError`` when its
    Content-Length cannot be trusted. With Transfer-Encoding, Content-Length is ignored (pass
    the head through ``without_length`` before relaying it)."""
    lengths, codings, close = _scan(headers)
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return Framing(Body.NONE, close=close)
    if method == b"CONNECT" and status < 300:
        return Framing(Body.NONE, close=close)  # a tunnel follows, not a body
    if codings is not None:
        if codings and codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
            return Framing(Body.CHUNKED, close=close)
        return Framing(Body.UNTIL_CLOSE, close=True)
    if lengths:
        return Framing(Body.LENGTH, _length(lengths, "response"), close)
    return Framing(Body.UNTIL_CLOSE, close=True)


def without_length(headers: list[Header]) -> list[Header]:
    """``headers`` without Content-Length when Transfer-Encoding is also there (the same list
    when it is not): what an intermediary must forward (RFC 9112 §6.3 ¶3)."""
    names = {name.lower() for name, _ in headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return [(n, v) for n, v in headers if n.lower() != b"content-length"]
    return headers


def _scan(headers: Iterable[Header]) -> tuple[set[bytes], list[bytes] | None, bool]:
    """(Content-Length values, Transfer-Encoding codings or None without the header, whether
    Connection says close), in one pass."""
    lengths: set[bytes] = set()
    codings: list[bytes] | None = None
    close = False
    for name, value in headers:
        low = name.lower()
        if low == b"content-length":
            lengths.update(part.strip() for part in value.split(b","))
        elif low == b"transfer-encoding":
            if codings is None:
                codings = []
            for part in value.split(b","):
                coding = part.split(b";", 1)[0].strip().lower()
                if coding:
                    codings.append(coding)
        elif low == b"connection":
            close = close or any(t.strip().lower() == b"close" for t in value.split(b","))
    return lengths, codings, close


def _length(lengths: set[bytes], what: str) -> int:
    if len(lengths) > 1:
        raise FramingError(f"the {what} carries Content-Length values that differ")
    (value,) = lengths
    if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
        raise FramingError(f"the {what}'s Content-Length is not a number of bytes")
    return int(value)
