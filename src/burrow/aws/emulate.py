"""Run another machine's programs (arm64 on x86_64) in a Debian root, under qemu's user-mode
emulation, without changing the machine: the binfmt_misc entry that sends the other machine's
ELF files to qemu lives in a user namespace of the command's own (Linux 6.7 and later), not in
the machine's global table.

Used to freeze the standalone extension for another architecture (PyInstaller must run the
target's interpreter, and its ``ldd`` and ``objcopy``) and to test the result.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from burrow.errors import BurrowError

#: binfmt_misc's magic and mask for a 64-bit little-endian ELF executable of each machine.
MAGIC = {
    "aarch64": (
        r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
    "x86_64": (
        r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
}

#: The helper, run by this Python: a child unshares user, mount and pid namespaces; the parent
#: maps uids and gids 0-65535 onto themselves (it is root); the child's child mounts its own
#: binfmt_misc and /proc, registers qemu (flag F: the file is opened now, so the root need not
#: hold it), chroots and execs. Exit code: the command's.
HELPER = r"""
import ctypes, os, sys
root, machine, qemu, magic, mask, *argv = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
def mount(kind, target):
    if libc.mount(kind.encode(), target.encode(), kind.encode(), 0, None) != 0:
        sys.exit(f"mount {kind} on {target}: {os.strerror(ctypes.get_errno())}")
unshared, mapped = os.pipe(), os.pipe()
child = os.fork()
if child == 0:
    if libc.unshare(0x10000000 | 0x00020000 | 0x20000000) != 0:  # USER, NS, PID
        sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
    os.write(unshared[1], b"x")
    if os.read(mapped[0], 1) != b"x":
        sys.exit("the parent could not map the user namespace's ids")
    inner = os.fork()
    if inner == 0:
        mount("binfmt_misc", "/proc/sys/fs/binfmt_misc")
        with open("/proc/sys/fs/binfmt_misc/register", "w") as register:
            register.write(f":burrow-{machine}:M::{magic}:{mask}:{qemu}:F")
        mount("proc", os.path.join(root, "proc"))
        os.chroot(root)
        os.chdir("/")
        os.execvp(argv[0], argv)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]))
if os.read(unshared[0], 1) == b"x":
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{child}/{name}", "w") as mapping:
            mapping.write("0 0 65536\n")
    os.write(mapped[1], b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
"""


class EmulationError(BurrowError):
    """The other machine's programs cannot be run here (no qemu, not root, an old kernel)."""


def qemu_for(machine: str) -> str:
    path = shutil.which(f"qemu-{machine}-static")
    if path is None or machine not in MAGIC:
        raise EmulationError(
            f"running {machine} programs here needs qemu-{machine}-static "
            "(apt-get install qemu-user-static)"
        )
    return path


def command(root: Path, machine: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run chrooted in ``root`` (a Debian root for ``machine``), under emulation."""
    magic, mask = MAGIC[machine]
    return [sys.executable, "-c", HELPER, str(root), machine, qemu_for(machine), magic, mask, *argv]


DEBIAN_ARCH = {"aarch64": "arm64", "x86_64": "amd64"}


def debian_root(
    dest: Path,
    machine: str,
    *,
    suite: str,
    mirror: str,
    include: Sequence[str],
    run: Callable[[Sequence[str], Path], None],
) -> Path:
    """A Debian root for ``machine`` at ``dest``, made once (a marker says it is complete).

    debootstrap's first stage only downloads and unpacks; its second would run the other
    machine's maintainer scripts, which need device nodes a user namespace may not create. The
    files are all a program needs, so every downloaded package is unpacked, then ldconfig runs
    under emulation. ``run(argv, cwd)`` runs a step (and raises if it fails).
    """
    done = dest / ".complete"
    if done.is_file():
        return dest
    if shutil.which("debootstrap") is None:
        raise EmulationError("making a Debian root needs debootstrap (apt-get install debootstrap)")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            "debootstrap",
            f"--arch={DEBIAN_ARCH[machine]}",
            "--foreign",
            "--variant=minbase",
            f"--include={','.join(include)}",
            suite,
            str(partial),
            mirror,
        ],
        partial.parent,
    )
    for deb in sorted((partial / "var" / "cache" / "apt" / "archives").glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(partial)], partial.parent)
    run(command(partial, machine, ["/sbin/ldconfig"]), partial.parent)
    (partial / ".complete").write_text(f"{suite} {machine} {' '.join(include)}\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest
