"""The ``tls`` phase: the handshake timed, then the facts a user needs to trust or fix it:
protocol, cipher, the certificate's names against the expected one, its issuer and expiry,
the chain length and ALPN. A failure names which of those is wrong.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from burrow.doctor.link import Link
from burrow.doctor.model import PhaseFailed

if TYPE_CHECKING:
    from burrow.doctor.target import Target

VERIFYING = ("verify-ca", "verify-full")


def make_context(mode: str, ca: str | None, alpn: list[str] | None) -> ssl.SSLContext:
    """libpq's meaning of ``mode``: verify-* check the chain (-full also the name); require and
    prefer encrypt without checking."""
    if mode in VERIFYING:
        try:
            context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        except (OSError, ssl.SSLError) as exc:
            from burrow.errors import ConfigError

            raise ConfigError(f"cannot load the CA file {ca!r}: {exc}") from None
        context.check_hostname = mode == "verify-full"
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


@dataclass
class CertFacts:
    subject: str = ""
    issuer: str = ""
    names: list[str] = field(default_factory=list)
    not_after: datetime.datetime | None = None
    der: bytes = b""

    def matches(self, host: str) -> bool:
        host = host.strip("[]").lower()
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        for name in self.names:
            if ip is not None:
                if name == str(ip):
                    return True
                continue
            name = name.lower()
            if name == host:
                return True
            if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
                return True
        return False

    def days_left(self, now: datetime.datetime) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - now).total_seconds() / 86400


def cert_facts(der: bytes) -> CertFacts:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else name.rfc4514_string()

    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return CertFacts(cn(cert.subject), cn(cert.issuer), names, cert.not_valid_after_utc, der)


def _chain_length(obj: ssl.SSLObject) -> int | None:
    for holder in (obj, getattr(obj, "_sslobj", None)):
        getter = getattr(holder, "get_unverified_chain", None)
        if getter is not None:
            try:
                return len(getter() or [])
            except Exception:
                return None
    return None


@dataclass
class TlsResult:
    detail: str
    facts: CertFacts


async def handshake(
    link: Link,
    *,
    host: str,
    mode: str,
    ca: str | None,
    alpn: list[str] | None,
    timeout: float,
    reopen: Callable[[], Awaitable[Link]] | None = None,
) -> TlsResult:
    """TLS on ``link``; on a verification failure, ``reopen`` gives a fresh link ready for
    TLS so the certificate can still be described in the failure."""
    context = make_context(mode, ca, alpn)
    sni = None if _is_ip(host) else host
    start = time.perf_counter()
    try:
        await link.start_tls(context, host.strip("[]") if mode == "verify-full" else sni, timeout)
    except ssl.SSLCertVerificationError as exc:
        facts = await _peek_cert(reopen, sni, alpn, timeout)
        why = exc.verify_message or str(exc)
        seen = _describe(facts, host)
        if "mismatch" in why.lower() or "hostname" in why.lower():
            cause = f"the certificate is not valid for {host} ({seen})"
            fix = (
                f"connect by a name the certificate holds, or reissue it with {host} in its "
                "subjectAltName"
            )
        elif "expired" in why.lower():
            cause = f"the server's certificate has expired ({seen})"
            fix = "renew the server's certificate"
        else:
            cause = f"the server's certificate does not verify: {why} ({seen})"
            fix = (
                "give the CA that issued it (PostgreSQL: sslrootcert=FILE, e.g. the RDS global "
                "bundle; MySQL: ssl-ca=FILE; others: SSL_CERT_FILE)"
            )
        raise PhaseFailed(f"certificate check failed: {why}; {seen}", cause, fix) from None
    except TimeoutError:
        raise PhaseFailed(
            f"TLS handshake stalled for {timeout:g} s",
            "the TLS handshake stalls: the server's certificate flight (several KB) is lost on "
            "the way, the mark of a path-MTU blackhole",
            "clamp the TCP MSS on the tunnel/VPN (e.g. 1200), or set its MTU to 1280; check "
            "that ICMP 'fragmentation needed' is not filtered",
        ) from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        plain = "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc).lower()
        raise PhaseFailed(
            f"TLS handshake failed: {reason}",
            "the server does not speak TLS on this port"
            if plain
            else f"the TLS handshake failed: {reason}",
            "use the plaintext scheme or the server's TLS port"
            if plain
            else "compare TLS versions and ciphers with the server's settings",
        ) from None
    except (ConnectionError, OSError) as exc:
        raise PhaseFailed(
            f"connection lost during the TLS handshake: {exc}",
            "the server (or a proxy) closed the connection during the TLS handshake",
            "check the server's log; a TLS-terminating proxy may refuse the client's SNI/ALPN",
        ) from None
    ms = (time.perf_counter() - start) * 1000
    obj = link.tls
    if obj is None:
        raise PhaseFailed("no TLS session after the handshake", "internal error", "report it")
    der = obj.getpeercert(binary_form=True) or b""
    facts = cert_facts(der) if der else CertFacts()
    cipher = obj.cipher()
    chain = _chain_length(obj)
    parts = [
        f"{obj.version()} {cipher[0] if cipher else ''} in {ms:.1f} ms".replace("  ", " "),
        _describe(facts, host),
    ]
    if chain:
        parts.append(f"chain of {chain}")
    parts.append(f"ALPN {obj.selected_alpn_protocol() or 'none'}")
    parts.append(
        ("verified, name checked" if mode == "verify-full" else "chain verified, name not checked")
        if mode in VERIFYING
        else f"not verified ({mode})"
    )
    return TlsResult("; ".join(parts), facts)


async def handshake_for(
    target: Target,
    link: Link,
    *,
    alpn: list[str] | None,
    timeout: float,
    reopen: Callable[[], Awaitable[Link]] | None = None,
) -> TlsResult:
    """``handshake`` with the host, verification mode and CA the doctor's URL gave."""
    return await handshake(
        link,
        host=target.host,
        mode=target.tls_mode,
        ca=target.tls_ca,
        alpn=alpn,
        timeout=timeout,
        reopen=reopen,
    )


def _describe(facts: CertFacts | None, host: str) -> str:
    if facts is None or not facts.der:
        return "certificate not seen"
    now = datetime.datetime.now(datetime.UTC)
    days = facts.days_left(now)
    expiry = ""
    if facts.not_after is not None and days is not None:
        expiry = (
            f", EXPIRED on {facts.not_after:%Y-%m-%d}"
            if days < 0
            else f", expires {facts.not_after:%Y-%m-%d} ({days:.0f} days)"
        )
    match = "matches" if facts.matches(host) else "does NOT match"
    names = ", ".join(facts.names[:5]) or "none"
    return (
        f"certificate CN={facts.subject} SAN [{names}] {match} {host}, "
        f"issued by {facts.issuer}{expiry}"
    )


async def _peek_cert(
    reopen: Callable[[], Awaitable[Link]] | None,
    sni: str | None,
    alpn: list[str] | None,
    timeout: float,
) -> CertFacts | None:
    if reopen is None:
        return None
    try:
        link = await reopen()
    except Exception:
        return None
    try:
        await link.start_tls(make_context("require", None, alpn), sni, timeout)
        der = link.tls.getpeercert(binary_form=True) if link.tls else None
        return cert_facts(der) if der else None
    except Exception:
        return None
    finally:
        await link.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
