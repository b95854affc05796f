"""Tests for burrow.net.tls: the relay certificate, fingerprints, known_relays and real
handshakes over 127.0.0.1 in each trust mode."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from burrow.errors import ConfigError, TLSVerifyError
from burrow.net.tls import (
    ALPN_PROTOCOL,
    KNOWN_RELAYS_MAX_BYTES,
    CertPair,
    DirectSSLObject,
    KnownRelays,
    TrustMode,
    TrustPolicy,
    default_known_relays_path,
    default_state_dir,
    describe_ssl_error,
    fingerprint_of_der,
    fingerprint_of_pem_file,
    load_or_create_relay_cert,
    normalize_fingerprint,
    server_context,
)

HEX = "ab" * 32
FP = "sha256:" + HEX


# --------------------------------------------------------------------------- helpers


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def tls_server(
    cert: Path, key: Path, served: list[ssl.SSLObject] | None = None
) -> AsyncIterator[int]:
    """An echo server on 127.0.0.1 with burrow's server context; yields its port. Each
    connection's SSL object is appended to ``served`` when given."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if served is not None:
            served.append(writer.get_extra_info("ssl_object"))
        await _echo(reader, writer)

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context(cert, key))
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def connect(
    port: int,
    policy: TrustPolicy,
    server_hostname: str = "127.0.0.1",
    relay_key: str | None = None,
) -> str:
    """Handshake, verify per ``policy``, round-trip one message; return the fingerprint."""
    ctx = policy.ssl_context()
    assert ctx is not None
    relay_key = relay_key or f"127.0.0.1:{port}"
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
        )
    except ssl.SSLError as exc:
        raise describe_ssl_error(exc, relay_key) from exc
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == ALPN_PROTOCOL
        fingerprint = policy.verify(ssl_object, relay_key)
        writer.write(b"ping")
        await writer.drain()
        assert await reader.readexactly(4) == b"ping"
        return fingerprint
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


@pytest.fixture
def relay(tmp_path: Path) -> CertPair:
    return load_or_create_relay_cert(tmp_path / "relay")


# --------------------------------------------------------------------------- relay certificate


def test_cert_created_once_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state" / "relay"
    first = load_or_create_relay_cert(state)
    cert_bytes = first.cert_path.read_bytes()
    second = load_or_create_relay_cert(state)
    assert second == first
    assert first.cert_path.read_bytes() == cert_bytes
    assert first.fingerprint == fingerprint_of_pem_file(first.cert_path)
    assert first.fingerprint.startswith("sha256:") and len(first.fingerprint) == 7 + 64
    assert stat.S_IMODE(first.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []


def test_new_state_dir_gets_new_fingerprint(tmp_path: Path) -> None:
    a = load_or_create_relay_cert(tmp_path / "a")
    b = load_or_create_relay_cert(tmp_path / "b")
    assert a.fingerprint != b.fingerprint


def test_cert_contents(tmp_path: Path) -> None:
    pair = load_or_create_relay_cert(
        tmp_path, ["relay.example.com", "203.0.113.7", "[2001:db8::1]"]
    )
    cert = x509.load_pem_x509_certificate(pair.cert_path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "burrow relay"
    assert fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER)) == (pair.fingerprint)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert "localhost" in dns and "relay.example.com" in dns
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips
    assert ipaddress.ip_address("203.0.113.7") in ips
    assert ipaddress.ip_address("2001:db8::1") in ips
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650


def test_bad_hostname_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid hostname"):
        load_or_create_relay_cert(tmp_path, ["not a host"])


def test_corrupt_cert_is_config_error(tmp_path: Path) -> None:
    pair = load_or_create_relay_cert(tmp_path)
    pair.cert_path.write_text("garbage")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_or_create_relay_cert(tmp_path)


def test_server_context_mismatched_key(tmp_path: Path) -> None:
    a = load_or_create_relay_cert(tmp_path / "a")
    b = load_or_create_relay_cert(tmp_path / "b")
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        server_context(a.cert_path, b.key_path)


# --------------------------------------------------------------------------- fingerprints


@pytest.mark.parametrize(
    "text",
    [
        FP,
        HEX,
        HEX.upper(),
        "SHA256:" + HEX.upper(),
        ":".join([HEX[i : i + 2] for i in range(0, 64, 2)]).upper(),
        "sha256:" + ":".join([HEX[i : i + 2] for i in range(0, 64, 2)]),
        f"  {FP}\n",
    ],
)
def test_normalize_fingerprint_accepts(text: str) -> None:
    assert normalize_fingerprint(text) == FP


@pytest.mark.parametrize(
    "text",
    ["", "xyz", "sha256:", "sha256:" + "ab" * 31, HEX + "ab", "sha1:" + HEX, "g" * 64, "a:b" * 32],
)
def test_normalize_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_fingerprint(text)
    message = str(info.value)
    assert "\n" not in message
    assert "expected sha256: followed by 64 hex digits" in message


