"""How people and other `lab` commands reach a running lab: its record (state.json in the run
directory, and the same record in the registry of running labs), ssh_config, known_hosts."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.cache import write_atomic
from lab.errors import UsageError
from lab.procs import Registry, start_time


@dataclass
class LevelAccess:
    name: str
    port: int  # on 127.0.0.1 of the parent (the host for l0)
    via: str | None  # the parent level, for ProxyJump / direct-tcpip
    host_key: str


def write_ssh_files(run_dir: Path, key_file: Path, levels: list[LevelAccess]) -> None:
    known = "".join(f"lab-{lv.name} {lv.host_key}\n" for lv in levels)
    (run_dir / "known_hosts").write_text(known)
    lines = [f"# Written by `lab` for {run_dir}.  Use: ssh -F {run_dir}/ssh_config l0", ""]
    for lv in levels:
        lines += [f"Host {lv.name}", "    HostName 127.0.0.1", f"    Port {lv.port}",
                  f"    HostKeyAlias lab-{lv.name}"]
        if lv.via:
            # The child's port is on the parent's loopback: jump through the parent.
            lines.append(f"    ProxyJump {lv.via}")
        lines.append("")
    lines += ["Host *", "    User root", f"    IdentityFile {key_file}", "    IdentitiesOnly yes",
              f"    UserKnownHostsFile {run_dir}/known_hosts", "    GlobalKnownHostsFile /dev/null",
              "    StrictHostKeyChecking yes", "    PasswordAuthentication no",
              "    ConnectTimeout 30", "    LogLevel ERROR", ""]
    (run_dir / "ssh_config").write_text("\n".join(lines))


@dataclass
class Record:
    """A running lab, as every other process sees it. The same record goes to RUN/state.json
    (for people, `lab ssh/gdb/down` and the tests) and to the registry of labs (for `lab
    down` without --run, and for reaping what a lab whose owner died left behind)."""

    id: str
    run_dir: str
    sock_dir: str
    key_file: str
    playbook: str
    profile: str
    status: str = "booting"  # booting | held | up | down | error
    owner_pid: int = field(default_factory=os.getpid)
    # With the pid, what `lab down` checks before signalling (pids get reused).
    owner_start: int | None = field(default_factory=lambda: start_time(os.getpid()))
    started: float = field(default_factory=time.time)
    gdb_socket: str | None = None
    gdbstub_owner: str = "free"  # "probes" while the playbook's probes hold it
    held: dict[str, Any] | None = None  # a probe keeps L0 stopped for a person
    ready: bool = False  # everything `lab up` promises is in place (boot, probes)
    qemu_pid: int | None = None  # L0's emulator
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    problem: str | None = None  # what went wrong while the lab stays up for a look
    error: dict[str, Any] | None = None  # why it ended, if it failed
    events: list[dict[str, Any]] = field(default_factory=list)  # kernel events (lab/events.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # The registry's view: which processes are the lab's, and whether it is up.
        d["pids"] = [self.qemu_pid] if self.qemu_pid else []
        d["up"] = self.status == "up"
        return d

    def write(self, registry: Registry | None = None) -> None:
        d = self.to_dict()
        write_state(Path(self.run_dir), d)
        if registry is not None:
            registry.write(self.id, d)


def chain(levels: dict[str, dict[str, Any]], level: str) -> list[str]:
    """`level` and the levels it runs inside, innermost first, as a lab's record names them
    (each level's `via`)."""
    out: list[str] = []
    name: str | None = level
    while name:
        out.append(name)
        name = (levels.get(name) or {}).get("via")
    return out


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(run_dir / "state.json", json.dumps(state, indent=1))  # two threads write it


def read_state(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "state.json"
    try:
        state: dict[str, Any] = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: no state.json: not a lab run directory") from None
    except ValueError as e:
        raise UsageError(f"{p}: unreadable: {e}") from None
    return state


def find_run(run: str | None) -> Path:
    """The run directory to act on: --run, else the most recent lab that is up."""
    if run:
        d = Path(run).resolve()
        if not (d / "state.json").exists():
            raise UsageError(f"--run {run}: no state.json there: not a lab run directory")
        return _trusted(d)
    live = [r for r in Registry().live() if r.get("up")]
    if not live:
        raise UsageError("no lab is up; start one with `lab up PLAYBOOK` or give --run DIR")
    live.sort(key=lambda r: float(r.get("started", 0)))
    return _trusted(Path(live[-1]["run_dir"]))


def _trusted(d: Path) -> Path:
    """`lab ssh` and `lab gdb` run ssh_config and gdbinit from the run directory: only from
    one that this user owns and nobody else can write."""
    from lab.procs import UnsafeDirectory, private_dir

    try:
        return private_dir(d, "the run directory")
    except UnsafeDirectory as e:
        raise UsageError(str(e)) from None
