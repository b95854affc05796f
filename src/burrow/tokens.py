"""Scoped tokens: what a client may expose and connect to, checked by the relay without a
database.

A token is ``bt1.<claims>.<signature>``: base64url JSON claims and an HMAC-SHA256 of
``"bt1." + claims`` under the relay's token key (``state_dir/token.key``). The signature is the
holder's secret and never crosses the wire: the client sends the claims plus an HMAC keyed by
the signature over the handshake transcript (``token_proof``), and the relay recomputes the
signature from its key to check that (``TokenVerifier``). Revocation is either one token
(``token.deny``, one id a line) or all of them (``TokenKey.rotate``: a new key, so every old
signature stops matching).

A token may also carry a ``node`` claim: relay nodes of one cluster share the token key and
mint such tokens for the sessions they open to each other (``burrow.roles.cluster``); only a
session proving one may open streams addressed by public port or HTTP name, and the connector
it names (``peer``) is believed. ``burrow token issue`` never mints them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

from burrow.errors import AuthError, ConfigError
from burrow.statefiles import create_once, write_replace

__all__ = [
    "DENY_FILE",
    "KEY_FILE",
    "MAX_CLAIMS",
    "MAX_PATTERNS",
    "NODE_ID_RE",
    "PREFIX",
    "Scope",
    "TokenError",
    "TokenKey",
    "TokenVerifier",
    "check_token_id",
    "deny",
    "is_token_id",
    "load_deny",
    "mint",
    "parse_token",
    "parse_ttl",
    "token_proof",
]

PREFIX: Final = "bt1."
KEY_FILE: Final = "token.key"
DENY_FILE: Final = "token.deny"
KEY_SIZE: Final = 32
MAX_CLAIMS: Final = 4096
"""Most bytes of claims JSON; a token is pasted into env vars and flags, so it must stay short."""
MAX_PATTERNS: Final = 64
"""Most expose + connect globs in one token."""
MAX_PATTERN_LENGTH: Final = 255
MAX_TTL: Final = 100 * 365 * 86400
"""Longest finite lifetime; beyond it use "never" (and keeps expiry dates printable)."""

_MAX_CLAIMS_B64: Final = (MAX_CLAIMS * 4 + 2) // 3
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
MAX_SUBJECT = 128
_ID_RE: Final = re.compile(r"[0-9a-f]{12}")
#: A relay node's id, as ``burrow relay --node-id`` takes it (it names Redis keys too).
NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAC_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_TTL_RE: Final = re.compile(r"([0-9]{1,12})([smhdw])")
_TTL_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ISSUE_HINT: Final = "issue a new one with `burrow token issue`"

Kind = Literal["expose", "connect"]


class TokenError(AuthError):
    """A token is malformed, expired, revoked or not from this relay. ``reason`` is a stable
    word for logs and metrics: malformed, signature, wrong_key, version, expired, revoked."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


# --- base64url -----------------------------------------------------------------------------


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding: urlsafe_b64decode alone skips stray characters."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the relay's key and deny list ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenKey:
    """The relay's token signing key; ``kid`` names it in tokens so a token from another relay
    (or from before a rotation) gets a precise error rather than "bad signature"."""

    secret: bytes = field(repr=False)
    kid: str

    @classmethod
    def from_secret(cls, secret: bytes) -> TokenKey:
        if len(secret) != KEY_SIZE:
            raise ValueError(f"a token key is {KEY_SIZE} bytes, not {len(secret)}")
        return cls(secret, hashlib.sha256(secret).hexdigest()[:8])

    @classmethod
    def load_or_create(cls, state_dir: Path) -> TokenKey:
        """The key in ``state_dir/token.key``, created (mode 0600) on first use."""
        return cls.create(state_dir)[0]

    @classmethod
    def create(cls, state_dir: Path) -> tuple[TokenKey, bool]:
        """The key in ``state_dir``, and whether this call made it (several processes racing
        all end up with the one that won)."""
        path = state_dir / KEY_FILE
        try:
            return cls._load(path), False
        except FileNotFoundError:
            pass
        _, created = create_once(path, lambda: secrets.token_bytes(KEY_SIZE).hex().encode() + b"\n")
        return cls._load(path), created

    @classmethod
    def load(cls, state_dir: Path) -> TokenKey:
        """The key in ``state_dir``; a ``ConfigError`` that says what to do if there is none
        (a mistyped --state-dir must not silently mint tokens no relay accepts)."""
        path = state_dir / KEY_FILE
        try:
            return cls._load(path)
        except FileNotFoundError:
            raise ConfigError(
                f"no token key at {path}: is {state_dir} the relay's --state-dir? Create the "
                f"key with `burrow token init --state-dir {state_dir}` (a relay that requires "
                "tokens makes one at start)"
            ) from None

    @classmethod
    def rotate(cls, state_dir: Path) -> TokenKey:
        """Replace the key with a new one. Every token signed by the old key stops verifying:
        this is how all tokens are revoked at once."""
        key = cls.from_secret(secrets.token_bytes(KEY_SIZE))
        write_replace(state_dir / KEY_FILE, key.secret.hex().encode() + b"\n", 0o600)
        return key

    @classmethod
    def _load(cls, path: Path) -> TokenKey:
        with path.open("rb") as f:
            if os.name == "posix" and os.fstat(f.fileno()).st_mode & 0o077:
                raise ConfigError(
                    f"token key {path} is readable by other users; run `chmod 600 {path}`"
                )
            text = f.read(256)
        try:
            secret = bytes.fromhex(text.decode("ascii").strip())
            return cls.from_secret(secret)
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(
                f"token key {path} is corrupt (expected {KEY_SIZE * 2} hex digits); delete it "
                "to make a new key, which revokes every token"
            ) from None


