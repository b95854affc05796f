"""The fast path's head parser on byte literals: what it accepts it parses as h11 does, and
whatever h11's grammar refuses (or it is unsure of) comes back as None, for h11 to judge."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.http import fastparse

pytestmark = pytest.mark.timeout(60)


def request(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    return fastparse.parse_request(head, head.find(b"\r\n\r\n") + 4)


def response(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
    return fastparse.parse_response(head, head.find(b"\r\n\r\n") + 4)


def test_a_plain_request_head() -> None:
    head = (
        b"GET /a?b=1 HTTP/1.1\r\nHost: x.example\r\nX-A:  spaced \t\r\nX-Empty:\r\nX-C: a:b\r\n\r\n"
    )
    assert request(head) == (
        b"GET",
        b"/a?b=1",
        [(b"Host", b"x.example"), (b"X-A", b"spaced"), (b"X-Empty", b""), (b"X-C", b"a:b")],
    )


def test_a_plain_response_head_and_one_without_headers() -> None:
    assert response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc") == (
        200,
        b"OK",
        [(b"Content-Length", b"3")],
    )
    assert response(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, b"No Content", [])


@pytest.mark.parametrize(
    "line",
    [
        b"X-A: a\nb",  # a bare LF inside a value
        b"X-A: a\rb",  # a bare CR
        b"X-A: a\x00b",  # NUL
        b"X-A: a\x0bb",  # VT
        b"X-A: a\x0cb",  # FF
        b"X-A: a\r\n folded",  # obs-fold
        b"X-A a",  # no colon
        b": a",  # an empty name
        b"X-A : a",  # a blank before the colon
        b"X(A): a",  # not a token
    ],
)
def test_heads_h11s_grammar_refuses_are_left_to_h11(line: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n"
    assert request(head) is None
    assert response(b"HTTP/1.1 200 OK\r\n" + line + b"\r\n\r\n") is None


#: Host is given once up front: h11 checks its count, a rule of meaning beyond the grammar.
_NAMES = st.sampled_from([b"X-A", b"x_b", b"X A", b"X:A", b"", b"Accept"])
_VALUES = st.binary(max_size=12).map(lambda v: v.replace(b"\r\n", b"")) | st.sampled_from(
    [b" v ", b"\tv", b"a b", b"", b"a\x00", b"\x80\xff"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_NAMES, _VALUES), min_size=1, max_size=5))
def test_what_it_accepts_h11_parses_alike(fields: list[tuple[bytes, bytes]]) -> None:
    head = (
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(n + b":" + v + b"\r\n" for n, v in fields)
        + b"\r\n"
    )
    parsed = request(head)
    if parsed is None:
        return  # h11 judges it (accepting or refusing): nothing to compare
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    event = server.next_event()
    assert isinstance(event, h11.Request), f"fast path accepted what h11 refuses: {head!r}"
    assert [(n.lower(), v) for n, v in parsed[2]] == list(event.headers)
