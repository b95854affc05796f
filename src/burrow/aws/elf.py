"""Which symbol versions an ELF file needs from its libraries (``.gnu.version_r``).

A binary built against a newer glibc than the machine's fails to start there with "version
`GLIBC_2.35' not found"; reading the requirements from the file tells before shipping it.
Sans-I/O: bytes in, names out; 64-bit little-endian ELF (x86_64 and aarch64) only.
"""

from __future__ import annotations

import re
import struct

MAGIC = b"\x7fELF"
SHT_GNU_VERNEED = 0x6FFFFFFE
MAX_ENTRIES = 4096  # a real file has a few dozen; more means a corrupt table
_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_VERNEED = struct.Struct("<HHIII")
_VERNAUX = struct.Struct("<IHHII")
_GLIBC = re.compile(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?")


class ElfError(ValueError):
    """The bytes are not an ELF file this reader understands, or its tables are corrupt."""


def is_elf(head: bytes) -> bool:
    return head[:4] == MAGIC


def needed_versions(data: bytes) -> dict[str, set[str]]:
    """``{library: {version, ...}}`` from the version-needs table; empty for a static file."""
    if not is_elf(data) or len(data) < _HEADER.size:
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("only 64-bit little-endian ELF files are supported")
    header = _HEADER.unpack_from(data)
    shoff, shentsize, shnum = header[6], header[11], header[12]
    if shoff == 0 or shnum == 0:
        return {}
    if shentsize < _SECTION.size or shnum > MAX_ENTRIES:
        raise ElfError("bad section header table")
    sections = [_section(data, shoff + i * shentsize) for i in range(shnum)]
    result: dict[str, set[str]] = {}
    for _name, kind, offset, size, link, info in sections:
        if kind != SHT_GNU_VERNEED:
            continue
        if link >= len(sections):
            raise ElfError("version table names a missing string table")
        strtab = sections[link]
        strings = data[strtab[2] : strtab[2] + strtab[3]]
        _read_verneed(data[offset : offset + size], min(info, MAX_ENTRIES), strings, result)
    return result


def max_glibc(versions: dict[str, set[str]]) -> tuple[int, int] | None:
    """The newest ``GLIBC_x.y`` among the needed versions; None if glibc is not needed."""
    found = [
        (int(m.group(1)), int(m.group(2)))
        for names in versions.values()
        for name in names
        if (m := _GLIBC.fullmatch(name))
    ]
    return max(found) if found else None


def _section(data: bytes, at: int) -> tuple[int, int, int, int, int, int]:
    if at + _SECTION.size > len(data):
        raise ElfError("section header past the end of the file")
    name, kind, _flags, _addr, offset, size, link, info, _align, _entsize = _SECTION.unpack_from(
        data, at
    )
    if kind != 8 and offset + size > len(data):  # SHT_NOBITS (8) occupies no file space
        raise ElfError("section past the end of the file")
    return name, kind, offset, size, link, info


def _read_verneed(table: bytes, count: int, strings: bytes, result: dict[str, set[str]]) -> None:
    at = 0
    for _ in range(count):  # bounded by the table's own count (capped)
        if at + _VERNEED.size > len(table):
            raise ElfError("version-needs entry past the end of its section")
        _version, aux_count, file_off, aux, next_off = _VERNEED.unpack_from(table, at)
        names = result.setdefault(_string(strings, file_off), set())
        aux_at = at + aux
        for _ in range(min(aux_count, MAX_ENTRIES)):
            if aux_at + _VERNAUX.size > len(table):
                raise ElfError("version-needs name past the end of its section")
            _hash, _flags, _other, name_off, aux_next = _VERNAUX.unpack_from(table, aux_at)
            names.add(_string(strings, name_off))
            if aux_next == 0:
                break
            aux_at += aux_next
        if next_off == 0:
            break
        at += next_off


def _string(strings: bytes, offset: int) -> str:
    if offset >= len(strings):
        raise ElfError("string offset past the end of the string table")
    end = strings.find(b"\0", offset)
    return strings[offset : end if end >= 0 else len(strings)].decode("ascii", "replace")
