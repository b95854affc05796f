"""Which modules of the data path may run compiled (``scripts/build-fast.sh`` builds them with
mypyc beside their sources), and a guard against a compiled module older than its source: one
that would silently run yesterday's code after an edit."""

from __future__ import annotations

import os
from pathlib import Path

#: The modules ``scripts/build-fast.sh`` compiles (the same list).
MODULES = (
    "burrow.wire.frames",
    "burrow.wire.session",
    "burrow.net.outbox",
    "burrow.net.connection",
    "burrow.net.bridge",
    "burrow.net.join",
    "burrow.net.channel",
    "burrow.http.fastparse",
    "burrow.http.fastpath",
    "burrow.http.framing",
    "burrow.http.policy",
    "burrow.http.visitor",
    "burrow.http.record",
)


def check_fresh(package_dir: str) -> None:
    """Refuse to run a compiled module of ``package_dir`` whose source is newer."""
    root = Path(package_dir)
    for module in MODULES:
        parts = module.split(".")[1:]
        if root.name != parts[0]:
            continue
        source = root.joinpath(*parts[1:]).with_suffix(".py")
        for compiled in source.parent.glob(f"{source.stem}.*.so"):
            try:
                stale = os.stat(source).st_mtime > os.stat(compiled).st_mtime
            except OSError:
                continue
            if stale:
                raise ImportError(
                    f"{compiled.name} is older than {source.name}: run "
                    "`bash scripts/build-fast.sh` (or BURROW_PURE=1 bash scripts/build-fast.sh "
                    "for plain Python)"
                )


def compiled(module: object) -> bool:
    """Whether ``module`` is the compiled build."""
    return str(getattr(module, "__file__", "")).endswith(".so")
