"""A reproducible newc cpio writer for initramfs images.

Written here rather than shelling out to cpio(1) so that the archive is byte-for-byte a function
of its inputs (fixed mtimes, owners and inode numbers), which is what the image cache keys on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without leading "/"
    mode: int  # full st_mode (type and permission bits)
    source: Path | None = None  # regular files: where the content comes from
    data: bytes | None = None  # regular files: inline content
    target: str | None = None  # symlinks


def _header(ino: int, mode: int, nlink: int, size: int, name: bytes) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write(out: BinaryIO, entries: Iterable[Entry]) -> None:
    ino = 1
    for e in entries:
        name = e.path.lstrip("/").encode()
        if stat.S_ISLNK(e.mode):
            assert e.target is not None
            body = e.target.encode()
        elif stat.S_ISREG(e.mode):
            if e.data is not None:
                body = e.data
            else:
                assert e.source is not None
                body = e.source.read_bytes()
        else:
            body = b""
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        hdr = _header(ino, e.mode, nlink, len(body), name)
        out.write(hdr + name + b"\0")
        out.write(_pad(len(hdr) + len(name) + 1))
        out.write(body)
        out.write(_pad(len(body)))
        ino += 1
    trailer = b"TRAILER!!!"
    hdr = _header(0, 0, 1, 0, trailer)
    out.write(hdr + trailer + b"\0")
    out.write(_pad(len(hdr) + len(trailer) + 1))


class Tree:
    """An in-memory description of a root file system, written out as a cpio archive."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = Entry(p, stat.S_IFDIR | mode)

    def _parent(self, path: str) -> str:
        p = path.strip("/")
        parent = os.path.dirname(p)
        if parent:
            self.mkdir(parent)
        return p

    def add_file(self, path: str, source: Path, mode: int | None = None) -> None:
        p = self._parent(path)
        m = mode if mode is not None else (source.stat().st_mode & 0o7777)
        self.entries[p] = Entry(p, stat.S_IFREG | m, source=source)

    def add_data(self, path: str, data: bytes, mode: int = 0o644) -> None:
        p = self._parent(path)
        self.entries[p] = Entry(p, stat.S_IFREG | mode, data=data)

    def symlink(self, path: str, target: str) -> None:
        p = self._parent(path)
        self.entries[p] = Entry(p, stat.S_IFLNK | 0o777, target=target)

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self.entries

    def write(self, out: BinaryIO) -> None:
        # Directories before their contents: sorting by path does that.
        write(out, (self.entries[k] for k in sorted(self.entries)))
