"""The data path compiled with mypyc (scripts/build-fast.sh) and as plain Python behave alike,
and a compiled module never runs behind an edited source."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

import burrow.wire.session as session_module
from burrow.compiled import MODULES, check_fresh, compiled

SRC = Path(__file__).resolve().parent.parent / "src" / "burrow"


def _pure(name: str) -> ModuleType:
    """``burrow.<name>`` loaded from its .py source under another name (never the .so)."""
    path = SRC.joinpath(*name.split(".")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(f"pure_{name.replace('.', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _exchange(module: ModuleType) -> list[bytes]:
    """A handshake, an open, data both ways, a window and a close, as the bytes on the wire."""
    client = module.Session(module.Role.CLIENT, secret="s", window=64 * 1024)
    relay = module.Session(module.Role.RELAY, secret="s", window=64 * 1024)
    wire: list[bytes] = []

    def pump(a: object, b: object) -> list[object]:
        data = b"".join(bytes(x) for x in a.data_to_send())  # type: ignore[attr-defined]
        wire.append(data)
        return list(b.receive_data(data))  # type: ignore[attr-defined]

    client.start()
    pump(client, relay)
    pump(relay, client)
    pump(client, relay)
    pump(relay, client)
    stream = client.open_stream({"service": "db"})
    client.send_data(stream, b"x" * 40_000)
    events = pump(client, relay)
    relay.consume(stream, 40_000)
    relay.send_data(stream, b"pong")
    relay.send_fin(stream)
    events += pump(relay, client)
    client.reset_stream(stream, "closed", "done")
    pump(client, relay)
    # Nonces differ from run to run: compare what follows the handshake, and the events' kinds.
    return [*wire[4:], *(type(e).__name__.encode() for e in events)]


def test_the_pure_and_the_loaded_session_speak_the_same_bytes() -> None:
    assert _exchange(_pure("wire.session")) == _exchange(session_module)


def test_every_listed_module_is_compiled_or_none_is() -> None:
    states = {name: compiled(importlib.import_module(name)) for name in MODULES}
    assert len(set(states.values())) == 1, states


def test_a_compiled_module_older_than_its_source_refuses_to_load(tmp_path: Path) -> None:
    package = tmp_path / "wire"
    package.mkdir()
    (package / "session.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    time.sleep(0.01)
    source = package / "session.py"
    source.write_text("# edited after the build\n")
    os.utime(source, (time.time() + 5, time.time() + 5))
    with pytest.raises(ImportError, match="build-fast"):
        check_fresh(str(package))
    shutil.rmtree(package)


def _script_modules(script: str) -> list[str]:
    """The paths in build-fast.sh's ``modules=( ... )`` list."""
    return script.split("modules=(", 1)[1].split(")", 1)[0].split()


def test_the_build_script_compiles_exactly_the_listed_modules() -> None:
    script = (SRC.parent.parent / "scripts" / "build-fast.sh").read_text()
    listed = _script_modules(script)
    assert [m.removesuffix(".py").replace("/", ".") for m in listed] == list(MODULES)


def test_the_build_script_marks_modules_current_when_sources_were_only_rewritten(
    tmp_path: Path,
) -> None:
    """A checkout that rewrites a source with the same content must not leave burrow refusing
    to start with advice (run build-fast.sh) that then does nothing."""
    root = SRC.parent.parent
    script = (root / "scripts" / "build-fast.sh").read_text()
    listed = _script_modules(script)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "build-fast.sh").write_text(script)
    contents = b""
    for module in listed:
        source = tmp_path / "src" / module
        source.parent.mkdir(parents=True, exist_ok=True)
        data = (root / "src" / module).read_bytes()
        contents += data
        compiled_module = source.with_suffix(".cpython-311-x86_64-linux-gnu.so")
        compiled_module.write_bytes(b"")
        old = time.time() - 100
        os.utime(compiled_module, (old, old))
        source.write_bytes(data)  # rewritten after the build, same content
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / f".burrow-fast-{hashlib.sha256(contents).hexdigest()[:16]}").touch()
    with pytest.raises(ImportError, match="build-fast"):
        check_fresh(str(tmp_path / "src" / "burrow" / "wire"))
    run = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "build-fast.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "compiling" not in run.stderr  # the stamp matched: nothing was rebuilt
    for package in ("wire", "net", "http"):
        check_fresh(str(tmp_path / "src" / "burrow" / package))
