"""Bochs: L0 on an emulated CPU with VMX and EPT, for hosts without Intel hardware.

The same part as lab/machines/qemu.py's QemuVM, for the bochs-vmx profile: a bochsrc rendered from a
description, the host process with its lifecycle, and the consoles. What differs, and why:
- Boot from an ISOLINUX CD (lab/machines/iso.py): Bochs has no -kernel.
- Consoles on 127.0.0.1 TCP (Bochs 2.7 has no unix sockets). A `socket-server` port holds the
  whole machine until one client connects, then stops listening, so the lab connects to each
  port right after launch and nobody else can afterwards.
- SSH through e1000 on slirp, restricted, forwarded from 127.0.0.1 only (slirp.conf).
- No QMP and no gdbstub (Debian's build has the internal debugger instead, which it starts at a
  prompt: `-rc` of a file holding `c` lets it run). Stopping is signals with bounded waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lab import procs
from lab.cache import locked
from lab.console import Console
from lab.errors import LaunchError, VMDied
from lab.machines.base import L0Request, free_port
from lab.machines.iso import make_boot_iso
from lab.machines.pvh import NoPvh, loader, vmlinux_from_bzimage

BIOS = "/usr/share/bochs/BIOS-bochs-latest"
VGABIOS = "/usr/share/vgabios/vgabios.bin"
MAX_SERIALS = 4  # com1..com4
log = logging.getLogger(__name__)

_env = jinja2.Environment(loader=jinja2.PackageLoader("lab", "templates"),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          trim_blocks=True, lstrip_blocks=True)


@dataclass
class BochsSpec:
    level: str
    cpu_model: str
    memory_mb: int
    cpus: int
    kernel: str
    initrd: str
    append: str
    ssh_port: int  # on 127.0.0.1, forwarded by slirp to the guest's port 22
    serials: dict[str, int] = field(default_factory=dict)  # carries -> 127.0.0.1 port
    ips: int = 100_000_000
    mac: str = "52:54:00:12:34:56"
    # Enter the kernel at its PVH entry rather than through the bzImage's decompressor
    # (lab/machines/pvh.py: ~40 s less per boot); no KASLR that way.
    pvh: bool = True


def render_bochsrc(spec: BochsSpec, iso: Path, slirp_conf: Path, log: Path) -> str:
    if len(spec.serials) > MAX_SERIALS:
        raise ValueError(f"Bochs has {MAX_SERIALS} serial ports, {len(spec.serials)} asked for")
    return _env.get_template("bochsrc.j2").render(
        level=spec.level, memory_mb=spec.memory_mb, cpu_model=spec.cpu_model, cpus=spec.cpus,
        ips=spec.ips, bios=BIOS, vgabios=VGABIOS, iso=iso, mac=spec.mac,
        slirp_conf=slirp_conf, serial_ports=list(spec.serials.values()), log=log)


def render_slirp_conf(ssh_port: int) -> str:
    # Bochs rejects the file ("wrong file format") unless its first line is `# slirp config`.
    text = _env.get_template("slirp.conf.j2").render(ssh_port=ssh_port)
    assert text.startswith("# slirp config\n")
    return text


def boot_iso(spec: BochsSpec, cache: Path) -> tuple[Path, str]:
    """The boot CD for this kernel, initramfs and command line, made once and kept in the
    cache (a nested L0's initramfs is ~150 MB: not something to write per run); and how it
    boots ("pvh" or "bzImage")."""
    pvh: tuple[Path, Path] | None = None
    if spec.pvh:
        try:
            pvh = (loader(cache), vmlinux_from_bzimage(Path(spec.kernel), cache))
        except NoPvh as e:
            log.info(f"{spec.level}: booting the bzImage: {e}")
    h = hashlib.sha256()
    for f in (spec.kernel, spec.initrd, *(pvh or ())):
        st = os.stat(f)
        h.update(f"{f} {st.st_size} {st.st_mtime_ns}\n".encode())
    h.update(spec.append.encode())
    d = cache / "boot-iso"
    d.mkdir(parents=True, exist_ok=True)
    iso = d / f"{h.hexdigest()[:20]}.iso"
    with locked(d / f".{iso.stem}.lock"):
        if not iso.exists():
            tmp = iso.with_suffix(".tmp")
            make_boot_iso(Path(spec.kernel), Path(spec.initrd), spec.append, tmp, pvh=pvh)
            tmp.rename(iso)
    os.utime(iso)  # most recently used
    return iso, "pvh" if pvh else "bzImage"


def create(req: L0Request, ssh_port: int,
           watch: Callable[[Console], None] | None = None) -> BochsVM:
    if "e1000" not in req.image_modules:
        # A build tree may have it built in; a Debian cloud kernel has not.
        log.warning("l0: its image has no e1000 module: unless the kernel has it built in, "
                    "SSH to L0 under Bochs will not come up")
    spec = BochsSpec(
        level="l0", cpu_model=req.profile.l0_cpu, memory_mb=req.level.memory_mb,
        cpus=req.level.cpus, kernel=str(req.kernel), initrd=str(req.initrd),
        append=req.append, ssh_port=ssh_port,
        # COM1 is L0's own console; COM2 and COM3 relay L1's and L2's, as under QEMU.
        serials={n: free_port() for n in req.consoles},
        pvh=not req.level.kaslr)  # KASLR is the bzImage decompressor's work
    return BochsVM(spec, req.run_dir, req.sock_dir, req.cache, watch=watch)


class BochsVM:
    """L0: a Bochs process on the host."""

    gdb_socket = None  # Bochs's own debugger is not a gdbstub (see the module's docstring)

    def __init__(self, spec: BochsSpec, run_dir: Path, work_dir: Path, cache: Path, *,
                 watch: Callable[[Console], None] | None = None) -> None:
        self.spec = spec
        self.boot = ""  # "pvh" or "bzImage", once started
        self.run_dir = run_dir
        self.work_dir = work_dir  # private: bochsrc, slirp.conf (the registry finds us by it)
        self.cache = cache
        self.watch = watch  # sees each console before it is read
        self.proc: subprocess.Popen[bytes] | None = None
        self.consoles: dict[str, Console] = {}
        self.output_path = run_dir / f"{spec.level}.bochs.log"  # stdout and stderr
        self.events_path = run_dir / f"{spec.level}.bochs-events.log"  # Bochs's own log
        self.bochsrc = work_dir / "bochsrc"
        self.command: list[str] = []
        self.launched_at: float | None = None

    def __enter__(self) -> BochsVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _output(self) -> str:
        parts = []
        for p in (self.output_path, self.events_path):
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def start(self, timeout: float = 60.0) -> None:
        """Render the configuration, launch, and connect every console (Bochs waits for them
        before it runs the guest)."""
        iso, self.boot = boot_iso(self.spec, self.cache)
        slirp = self.work_dir / "slirp.conf"
        slirp.write_text(render_slirp_conf(self.spec.ssh_port))
        self.bochsrc.write_text(render_bochsrc(self.spec, iso, slirp, self.events_path))
        rc = self.work_dir / "cont.rc"
        rc.write_text("c\n")  # the internal debugger's first command: run
        self.command = ["bochs", "-q", "-rc", str(rc), "-f", str(self.bochsrc)]
        # No window, no display listener; nothing to read on stdin.
        env = dict(os.environ, SDL_VIDEODRIVER="dummy", SDL_AUDIODRIVER="dummy")
        with open(self.output_path, "ab") as out:
            out.write(("$ " + shlex.join(self.command) + "\n").encode())
            out.flush()
            self.launched_at = time.monotonic()
            self.proc = procs.spawn(self.command, stdout=out, stderr=out, env=env)
        deadline = time.monotonic() + timeout
        for carries, port in self.spec.serials.items():
            con = Console(carries, self.run_dir / f"{carries}.console.log")
            if self.watch:
                self.watch(con)
            self.consoles[carries] = con
            try:
                con.attach_tcp("127.0.0.1", port, deadline, alive=self._launch_check)
            except LaunchError:
                raise
            except Exception as e:
                raise LaunchError(f"{self.spec.level}: Bochs console port {port}: {e}",
                                  command=self.command, output=self._output(),
                                  level=self.spec.level) from None

    def _launch_check(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise LaunchError(f"{self.spec.level}: Bochs exited with status "
                              f"{self.proc.returncode} at launch", command=self.command,
                              output=self._output(), level=self.spec.level)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {"boot": self.boot}  # "pvh" or "bzImage"

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise VMDied(f"{self.spec.level}: Bochs exited with status {self.proc.returncode}; "
                         f"its output:\n{self._output()[-1500:]}", level=self.spec.level)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: there is nothing in an L0 to save, and Bochs has no monitor
        to ask for a power-down."""
        if self.proc is not None and self.proc.poll() is None:
            procs.terminate(self.proc, grace=2.0)
        for con in self.consoles.values():
            con.close()
