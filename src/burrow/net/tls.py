"""TLS for the relay's control port: the relay's self-signed certificate, server and client
contexts, and the three ways a client decides to trust a relay (CA, pinned fingerprint, TOFU).

Pin and TOFU modes cannot be expressed as an ``ssl`` verify mode, so their contexts skip chain
verification and the caller must call :meth:`TrustPolicy.verify` right after the handshake,
before sending anything (the secret in particular) over the connection.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # certificates are made by relays only: clients do not pay for x509
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

from burrow.errors import ConfigError, TLSVerifyError
from burrow.statefiles import create_once

__all__ = [
    "ALPN_PROTOCOL",
    "KNOWN_RELAYS_MAX_BYTES",
    "CertPair",
    "KnownRelays",
    "TrustMode",
    "TrustPolicy",
    "client_context",
    "default_known_relays_path",
    "default_state_dir",
    "describe_ssl_error",
    "fingerprint_of_der",
    "fingerprint_of_pem_file",
    "load_or_create_relay_cert",
    "normalize_fingerprint",
    "server_context",
]

ALPN_PROTOCOL = "burrow/1"
"""Negotiated on the control port so a burrow client never talks to some other TLS service."""

CERT_FILE = "relay.crt"
KEY_FILE = "relay.key"
CERT_COMMON_NAME = "burrow relay"
CERT_VALIDITY = datetime.timedelta(days=3650)
# Backdate notBefore a little so a client whose clock runs behind still accepts a fresh cert.
CERT_BACKDATE = datetime.timedelta(hours=1)

KNOWN_RELAYS_MAX_BYTES = 1 << 20
"""known_relays is read whole on every connect; refuse anything that cannot be a sane file."""

_FINGERPRINT_PREFIX = "sha256:"
_HEX_DIGITS = frozenset("0123456789abcdef")


# --------------------------------------------------------------------------- paths


def _burrow_home() -> Path | None:
    """$BURROW_HOME relocates every file burrow keeps (tests, containers, multiple profiles)."""
    home = os.environ.get("BURROW_HOME", "")
    return Path(home).expanduser() if home else None


def default_state_dir(role: str) -> Path:
    """Where a role (``relay``, ``agent``, ...) keeps state that must survive restarts."""
    home = _burrow_home()
    if home is not None:
        return home / role
    return Path.home() / ".local" / "state" / "burrow" / role


def default_known_relays_path() -> Path:
    """The TOFU file clients share, like SSH's ~/.ssh/known_hosts."""
    home = _burrow_home()
    if home is not None:
        return home / "known_relays"
    return Path.home() / ".config" / "burrow" / "known_relays"


# --------------------------------------------------------------------------- fingerprints


def fingerprint_of_der(der: bytes) -> str:
    """Canonical fingerprint of a DER certificate: what the relay prints and clients pin."""
    return _FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_of_pem_file(path: Path | str) -> str:
    """Fingerprint of the first certificate in a PEM file (the leaf, for a chain file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc.strerror or exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(
            f"{path} is not a PEM certificate; remove it to have burrow generate a new one"
        ) from exc
    return fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))


def normalize_fingerprint(text: str) -> str:
    """Accept the forms people paste (``sha256:HEX``, bare hex, ``AA:BB:..``) and return
    ``sha256:<lowercase hex>`` so comparisons are plain string equality."""
    candidate = text.strip().lower()
    if candidate.startswith(_FINGERPRINT_PREFIX):
        candidate = candidate[len(_FINGERPRINT_PREFIX) :]
    if ":" in candidate:
        groups = candidate.split(":")
        digits = "".join(groups) if all(len(g) == 2 for g in groups) else ""
    else:
        digits = candidate
    if len(digits) != 64 or not _HEX_DIGITS.issuperset(digits):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(
            f"invalid fingerprint {shown!r}: expected sha256: followed by 64 hex digits "
            "(as printed by `burrow relay`)"
        )
    return _FINGERPRINT_PREFIX + digits


# --------------------------------------------------------------------------- relay certificate


@dataclass(frozen=True)
class CertPair:
    """The relay's certificate and key on disk, with the fingerprint clients pin."""

    cert_path: Path
    key_path: Path
    fingerprint: str


