"""CPython for an old glibc, built here: the interpreter inside the standalone extension.

The Pythons a build machine has (Debian 12's, pyenv's) link libpython against GLIBC_2.35
symbols, so a bundle of either fails to start on Amazon Linux 2023 (glibc 2.34). CPython,
OpenSSL, zlib and libffi are compiled from Debian's source packages with ``zig cc -target
ARCH-linux-gnu.2.28`` (zig from PyPI's ``ziglang``: glibc 2.28 stubs, so nothing newer can be
linked), natively or across machines (arm64 on x86_64). The result is cached, keyed by a hash of
the sources, zig and this recipe.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from burrow.aws.layer import LayerError

#: Bump when the recipe below changes in a way that changes the interpreter it builds.
RECIPE = 3
PYTHON_MINOR = "3.11"
#: Debian source packages (bookworm): upstream's tarballs, checked by apt against the archive's
#: signed index, and for CPython Debian's packaging too, for the security fixes it carries.
SOURCES = ("python3.11", "openssl", "zlib", "libffi")
PATCHED = "python3.11"
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
#: The newest glibc the bundle is built against: zig's stubs and the wheels' tags keep to 2.28
#: (manylinux_2_28, as cryptography's wheels), below Amazon Linux 2023's 2.34. Amazon Linux 2
#: (2.26) is not a target.
GLIBC_TARGET = "2.28"
STEP_TIMEOUT = 3600.0
LOG_TAIL = 15

#: Extension modules the build must have produced (setup.py skips a failed one silently): what
#: the extension imports, and pyexpat, which PyInstaller itself needs.
REQUIRED_MODULES = ("_ssl", "_hashlib", "zlib", "_ctypes", "_asyncio", "_json", "pyexpat", "select")

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


def host_machine() -> str:
    return os.uname().machine


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
        run_step(["apt-get", *apt, "update"], cwd=where, log=log, what="apt-get update")
        for name in missing:
            # The newest version first (a security update), then the release's own: a mirror
            # may lack part of the security archive.
            for spec in (name, f"{name}/{DEBIAN_RELEASE}"):
                command = ["apt-get", *apt, "source", "--download-only", spec]
                run_step(command, cwd=where, log=log, what=f"apt-get source {spec}", check=False)
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
        pip(["download", "--no-deps", "--only-binary=:all:", "-d", tmp, ZIG], cache)
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
    key = digest(
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
    if is_cross(target):
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
        run_step(args, cwd=built[where], env=env, log=log, what=what)

    step(["./configure", "--static", f"--prefix={deps}"], "zlib", "zlib: configure")
    step(["make", f"-j{jobs}", "libz.a"], "zlib", "zlib: make")
    step(["make", "install"], "zlib", "zlib: install")
    host = [f"--host={target.triple}", f"--build={host_machine()}-linux-gnu"]
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
    if not is_cross(target):
        python = prefix / "bin" / f"python{PYTHON_MINOR}"
        run_step(
            [str(python), "-c", f"import ssl, asyncio, {', '.join(REQUIRED_MODULES)}"],
            cwd=work,
            env={**env, "LD_LIBRARY_PATH": str(prefix / "lib")},
            log=log,
            what="CPython: import check",
        )
    done.write_text(f"{target.zig} {key}\n")
    shutil.rmtree(work, ignore_errors=True)
    prune(cache, f"python-{target.arch}-", keep=prefix)
    say(f"interpreter built in {time.monotonic() - started:.0f} s: {prefix}")
    return prefix


def is_cross(target: Target) -> bool:
    return target.machine != host_machine()


def _build_python(target: Target) -> list[str]:
    """A cross build runs this Python (the same minor version) where it would run its own."""
    return [f"--with-build-python={sys.executable}"] if is_cross(target) else []


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
    run_step(["tar", "-xf", str(debian)], cwd=packaging, log=log, what=f"unpack {debian.name}")
    patches = packaging / "debian" / "patches"
    try:
        series = (patches / "series").read_text().split()
    except OSError:
        raise StandaloneError(f"{debian.name} has no debian/patches/series") from None
    chosen = upstream_fixes(series)
    for name in chosen:
        run_step(
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
    run_step(["tar", "-xf", str(tarball)], cwd=into, log=into / "build.log", what=f"unpack {name}")
    new = [p for p in into.iterdir() if p.name not in before and p.is_dir()]
    if len(new) != 1:
        raise StandaloneError(f"{tarball.name} did not unpack into one directory")
    return new[0]


# --- the bundle ----------------------------------------------------------------------------


def prune(cache: Path, prefix: str, keep: Path) -> None:
    """Remove the entries an older recipe or source left under ``cache`` (hundreds of MB)."""
    for old in cache.glob(f"{prefix}*"):
        if old != keep and not old.name.startswith(keep.name):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def pip(args: Sequence[str], cache: Path) -> None:
    run_step(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        cwd=cache,
        log=cache / "pip.log",
        what="pip " + args[0],
    )


def run_step(
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


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _file_id(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):  # bounded by the file's size
            digest.update(chunk)
    return f"{path.name}:{digest.hexdigest()}"
