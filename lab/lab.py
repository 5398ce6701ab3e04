"""The lab: builds the images of a topology, boots L0 on the host and each child inside its
parent, watches every console, holds an SSH session to every level, runs the steps, reports.

The parts (QemuVM, Console, SSHSession, Builder) know nothing of each other; this module is
where they meet.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import access, hostspeed, inject, procs, snapshot, tap
from lab.bochs import BochsSpec, BochsVM
from lab.console import Console, ConsoleTimeout
from lab.errors import BootError, LabError, LaunchError, SSHError, UsageError
from lab.image import Builder, BuiltImage, load_recipe
from lab.keys import client_key
from lab.playbook import Level, Playbook
from lab.probes import GdbProbes, timeline
from lab.profiles import Profile
from lab.qemu import QemuVM, Serial, VMSpec, build_command, free_port, shell_command
from lab.report import Report, StepResult
from lab.ssh import SSHSession

# Seconds of console silence after which a level past its boot deadline counts as stuck.
PROGRESS_WINDOW = 30.0
RESTORE_BUDGET = 60.0  # seconds (x host speed factor) for every level to answer after a restore
SETTLE_S = 1.5  # after a restore, every level must still answer this much later
CHILD_SSH_PORT = 10022  # on the parent's loopback; each parent is its own machine
STEP_OUTPUT_KEEP = 64 << 10  # bytes of head and of tail of a step's output kept in the report
MARK_INIT = r"LAB-INIT: start"
MARK_READY = r"LAB-INIT: ready"
MARK_ERROR = r"LAB-INIT: error: "


@dataclass
class LevelState:
    level: Level
    image: BuiltImage | None = None
    console: Console | None = None
    ssh: SSHSession | None = None
    ssh_port: int = 0
    spec: VMSpec | None = None
    timeline: dict[str, float] = field(default_factory=dict)


class Lab:
    def __init__(self, playbook: Playbook, run_dir: Path, profile: Profile, cache: Path,
                 kernel_tree: Path | None = None, hold: bool = False, cold: bool = False,
                 log: Callable[[str], None] = print) -> None:
        # The playbook as this profile runs it (L0's image, probe backend, boot timeouts).
        self.pb = playbook.for_profile(profile)
        self.run_dir = run_dir
        self.profile = profile
        self.cache = cache
        self.kernel_tree = kernel_tree
        self.hold = hold
        self.cold = cold  # --cold: never restore a saved lab (one may still be saved)
        self.log = log
        self.id = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        self.t0 = time.monotonic()
        if hold and not profile.has_gdbstub:
            raise UsageError(f"--hold: profile {profile.name} has no gdbstub to hold L0's "
                             "CPUs for")
        self.levels = {name: LevelState(lv) for name, lv in self.pb.levels.items()}
        self.vm: QemuVM | BochsVM | None = None
        # L0's gdbstub: a unix socket in the lab's private (0700) socket directory. A TCP
        # port, even on loopback, would let any local user drive QEMU's monitor through gdb.
        self.gdb_socket: str | None = None
        self.registry = procs.Registry()
        # This process's start time: with its pid, what `lab down` checks before signalling.
        self.owner_start = procs.start_time(os.getpid())
        # Unix socket paths are limited to 108 bytes: keep sockets in a short private dir.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="s-", dir=procs.runtime_dir()))
        self._crashed: Console | None = None
        self._crash_lock = threading.Lock()
        self.key_file, _ = client_key(cache)
        self.report = Report(playbook=str(playbook.path), name=playbook.name,
                             run_dir=str(run_dir), profile=profile.name,
                             started=datetime.datetime.now().isoformat(timespec="seconds"))
        # Timeouts follow this host's speed: what earlier runs measured, until L0 boots.
        self.speed = hostspeed.load(cache, profile.name, profile.reference_l0_init_s)
        self.report.host_speed = self.speed.to_dict()
        self.up = False
        self.probes: GdbProbes | None = None
        self.tracer: Any = None  # lab.tracefs.TraceProbes, when the playbook traces
        self.gdbstub_owner = "free"
        self.held: dict[str, Any] | None = None
        self._symbols: tuple[int, list[Any]] | None = None  # see _l0_symbols
        self.l0_kernel: Any = None  # lab.kernel.KernelSource of L0, once built
        self.ready = False  # everything `lab up` promises is in place (boot, probes)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._register()
        # From the start: whoever looks at the run (lab down, tests) finds its socket dir.
        access.write_state(self.run_dir, self.state("booting"))
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _register(self, up: bool = False) -> None:
        pids = [self.vm.pid] if self.vm and self.vm.pid else []
        self.registry.write(self.id, {
            "id": self.id, "owner_pid": os.getpid(),
            "owner_start": self.owner_start, "sock_dir": str(self.sock_dir),
            "pids": pids, "run_dir": str(self.run_dir), "up": up, "started": time.time()})

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # -- failure detection -----------------------------------------------------------------
    def _on_crash(self, console: Console) -> None:
        with self._crash_lock:
            if self._crashed is None:
                self._crashed = console
                self.log(f"{console.level}: kernel crash on the console: "
                         f"{console.crash.line if console.crash else ''}")

    def check(self) -> None:
        """Raise at once if a level crashed or L0's QEMU is gone."""
        if self._crashed is not None:
            raise self._crashed.crash_error()
        vm = self.vm
        if vm is None or vm.proc is None or vm.proc.poll() is None:
            return
        # QEMU exits on a panic (panic=-1, -no-reboot): let the console tell why.
        for st in self.levels.values():
            if st.console:
                st.console.settle(quiet=0.5, limit=2.0)
        if self._crashed is not None:
            raise self._crashed.crash_error()
        vm.check_alive()

    # -- build -----------------------------------------------------------------------------
    def build(self) -> None:
        builder = Builder(self.cache, log=self.log)
        child: BuiltImage | None = None
        # Deepest level first: a parent's image carries its child's kernel and initramfs.
        for name in reversed(list(self.levels)):
            st = self.levels[name]
            tree = self.kernel_tree if name == "l0" else None
            recipe = load_recipe(st.level.recipe, kernel_tree=tree)
            if name == "l0":
                self.l0_kernel = recipe.kernel  # what a module for L0 is built against
            st.image = builder.build(recipe, child=child)
            child = st.image
            self.report.levels[name] = {
                "image": st.image.dir.name, "kernel": st.image.manifest["kernel"],
                "memory_mb": st.level.memory_mb, "cpus": st.level.cpus, "timeline": {}}
        self.report.levels = {n: self.report.levels[n] for n in self.levels}  # topology order

    # -- boot ------------------------------------------------------------------------------
    def _append(self, lv: Level, nested: bool) -> str:
        params: dict[str, dict[str, str]] = {
            self.profile.kvm_module: {"nested": "1", self.profile.tdp_param: "1"}}
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
            words += self.profile.nested_append
        words += [f"{m}.{p}={v}" for m, ps in params.items() for p, v in ps.items()]
        if lv.append:
            words.append(lv.append)
        return " ".join(words)

    def boot(self) -> None:
        """Bring every level up: restored from a saved lab when there is one for exactly this
        boot (warm), else booted level by level (cold) and then saved for the next run."""
        why_not = self._snapshot_unavailable()
        saved = None
        if why_not is None:
            key = snapshot.key_of(self._snapshot_inputs())
            saved = snapshot.find(self.cache, key)
            if saved is not None and self.cold:
                why_not, saved = f"--cold; saved lab {saved.key} is already there", None
        if saved is not None:
            try:
                self._restore(saved)
            except LabError as e:
                # A saved lab that does not come back is rebuilt, never fatal.
                keep = getattr(e, "keep", False)
                self.log(f"saved lab {saved.key} did not restore ({str(e).splitlines()[0]}); "
                         f"{'booting cold' if keep else 'discarding it and booting cold'}")
                if not keep:
                    snapshot.discard(saved)
                self._reset_levels()
                saved = None
                self.report.boot = {"restore_failed": str(e).splitlines()[0]}
        if saved is None:
            for name in self.levels:
                self.boot_level(name)
            self.report.boot = {"mode": "cold", **self.report.boot}
            if why_not is None:
                self._save(key)
            else:
                self.report.boot.update(saved=None, why_not_saved=why_not)
        self.up = True
        self._register(up=True)
        self._write_gdbinit(modules=True)
        self._write_access()

    def boot_level(self, name: str) -> None:
        """Boot one level (its parent must be up) and wait until it answers over SSH."""
        if name == "l0":
            self._boot_l0()
        else:
            self._boot_nested(name)
        self._write_access()

    def _boot_l0(self) -> None:
        self._launch_l0()
        if self.hold:
            self._write_gdbinit(modules=False)
            access.write_state(self.run_dir, self.state("held"))
            self.log(f"l0: CPUs held until a debugger continues them: "
                     f"gdb -x {self.run_dir}/gdbinit (then `continue`)")
        self._await_level("l0", since=0)

    def _launch_l0(self, incoming: bool = False) -> None:
        """Start L0's machine and attach its consoles (incoming: CPUs held for a restore)."""
        st = self.levels["l0"]
        assert st.image is not None
        names = list(self.levels)
        for attempt in range(3):
            st.ssh_port = free_port()
            self.vm = (self._bochs_l0(st, names) if self.profile.machine == "bochs"
                       else self._qemu_l0(st, incoming=incoming))
            st.timeline["launch"] = self.now()
            try:
                if isinstance(self.vm, QemuVM):
                    self.vm.start(run=not incoming)
                else:
                    self.vm.start()
                break
            except LaunchError as e:
                self.vm.stop()
                # Another process may have taken a port between our probe and the bind.
                port_race = any(w in e.output for w in ("hostfwd", "Address already in use",
                                                        "bind"))
                if port_race and attempt < 2:
                    continue
                raise
        self._register()
        if isinstance(self.vm, BochsVM):
            self.report.levels["l0"]["boot"] = self.vm.boot  # "pvh" or "bzImage"
        for n in names:
            self.levels[n].console = self.vm.consoles[n]  # type: ignore[union-attr]

    def _qemu_l0_spec(self, ssh_port: int, sock_dir: Path,
                      incoming: bool = False) -> VMSpec:
        st = self.levels["l0"]
        assert st.image is not None
        return VMSpec(
            level="l0", accel=self.profile.accel, cpu=self.profile.l0_cpu,
            memory_mb=st.level.memory_mb, cpus=st.level.cpus,
            kernel=str(st.image.kernel), initrd=str(st.image.initrd),
            append=self._append(st.level, nested=False), ssh_port=ssh_port,
            # ttyS0 is L0's own console; ttyS1 and ttyS2 relay L1's and L2's to the host.
            serials=[Serial(n, "unix", str(sock_dir / f"{n}.console")) for n in self.levels],
            qmp=str(sock_dir / "qmp"), gdb=str(sock_dir / "gdb"),
            hold=self.hold, incoming=incoming)

    def _qemu_l0(self, st: LevelState, incoming: bool = False) -> QemuVM:
        st.spec = self._qemu_l0_spec(st.ssh_port, self.sock_dir, incoming)
        self.gdb_socket = st.spec.gdb
        return QemuVM(st.spec, self.run_dir, on_crash=self._on_crash)

    def _bochs_l0(self, st: LevelState, names: list[str]) -> BochsVM:
        assert st.image is not None
        mods = st.image.manifest.get("modules") or []
        if "e1000" not in mods:  # type: ignore[operator]
            # A build tree may have it built in; a Debian cloud kernel has not (FACTS.md).
            self.log(f"l0: image {st.image.dir.name} has no e1000 module: unless the kernel "
                     "has it built in, SSH to L0 under Bochs will not come up")
        spec = BochsSpec(
            level="l0", cpu_model=self.profile.l0_cpu, memory_mb=st.level.memory_mb,
            cpus=st.level.cpus, kernel=str(st.image.kernel), initrd=str(st.image.initrd),
            append=self._append(st.level, nested=False), ssh_port=st.ssh_port,
            # COM1 is L0's own console; COM2 and COM3 relay L1's and L2's, as under QEMU.
            serials={n: free_port() for n in names},
            pvh=not st.level.kaslr)  # KASLR is the bzImage decompressor's work
        return BochsVM(spec, self.run_dir, self.sock_dir, self.cache, on_crash=self._on_crash,
                       log=self.log)

    def _await_level(self, name: str, since: int,
                     alive: Callable[[], None] | None = None) -> None:
        st = self.levels[name]
        con = st.console
        assert con is not None
        budget = st.level.boot_timeout * self.speed.factor
        deadline = self.t0 + st.timeline["launch"] + budget
        # A level that keeps printing is slow, not stuck: its deadline moves on while its
        # console speaks, up to twice the budget. A silent one fails at the deadline.
        hard = deadline + budget
        if self.hold and name == "l0":
            deadline = hard = float("inf")

        def wait(pattern: str) -> int:
            nonlocal deadline
            pos = since
            while True:
                left = deadline - time.monotonic()
                try:
                    idx, _ = con.wait_for(pattern, timeout=min(max(left, 0.01), 2.0), since=pos,
                                          abort=self.check)
                    return idx
                except ConsoleTimeout:
                    pos = len(con.lines)
                    self.check()
                    if alive:
                        alive()
                    now = time.monotonic()
                    if now >= deadline:
                        spoke = con.lines[-1].t if con.lines else 0.0
                        if now < hard and now - spoke < PROGRESS_WINDOW:
                            deadline = min(hard, spoke + PROGRESS_WINDOW)
                            continue
                        raise BootError(
                            f"{name}: did not reach {pattern!r} within {budget:.0f} s "
                            f"(boot_timeout {st.level.boot_timeout} s x host speed factor "
                            f"{self.speed.factor}); last console lines:\n{con.tail()}",
                            level=name, detail=con.tail(40)) from None

        idx = wait(MARK_INIT)
        first = con.lines[since].t if since < len(con.lines) else con.lines[idx].t
        st.timeline["console_first_output"] = round(first - self.t0, 3)
        st.timeline["init"] = round(con.lines[idx].t - self.t0, 3)
        if name == "l0" and not self.hold:
            self.speed = hostspeed.record(self.cache, self.profile.name,
                                          self.profile.reference_l0_init_s,
                                          st.timeline["init"] - st.timeline["launch"])
            self.report.host_speed = self.speed.to_dict()
        ready = wait(MARK_READY)
        for ln in con.lines[idx:ready]:
            if MARK_ERROR in ln.text:
                raise BootError(f"{name}: {ln.text.split(MARK_ERROR, 1)[1]} (image "
                                f"{st.image.dir.name if st.image else '?'})", level=name,
                                detail=con.tail(40))
        # Its SSH server starts right after the ready mark: a level extended for being slow
        # still gets a fair window to answer.
        self._connect(name, max(deadline, time.monotonic() + PROGRESS_WINDOW * self.speed.factor),
                      alive)
        launch = st.timeline["launch"]
        self.log(f"{name}: up: /init after {st.timeline['init'] - launch:.1f} s, SSH after "
                 f"{st.timeline['ssh_ready'] - launch:.1f} s")

    def _connect(self, name: str, deadline: float, alive: Callable[[], None] | None = None,
                 record: bool = True) -> None:
        """Open the SSH session to a level that is up (through its parent's session)."""
        st = self.levels[name]
        con = st.console
        assert con is not None and st.image is not None
        parent = self.levels[st.level.parent].ssh if st.level.parent else None
        st.ssh = SSHSession(name, st.ssh_port, self.key_file, str(st.image.host_key),
                            via=parent)

        def check() -> None:
            self.check()
            if alive:
                alive()

        try:
            st.ssh.connect(deadline, check=check)
        except SSHError as e:
            raise SSHError(f"{e}; last console lines:\n{con.tail()}", level=name,
                           detail=con.tail(40)) from None
        if record:
            st.timeline["ssh_ready"] = self.now()
            self.report.levels[name]["timeline"] = dict(st.timeline)

    def _boot_nested(self, name: str) -> None:
        st = self.levels[name]
        parent_name = st.level.parent
        assert parent_name is not None and st.image is not None
        parent = self.levels[parent_name]
        assert parent.ssh is not None
        st.ssh_port = CHILD_SSH_PORT
        st.spec = self._nested_spec(name)
        con = st.console
        assert con is not None
        since = len(con.lines)
        log = f"/run/lab-{name}.qemu.log"
        st.timeline["launch"] = self.now()
        # The shell records its pid and then becomes QEMU (exec keeps the pid): the pid file
        # exists before QEMU has even started, unlike QEMU's own -pidfile.
        parent.ssh.start(f"echo $$ > /run/lab-{name}.pid; exec {shell_command(st.spec)} "
                         f">{log} 2>&1")

        last_check = [0.0]

        def alive() -> None:
            # A nested QEMU that exits is only visible from its parent: look there.
            if time.monotonic() - last_check[0] < 2.0:
                return
            last_check[0] = time.monotonic()
            assert parent.ssh is not None and st.spec is not None
            r = parent.ssh.run(f"pid=$(cat /run/lab-{name}.pid 2>/dev/null) && "
                               f"kill -0 $pid || {{ cat {log}; exit 1; }}", timeout=30)
            if r.exit_status != 0:
                from lab.qemu import build_command
                raise LaunchError(f"{name}: QEMU in {parent_name} is not running",
                                  command=build_command(st.spec), output=r.stdout[-3000:],
                                  level=name)

        self._await_level(name, since=since, alive=alive)

    def _nested_spec(self, name: str) -> VMSpec:
        """How a parent runs level `name` (the same command line every time: part of the
        saved-lab key)."""
        lv = self.levels[name].level
        below = [n for n in self.levels if n > name]  # deeper levels relayed through this one
        return VMSpec(
            level=name, accel=self.profile.nested_accel(), cpu=self.profile.nested_cpu(),
            memory_mb=lv.memory_mb, cpus=lv.cpus,
            kernel="/lab/child/vmlinuz", initrd="/lab/child/initrd.cpio",
            append=self._append(lv, nested=True), ssh_port=CHILD_SSH_PORT,
            # Inside the parent, ttyS1 carries this level's console up, ttyS2 the next one's.
            serials=[Serial(n, "dev", f"/dev/ttyS{i + 1}") for i, n in enumerate([name, *below])],
            binary="/usr/bin/qemu-system-x86_64",
            extra_args=list(self.profile.nested_qemu_args))

    # -- saved labs (warm start) -------------------------------------------------------------
    def _snapshot_unavailable(self) -> str | None:
        """Why this lab can neither restore nor save a saved lab (None: it can)."""
        if self.pb.snapshot == "off":
            return "the playbook says snapshot: off"
        if self.profile.machine != "qemu":
            # Bochs 2.7 saves its state only from its GUI's toolbar or configuration dialog,
            # neither of which can be driven without a display (`-r` restores; nothing saves).
            return f"profile {self.profile.name}: L0 under Bochs is not saved"
        if self.hold:
            return "--hold: L0 waits for a debugger"
        return None

    def _snapshot_inputs(self) -> dict[str, Any]:
        """Everything that shapes the boot, with the parts that differ per run (ports, socket
        paths) left out: equal inputs boot the very same chain."""
        spec = self._qemu_l0_spec(ssh_port=0, sock_dir=Path("/SOCK"))
        return {
            "profile": self.profile.name,
            "qemu": snapshot.qemu_identity(spec.binary),
            "l0": build_command(spec),
            "nested": {n: build_command(self._nested_spec(n)) for n in self.levels if n != "l0"},
            "images": {n: st.image.dir.name for n, st in self.levels.items() if st.image},
        }

    # One command per level: which boot this is (boot_id), and the SSH server init started
    # at boot (pid and start time): a restored level must show the very same ones.
    _IDENTITY = ("cat /proc/sys/kernel/random/boot_id; for p in $(pidof dropbear); do "
                 "echo \"$p $(cut -d' ' -f22 /proc/$p/stat)\"; done | sort -k2n | head -1")

    def _identity(self, name: str, prefix: str = "") -> dict[str, Any]:
        ssh = self.levels[name].ssh
        assert ssh is not None
        r = ssh.run(prefix + self._IDENTITY, timeout=60, check=self.check)
        lines = r.stdout.split()
        if r.exit_status != 0 or len(lines) < 3:
            raise snapshot.SnapshotError(f"{name}: cannot read its identity: {r.stdout!r} "
                                         f"{r.stderr!r}", level=name)
        return {"boot_id": lines[0], "sshd_pid": int(lines[1]), "sshd_start": int(lines[2])}

    def _save(self, key: str) -> None:
        """Save L0 whole while every level is up and nothing has run yet, then go on."""
        vm = self.vm
        assert isinstance(vm, QemuVM) and vm.qmp is not None
        t = time.monotonic()
        ids = {n: self._identity(n) for n in self.levels}
        timelines = {n: dict(st.timeline) for n, st in self.levels.items()}
        self._close_sessions()  # no half-open SSH connection goes into the saved lab
        vm.qmp.execute("stop")
        try:
            saved = snapshot.save(vm.qmp, self.cache, key, {
                "levels": ids, "cold_timeline": timelines,
                "playbook": str(self.pb.path), "profile": self.profile.name,
                "host_speed": self.report.host_speed})
        except LabError as e:
            self.log(f"could not save the lab for a warm start: {e}")
            self.report.boot.update(saved=None, why_not_saved=str(e).splitlines()[0])
            saved = None
        finally:
            vm.qmp.execute("cont")
        self._reconnect(time.monotonic() + self._boot_budget())
        if saved is not None:
            self.report.boot.update(saved=saved.key, save_s=saved.meta["save_s"],
                                    bytes=saved.meta["bytes"],
                                    seconds=round(time.monotonic() - t, 3))
            self.log(f"saved the lab as {saved.key} ({saved.meta['bytes'] >> 20} MiB in "
                     f"{saved.meta['save_s']:.1f} s): later runs of this topology start warm")

    def _restore(self, saved: snapshot.SavedLab) -> None:
        """Start L0's QEMU waiting for the saved stream, feed it, and reach every level."""
        st = self.levels["l0"]
        t = time.monotonic()
        self._launch_l0(incoming=True)
        vm = self.vm
        assert isinstance(vm, QemuVM) and vm.qmp is not None
        restore_s = snapshot.restore(vm.qmp, saved)
        vm.qmp.execute("cont")
        running = self.now()
        for n, lv in self.levels.items():
            lv.timeline = {"launch": st.timeline["launch"], "restored": running}
            if n != "l0":
                lv.ssh_port = CHILD_SSH_PORT
        # The guests' clocks stood still while the lab was saved: step them to the host's.
        step = f"date -s @{int(time.time())} >/dev/null 2>&1; "
        # A restored level answers within seconds, or it never will: fail over to a cold
        # boot soon rather than after a whole boot budget.
        deadline = time.monotonic() + RESTORE_BUDGET * self.speed.factor
        ids: dict[str, dict[str, Any] | Exception] = {}

        def identify(name: str) -> None:
            try:
                ids[name] = self._identity(name, prefix=step)
            except Exception as e:  # re-raised below, in this thread
                ids[name] = e

        # Each level's identity check runs while the next level's SSH session opens (one
        # connection, several channels): the chain answers a round trip per level sooner.
        checks = []
        for name in self.levels:
            self._connect(name, deadline)
            th = threading.Thread(target=identify, args=(name,), daemon=True)
            th.start()
            checks.append(th)
        for th in checks:
            th.join(timeout=max(deadline - time.monotonic(), 1.0))
        for name in self.levels:
            got = ids.get(name)
            if isinstance(got, Exception):
                raise got
            want = saved.meta["levels"][name]
            if got is None or got["boot_id"] != want["boot_id"] or \
                    got["sshd_start"] != want["sshd_start"]:
                raise snapshot.SnapshotError(f"{name}: not the saved level (boot {got} after "
                                             f"restore, {want} when saved)", level=name)
            self.report.levels[name]["restored"] = {**got, "same_as_saved": True}
        self._settled(deadline)
        self.report.boot = {"mode": "warm", "saved": saved.key,
                            "saved_at": saved.meta.get("saved"), "restore_s": restore_s,
                            "seconds": round(time.monotonic() - t, 3),
                            "bytes": saved.meta.get("bytes")}
        if saved.meta.get("host_speed") and not self.report.host_speed:
            self.report.host_speed = {**saved.meta["host_speed"], "measured": "when saved"}
        self.log(f"restored saved lab {saved.key}: L0 running after {restore_s:.1f} s, every "
                 f"level answering {time.monotonic() - t:.1f} s after launch")

    def _settled(self, deadline: float) -> None:
        """Every level still answers a moment after the restore and the clock steps.

        Seen twice in CI (never alone): right after a restore, L1 spinning for good in
        native_queued_spin_lock_slowpath (1 vCPU, interrupts off: no watchdog line), so that
        its next session never opens. A restore that leaves a level like that is worth no
        more than a cold boot; the saved lab is kept (the next restore of it was fine).
        """
        time.sleep(SETTLE_S)
        for name, st in self.levels.items():
            assert st.ssh is not None
            try:
                r = st.ssh.run("true", timeout=max(min(deadline - time.monotonic(), 20.0), 5.0)
                               * self.speed.factor, check=self.check)
            except LabError as e:
                err = snapshot.SnapshotError(f"{name} stopped answering after the restore: "
                                             f"{str(e).splitlines()[0]}", level=name)
                err.keep = True
                raise err from None
            if r.exit_status != 0:
                raise snapshot.SnapshotError(f"{name}: `true` exited {r.exit_status} after the "
                                             "restore", level=name)

    def _boot_budget(self) -> float:
        return max(st.level.boot_timeout for st in self.levels.values()) * self.speed.factor

    def _close_sessions(self) -> None:
        for st in reversed(list(self.levels.values())):
            if st.ssh is not None:
                with contextlib.suppress(Exception):
                    st.ssh.close()
                st.ssh = None

    def _reconnect(self, deadline: float) -> None:
        for name in self.levels:
            self._connect(name, deadline, record=False)

    def _reset_levels(self) -> None:
        """Forget a failed restore: sessions closed, L0 stopped, state as before boot."""
        self._close_sessions()
        if self.vm is not None:
            self.vm.stop()
            self.vm = None
        for st in self.levels.values():
            st.console, st.timeline, st.ssh_port = None, {}, 0
            self.report.levels[st.level.name].pop("restored", None)
        self._crashed = None

    # -- debugging ---------------------------------------------------------------------------
    def debug_files(self) -> tuple[Path, Path, Path | None]:
        """(indexed vmlinux, module debug root, System.map) of L0's kernel."""
        from lab.symbols import indexed_vmlinux

        st = self.levels["l0"]
        assert st.image is not None
        dbg: dict[str, str] | None = st.image.manifest.get("debug")  # type: ignore[assignment]
        if not dbg:
            raise LabError("l0's image was built without debug symbols (lab images build "
                           "without --no-debug)", level="l0")
        smap = Path(dbg["system_map"]) if dbg.get("system_map") else None
        return (indexed_vmlinux(Path(dbg["vmlinux"]), self.cache), Path(dbg["module_root"]),
                smap)

    def _l0_symbols(self, module_root: Path, smap: Path | None) -> tuple[int, list[Any]]:
        """L0's KASLR offset and loaded KVM modules, read over SSH once L0 is up (gdbinit and
        the probes both need them; the modules do not move while the lab runs)."""
        from lab.symbols import kaslr_offset, loaded_modules

        if self._symbols is None:
            ssh = self.levels["l0"].ssh
            assert ssh is not None
            self._symbols = (kaslr_offset(ssh, smap), loaded_modules(ssh, module_root))
        return self._symbols

    def _write_gdbinit(self, modules: bool) -> None:
        """RUN/gdbinit: what `lab gdb` (or `gdb -x RUN/gdbinit`) runs to attach to L0."""
        from lab.gdb import add_symbol_file_command

        if not self.profile.has_gdbstub:
            return

        try:
            vmlinux, module_root, smap = self.debug_files()
        except LabError as e:
            self.log(f"no gdbinit: {e}")
            return
        lines = ["# Written by `lab`: attaches to L0's gdbstub with the kernel's symbols.",
                 "set pagination off", "set confirm off"]
        ssh = self.levels["l0"].ssh
        offset, loaded = self._l0_symbols(module_root, smap) if modules and ssh else (0, [])
        lines.append(f"symbol-file {vmlinux}" + (f" -o {offset:#x}" if offset else ""))
        lines.append(f"target remote {self.gdb_socket}")
        # Module symbols live in their own file: with --hold the modules load after gdb
        # attaches, and `lab-modules` loads them then (the lab writes the file once L0 is up).
        mods_file = self.run_dir / "modules.gdb"
        lines += ["define lab-modules", f"  source {mods_file}", "end",
                  "document lab-modules", "Load the symbols of L0's KVM modules (kvm, kvm_amd, "
                  "kvm_intel) at the addresses they are loaded at.", "end"]
        if modules and ssh is not None:
            mods = [add_symbol_file_command(m.debug_file, m.sections, m.present)
                    for m in loaded]
            mods_file.write_text("\n".join(mods) + "\n")
            lines.append("lab-modules")
        (self.run_dir / "gdbinit").write_text("\n".join(lines) + "\n")

    def start_probes(self) -> None:
        """Attach gdb to L0, load symbols and modules; inject the playbook's bug and arm its
        probes. Without probes, gdb leaves again at once (an injected patch stays)."""
        from lab.gdb import GdbSession

        specs = self.pb.probe_specs(self.profile.vendor)
        if not specs and not self.pb.inject:
            return
        gdb_injects = bool(self.pb.inject) and self.profile.has_gdbstub
        if self.pb.inject and not gdb_injects:
            self._inject_by_module()
        if self.pb.probe_backend == "tracefs":
            self._start_tracefs(specs)
            specs = []  # gdb, if needed at all, only injects
            if not gdb_injects:
                return
        l0 = self.levels["l0"]
        assert l0.ssh is not None
        vmlinux, module_root, smap = self.debug_files()
        # Read what needs L0 running (SSH) before gdb stops it.
        offset, mods = self._l0_symbols(module_root, smap)
        gdb = GdbSession(self.run_dir / "gdb.log")
        self.gdbstub_owner = "probes"
        access.write_state(self.run_dir, self.state())
        t_load = gdb.load_kernel(vmlinux, offset)
        t = time.monotonic()
        assert self.gdb_socket is not None
        gdb.attach(self.gdb_socket)
        for m in mods:
            gdb.add_module(m.debug_file, m.sections, m.present)
        restops = gdb.stop_in_host("l0")
        ready = time.monotonic() - t
        if self.pb.inject:
            inj = inject.resolve(self.pb.inject, self.profile.vendor)
            patches = inject.apply(gdb, inj)
            self.report.injection = inject.describe(inj, patches)
            self.log(f"injected {inj.name}: " + ", ".join(
                f"{p.instruction} at {p.address:#x} ({p.function})" for p in patches))
        self.probes = GdbProbes(gdb, specs, self.t0, log=self.log,
                                console_socket=self.sock_dir / "gdb-console",
                                on_hold=self._on_hold)
        self.probes.start()
        self.report.probe_backend = self.report.probe_backend or "gdb"
        self.report.gdb = {"vmlinux": str(vmlinux), "kaslr_offset": offset,
                           "load_vmlinux_s": round(t_load, 3),
                           "ready_after_attach_s": round(ready, 3),
                           "restops_to_l0_context": restops,
                           "modules": [m.name for m in mods],
                           "probe_sets": sorted({s.origin for s in specs})}
        self.log(f"gdb: attached to L0, {len(mods)} modules, ready {ready:.2f} s after attach; "
                 f"{len(specs)} probes armed ({', '.join(s.name for s in specs)})")

    def _inject_by_module(self) -> None:
        """No gdbstub: the bug goes in as a kprobe module built for L0's kernel."""
        from lab import kmod

        inj = inject.resolve(str(self.pb.inject), self.profile.vendor)
        t = time.monotonic()
        ko = kmod.build(inject.MODULE, self.l0_kernel.fetch_build_dir(self.cache), self.cache)
        l0 = self.levels["l0"].ssh
        assert l0 is not None
        self.report.injection = inject.load_module(l0, ko, inj)
        self.report.injection["seconds"] = round(time.monotonic() - t, 3)
        self.log(f"injected {inj.name}: {self.report.injection['loaded']}")

    def _start_tracefs(self, specs: list[Any]) -> None:
        from lab.kernel import module_index
        from lab.tracefs import TraceProbes, compile_probes

        vmlinux, module_root, _ = self.debug_files()
        index = module_index(module_root)
        mods = [index[m] for m in ("kvm", "kvm_amd", "kvm_intel") if m in index]
        t = time.monotonic()
        compiled = compile_probes(specs, vmlinux, mods, self.run_dir)
        l0 = self.levels["l0"].ssh
        assert l0 is not None
        self.tracer = TraceProbes(l0, specs, compiled, self.t0, log=self.log,
                                  trace_log=self.run_dir / "tracefs.log")
        self.tracer.start()
        self.report.probe_backend = "tracefs"
        self.report.gdb["tracefs_compile_s"] = round(time.monotonic() - t, 3)
        self.report.gdb["kprobe_events"] = list(self.tracer.lines.values())
        self.report.gdb["probe_sets"] = sorted({s.origin for s in specs})

    def _on_hold(self, held: dict[str, Any] | None) -> None:
        """A probe stopped L0 for a person (or let it go): say so in state.json."""
        self.held = held
        access.write_state(self.run_dir, self.state())

    def stop_probes(self) -> None:
        tracer, self.tracer = self.tracer, None
        if tracer is not None:
            try:
                tracer.stop()
            finally:
                self.report.probes = tracer.results()
                self.report.probe_timeline = timeline(self.report.probes)
        if self.probes is None:
            return
        probes, self.probes = self.probes, None
        try:
            probes.stop()
        finally:
            probes.gdb.close()
            self.gdbstub_owner = "free"
            self.report.probes = probes.results()
            self.report.probe_timeline = timeline(self.report.probes)
            if probes.error:
                self.report.gdb["error"] = probes.error

    def _write_access(self) -> None:
        levels = [access.LevelAccess(n, st.ssh_port, st.level.parent, st.image.host_key)
                  for n, st in self.levels.items() if st.image is not None and st.ssh_port]
        access.write_ssh_files(self.run_dir, self.key_file, levels)
        access.write_state(self.run_dir, self.state())

    def state(self, status: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id, "status": status or ("up" if self.up else "booting"),
            "owner_pid": os.getpid(), "owner_start": self.owner_start,
            "playbook": str(self.pb.path), "profile": self.profile.name,
            "run_dir": str(self.run_dir), "sock_dir": str(self.sock_dir),
            "key_file": str(self.key_file), "gdb_socket": self.gdb_socket,
            "gdbstub_owner": self.gdbstub_owner, "held": self.held, "ready": self.ready,
            "qemu_pid": self.vm.pid if self.vm else None,
            "levels": {n: {"port": st.ssh_port, "via": st.level.parent,
                           "host_key": st.image.host_key if st.image else None,
                           "console_log": f"{n}.console.log", "timeline": st.timeline}
                       for n, st in self.levels.items()},
        }

    # -- steps -----------------------------------------------------------------------------
    def run_steps(self) -> None:
        steps_dir = self.run_dir / "steps"
        steps_dir.mkdir(mode=0o700, exist_ok=True)
        for i, step in enumerate(self.pb.steps, 1):
            ssh = self.levels[step.on].ssh
            assert ssh is not None
            self.log(f"[{step.on}] {step.name}: {step.run.strip().splitlines()[0]}")
            # The step's timeout was written for the reference host: scaled to this one.
            timeout = round(step.timeout * self.speed.factor, 1)
            res = StepResult(name=step.name, level=step.on, command=step.run,
                             expected=step.expect, status="error", timeout=timeout)
            self.report.steps.append(res)
            t = time.monotonic()
            # Every byte of the output goes to RUN/steps/ as it came (binary kept exact); the
            # report keeps a bounded head and tail, however much the step prints.
            base = steps_dir / f"{i:02d}-{_file_name(step.name)}"
            res.output_files = [f"steps/{base.name}.out", f"steps/{base.name}.err"]
            try:
                with open(f"{base}.out", "wb") as fo, open(f"{base}.err", "wb") as fe:
                    r = ssh.run(step.run, timeout=timeout, check=self.check,
                                keep=STEP_OUTPUT_KEEP, sinks=(fo, fe))
            except LabError as e:
                res.seconds = round(time.monotonic() - t, 3)
                res.message = str(e).splitlines()[0]
                raise
            res.exit_status, res.stdout, res.stderr = r.exit_status, r.stdout, r.stderr
            res.stdout_bytes, res.stderr_bytes = r.stdout_bytes, r.stderr_bytes
            res.seconds = round(r.seconds, 3)
            res.status = "passed"
            if step.tap:
                parsed = tap.parse(r.stdout)
                res.cases = [c.to_dict() for c in parsed.cases]
                if not parsed.cases:
                    res.status, res.message = "failed", "no TAP output"
                elif not parsed.ok:
                    res.status, res.message = "failed", parsed.problems()
            if res.status == "passed" and r.exit_status != step.expect:
                res.status = "failed"
                res.message = f"exit status {r.exit_status}, expected {step.expect}"
            if res.status == "failed":
                self.log(f"  FAILED: {res.message}\n{_indent(r.stdout + r.stderr)}")
            self.check()

    # -- teardown --------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            self.stop_probes()
        except Exception as e:
            self.report.gdb["error"] = f"stopping probes: {e}"
        inj, l0 = self.report.injection, self.levels["l0"].ssh
        if inj and inj.get("mechanism") == "kprobe module" and l0 is not None:
            with contextlib.suppress(Exception):
                inj["skipped_calls"] = inject.module_skipped(l0)
        self._close_sessions()
        if self.vm is not None:
            self.vm.stop()
        self.up = False
        with contextlib.suppress(OSError, LabError):
            if (self.run_dir / "state.json").exists():
                state = access.read_state(self.run_dir)
                state["status"] = "down"
                access.write_state(self.run_dir, state)
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        self.registry.remove(self.id)

    def logs(self) -> dict[str, str]:
        return {p.name: p.name for p in sorted(self.run_dir.glob("*.log"))}


def _file_name(name: str) -> str:
    """A step's name as part of a file name: nothing in it can leave the directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-")
    return safe[:60] or "step"


def _indent(text: str, prefix: str = "    ") -> str:
    lines = text.rstrip().splitlines()[-20:]
    return "\n".join(prefix + ln for ln in lines)


def error_dict(e: LabError | Exception) -> dict[str, Any]:
    if isinstance(e, LabError):
        d = e.to_dict()
        d["exit_status"] = e.exit_status
        return d
    return {"kind": "internal", "message": f"{type(e).__name__}: {e}", "exit_status": 3,
            "level": None, "detail": ""}

