"""Build a Lambda layer zip that runs burrow as an external extension.

Lambda unpacks layers into ``/opt``: ``extensions/burrow`` (a launcher; Lambda starts every
executable in ``/opt/extensions``) and ``python/`` (burrow and its dependencies; the Python
runtimes put ``/opt/python`` on the function's path, and the launcher puts it on the
extension's). Compiled dependencies are fetched as wheels for Lambda's platform, not the
build machine's, so the layer can be built anywhere.
"""

from __future__ import annotations

import compileall
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from burrow.errors import BurrowError, ConfigError

#: The executable Lambda runs. A separate process from the function, so /opt/python is not on
#: its path by default; /var/lang/bin/python3 is the runtime's own interpreter.
LAUNCHER = """\
#!/bin/sh
# burrow's Lambda extension: private services as local ports for the function.
export PYTHONPATH="/opt/python${PYTHONPATH:+:$PYTHONPATH}"
PY=/var/lang/bin/python3
[ -x "$PY" ] || PY=python3
exec "$PY" -m burrow.aws.extension "$@"
"""

ARCHES = {"x86_64": "x86_64", "arm64": "aarch64"}
#: What the extension imports beyond the standard library: a layer without them cannot start
#: (websockets: for a serverless relay, ``BURROW_RELAY=wss://...``).
EXTENSION_IMPORTS = ("cryptography", "h11", "msgspec", "websockets")
PIP_TIMEOUT = 600.0
#: A fixed timestamp for every entry, so the same inputs give the same zip (and layer hash).
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class LayerError(BurrowError):
    """The layer could not be built (pip failed, the output is not writable, ...)."""


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise ConfigError(f"--arch must be x86_64 or arm64, not {arch!r}")
    return arch


def check_python_version(version: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", version):
        raise ConfigError(f"--python-version must look like 3.12, not {version!r}")
    return version


def platforms(python_version: str, arch: str) -> list[str]:
    """pip ``--platform`` tags Lambda's runtime can load (AL2: glibc 2.26; AL2023: 2.34)."""
    machine = ARCHES[check_arch(arch)]
    tags = [f"manylinux2014_{machine}"]
    if tuple(int(p) for p in python_version.split(".")) >= (3, 12):  # Amazon Linux 2023
        tags.append(f"manylinux_2_28_{machine}")
    return tags


#: Dependencies of the command line that the extension never imports: left out of the layer,
#: so the zip stays small and nothing unused is unpacked into /opt.
NOT_IN_LAYER = frozenset({"rich", "prometheus-client", "prometheus_client"})


def runtime_requirements() -> list[str]:
    """burrow's own dependencies (no extras, none only the CLI needs), from its metadata."""
    from importlib import metadata

    try:
        requires = metadata.requires("burrow") or []
    except metadata.PackageNotFoundError:
        raise LayerError("burrow's package metadata is missing; install burrow with pip") from None
    # Markers other than extras are about the platform, and Lambda's is always Linux.
    wanted = [r.split(";")[0].strip() for r in requires if "extra ==" not in r]
    return [r for r in wanted if _project(r) not in NOT_IN_LAYER]


def _project(requirement: str) -> str:
    """The project name of a requirement such as ``rich>=13``."""
    return re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()


def build_layer(
    output: Path,
    *,
    python_version: str = "3.12",
    arch: str = "x86_64",
    no_deps: bool = False,
) -> Path:
    """Write the layer zip to ``output`` and return its path.

    ``no_deps`` copies only the burrow package and downloads nothing: for tests, or for a
    runtime whose own site-packages already hold burrow's dependencies (the function's
    deployment package in /var/task is not on the extension's path).
    """
    check_python_version(python_version)
    check_arch(arch)
    package = Path(__file__).resolve().parent.parent  # the burrow package this module is in
    with tempfile.TemporaryDirectory(prefix="burrow-layer-") as tmp:
        site = Path(tmp) / "python"
        shutil.copytree(
            package, site / "burrow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
        )
        same_python = f"{sys.version_info[0]}.{sys.version_info[1]}" == python_version
        if not no_deps:
            _pip_install(site, runtime_requirements(), python_version, arch, same_python)
            # Console scripts name the build machine's Python in their #! line: useless there.
            shutil.rmtree(site / "bin", ignore_errors=True)
            missing = [name for name in EXTENSION_IMPORTS if not (site / name).is_dir()]
            if missing:
                raise LayerError(
                    f"burrow's installed metadata lacks {', '.join(missing)}; "
                    "reinstall burrow (pip install -e .) and build again"
                )
        if same_python:
            # /opt is read-only: without .pyc files every cold start compiles from source.
            # Hash-based, unchecked: the zip's timestamps say nothing about the sources.
            compileall.compile_dir(
                site / "burrow",
                quiet=1,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            _write_zip(output, site)
        except OSError as exc:
            raise LayerError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


def _pip_install(
    target: Path, requirements: list[str], python_version: str, arch: str, compile_: bool
) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
        str(target),
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python_version,
    ]
    for tag in platforms(python_version, arch):
        command += ["--platform", tag]
    if not compile_:
        command.append("--no-compile")  # .pyc files of this Python would be dead weight
    try:
        result = subprocess.run(
            [*command, *requirements],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LayerError(f"pip did not finish within {PIP_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise LayerError(f"cannot run pip: {exc.strerror or exc}") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise LayerError(f"pip install failed: {lines[-1] if lines else 'no output'}")


def _write_zip(output: Path, site: Path) -> None:
    partial = output.with_name(output.name + ".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        _add(archive, "extensions/burrow", LAUNCHER.encode(), 0o755)
        for path in sorted(site.rglob("*")):
            if path.is_file():
                name = "python/" + path.relative_to(site).as_posix()
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                _add(archive, name, path.read_bytes(), mode)
    partial.replace(output)  # never a half-written zip under the real name


def _add(archive: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.create_system = 3  # Unix, so unzip (and Lambda) honour the mode bits
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)
