"""The Lambda layer zip: its layout, the launcher's mode bits, and the CLI that builds it.

Built with ``--no-deps`` so nothing is downloaded; the dependency path (pip with Lambda's
platform tags) is covered by the arguments it would pass.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from burrow.aws.layer import LAUNCHER, build_layer, platforms
from burrow.errors import ConfigError


def test_layout_and_launcher(tmp_path: Path) -> None:
    path = build_layer(tmp_path / "out" / "layer.zip", no_deps=True)
    assert path == tmp_path / "out" / "layer.zip"
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        launcher = archive.getinfo("extensions/burrow")
        mode = launcher.external_attr >> 16
        assert stat.S_ISREG(mode) and mode & 0o777 == 0o755
        assert launcher.create_system == 3
        script = archive.read("extensions/burrow").decode()
        assert script == LAUNCHER and script.startswith("#!/bin/sh\n")
        assert "-m burrow.aws.extension" in script and "/opt/python" in script
        for name in ("python/burrow/__init__.py", "python/burrow/aws/extension.py"):
            assert name in names
            assert archive.getinfo(name).external_attr >> 16 & 0o777 == 0o644
        assert not any("__pycache__" in n and not n.endswith(".pyc") for n in names)
        assert all(n.startswith(("extensions/", "python/burrow/")) for n in names)
        assert archive.testzip() is None
    assert not (tmp_path / "out" / "layer.zip.part").exists()


def test_same_inputs_same_zip(tmp_path: Path) -> None:
    """Fixed timestamps and order: an unchanged layer keeps its hash (no needless publish)."""
    first = build_layer(tmp_path / "a.zip", no_deps=True, python_version="3.12")
    second = build_layer(tmp_path / "b.zip", no_deps=True, python_version="3.12")
    assert first.read_bytes() == second.read_bytes()


def test_bytecode_only_for_the_same_python(tmp_path: Path) -> None:
    """/opt is read-only: .pyc files help only if built by the runtime's own Python."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = "3.12" if here != "3.12" else "3.11"
    with zipfile.ZipFile(
        build_layer(tmp_path / "same.zip", no_deps=True, python_version=here)
    ) as z:
        assert any(n.endswith(f".cpython-{here.replace('.', '')}.pyc") for n in z.namelist())
    with zipfile.ZipFile(
        build_layer(tmp_path / "other.zip", no_deps=True, python_version=other)
    ) as z:
        assert not any(n.endswith(".pyc") for n in z.namelist())


def test_platform_tags() -> None:
    assert platforms("3.11", "x86_64") == ["manylinux2014_x86_64"]
    assert platforms("3.12", "arm64") == ["manylinux2014_aarch64", "manylinux_2_28_aarch64"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "sparc"}, "--arch must be x86_64 or arm64"),
        ({"python_version": "twelve"}, "--python-version must look like 3.12"),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_layer(tmp_path / "layer.zip", no_deps=True, **options)
    assert not (tmp_path / "layer.zip").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "burrow.cli", "lambda", "layer", "build", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_cli_builds(tmp_path: Path) -> None:
    result = _cli("-o", "layer.zip", "--no-deps", "--arch", "arm64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    size = (tmp_path / "layer.zip").stat().st_size
    assert result.stdout.strip() == f"layer.zip {size} bytes"
    with zipfile.ZipFile(tmp_path / "layer.zip") as archive:
        assert "extensions/burrow" in archive.namelist()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--arch", "sparc"), "burrow: error: --arch must be x86_64 or arm64, not 'sparc'"),
        (("--python-version", "3"), "burrow: error: --python-version must look like 3.12, not '3'"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = _cli("-o", "layer.zip", "--no-deps", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message]
    assert result.stdout == ""
    assert not (tmp_path / "layer.zip").exists()
