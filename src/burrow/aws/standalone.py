"""Build the standalone Lambda extension: burrow frozen (PyInstaller, onedir) with a CPython
built for an old glibc, so that the layer needs no Python in the function's runtime.

Why build an interpreter: the Pythons a build machine has (Debian 12's, pyenv's) link
libpython against GLIBC_2.35 symbols, and a bundle of either fails to start on Amazon Linux
2023 (glibc 2.34). So CPython, OpenSSL, zlib and libffi are compiled here from Debian's source
packages with ``zig cc -target ARCH-linux-gnu.2.28`` (zig from PyPI's ``ziglang``: glibc 2.28
stubs, so nothing newer can be linked), and burrow's compiled dependencies come as manylinux
wheels no newer than 2.28. Every ELF file of the bundle is checked before the zip is written.

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
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from burrow.aws import emulate
from burrow.aws.elf import ElfError, is_elf, max_glibc, needed_versions
from burrow.aws.layer import ZIP_DATE, LayerError, check_arch, runtime_requirements

#: Bump when the recipe below changes in a way that changes the interpreter it builds.
RECIPE = 3
PYTHON_MINOR = "3.11"
#: Debian source packages (bookworm): upstream's tarballs, checked by apt against the archive's
#: signed index, and for CPython Debian's packaging too, for the security fixes it carries.
SOURCES = ("python3.11", "openssl", "zlib", "libffi")
PATCHED = "python3.11"
#: The Debian release of the root PyInstaller runs in for another machine (glibc 2.31).
ROOT_SUITE = "bullseye"
ROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_RELEASE = "bookworm"
DEBIAN_ARCHIVES = (
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
)
#: Where Debian's python3.11 series turns from its packaging (dist-packages, multiarch: not
#: applied) to upstream's fixes (CVE-..., backports, and fixes they depend on: all applied, in
#: order, to upstream's 3.11.2).
UPSTREAM_FIX = re.compile(r"(CVE-\d{4}-\d+|\d{4}-3\.11-gh-\d+)")
ZIG = "ziglang==0.17.1"
PYINSTALLER = ("pyinstaller==6.22.3", "pyinstaller-hooks-contrib==2026.9", "altgraph==0.17.5")
#: The newest glibc the bundle is built against: zig's stubs and the wheels' tags keep to 2.28
#: (manylinux_2_28, as cryptography's wheels), below Amazon Linux 2023's 2.34. Amazon Linux 2
#: (2.26) is not a target.
GLIBC_TARGET = "2.28"
#: What AL2023 (provided.al2023, nodejs20.x, java21, ...) has: the build fails above it.
GLIBC_MAX = (2, 34)
STEP_TIMEOUT = 3600.0
LOG_TAIL = 15

#: Extension modules the build must have produced (setup.py skips a failed one silently): what
#: the extension imports, and pyexpat, which PyInstaller itself needs.
REQUIRED_MODULES = ("_ssl", "_hashlib", "zlib", "_ctypes", "_asyncio", "_json", "pyexpat", "select")

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

#: zig cc for the target glibc. It writes debug info unless told not to (-g0: a third of the
#: bundle), turns UBSan traps on in unoptimised code (off here), makes __DATE__ an error
#: (CPython's build info uses it) and knows only -soname, not -h.
ZIG_CC = """\
#!/bin/sh
for arg do
  shift
  case "$arg" in
    -Wl,-h*) set -- "$@" "-Wl,-soname,${{arg#-Wl,-h}}" ;;
    *) set -- "$@" "$arg" ;;
  esac
