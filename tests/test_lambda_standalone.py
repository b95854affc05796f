"""The standalone Lambda extension: a layer that needs no Python in the function's runtime.

The proof for Amazon Linux 2023 (glibc 2.34) is two-fold: no ELF file of the bundle needs a
glibc symbol version above 2.34 (readelf, independently of burrow's own ELF reader), and the
built extension runs in a Debian 11 root (glibc 2.31, no Python; made with debootstrap and
cached) against the fake Extensions API, a relay and a private ``pg`` service in front of the
local PostgreSQL, which psql inside the root then queries through it.

Tests marked ``standalone`` build the extension (minutes the first time, then cached under
~/.cache/burrow/standalone) and are deselected by default; ``bash scripts/test --all`` runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from burrow.aws import emulate, standalone
from burrow.aws.elf import ElfError, max_glibc, needed_versions
from burrow.aws.interpreter import (
    ZIG_CC,
    Source,
    StandaloneError,
    find_source,
    prune,
    upstream_fixes,
)
from burrow.aws.standalone import (
    LAUNCHER,
    build_standalone_layer,
    cache_root,
    check_bundle,
    write_zip,
)
from burrow.roles.relay import Relay
from burrow.tokens import TokenKey
from helpers import SCALE, free_port, relay_config
from lambda_fake import FakeExtensionsAPI
from moto_lambda import StrictLambda, aws_env, client, configuration, deploy, moto_url, reset
from serverless_support import EmulatorProcess
from test_dev import DATABASE_URL, burrow_dev
from test_lambda_extension import Extension, World, world  # noqa: F401 (world: a fixture)

__all__ = ["moto_url"]  # a fixture

AL2023_GLIBC = (2, 34)
LAYER_GOAL = 40 * 1024 * 1024
DEBIAN_MIRROR = "http://deb.debian.org/debian"
ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def readelf_glibc(path: Path) -> tuple[int, int] | None:
    """The newest GLIBC_x.y that ``readelf -V`` lists in the file's version needs."""
    out = subprocess.run(
        ["readelf", "-W", "-V", str(path)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    needs = out.split("Version needs section", 1)
    if len(needs) < 2:
        return None
    found = [(int(a), int(b)) for a, b in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", needs[1])]
    return max(found) if found else None


def elf_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    yield path


# --- fast tests: the ELF reader, the bundle check, the zip, the CLI's options ---------------


def test_elf_reader_agrees_with_readelf() -> None:
    binaries = [Path(sys.executable).resolve(), Path("/bin/ls")]
    for path in binaries:
        mine = max_glibc(needed_versions(path.read_bytes()))
        assert mine is not None and mine >= (2, 2)
        assert mine == readelf_glibc(path)


def test_elf_reader_rejects_garbage() -> None:
    data = Path("/bin/ls").read_bytes()
    with pytest.raises(ElfError):
        needed_versions(b"not an elf")
    with pytest.raises(ElfError):
        needed_versions(data[:2000])  # the section table is cut off
    with pytest.raises(ElfError):
        needed_versions(b"\x7fELF\x01\x01" + bytes(60))  # 32-bit


def test_check_bundle_refuses_a_newer_glibc(tmp_path: Path) -> None:
    shutil.copy(Path(sys.executable).resolve(), tmp_path / "python")
    (tmp_path / "data.txt").write_text("not an ELF file")
    needs = check_bundle(tmp_path, limit=(2, 99))
    assert list(needs) == ["python"]
    newest = needs["python"]
    older = (newest[0], newest[1] - 1)
    with pytest.raises(StandaloneError, match=rf"python needs GLIBC_{newest[0]}\.{newest[1]}"):
        check_bundle(tmp_path, limit=older)
    (tmp_path / "python").unlink()
    with pytest.raises(StandaloneError, match="no ELF file"):
        check_bundle(tmp_path)


def test_zip_layout(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "_internal").mkdir(parents=True)
    (bundle / "burrow").write_bytes(b"\x7fELF...")
    (bundle / "burrow").chmod(0o755)
    (bundle / "_internal" / "base_library.zip").write_bytes(b"zip")
    (bundle / "_internal" / "libpython3.11.so.1.0").write_bytes(b"so")
    (bundle / "_internal" / "libpython3.11.so").symlink_to("libpython3.11.so.1.0")
    write_zip(tmp_path / "a.zip", bundle)
    write_zip(tmp_path / "b.zip", bundle)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        modes = {i.filename: i.external_attr >> 16 for i in archive.infolist()}
        assert archive.read("extensions/burrow").decode() == LAUNCHER
        assert archive.read("burrow/_internal/libpython3.11.so") == b"so"  # a copy, not a link
    assert modes == {
        "extensions/burrow": 0o100755,
        "burrow/_internal/base_library.zip": 0o100644,
        "burrow/_internal/libpython3.11.so": 0o100644,
        "burrow/_internal/libpython3.11.so.1.0": 0o100644,
        "burrow/burrow": 0o100755,
    }


def test_launcher_finds_the_bundle_beside_it(tmp_path: Path) -> None:
    """/opt/extensions/burrow runs /opt/burrow/burrow, wherever the layer is unpacked."""
    (tmp_path / "extensions").mkdir()
    (tmp_path / "burrow").mkdir()
    launcher = tmp_path / "extensions" / "burrow"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    program = tmp_path / "burrow" / "burrow"
    program.write_text('#!/bin/sh\necho "bundle $*"\n')
    program.chmod(0o755)
    result = subprocess.run([str(launcher), "a b"], capture_output=True, text=True, timeout=10)
    assert result.stdout == "bundle a b\n"


def test_zig_cc_wrapper_rewrites_the_soname_flag(tmp_path: Path) -> None:
    """CPython links libpython with -Wl,-hNAME, which zig does not know; arguments with
    spaces survive the rewrite."""
    fake_zig = tmp_path / "zig"
    fake_zig.write_text('#!/bin/sh\nfor a do printf "[%s]" "$a"; done\n')
    fake_zig.chmod(0o755)
    wrapper = tmp_path / "zig-cc"
    wrapper.write_text(ZIG_CC.format(zig=fake_zig, target="x86_64-linux-gnu.2.28"))
    wrapper.chmod(0o755)
    args = ["-shared", "-Wl,-hlibpython3.11.so.1.0", "-DX=a b", "-o", "out.so"]
    result = subprocess.run([str(wrapper), *args], capture_output=True, text=True, timeout=10)
    assert result.stdout == (
        "[cc][-target][x86_64-linux-gnu.2.28][-g0][-fno-sanitize=undefined][-Wno-date-time]"
        "[-shared][-Wl,-soname,libpython3.11.so.1.0][-DX=a b][-o][out.so]"
    )


def test_debian_sources_and_patches(tmp_path: Path) -> None:
    assert find_source(tmp_path / "none", "zlib") is None
    for name in (
        "zlib_1.2.13.dfsg.orig.tar.bz2",
        "python3.11_3.11.2.orig.tar.gz",
        "openssl_3.0.20.orig.tar.gz",
        "openssl_3.0.22.orig.tar.gz",
        "openssl_3.0.22.orig.tar.gz.asc",
    ):
        (tmp_path / name).write_bytes(b"")
    assert find_source(tmp_path, "zlib") == Source(tmp_path / "zlib_1.2.13.dfsg.orig.tar.bz2")
    assert find_source(tmp_path, "openssl") == Source(tmp_path / "openssl_3.0.22.orig.tar.gz")
    assert find_source(tmp_path, "python3.11") is None  # its patches are part of the build
    (tmp_path / "python3.11_3.11.2-6+deb12u8.debian.tar.xz").write_bytes(b"")
    assert find_source(tmp_path, "python3.11") == Source(
        tmp_path / "python3.11_3.11.2.orig.tar.gz",
        tmp_path / "python3.11_3.11.2-6+deb12u8.debian.tar.xz",
    )
    series = [
        "deb-setup.diff",
        "multiarch.diff",
        "CVE-2024-0450.patch",
        "relfile-nullptr-dereference.patch",
        "CVE-2023-41105-path-truncation.patch",
        "0001-3.11-gh-123270-Replaced-SanitizedNames.patch",
    ]
    assert upstream_fixes(series) == series[2:]
    assert upstream_fixes(["deb-setup.diff"]) == []


def test_prune_keeps_the_current_entry(tmp_path: Path) -> None:
    for name in ("bundle-x86_64-old", "bundle-x86_64-new", "bundle-arm64-other"):
        (tmp_path / name).mkdir()
    (tmp_path / "bundle-x86_64-old.warnings.txt").write_text("")
    (tmp_path / "bundle-x86_64-new.warnings.txt").write_text("")
    prune(tmp_path, "bundle-x86_64-", keep=tmp_path / "bundle-x86_64-new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bundle-arm64-other",
        "bundle-x86_64-new",
        "bundle-x86_64-new.warnings.txt",
    ]


def test_cache_root() -> None:
    assert cache_root({"BURROW_STANDALONE_CACHE": "/x/y"}) == Path("/x/y")
    assert cache_root({"XDG_CACHE_HOME": "/c"}) == Path("/c/burrow/standalone")


def _cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "burrow.cli", "lambda", "layer", "build", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--no-deps",), 2, "--no-deps is for the Python-runtime layer"),
        (("--python-version", "3.12"), 2, "--python-version is for the Python-runtime layer"),
        (("--arch", "sparc"), 2, "--arch must be x86_64 or arm64, not 'sparc'"),
    ],
)
def test_cli_standalone_option_errors(
    tmp_path: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    result = _cli("--standalone", "-o", "layer.zip", *args, cwd=tmp_path)
    assert result.returncode == code
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("burrow: error: ") and message in lines[0]
    assert not (tmp_path / "layer.zip").exists()


def test_cli_other_arch_without_qemu(tmp_path: Path) -> None:
    """Another machine's layer is frozen under qemu's emulation: without it, one line."""
    other = "arm64" if os.uname().machine == "x86_64" else "x86_64"
    machine = standalone.TARGETS[other].machine
    command = [sys.executable, "-m", "burrow.cli", "lambda", "layer", "build", "--standalone"]
    result = subprocess.run(
        [*command, "--arch", other],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PATH": str(tmp_path)},  # no qemu-*-static to be found
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"burrow: error: running {machine} programs here needs qemu-{machine}-static "
        "(apt-get install qemu-user-static)"
    ]


# --- the real build (marked standalone) -----------------------------------------------------


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standalone layer, unpacked; the zip beside it (built once, then from the cache)."""
    out = tmp_path_factory.mktemp("standalone")
    started = time.monotonic()
    zip_path = build_standalone_layer(out / "layer.zip", log=lambda m: print(f"\n  {m}"))
    print(
        f"\nstandalone layer: {zip_path.stat().st_size / 2**20:.1f} MiB zip, "
        f"built in {time.monotonic() - started:.0f} s (cache: {cache_root()})"
    )
    unpacked = out / "opt"
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            target = unpacked / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
            target.chmod(info.external_attr >> 16 & 0o777)
    return unpacked


@pytest.fixture(scope="session")
def debian11() -> Path:
    """A Debian 11 (bullseye) root with psql and no Python, cached beside the build."""
    if os.geteuid() != 0:
        pytest.skip("chroot and debootstrap need root")
    root = cache_root() / "debian11-root"
    if (root / ".complete").is_file():
        return root
    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is missing: bash scripts/system-deps.sh --all installs it")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=postgresql-client",
            "bullseye",
            str(partial),
            DEBIAN_MIRROR,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"debootstrap failed: {(result.stderr or result.stdout)[-2000:]}")
    (partial / ".complete").write_text("debootstrap bullseye minbase + postgresql-client\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def in_root(root: Path, *command: str) -> list[str]:
    """``command`` chrooted into ``root`` with its own /proc, in a private mount namespace
    (each exec replaces the last: the pid is the command's)."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"',
        str(root),
        *command,
    ]


@contextlib.asynccontextmanager
async def extension_in(command: list[str], env: dict[str, str]) -> AsyncIterator[Extension]:
    """The extension started by ``command`` (in a root), its stderr read into lines."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command,
        env={"PATH": ROOT_PATH, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    ext = Extension(proc, started)
    ext._pump = pump = asyncio.ensure_future(ext.pump())
    try:
        yield ext
    except BaseException:
        print("extension stderr:", *ext.lines, sep="\n  ")
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await pump
        if not pump.done():
            pump.cancel()


def psql_in_root(root: Path, port: int, sql: str, machine: str | None = None) -> str:
    """psql inside ``root``: chrooted, or under emulation for another ``machine``."""
    args = ["-XAt", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "test", "-c", sql]
    psql = ["/usr/lib/postgresql/13/bin/psql", *args]  # not Debian's wrapper: it is Perl
    command = in_root(root, *psql) if machine is None else emulate.command(root, machine, psql)
    result = subprocess.run(
        command,
        env={"PATH": ROOT_PATH, "PGCONNECT_TIMEOUT": "10"},
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.standalone
@pytest.mark.timeout(3600)
def test_bundle_needs_nothing_newer_than_al2023(layer: Path) -> None:
    zip_path = layer.parent / "layer.zip"
    assert zip_path.stat().st_size < LAYER_GOAL
    files = list(elf_files(layer))
    names = {path.name for path in files}
    assert "burrow" in names and "libpython3.11.so.1.0" in names
    assert any(name.startswith("_ssl.") for name in names)  # the stdlib's TLS, built here
    assert any(name.startswith("_rust.") for name in names)  # cryptography's wheel
    newest: dict[str, tuple[int, int]] = {}
    for path in files:
        version = readelf_glibc(path)
        assert version == max_glibc(needed_versions(path.read_bytes())), path
        if version is not None:
            newest[path.relative_to(layer).as_posix()] = version
    too_new = {name: v for name, v in newest.items() if v > AL2023_GLIBC}
    assert too_new == {}
    assert newest["burrow/_internal/libpython3.11.so.1.0"] <= (2, 28)
    print("\nnewest glibc needed:", max(newest.values()), f"over {len(newest)} ELF files")


@pytest.mark.standalone
@pytest.mark.timeout(3600)
async def test_runs_in_debian11_without_python(
    world: World,  # noqa: F811
    layer: Path,
    debian11: Path,
) -> None:
    assert not list((debian11 / "usr" / "bin").glob("python*"))
    assert not (debian11 / "usr" / "lib" / "x86_64-linux-gnu" / "libpython3.11.so.1.0").exists()
    libc = sorted((debian11 / "lib" / "x86_64-linux-gnu").glob("libc-2.*.so"))
    assert [p.name for p in libc] == ["libc-2.31.so"]
    opt = debian11 / "opt"
    shutil.rmtree(opt, ignore_errors=True)
    shutil.copytree(layer, opt, symlinks=True)

    api = world.api
    pg_port = free_port()
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}")
    async with extension_in(in_root(debian11, "/opt/extensions/burrow"), env) as ext:
        first_next = await api.wait_call("next", timeout=30)
        assert [c.kind for c in api.calls] == ["register", "next"]
        ready = await ext.wait_line(
            r"ready in (\d+) ms \((.*?)(?:, (\d+) ms since process start)?\)"
        )
        assert f"pg on 127.0.0.1:{pg_port}" in ready.string
        spawn_ms = (first_next.at - ext.started) * 1000
        print(
            f"\nstandalone in Debian 11: ready {ready.group(3) or '?'} ms after process start "
            f"({ready.group(2)}); {spawn_ms:.0f} ms from spawn (unshare, chroot, launcher "
            "included) to the first event/next"
        )
        # The function's side: psql inside the root, through the extension's local port.
        row = await asyncio.to_thread(
            psql_in_root, debian11, pg_port, "SELECT 'via burrow', inet_server_port()"
        )
        assert row == "via burrow|5432"

        api.push("INVOKE")
        await api.wait_call("next", 2, timeout=15)
        # After an INVOKE (the session checked again), a new connection still goes through.
        sql = "SELECT current_database(), 6 * 7"
        assert await asyncio.to_thread(psql_in_root, debian11, pg_port, sql) == "test|42"

        api.push("SHUTDOWN", shutdownReason="spindown")
        assert await ext.exited(5) == 0
        await ext.wait_line(r"shutdown \(spindown\)")
    assert not api.named("init_error") and not api.named("exit_error")
    assert not any("Traceback" in line for line in ext.lines), ext.lines


@pytest.mark.standalone
@pytest.mark.timeout(3600)
def test_cli_builds_the_standalone_layer(layer: Path, tmp_path: Path) -> None:
    """With the cache warm (the fixture built it), the CLI only writes the zip."""
    started = time.monotonic()
    result = _cli("--standalone", "-o", "layer.zip", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    size = (tmp_path / "layer.zip").stat().st_size
    assert result.stdout.strip() == f"layer.zip {size} bytes"
    assert (tmp_path / "layer.zip").read_bytes() == (layer.parent / "layer.zip").read_bytes()
    print(f"\ncached build through the CLI: {time.monotonic() - started:.1f} s")


# --- arm64, built and run under qemu's emulation (marked standalone) -------------------------

ARM = standalone.TARGETS["arm64"]


@pytest.fixture(scope="module")
def arm64_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0 or ARM.machine == os.uname().machine:
        pytest.skip("builds arm64 on another machine under emulation, as root")
    out = tmp_path_factory.mktemp("arm64")
    zip_path = build_standalone_layer(out / "layer.zip", arch="arm64", log=print)
    print(f"\narm64 layer: {zip_path.stat().st_size / 2**20:.1f} MiB zip")
    unpacked = out / "opt"
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            target = unpacked / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
            target.chmod(info.external_attr >> 16 & 0o777)
    return unpacked


@pytest.fixture(scope="session")
def debian11_arm64() -> Path:
    """A Debian 11 arm64 root with psql (unpacked, run under emulation), cached."""

    def run(argv: Sequence[str], cwd: Path) -> None:
        result = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=1200, check=False
        )
        if result.returncode != 0:
            pytest.fail(f"{argv[0]} failed: {(result.stderr or result.stdout)[-2000:]}")

    return emulate.debian_root(
        cache_root() / "debian11-arm64-root",
        ARM.machine,
        suite="bullseye",
        mirror=DEBIAN_MIRROR,
        include=("postgresql-client",),
        run=run,
    )


@pytest.mark.standalone
@pytest.mark.timeout(3600)
async def test_arm64_runs_in_debian11_arm64_under_emulation(
    world: World,  # noqa: F811
    arm64_layer: Path,
    debian11_arm64: Path,
) -> None:
    for path in elf_files(arm64_layer):
        version = readelf_glibc(path)
        assert version is None or version <= AL2023_GLIBC, path
    assert (debian11_arm64 / "lib" / "aarch64-linux-gnu" / "libc-2.31.so").is_file()
    assert not list((debian11_arm64 / "usr" / "bin").glob("python*"))
    opt = debian11_arm64 / "opt"
    shutil.rmtree(opt, ignore_errors=True)
    shutil.copytree(arm64_layer, opt, symlinks=True)

    pg_port = free_port()
    # Emulation is some ten times slower than the machine: give Init the time it needs.
    env = world.env(BURROW_CONNECT=f"pg=127.0.0.1:{pg_port}", BURROW_READY_TIMEOUT="120")
    variables = [f"{name}={value}" for name, value in env.items()]
    command = emulate.command(
        debian11_arm64, ARM.machine, ["/usr/bin/env", *variables, "/opt/extensions/burrow"]
    )
    async with extension_in(command, {}) as ext:
        await world.api.wait_call("next", timeout=180)
        ready = await ext.wait_line(r"ready in \d+ ms", timeout=30)
        print(f"\narm64 under emulation: {ready.string}")
        sql = "SELECT 'arm64', inet_server_port()"
        row = await asyncio.to_thread(psql_in_root, debian11_arm64, pg_port, sql, ARM.machine)
        assert row == "arm64|5432"
        world.api.push("SHUTDOWN", shutdownReason="spindown")
        assert await ext.exited(30) == 0
    assert not world.api.named("init_error") and not world.api.named("exit_error")


# --- burrow dev end to end: the function's side in Debian 11 (marked standalone) -------------


@pytest.fixture
def dev_aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    reset(moto_url)
    StrictLambda().install(monkeypatch)
    yield moto_url


def in_root_with_opt(root: Path, opt: Path, *command: str) -> list[str]:
    """``command`` chrooted into ``root`` with ``opt`` mounted on its /opt (as Lambda unpacks
    layers there), in a private mount namespace: the cached root itself is not changed."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        'mount -t proc proc "$0/proc" && mount --bind "$1" "$0/opt" && shift && '
        'exec chroot "$0" "$@"',
        str(root),
        str(opt),
        *command,
    ]


@pytest.mark.standalone
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("relay_kind", ["burrow", "serverless"])
async def test_burrow_dev_reaches_the_laptop_from_debian11(
    relay_kind: str,
    layer: Path,
    debian11: Path,
    dev_aws: str,
    tmp_path: Path,
) -> None:
    """Issue 12's end to end: `burrow dev` (against moto's Lambda) publishes the standalone
    layer it builds and writes the function's environment; the standalone extension, run from
    that layer in the Debian 11 root (glibc 2.31, no Python) with that environment, lets psql
    in the root reach this machine's PostgreSQL: through a burrow relay, and through the
    serverless relay's emulator (`burrow serverless emulate`)."""
    url = dev_aws
    deploy(url, "api", {"DATABASE_URL": DATABASE_URL, "NODE_ENV": "development"})  # Node.js
    before = configuration(url, "api")
    (debian11 / "opt").mkdir(exist_ok=True)
    zip_sha = hashlib.sha256((layer.parent / "layer.zip").read_bytes()).hexdigest()
    async with contextlib.AsyncExitStack() as stack:
        if relay_kind == "burrow":
            key_dir = tmp_path / "relay-state"
            TokenKey.load_or_create(key_dir)
            control = free_port()
            relay = Relay(relay_config(tmp_path, listen_port=control))
            await relay.start()
            stack.push_async_callback(relay.close)
            assert relay.fingerprint
            target = f"127.0.0.1:{control}"
            args = ["--to", target, "--fingerprint", relay.fingerprint]
        else:
            key_dir = tmp_path / "stack-key"
            target = stack.enter_context(EmulatorProcess(key_dir)).ws_url
            args = ["--to", target]
        args += ["--token-key-dir", str(key_dir), "--state-dir", str(tmp_path / "dev-state")]
        args += ["--local", "pg=5432", "--json"]
        # burrow dev builds the standalone layer itself, from the cache the fixture filled.
        env = {**aws_env(url), "BURROW_STANDALONE_CACHE": str(cache_root())}
        dev = await stack.enter_async_context(burrow_dev(args, env))
        await dev.wait("dev_ready", timeout=300)
        function_env, layers = configuration(url, "api")
        assert function_env["BURROW_RELAY"] == target
        assert len(layers) == 1 and ":layer:burrow-dev-standalone-x86_64:" in layers[0]
        published = client(url, "lambda").list_layer_versions(
            LayerName="burrow-dev-standalone-x86_64"
        )["LayerVersions"]
        described = next(v for v in published if v["LayerVersionArn"] == layers[0])
        assert f"sha256:{zip_sha}" in described["Description"]  # the layer that runs below

        api = FakeExtensionsAPI()
        await api.start()
        stack.push_async_callback(api.close)
        pg_port = free_port()  # PostgreSQL holds 5432 in this network namespace
        ext_env = {
            **function_env,
            "BURROW_CONNECT": function_env["BURROW_CONNECT"].replace(
                "127.0.0.1:5432", f"127.0.0.1:{pg_port}"
            ),
            "AWS_LAMBDA_RUNTIME_API": api.address,
        }
        command = in_root_with_opt(debian11, layer, "/opt/extensions/burrow")
        async with extension_in(command, ext_env) as ext:
            await api.wait_call("next", timeout=30)
            ready = await ext.wait_line(r"ready in (\d+) ms \((.*?)\)")
            print(f"\nstandalone in Debian 11, {relay_kind} relay: {ready.string}")
            sql = f"SELECT 'via {relay_kind}', inet_server_port()"
            row = await asyncio.to_thread(psql_in_root, debian11, pg_port, sql)
            assert row == f"via {relay_kind}|5432"
            api.push("INVOKE")
            await api.wait_call("next", 2, timeout=15)
            sql = "SELECT count(*) FROM generate_series(1, 100000)"
            assert await asyncio.to_thread(psql_in_root, debian11, pg_port, sql) == "100000"
            api.push("SHUTDOWN", shutdownReason="spindown")
            assert await ext.exited(5) == 0
        assert not api.violations and not api.named("init_error")
        assert not any("Traceback" in line for line in ext.lines), ext.lines

        dev.proc.send_signal(signal.SIGINT)
        assert await dev.finish() == 0
    assert configuration(url, "api") == before
    assert not dev.stderr, dev.stderr
