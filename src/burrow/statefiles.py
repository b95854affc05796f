"""Files burrow keeps in its state directories (identity, certificate, token key, remembered
ports), written so that several processes starting at once never trip over each other.

Every write goes to a temporary file with a unique name in the same directory, then takes
its place in one step. A file that must be made only once (a key) is published with a hard
link, which fails if another process got there first; the loser then reads the winner's.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from burrow.errors import ConfigError


def _temporary(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def write_replace(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` whole, replacing what was there; readers see the old or the new file."""
    tmp = _temporary(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def create_once(path: Path, make: Callable[[], bytes], mode: int = 0o600) -> tuple[bytes, bool]:
    """The contents of ``path``, creating it with ``make()`` if it does not exist; and whether
    this call created it. When several processes race, exactly one file wins and all of them
    return its contents."""
    try:
        return path.read_bytes(), False
    except FileNotFoundError:
        pass
    tmp = _temporary(path, make(), mode)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path.read_bytes(), created
