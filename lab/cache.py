"""The lab's cache directory: downloads, extracted kernels, built images, the client key.

Default ~/.cache/lab; LAB_CACHE overrides. Everything in it is keyed by content, and writers take
a per-entry lock so that two labs building the same thing at once do the work once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache, refused when another user could change it: the lab runs `make` on what it
    holds and boots the kernels in it."""
    env = os.environ.get("LAB_CACHE")
    if env:
        root = Path(env)
    else:
        from lab import config  # a user's default (lab/config.py)

        root = config.load().cache or Path.home() / ".cache" / "lab"
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)
    root = root.resolve()
    st = root.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        from lab.errors import LabError

        raise LabError(f"{root}: the lab's cache belongs to uid {st.st_uid} with mode "
                       f"{st.st_mode & 0o777:o}; expected this user's (uid {os.getuid()}), "
                       "writable by nobody else")
    return root


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temp file of this writer's own beside it, renamed
    over it (a full disk or a second writer never leaves a torn or empty file behind)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Content hash of a file, memoised per (path, size, mtime) within one process."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _file_hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _file_hashes[memo] = h.hexdigest()
    return _file_hashes[memo]


# What each part of the cache holds, and whether `lab cache prune` may drop old entries of it
# (everything there is rebuilt or refetched on demand; keys and records are not).
PARTS = {
    "images": ("built images: kernel, initramfs, manifest", True),
    "snapshots": ("saved labs for warm starts (each as big as L0's memory)", True),
    "boot-iso": ("Bochs boot CDs", True),
    "gdb-index": ("vmlinux copies with a .gdb_index (fast gdb start)", True),
    "kmod": ("kernel modules the lab built (lab_inject, lab_warn)", True),
    "vmlinux-elf": ("vmlinux for Bochs's PVH entry", True),
    "kernels": ("unpacked Debian kernels and modules", False),
    "debug": ("unpacked debug symbols (vmlinux, KVM modules)", False),
    "headers": ("unpacked kernel headers, for building modules", False),
    "downloads": ("downloaded packages (not needed once unpacked)", True),
    "tools": ("the guest programs, built", True),
    "selftests": ("KVM selftests built per kernel (selftests steps)", True),
    "apt": ("the lab's own apt roots, one per Debian suite (package lists)", False),
    "pvhboot": ("the multiboot loader for Bochs's PVH entry", True),
    "keys": ("the lab's SSH client key", False),
    "run": ("running labs: sockets and records", False),
}


def _size(p: Path) -> int:
    if p.is_symlink() or not p.is_dir():
        return p.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).lstat().st_size
    return total


def usage(root: Path) -> list[tuple[str, int, int, str]]:
    """(part, bytes, entries, what it is) for each part of the cache that exists."""
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        what = PARTS.get(d.name, ("", False))[0] or "(other)"
        entries = [e for e in d.iterdir() if not e.name.startswith(".")]
        out.append((d.name, _size(d), len(entries), what))
    return out


def prune(root: Path, older_than_days: float, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Drop the entries of the rebuildable parts not written or used for `older_than_days`;
    what was (or would be) dropped, with its size. Only while no lab runs (the caller's
    check): an image or a saved lab in use would go from under it."""
    cutoff = time.time() - older_than_days * 86400
    gone = []
    for name, (_, prunable) in PARTS.items():
        d = root / name
        if not prunable or not d.is_dir():
            continue
        for e in d.iterdir():
            if e.name.startswith(".") or e.suffix == ".lock":
                continue
            if e.lstat().st_mtime >= cutoff:
                continue
            size = _size(e)
            if not dry_run:
                if e.is_dir() and not e.is_symlink():
                    shutil.rmtree(e, ignore_errors=True)
                else:
                    e.unlink(missing_ok=True)
            gone.append((e, size))
    return gone
