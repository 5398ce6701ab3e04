"""Host processes the lab starts: each in its own session, each killed if the lab dies.

PR_SET_PDEATHSIG makes the kernel send SIGKILL to QEMU when the orchestrator's thread that
started it goes away, even on SIGKILL of the orchestrator; a registry of running labs lets the
next `lab` command reap anything that still escaped (e.g. a QEMU whose parent was reparented).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

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


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lab-{os.getuid()}"
    d = Path(base) / "lab"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


class Registry:
    """One JSON file per running lab: owner pid, QEMU pids and the lab's private socket dir."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or (runtime_dir() / "labs")
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, lab_id: str) -> Path:
        return self.root / f"{lab_id}.json"

    def write(self, lab_id: str, record: dict[str, Any]) -> None:
        tmp = self.path(lab_id).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.rename(self.path(lab_id))

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

    def reap(self) -> list[str]:
        """Kill what labs whose owner died left behind; return what was done."""
        done = []
        for rec in self.records():
            owner = int(rec.get("owner_pid", 0))
            if owner and alive(owner):
                continue
            marker = rec.get("sock_dir", "")
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


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
