"""The lab's cache directory: downloads, extracted kernels, built images, the client key.

Default ~/.cache/lab; LAB_CACHE overrides. Everything in it is keyed by content, and writers take
a per-entry lock so that two labs building the same thing at once do the work once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache, refused when another user could change it: the lab runs `make` on what it
    holds and boots the kernels in it."""
    env = os.environ.get("LAB_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "lab"
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