def load_or_create_relay_cert(state_dir: Path, hostnames: Sequence[str] = ()) -> CertPair:
    """Reuse the relay's certificate so its fingerprint (pinned or remembered by clients) stays
    the same across restarts; generate a self-signed one on first start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path = state_dir / CERT_FILE
    key_path = state_dir / KEY_FILE
    if cert_path.is_file() and key_path.is_file():
        return CertPair(cert_path, key_path, fingerprint_of_pem_file(cert_path))

    sans = _subject_alt_names(hostnames)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create state directory {state_dir}: {exc.strerror or exc}; "
            "check its permissions or set BURROW_HOME"
        ) from exc

    # Several relays may start at once on one state directory: the key is made once (the
    # first to publish it wins, the others read it), then the certificate the same way, from
    # that key. A key left without a certificate (a crash in between) gets one now.
    try:
        key_pem, _ = create_once(key_path, _new_key_pem, 0o600)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC key")
        cert_pem, _ = create_once(cert_path, lambda: _self_signed(key, sans), 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write the relay's certificate in {state_dir}: {exc}") from exc
    except ValueError:
        raise ConfigError(
            f"{key_path} is not a relay key; delete it (and {cert_path}) to make new ones"
        ) from None
    cert = x509.load_pem_x509_certificate(cert_pem)
    return CertPair(
        cert_path, key_path, fingerprint_of_der(cert.public_bytes(serialization.Encoding.DER))
    )


def _new_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _self_signed(key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERT_COMMON_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _subject_alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """localhost, loopback, this host's name and the operator's names, without duplicates."""
    from cryptography import x509

    sans: list[x509.GeneralName] = []

    def add(entry: x509.GeneralName) -> None:
        if entry not in sans:
            sans.append(entry)

    add(x509.DNSName("localhost"))
    add(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    add(x509.IPAddress(ipaddress.ip_address("::1")))
    local = socket.gethostname()
    if local and _dns_name_ok(local):
        add(x509.DNSName(local.lower()))
    for raw in hostnames:
        host = raw.strip().strip("[]")
        try:
            add(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _dns_name_ok(host):
            raise ConfigError(
                f"invalid hostname {raw!r} for the relay certificate: "
                "expected a DNS name or an IP address"
            )
        add(x509.DNSName(host.lower()))
    return sans


def _dns_name_ok(host: str) -> bool:
    """An ASCII DNS name (wildcards allowed) that X.509 and OpenSSL hostname checks accept."""
    if not host or len(host) > 253 or not host.isascii():
        return False
    labels = host.rstrip(".").split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True


# --------------------------------------------------------------------------- contexts


class DirectSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose ``read``, ``write`` and ``pending`` are the C methods themselves.

    The event loop's TLS layer binds these three once per connection and calls them for every
    record; the standard class wraps each in a Python method, an interpreted frame per call
    (and one more traceback entry on every ``SSLWantReadError``): about 5 % of the relay's
    instructions per round trip. Same calls, same results; the C ``read`` takes its size
    positionally and has no default, and asyncio and uvloop always pass it."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        obj = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = getattr(obj, "_sslobj", None)
        if inner is not None:  # else a Python without the C object: keep the wrappers
            obj.read = inner.read
            obj.write = inner.write
            obj.pending = inner.pending
        return obj  # type: ignore[no-any-return]


def _direct(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.sslobject_class = DirectSSLObject
    return ctx


def server_context(cert_path: Path | str, key_path: Path | str) -> ssl.SSLContext:
    """TLS 1.2+ with forward-secret AES-GCM only, and the burrow ALPN id."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM")  # TLS 1.2 only; OpenSSL's TLS 1.3 suites are all AEAD.
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except OSError as exc:  # ssl.SSLError is an OSError too, but without a useful strerror
        raise ConfigError(
            f"cannot load TLS certificate {cert_path} with key {key_path}: "
            f"{_os_error_detail(exc)}; check that the files exist and belong together"
        ) from exc
    return _direct(ctx)


