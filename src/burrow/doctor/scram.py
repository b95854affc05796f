"""The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL runs it, sans-I/O.

The doctor authenticates itself, so it needs no driver: three messages, PBKDF2 and two HMACs.
PostgreSQL ignores the SCRAM user name (it uses the startup ``user``), so ``n=`` is empty.
With ``cbind_data`` (tls-server-end-point, RFC 5929) the exchange is SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from typing import Final

MAX_ITERATIONS: Final = 1_000_000  # a hostile server must not make the doctor spin for minutes


class ScramError(Exception):
    """The server's SCRAM message is malformed, or its proof is wrong."""


def saslprep(password: str) -> bytes:
    """RFC 4013 SASLprep; like PostgreSQL, a password it rejects is used as its raw bytes."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    normal = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(c) for c in normal for check in prohibited):
        return password.encode()
    return normal.encode()


def _attributes(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out[part[0]] = part[2:]
    return out


class ScramClient:
    """``first()`` -> send; ``final(server_first)`` -> send; ``verify(server_final)``."""

    def __init__(
        self,
        password: str,
        *,
        user: str = "",
        nonce: str | None = None,
        cbind_data: bytes | None = None,
    ) -> None:
        self._password = saslprep(password)
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._cbind = cbind_data
        self.gs2_header = "p=tls-server-end-point,," if cbind_data is not None else "n,,"
        self.mechanism = "SCRAM-SHA-256-PLUS" if cbind_data is not None else "SCRAM-SHA-256"
        self._first_bare = f"n={user},r={self._nonce}"
        self._auth_message = b""
        self._salted = b""

    def first(self) -> bytes:
        return (self.gs2_header + self._first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        text = server_first.decode("utf-8", "replace")
        attrs = _attributes(text)
        nonce, salt_b64, iterations_text = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if not nonce or salt_b64 is None or iterations_text is None:
            raise ScramError("server-first-message lacks r, s or i")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("the server's nonce does not extend the client's")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            iterations = int(iterations_text)
        except ValueError:
            raise ScramError("bad salt or iteration count") from None
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError(f"iteration count {iterations} out of range")
        self._salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        binding = self.gs2_header.encode() + (self._cbind or b"")
        without_proof = f"c={base64.b64encode(binding).decode()},r={nonce}"
        self._auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        client_key = hmac.digest(self._salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.digest(stored_key, self._auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server's signature: it proves the server knows the password too."""
        attrs = _attributes(server_final.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"server reported SCRAM error {attrs['e']!r}")
        server_key = hmac.digest(self._salted, b"Server Key", "sha256")
        expected = hmac.digest(server_key, self._auth_message, "sha256")
        try:
            got = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise ScramError("malformed server signature") from None
        if not hmac.compare_digest(got, expected):
            raise ScramError("the server's SCRAM signature is wrong")


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 channel binding data: the certificate hashed with its signature hash (MD5 and
    SHA-1 become SHA-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_der_x509_certificate(cert_der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()
