"""What to diagnose: the URL taken apart (scheme, host, port, credentials, TLS wishes) and a
redacted form of it, the only form any output shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from burrow.errors import ConfigError

KINDS: Final = {
    "postgres": "pg",
    "postgresql": "pg",
    "mysql": "mysql",
    "mariadb": "mysql",
    "redis": "redis",
    "rediss": "redis",
    "tcp": "tcp",
    "http": "http",
    "https": "http",
}
DEFAULT_PORTS: Final = {
    "postgres": 5432,
    "postgresql": 5432,
    "mysql": 3306,
    "mariadb": 3306,
    "redis": 6379,
    "rediss": 6379,
    "http": 80,
    "https": 443,
}
TLS_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_MYSQL_MODES: Final = {
    "disabled": "disable",
    "preferred": "prefer",
    "required": "require",
    "verify_ca": "verify-ca",
    "verify_identity": "verify-full",
}
_SECRET_PARAMS: Final = frozenset({"password", "pass", "pwd", "token"})
MAX_URL: Final = 4096


@dataclass
class Target:
    scheme: str
    kind: str  # pg, mysql, redis, tcp, http
    host: str
    port: int
    user: str = ""
    password: str | None = None
    database: str = ""
    path: str = "/"  # http
    params: dict[str, str] = field(default_factory=dict)
    tls_mode: str = "disable"
    tls_ca: str | None = None
    display: str = ""  # the URL with every secret replaced by ***

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """Where to connect: libpq's ``hostaddr`` when given (the name then only serves the
        certificate check, as through a local forwarder), else the host."""
        return self.params.get("hostaddr") or self.host

    @property
    def dial_hostport(self) -> str:
        a = self.address
        return f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}"

    @property
    def direct_tls(self) -> bool:
        """TLS from the first byte (rediss, https, PostgreSQL's sslnegotiation=direct)."""
        return self.scheme in ("rediss", "https") or (
            self.kind == "pg" and self.params.get("sslnegotiation") == "direct"
        )


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"invalid URL {redact(text)!r}: {why}")


def parse_target(text: str, *, password: str | None = None) -> Target:
    """Parse ``text``; ``password`` (from --password-env) wins over one in the URL."""
    if len(text) > MAX_URL:
        raise ConfigError(f"URL too long ({len(text)} characters; at most {MAX_URL})")
    if "://" not in text:
        raise _bad(text, f"expected SCHEME://HOST[:PORT] with a scheme among {_schemes()}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _bad(text, f"{exc}") from None
    scheme = parts.scheme.lower()
    kind = KINDS.get(scheme)
    if kind is None:
        raise _bad(text, f"unknown scheme {scheme!r}; use one of {_schemes()}")
    host = parts.hostname or ""
    if not host:
        raise _bad(text, "no host")
    if port is None:
        if scheme not in DEFAULT_PORTS:
            raise _bad(text, "tcp:// needs a port (tcp://HOST:PORT)")
        port = DEFAULT_PORTS[scheme]
    if port == 0:
        raise _bad(text, "port 0 cannot be dialled")
    user = unquote(parts.username or "")
    url_password = unquote(parts.password) if parts.password is not None else None
    params: dict[str, str] = {}
    if kind != "http":
        params = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
        url_password = params.pop("password", url_password)
        user = params.pop("user", user)
    target = Target(
        scheme=scheme,
        kind=kind,
        host=host,
        port=port,
        user=user,
        password=password if password is not None else url_password,
        path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        params=params,
        display=redact(text),
    )
    path = unquote(parts.path.lstrip("/"))
    if kind == "pg":
        target.user = target.user or "postgres"
        target.database = params.get("dbname", path) or target.user
        target.tls_mode = params.get("sslmode", "prefer").lower()
        target.tls_ca = params.get("sslrootcert")
        if target.tls_mode not in TLS_MODES:
            raise _bad(text, f"sslmode={target.tls_mode}: use one of {', '.join(TLS_MODES)}")
        if params.get("sslnegotiation", "postgres") not in ("postgres", "direct"):
            raise _bad(text, "sslnegotiation must be postgres or direct")
        if target.direct_tls and target.tls_mode in ("disable", "allow", "prefer"):
            raise _bad(text, "sslnegotiation=direct needs sslmode=require or stronger")
        if params.get("channel_binding", "prefer") not in ("disable", "prefer", "require"):
            raise _bad(text, "channel_binding must be disable, prefer or require")
    elif kind == "mysql":
        target.user = target.user or "root"
        target.database = path
        mode = params.get("ssl-mode", params.get("ssl_mode", "")).lower()
        if not mode and "ssl" in params:
            mode = "required" if params["ssl"].lower() in ("1", "true", "yes") else "disabled"
        target.tls_mode = _MYSQL_MODES.get(mode or "preferred", "")
        if not target.tls_mode:
            raise _bad(text, f"ssl-mode={mode}: use one of {', '.join(_MYSQL_MODES).upper()}")
        target.tls_ca = params.get("ssl-ca", params.get("ssl_ca"))
    elif kind == "redis":
        target.database = path
        if path and not path.isdigit():
            raise _bad(text, "the path of a redis URL is a database number (redis://HOST/0)")
        if scheme == "rediss":
            insecure = params.get("ssl_cert_reqs", "required").lower() in ("none", "optional")
            target.tls_mode = "require" if insecure else "verify-full"
            target.tls_ca = params.get("ssl_ca_certs")
    elif scheme == "https":
        target.tls_mode = "verify-full"
    return target


def _schemes() -> str:
    return ", ".join(f"{s}://" for s in KINDS)


def redact(text: str) -> str:
    """``text`` with the URL's password and any secret query parameter shown as ``***``."""
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostpart = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostpart}"
        query = "&".join(
            f"{quote(k)}={'***' if k.lower() in _SECRET_PARAMS else quote(v, safe='/:,= ')}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        )
        return parts._replace(netloc=netloc, query=query).geturl()
    except ValueError:
        # Not a URL we can take apart: show the scheme and nothing that may be a secret.
        head = text.split("://", 1)[0][:20]
        return f"{head}://…" if "://" in text else "(unparseable URL)"
