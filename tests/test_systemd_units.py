"""The systemd units in packaging/systemd: ``systemd-analyze verify`` accepts them, their
hardening is what the README promises, and systemd's own exposure score stays low.

``verify`` checks that ExecStart's program exists, so each unit is verified as a copy whose
only change is /opt/burrow/bin/burrow pointing at this checkout's ``burrow``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
NAMES = ["burrow-relay.service", "burrow-agent.service"]
ANALYZE = shutil.which("systemd-analyze")

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        ANALYZE is None, reason="systemd-analyze is missing (scripts/system-deps.sh installs it)"
    ),
]


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, in order (keys may repeat, as systemd allows)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def local_copy(name: str, tmp_path: Path) -> Path:
    """The unit with ExecStart's /opt/burrow/bin/burrow replaced by this checkout's."""
    burrow = Path(sys.executable).parent / "burrow"
    assert burrow.is_file(), "the venv's burrow entry point"
    lines = (UNITS / name).read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=/opt/burrow/")]
    assert len(starts) == 1
    lines[starts[0]] = lines[starts[0]].replace("/opt/burrow/bin/burrow", str(burrow), 1)
    copy = tmp_path / name
    copy.write_text("\n".join(lines) + "\n")
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copies = [local_copy(name, tmp_path) for name in NAMES]
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", *map(str, copies)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # not even a warning


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: verify exits 0 on a misspelt directive, but says so on
    stderr, which the check requires to be empty."""
    copy = local_copy(NAMES[0], tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=", "ProtectSytem="))
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=30
    )
    assert "Unknown key 'ProtectSytem'" in result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_hardening(name: str, tmp_path: Path) -> None:
    unit = directives((UNITS / name).read_text())
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["User"] == ["burrow"]  # a dedicated user (packaging/systemd/burrow.sysusers)
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "ReadOnlyPaths": "/etc/burrow",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }.items():
        assert unit.get(key) == [value], key
    role = name.removeprefix("burrow-").removesuffix(".service")
    assert unit["StateDirectory"] == [f"burrow-{role}"]
    assert f"BURROW_STATE_DIR=%S/burrow-{role}" in unit["Environment"][0].split()
    assert unit["RestartPreventExitStatus"] == ["2"]  # a config error is not retried forever

    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(local_copy(name, tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout  # systemd says "OK" from 1.0 to 3.9


def test_agent_reloads_with_sighup() -> None:
    unit = directives((UNITS / "burrow-agent.service").read_text())
    assert unit["ExecStart"] == [
        "/opt/burrow/bin/burrow up -c /etc/burrow/burrow.toml --retry-forever"
    ]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    relay = directives((UNITS / "burrow-relay.service").read_text())
    assert relay["ExecStart"] == ["/opt/burrow/bin/burrow relay"]
    assert "ExecReload" not in relay  # SIGHUP would end a relay: it has no file to re-read


def test_sysusers_line() -> None:
    lines = [
        line
        for line in (UNITS / "burrow.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == ['u burrow - "burrow tunnels" - -']
