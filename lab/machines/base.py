"""What the lab asks of whatever runs L0 on the host, and what every level's kernel is told.

An L0 runner is one module with a `create(request, ssh_port, watch)` function returning an
unstarted `Machine`; a profile names its runner (`Profile.machine`) and `runner()` finds it.
The lab knows machines only through this protocol: a new L0 runner is one file here and one
line in RUNNERS.
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lab.console import Console
from lab.errors import LabError, LaunchError
from lab.playbook import Level
from lab.profiles import Profile

# Profile.machine -> the module that runs L0 for it (imported when a lab needs it).
RUNNERS = {"qemu": "lab.machines.qemu", "bochs": "lab.machines.bochs"}
LAUNCH_ATTEMPTS = 3  # a port taken between our probe and the emulator's bind is retried


@dataclass
class L0Request:
    """One L0 to start: its image, its command line, and the consoles it relays (its own
    first, then each level below it, in topology order)."""

    profile: Profile
    level: Level
    kernel: Path
    initrd: Path
    append: str
    consoles: list[str]
    run_dir: Path
    sock_dir: Path  # private (0700): the machine's sockets and work files
    cache: Path
    hold: bool = False  # CPUs held until a debugger continues them
    incoming: bool = False  # CPUs held for a saved lab to be restored into
    image_modules: list[str] = field(default_factory=list)
    la57: bool = True  # L0's CPU offers LA57 as its model does (`--la57`, Lab._choose_la57)


class Machine(Protocol):
    """L0's emulator process on the host."""

    consoles: dict[str, Console]  # level -> the console that carries it
    gdb_socket: str | None  # L0's gdbstub (a unix socket), if the machine has one

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def alive(self) -> bool: ...

    def check_alive(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...  # what L0's entry in the report adds


# create(request, ssh_port, watch): `watch` sees each console before anything is read from it
Runner = Callable[[L0Request, int, Callable[[Console], None] | None], Machine]


def runner(profile: Profile) -> Runner:
    try:
        module = RUNNERS[profile.machine]
    except KeyError:
        raise LabError(f"profile {profile.name}: no L0 runner {profile.machine!r} "
                       f"(expected one of {', '.join(RUNNERS)})") from None
    create: Runner = importlib.import_module(module).create
    return create


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the emulator binds it; a lost race is
    retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(req: L0Request,
           watch: Callable[[Console], None] | None) -> tuple[Machine, int]:
    """Start L0 on a fresh SSH port; (the machine, its port)."""
    create = runner(req.profile)
    for attempt in range(LAUNCH_ATTEMPTS):
        port = free_port()
        vm = create(req, port, watch)
        try:
            vm.start()
            return vm, port
        except LaunchError as e:
            vm.stop()
            # Another process may have taken a port between our probe and the bind.
            port_race = any(w in e.output for w in ("hostfwd", "Address already in use",
                                                    "bind"))
            if not (port_race and attempt < LAUNCH_ATTEMPTS - 1):
                raise
    raise AssertionError("not reached")


def kernel_cmdline(profile: Profile, lv: Level, nested: bool) -> str:
    """The command line of a level's kernel: console, KVM with nesting on, and the level's own
    modules and words."""
    params: dict[str, dict[str, str]] = {
        profile.kvm_module: {"nested": "1", profile.tdp_param: "1"}}
    for mod, ps in lv.modules.items():
        params.setdefault(mod, {}).update(ps)
    # 115200: Bochs times its UART by the divisor (at Linux's default 9600 a boot log
    # takes tens of seconds); QEMU does not care.
    words = ["console=ttyS0,115200", *([] if lv.kaslr else ["nokaslr"]), "panic=-1",
             f"lab.level={lv.name}"]
    if nested:
        # Every byte on a nested console is a VM exit through the levels above: print
        # warnings and worse only (loglevel 5 still shows WARNING, BUG, Oops, panic).
        words.append("loglevel=5")
        words += profile.nested_append
    words += [f"{m}.{p}={v}" for m, ps in params.items() for p, v in ps.items()]
    if lv.append:
        words.append(lv.append)
    return " ".join(words)
