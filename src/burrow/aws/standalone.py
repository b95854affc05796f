"""Build the standalone Lambda extension: burrow frozen (PyInstaller, onedir) with a CPython
built for an old glibc (burrow.aws.interpreter), so that the layer needs no Python in the
function's runtime. burrow's compiled dependencies come as manylinux wheels no newer than 2.28,
and every ELF file of the bundle is checked before the zip is written.

Each step is cached under ``$BURROW_STANDALONE_CACHE`` (default ``~/.cache/burrow/standalone``)
keyed by a hash of its inputs: the interpreter (minutes) by the sources, zig and this recipe;
the bundle (seconds) by the interpreter, burrow's sources and the wheels. Sources are fetched
once: delete ``sources/`` there to take Debian's newer security updates.

Another machine's layer (arm64 on x86_64): zig cross-compiles the interpreter, and PyInstaller
runs it in a Debian root of that machine under qemu's user-mode emulation (burrow.aws.emulate),
since it must run the target's interpreter, ``ldd`` and ``objcopy``.

The layer: ``extensions/burrow`` (a two-line sh launcher, as every Lambda runtime has /bin/sh)
execs ``burrow/burrow`` (PyInstaller's onedir: nothing is unpacked at start), which runs
``burrow.aws.extension.main()``.

Why PyInstaller and not Nuitka (both measured here, on the same interpreter and zig, in the
Debian 11 root, 15 cold starts each, the machine lightly loaded): Nuitka's extension was ready
a little sooner (median 195 ms from process start and 160 ms of CPU, against 230 ms and 210 ms;
the Python-runtime layer 187 ms and 160 ms), but it compiles for 7 minutes on every change to
burrow where PyInstaller bundles in 25 seconds, zips to 16.6 MB against 14.6, and needs more
of the build machine. PyInstaller already meets the 300 ms goal.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from burrow.aws import emulate
from burrow.aws.elf import ElfError, is_elf, max_glibc, needed_versions
from burrow.aws.interpreter import (
    DEBIAN_ARCHIVES,
    PYTHON_MINOR,
    TARGETS,
    Log,
    StandaloneError,
    Target,
    build_interpreter,
    digest,
    host_machine,
    is_cross,
    pip,
    prune,
    run_step,
)
from burrow.aws.layer import ZIP_DATE, check_arch, runtime_requirements

#: The Debian release of the root PyInstaller runs in for another machine (glibc 2.31).
ROOT_SUITE = "bullseye"
ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PYINSTALLER = ("pyinstaller==6.22.3", "pyinstaller-hooks-contrib==2026.9", "altgraph==0.17.5")
#: What AL2023 (provided.al2023, nodejs20.x, java21, ...) has: the build fails above it.
GLIBC_MAX = (2, 34)
#: The frozen program's entry point.
ENTRY = "from burrow.aws.extension import main\n\nmain()\n"

#: Lambda starts every file in /opt/extensions; the onedir sits beside, in /opt/burrow.
LAUNCHER = """\
#!/bin/sh
# burrow's Lambda extension, standalone: no Python needed in the function's runtime.
exec "${0%/*}/../burrow/burrow" "$@"
"""

#: OpenSSL was built with Amazon Linux's OPENSSLDIR (/etc/pki/tls); elsewhere (Debian, tests)
#: point it at the system's bundle so that BURROW_RELAY with a public certificate still works.
CERT_HOOK = """\
import os

if "SSL_CERT_FILE" not in os.environ and not os.path.exists("/etc/pki/tls/cert.pem"):
    for _path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem"):
        if os.path.exists(_path):
            os.environ["SSL_CERT_FILE"] = _path
            break
