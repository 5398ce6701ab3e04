"""Just enough ELF reading to get a kernel module's .modinfo (name, depends, vermagic)."""

from __future__ import annotations

import struct
from pathlib import Path


def _section(data: bytes, wanted: str) -> bytes | None:
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELFCLASS64 only: x86_64 modules
        raise ValueError("not a 64-bit ELF file")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i: int) -> tuple[int, int, int]:
        base = e_shoff + i * e_shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, stroff, strsize = sh(e_shstrndx)
    names = data[stroff:stroff + strsize]
    for i in range(e_shnum):
        name_off, offset, size = sh(i)
        end = names.index(b"\0", name_off)
        if names[name_off:end].decode() == wanted:
            return data[offset:offset + size]
    return None


def modinfo(path: Path) -> dict[str, str]:
    """The key=value strings of a module's .modinfo section (last value wins for repeats)."""
    sec = _section(path.read_bytes(), ".modinfo")
    info: dict[str, str] = {}
    for item in (sec or b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def alloc_sections(path: Path) -> set[str]:
    """Names of the sections that occupy memory at run time (SHF_ALLOC).

    Reads only the ELF header, the section table and its string table: debug objects are
    tens of MB and this runs at every boot (for the run's gdbinit)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise ValueError(f"{path}: not a 64-bit ELF file")
        e_shoff, = struct.unpack_from("<Q", head, 0x28)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(e_shoff)
        table = f.read(e_shentsize * e_shnum)
        stroff, strsize = struct.unpack_from("<QQ", table, e_shstrndx * e_shentsize + 0x18)
        f.seek(stroff)
        names = f.read(strsize)
    out = set()
    for i in range(e_shnum):
        b = i * e_shentsize
        name_off, = struct.unpack_from("<I", table, b)
        flags, = struct.unpack_from("<Q", table, b + 8)
        if flags & 0x2:  # SHF_ALLOC
            end = names.index(b"\0", name_off)
            out.add(names[name_off:end].decode())
    return out
