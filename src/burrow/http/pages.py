"""Every answer the agent's proxy makes itself instead of the local service: one ``Fail`` per
kind of failure, its status and its words written once here, so the fast path, the h11 engine
and replay tell a visitor the same thing about the same problem.

The words name the local address and what went wrong, since the visitor cannot see the agent's
log; ``Fail.page()`` renders them with ``burrow.http.policy.error_page``.
"""

from __future__ import annotations

from http import HTTPStatus

from burrow.http.policy import Header, error_page


class Fail(Exception):
    """A response burrow makes itself (502, 504, 400, 421, ...): ``detail`` names the problem."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail

    def page(self) -> tuple[int, list[Header], bytes]:
        """(status, headers, HTML body) of the page the visitor sees."""
        return error_page(self.status, self.title, self.detail)


def phrase(status: int) -> str:
    """The reason phrase of ``status`` ("Error" for codes without one)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _bad_gateway(detail: str) -> Fail:
    return Fail(502, "Bad Gateway", f"burrow: {detail}")


def _gateway_timeout(detail: str) -> Fail:
    return Fail(504, "Gateway Timeout", f"burrow: {detail}")


# --- reaching the local service ----------------------------------------------------------------


def bad_setting(problem: object) -> Fail:
    """A local TLS setting that cannot be used (``--local-ca`` unreadable)."""
    return _bad_gateway(str(problem))


def unresolvable(host: str, why: str | None) -> Fail:
    return _bad_gateway(f"the local host {host!r} does not resolve: {why}")


def untrusted_certificate(where: str, why: str | None) -> Fail:
    return _bad_gateway(
        f"the certificate of the local service at {where} does not verify ({why}); "
        "use --local-ca or --local-insecure"
    )


def tls_failed(where: str, why: object) -> Fail:
    return _bad_gateway(f"TLS with the local service at {where} failed: {why}")


def not_accepted(where: str, seconds: float) -> Fail:
    return _gateway_timeout(
        f"the local service at {where} did not accept the connection within {seconds:g} s"
    )


def refused(where: str) -> Fail:
    return _bad_gateway(f"the local service at {where} refused the connection (is it running?)")


def unreachable(where: str, why: str) -> Fail:
    return _bad_gateway(f"the local service at {where} could not be reached: {why}")


def connection_broke(where: str, why: object) -> Fail:
    return _bad_gateway(f"the connection to the local service at {where} broke: {why}")


# --- the local service's answer ------------------------------------------------------------------


def closed_without_answer(where: str) -> Fail:
    return _bad_gateway(f"the local service at {where} closed the connection without answering")


def no_answer(where: str, seconds: float) -> Fail:
    return _gateway_timeout(f"the local service at {where} did not answer within {seconds:g} s")


def went_silent(where: str, seconds: float | None) -> Fail:
    return _gateway_timeout(f"the local service at {where} sent nothing for {seconds:g} s")


def broken_response(where: str, why: object) -> Fail:
    return _bad_gateway(f"the local service at {where} sent a broken response: {why}")


def body_cut_short(where: str) -> Fail:
    return broken_response(where, "it closed before the whole body")


def ended_early() -> Fail:
    return _bad_gateway("the local service ended the response early")


def unrelayable_request(why: object) -> Fail:
    return _bad_gateway(f"cannot relay this request: {why}")


def unrelayable_response(status: int, why: object) -> Fail:
    return _bad_gateway(f"cannot relay the local service's {status}: {why}")


def unreplayable(why: object) -> Fail:
    return Fail(400, "Bad Request", f"burrow: cannot replay this request: {why}")


# --- the visitor's request ---------------------------------------------------------------------


def bad_framing(why: str) -> Fail:
    """A request whose body length is ambiguous (RFC 9112 §6.3): refused, then closed."""
    return Fail(400, "Bad Request", f"burrow: {why}")


def misdirected(first: bytes, host: bytes) -> Fail:
    """A request for another host on a connection routed by its first request's Host."""
    return Fail(
        421,
        "Misdirected Request",
        f"burrow: this connection was opened for {first.decode('latin-1')!r}, not "
        f"{host.decode('latin-1')!r}; send each host's requests on its own connection",
    )


def bad_head(status: int, why: object) -> Fail:
    """A request head h11 refused (400, 431, ...)."""
    detail = "the request head is over 64 KiB" if status == 431 else str(why)
    return Fail(status, phrase(status), f"burrow: {detail}")


def head_too_slow() -> Fail:
    return Fail(408, "Request Timeout", "burrow: the request head was too slow")


def bad_body(status: int, why: object) -> Fail:
    """A visitor that broke HTTP inside a body (a bad chunk)."""
    return Fail(status, phrase(status), f"burrow: {why}")
