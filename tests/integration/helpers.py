"""Running the real `lab` command against real QEMU guests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def lab(*args: str, timeout: float = 900, check: bool = False,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def report(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    return data


def emulator_pids(binaries: tuple[str, ...], marker: str | None = None) -> list[int]:
    """Processes on this host whose program is one of `binaries` (and whose command line
    mentions `marker`, if given)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or os.path.basename(args[0]).decode(errors="replace") not in binaries:
            continue
        if marker is None or any(marker.encode() in a for a in args):
            pids.append(int(p.name))
    return pids


def qemu_pids(marker: str | None = None) -> list[int]:
    return emulator_pids(("qemu-system-x86_64",), marker)


def bochs_pids(marker: str | None = None) -> list[int]:
    return emulator_pids(("bochs", "bochs-bin"), marker)


def wait_state(run_dir: Path, status: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            st: dict[str, Any] = json.loads((run_dir / "state.json").read_text())
            if st.get("status") == status:
                return st
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{run_dir}: state never became {status!r}")


def gone(pid_marker: str, timeout: float = 15, pids: Any = qemu_pids) -> bool:
    """Whether every process `pids` finds for the marker is gone within the timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pids(pid_marker):
            return True
        time.sleep(0.2)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def unix_listeners(pid: int) -> list[str]:
    """Paths of the listening unix sockets the process holds (as `ss -xlp` shows them)."""
    inodes = _socket_inodes(pid)
    out = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        # Flags 00010000: accepting connections (a listener).
        if len(f) >= 8 and f[6] in inodes and int(f[3], 16) & 0x10000:
            out.append(f[7])
    return out


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds (IPv4 and IPv6)."""
    inodes = _socket_inodes(pid)
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = f[1].rsplit(":", 1)
            if table == "tcp":
                a = bytes.fromhex(addr)[::-1]
                addr = ".".join(str(b) for b in a)
            out.append((addr, int(port, 16)))
    return out
