"""Host processes the lab starts: each in its own session, each killed if the lab dies.

PR_SET_PDEATHSIG makes the kernel send SIGKILL to QEMU when the orchestrator's thread that
started it goes away, even on SIGKILL of the orchestrator; a registry of running labs lets the
next `lab` command reap anything that still escaped (e.g. a QEMU whose parent was reparented).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import IO, Any

from lab.cache import cache_root, write_atomic
from lab.errors import LabError

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup() -> None:  # runs in the child between fork and exec
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # If the parent already died between fork and prctl, the signal was missed: die now.
    if os.getppid() == 1:
        os._exit(1)


def spawn(cmd: list[str], stdout: IO[Any] | int | None, stderr: IO[Any] | int | None,
          stdin: IO[Any] | int | None = subprocess.DEVNULL,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                            start_new_session=True, preexec_fn=_child_setup, close_fds=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def terminate(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group, then SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process
    for good, where a pid alone may have been reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class UnsafeDirectory(LabError):
    kind = "unsafe"


def private_dir(path: Path, what: str) -> Path:
    """`path` as a directory only this user can reach: created 0700 if missing; refused if it
    is a symlink, belongs to another user, or lets others in. The lab runs what it finds in
    such directories (ssh_config, gdbinit, records of labs to reap): never from another's."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path}: {what} is not a plain directory (a symlink?); refusing "
                              "it")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path}: {what} belongs to uid {st.st_uid}, not to this user "
                              f"(uid {os.getuid()}); refusing it")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"{path}: {what} has mode {st.st_mode & 0o777:o}; expected 700 "
                              "(only this user); refusing it")
    return path


def runtime_dir() -> Path:
    """Where running labs keep their sockets and records: $XDG_RUNTIME_DIR/lab, or (sudo,
    cron, CI) a private directory in the cache, never a guessable path in /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return private_dir(Path(base) / "lab", "the runtime directory")
    return private_dir(cache_root() / "run", "the runtime directory")


class Registry:
    """One JSON file per running lab: owner pid, QEMU pids and the lab's private socket dir."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = private_dir(root or runtime_dir() / "labs", "the registry of labs")

    def path(self, lab_id: str) -> Path:
        return self.root / f"{lab_id}.json"

    def write(self, lab_id: str, record: dict[str, Any]) -> None:
        write_atomic(self.path(lab_id), json.dumps(record))

    def remove(self, lab_id: str) -> None:
        self.path(lab_id).unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.root.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def live(self) -> list[dict[str, Any]]:
        """The records of labs whose owner still runs."""
        return [r for r in self.records() if alive(int(r.get("owner_pid", 0)))]

    def reap(self) -> list[str]:
        """Kill what labs whose owner died left behind; return what was done."""
        done = []
        for rec in self.records():
            owner = int(rec.get("owner_pid", 0))
            if owner and alive(owner):
                continue
            marker = str(rec.get("sock_dir", ""))
            # A record names a socket directory of ours, or nothing is done in its name.
            if not _own_sock_dir(marker, self.root.parent):
                self.remove(str(rec.get("id")))
                continue
            for pid in rec.get("pids", []):
                # Only kill a pid that still is that lab's QEMU (pids get reused).
                if alive(pid) and marker and any(marker in a for a in cmdline(pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        done.append(f"killed stale QEMU {pid} of lab {rec.get('id')}")
                    except ProcessLookupError:
                        pass
            if marker and Path(marker).is_dir():
                for f in Path(marker).iterdir():
                    f.unlink(missing_ok=True)
                Path(marker).rmdir()
            self.remove(str(rec.get("id")))
        return done


def _own_sock_dir(marker: str, runtime: Path) -> bool:
    p = Path(marker)
    return (p.is_absolute() and p.parent == runtime and p.name.startswith("s-")
            and ".." not in p.parts and (not p.exists() or os.lstat(p).st_uid == os.getuid()))
