"""Saved labs: L0 whole, saved by QEMU migration to a file in the cache once every level is
SSH-ready, and restored by later runs instead of booting the chain.

L1 and L2 run inside L0's memory, so one migration stream carries the whole chain: its
processes, its nested QEMUs, its KVM state. A saved lab is keyed by everything that shapes the
boot (the images, each level's QEMU and kernel command line, the profile, the QEMU binary), so
any change to those makes a new key and the old entry simply stops being used (and is pruned).

The stream goes through a file descriptor handed to QEMU over QMP (`getfd`, then `migrate` or
`migrate-incoming` with `fd:NAME`): no shell, no path that QEMU opens on our behalf.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.machines.qmp import QMP

# Bump when what a saved lab holds, or how it is restored, changes incompatibly.
FORMAT = 1
STREAM = "l0.migration"
META = "meta.json"
# Saved labs kept in the cache (each about L0's used memory: ~0.1 GB for L0 alone, ~0.85 GB
# for the chain). One CI run boots about a dozen topologies (kernels, trees, the nightly's):
# with six kept, the nested chain's own was pushed out before the module that boots it
# next, which then booted it cold under the nightly's load (and twice hit the L1 hang).
KEEP = 16


class SnapshotError(LabError):
    kind = "snapshot"
    keep = False  # the saved lab itself is fine (the failure was this restore's, not its)


@dataclass
class SavedLab:
    dir: Path
    meta: dict[str, Any]

    @property
    def stream(self) -> Path:
        return self.dir / STREAM

    @property
    def key(self) -> str:
        return self.dir.name


def root(cache: Path) -> Path:
    d = cache / "snapshots"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


_qemu_ids: dict[str, str] = {}


def qemu_identity(binary: str = "qemu-system-x86_64") -> str:
    """The QEMU that saves must be the QEMU that restores: its version and its file."""
    if binary not in _qemu_ids:
        path = shutil.which(binary) or binary
        try:
            st = os.stat(path)
            ver = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError) as e:
            raise SnapshotError(f"cannot identify {binary}: {e}") from None
        _qemu_ids[binary] = f"{ver} ({path}, {st.st_size} bytes, mtime {st.st_mtime_ns})"
    return _qemu_ids[binary]


def key_of(inputs: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def find(cache: Path, key: str) -> SavedLab | None:
    d = root(cache) / key
    try:
        meta = json.loads((d / META).read_text())
        if meta.get("format") != FORMAT or not (d / STREAM).is_file():
            raise ValueError("incomplete")
    except (OSError, ValueError):
        if d.exists():  # unreadable: rebuilt by the next cold boot, never fatal
            shutil.rmtree(d, ignore_errors=True)
        return None
    return SavedLab(d, meta)


def discard(saved: SavedLab) -> None:
    shutil.rmtree(saved.dir, ignore_errors=True)


def _wait_migration(qmp: QMP, deadline: float, what: str) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate") or {}
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"{what}: migration {status}: "
                                f"{info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                qmp.execute("migrate_cancel")
            raise SnapshotError(f"{what}: migration not done in time (status {status})")
        time.sleep(0.05)


def save(qmp: QMP, cache: Path, key: str, meta: dict[str, Any],
         timeout: float = 600.0) -> SavedLab:
    """Save the stopped VM behind `qmp` as the saved lab `key`. The caller stops the VM first
    and continues it afterwards. Two labs saving the same key at once: the first one wins."""
    base = root(cache)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=base))
    try:
        t = time.monotonic()
        fd = os.open(tmp / STREAM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            qmp.execute("getfd", fdname="lab-save", fds=[fd])
        finally:
            os.close(fd)  # QEMU holds its own copy now
        qmp.execute("migrate", uri="fd:lab-save")
        _wait_migration(qmp, time.monotonic() + timeout, "saving L0")
        with open(tmp / STREAM, "rb") as f:
            os.fsync(f.fileno())
        meta = {**meta, "format": FORMAT, "key": key, "saved": time.time(),
                "save_s": round(time.monotonic() - t, 3),
                "bytes": (tmp / STREAM).stat().st_size}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        final = base / key
        try:
            os.rename(tmp, final)
        except OSError:  # another lab saved the same key meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            found = find(cache, key)
            if found is None:
                raise SnapshotError(f"{final}: could not store the saved lab") from None
            return found
        prune(cache, keep=KEEP, spare=key)
        return SavedLab(final, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore(qmp: QMP, saved: SavedLab, timeout: float = 600.0) -> float:
    """Feed the saved stream to a QEMU started with `-incoming defer`; seconds it took."""
    t = time.monotonic()
    try:
        fd = os.open(saved.stream, os.O_RDONLY)
        try:
            qmp.execute("getfd", fdname="lab-restore", fds=[fd])
        finally:
            os.close(fd)
        qmp.execute("migrate-incoming", uri="fd:lab-restore")
        _wait_migration(qmp, time.monotonic() + timeout, "restoring L0")
    except OSError as e:  # QEMU exits when it cannot load the stream
        raise SnapshotError(f"restoring L0 from {saved.key}: QEMU went away ({e})") from None
    with contextlib.suppress(OSError):
        os.utime(saved.dir)  # most recently used: pruned last
    return round(time.monotonic() - t, 3)


def prune(cache: Path, keep: int = KEEP, spare: str | None = None) -> list[str]:
    """Keep the `keep` most recently used saved labs; each one is as big as L0's memory."""
    base = root(cache)
    entries = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    entries.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    gone = []
    for d in entries[keep:]:
        if d.name != spare:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    # Leftovers of a save that was killed half-way.
    for d in base.glob(".saving-*"):
        if time.time() - d.stat().st_mtime > 3600:
            shutil.rmtree(d, ignore_errors=True)
    return gone
