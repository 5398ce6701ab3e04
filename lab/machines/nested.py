"""A level that runs inside its parent: QEMU started by the parent's shell over SSH.

The parent is a lab machine too (its image carries QEMU and the child's kernel and initramfs
under /lab/child/); the child's console goes out on the parent's serial port, which the level
above relays on to the host. Its SSH port is on the parent's loopback: every parent is its own
machine, so every child uses the same port.
"""

from __future__ import annotations

import time

from lab.errors import LaunchError
from lab.machines.qemu import Serial, VMSpec, build_command, shell_command
from lab.playbook import Level
from lab.profiles import Profile
from lab.ssh import SSHSession

CHILD_SSH_PORT = 10022
ALIVE_EVERY_S = 2.0  # a nested QEMU is looked at from its parent at most this often


def spec(profile: Profile, lv: Level, below: list[str], append: str) -> VMSpec:
    """How a parent runs level `lv`, relaying the consoles of the levels `below` it (the same
    command line every time: part of the saved-lab key)."""
    return VMSpec(
        level=lv.name, accel=profile.nested_accel(), cpu=profile.nested_cpu(),
        memory_mb=lv.memory_mb, cpus=lv.cpus,
        kernel="/lab/child/vmlinuz", initrd="/lab/child/initrd.cpio",
        append=append, ssh_port=CHILD_SSH_PORT,
        # Inside the parent, ttyS1 carries this level's console up, ttyS2 the next one's.
        serials=[Serial(n, "dev", f"/dev/ttyS{i + 1}") for i, n in enumerate([lv.name, *below])],
        binary="/usr/bin/qemu-system-x86_64",
        extra_args=list(profile.nested_qemu_args))


class NestedVM:
    """One nested level's QEMU, as its parent's shell runs it."""

    def __init__(self, vm_spec: VMSpec, parent: SSHSession) -> None:
        self.spec = vm_spec
        self.parent = parent
        self.name = vm_spec.level
        self.pid_file = f"/run/lab-{self.name}.pid"
        self.log_file = f"/run/lab-{self.name}.qemu.log"
        self._checked = 0.0

    def start(self) -> None:
        # The shell records its pid and then becomes QEMU (exec keeps the pid): the pid file
        # exists before QEMU has even started, unlike QEMU's own -pidfile.
        self.parent.start(f"echo $$ > {self.pid_file}; exec {shell_command(self.spec)} "
                          f">{self.log_file} 2>&1")

    def check_alive(self) -> None:
        """Raise LaunchError if the QEMU is gone (with its output); looks at most every
        ALIVE_EVERY_S seconds, since each look is a command in the parent."""
        if time.monotonic() - self._checked < ALIVE_EVERY_S:
            return
        self._checked = time.monotonic()
        r = self.parent.run(f"pid=$(cat {self.pid_file} 2>/dev/null) && "
                            f"kill -0 $pid || {{ cat {self.log_file}; exit 1; }}", timeout=30)
        if r.exit_status != 0:
            raise LaunchError(f"{self.name}: QEMU in {self.parent.level} is not running",
                              command=build_command(self.spec), output=r.stdout[-3000:],
                              level=self.name)
