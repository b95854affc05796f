"""Body framing rules (RFC 9112 §6.3) and the fast path's response framing, on byte literals:
no sockets, no event loop."""

from __future__ import annotations

import pytest

from burrow.http.fastpath import _framing as fast_framing
from burrow.http.framing import (
    Body,
    Framing,
    FramingError,
    request_framing,
    response_framing,
    without_length,
)

H = list[tuple[bytes, bytes]]


# --- requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], Framing(Body.NONE)),
        ([(b"Content-Length", b"0")], Framing(Body.LENGTH, 0)),
        ([(b"content-length", b"12")], Framing(Body.LENGTH, 12)),
        ([(b"Content-Length", b"12"), (b"Content-Length", b"12")], Framing(Body.LENGTH, 12)),
        ([(b"Content-Length", b"12, 12")], Framing(Body.LENGTH, 12)),
        ([(b"Transfer-Encoding", b"chunked")], Framing(Body.CHUNKED)),
        ([(b"Transfer-Encoding", b"Chunked")], Framing(Body.CHUNKED)),
        ([(b"Transfer-Encoding", b"gzip, chunked")], Framing(Body.CHUNKED)),
        (
            [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
            Framing(Body.CHUNKED),
        ),
        (
            [(b"Content-Length", b"3"), (b"Connection", b"keep-alive, Close")],
            Framing(Body.LENGTH, 3, close=True),
        ),
    ],
)
def test_request_framing_accepts_one_reading(headers: H, expected: Framing) -> None:
    assert request_framing(headers) == expected


@pytest.mark.parametrize(
    ("headers", "version", "why"),
    [
        (
            [(b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked")],
            b"1.1",
            "both Transfer-Encoding and Content-Length",
        ),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"content-length", b"0")],
            b"1.1",
            "both Transfer-Encoding and Content-Length",
        ),
        ([(b"Transfer-Encoding", b"gzip")], b"1.1", "must end in chunked"),
        ([(b"Transfer-Encoding", b"chunked, gzip")], b"1.1", "must end in chunked"),
        ([(b"Transfer-Encoding", b"chunked, chunked")], b"1.1", "must end in chunked"),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
            b"1.1",
            "must end in chunked",
        ),
        ([(b"Transfer-Encoding", b"")], b"1.1", "must end in chunked"),
        ([(b"Transfer-Encoding", b"chunked")], b"1.0", "HTTP/1.0 request cannot carry"),
        ([(b"Content-Length", b"4"), (b"Content-Length", b"40")], b"1.1", "differ"),
        ([(b"Content-Length", b"4, 40")], b"1.1", "differ"),
        ([(b"Content-Length", b"-1")], b"1.1", "not a number"),
        ([(b"Content-Length", b"0x10")], b"1.1", "not a number"),
        ([(b"Content-Length", b"1" * 19)], b"1.1", "not a number"),
    ],
)
def test_request_framing_refuses_what_could_be_read_two_ways(
    headers: H, version: bytes, why: str
) -> None:
    with pytest.raises(FramingError, match=why):
        request_framing(headers, version)


# --- responses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "method", "status", "expected"),
    [
        ([(b"Content-Length", b"5")], b"GET", 200, Framing(Body.LENGTH, 5)),
        ([(b"Content-Length", b"5")], b"HEAD", 200, Framing(Body.NONE)),
        ([], b"GET", 204, Framing(Body.NONE)),
        ([(b"Content-Length", b"5")], b"GET", 304, Framing(Body.NONE)),
        ([], b"GET", 101, Framing(Body.NONE)),
        ([], b"CONNECT", 200, Framing(Body.NONE)),
        ([(b"Transfer-Encoding", b"chunked")], b"GET", 200, Framing(Body.CHUNKED)),
        (
            [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")],
            b"GET",
            200,
            Framing(Body.CHUNKED),
        ),
        ([(b"Transfer-Encoding", b"gzip")], b"GET", 200, Framing(Body.UNTIL_CLOSE, close=True)),
        ([], b"GET", 200, Framing(Body.UNTIL_CLOSE, close=True)),
        (
            [(b"Content-Length", b"5"), (b"Connection", b"close")],
            b"GET",
            200,
            Framing(Body.LENGTH, 5, close=True),
        ),
    ],
)
def test_response_framing(headers: H, method: bytes, status: int, expected: Framing) -> None:
    assert response_framing(headers, method, status) == expected


def test_response_framing_refuses_lengths_that_differ() -> None:
    with pytest.raises(FramingError, match="differ"):
        response_framing([(b"Content-Length", b"5"), (b"Content-Length", b"6")], b"GET", 200)


def test_without_length_drops_content_length_only_beside_transfer_encoding() -> None:
    both: H = [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked"), (b"X", b"1")]
    assert without_length(both) == [(b"Transfer-Encoding", b"chunked"), (b"X", b"1")]
    only_length: H = [(b"Content-Length", b"3"), (b"X", b"1")]
    assert without_length(only_length) is only_length


# --- the fast path's own, stricter reading --------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "method", "status", "expected"),
    [
        ([(b"Content-Length", b"5")], b"GET", 200, Framing(Body.LENGTH, 5)),
        ([(b"Content-Length", b"0")], b"POST", 201, Framing(Body.LENGTH, 0)),
        (
            [(b"Content-Length", b"5"), (b"Connection", b"close")],
            b"GET",
            200,
            Framing(Body.LENGTH, 5, close=True),
        ),
        ([(b"Content-Length", b"5")], b"HEAD", 200, Framing(Body.NONE)),
        ([], b"GET", 204, Framing(Body.NONE)),
        ([(b"Connection", b"close")], b"GET", 304, Framing(Body.NONE, close=True)),
        # Everything else is the h11 engine's.
        ([], b"HEAD", 200, None),
        ([], b"GET", 200, None),
        ([(b"Transfer-Encoding", b"chunked")], b"GET", 200, None),
        ([(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], b"GET", 200, None),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], b"GET", 200, None),
        ([(b"Content-Length", b"5"), (b"Connection", b"upgrade")], b"GET", 200, None),
        ([(b"Content-Length", b"5"), (b"Host", b"x")], b"GET", 200, None),
        ([(b"Content-Length", b"5")], b"GET", 103, None),
        ([(b"Content-Length", b"x")], b"GET", 200, None),
    ],
)
def test_fast_path_response_framing(
    headers: H, method: bytes, status: int, expected: Framing | None
) -> None:
    assert fast_framing(headers, method, status) == expected