done
exec "{zig}" cc -target {target} -g0 -fno-sanitize=undefined -Wno-date-time "$@"
"""

Log = Callable[[str], None]


class StandaloneError(LayerError):
    """The standalone extension could not be built (a tool missing, a step failed)."""


@dataclass(frozen=True)
class Target:
    arch: str  # Lambda's name: x86_64 or arm64
    machine: str  # the GNU/zig name: x86_64 or aarch64
    openssl: str  # OpenSSL's Configure target

    @property
    def zig(self) -> str:
        return f"{self.machine}-linux-gnu.{GLIBC_TARGET}"

    @property
    def triple(self) -> str:
        return f"{self.machine}-linux-gnu"

    @property
    def wheel_platforms(self) -> list[str]:
        return [f"manylinux_2_28_{self.machine}", f"manylinux2014_{self.machine}"]


TARGETS = {
    "x86_64": Target("x86_64", "x86_64", "linux-x86_64"),
    "arm64": Target("arm64", "aarch64", "linux-aarch64"),
}


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
    if _cross(target):
        # PyInstaller runs the target's interpreter: under emulation, in a root of its own.
        if os.geteuid() != 0:
            raise StandaloneError(
                f"--arch {arch} --standalone on an {_host_machine()} machine needs root "
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
        root = build_root(target, cache, say) if _cross(target) else None
        bundle = build_bundle(target, python, cache, say, root)
    check_bundle(bundle)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_zip(output, bundle)
    except OSError as exc:
        raise StandaloneError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


def _host_machine() -> str:
    return os.uname().machine


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


@dataclass(frozen=True)
class Source:
    orig: Path  # upstream's tarball
    debian: Path | None = None  # Debian's packaging (PATCHED only)


def fetch_sources(cache: Path, say: Log) -> dict[str, Source]:
    """Each Debian source package's files, downloaded once with apt-get.

    apt-get runs with a sources list and state of its own under the cache, so the machine's
    apt configuration is neither needed nor changed; apt checks each file's hash against the
    archive's signed index.
    """
    where = cache / "sources"
    found = {name: find_source(where, name) for name in SOURCES}
    missing = [name for name, source in found.items() if source is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise StandaloneError(
                "apt-get is needed to fetch Debian's sources of "
                + ", ".join(missing)
                + f"; or put their files (apt-get source --download-only) in {where}"
            )
        say(f"fetching Debian's sources of {', '.join(missing)}")
        apt = _apt_options(cache)
        log = cache / "apt.log"
        _run(["apt-get", *apt, "update"], cwd=where, log=log, what="apt-get update")
        for name in missing:
            # The newest version first (a security update), then the release's own: a mirror
            # may lack part of the security archive.
            for spec in (name, f"{name}/{DEBIAN_RELEASE}"):
                command = ["apt-get", *apt, "source", "--download-only", spec]
                _run(command, cwd=where, log=log, what=f"apt-get source {spec}", check=False)
                found[name] = find_source(where, name)
                if found[name] is not None:
                    break
            else:
                raise StandaloneError(f"could not download Debian's source of {name} (see {log})")
    return {name: source for name, source in found.items() if source is not None}


def _apt_options(cache: Path) -> list[str]:
    state = cache / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "sources").mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    sources.write_text(
        "".join(f"deb-src {mirror} {suite} main\n" for mirror, suite in DEBIAN_ARCHIVES)
    )
    return [
        "-qq",
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={state / 'lists'}",
        "-o",
        f"Dir::Cache={state}",
        "-o",
        "APT::Sandbox::User=root",
    ]


def find_source(where: Path, name: str) -> Source | None:
    """The newest complete set of a package's files in ``where``, or None."""
    if not where.is_dir():
        return None
    origs = sorted(
        p for p in where.glob(f"{name}_*.orig.tar.*") if not p.name.endswith((".asc", ".sig"))
    )
    if not origs:
        return None
    if name != PATCHED:
        return Source(origs[-1])
    upstream = origs[-1].name.split("_", 1)[1].removesuffix(".orig.tar.gz")
    debian = sorted(where.glob(f"{name}_{upstream}-*.debian.tar.*"))
    return Source(origs[-1], debian[-1]) if debian else None


def fetch_zig(cache: Path, say: Log) -> Path:
    """zig from PyPI's ``ziglang`` wheel (the wheel carries the whole toolchain)."""
    version = ZIG.split("==")[1]
    home = cache / "tools" / f"zig-{version}"
    zig = home / "ziglang" / "zig"
    if zig.is_file():
        return zig
    say(f"fetching zig {version} (PyPI: ziglang)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _pip(["download", "--no-deps", "--only-binary=:all:", "-d", tmp, ZIG], cache)
        wheels = list(Path(tmp).glob("ziglang-*.whl"))
        if not wheels:
            raise StandaloneError("pip downloaded no ziglang wheel for this machine")
        partial = Path(tmp) / "zig"
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(partial)
        (partial / "ziglang" / "zig").chmod(0o755)
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)
    return zig


# --- the interpreter -----------------------------------------------------------------------