def load_deny(state_dir: Path) -> frozenset[str]:
    """Token ids in ``state_dir/token.deny`` (one a line, ``#`` comments); empty if absent."""
    try:
        text = (state_dir / DENY_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return frozenset()
    return frozenset(
        line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()
    )


def check_token_id(token_id: str) -> str:
    """``token_id`` stripped, or a ``ConfigError`` saying what a token id looks like."""
    token_id = token_id.strip()
    if not _ID_RE.fullmatch(token_id):
        raise ConfigError(
            f"{token_id[:40]!r} is not a token id (12 hex digits, shown by `burrow token issue`)"
        )
    return token_id


def is_token_id(text: str) -> bool:
    return _ID_RE.fullmatch(text) is not None


def deny(state_dir: Path, token_id: str) -> None:
    """Revoke one token by adding its id to ``state_dir/token.deny``; a relay reads the file
    when it (re)loads its verifier."""
    token_id = check_token_id(token_id)
    if token_id in load_deny(state_dir):
        return
    path = state_dir / DENY_FILE
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(token_id + "\n")


# --- scopes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """What a session may do: tunnel names it may expose and names it may connect to, as
    fnmatch globs (case-sensitive). ``Scope.ALL`` is the shared-secret case."""

    expose: tuple[str, ...]
    connect: tuple[str, ...]
    token_id: str | None = None
    subject: str | None = None  # who the token was given to
    node: str | None = None  # a relay node of the same cluster (its node link)

    @property
    def holder(self) -> str:
        """How the holder is named in logs: ``token:SUBJECT`` (or the token's id)."""
        return f"token:{self.subject or self.token_id}"

    ALL: ClassVar[Scope]

    def may_expose(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.expose)

    def may_connect(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.connect)

    def allows(self, kind: Kind, name: str) -> bool:
        return self.may_expose(name) if kind == "expose" else self.may_connect(name)

    def missing(self, kind: Kind, name: str) -> str:
        """The refusal for ``name``, listing what the token does allow so the user can see
        whether to fix the name or issue a broader token."""
        patterns = self.expose if kind == "expose" else self.connect
        verb = "expose" if kind == "expose" else "connect to"
        allowed = f"it may {verb}: {', '.join(patterns)}" if patterns else f"it may {verb} nothing"
        return f"this token may not {verb} {name!r} ({allowed})"


Scope.ALL = Scope(("*",), ("*",), None)


# --- claims --------------------------------------------------------------------------------


def _patterns(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of glob patterns")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(f"{name} pattern {pattern!r} is empty, too long or not a string")
        if any(ord(c) < 0x20 or c == "\x7f" for c in pattern):
            raise ValueError(f"{name} pattern {pattern!r} has a control character")
    return tuple(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_claims(claims: object) -> dict[str, Any]:
    """Validate decoded claims; ValueError says which field is wrong."""
    if not isinstance(claims, dict):
        raise ValueError("claims are not a JSON object")
    if not _is_int(claims.get("v")) or claims["v"] != 1:
        raise ValueError(f"unsupported token version {claims.get('v')!r}")
    if not isinstance(claims.get("id"), str) or not _ID_RE.fullmatch(claims["id"]):
        raise ValueError("bad id")
    if not isinstance(claims.get("kid"), str) or not 1 <= len(claims["kid"]) <= 64:
        raise ValueError("bad kid")
    if not _is_int(claims.get("iat")):
        raise ValueError("bad iat")
    exp = claims.get("exp")
    if exp is not None and not _is_int(exp):
        raise ValueError("bad exp")
    sub = claims.get("sub")
    if sub is not None and (
        not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUBJECT or not sub.isprintable()
    ):
        raise ValueError(f"sub must be 1 to {MAX_SUBJECT} printable characters")
    node = claims.get("node")
    if node is not None and (not isinstance(node, str) or not NODE_ID_RE.fullmatch(node)):
        raise ValueError("node must be a node id (letters, digits, '.', '_', '-'; 64 at most)")
    expose = _patterns(claims.get("expose"), "expose")
    connect = _patterns(claims.get("connect"), "connect")
    if len(expose) + len(connect) > MAX_PATTERNS:
        raise ValueError(f"more than {MAX_PATTERNS} patterns")
    return claims


def _decode_claims(claims_b64: str) -> dict[str, Any]:
    if len(claims_b64) > _MAX_CLAIMS_B64:
        raise ValueError(f"claims longer than {MAX_CLAIMS} bytes")
    try:
        claims = json.loads(_b64decode(claims_b64))
    except RecursionError:
        raise ValueError("claims nest too deeply") from None
    return _check_claims(claims)


def _signature(key: TokenKey, claims_b64: str) -> bytes:
    return hmac.new(key.secret, (PREFIX + claims_b64).encode("ascii"), hashlib.sha256).digest()


def mint(
    key: TokenKey,
    expose: Sequence[str],
    connect: Sequence[str],
    ttl_seconds: int | None,
    now: float,
    subject: str | None = None,
    node: str | None = None,
) -> str:
    """A new token allowing ``expose`` and ``connect`` globs, valid for ``ttl_seconds`` from
    ``now`` (None: until revoked), naming its holder ``subject`` (who it was given to: it
    shows in the logs of what the holder does); ``node`` makes it a relay node's token for
    the node links of a cluster. Raises ConfigError on what it cannot carry."""
    if ttl_seconds is not None and not (_is_int(ttl_seconds) and 0 < ttl_seconds <= MAX_TTL):
        raise ConfigError(f"token lifetime must be 1 to {MAX_TTL} seconds, or 'never'")
    try:
        claims = _check_claims(
            {
                "v": 1,
                "id": secrets.token_hex(6),
                "kid": key.kid,
                "iat": int(now),
                "exp": None if ttl_seconds is None else int(now) + ttl_seconds,
                "expose": list(_patterns(expose, "expose")),
                "connect": list(_patterns(connect, "connect")),
                **({"sub": subject} if subject is not None else {}),
                **({"node": node} if node is not None else {}),
            }
        )
    except ValueError as exc:
        raise ConfigError(f"cannot issue this token: {exc}") from None
    raw = json.dumps(claims, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if len(raw) > MAX_CLAIMS:
        raise ConfigError(
            f"token claims are {len(raw)} bytes, over {MAX_CLAIMS}; use fewer or shorter patterns"
        )
    claims_b64 = _b64encode(raw)
    return f"{PREFIX}{claims_b64}.{_b64encode(_signature(key, claims_b64))}"


def parse_token(text: str) -> tuple[dict[str, Any], str, bytes]:
    """Split a token into ``(claims, claims_b64, signature)``; a client calls it to check a
    token given on the command line before it connects. It cannot tell whether the signature
    is right: only the relay's key can."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise TokenError(f"malformed token: it does not start with {PREFIX!r}")
    claims_b64, dot, sig_b64 = text[len(PREFIX) :].partition(".")
    try:
        if not dot or not claims_b64:
            raise ValueError(f"expected {PREFIX}<claims>.<signature>")
        claims = _decode_claims(claims_b64)
        signature = _b64decode(sig_b64)
        if len(signature) != hashlib.sha256().digest_size:
            raise ValueError("the signature has the wrong length")
    except ValueError as exc:  # includes binascii.Error and UnicodeDecodeError
        raise TokenError(f"malformed token: {exc}") from None
    return claims, claims_b64, signature


def token_proof(token: str, transcript: bytes) -> tuple[str, str]:
    """What a client sends instead of its token: ``(claims_b64, mac_hex)``, the MAC keyed by
    the token's signature over ``transcript``. The transcript must hold a fresh relay nonce,
    so a recorded proof is useless on another session."""
    _, claims_b64, signature = parse_token(token)
    return claims_b64, hmac.new(signature, transcript, hashlib.sha256).hexdigest()


def _format_time(timestamp: int) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenVerifier:
    """The relay's check of a token proof. ``deny`` is kept by reference, so a relay that
    updates its set (after re-reading token.deny) revokes without a new verifier."""

    __slots__ = ("deny", "key")

    def __init__(self, key: TokenKey, deny: Set[str] = frozenset()) -> None:
        self.key = key
        self.deny = deny

    def verify(self, claims_b64: str, mac_hex: str, transcript: bytes, now: float) -> Scope:
        """The scope a valid proof grants; TokenError (one line, safe to send to the client)
        otherwise."""
        if (
            not isinstance(claims_b64, str)
            or not isinstance(mac_hex, str)
            or len(claims_b64) > _MAX_CLAIMS_B64
            or not _B64URL_RE.fullmatch(claims_b64)
            or not _MAC_RE.fullmatch(mac_hex)
        ):
            raise TokenError("malformed token")
        signature = _signature(self.key, claims_b64)
        expected = hmac.new(signature, transcript, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, bytes.fromhex(mac_hex)):
            raise self._mismatch(claims_b64)
        # From here the claims are the relay's own: only its key could have produced them.
        try:
            claims = _decode_claims(claims_b64)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenError(f"malformed token: {exc}") from None
        if claims["kid"] != self.key.kid:  # only if a TokenKey was built with a foreign kid
            raise TokenError(f"token was signed by another relay key (kid {claims['kid']})")
        if claims["id"] in self.deny:
            raise TokenError(f"token {claims['id']} has been revoked", "revoked")
        exp = claims["exp"]
        if exp is not None and now >= exp:
            raise TokenError(f"token expired at {_format_time(exp)}; {_ISSUE_HINT}", "expired")
        return Scope(
            tuple(claims["expose"]),
            tuple(claims["connect"]),
            claims["id"],
            claims.get("sub"),
            claims.get("node"),
        )

    def _mismatch(self, claims_b64: str) -> TokenError:
        """Why a proof did not verify. The claims are unauthenticated here and only pick the
        message: another relay's key (or a rotated one) is the common, fixable case."""
        try:
            claims = json.loads(_b64decode(claims_b64))
        except (ValueError, RecursionError):
            return TokenError("malformed token")
        kid = claims.get("kid") if isinstance(claims, dict) else None
        if not isinstance(kid, str):
            return TokenError("malformed token")
        if claims.get("v") != 1:
            return TokenError(
                f"token version {claims.get('v')!r} is not supported by this relay; {_ISSUE_HINT}",
                "version",
            )
        if kid != self.key.kid:
            return TokenError(
                f"token was signed by another relay key (kid {kid[:16]!r}, this relay uses "
                f"{self.key.kid}); it is from another relay or from before a key rotation; "
                f"{_ISSUE_HINT}",
                "wrong_key",
            )
        return TokenError(
            "token does not verify (altered or truncated); paste the whole token, or "
            f"{_ISSUE_HINT}",
            "signature",
        )


def parse_ttl(text: str) -> int | None:
    """``30d``, ``12h``, ``15m``, ``3600s``, ``2w`` in seconds, or None for ``never``."""
    value = text.strip().lower()
    if value == "never":
        return None
    match = _TTL_RE.fullmatch(value)
    if match is None:
        raise ConfigError(
            f"invalid token lifetime {text!r}; use a number and a unit (30d, 12h, 15m, 3600s) "
            "or 'never'"
        )
    seconds = int(match[1]) * _TTL_UNITS[match[2]]
    if not 0 < seconds <= MAX_TTL:
        raise ConfigError(
            f"token lifetime {text!r} must be more than 0 and at most {MAX_TTL // 86400}d; "
            "use 'never' for no expiry"
        )
    return seconds
