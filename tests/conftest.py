from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import LoopThread, tunnel


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep known_relays, identities and certificates out of the real home directory."""
    monkeypatch.setenv("BURROW_HOME", str(tmp_path / "burrow-home"))


@pytest.fixture(autouse=True)
def _burrow_log_level() -> Iterator[None]:
    """An in-process CLI run quiets the ``burrow`` logger; give the next test its level back."""
    logger = logging.getLogger("burrow")
    level = logger.level
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def tcp_tunnel(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Any]:
    """A factory: ``tcp_tunnel(local_port) -> (host, port)``, a TLS tunnel to 127.0.0.1:local_port
    with a relay and an agent in a background loop, closed at the end of the test."""
    stack = contextlib.AsyncExitStack()

    def open_tunnel(local_port: int, **options: Any) -> tuple[str, int]:
        async def enter() -> tuple[str, int]:
            _, _, public = await stack.enter_async_context(
                tunnel(tmp_path / f"t{local_port}", local_port, **options)
            )
            return public

        return loop_thread.run(enter())

    try:
        yield open_tunnel
    finally:
        loop_thread.run(stack.aclose())