def build_interpreter(target: Target, cache: Path, say: Log) -> Path:
    """CPython (shared libpython, for PyInstaller) with static OpenSSL, zlib and libffi."""
    sources = fetch_sources(cache, say)
    zig = fetch_zig(cache, say)
    key = _digest(
        {
            "recipe": RECIPE,
            "cc": ZIG_CC,
            "target": target.zig,
            "zig": ZIG,
            "sources": {
                name: [_file_id(path) for path in (source.orig, source.debian) if path]
                for name, source in sorted(sources.items())
            },
        }
    )
    prefix = cache / f"python-{target.arch}-{key}"
    done = prefix / ".complete"  # written last: a failed build is never taken for a good one
    if done.is_file():
        return prefix
    say(f"building CPython, OpenSSL, zlib and libffi for glibc {GLIBC_TARGET} (minutes)")
    started = time.monotonic()
    work = cache / f"work-{target.arch}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(prefix, ignore_errors=True)
    (work / "bin").mkdir(parents=True)
    deps = work / "deps"
    env = _toolchain(work / "bin", zig, target, deps)
    if _cross(target):
        # What configure cannot test by running a program built for the other machine.
        site = work / "config.site"
        site.write_text(
            "ac_cv_file__dev_ptmx=yes\nac_cv_file__dev_ptc=no\nac_cv_buggy_getaddrinfo=no\n"
        )
        env["CONFIG_SITE"] = str(site)
        # binutils' reads any machine's ELF; configure wants a path, not the bare name.
        env["READELF"] = shutil.which("readelf") or "readelf"
    log = work / "build.log"
    jobs = str(os.cpu_count() or 2)
    built = {name: _unpack(source.orig, work) for name, source in sources.items()}
    python_tree = built[PATCHED]
    debian = sources[PATCHED].debian
    if debian is not None:
        applied = _apply_upstream_fixes(debian, python_tree, work, log)
        say(f"applied Debian's {applied} patches of security fixes to CPython")
    _patch_setup_py(python_tree / "setup.py")
    _patch_pyexpat(python_tree / "Modules" / "pyexpat.c")

    def step(args: Sequence[str], where: str, what: str) -> None:
        _run(args, cwd=built[where], env=env, log=log, what=what)

    step(["./configure", "--static", f"--prefix={deps}"], "zlib", "zlib: configure")
    step(["make", f"-j{jobs}", "libz.a"], "zlib", "zlib: make")
    step(["make", "install"], "zlib", "zlib: install")
    host = [f"--host={target.triple}", f"--build={_host_machine()}-linux-gnu"]
    step(
        [
            "./configure",
            *host,
            "--disable-shared",
            "--enable-static",
            "--with-pic",
            "--disable-docs",
            "--disable-multi-os-directory",
            # Its static trampolines do not compile with clang 16+ (zig's) in 3.4.4.
            "--disable-exec-static-tramp",
            f"--prefix={deps}",
            f"--libdir={deps / 'lib'}",
        ],
        "libffi",
        "libffi: configure",
    )
    step(["make", f"-j{jobs}"], "libffi", "libffi: make")
    step(["make", "install"], "libffi", "libffi: install")
    step(
        [
            "perl",
            "./Configure",
            target.openssl,
            "no-shared",
            "no-tests",
            "no-engine",
            "no-afalgeng",
            "no-comp",
            "-fPIC",
            f"--prefix={deps}",
            "--libdir=lib",
            "--openssldir=/etc/pki/tls",  # Amazon Linux's CA bundle (cert.pem) lives there
        ],
        "openssl",
        "openssl: Configure",
    )
    step(["make", f"-j{jobs}", "build_libs"], "openssl", "openssl: make")
    step(["make", "install_dev"], "openssl", "openssl: install")
    step(
        [
            "./configure",
            *host,
            f"--prefix={prefix}",
            "--enable-shared",  # PyInstaller bundles libpython3.11.so
            "--without-ensurepip",
            "--disable-test-modules",
            f"--with-openssl={deps}",
            *_build_python(target),
            f"CPPFLAGS=-I{deps / 'include'}",
            f"LDFLAGS=-L{deps / 'lib'}",
            "OPT=-DNDEBUG -fwrapv -O2 -Wall",  # the default adds -g: megabytes of symbols
        ],
        "python3.11",
        "CPython: configure",
    )
    # PY3LIBRARY= skips libpython3.so, a stub nothing here needs, which zig cannot link (a
    # link with no object file among its inputs fails on the target's glibc suffix).
    step(["make", f"-j{jobs}", "PY3LIBRARY="], "python3.11", "CPython: make")
    step(["make", "install", "PY3LIBRARY="], "python3.11", "CPython: install")
    _check_modules(prefix, target)
    if not _cross(target):
        python = prefix / "bin" / f"python{PYTHON_MINOR}"
        _run(
            [str(python), "-c", f"import ssl, asyncio, {', '.join(REQUIRED_MODULES)}"],
            cwd=work,
            env={**env, "LD_LIBRARY_PATH": str(prefix / "lib")},
            log=log,
            what="CPython: import check",
        )
    done.write_text(f"{target.zig} {key}\n")
    shutil.rmtree(work, ignore_errors=True)
    say(f"interpreter built in {time.monotonic() - started:.0f} s: {prefix}")
    return prefix


