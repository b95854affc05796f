"""The journal of ``burrow dev``: each function's configuration before burrow changed it, kept
in the state directory until AWS confirmed it is back.

An entry is written (and flushed to disk) *before* the update it describes, and removed only
after the restore was accepted, so a session killed at any instant (``kill -9``, a laptop that
sleeps and never wakes) leaves what ``burrow dev restore`` (or the next ``burrow dev``) needs.
A lock file held for the session's life tells a live session from a dead one's leftovers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from burrow.errors import BurrowError, ConfigError
from burrow.statefiles import write_replace

__all__ = ["JOURNAL_FILE", "LOCK_FILE", "Entry", "Journal", "JournalBusy", "locked"]

JOURNAL_FILE: Final = "journal.json"
LOCK_FILE: Final = "dev.lock"
VERSION: Final = 1
MAX_SIZE: Final = 8 * 1024 * 1024  # a few hundred functions' environments at 4 KB each


class JournalBusy(BurrowError):
    """Another ``burrow dev`` holds the state directory."""


@dataclass
class Entry:
    """One function: what it had, what burrow wrote, and where it is."""

    arn: str
    name: str
    region: str
    original_env: dict[str, str]
    original_layers: list[str]
    applied_env: dict[str, str]
    applied_layers: list[str]
    original_revision: str | None = None
    state: str = "pending"  # pending: the update may or may not have happened; applied
    at: float = field(default_factory=time.time)

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        if not isinstance(data, dict):
            raise ValueError("an entry is not an object")
        entry = cls(
            arn=_text(data, "arn"),
            name=_text(data, "name"),
            region=_text(data, "region"),
            original_env=_strings(data.get("original_env")),
            original_layers=_list(data.get("original_layers")),
            applied_env=_strings(data.get("applied_env")),
            applied_layers=_list(data.get("applied_layers")),
            original_revision=data.get("original_revision"),
            state=_text(data, "state"),
            at=float(data.get("at", 0)),
        )
        if entry.state not in ("pending", "applied"):
            raise ValueError(f"unknown state {entry.state!r}")
        return entry


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("an environment is not an object of strings")
    return dict(value)


def _list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("layers are not a list of strings")
    return list(value)


@dataclass
class Journal:
    """The entries of one session, plus what its end must undo besides functions (tokens)."""

    path: Path
    entries: dict[str, Entry] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)  # ids to revoke
    key_dir: str | None = None  # where the relay's token.deny is
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    #: When the tokens expire (Unix time): what a restore after a crash tells of tokens it
    #: cannot revoke (a serverless relay's), instead of "the session's --ttl".
    expires: float | None = None

    @classmethod
    def at(cls, state_dir: Path) -> Journal:
        return cls(state_dir / JOURNAL_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> Journal | None:
        """The journal a session left, or None. A journal that cannot be read is never
        silently dropped: it holds the only copy of configurations."""
        path = state_dir / JOURNAL_FILE
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read the journal {path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_SIZE:
            raise ConfigError(
                f"the journal {path} is larger than {MAX_SIZE} bytes; is it burrow's?"
            )
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(
                    f"version {data.get('version') if isinstance(data, dict) else '?'}"
                )
            entries = [Entry.from_json(item) for item in data.get("entries", [])]
            tokens = _list(data.get("tokens", []))
            key_dir = data.get("key_dir")
            expires = data.get("expires")
            journal = cls(
                path,
                {entry.arn: entry for entry in entries},
                tokens,
                key_dir if isinstance(key_dir, str) else None,
                int(data.get("pid", 0)),
                float(data.get("started", 0)),
                float(expires) if isinstance(expires, int | float) else None,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the journal {path} is damaged ({exc}); it holds the functions' original "
                "configurations: repair it by hand, or move it away to start afresh"
            ) from None
        return journal

    def save(self) -> None:
        """Write the whole journal in one step (readers see the old or the new file)."""
        if not self.entries and not self.tokens:
            self.discard()
            return
        data = {
            "version": VERSION,
            "pid": self.pid,
            "started": self.started,
            "key_dir": self.key_dir,
            "expires": self.expires,
            "tokens": self.tokens,
            "entries": [asdict(entry) for entry in self.entries.values()],
        }
        try:
            write_replace(self.path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)
        except OSError as exc:
            raise BurrowError(
                f"cannot write the journal {self.path}: {exc.strerror or exc}"
            ) from None

    def discard(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def put(self, entry: Entry) -> None:
        self.entries[entry.arn] = entry
        self.save()

    def drop(self, arn: str) -> None:
        if self.entries.pop(arn, None) is not None:
            self.save()


@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Hold the state directory's lock for the block (released by the kernel if the process
    dies, so a crashed session's journal is free for the next one)."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise JournalBusy(
                f"another burrow dev (pid {holder}) is using {state_dir}; stop it first, "
                "or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
