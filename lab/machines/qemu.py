"""QEMU: the command line built from a description, and the host process with its lifecycle.

`build_command` serves every level: the host runs L0 with it, and a parent level runs its
child with it over SSH (lab/machines/nested.py). `QemuVM` is the host side: a context manager
that starts QEMU with its CPUs held, attaches QMP and the serial consoles, lets the CPUs go,
and on the way out powers down, quits, and kills, each with a bounded wait.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import procs
from lab.console import Console
from lab.errors import LaunchError, VMDied
from lab.machines.base import L0Request
from lab.machines.qmp import QMP, QMPError


@dataclass(frozen=True)
class Serial:
    """A serial port of the VM, named after the level whose console it carries.

    kind "unix": a listening unix socket on the side of whoever runs QEMU (the lab reads it);
    kind "dev": a tty device of the parent (a nested level's console relayed to its parent's
    serial port, and from there on to the host).
    """

    carries: str
    kind: str
    path: str


@dataclass
class VMSpec:
    level: str
    accel: str  # "tcg" | "kvm"
    cpu: str
    memory_mb: int
    cpus: int
    kernel: str
    initrd: str
    append: str
    ssh_port: int  # on 127.0.0.1 of whoever runs QEMU, forwarded to the guest's port 22
    serials: list[Serial] = field(default_factory=list)
    qmp: str | None = None  # unix socket path
    gdb: str | None = None  # "tcp:127.0.0.1:PORT" or a unix socket path
    hold: bool = False  # start with the CPUs stopped (-S)
    pidfile: str | None = None
    binary: str = "qemu-system-x86_64"
    extra_args: list[str] = field(default_factory=list)
    incoming: bool = False  # wait for a migration stream (a saved lab) instead of booting


def build_command(spec: VMSpec) -> list[str]:
    cmd = [
        spec.binary, "-name", spec.level, "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot",
        "-accel", spec.accel, "-cpu", spec.cpu,
        "-m", str(spec.memory_mb), "-smp", str(spec.cpus),
        "-kernel", spec.kernel, "-initrd", spec.initrd, "-append", spec.append,
        # restrict=on: the guest reaches nothing beyond its lab; SSH comes in on loopback only.
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
        # romfile= skips the iPXE option ROM: no network boot, and no ROM to carry in images.
        "-device", "virtio-net-pci,netdev=net0,romfile=",
    ]
    for i, s in enumerate(spec.serials):
        if s.kind == "unix":
            cmd += ["-chardev", f"socket,id=ser{i},path={s.path},server=on,wait=off"]
        elif s.kind == "dev":
            cmd += ["-chardev", f"serial,id=ser{i},path={s.path}"]
        elif s.kind == "file":
            cmd += ["-chardev", f"file,id=ser{i},path={s.path}"]
        else:
            raise ValueError(f"unknown serial kind {s.kind!r}")
        cmd += ["-serial", f"chardev:ser{i}"]
    if spec.qmp:
        cmd += ["-qmp", f"unix:{spec.qmp},server=on,wait=off"]
    if spec.gdb:
        if spec.gdb.startswith("tcp:"):
            cmd += ["-gdb", spec.gdb]
        else:
            cmd += ["-chardev", f"socket,id=gdb0,path={spec.gdb},server=on,wait=off",
                    "-gdb", "chardev:gdb0"]
    if spec.hold:
        cmd.append("-S")
    if spec.pidfile:
        cmd += ["-pidfile", spec.pidfile]
    if spec.incoming:
        # The stream comes later over QMP (migrate-incoming with a passed fd): lab/snapshot.py.
        cmd += ["-incoming", "defer"]
    return cmd + list(spec.extra_args)


def shell_command(spec: VMSpec) -> str:
    return " ".join(shlex.quote(a) for a in build_command(spec))


def l0_spec(req: L0Request, ssh_port: int) -> VMSpec:
    """L0 under QEMU on the host, as `req` asks (the same spec for the same request: the
    saved-lab key is built from it)."""
    p = req.profile
    return VMSpec(
        level="l0", accel=p.accel, cpu=p.l0_cpu_with(req.la57),
        memory_mb=req.level.memory_mb,
        cpus=req.level.cpus, kernel=str(req.kernel), initrd=str(req.initrd),
        append=req.append, ssh_port=ssh_port,
        # ttyS0 is L0's own console; ttyS1 and ttyS2 relay L1's and L2's to the host.
        serials=[Serial(n, "unix", str(req.sock_dir / f"{n}.console")) for n in req.consoles],
        qmp=str(req.sock_dir / "qmp"),
        # A unix socket in the lab's private directory: a TCP port, even on loopback, would
        # let any local user drive QEMU's monitor through gdb.
        gdb=str(req.sock_dir / "gdb"), hold=req.hold, incoming=req.incoming)


def create(req: L0Request, ssh_port: int,
           watch: Callable[[Console], None] | None = None) -> QemuVM:
    return QemuVM(l0_spec(req, ssh_port), req.run_dir, watch=watch)


class QemuVM:
    """L0: a QEMU process on the host."""

    def __init__(self, spec: VMSpec, run_dir: Path, *,
                 watch: Callable[[Console], None] | None = None,
                 powerdown_timeout: float = 2.0) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.consoles: dict[str, Console] = {}
        self.watch = watch  # sees each console before it is read
        self.powerdown_timeout = powerdown_timeout
        self.stderr_path = run_dir / f"{spec.level}.qemu.log"
        self.command = build_command(spec)
        self.launched_at: float | None = None
        self.gdb_socket = spec.gdb

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _output(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> None:
        """Launch with the CPUs held, attach QMP and consoles, then run (unless spec.hold, or
        spec.incoming: a saved lab is restored into it first)."""
        cmd = build_command(VMSpec(**{**self.spec.__dict__, "hold": True}))
        self.command = build_command(self.spec)
        with open(self.stderr_path, "ab") as err:
            err.write(("$ " + " ".join(shlex.quote(a) for a in cmd) + "\n").encode())
            err.flush()
            self.launched_at = time.monotonic()
            self.proc = procs.spawn(cmd, stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        assert self.spec.qmp, "the host VM needs a QMP socket"
        while not os.path.exists(self.spec.qmp):
            if self.proc.poll() is not None:
                raise LaunchError(
                    f"{self.spec.level}: QEMU exited with status {self.proc.returncode} "
                    f"at launch", command=cmd, output=self._output(), level=self.spec.level)
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.spec.level}: QEMU did not open its QMP socket in "
                                  f"{timeout:.0f} s", command=cmd, output=self._output(),
                                  level=self.spec.level)
            time.sleep(0.01)
        self.qmp = QMP(self.spec.qmp)
        try:
            self.qmp.connect(deadline)
        except QMPError as e:
            raise LaunchError(f"{self.spec.level}: {e}", command=cmd, output=self._output(),
                              level=self.spec.level) from None
        for s in self.spec.serials:
            if s.kind != "unix":
                continue
            con = Console(s.carries, self.run_dir / f"{s.carries}.console.log")
            if self.watch:
                self.watch(con)
            con.attach_unix(s.path, deadline)
            self.consoles[s.carries] = con
        if not (self.spec.hold or self.spec.incoming):
            self.qmp.execute("cont")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {}  # nothing beyond the profile's description

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise VMDied(f"{self.spec.level}: QEMU exited with status {self.proc.returncode}; "
                         f"its output:\n{self._output()[-1500:]}", level=self.spec.level)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        """Power down over QMP, then quit, then kill; each step has a bounded wait."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            if self.qmp is not None and self.powerdown_timeout > 0:
                with contextlib.suppress(Exception):
                    self.qmp.execute("system_powerdown")
                    proc.wait(timeout=self.powerdown_timeout)
            if proc.poll() is None and self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.execute("quit")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=3)
            if proc.poll() is None:
                procs.terminate(proc, grace=1.0)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        for con in self.consoles.values():
            con.close()
        for s in self.spec.serials:
            if s.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(s.path)
        if self.spec.qmp:
            with contextlib.suppress(OSError):
                os.unlink(self.spec.qmp)
