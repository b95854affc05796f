"""The Redis ladder: TLS first for ``rediss://`` (Redis has no STARTTLS), PING as the hello,
HELLO/AUTH with their NOAUTH / WRONGPASS answers, the server's facts from HELLO, PING timed,
an ECHO payload ladder and the idle test (the server's own ``timeout`` told apart).
"""

from __future__ import annotations

import time

from burrow.doctor import resp
from burrow.doctor.common import (
    LADDER,
    MTU_FIX,
    Options,
    human,
    hung_up,
    idle_dropped,
    idle_hang,
    not_this_service,
    silent,
    step_timeout,
    watch_idle,
)
from burrow.doctor.dial import Dialer
from burrow.doctor.greeting import identify, preview
from burrow.doctor.link import Link
from burrow.doctor.model import Checklist, PhaseFailed
from burrow.doctor.target import Target
from burrow.doctor.tlsprobe import handshake_for


class _Gone(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class RedisProbe:
    def __init__(self, target: Target, dialer: Dialer, checklist: Checklist, options: Options):
        self.t = target
        self.dialer = dialer
        self.cl = checklist
        self.opt = options
        self.link: Link | None = None
        self.reader = resp.ReplyReader()
        self.noauth = False
        self.server: dict[str, resp.Reply] = {}
        self.idle_limit: int | None = None
        self.rtt = 0.0

    async def _call(self, timeout: float, *args: str | bytes) -> resp.Reply:
        assert self.link is not None
        await self.link.send(resp.command(*args), timeout)
        deadline = time.perf_counter() + timeout
        while True:
            reply = self.reader.next()
            if not isinstance(reply, resp._Incomplete):
                return reply
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            try:
                data = await self.link.recv(left)
            except TimeoutError:
                raise
            except OSError:
                raise _Gone("reset") from None
            if not data:
                raise _Gone("eof")
            self.reader.feed(data)

    async def run(self) -> None:
        cl = self.cl
        try:
            await cl.run("dns", self.dialer.resolve)
            await cl.run("dial", self._dial)
            if self.t.scheme == "rediss":
                await cl.run("tls", self._tls)
            await cl.run("hello", self._hello)
            if self.t.scheme != "rediss":
                cl.skip("tls", "redis:// is plaintext (rediss:// for TLS)")
            await cl.run("auth", self._auth)
            await cl.run("session", self._session)
            await cl.run("query", self._query)
            if self.opt.payload:
                await cl.run("payload", self._payload)
            if self.opt.idle:
                await cl.run("idle", self._idle)
        finally:
            if self.link is not None:
                await self.link.close()

    async def _dial(self) -> str:
        self.link, detail = await self.dialer.dial()
        return detail

    async def _tls(self) -> str:
        assert self.link is not None
        result = await handshake_for(
            self.t, self.link, alpn=None, timeout=self.opt.timeout, reopen=self.dialer.fresh
        )
        return result.detail

    async def _hello(self) -> str:
        assert self.link is not None
        timeout = self.opt.timeout
        await self.link.send(resp.command("PING"), timeout)
        try:
            data = await self.link.recv(timeout)
        except TimeoutError:
            raise await silent("Redis", self.dialer, timeout) from None
        except OSError:
            raise await hung_up("Redis", "reset", self.dialer, self.opt.timeout) from None
        if not data:
            raise await hung_up("Redis", "closed", self.dialer, self.opt.timeout)
        if data[0] not in resp.FIRST_BYTES:
            raise not_this_service("Redis", identify(data) or f"an answer {preview(data)}")
        self.reader.feed(data)
        reply = self.reader.next()
        for _ in range(100):
            if not isinstance(reply, resp._Incomplete):
                break
            more = await self.link.recv(timeout)
            if not more:
                raise await hung_up("Redis", "closed", self.dialer, self.opt.timeout)
            self.reader.feed(more)
            reply = self.reader.next()
        if isinstance(reply, resp.ErrorReply):
            if reply.code == "NOAUTH":
                self.noauth = True
                return f"PING answered -{reply.text}: the server requires authentication"
            return f"PING answered -{reply.text}"
        return f"PING answered {reply!r}"

    async def _auth(self) -> str:
        timeout = self.opt.timeout
        password = self.t.password
        if password is None:
            if self.noauth:
                raise PhaseFailed(
                    "NOAUTH: the server requires a password and none was given",
                    "the server requires authentication (requirepass or ACL users) and no "
                    "password was given: every command gets NOAUTH",
                    "put the password in the URL (redis://:PASSWORD@HOST or "
                    "redis://USER:PASSWORD@HOST) or pass --password-env VAR",
                )
            return "no password needed (the default user is open)"
        user = self.t.user or "default"
        try:
            reply = await self._call(timeout, "HELLO", "3", "AUTH", user, password)
            method = "HELLO 3 AUTH"
            if (
                isinstance(reply, resp.ErrorReply)
                and reply.code in ("ERR", "NOPROTO")
                and ("unknown command" in reply.text.lower() or reply.code == "NOPROTO")
            ):
                method = "AUTH"
                args = ("AUTH", password) if not self.t.user else ("AUTH", user, password)
                reply = await self._call(timeout, *args)
        except TimeoutError:
            raise PhaseFailed(
                f"no answer to authentication within {timeout:g} s",
                "the server does not answer",
                "check the server",
            ) from None
        except _Gone as gone:
            raise PhaseFailed(
                f"connection {gone.how} during authentication",
                "the server hung up on authentication",
                "check its log",
            ) from None
        if isinstance(reply, resp.ErrorReply):
            if reply.code == "WRONGPASS":
                raise PhaseFailed(
                    f"{method}: -{reply.text}",
                    f"wrong password for Redis user {user!r} (or the user does not exist or is "
                    f"disabled): -{reply.text}",
                    "check the password in the URL or --password-env; with ACLs, the user name "
                    "too (ACL USERS lists them)",
                )
            if "without any password configured" in reply.text or "no password is set" in (
                reply.text
            ):
                raise PhaseFailed(
                    f"{method}: -{reply.text}",
                    "a password was given but the server has none configured",
                    "drop the password from the URL, or set requirepass on the server",
                )
            raise PhaseFailed(
                f"{method}: -{reply.text}",
                f"authentication failed: -{reply.text}",
                "see the server's message",
            )
        if isinstance(reply, dict):
            self.server = reply
        tls = "over TLS" if self.link is not None and self.link.tls else "in plaintext"
        return f"{method}: authenticated as {user} {tls}"

    async def _session(self) -> str:
        timeout = self.opt.timeout
        try:
            if not self.server:
                reply = await self._call(timeout, "HELLO", "3")
                if isinstance(reply, dict):
                    self.server = reply
            limit = await self._call(timeout, "CONFIG", "GET", "timeout")
        except (TimeoutError, _Gone):
            raise PhaseFailed(
                "no answer after authentication", "the session does not answer", "check the server"
            ) from None
        if isinstance(limit, dict | list):
            values = list(limit.values()) if isinstance(limit, dict) else limit[1::2]
            if values and isinstance(values[0], bytes) and values[0].isdigit():
                self.idle_limit = int(values[0])
        s = self.server
        if s:
            facts = [f"{_text(s.get('server')) or 'redis'} {_text(s.get('version'))}".strip()]
            proto, mode, role = (_text(s.get(k)) for k in ("proto", "mode", "role"))
            facts.append(f"RESP{proto}, mode {mode}, role {role}")
        else:
            facts = ["a server without HELLO (Redis older than 6)"]
        if self.idle_limit is not None:
            facts.append(f"timeout {self.idle_limit} s" if self.idle_limit else "no idle timeout")
        return ", ".join(facts)

    async def _query(self) -> str:
        start = time.perf_counter()
        try:
            reply = await self._call(self.opt.timeout, "PING")
        except TimeoutError:
            raise PhaseFailed(
                f"PING got no answer within {self.opt.timeout:g} s",
                "the server does not answer PING",
                "check its load",
            ) from None
        except _Gone as gone:
            raise PhaseFailed(
                f"connection {gone.how} on PING", "the connection died", "check the server's log"
            ) from None
        self.rtt = time.perf_counter() - start
        if isinstance(reply, resp.ErrorReply):
            raise PhaseFailed(f"PING: -{reply.text}", f"PING failed: -{reply.text}", "see it")
        return f"PING round trip {self.rtt * 1000:.1f} ms"

    async def _payload(self) -> str:
        last = 0
        for size in LADDER:
            blob = b"x" * size
            timeout = step_timeout(2 * size, self.rtt, self.opt.timeout)
            try:
                reply = await self._call(timeout, "ECHO", blob)
            except TimeoutError:
                raise PhaseFailed(
                    f"ECHO of {human(size)} stalled (no answer in {timeout:.1f} s); "
                    + (f"{human(last)} passed" if last else "nothing passed"),
                    f"transfers of {human(size)} stall while smaller ones pass: the mark of a "
                    "path-MTU blackhole",
                    MTU_FIX,
                ) from None
            except _Gone as gone:
                raise PhaseFailed(
                    f"connection {gone.how} on ECHO of {human(size)}",
                    f"the path drops the connection on {human(size)}",
                    MTU_FIX,
                ) from None
            if reply != blob:
                detail = f"-{reply.text}" if isinstance(reply, resp.ErrorReply) else "altered"
                raise PhaseFailed(
                    f"ECHO of {human(size)}: {detail}",
                    f"ECHO of {human(size)} failed: {detail}",
                    "see the reply",
                )
            last = size
        return f"ECHO {human(LADDER[0])} to {human(LADDER[-1])}, {len(LADDER)} sizes (each way)"

    async def _idle(self) -> str:
        assert self.link is not None and self.opt.idle is not None
        idle, timeout = self.opt.idle, self.opt.timeout
        _, after, how = await watch_idle(self.link, idle)
        if how != "quiet":
            raise self._closed(after, how)
        try:
            reply = await self._call(timeout, "PING")
        except TimeoutError:
            raise idle_hang(idle, timeout) from None
        except _Gone as gone:
            raise self._closed(idle, gone.how) from None
        if isinstance(reply, resp.ErrorReply):
            raise PhaseFailed(
                f"after {idle:g} s idle: -{reply.text}",
                f"PING after idle failed: -{reply.text}",
                "see the reply",
            )
        return f"idle {idle:g} s, then PING answered"

    def _closed(self, after: float, how: str) -> PhaseFailed:
        how = "reset" if how == "reset" else "closed"
        if self.idle_limit and after >= self.idle_limit - 1:
            return PhaseFailed(
                f"connection {how} after {after:.1f} s idle (server timeout {self.idle_limit} s)",
                f"the server's own timeout setting ({self.idle_limit} s) closes idle clients",
                "raise or zero the server's timeout, or have the client ping more often",
            )
        return idle_dropped(after, how, after)


def _text(value: resp.Reply) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
