"""The fast path's response framing, on byte literals: no sockets, no event loop."""

from __future__ import annotations

import pytest

from burrow.http.fastpath import _framing as fast_framing
from burrow.http.framing import Body, Framing

H = list[tuple[bytes, bytes]]


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