def _cross(target: Target) -> bool:
    return target.machine != _host_machine()


def _build_python(target: Target) -> list[str]:
    """A cross build runs this Python (the same minor version) where it would run its own."""
    return [f"--with-build-python={sys.executable}"] if _cross(target) else []


def _check_modules(prefix: Path, target: Target) -> None:
    dynload = prefix / "lib" / f"python{PYTHON_MINOR}" / "lib-dynload"
    suffix = f".cpython-{PYTHON_MINOR.replace('.', '')}-{target.triple}.so"
    missing = [name for name in REQUIRED_MODULES if not (dynload / f"{name}{suffix}").is_file()]
    if missing:
        raise StandaloneError(
            f"CPython built without {', '.join(missing)} (see the build log for why)"
        )


def _toolchain(bin_dir: Path, zig: Path, target: Target, deps: Path) -> dict[str, str]:
    """zig cc/ar/ranlib as plain commands (configure scripts want one word per tool)."""
    tools = {
        "cc": ZIG_CC.format(zig=zig, target=target.zig),
        "ar": f'#!/bin/sh\nexec "{zig}" ar "$@"\n',
        "ranlib": f'#!/bin/sh\nexec "{zig}" ranlib "$@"\n',
    }
    for name, body in tools.items():
        path = bin_dir / f"zig-{name}"
        path.write_text(body)
        path.chmod(0o755)
    path_var = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {
        "PATH": path_var,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C",
        "CC": "zig-cc",
        "AR": "zig-ar",
        "RANLIB": "zig-ranlib",
        "CFLAGS": "-O2 -fPIC",
        # Only the libraries built here: never the build machine's (newer) ones.
        "PKG_CONFIG_PATH": str(deps / "lib" / "pkgconfig"),
        "PKG_CONFIG_LIBDIR": str(deps / "lib" / "pkgconfig"),
        # setup.py (3.11 builds shared modules with it) adds the build machine's
        # /usr/include/<multiarch> and /usr/local unless it believes it cross-compiles.
        "_PYTHON_HOST_PLATFORM": f"linux-{target.machine}",
        "ZIG_GLOBAL_CACHE_DIR": str(zig.parent.parent / "cache"),
        "ZIG_LOCAL_CACHE_DIR": str(zig.parent.parent / "cache"),
    }


def upstream_fixes(series: list[str]) -> list[str]:
    """The tail of Debian's series from its first security fix: upstream's fixes, in order."""
    first = next((i for i, name in enumerate(series) if UPSTREAM_FIX.match(name)), len(series))
    return series[first:]


def _apply_upstream_fixes(debian: Path, tree: Path, work: Path, log: Path) -> int:
    """Debian's patches from its first security fix to the end of its series, in order."""
    packaging = work / "debian-packaging"
    packaging.mkdir()
    _run(["tar", "-xf", str(debian)], cwd=packaging, log=log, what=f"unpack {debian.name}")
    patches = packaging / "debian" / "patches"
    try:
        series = (patches / "series").read_text().split()
    except OSError:
        raise StandaloneError(f"{debian.name} has no debian/patches/series") from None
    chosen = upstream_fixes(series)
    for name in chosen:
        _run(
            ["patch", "-p1", "--forward", "--batch", "-i", str(patches / name)],
            cwd=tree,
            log=log,
            what=f"CPython: patch {name}",
        )
    return len(chosen)


