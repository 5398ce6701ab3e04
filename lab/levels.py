"""One level of the chain as the lab sees it: its image, console, SSH session and timeline;
and how the lab waits for it to boot (its init's marks on the console) and reaches it.

A level is up when its init printed MARK_READY and its SSH server answers. Boot deadlines are
the level's `boot_timeout` scaled to this host's speed (lab/hostspeed.py), and move on while
the console keeps printing: a slow machine is not a stuck one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.console import Console, ConsoleTimeout
from lab.errors import BootError, SSHError
from lab.image import BuiltImage
from lab.machines.nested import NestedVM
from lab.playbook import Level
from lab.ssh import SSHSession

# Seconds of console silence after which a level past its boot deadline counts as stuck.
PROGRESS_WINDOW = 30.0
MARK_INIT = r"LAB-INIT: start"  # what the images' init prints (lab/guest/rcS)
MARK_READY = r"LAB-INIT: ready"
MARK_ERROR = r"LAB-INIT: error: "


@dataclass
class LevelState:
    level: Level
    image: BuiltImage | None = None
    console: Console | None = None
    ssh: SSHSession | None = None
    ssh_port: int = 0
    vm: NestedVM | None = None  # a nested level's QEMU, inside its parent
    # Seconds since the lab's start: launch, console_first_output, init, ssh_ready (or
    # restored, for a warm start).
    timeline: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.level.name


def wait_booted(st: LevelState, since: int, t0: float, speed_factor: float, hold: bool,
                check: Callable[[], None], on_init: Callable[[float], None]) -> float:
    """Wait for the level's init to start and be ready (console lines from `since` on);
    `on_init(seconds from launch)` when it starts. Returns the deadline (monotonic), as
    extended, for the SSH session to open by."""
    con = st.console
    assert con is not None
    budget = st.level.boot_timeout * speed_factor
    deadline = t0 + st.timeline["launch"] + budget
    # A level that keeps printing is slow, not stuck: its deadline moves on while its
    # console speaks, up to twice the budget. A silent one fails at the deadline.
    hard = deadline + budget
    if hold:  # CPUs held until a person's debugger lets them go
        deadline = hard = float("inf")

    def wait(pattern: str) -> int:
        nonlocal deadline
        try:
            idx, deadline = con.wait_progressing(pattern, since, deadline, hard,
                                                 PROGRESS_WINDOW, check)
        except ConsoleTimeout:
            raise BootError(
                f"{st.name}: did not reach {pattern!r} within {budget:.0f} s (boot_timeout "
                f"{st.level.boot_timeout} s x host speed factor {speed_factor}); "
                f"last console lines:\n{con.tail()}", level=st.name,
                detail=con.tail(40)) from None
        return idx

    idx = wait(MARK_INIT)
    first = con.lines[since].t if since < len(con.lines) else con.lines[idx].t
    st.timeline["console_first_output"] = round(first - t0, 3)
    st.timeline["init"] = round(con.lines[idx].t - t0, 3)
    on_init(st.timeline["init"] - st.timeline["launch"])
    ready = wait(MARK_READY)
    for ln in con.lines[idx:ready]:
        if MARK_ERROR in ln.text:
            raise BootError(f"{st.name}: {ln.text.split(MARK_ERROR, 1)[1]} (image "
                            f"{st.image.dir.name if st.image else '?'})", level=st.name,
                            detail=con.tail(40))
    return deadline


def open_session(st: LevelState, parent: SSHSession | None, key_file: Path, deadline: float,
                 check: Callable[[], None]) -> SSHSession:
    """The SSH session to a level that is up (through its parent's session), retried until
    `deadline`; its failure carries the level's last console lines."""
    assert st.console is not None and st.image is not None
    ssh = SSHSession(st.name, st.ssh_port, key_file, str(st.image.host_key), via=parent)
    try:
        ssh.connect(deadline, check=check)
    except SSHError as e:
        raise SSHError(f"{e}; last console lines:\n{st.console.tail()}", level=st.name,
                       detail=st.console.tail(40)) from None
    st.ssh = ssh
    return ssh


def checker(*checks: Callable[[], None] | None) -> Callable[[], None]:
    """One fail-fast check out of several (None ones skipped)."""
    fns = [c for c in checks if c is not None]

    def check() -> None:
        for c in fns:
            c()

    return check