def _os_error_detail(exc: OSError) -> str:
    """A short lowercase reason: OpenSSL's reason code for ssl.SSLError, else strerror."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.replace("_", " ").lower()
    return (exc.strerror or str(exc)).lower()


class TrustMode(enum.Enum):
    """How a client decides that the relay it reached is the one it meant."""

    CA = "ca"  # certificate chain and hostname checked by OpenSSL
    PIN = "pin"  # SHA-256 of the certificate equals --fingerprint
    TOFU = "tofu"  # first fingerprint seen is remembered in known_relays
    INSECURE = "insecure"  # plaintext, no TLS at all


def client_context(mode: TrustMode, ca_file: Path | None = None) -> ssl.SSLContext:
    """Client context for ``mode``; in PIN and TOFU mode it verifies nothing by itself, so the
    caller must run :meth:`TrustPolicy.verify` after the handshake."""
    if mode is TrustMode.INSECURE:
        raise ValueError("insecure mode uses plaintext and has no SSL context")
    if mode is TrustMode.CA:
        # With a cafile, create_default_context trusts only that CA, not the system store:
        # a relay on a private CA must not also be vouched for by any public CA.
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        except OSError as exc:  # FileNotFoundError, or ssl.SSLError for a bad PEM
            raise ConfigError(
                f"cannot load CA file {ca_file}: {_os_error_detail(exc)}; "
                "pass a PEM file with the CA certificate that issued the relay's certificate"
            ) from exc
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    return _direct(ctx)


def describe_ssl_error(exc: ssl.SSLError, relay_key: str) -> TLSVerifyError:
    """Turn OpenSSL's handshake failure into one line that says what to do about it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or exc.reason or "verification failed").rstrip(".")
        hint = (
            "connect using a name the certificate lists, or pass --fingerprint to pin it"
            if "mismatch" in detail.lower()  # hostname or IP address mismatch
            else "pass --ca-file with the CA that issued it, or --fingerprint to pin it"
        )
        message = (
            f"relay {relay_key} presented a certificate that did not verify ({detail}); {hint}"
        )
    else:
        reason = exc.reason or exc.strerror or str(exc) or type(exc).__name__
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            hint = "is it a burrow relay with TLS enabled (not --insecure)?"
        elif reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"):
            hint = "the relay does not speak TLS 1.2 or newer"
        elif reason in ("SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SHARED_CIPHER"):
            hint = "the relay offers no cipher burrow accepts (ECDHE with AES-GCM)"
        else:
            hint = "check that the address points at a burrow relay"
        shown = reason.replace("_", " ").lower()
        message = f"TLS handshake with relay {relay_key} failed ({shown}); {hint}"
    return TLSVerifyError(" ".join(message.split()))


# --------------------------------------------------------------------------- known relays