def _patch_setup_py(path: Path) -> None:
    """3.11's setup.py adds Debian's /usr/include/<multiarch> for the shared modules: headers
    of the build machine's glibc, which break (or worse, silently change) the build."""
    text = path.read_text()
    call = "        self.add_multiarch_paths()\n"
    if text.count(call) != 1:
        raise StandaloneError(f"{path} is not the setup.py this recipe knows")
    path.write_text(text.replace(call, "        pass  # burrow: the target's headers only\n"))


def _patch_pyexpat(path: Path) -> None:
    """Debian's fix for CVE-2026-4224 gives pyexpat.c an internal header, which Debian's build
    allows (pyexpat is built in there) and setup.py's does not: declare it a core module, as
    upstream's later pyexpat.c does."""
    text = path.read_text()
    if "pycore_" in text and "Py_BUILD_CORE_MODULE" not in text:
        guard = "#ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif\n"
        path.write_text(guard + text)


def _unpack(tarball: Path, into: Path) -> Path:
    name = tarball.name.split("_", 1)[0]
    before = {p.name for p in into.iterdir()}
    _run(["tar", "-xf", str(tarball)], cwd=into, log=into / "build.log", what=f"unpack {name}")
    new = [p for p in into.iterdir() if p.name not in before and p.is_dir()]
    if len(new) != 1:
        raise StandaloneError(f"{tarball.name} did not unpack into one directory")
    return new[0]


# --- the bundle ----------------------------------------------------------------------------


def build_bundle(
    target: Target, python: Path, cache: Path, say: Log, root: Path | None = None
) -> Path:
    """PyInstaller's onedir of the extension, run by the interpreter built for it: here, or
    for another machine in ``root`` (a Debian root of that machine) under emulation."""
    package = Path(__file__).resolve().parent.parent  # the burrow package this module is in
    requirements = runtime_requirements()
    key = _digest(
        {
            "python": python.name,
            "burrow": _tree_digest(package),
            "requirements": requirements,
            "pyinstaller": PYINSTALLER,
            "excludes": EXCLUDES,
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
            package, site / "burrow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        wheel_args = [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_MINOR,
        ]
        platforms = [arg for tag in target.wheel_platforms for arg in ("--platform", tag)]
        _pip(["install", "--target", str(site), *wheel_args, *platforms, *requirements], cache)
        _pip(
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
        excludes = [arg for name in EXCLUDES for arg in ("--exclude-module", name)]
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
            *excludes,
            str(inside / "entry.py"),
        ]
        log = work / "pyinstaller.log"
        if root is None:
            _run(argv, cwd=work, env=env, log=log, what="PyInstaller")
        else:
            variables = [f"{name}={value}" for name, value in env.items()]
            emulated = emulate.command(
                root, target.machine, ["/usr/bin/env", "-i", *variables, *argv]
            )
            _run(emulated, cwd=work, log=log, what=f"PyInstaller (emulated {target.machine})")
        warnings = work / "build" / "burrow" / "warn-burrow.txt"
        if warnings.is_file():
            shutil.copy(warnings, f"{bundle}.warnings.txt")
        dist = work / "dist" / "burrow"
        for name in SYSTEM_LIBRARIES:
            (dist / "_internal" / name).unlink(missing_ok=True)
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.move(dist, bundle)
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
        _run(argv, cwd=cwd, log=cache / f"root-{target.arch}.log", what=f"root: {argv[0]}")

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


def _pip(args: Sequence[str], cache: Path) -> None:
    _run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        cwd=cache,
        log=cache / "pip.log",
        what="pip " + args[0],
    )


def _run(
    args: Sequence[str],
    *,
    cwd: Path,
    log: Path,
    what: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> int:
    """Run one build step, its output appended to ``log``; a failure names the step and the
    log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        try:
            # A session of its own: a timeout or Ctrl+C ends make's whole tree, not just make.
            proc = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise StandaloneError(f"{what}: cannot run {args[0]}: {exc.strerror or exc}") from None
        try:
            returncode = proc.wait(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise StandaloneError(f"{what} did not finish within {STEP_TIMEOUT:.0f} s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if check and returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        lines = [line.strip() for line in tail if line.strip()] or ["no output"]
        last = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1])
        raise StandaloneError(f"{what} failed ({last[:200]}); the log is {log}")
    return returncode


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _file_id(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):  # bounded by the file's size
            digest.update(chunk)
    return f"{path.name}:{digest.hexdigest()}"


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()