def test_fingerprint_of_der() -> None:
    assert fingerprint_of_der(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


# --------------------------------------------------------------------------- known relays


def test_known_relays_remember_lookup(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "known_relays"
    known = KnownRelays(path)
    assert known.lookup("relay:7835") is None
    known.remember("relay:7835", HEX.upper())
    known.remember("[::1]:7835", "sha256:" + "cd" * 32)
    assert known.lookup("relay:7835") == FP
    assert known.lookup("[::1]:7835") == "sha256:" + "cd" * 32
    assert known.lookup("relay:7836") is None
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert KnownRelays(path).lookup("relay:7835") == FP


def test_known_relays_skips_comments_and_malformed(tmp_path: Path) -> None:
    path = tmp_path / "known_relays"
    path.write_text(
        "# comment\n"
        "\n"
        "onlyonefield\n"
        "bad:1 sha256:nothex\n"
        "a:1 b:2 c:3\n"
        f"good:1 {FP}  # trailing comment\n"
        f"\xff\xfe:2 {FP}"  # no final newline
    )
    known = KnownRelays(path)
    assert known.lookup("good:1") == FP
    assert known.lookup("bad:1") is None
    known.remember("new:3", FP)
    assert known.lookup("new:3") == FP
    assert path.read_text().splitlines()[-1] == f"new:3 {FP}"


def test_known_relays_too_large(tmp_path: Path) -> None:
    path = tmp_path / "known_relays"
    path.write_bytes(b"#" * (KNOWN_RELAYS_MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        KnownRelays(path).lookup("a:1")


def test_known_relays_rejects_bad_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        KnownRelays(tmp_path / "k").remember("a b:1", FP)


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BURROW_HOME", str(tmp_path))
    assert default_state_dir("relay") == tmp_path / "relay"
    assert default_known_relays_path() == tmp_path / "known_relays"
    monkeypatch.delenv("BURROW_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir("agent") == tmp_path / "home/.local/state/burrow/agent"
    assert default_known_relays_path() == tmp_path / "home/.config/burrow/known_relays"


# --------------------------------------------------------------------------- trust policy


def test_policy_modes(tmp_path: Path) -> None:
    assert TrustPolicy().mode is TrustMode.TOFU
    assert TrustPolicy(fingerprint=HEX).mode is TrustMode.PIN
    assert TrustPolicy(fingerprint=HEX).fingerprint == FP
    assert TrustPolicy(ca_file=tmp_path / "ca.pem").mode is TrustMode.CA
    assert TrustPolicy(system_ca=True).mode is TrustMode.CA
    assert TrustPolicy(insecure=True).ssl_context() is None
    with pytest.raises(ConfigError, match="cannot be combined"):
        TrustPolicy(ca_file=tmp_path / "ca.pem", fingerprint=FP)
    with pytest.raises(ConfigError, match="invalid fingerprint"):
        TrustPolicy(fingerprint="xyz")


def test_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load CA file"):
        TrustPolicy(ca_file=tmp_path / "nope.pem").ssl_context()


# --------------------------------------------------------------------------- handshakes


async def test_pin_ok(relay: CertPair) -> None:
    async with tls_server(relay.cert_path, relay.key_path) as port:
        policy = TrustPolicy(fingerprint=relay.fingerprint.upper().removeprefix("SHA256:"))
        assert await connect(port, policy) == relay.fingerprint


async def test_pin_mismatch(relay: CertPair) -> None:
    async with tls_server(relay.cert_path, relay.key_path) as port:
        with pytest.raises(TLSVerifyError) as info:
            await connect(port, TrustPolicy(fingerprint=FP))
    message = str(info.value)
    assert f"relay at 127.0.0.1:{port} presented certificate {relay.fingerprint}" in message
    assert f"--fingerprint pins {FP}" in message


async def test_tofu_first_use_then_known(relay: CertPair, tmp_path: Path) -> None:
    known_path = tmp_path / "cfg" / "known_relays"
    policy = TrustPolicy(known_relays=known_path)
    seen: list[tuple[str, str]] = []
    async with tls_server(relay.cert_path, relay.key_path) as port:
        ctx = policy.ssl_context()
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        fp = policy.verify(
            writer.get_extra_info("ssl_object"),
            f"127.0.0.1:{port}",
            on_first_use=lambda key, fp: seen.append((key, fp)),
        )
        writer.close()
        await writer.wait_closed()
        assert fp == relay.fingerprint
        assert seen == [(f"127.0.0.1:{port}", relay.fingerprint)]
        assert KnownRelays(known_path).lookup(f"127.0.0.1:{port}") == relay.fingerprint
        assert await connect(port, policy) == relay.fingerprint
    assert len(KnownRelays(known_path).entries()) == 1


async def test_tofu_changed_cert(relay: CertPair, tmp_path: Path) -> None:
    known_path = tmp_path / "known_relays"
    policy = TrustPolicy(known_relays=known_path)
    key = "relay.test:7835"  # the same address, served first by one cert and then another
    async with tls_server(relay.cert_path, relay.key_path) as port:
        await connect(port, policy, relay_key=key)
    other = load_or_create_relay_cert(tmp_path / "other")
    async with tls_server(other.cert_path, other.key_path) as port:
        with pytest.raises(TLSVerifyError) as info:
            await connect(port, policy, relay_key=key)
    assert str(info.value) == (
        f"relay {key} presented {other.fingerprint}, but {known_path} remembers "
        f"{relay.fingerprint}; if the relay's certificate really changed, remove its line "
        f"from {known_path} or pass --fingerprint"
    )
    assert KnownRelays(known_path).entries() == [(key, relay.fingerprint)]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def _write_trustme(ca: trustme.CA, tmp_path: Path, *names: str) -> tuple[Path, Path, Path]:
    leaf = ca.issue_cert(*names)
    cert, key, ca_pem = tmp_path / "leaf.crt", tmp_path / "leaf.key", tmp_path / "ca.pem"
    for blob in leaf.cert_chain_pems:
        with cert.open("ab") as f:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    return cert, key, ca_pem


async def test_ca_ok(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key, ca_pem = _write_trustme(ca, tmp_path, "localhost", "127.0.0.1")
    async with tls_server(cert, key) as port:
        fp = await connect(port, TrustPolicy(ca_file=ca_pem))
        assert await connect(port, TrustPolicy(ca_file=ca_pem), "localhost") == fp
    assert fp == fingerprint_of_pem_file(cert)


async def test_ca_wrong_ca(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key, _ = _write_trustme(ca, tmp_path, "127.0.0.1")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    async with tls_server(cert, key) as port:
        with pytest.raises(TLSVerifyError) as info:
            await connect(port, TrustPolicy(ca_file=other_ca))
    message = str(info.value)
    assert "\n" not in message
    assert f"relay 127.0.0.1:{port} presented a certificate that did not verify" in message
    assert "--ca-file" in message
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_ca_hostname_mismatch(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key, ca_pem = _write_trustme(ca, tmp_path, "relay.example.com")
    async with tls_server(cert, key) as port:
        with pytest.raises(TLSVerifyError, match="name the certificate lists"):
            await connect(port, TrustPolicy(ca_file=ca_pem))


async def test_plaintext_server_is_described(relay: CertPair) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 4)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TLSVerifyError, match="TLS handshake with relay"):
            await connect(port, TrustPolicy(fingerprint=relay.fingerprint))
    finally:
        server.close()
        await server.wait_closed()


async def test_tls12_uses_aes_gcm(relay: CertPair) -> None:
    async with tls_server(relay.cert_path, relay.key_path) as port:
        ctx = TrustPolicy(fingerprint=relay.fingerprint).ssl_context()
        assert ctx is not None
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        try:
            cipher, version, _ = writer.get_extra_info("cipher")
            assert version == "TLSv1.2"
            assert "ECDHE" in cipher and "GCM" in cipher
        finally:
            writer.close()
            await writer.wait_closed()


# --------------------------------------------------------------------------- the direct SSL object


async def _echo_through_tls(relay: CertPair) -> tuple[ssl.SSLObject, ssl.SSLObject, bytes]:
    """1 MiB each way through a TLS echo server on burrow's contexts, then the client's
    half-close: the two SSL objects and what came back."""
    seen: list[ssl.SSLObject] = []
    async with tls_server(relay.cert_path, relay.key_path, seen) as port:
        ctx = TrustPolicy(fingerprint=relay.fingerprint).ssl_context()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        client = writer.get_extra_info("ssl_object")
        writer.close()
        return client, seen[0], got


def _check_direct(relay: CertPair, loop_factory: Any) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        client, served, got = runner.run(asyncio.wait_for(_echo_through_tls(relay), 20))
    assert got == bytes(range(256)) * 4096
    for obj in (client, served):
        assert isinstance(obj, DirectSSLObject)
        # The record calls go straight to the C object, no Python frame in between.
        for name in ("read", "write", "pending"):
            assert type(getattr(obj, name)).__name__ == "builtin_function_or_method", name


def test_direct_ssl_object_under_asyncio(relay: CertPair) -> None:
    _check_direct(relay, asyncio.new_event_loop)


def test_direct_ssl_object_under_uvloop(relay: CertPair) -> None:
    uvloop = pytest.importorskip("uvloop")
    _check_direct(relay, uvloop.new_event_loop)
