"""Strict, small HTTP/1.1 head parsing for the proxy's fast path.

Only the plain, common shapes are accepted: an HTTP/1.1 request line or status line followed by
well-formed ``name: value`` lines, CRLF line endings, no folding. Anything else returns ``None``
and the proxy hands the bytes to h11, which then parses (or rejects) them exactly as before. The
grammar is h11's own (``h11._abnf``), so whatever is accepted here h11 would accept alike, with
the same values (optional whitespace around a value stripped).
"""

from __future__ import annotations

import re

Header = tuple[bytes, bytes]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = rb"[^\x00\s]"

_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: ((?:[ \t]|" + _FIELD_VCHAR + rb")*))?\r\n")
#: Header lines as h11's grammar takes them, each ending in CRLF: a token name, a colon, a
#: value of visible characters, spaces and tabs (no CR, LF, NUL, VT or FF: so no obs-fold).
_LINES = re.compile(rb"(?:" + _TOKEN + rb":[^\x00\r\n\x0b\x0c]*\r\n)*")


def parse_request(buf: bytes, end: int) -> tuple[bytes, bytes, list[Header]] | None:
    """``buf[:end]`` is a head ending in CRLF CRLF: (method, target, headers), or None when it
    is not a plain HTTP/1.1 request head."""
    line = _REQUEST_LINE.match(buf, 0, end)
    if line is None:
        return None
    headers = _fields(buf, line.end(), end)
    if headers is None:
        return None
    return line.group(1), line.group(2), headers


def parse_response(buf: bytes, end: int) -> tuple[int, bytes, list[Header]] | None:
    """``buf[:end]`` is a head ending in CRLF CRLF: (status, reason, headers), or None when it
    is not a plain HTTP/1.1 status line and headers."""
    line = _STATUS_LINE.match(buf, 0, end)
    if line is None:
        return None
    headers = _fields(buf, line.end(), end)
    if headers is None:
        return None
    return int(line.group(1)), line.group(2) or b"", headers


def _fields(buf: bytes, start: int, end: int) -> list[Header] | None:
    """The ``name: value`` lines of ``buf[start:end]`` (which ends in the blank line), values
    without surrounding blanks; None unless every line is one h11's grammar accepts: a token
    name, a colon, a value of visible characters, spaces and tabs (so no obs-fold either)."""
    if start == end - 2:
        return []
    # One regex pass (in C) checks every line, so the split below only cuts what it vouched
    # for. (It replaced five ``in`` tests: ``bytes in bytes`` first tries its operand as an int
    # and builds and drops a TypeError each time.)
    if _LINES.fullmatch(buf, start, end - 2) is None:
        return None
    headers: list[Header] = []
    for line in buf[start : end - 4].split(b"\r\n"):
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return headers


def request_head(method: bytes, target: bytes, headers: list[Header]) -> bytes:
    """A request head as h11 writes it (the caller puts Host first)."""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines.extend([name + b": " + value for name, value in headers])
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def response_head(status: int, reason: bytes, headers: list[Header]) -> bytes:
    """A response head as h11 writes it (the caller keeps Host out of responses)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines.extend([name + b": " + value for name, value in headers])
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
