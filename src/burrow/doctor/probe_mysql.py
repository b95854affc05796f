"""The MySQL/MariaDB ladder: the server's greeting (version, TLS capability, auth plugin), TLS,
the login with its error number and SQLSTATE, the session (a proxy shows as a connection id
that differs from ``CONNECTION_ID()``), ``SELECT 1``, the payload ladder and the idle test.
"""

from __future__ import annotations

import time

from burrow.doctor import mywire
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

NEEDS_TLS = ("require", "verify-ca", "verify-full")


class _Gone(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class _Refused(Exception):
    def __init__(self, error: mywire.ServerError) -> None:
        super().__init__(error.describe())
        self.error = error


class _Conn:
    """One connection's packet stream and sequence numbers."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.reader = mywire.PacketReader()
        self.seq = 0

    async def read(self, timeout: float) -> bytes:
        deadline = time.perf_counter() + timeout
        while True:
            got = self.reader.next()
            if got is not None:
                self.seq = (got[0] + 1) & 0xFF
                return got[1]
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

    async def send(self, payload: bytes, timeout: float) -> None:
        await self.link.send(mywire.packet(self.seq, payload), timeout)
        self.seq = (self.seq + 1) & 0xFF

    async def query(self, sql: str, timeout: float) -> list[list[bytes | None]]:
        """A text-protocol query's rows; ``_Refused`` on an ERR packet."""
        self.seq = 0
        await self.link.send(mywire.com_query(sql), timeout)
        self.seq = 1
        deadline = time.perf_counter() + timeout

        def left() -> float:
            return max(0.0, deadline - time.perf_counter())

        first = await self.read(left())
        if mywire.is_err(first):
            raise _Refused(mywire.parse_err(first))
        if mywire.is_ok(first):
            return []
        columns, _ = mywire.lenenc(first, 0)
        if not columns or columns > 64:
            raise PhaseFailed(
                f"a result with {columns} columns", "the server's reply makes no sense", "report it"
            )
        for _ in range(columns + 1):  # column definitions, then EOF
            await self.read(left())
        rows: list[list[bytes | None]] = []
        for _ in range(16):  # the doctor's queries return one row
            packet = await self.read(left())
            if mywire.is_eof(packet):
                return rows
            if mywire.is_err(packet):
                raise _Refused(mywire.parse_err(packet))
            rows.append(mywire.parse_text_row(packet))
        raise PhaseFailed(
            "the server sent far more rows than asked for",
            "the server floods the connection",
            "check what listens on this port",
        )


class MySqlProbe:
    def __init__(self, target: Target, dialer: Dialer, checklist: Checklist, options: Options):
        self.t = target
        self.dialer = dialer
        self.cl = checklist
        self.opt = options
        self.conn: _Conn | None = None
        self.greeting: mywire.Handshake | None = None
        self.wait_timeout: int | None = None
        self.rtt = 0.0

    async def run(self) -> None:
        cl = self.cl
        try:
            await cl.run("dns", self.dialer.resolve)
            await cl.run("dial", self._dial)
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
            if self.conn is not None:
                try:
                    await self.conn.link.send(mywire.com_quit(), 0.5)
                except (OSError, TimeoutError):
                    pass
                await self.conn.link.close()

    async def _dial(self) -> str:
        link, detail = await self.dialer.dial()
        self.conn = _Conn(link)
        return detail

    async def _greet(self, conn: _Conn) -> mywire.Handshake:
        timeout = self.opt.timeout
        try:
            payload = await conn.read(timeout)
        except TimeoutError:
            raise await silent("MySQL (which speaks first)", self.dialer, timeout) from None
        except _Gone as gone:
            raise await hung_up("MySQL", gone.how, self.dialer, self.opt.timeout) from None
        except mywire.MyWireError:
            raise not_this_service("MySQL", "a service that is not MySQL") from None
        if mywire.is_err(payload):
            raise self._login_error(mywire.parse_err(payload), greeting=True)
        try:
            return mywire.parse_handshake(payload)
        except mywire.MyWireError:
            raw = mywire.packet(0, payload)
            raise not_this_service("MySQL", identify(raw) or preview(raw)) from None

    async def _hello(self) -> str:
        assert self.conn is not None
        reader = self.conn.reader
        # Peek: a non-MySQL greeting (SSH, SMTP) is named before the packet parser sees it.
        try:
            first = await self.conn.link.recv(self.opt.timeout)
        except TimeoutError:
            raise await silent(
                "MySQL (which speaks first)", self.dialer, self.opt.timeout
            ) from None
        except OSError:
            raise await hung_up("MySQL", "reset", self.dialer, self.opt.timeout) from None
        if not first:
            raise await hung_up("MySQL", "closed", self.dialer, self.opt.timeout)
        other = identify(first)
        if other is not None and "MySQL" not in other and "MariaDB" not in other:
            raise not_this_service("MySQL", other)
        reader.feed(first)
        self.greeting = g = await self._greet(self.conn)
        return (
            f"{g.product} (protocol {g.protocol}), connection id {g.connection_id}, "
            f"TLS {'offered' if g.offers_tls else 'not offered'}, auth plugin {g.auth_plugin}"
        )

    async def _tls_phase(self) -> None:
        g, t = self.greeting, self.t
        assert g is not None
        if t.tls_mode == "disable":
            self.cl.skip("tls", "ssl-mode=DISABLED")
            return
        if g.offers_tls:
            await self.cl.run("tls", self._tls)
            return
        if t.tls_mode in NEEDS_TLS:

            async def refuse() -> str:
                raise PhaseFailed(
                    "the greeting has no CLIENT_SSL flag: the server offers no TLS",
                    f"the server has no TLS configured (its greeting lacks the CLIENT_SSL flag; "
                    f"have_ssl=DISABLED) but ssl-mode={_mysql_mode(t.tls_mode)} requires it",
                    "configure ssl_cert, ssl_key (and ssl_ca) on the server and restart it; or, "
                    "on an already encrypted path, use ssl-mode=PREFERRED",
                    go_on=True,  # the login's scramble never reveals the password
                )

            await self.cl.run("tls", refuse)
            return
        self.cl.skip("tls", "the server offers no TLS: ssl-mode=PREFERRED goes on in plaintext")

    async def _start_tls(self, conn: _Conn) -> str:
        assert self.greeting is not None
        caps = mywire.BASE_CAPABILITIES & (self.greeting.capabilities | mywire.CLIENT_SSL)
        await conn.link.send(mywire.ssl_request(caps, seq=1), self.opt.timeout)
        conn.seq = 2

        async def reopen() -> Link:
            link, _ = await self.dialer.dial()
            again = _Conn(link)
            await again.read(self.opt.timeout)
            await link.send(mywire.ssl_request(caps, seq=1), self.opt.timeout)
            return link

        result = await handshake_for(
            self.t, conn.link, alpn=None, timeout=self.opt.timeout, reopen=reopen
        )
        return result.detail

    async def _tls(self) -> str:
        assert self.conn is not None
        return await self._start_tls(self.conn)

    async def _login(self, conn: _Conn, g: mywire.Handshake) -> str:
        """Log in on ``conn``; the plugin that succeeded, or ``_Refused``."""
        timeout = self.opt.timeout
        password = self.t.password or ""
        plugin = (
            g.auth_plugin
            if mywire.scramble_for(g.auth_plugin, "", b"") is not None
            else (mywire.NATIVE)
        )
        nonce = g.scramble
        auth = mywire.scramble_for(plugin, password, nonce) or b""
        caps = mywire.BASE_CAPABILITIES & g.capabilities
        if conn.link.tls is not None:
            caps |= mywire.CLIENT_SSL
        seq = conn.seq or 1
        await conn.link.send(
            mywire.handshake_response(
                caps, self.t.user, auth, plugin, self.t.database or None, seq
            ),
            timeout,
        )
        conn.seq = seq + 1
        for _ in range(8):
            packet = await conn.read(timeout)
            if mywire.is_ok(packet):
                return plugin
            if mywire.is_err(packet):
                raise _Refused(mywire.parse_err(packet))
            if packet[:1] == b"\xfe":
                plugin, nonce = mywire.parse_auth_switch(packet)
                answer = mywire.scramble_for(plugin, password, nonce)
                if answer is None:
                    raise PhaseFailed(
                        f"the server switched to auth plugin {plugin}",
                        f"the account uses auth plugin {plugin}, which the doctor does not speak",
                        "check the login with the mysql/mariadb client",
                    )
                await conn.send(answer, timeout)
            elif packet[:1] == b"\x01" and plugin == mywire.CACHING_SHA2:
                status = packet[1:2]
                if status == b"\x03":
                    continue  # fast auth succeeded; OK follows
                if conn.link.tls is not None:
                    await conn.send(password.encode() + b"\0", timeout)
                elif status == b"\x04":
                    await conn.send(b"\x02", timeout)  # ask for the server's RSA key
                else:
                    pem = packet[1:]
                    try:
                        secret = mywire.rsa_encrypt_password(password, nonce, pem)
                    except (ValueError, mywire.MyWireError) as exc:
                        raise PhaseFailed(
                            f"cannot use the server's RSA key: {exc}",
                            "caching_sha2_password full authentication needs TLS or the server's "
                            "RSA key, and neither worked",
                            "connect with TLS (ssl-mode=REQUIRED)",
                        ) from None
                    await conn.send(secret, timeout)
            else:
                raise PhaseFailed(
                    f"unexpected packet 0x{packet[:1].hex()} during login",
                    "the server broke the login protocol",
                    "check what listens on this port",
                )
        raise PhaseFailed("login did not end", "the server loops in auth", "report it")

    async def _auth(self) -> str:
        assert self.conn is not None and self.greeting is not None
        g = self.greeting
        if self.conn.seq == 0:
            self.conn.seq = 1
        try:
            plugin = await self._login(self.conn, g)
        except _Refused as refused:
            raise await self._explain_refusal(refused.error) from None
        except TimeoutError:
            raise PhaseFailed(
                f"no answer to the login within {self.opt.timeout:g} s",
                "the server does not answer the login",
                "check the server's log and load",
            ) from None
        except _Gone as gone:
            raise PhaseFailed(
                f"connection {gone.how} during login, with no error packet",
                "the server (or a proxy) hung up during the login",
                "check the server's log",
            ) from None
        tls = "over TLS" if self.conn.link.tls is not None else "in plaintext"
        return f"plugin {plugin}: logged in as {self.t.user} {tls}"

    async def _explain_refusal(self, error: mywire.ServerError) -> PhaseFailed:
        g = self.greeting
        assert g is not None and self.conn is not None
        used_tls = self.conn.link.tls is not None
        # The server hides why; a login over TLS tells a REQUIRE SSL account apart.
        if (
            error.code == 1045
            and not used_tls
            and g.offers_tls
            and await self._login_over_tls_works()
        ):
            return PhaseFailed(
                f"{error.describe()} in plaintext; the same login over TLS succeeds",
                f"the account {self.t.user!r} requires TLS (REQUIRE SSL): the server refuses "
                "it in plaintext with error 1045, hiding why",
                "connect with TLS (ssl-mode=REQUIRED or PREFERRED)",
            )
        return self._login_error(error, greeting=False)

    async def _login_over_tls_works(self) -> bool:
        try:
            link, _ = await self.dialer.dial()
        except PhaseFailed:
            return False
        conn = _Conn(link)
        try:
            g = await self._greet(conn)
            saved, self.t.tls_mode = self.t.tls_mode, "require"
            try:
                await self._start_tls(conn)
            finally:
                self.t.tls_mode = saved
            await self._login(conn, g)
            return True
        except (PhaseFailed, _Refused, _Gone, TimeoutError, OSError, mywire.MyWireError):
            return False
        finally:
            await link.close()

    def _login_error(self, error: mywire.ServerError, *, greeting: bool) -> PhaseFailed:
        said = error.describe()
        user, db = self.t.user, self.t.database
        g = self.greeting
        tls = self.conn is not None and self.conn.link.tls is not None
        code = error.code
        if code == 1045:
            if "using password: NO" in error.message:
                return PhaseFailed(
                    said,
                    f"user {user!r} needs a password and none was given (error 1045, SQLSTATE "
                    f"{error.sqlstate})",
                    "put the password in the URL (mysql://USER:PASSWORD@...) or pass "
                    "--password-env VAR",
                )
            cause = (
                f"access denied for {user!r} (error 1045, SQLSTATE {error.sqlstate}): the "
                "password is wrong, or no account matches this user from this client's host"
            )
            fix = (
                "check the password and the account's host part (SELECT user, host FROM mysql.user)"
            )
            if not tls and g is not None and not g.offers_tls:
                cause += (
                    "; or the account requires TLS (REQUIRE SSL), which this server cannot "
                    "offer: its greeting has no CLIENT_SSL flag (no TLS configured)"
                )
                fix += (
                    "; SHOW GRANTS FOR the account shows REQUIRE SSL: then configure TLS on "
                    "the server, or ALTER USER ... REQUIRE NONE on a trusted path"
                )
            return PhaseFailed(said, cause, fix)
        if code in (1044, 1049):
            what = "has no rights on" if code == 1044 else "cannot find"
            return PhaseFailed(
                said,
                f"the server {what} database {db!r} for {user!r} (error {code}, SQLSTATE "
                f"{error.sqlstate})",
                "fix the database in the URL path, or GRANT the user access to it"
                if code == 1044
                else "fix the database in the URL path (SHOW DATABASES lists them), or create it",
            )
        if code == 3159:
            return PhaseFailed(
                said,
                "the server requires TLS (require_secure_transport=ON) and this login was "
                "plaintext",
                "connect with ssl-mode=REQUIRED",
            )
        fixes = {
            1040: "close idle connections or raise max_connections",
            1129: "the host is blocked after too many errors: run FLUSH HOSTS (or "
            "mariadb-admin flush-hosts) and raise max_connect_errors",
            1130: "create or grant an account for this client's host ('user'@'%' or the "
            "tunnel's address)",
            1226: "the user hit a resource limit (MAX_USER_CONNECTIONS ...): raise it",
        }
        where = "in its greeting" if greeting else "at login"
        return PhaseFailed(
            said,
            f"the server refused this client {where}: {said}",
            fixes.get(code, "see the server's message"),
        )

    async def _session(self) -> str:
        assert self.conn is not None and self.greeting is not None
        g = self.greeting
        try:
            rows = await self.conn.query("SELECT CONNECTION_ID(), @@wait_timeout", self.opt.timeout)
        except _Refused as refused:
            raise PhaseFailed(
                refused.error.describe(),
                f"the session cannot run a query: {refused.error.describe()}",
                "see the server's message",
            ) from None
        except (TimeoutError, _Gone):
            raise PhaseFailed(
                "no answer to the first query",
                "the session does not answer after login",
                "check the server",
            ) from None
        conn_id = _int(rows[0][0]) if rows and rows[0] else None
        self.wait_timeout = _int(rows[0][1]) if rows and len(rows[0]) > 1 else None
        parts = [g.product, f"wait_timeout {self.wait_timeout} s"]
        if conn_id is not None and conn_id != g.connection_id:
            parts.append(
                f"greeting connection id {g.connection_id} but CONNECTION_ID() is {conn_id}: a "
                "proxy"
            )
            self.cl.note(
                "session",
                f"a proxy sits in front of the server (the greeting said connection id "
                f"{g.connection_id}, CONNECTION_ID() says {conn_id}): ProxySQL, MaxScale, RDS "
                "Proxy or alike, which may multiplex connections",
                "keep session state (variables, temporary tables, locks) inside a transaction, "
                "and KILL QUERY through the proxy",
            )
        else:
            parts.append(f"connection id {g.connection_id} = CONNECTION_ID()")
        return "; ".join(parts)

    async def _query(self) -> str:
        assert self.conn is not None
        start = time.perf_counter()
        try:
            await self.conn.query("SELECT 1", self.opt.timeout)
        except _Refused as refused:
            raise PhaseFailed(
                refused.error.describe(), "SELECT 1 failed", "see the message"
            ) from None
        except TimeoutError:
            raise PhaseFailed(
                f"SELECT 1 got no answer within {self.opt.timeout:g} s",
                "a trivial query hangs after a good login",
                "check the server's load and locks",
            ) from None
        except _Gone as gone:
            raise PhaseFailed(
                f"connection {gone.how} on SELECT 1",
                "the connection died",
                "check the server's log",
            ) from None
        self.rtt = time.perf_counter() - start
        return f"SELECT 1 round trip {self.rtt * 1000:.1f} ms"

    async def _payload(self) -> str:
        assert self.conn is not None
        last = 0
        for size in LADDER:
            for direction, sql in (
                ("upload", f"SELECT LENGTH('{'x' * size}')"),
                ("download", f"SELECT REPEAT('x', {size})"),
            ):
                timeout = step_timeout(size, self.rtt, self.opt.timeout)
                try:
                    rows = await self.conn.query(sql, timeout)
                except TimeoutError:
                    raise PhaseFailed(
                        f"{direction} of {human(size)} stalled (no answer in {timeout:.1f} s); "
                        + (f"{human(last)} passed each way" if last else "nothing passed"),
                        f"transfers of {human(size)} stall while smaller ones pass: the mark of "
                        "a path-MTU blackhole",
                        MTU_FIX,
                    ) from None
                except _Gone as gone:
                    raise PhaseFailed(
                        f"connection {gone.how} during the {direction} of {human(size)}",
                        f"the path drops the connection on a {human(size)} {direction}",
                        "check proxies on the path for size limits; " + MTU_FIX,
                    ) from None
                except _Refused as refused:
                    raise PhaseFailed(
                        f"{direction} of {human(size)}: {refused.error.describe()}",
                        f"the server refused a {human(size)} {direction} (max_allowed_packet?)",
                        "raise max_allowed_packet",
                    ) from None
                got = rows[0][0] if rows and rows[0] else None
                want = str(size).encode() if direction == "upload" else b"x" * size
                if got != want:
                    raise PhaseFailed(
                        f"{direction} of {human(size)} came back altered",
                        "bytes were altered on the way",
                        "check proxies on the path",
                    )
            last = size
        return f"{human(LADDER[0])} to {human(LADDER[-1])} each way, {len(LADDER)} sizes"

    async def _idle(self) -> str:
        assert self.conn is not None and self.opt.idle is not None
        idle, timeout = self.opt.idle, self.opt.timeout
        data, after, how = await watch_idle(self.conn.link, idle)
        if data:
            self.conn.reader.feed(data)
            try:
                got = self.conn.reader.next()
            except mywire.MyWireError:
                got = None
            if got is not None and mywire.is_err(got[1]):
                error = mywire.parse_err(got[1])
                raise PhaseFailed(
                    f"after {after:.1f} s idle the server said {error.describe()}",
                    f"the server ended the idle session: {error.describe()}",
                    "raise wait_timeout for this client, or have the pool recycle or ping "
                    "connections idle longer than that",
                )
        if how != "quiet":
            raise self._idle_closed(after, how)
        try:
            await self.conn.query("SELECT 1", timeout)
        except TimeoutError:
            raise idle_hang(idle, timeout) from None
        except _Gone as gone:
            raise self._idle_closed(idle, gone.how) from None
        except _Refused as refused:
            raise PhaseFailed(
                f"after {idle:g} s idle: {refused.error.describe()}",
                f"the server refused the query after idle: {refused.error.describe()}",
                "see the server's message",
            ) from None
        return f"idle {idle:g} s, then SELECT 1 answered"

    def _idle_closed(self, after: float, how: str) -> PhaseFailed:
        how = "reset" if how == "reset" else "closed"
        if self.wait_timeout and after >= self.wait_timeout - 1:
            return PhaseFailed(
                f"connection {how} after {after:.1f} s idle (wait_timeout {self.wait_timeout} s)",
                f"the server's wait_timeout ({self.wait_timeout} s) closed the idle connection",
                "raise wait_timeout, or have the pool recycle connections before it",
            )
        failure = idle_dropped(after, how, after)
        if self.wait_timeout:
            failure.cause += f"; the server's wait_timeout is {self.wait_timeout} s, so not it"
        return failure


def _int(value: bytes | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _mysql_mode(mode: str) -> str:
    return {"require": "REQUIRED", "verify-ca": "VERIFY_CA", "verify-full": "VERIFY_IDENTITY"}.get(
        mode, mode
    )
