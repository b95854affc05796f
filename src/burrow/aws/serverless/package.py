"""``burrow serverless package``: the zip the template's functions run. Only the modules the
handlers import (the standard library and boto3 come with Lambda's Python runtime), so the
zip is tens of kilobytes and a cold start compiles little. Entries have a fixed date, so the
same source gives the same zip and the same content hash in its name."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from burrow.errors import BurrowError
from burrow.version import __version__

#: What ``burrow.aws.serverless.handlers`` imports, directly or lazily (a test checks it).
MODULES = (
    "burrow/__init__.py",
    "burrow/version.py",
    "burrow/errors.py",
    "burrow/compiled.py",  # burrow/http/__init__.py checks compiled modules are fresh
    "burrow/tokens.py",
    "burrow/statefiles.py",
    "burrow/roles/__init__.py",
    "burrow/roles/names.py",
    "burrow/http/__init__.py",
    "burrow/http/relaypage.py",
    "burrow/aws/__init__.py",
    "burrow/aws/serverless/__init__.py",
    "burrow/aws/serverless/config.py",
    "burrow/aws/serverless/gateway.py",
    "burrow/aws/serverless/handlers.py",
    "burrow/aws/serverless/protocol.py",
    "burrow/aws/serverless/response.py",
    "burrow/aws/serverless/store.py",
    "burrow/aws/serverless/wsclient.py",
    "burrow/aws/serverless/wsframes.py",
)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class PackageError(BurrowError):
    """The zip could not be written."""


def package_bytes() -> bytes:
    root = Path(__file__).resolve().parents[3]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in MODULES:
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (root / name).read_bytes())
    return buffer.getvalue()


def build_package(output: Path) -> Path:
    """Write ``burrow-serverless-VERSION-HASH.zip`` into ``output``; its path."""
    data = package_bytes()
    digest = hashlib.sha256(data).hexdigest()[:12]
    path = output / f"burrow-serverless-{__version__}-{digest}.zip"
    try:
        output.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise PackageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