class KnownRelays:
    """The TOFU memory: one ``HOST:PORT sha256:HEX`` line per relay, ``#`` starts a comment.

    Malformed lines are skipped rather than fatal so one bad hand edit does not lock a user
    out of every relay; the file is read whole, so it is capped at 1 MiB.
    """

    HEADER = "# burrow known relays: HOST:PORT sha256:FINGERPRINT (remove a line to forget)\n"

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[tuple[str, str]]:
        """All well-formed (key, fingerprint) pairs, in file order."""
        try:
            with self.path.open("rb") as f:
                data = f.read(KNOWN_RELAYS_MAX_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        if len(data) > KNOWN_RELAYS_MAX_BYTES:
            raise ConfigError(
                f"{self.path} is larger than {KNOWN_RELAYS_MAX_BYTES} bytes; "
                "it is not a known-relays file, move it away or pass --fingerprint"
            )
        found: list[tuple[str, str]] = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) != 2:
                continue
            try:
                found.append((fields[0], normalize_fingerprint(fields[1])))
            except ConfigError:
                continue
        return found

    def lookup(self, key: str) -> str | None:
        """The remembered fingerprint for ``key``; the first line wins if it appears twice."""
        for known_key, fingerprint in self.entries():
            if known_key == key:
                return fingerprint
        return None

    def remember(self, key: str, fingerprint: str) -> None:
        """Append ``key``; one ``write`` on an O_APPEND file so concurrent agents don't
        interleave lines."""
        if not key or any(c.isspace() or c == "#" for c in key):
            raise ConfigError(f"cannot remember relay {key!r}: its address has spaces or '#'")
        fingerprint = normalize_fingerprint(fingerprint)
        line = f"{key} {fingerprint}\n"
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    line = self.HEADER + line
                elif not self._ends_with_newline(size):
                    line = "\n" + line
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise ConfigError(
                f"cannot record relay {key} in {self.path}: {exc.strerror or exc}; "
                "fix its permissions or pass --fingerprint"
            ) from exc

    def _ends_with_newline(self, size: int) -> bool:
        """True if the file's last byte is a newline (a hand edit may have dropped it)."""
        with self.path.open("rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"


# --------------------------------------------------------------------------- trust policy


@dataclass(frozen=True)
class TrustPolicy:
    """What a client trusts: a CA (``ca_file``, or the system store when nothing else is
    given and TOFU is off), a pinned ``fingerprint``, or — with neither — trust on first use
    recorded in ``known_relays`` (default :func:`default_known_relays_path`).

    Build it from user flags: the constructor normalises the fingerprint and rejects
    contradictory combinations with :class:`ConfigError`.
    """

    ca_file: Path | None = None
    fingerprint: str | None = None
    known_relays: Path | None = None
    insecure: bool = False
    system_ca: bool = field(default=False, kw_only=True)
    """CA mode against the system trust store (a relay with a publicly issued certificate)."""

    def __post_init__(self) -> None:
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", normalize_fingerprint(self.fingerprint))
        chosen = [
            flag
            for flag, on in (
                ("--ca-file", self.ca_file is not None),
                ("--fingerprint", self.fingerprint is not None),
                ("--insecure", self.insecure),
                ("--system-ca", self.system_ca),
            )
            if on
        ]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} cannot be combined; choose one")

    @property
    def mode(self) -> TrustMode:
        """Which of the trust modes these settings select."""
        if self.insecure:
            return TrustMode.INSECURE
        if self.ca_file is not None or self.system_ca:
            return TrustMode.CA
        if self.fingerprint is not None:
            return TrustMode.PIN
        return TrustMode.TOFU

    @property
    def known_relays_path(self) -> Path:
        """The TOFU file this policy reads and appends to."""
        return self.known_relays if self.known_relays is not None else default_known_relays_path()

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client context, or None for plaintext (--insecure)."""
        mode = self.mode
        if mode is TrustMode.INSECURE:
            return None
        return client_context(mode, self.ca_file)

    def verify(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        relay_key: str,
        *,
        on_first_use: Callable[[str, str], None] | None = None,
    ) -> str:
        """Check the handshaken peer against the pin or known_relays; return its fingerprint.

        ``relay_key`` is ``HOST:PORT`` as the user wrote it (``[v6]:PORT`` for IPv6), which is
        both the known_relays key and what error messages show. In TOFU mode a relay seen for
        the first time is remembered and ``on_first_use(relay_key, fingerprint)`` is called so
        the caller can log "trusting relay HOST:PORT on first use: sha256:...".
        """
        mode = self.mode
        if mode is TrustMode.INSECURE:
            raise ValueError("insecure mode has no TLS peer to verify")
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            raise TLSVerifyError(
                f"relay {relay_key} presented no certificate; check that it is a burrow relay"
            )
        actual = fingerprint_of_der(der)
        if mode is TrustMode.CA:
            return actual
        if mode is TrustMode.PIN:
            pinned = self.fingerprint
            assert pinned is not None
            if not hmac.compare_digest(actual, pinned):
                raise TLSVerifyError(
                    f"relay at {relay_key} presented certificate {actual} but --fingerprint "
                    f"pins {pinned}; check the fingerprint printed by `burrow relay`"
                )
            return actual
        known = KnownRelays(self.known_relays_path)
        remembered = known.lookup(relay_key)
        if remembered is None:
            known.remember(relay_key, actual)
            if on_first_use is not None:
                on_first_use(relay_key, actual)
            return actual
        if not hmac.compare_digest(actual, remembered):
            path = known.path
            raise TLSVerifyError(
                f"relay {relay_key} presented {actual}, but {path} remembers {remembered}; "
                f"if the relay's certificate really changed, remove its line from {path} "
                "or pass --fingerprint"
            )
        return actual