"""

#: Imported only on some paths (a ``wss://`` relay): named, so that the bundle has them even
#: if PyInstaller's analysis stopped following the extension's lazy imports.
HIDDEN_IMPORTS = (
    "burrow.aws.serverless.agent",
    "burrow.aws.serverless.streams",
    "websockets.asyncio.client",
)

#: Libraries PyInstaller copies from the build machine that the target must provide itself:
#: manylinux's list of system libraries (the build machine's copy needs its newer glibc).
SYSTEM_LIBRARIES = ("libgcc_s.so.1",)

#: Standard-library packages the extension never imports, kept out of the analysis (PyInstaller's
#: warnings, kept beside the bundle in the cache, name any module that wanted one of them).
EXCLUDES = (
    "tkinter",
    "unittest",
    "pydoc",
    "doctest",
    "lib2to3",
    "distutils",
    "setuptools",
    "pip",
    "sqlite3",
    "curses",
    "readline",
    "xmlrpc",
    "pdb",
    # Reached only through concurrent.futures.process (asyncio uses threads) and PyInstaller's
    # own hooks; each brings a runtime hook that imports it at every start (~20 ms in all).
    "multiprocessing",
    "ctypes",
    "pkgutil",
)


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    explicit = env.get("BURROW_STANDALONE_CACHE", "").strip()
    if explicit:
        return Path(explicit)
    base = env.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "burrow" / "standalone"


# --- the whole build -----------------------------------------------------------------------


def build_standalone_layer(
    output: Path,
    *,
    arch: str = "x86_64",
    cache: Path | None = None,
    log: Log | None = None,
) -> Path:
    """Write the standalone layer zip to ``output``, building (or reusing) what it needs."""
    target = TARGETS[check_arch(arch)]
    if is_cross(target):
        # PyInstaller runs the target's interpreter: under emulation, in a root of its own.
        if os.geteuid() != 0:
            raise StandaloneError(
                f"--arch {arch} --standalone on an {host_machine()} machine needs root "
                "(a user namespace for qemu's emulation); or build it on an "
                f"{target.machine} machine"
            )
        try:
            emulate.qemu_for(target.machine)
        except emulate.EmulationError as exc:
            raise StandaloneError(str(exc)) from None
    cache = cache or cache_root()
    say = log or (lambda _message: None)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StandaloneError(f"cannot create the cache {cache}: {exc.strerror or exc}") from None
    with _locked(cache / f"lock-{target.arch}"):
        python = build_interpreter(target, cache, say)
        root = build_root(target, cache, say) if is_cross(target) else None
        bundle = build_bundle(target, python, cache, say, root)
    check_bundle(bundle)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_zip(output, bundle)
    except OSError as exc:
        raise StandaloneError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build per cache and arch at a time (a second waits, then finds the cache warm)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- sources and tools ---------------------------------------------------------------------


def build_bundle(
    target: Target, python: Path, cache: Path, say: Log, root: Path | None = None
) -> Path:
    """PyInstaller's onedir of the extension, run by the interpreter built for it: here, or
    for another machine in ``root`` (a Debian root of that machine) under emulation."""
    package = Path(__file__).resolve().parent.parent  # the burrow package this module is in
    requirements = runtime_requirements()
    key = digest(
        {
            "python": python.name,
            "burrow": _tree_digest(package),
            "requirements": requirements,
            "pyinstaller": PYINSTALLER,
            "excludes": EXCLUDES,
            "hidden": HIDDEN_IMPORTS,
            "system": SYSTEM_LIBRARIES,
            "hook": CERT_HOOK,
            "entry": ENTRY,
        }
    )
    bundle = cache / f"bundle-{target.arch}-{key}"
    if (bundle / "burrow").is_file():
        return bundle
    say("bundling burrow with PyInstaller (onedir)" + (" under emulation" if root else ""))
    started = time.monotonic()
    with _workdir(cache, root) as work:
        inside = Path("/build") if root is not None else work  # work, as the build sees it
        site = work / "site"
        shutil.copytree(
            package, site / "burrow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
        )
        wheel_args = [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_MINOR,
        ]
        platforms = [arg for tag in target.wheel_platforms for arg in ("--platform", tag)]
        pip(["install", "--target", str(site), *wheel_args, *platforms, *requirements], cache)
        pip(
            ["install", "--target", str(work / "tools"), *wheel_args, *platforms, *PYINSTALLER],
            cache,
        )
        (work / "entry.py").write_text(ENTRY)
        (work / "hook_certs.py").write_text(CERT_HOOK)
        interpreter = python
        if root is not None:
            shutil.copytree(python, work / "python", symlinks=True)
            interpreter = inside / "python"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") if root is None else ROOT_PATH,
            "HOME": str(inside),
            "LANG": "C.UTF-8",
            "PYTHONPATH": f"{inside / 'site'}{os.pathsep}{inside / 'tools'}",
            "PYTHONNOUSERSITE": "1",
            "LD_LIBRARY_PATH": str(interpreter / "lib"),
            "PYINSTALLER_CONFIG_DIR": str(inside / "pyinstaller-config"),
            "SOURCE_DATE_EPOCH": "315532800",
        }
        modules = [arg for name in EXCLUDES for arg in ("--exclude-module", name)]
        modules += [arg for name in HIDDEN_IMPORTS for arg in ("--hidden-import", name)]
        argv = [
            str(interpreter / "bin" / f"python{PYTHON_MINOR}"),
            "-m",
            "PyInstaller",
            "--onedir",
            "--name",
            "burrow",
            "--noconfirm",
            "--log-level",
            "WARN",
            "--distpath",
            str(inside / "dist"),
            "--workpath",
            str(inside / "build"),
            "--specpath",
            str(inside),
            "--paths",
            str(inside / "site"),
            "--runtime-hook",
            str(inside / "hook_certs.py"),
            *modules,
            str(inside / "entry.py"),
        ]
        log = work / "pyinstaller.log"
        if root is None:
            run_step(argv, cwd=work, env=env, log=log, what="PyInstaller")
        else:
            variables = [f"{name}={value}" for name, value in env.items()]
            emulated = emulate.command(
                root, target.machine, ["/usr/bin/env", "-i", *variables, *argv]
            )
            run_step(emulated, cwd=work, log=log, what=f"PyInstaller (emulated {target.machine})")
        warnings = work / "build" / "burrow" / "warn-burrow.txt"
        if warnings.is_file():
            shutil.copy(warnings, f"{bundle}.warnings.txt")
        dist = work / "dist" / "burrow"
        for name in SYSTEM_LIBRARIES:
            (dist / "_internal" / name).unlink(missing_ok=True)
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.move(dist, bundle)
    prune(cache, f"bundle-{target.arch}-", keep=bundle)
    say(f"bundle built in {time.monotonic() - started:.0f} s: {bundle}")
    return bundle


@contextlib.contextmanager
def _workdir(cache: Path, root: Path | None) -> Iterator[Path]:
    """A fresh directory for the bundle's build: in the cache, or in the target's root."""
    if root is None:
        with tempfile.TemporaryDirectory(prefix="burrow-standalone-", dir=cache) as tmp:
            yield Path(tmp)
        return
    work = root / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_root(target: Target, cache: Path, say: Log) -> Path:
    """A Debian 11 root of the target machine with binutils, where PyInstaller runs."""
    dest = cache / f"root-{target.arch}-{ROOT_SUITE}"
    if not (dest / ".complete").is_file():
        say(f"making a Debian {ROOT_SUITE} root for {target.machine} (debootstrap)")

    def run(argv: Sequence[str], cwd: Path) -> None:
        run_step(argv, cwd=cwd, log=cache / f"root-{target.arch}.log", what=f"root: {argv[0]}")

    try:
        return emulate.debian_root(
            dest,
            target.machine,
            suite=ROOT_SUITE,
            mirror=DEBIAN_ARCHIVES[0][0],
            include=("binutils",),  # PyInstaller adds its archive to the executable with objcopy
            run=run,
        )
    except emulate.EmulationError as exc:
        raise StandaloneError(str(exc)) from None


def check_bundle(bundle: Path, limit: tuple[int, int] = GLIBC_MAX) -> dict[str, tuple[int, int]]:
    """The newest glibc each ELF file needs; StandaloneError if any needs more than ``limit``."""
    needs: dict[str, tuple[int, int]] = {}
    for path in sorted(bundle.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        with open(path, "rb") as handle:
            if not is_elf(handle.read(4)):
                continue
        try:
            newest = max_glibc(needed_versions(path.read_bytes()))
        except ElfError as exc:
            raise StandaloneError(f"{path}: {exc}") from None
        if newest is None:
            continue
        name = path.relative_to(bundle).as_posix()
        needs[name] = newest
        if newest > limit:
            raise StandaloneError(
                f"{name} needs GLIBC_{newest[0]}.{newest[1]}, newer than "
                f"{limit[0]}.{limit[1]}: it would not start on Amazon Linux 2023"
            )
    if not needs:
        raise StandaloneError(f"{bundle} holds no ELF file that needs glibc: not a bundle")
    return needs


def write_zip(output: Path, bundle: Path) -> None:
    """``extensions/burrow`` and ``burrow/...``, in a fixed order with fixed timestamps."""
    partial = output.with_name(output.name + ".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "extensions/burrow", LAUNCHER.encode(), 0o755)
        for path in sorted(bundle.rglob("*")):
            if path.is_dir():
                continue
            # Symlinks are stored as the file they point to: Lambda's unzip is not promised
            # to keep them.
            name = "burrow/" + path.relative_to(bundle).as_posix()
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            _add(archive, name, path.read_bytes(), mode)
    partial.replace(output)


def _add(archive: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.create_system = 3  # Unix, so that the mode bits survive
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)  # level 6: level 9 takes 5x as long for 0.5% less


# --- helpers -------------------------------------------------------------------------------


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()
