"""The PostgreSQL ladder: SSLRequest answer, TLS, authentication (trust, md5, SCRAM, SCRAM-PLUS
done here, no driver), the session's parameters and cancel key (a pooler shows itself there),
``SELECT 1``, the payload ladder and the idle test; each failure with its SQLSTATE and text.
"""

from __future__ import annotations

import time
from typing import Final

from burrow.doctor import pgwire
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
from burrow.doctor.scram import ScramClient, ScramError, tls_server_end_point
from burrow.doctor.target import Target
from burrow.doctor.tlsprobe import TlsResult, handshake_for

SHOWN_PARAMETERS: Final = ("server_encoding", "client_encoding", "TimeZone", "DateStyle")
NEEDS_TLS: Final = ("require", "verify-ca", "verify-full")
#: Most bytes held for one reply: the doctor's largest answer is one 1 MiB row.
REPLY_BUDGET: Final = 2 * pgwire.MAX_ROW


class _Gone(Exception):
    """The server closed (``how`` = "eof" or "reset") before the expected message."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class PgProbe:
    def __init__(self, target: Target, dialer: Dialer, checklist: Checklist, options: Options):
        self.t = target
        self.dialer = dialer
        self.cl = checklist
        self.opt = options
        self.link: Link | None = None
        self.reader = pgwire.BackendReader()
        self.answer = b""  # the SSLRequest answer byte
        self.startup_sent = False
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None
        self.notices: list[str] = []
        self.rtt = 0.0
        self.pending: list[pgwire.Message] = []  # read ahead by auth, for the session
        self.tls_refused = False  # TLS was required and the server has none: go on in plaintext

    # --- I/O helpers -------------------------------------------------------------------------

    async def _read(self, timeout: float) -> pgwire.Message:
        assert self.link is not None
        if self.pending:
            return self.pending.pop(0)
        deadline = time.perf_counter() + timeout
        while True:
            message = self.reader.next()
            if message is not None:
                return message
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            try:
                data = await self.link.recv(left)
            except (ConnectionError, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    raise
                raise _Gone("reset") from None
            if not data:
                raise _Gone("eof")
            self.reader.feed(data)

    async def _until_ready(self, timeout: float) -> list[pgwire.Message]:
        """Messages up to and including ReadyForQuery; an ErrorResponse is kept, not raised."""
        out: list[pgwire.Message] = []
        held = 0
        deadline = time.perf_counter() + timeout
        for _ in range(10_000):
            message = await self._read(max(0.0, deadline - time.perf_counter()))
            out.append(message)
            held += len(message.body)
            if message.type == b"Z":
                return out
            if held > REPLY_BUDGET:
                break
        raise PhaseFailed(
            "the server sent far more than the doctor's queries ask for",
            "the server floods the connection",
            "check what listens on this port",
        )

    async def _simple(self, sql: str, timeout: float) -> list[pgwire.Message]:
        assert self.link is not None
        await self.link.send(pgwire.query(sql), timeout)
        return await self._until_ready(timeout)

    # --- the ladder --------------------------------------------------------------------------

    async def run(self) -> None:
        cl = self.cl
        try:
            await cl.run("dns", self.dialer.resolve)
            await cl.run("dial", self._dial)
            if self.t.direct_tls:
                cl.skip("hello", "direct TLS (sslnegotiation=direct): no SSLRequest")
            else:
                await cl.run("hello", self._hello)
            await self._tls_phase()
            await cl.run("auth", self._auth)
            await cl.run("session", self._session)
            await cl.run("query", self._query)
            if self.opt.payload:
                await cl.run("payload", self._payload)
            if self.opt.idle:
                await cl.run("idle", self._idle)
        finally:
            if self.link is not None:
                try:
                    await self.link.send(pgwire.terminate(), 0.5)
                except (OSError, TimeoutError):
                    pass
                await self.link.close()

    async def _dial(self) -> str:
        self.link, detail = await self.dialer.dial()
        return detail

    async def _hello(self) -> str:
        assert self.link is not None
        timeout = self.opt.timeout
        if self.t.tls_mode == "disable":
            return await self._hello_plain()
        await self.link.send(pgwire.SSL_REQUEST, timeout)
        try:
            data = await self.link.recv(timeout)
        except TimeoutError:
            raise await silent("PostgreSQL", self.dialer, timeout) from None
        except (ConnectionError, OSError):
            raise await hung_up("PostgreSQL", "reset", self.dialer, self.opt.timeout) from None
        if not data:
            raise await hung_up("PostgreSQL", "closed", self.dialer, self.opt.timeout)
        first = data[:1]
        if first in (b"S", b"N") and len(data) == 1:
            self.answer = first
            if first == b"S":
                return "SSLRequest answered 'S': the server is ready for TLS"
            return "SSLRequest answered 'N': the server has TLS off"
        other = identify(data)
        if other is not None and not other.startswith("a PostgreSQL"):
            raise not_this_service("PostgreSQL", other)
        if first == b"S":
            raise PhaseFailed(
                f"'S' followed by {len(data) - 1} more bytes before TLS",
                "bytes arrived after the server's 'S' and before TLS started: something on the "
                "path injects data (CVE-2021-23222 buffer stuffing)",
                "do not trust this path; find the device that injects bytes",
            )
        if first == b"E":
            raise PhaseFailed(
                "SSLRequest answered with an ErrorResponse (not shown: it is unauthenticated)",
                "the server refused the SSLRequest with an error: a very old PostgreSQL, or a "
                "proxy that does not understand SSLRequest",
                "connect with sslmode=disable to see whether the plain start-up works, and "
                "check what listens on this port",
            )
        raise not_this_service("PostgreSQL", f"a service that answered {preview(data)}")

    async def _hello_plain(self) -> str:
        """sslmode=disable: the StartupMessage is the first thing sent; its answer is the hello."""
        assert self.link is not None
        await self._send_startup()
        try:
            data = await self.link.recv(self.opt.timeout)
        except TimeoutError:
            raise await silent("PostgreSQL", self.dialer, self.opt.timeout) from None
        except (ConnectionError, OSError):
            raise await hung_up("PostgreSQL", "reset", self.dialer, self.opt.timeout) from None
        if not data:
            raise await hung_up("PostgreSQL", "closed", self.dialer, self.opt.timeout)
        if data[:1] not in (b"R", b"E", b"v"):
            other = identify(data) or f"a service that answered {preview(data)}"
            raise not_this_service("PostgreSQL", other)
        self.reader.feed(data)
        return f"StartupMessage answered with {data[:1].decode()!r} (sslmode=disable: no TLS asked)"

    async def _tls_phase(self) -> None:
        t, cl = self.t, self.cl
        if t.direct_tls:
            await cl.run("tls", self._tls)
            return
        if t.tls_mode == "disable":
            cl.skip("tls", "sslmode=disable")
            return
        if self.answer == b"S":
            await cl.run("tls", self._tls)
            return
        if t.tls_mode in NEEDS_TLS:

            async def refuse() -> str:
                raise PhaseFailed(
                    f"the server answered 'N' (TLS off) and sslmode={t.tls_mode} requires TLS",
                    f"the server has TLS turned off (ssl = off) but sslmode={t.tls_mode} "
                    "requires it; libpq reports this as 'server does not support SSL, but SSL "
                    "was required'",
                    "turn TLS on in postgresql.conf (ssl = on, ssl_cert_file, ssl_key_file) and "
                    "reload; or, where the path is already encrypted (burrow's session, a VPN; "
                    "`burrow pg` answers 'N' by design), use sslmode=prefer or disable",
                    go_on=True,  # the login in plaintext still tells whether the rest works
                )

            await cl.run("tls", refuse)
            self.tls_refused = True
            return
        cl.skip("tls", f"the server has TLS off: sslmode={t.tls_mode} goes on in plaintext")

    async def _reopen_for_tls(self) -> Link:
        link, _ = await self.dialer.dial()
        if not self.t.direct_tls:
            await link.send(pgwire.SSL_REQUEST, self.opt.timeout)
            await link.recv(self.opt.timeout)
        return link

    async def _tls(self) -> str:
        assert self.link is not None
        try:
            result = await self._handshake()
        except PhaseFailed as exc:
            if self.t.direct_tls:
                exc.cause += " (sslnegotiation=direct needs PostgreSQL 17 or later)"
                exc.fix += "; or drop sslnegotiation=direct for servers before 17"
            raise
        return result.detail

    async def _handshake(self) -> TlsResult:
        assert self.link is not None
        return await handshake_for(
            self.t,
            self.link,
            alpn=["postgresql"],
            timeout=self.opt.timeout,
            reopen=self._reopen_for_tls,
        )

    # --- auth --------------------------------------------------------------------------------

    async def _send_startup(self) -> None:
        assert self.link is not None
        params = {"user": self.t.user, "database": self.t.database}
        params["application_name"] = self.t.params.get("application_name", "burrow-doctor")
        if self.t.params.get("options"):
            params["options"] = self.t.params["options"]
        await self.link.send(pgwire.startup_message(params), self.opt.timeout)
        self.startup_sent = True

    def _need_password(self, method: str) -> str:
        if self.t.password is None:
            raise PhaseFailed(
                f"the server asks for a password ({method}) and none was given",
                f"user {self.t.user!r} must authenticate with {method}, and no password was given",
                "put the password in the URL (postgres://USER:PASSWORD@...) or pass "
                "--password-env VAR",
            )
        return self.t.password

    async def _auth(self) -> str:
        assert self.link is not None
        if not self.startup_sent:
            await self._send_startup()
        timeout = self.opt.timeout
        method = "trust"
        scram: ScramClient | None = None
        notes: list[str] = []
        for _ in range(16):
            try:
                message = await self._read(timeout)
            except TimeoutError:
                raise PhaseFailed(
                    f"no answer to the StartupMessage within {timeout:g} s",
                    "the server does not answer the start-up: it is overloaded, or a proxy "
                    "holds the connection",
                    "check the server's log and load",
                ) from None
            except _Gone as gone:
                raise self._gone_during_auth(gone.how) from None
            if message.type == b"E":
                raise self._auth_error(pgwire.parse_error(message.body), method)
            if message.type == b"v":
                notes.append("the server negotiated the protocol version down")
                continue
            if message.type == b"N":
                continue
            if message.type != b"R":
                raise PhaseFailed(
                    f"unexpected message {message.type!r} during authentication",
                    "the server broke the start-up protocol",
                    "check what listens on this port",
                )
            request = pgwire.parse_auth(message.body)
            code = request.code
            if code == pgwire.AUTH_OK:
                # The database and connection limits are checked after AuthenticationOk: an
                # ErrorResponse right after it (3D000, 53300) is still the login's answer.
                try:
                    after = await self._read(timeout)
                except TimeoutError:
                    after = None
                except _Gone as gone:
                    raise self._gone_during_auth(gone.how) from None
                if after is not None and after.type == b"E":
                    raise self._auth_error(pgwire.parse_error(after.body), method)
                if after is not None:
                    self.pending.append(after)
                tls = "over TLS" if self.link.tls else "in plaintext"
                extra = f"; {'; '.join(notes)}" if notes else ""
                return f"method {method}: authenticated as {self.t.user} {tls}{extra}"
            if code == pgwire.AUTH_CLEARTEXT:
                method = "password (cleartext)"
                password = self._need_password(method)
                if self.tls_refused:
                    raise PhaseFailed(
                        "the server asks for a cleartext password; not sent, since "
                        f"sslmode={self.t.tls_mode} asked for TLS",
                        "the server wants the password in clear text",
                        "fix TLS first (see the tls phase)",
                    )
                if self.link.tls is None:
                    notes.append("the password crossed the network in clear text")
                await self.link.send(pgwire.password_message(password.encode()), timeout)
            elif code == pgwire.AUTH_MD5:
                method = "md5"
                password = self._need_password(method)
                salt = request.data[:4]
                await self.link.send(
                    pgwire.password_message(pgwire.md5_password(self.t.user, password, salt)),
                    timeout,
                )
            elif code == pgwire.AUTH_SASL:
                scram = self._scram_client(request.mechanisms)
                method = scram.mechanism
                await self.link.send(
                    pgwire.sasl_initial_response(scram.mechanism, scram.first()), timeout
                )
            elif code == pgwire.AUTH_SASL_CONTINUE and scram is not None:
                try:
                    reply = scram.final(request.data)
                except ScramError as exc:
                    raise PhaseFailed(
                        f"bad SCRAM message from the server: {exc}",
                        f"the server's SCRAM exchange is malformed: {exc}",
                        "check what listens on this port (a broken proxy?)",
                    ) from None
                await self.link.send(pgwire.sasl_response(reply), timeout)
            elif code == pgwire.AUTH_SASL_FINAL and scram is not None:
                try:
                    scram.verify(request.data)
                except ScramError as exc:
                    raise PhaseFailed(
                        f"{method}: {exc}",
                        "the server could not prove it knows the password (its SCRAM signature "
                        "is wrong): it is not the server you think, or something rewrote the "
                        "exchange",
                        "do not trust this path; check the server's certificate (sslmode="
                        "verify-full) and what sits between you and the server",
                    ) from None
            else:
                name = pgwire.AUTH_NAMES.get(code, f"method {code}")
                raise PhaseFailed(
                    f"the server asks for {name}, which the doctor does not speak",
                    f"authentication uses {name}",
                    "check it with psql, which speaks every method",
                )
        raise PhaseFailed("authentication did not end", "the server loops in auth", "report it")

    def _scram_client(self, mechanisms: list[str]) -> ScramClient:
        assert self.link is not None
        password = self._need_password("SCRAM-SHA-256")
        binding = self.t.params.get("channel_binding", "prefer")
        tls = self.link.tls
        if "SCRAM-SHA-256-PLUS" in mechanisms and tls is not None and binding != "disable":
            der = tls.getpeercert(binary_form=True)
            if der:
                return ScramClient(password, cbind_data=tls_server_end_point(der))
        if binding == "require":
            offered = ", ".join(mechanisms)
            raise PhaseFailed(
                f"channel_binding=require but the server offers only {offered}"
                + ("" if tls else " (and the connection is not TLS)"),
                "channel binding is required but cannot happen: "
                + (
                    "the connection is not TLS"
                    if tls is None
                    else "the server does not offer SCRAM-SHA-256-PLUS (a TLS-terminating "
                    "proxy in the way?)"
                ),
                "use TLS end to end to the server (sslmode=require or stronger), or "
                "channel_binding=prefer",
            )
        if "SCRAM-SHA-256" not in mechanisms:
            raise PhaseFailed(
                f"the server offers SASL mechanisms {mechanisms} and none the doctor speaks",
                "no common SASL mechanism",
                "check the server's password_encryption and pg_hba.conf methods",
            )
        return ScramClient(password)

    def _gone_during_auth(self, how: str) -> PhaseFailed:
        tls = self.link is not None and self.link.tls is not None
        return PhaseFailed(
            f"the connection was {'reset' if how == 'reset' else 'closed'} during start-up, "
            "with no ErrorResponse",
            "the server (or a proxy) hung up during start-up without an error"
            + (
                ""
                if tls
                else "; a TLS-only proxy (RDS Proxy with RequireTLS) does this to plaintext clients"
            ),
            "try sslmode=require; check the server's or proxy's log",
        )

    def _auth_error(self, error: pgwire.ServerError, method: str) -> PhaseFailed:
        state, text = error.sqlstate, error.message
        said = error.describe()
        user, db = self.t.user, self.t.database
        tls = self.link is not None and self.link.tls is not None
        if state == "28P01":
            return PhaseFailed(
                f"method {method}: {said}",
                f"wrong password for user {user!r} (28P01: {text})",
                "check the password (in the URL or --password-env); an RDS IAM token lasts 15 "
                "minutes; the role may have no password or an expired one (VALID UNTIL)",
            )
        if state == "28000":
            lowered = text.lower()
            if "no pg_hba.conf entry" in lowered:
                fix = (
                    "add a line to pg_hba.conf for this user, database and client address "
                    f"({'hostssl' if tls else 'host or hostssl'} ...) and reload "
                    "(SELECT pg_reload_conf())"
                )
                if "no encryption" in lowered:
                    fix += (
                        "; it says 'no encryption': a hostssl line may match with sslmode=require"
                    )
                return PhaseFailed(
                    said,
                    f'pg_hba.conf has no line for this connection: the server says "{text}"',
                    fix,
                )
            if "requires tls" in lowered or "requires ssl" in lowered:
                return PhaseFailed(
                    said,
                    f'the server or proxy requires TLS: "{text}" (28000)',
                    "connect with sslmode=require (or verify-full with the right CA)",
                )
            if "channel binding" in lowered:
                return PhaseFailed(
                    said,
                    f'SCRAM channel binding failed: "{text}": a TLS-terminating proxy sits '
                    "between you and the server",
                    "connect with channel_binding=disable through that proxy, or make TLS end "
                    "to end",
                )
            return PhaseFailed(
                said,
                f'the server refuses this login: "{text}" (28000)',
                "check pg_hba.conf and the role's LOGIN attribute",
            )
        if state == "3D000":
            return PhaseFailed(
                said,
                f"database {db!r} does not exist (3D000: {text})",
                "fix the database name in the URL path (`psql -l` lists them), or create it",
            )
        if state == "53300":
            return PhaseFailed(
                said,
                f"too many connections (53300: {text})",
                "close idle connections, raise max_connections (or the role's CONNECTION "
                "LIMIT), or put a pooler in front",
            )
        if state == "57P03":
            return PhaseFailed(
                said,
                f"the server cannot accept connections now (57P03: {text})",
                "wait for start-up or recovery to end, or connect to the primary",
            )
        return PhaseFailed(said, f"the server refused the start-up: {said}", "see its message")

    # --- after auth --------------------------------------------------------------------------

    async def _session(self) -> str:
        timeout = self.opt.timeout
        try:
            messages = await self._until_ready(timeout)
        except TimeoutError:
            raise PhaseFailed(
                f"no ReadyForQuery within {timeout:g} s after authentication",
                "the server accepted the login but never became ready",
                "check the server's log (a pooler waiting for a free server connection?)",
            ) from None
        except _Gone as gone:
            raise self._gone_during_auth(gone.how) from None
        for message in messages:
            if message.type == b"S":
                name, value = pgwire.parse_parameter_status(message.body)
                self.parameters[name] = value
            elif message.type == b"K":
                self.backend_key = pgwire.parse_backend_key(message.body)
            elif message.type == b"E":
                error = pgwire.parse_error(message.body)
                raise PhaseFailed(
                    error.describe(),
                    f"the session failed to start: {error.describe()}",
                    "see the server's message",
                )
        version = self.parameters.get("server_version", "unknown")
        parts = [f"PostgreSQL {version}"]
        shown = pgwire.parameters_text(self.parameters.items(), SHOWN_PARAMETERS)
        if shown:
            parts.append(shown)
        try:
            rows = await self._simple("SELECT pg_backend_pid()", timeout)
        except (TimeoutError, _Gone):
            rows = []
        backend_pid = _first_int(rows)
        if self.backend_key is None:
            parts.append("no BackendKeyData")
            self.cl.note(
                "session",
                "no BackendKeyData: a pooler or proxy sits in front of PostgreSQL (RDS Proxy "
                "sends none), so query cancels (Ctrl+C in psql, cursor.cancel()) cannot reach "
                "the backend",
                "do not rely on cancelling queries; with RDS Proxy avoid what pins connections "
                "(SET, PREPARE, temporary tables, advisory locks, LISTEN)",
            )
        else:
            pid = self.backend_key[0]
            key_len = len(self.backend_key[1])
            if backend_pid is not None and backend_pid != pid:
                parts.append(
                    f"BackendKeyData pid {pid} but pg_backend_pid() is {backend_pid}: a pooler"
                )
                self.cl.note(
                    "session",
                    f"a connection pooler sits in front of PostgreSQL (BackendKeyData pid {pid}, "
                    f"pg_backend_pid() {backend_pid}): pgbouncer, Supavisor or alike; in "
                    "transaction mode, session state (SET, prepared statements, LISTEN/NOTIFY, "
                    "advisory locks, temporary tables) does not outlive a transaction",
                    "keep session state inside one transaction; asyncpg: statement_cache_size=0 "
                    "(or pgbouncer max_prepared_statements); run LISTEN and migrations against "
                    "the server directly",
                )
            else:
                parts.append(f"BackendKeyData pid {pid} (key {key_len} bytes) = pg_backend_pid()")
        return "; ".join(parts)

    async def _query(self) -> str:
        timeout = self.opt.timeout
        start = time.perf_counter()
        try:
            messages = await self._simple("SELECT 1", timeout)
        except TimeoutError:
            raise PhaseFailed(
                f"SELECT 1 got no answer within {timeout:g} s",
                "a trivial query hangs after a good login",
                "check the server's load and locks, and any pooler's queue",
            ) from None
        except _Gone as gone:
            raise PhaseFailed(
                f"connection {gone.how} on SELECT 1",
                "the connection died on the first query",
                "check the server's log",
            ) from None
        self.rtt = time.perf_counter() - start
        error = _error_in(messages)
        if error is not None:
            raise PhaseFailed(error.describe(), f"SELECT 1 failed: {error.describe()}", "see it")
        return f"SELECT 1 round trip {self.rtt * 1000:.1f} ms"

    async def _payload(self) -> str:
        last = 0
        for size in LADDER:
            for direction, sql in (
                ("upload", f"SELECT length('{'x' * size}')"),
                ("download", f"SELECT repeat('x', {size})"),
            ):
                timeout = step_timeout(size, self.rtt, self.opt.timeout)
                try:
                    messages = await self._simple(sql, timeout)
                except TimeoutError:
                    passed = f"{human(last)} passed each way" if last else "nothing passed"
                    raise PhaseFailed(
                        f"{direction} of {human(size)} stalled (no answer in {timeout:.1f} s); "
                        f"{passed}",
                        f"transfers of {human(size)} stall while "
                        f"{human(last) if last else 'smaller ones'} pass: the mark of a path-MTU "
                        "blackhole (large packets are dropped and "
                        "the ICMP that would shrink them never arrives)",
                        MTU_FIX,
                    ) from None
                except _Gone as gone:
                    raise PhaseFailed(
                        f"connection {gone.how} during the {direction} of {human(size)}",
                        f"the path drops the connection on a {human(size)} {direction}",
                        "check proxies on the path for size limits; " + MTU_FIX,
                    ) from None
                error = _error_in(messages)
                if error is not None:
                    raise PhaseFailed(
                        f"{direction} of {human(size)}: {error.describe()}",
                        f"the server refused a {human(size)} {direction}: {error.describe()}",
                        "see the server's message",
                    )
                got = _first_value(messages)
                ok = got == str(size).encode() if direction == "upload" else got == b"x" * size
                if not ok:
                    raise PhaseFailed(
                        f"{direction} of {human(size)} came back altered",
                        "bytes were altered on the way",
                        "check proxies on the path",
                    )
            last = size
        return f"{human(LADDER[0])} to {human(LADDER[-1])} each way, {len(LADDER)} sizes"

    async def _idle(self) -> str:
        assert self.link is not None and self.opt.idle is not None
        idle, timeout = self.opt.idle, self.opt.timeout
        data, after, how = await watch_idle(self.link, idle)
        if data:
            self.reader.feed(data)
            error = None
            try:
                while (message := self.reader.next()) is not None:
                    if message.type == b"E":
                        error = pgwire.parse_error(message.body)
            except pgwire.PgWireError:
                pass
            if error is not None:
                raise self._server_ended(error, after)
        if how != "quiet":
            raise idle_dropped(after, "reset" if how == "reset" else "closed", idle)
        try:
            messages = await self._simple("SELECT 1", timeout)
        except TimeoutError:
            raise idle_hang(idle, timeout) from None
        except _Gone as gone:
            raise idle_dropped(idle, "reset" if gone.how == "reset" else "closed", idle) from None
        error = _error_in(messages)
        if error is not None:
            raise self._server_ended(error, idle)
        return f"idle {idle:g} s, then SELECT 1 answered"

    def _server_ended(self, error: pgwire.ServerError, after: float) -> PhaseFailed:
        state = error.sqlstate
        if state == "57P05":
            cause = (
                f"the server ends idle sessions: idle_session_timeout closed this one after "
                f"{after:.1f} s (57P05: {error.message})"
            )
            fix = (
                "raise idle_session_timeout for this role or database (0 turns it off), or "
                "have the pool recycle or pre-ping connections idle longer than that"
            )
        elif state == "25P03":
            cause = (
                f"idle_in_transaction_session_timeout ended the session (25P03: {error.message})"
            )
            fix = "commit or roll back before going idle"
        elif state in ("57P01", "57P02", "57P03"):
            cause = f"the server ended the session: {error.describe()}"
            fix = "a restart, failover or pg_terminate_backend(); reconnect and retry"
        else:
            cause = f"the server sent an error while idle: {error.describe()}"
            fix = "see the server's message"
        return PhaseFailed(
            f"after {after:.1f} s idle the server said {error.describe()}", cause, fix
        )


def _error_in(messages: list[pgwire.Message]) -> pgwire.ServerError | None:
    for message in messages:
        if message.type == b"E":
            return pgwire.parse_error(message.body)
    return None


def _first_value(messages: list[pgwire.Message]) -> bytes | None:
    for message in messages:
        if message.type == b"D":
            values = pgwire.parse_data_row(message.body)
            return values[0] if values else None
    return None


def _first_int(messages: list[pgwire.Message]) -> int | None:
    value = _first_value(messages)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
