"""The generic ladders: ``tcp://`` (resolve, dial, name whatever greets) and ``http(s)://``
(TLS for https, then a GET: the status line as the hello, the whole answer as the query).
"""

from __future__ import annotations

import time
from typing import Final

from burrow.doctor.common import Options, closed_at_once, hung_up, not_this_service
from burrow.doctor.dial import Dialer
from burrow.doctor.greeting import identify, preview
from burrow.doctor.link import Link
from burrow.doctor.model import Checklist, PhaseFailed
from burrow.doctor.target import Target
from burrow.doctor.tlsprobe import handshake_for

GREETING_WAIT: Final = 1.0
MAX_HEAD: Final = 64 * 1024
MAX_BODY: Final = 8 << 20  # read and counted, not kept


class TcpProbe:
    def __init__(self, target: Target, dialer: Dialer, checklist: Checklist, options: Options):
        self.t = target
        self.dialer = dialer
        self.cl = checklist
        self.opt = options
        self.link: Link | None = None

    async def run(self) -> None:
        try:
            await self.cl.run("dns", self.dialer.resolve)
            await self.cl.run("dial", self._dial)
            await self.cl.run("hello", self._hello)
        finally:
            if self.link is not None:
                await self.link.close()

    async def _dial(self) -> str:
        self.link, detail = await self.dialer.dial()
        return detail

    async def _hello(self) -> str:
        assert self.link is not None
        wait = min(self.opt.timeout, GREETING_WAIT)
        try:
            data = await self.link.recv(wait)
        except TimeoutError:
            return (
                f"no greeting within {wait:g} s: a service where the client speaks first "
                "(PostgreSQL, Redis, HTTP, TLS ...)"
            )
        except OSError:
            raise closed_at_once("a service", "reset", self.dialer.via.kind) from None
        if not data:
            raise closed_at_once("a service", "closed", self.dialer.via.kind)
        return f"greeted by {identify(data) or 'an unknown service'}: {preview(data)}"


class HttpProbe:
    def __init__(self, target: Target, dialer: Dialer, checklist: Checklist, options: Options):
        self.t = target
        self.dialer = dialer
        self.cl = checklist
        self.opt = options
        self.link: Link | None = None
        self.head = b""
        self.sent_at = 0.0

    async def run(self) -> None:
        cl = self.cl
        try:
            await cl.run("dns", self.dialer.resolve)
            await cl.run("dial", self._dial)
            if self.t.scheme == "https":
                await cl.run("tls", self._tls)
            await cl.run("hello", self._hello)
            await cl.run("query", self._query)
        finally:
            if self.link is not None:
                await self.link.close()

    async def _dial(self) -> str:
        self.link, detail = await self.dialer.dial()
        return detail

    async def _tls(self) -> str:
        assert self.link is not None
        result = await handshake_for(
            self.t, self.link, alpn=["http/1.1"], timeout=self.opt.timeout, reopen=self.dialer.fresh
        )
        return result.detail

    async def _hello(self) -> str:
        assert self.link is not None
        t = self.t
        default = 443 if t.scheme == "https" else 80
        host = t.host if t.port == default else t.hostport
        request = (
            f"GET {t.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: burrow-doctor\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode()
        self.sent_at = time.perf_counter()
        await self.link.send(request, self.opt.timeout)
        for _ in range(1024):
            try:
                data = await self.link.recv(self.opt.timeout)
            except TimeoutError:
                raise PhaseFailed(
                    f"no answer to GET within {self.opt.timeout:g} s"
                    + (f" (got {preview(self.head)})" if self.head else ""),
                    "the server accepted the connection but does not answer HTTP",
                    "check what listens on this port (TLS? use https://) and the app's health",
                ) from None
            except OSError:
                raise await hung_up("HTTP", "reset", self.dialer, self.opt.timeout) from None
            if not data:
                if self.head:
                    break
                raise await hung_up("HTTP", "closed", self.dialer, self.opt.timeout)
            self.head += data
            if not b"HTTP/".startswith(self.head[:5]):
                other = identify(self.head) or f"a service that answered {preview(self.head)}"
                raise not_this_service("HTTP", other)
            if b"\r\n\r\n" in self.head or len(self.head) > MAX_HEAD:
                break
        status = self.head.split(b"\r\n", 1)[0].decode("latin-1")
        ms = (time.perf_counter() - self.sent_at) * 1000
        return f"{status} (first byte after {ms:.1f} ms)"

    async def _query(self) -> str:
        assert self.link is not None
        head, _, body = self.head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        received = len(body)
        for _ in range(100_000):
            if received > MAX_BODY:
                break
            try:
                data = await self.link.recv(self.opt.timeout)
            except TimeoutError:
                break
            except OSError:
                break
            if not data:
                break
            received += len(data)
        ms = (time.perf_counter() - self.sent_at) * 1000
        server = headers.get("server")
        detail = (
            f"GET {self.t.path} → {lines[0].split(' ', 1)[-1]}, {received} bytes in {ms:.1f} ms"
            + (f", server {server}" if server else "")
        )
        if code >= 500:
            error = headers.get("burrow-error") or headers.get("tailscale-connect-error")
            raise PhaseFailed(
                detail,
                f"the server answered {lines[0].split(' ', 1)[-1]}"
                + (f" ({error})" if error else "")
                + (
                    ": a proxy or gateway in front of the app could not reach it"
                    if code in (502, 503, 504)
                    else ": the application failed"
                ),
                "check the application behind the proxy (its logs, its health, the upstream "
                "address the proxy uses)",
            )
        return detail
