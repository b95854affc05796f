"""Scoped tokens: minting, proofs, verification, revocation, scopes and TTLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.errors import AuthError, BurrowError, ConfigError
from burrow.tokens import (
    DENY_FILE,
    KEY_FILE,
    MAX_CLAIMS,
    MAX_PATTERNS,
    Scope,
    TokenError,
    TokenKey,
    TokenVerifier,
    deny,
    load_deny,
    mint,
    parse_token,
    parse_ttl,
    token_proof,
)

NOW = 1_780_000_000.0  # 2026-05-28T20:26:40Z
TRANSCRIPT = b"burrow-auth-v1" + b"r" * 32 + b"c" * 32


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def key(tmp_path: Path) -> TokenKey:
    return TokenKey.load_or_create(tmp_path / "state")


def verify(key: TokenKey, token: str, now: float = NOW, **kw: Any) -> Scope:
    claims_b64, mac = token_proof(token, TRANSCRIPT)
    return TokenVerifier(key, **kw).verify(claims_b64, mac, TRANSCRIPT, now)


# --- the key -------------------------------------------------------------------------------


def test_key_is_created_private_and_reloaded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = TokenKey.load_or_create(state)
    path = state / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    assert len(key.secret) == 32
    assert key.kid == hashlib.sha256(key.secret).hexdigest()[:8]
    assert TokenKey.load_or_create(state) == key
    assert key.secret.hex() not in repr(key)
    assert [p.name for p in state.iterdir()] == [KEY_FILE]  # no temporary files left


def test_corrupt_key_file(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not hex\n")
    os.chmod(tmp_path / KEY_FILE, 0o600)
    with pytest.raises(ConfigError, match="corrupt"):
        TokenKey.load_or_create(tmp_path)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    TokenKey.load_or_create(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        TokenKey.load_or_create(tmp_path)


def test_from_secret_checks_length() -> None:
    with pytest.raises(ValueError):
        TokenKey.from_secret(b"short")


def test_rotation_rejects_old_tokens(tmp_path: Path) -> None:
    old = TokenKey.load_or_create(tmp_path)
    token = mint(old, ["web"], ["db"], None, NOW)
    new = TokenKey.rotate(tmp_path)
    assert new.kid != old.kid
    assert TokenKey.load_or_create(tmp_path) == new
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    with pytest.raises(TokenError, match="signed by another relay key") as info:
        verify(new, token)
    assert info.value.reason == "wrong_key"
    assert old.kid in str(info.value) and "burrow token issue" in str(info.value)
    assert verify(new, mint(new, ["web"], ["db"], None, NOW)).connect == ("db",)


# --- mint and verify -----------------------------------------------------------------------


def test_round_trip(key: TokenKey) -> None:
    token = mint(key, ["web-*"], ["db", "api"], 3600, NOW)
    assert re.fullmatch(r"bt1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}", token)
    claims, claims_b64, signature = parse_token(token)
    assert claims == {
        "v": 1,
        "id": claims["id"],
        "kid": key.kid,
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
        "expose": ["web-*"],
        "connect": ["db", "api"],
    }
    assert re.fullmatch(r"[0-9a-f]{12}", claims["id"])
    assert token == f"bt1.{claims_b64}.{b64(signature)}"
    scope = verify(key, token)
    assert scope == Scope(("web-*",), ("db", "api"), claims["id"])


def test_tokens_get_distinct_ids(key: TokenKey) -> None:
    ids = {parse_token(mint(key, [], ["*"], None, NOW))[0]["id"] for _ in range(50)}
    assert len(ids) == 50


def test_whitespace_around_a_pasted_token_is_ignored(key: TokenKey) -> None:
    token = mint(key, [], ["db"], None, NOW)
    assert parse_token(f"  {token}\n") == parse_token(token)


def test_wrong_key(key: TokenKey, tmp_path: Path) -> None:
    other = TokenKey.load_or_create(tmp_path / "other-relay")
    with pytest.raises(TokenError, match=r"another relay key \(kid ") as info:
        verify(other, mint(key, [], ["db"], None, NOW))
    assert info.value.reason == "wrong_key"


def test_tampered_claims_are_rejected(key: TokenKey) -> None:
    token = mint(key, [], ["db"], None, NOW)
    claims, _, signature = parse_token(token)
    claims["connect"] = ["*"]
    forged_b64 = b64(json.dumps(claims).encode())
    # The holder knows its signature, but it only vouches for the original claims.
    forged = f"bt1.{forged_b64}.{b64(signature)}"
    with pytest.raises(TokenError, match="does not verify") as info:
        verify(key, forged)
    assert info.value.reason == "signature"


def test_tampered_proof_is_rejected(key: TokenKey) -> None:
    claims_b64, mac = token_proof(mint(key, [], ["db"], None, NOW), TRANSCRIPT)
    verifier = TokenVerifier(key)
    bad_mac = ("0" if mac[0] != "0" else "1") + mac[1:]
    with pytest.raises(TokenError, match="does not verify"):
        verifier.verify(claims_b64, bad_mac, TRANSCRIPT, NOW)


def test_proof_is_bound_to_the_transcript(key: TokenKey) -> None:
    claims_b64, mac = token_proof(mint(key, [], ["db"], None, NOW), TRANSCRIPT)
    with pytest.raises(TokenError, match="does not verify"):
        TokenVerifier(key).verify(claims_b64, mac, TRANSCRIPT + b"x", NOW)


def test_mac_hex_case_does_not_matter(key: TokenKey) -> None:
    claims_b64, mac = token_proof(mint(key, [], ["db"], None, NOW), TRANSCRIPT)
    assert TokenVerifier(key).verify(claims_b64, mac.upper(), TRANSCRIPT, NOW).connect == ("db",)


def test_proof_never_contains_the_signature(key: TokenKey) -> None:
    token = mint(key, ["web"], ["db"], 60, NOW)
    _, _, signature = parse_token(token)
    sig_b64 = token.rsplit(".", 1)[1]
    for transcript in (TRANSCRIPT, b"", signature):
        claims_b64, mac_hex = token_proof(token, transcript)
        sent = (claims_b64 + mac_hex).encode()
        for form in (signature, sig_b64.encode(), signature.hex().encode()):
            assert form not in sent
            assert form not in sent.lower()
        assert signature not in bytes.fromhex(mac_hex)
        assert signature not in unb64(claims_b64)
        assert token not in claims_b64 + mac_hex


def test_expired(key: TokenKey) -> None:
    token = mint(key, [], ["db"], 60, NOW)
    assert verify(key, token, NOW + 59.9).connect == ("db",)
    with pytest.raises(TokenError) as info:
        verify(key, token, NOW + 60)
    assert str(info.value) == (
        "token expired at 2026-05-28T20:27:40Z; issue a new one with `burrow token issue`"
    )
    assert info.value.reason == "expired"


def test_never_expires(key: TokenKey) -> None:
    token = mint(key, [], ["db"], None, NOW)
    assert parse_token(token)[0]["exp"] is None
    assert verify(key, token, NOW + 100 * 365 * 86400).connect == ("db",)


def test_revoked_via_deny_list(key: TokenKey, tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = mint(key, [], ["db"], None, NOW)
    keep = mint(key, [], ["db"], None, NOW)
    token_id = parse_token(token)[0]["id"]
    assert load_deny(state) == frozenset()
    deny(state, token_id)
    deny(state, token_id)  # twice is once
    assert (state / DENY_FILE).read_text() == token_id + "\n"
    assert stat.S_IMODE((state / DENY_FILE).stat().st_mode) == 0o600
    denied = load_deny(state)
    assert denied == {token_id}
    with pytest.raises(TokenError, match=f"token {token_id} has been revoked") as info:
        verify(key, token, deny=denied)
    assert info.value.reason == "revoked"
    assert verify(key, keep, deny=denied).connect == ("db",)


def test_deny_file_comments_and_blank_lines(tmp_path: Path) -> None:
    (tmp_path / DENY_FILE).write_text("# revoked 2026-05-01\n\naaaaaaaaaaaa  # laptop lost\n")
    assert load_deny(tmp_path) == {"aaaaaaaaaaaa"}


@pytest.mark.parametrize("bad", ["", "xyz", "AAAAAAAAAAAA", "aaaaaaaaaaaaa", "bt1.abc.def"])
def test_deny_checks_the_id(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="not a token id"):
        deny(tmp_path, bad)


def test_verifier_sees_later_changes_to_its_deny_set(key: TokenKey) -> None:
    token = mint(key, [], ["db"], None, NOW)
    denied: set[str] = set()
    verifier = TokenVerifier(key, denied)
    claims_b64, mac = token_proof(token, TRANSCRIPT)
    verifier.verify(claims_b64, mac, TRANSCRIPT, NOW)
    denied.add(parse_token(token)[0]["id"])
    with pytest.raises(TokenError, match="revoked"):
        verifier.verify(claims_b64, mac, TRANSCRIPT, NOW)


def test_future_version_gets_a_precise_message(key: TokenKey) -> None:
    claims = parse_token(mint(key, [], ["db"], None, NOW))[0] | {"v": 2}
    claims_b64 = b64(json.dumps(claims).encode())
    with pytest.raises(TokenError, match="token version 2 is not supported") as info:
        TokenVerifier(key).verify(claims_b64, "0" * 64, TRANSCRIPT, NOW)
    assert info.value.reason == "version"


def test_signed_but_invalid_claims_are_malformed(key: TokenKey) -> None:
    claims = parse_token(mint(key, [], ["db"], None, NOW))[0] | {"connect": "db"}
    with pytest.raises(TokenError, match="malformed token: connect must be a list"):
        TokenVerifier(key).verify(*token_proof_unchecked(key, claims), TRANSCRIPT, NOW)


def token_proof_unchecked(key: TokenKey, claims: dict[str, Any]) -> tuple[str, str]:
    """A proof for claims parse_token would refuse (so token_proof cannot make it)."""
    claims_b64 = b64(json.dumps(claims).encode())
    sig = hmac.new(key.secret, f"bt1.{claims_b64}".encode(), hashlib.sha256).digest()
    return claims_b64, hmac.new(sig, TRANSCRIPT, hashlib.sha256).hexdigest()


def test_foreign_kid_under_our_key(key: TokenKey) -> None:
    claims = parse_token(mint(key, [], ["db"], None, NOW))[0] | {"kid": "ffffffff"}
    with pytest.raises(TokenError, match="another relay key"):
        TokenVerifier(key).verify(*token_proof_unchecked(key, claims), TRANSCRIPT, NOW)


@pytest.mark.parametrize(
    ("claims_b64", "mac"),
    [
        ("", "0" * 64),
        ("abc", "0" * 63),
        ("abc", "g" * 64),
        ("ab+c", "0" * 64),
        ("ab=c", "0" * 64),
        ("a" * 6000, "0" * 64),
        (b64(b"not json"), "0" * 64),
        (b64(b"[1, 2]"), "0" * 64),
        (b64(b'{"v": 1}'), "0" * 64),
        (b64(b"[" * 3000), "0" * 64),
        ("a", "0" * 64),
    ],
)
def test_malformed_proofs(key: TokenKey, claims_b64: str, mac: str) -> None:
    with pytest.raises(TokenError) as info:
        TokenVerifier(key).verify(claims_b64, mac, TRANSCRIPT, NOW)
    assert str(info.value) == "malformed token" and info.value.reason == "malformed"


def test_token_error_is_a_burrow_auth_error() -> None:
    assert issubclass(TokenError, AuthError) and issubclass(TokenError, BurrowError)


# --- parse_token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "does not start with 'bt1.'"),
        ("bt2.abc.def", "does not start with 'bt1.'"),
        ("bt1.", "expected"),
        ("bt1.abc", "expected"),
        ("bt1..abc", "expected"),
        ("bt1.!!!.abc", "not base64url"),
        (f"bt1.{b64(b'nope')}.abc", "malformed token"),
        (f"bt1.{b64(b'[]')}.abc", "not a JSON object"),
        (f"bt1.{'a' * 6000}.abc", f"longer than {MAX_CLAIMS}"),
    ],
)
def test_parse_token_malformed(text: str, match: str) -> None:
    with pytest.raises(TokenError, match=match):
        parse_token(text)


def test_parse_token_checks_signature_length(key: TokenKey) -> None:
    token = mint(key, [], ["db"], None, NOW)
    with pytest.raises(TokenError, match="wrong length"):
        parse_token(token[:-3])
    with pytest.raises(TokenError, match="malformed"):
        parse_token(token + "!")


# --- mint limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expose", "connect", "ttl", "match"),
    [
        ([], ["x"] * (MAX_PATTERNS + 1), None, f"more than {MAX_PATTERNS}"),
        (["e"] * 32, ["c"] * 33, None, f"more than {MAX_PATTERNS}"),
        ([], ["x" * 250] * 20, None, f"over {MAX_CLAIMS}"),
        ([], "db", None, "list of glob patterns"),
        ([], [""], None, "empty"),
        ([], ["x" * 256], None, "too long"),
        ([], ["a\nb"], None, "control character"),
        ([], [1], None, "not a string"),
        ([], ["db"], 0, "lifetime"),
        ([], ["db"], -5, "lifetime"),
        ([], ["db"], 1.5, "lifetime"),
        ([], ["db"], 200 * 365 * 86400, "lifetime"),
    ],
)
def test_mint_limits(key: TokenKey, expose: Any, connect: Any, ttl: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        mint(key, expose, connect, ttl, NOW)


def test_mint_at_the_pattern_limit(key: TokenKey) -> None:
    token = mint(key, ["e"] * 32, ["c"] * 32, None, NOW)
    assert len(verify(key, token).connect) == 32


# --- scopes --------------------------------------------------------------------------------


def test_glob_scopes() -> None:
    scope = Scope(("web-*", "api"), ("db-?", "cache[12]"), "abcdefabcdef")
    assert scope.may_expose("web-1") and scope.may_expose("api") and scope.may_expose("web-")
    assert not scope.may_expose("apix") and not scope.may_expose("Web-1")  # case-sensitive
    assert scope.may_connect("db-a") and not scope.may_connect("db-ab")
    assert scope.may_connect("cache1") and not scope.may_connect("cache3")
    assert scope.allows("expose", "api") and not scope.allows("connect", "api")


def test_scope_all() -> None:
    assert Scope.ALL.may_expose("anything") and Scope.ALL.may_connect("")
    assert Scope.ALL.token_id is None


def test_missing_messages() -> None:
    scope = Scope(("web-*",), ("web-*", "api"))
    assert scope.missing("connect", "db") == (
        "this token may not connect to 'db' (it may connect to: web-*, api)"
    )
    assert scope.missing("expose", "db") == "this token may not expose 'db' (it may expose: web-*)"
    assert Scope((), ()).missing("expose", "x") == (
        "this token may not expose 'x' (it may expose nothing)"
    )


# --- TTLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("15m", 900),
        ("3600s", 3600),
        ("2w", 14 * 86400),
        (" 1D ", 86400),
        ("never", None),
        ("NEVER", None),
    ],
)
def test_parse_ttl(text: str, seconds: int | None) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "30", "d", "-1d", "1.5h", "30y", "1 d", "0s", "0d", "99999999999d", "forever"]
)
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="lifetime"):
        parse_ttl(text)


# --- properties ----------------------------------------------------------------------------

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)


@given(
    expose=st.lists(names, max_size=8),
    connect=st.lists(names, max_size=8),
    ttl=st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_any_minted_token_verifies(expose: list[str], connect: list[str], ttl: int | None) -> None:
    key = TokenKey.from_secret(b"k" * 32)
    scope = verify(key, mint(key, expose, connect, ttl, NOW))
    assert scope.expose == tuple(expose) and scope.connect == tuple(connect)
    assert all(scope.may_connect(c) for c in connect if not set("*?[") & set(c))


@settings(max_examples=300)
@given(claims_b64=st.text(max_size=200), mac=st.text(max_size=80), token=st.text(max_size=300))
def test_garbage_raises_only_token_errors(claims_b64: str, mac: str, token: str) -> None:
    key = TokenKey.from_secret(b"k" * 32)
    with pytest.raises(TokenError):
        TokenVerifier(key).verify(claims_b64, mac, TRANSCRIPT, NOW)
    with pytest.raises(TokenError):
        parse_token(token)


@settings(max_examples=300)
@given(raw=st.binary(max_size=300))
def test_garbage_claims_with_a_valid_looking_mac(raw: bytes) -> None:
    key = TokenKey.from_secret(b"k" * 32)
    with pytest.raises(TokenError):
        TokenVerifier(key).verify(b64(raw), "ab" * 32, TRANSCRIPT, NOW)
