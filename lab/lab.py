"""The lab: the lifecycle of one playbook's chain. Build the images, boot L0 on the host and
each child inside its parent (or restore them all, warm), watch every console, hold an SSH
session to every level, arm the probes, run the steps, tear down; and the one Report of it.

What each part is lives in its own module (machines/, probes/, levels.py, steps.py, warm.py,
watch.py, symbols.py, inject.py, access.py); this module is where they meet, in order.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import secrets
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lab import access, hostspeed, inject, procs, steps, warm
from lab.decode import Symbols, decode
from lab.driver import Inputs
from lab.errors import Aborted, LabError, UsageError, error_dict
from lab.events import Event
from lab.image import Builder, BuiltImage, Recipe, load_recipe
from lab.kernel import DebianKernel, KernelSource
from lab.keys import client_key
from lab.levels import PROGRESS_WINDOW, LevelState, checker, open_session, wait_booted
from lab.machines import base as machines
from lab.machines import nested
from lab.machines.qemu import VMSpec
from lab.peers import kut, selftests
from lab.playbook import Playbook, Step
from lab.probes import checks
from lab.probes.rig import Rig
from lab.profiles import Profile
from lab.report import Report
from lab.symbols import RunningKernel, debug_files, write_gdbinit
from lab.watch import Watch

log = logging.getLogger(__name__)


class Lab:
    def __init__(self, playbook: Playbook, run_dir: Path, profile: Profile, cache: Path,
                 inputs: Inputs | None = None, hold: bool = False,
                 cold: bool = False) -> None:
        # The playbook as this profile runs it (L0's image, probe backend, boot timeouts).
        self.pb = playbook.for_profile(profile)
        self.run_dir = run_dir
        self.profile = profile
        self.cache = cache
        self.inputs = inputs or Inputs()
        kernel_tree = self.kernel_tree = self.inputs.kernel_tree
        self.hold = hold
        self.cold = cold  # --cold: never restore a saved lab (one may still be saved)
        self.t0 = time.monotonic()
        if hold and not profile.has_gdbstub:
            raise UsageError(f"--hold: profile {profile.name} has no gdbstub to hold L0's "
                             "CPUs for")
        self.levels = {name: LevelState(lv) for name, lv in self.pb.levels.items()}
        self.vm: machines.Machine | None = None
        self.registry = procs.Registry()
        # Unix socket paths are limited to 108 bytes: keep sockets in a short private dir.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="s-", dir=procs.runtime_dir()))
        self.watch = Watch(self.pb, self.t0, on_event=self._on_event)
        self._publish_lock = threading.Lock()  # console threads publish events too
        self.key_file, _ = client_key(cache)
        lab_id = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        self.record = access.Record(
            id=lab_id, run_dir=str(run_dir), sock_dir=str(self.sock_dir),
            key_file=str(self.key_file), playbook=str(self.pb.path), profile=profile.name)
        self.report = Report(playbook=str(playbook.path), name=playbook.name,
                             run_dir=str(run_dir), profile=profile.name,
                             kernel_tree=str(kernel_tree) if kernel_tree else None,
                             kernel_choice=self.inputs.debian.spec if self.inputs.debian
                             else None,
                             started=datetime.datetime.now().isoformat(timespec="seconds"))
        # Timeouts follow this host's speed: what earlier runs measured, until L0 boots.
        self.speed = hostspeed.load(cache, profile.name, profile.reference_l0_init_s)
        self.report.host_speed = self.speed.to_dict()
        self.rig = Rig(self.pb, profile, self.report, run_dir, self.sock_dir, cache, self.t0,
                       on_owner=self._on_gdbstub_owner, on_hold=self._on_hold)
        self.l0_kernel: KernelSource | None = None  # what a module for L0 is built against
        self.l0_symbols: RunningKernel | None = None
        self.l0_la57 = True  # L0's CPU with LA57: decided once L0's kernel is known
        self.recipes: dict[str, Recipe] = {}  # level -> its image recipe, as built
        self.selftests_built: dict[str, selftests.Built] = {}  # level -> its kernel's tests
        self.phase = "validate"

    @property
    def id(self) -> str:
        return self.record.id

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # From the start: whoever looks at the run (lab down, tests) finds its socket dir.
        self.publish()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def run(self, serve: Callable[[Lab], None] | None = None) -> Report:
        """The whole lifecycle, every phase timed in the report; never raises for a failure
        of the lab (the report's `error` says it), and always tears down. `serve`: instead
        of the steps, keep the lab up until it returns (`lab up`)."""
        t0 = self.t0
        rep = self.report
        try:
            with self:
                with self.timed("build"):
                    self.build()
                with self.timed("boot"):
                    self.boot()
                if self.pb.probes or self.pb.inject:
                    with self.timed("probes", "probes_attach"):
                        self.start_probes()
                if serve is not None:
                    self.phase = "up"
                    serve(self)
                else:
                    with self.timed("steps"):
                        self.run_steps()
                with self.timed("teardown", "probes_detach"):
                    self.rig.stop()
                with self.timed("teardown"):
                    self.teardown()
        except KeyboardInterrupt:
            rep.error = error_dict(Aborted("interrupted (Ctrl-C)"))
        except Aborted as e:
            # `lab down` ends a served lab with SIGTERM: that is its normal end.
            rep.error = None if self.phase == "up" else error_dict(e)
        except LabError as e:
            rep.error = {**error_dict(e), "phase": self.phase}
        except Exception as e:  # a bug of ours: still tear down and report, never a traceback
            rep.error = {**error_dict(e), "phase": self.phase,
                         "detail": traceback.format_exc()}
        finally:
            self.teardown()
            if self.pb.checks and self.phase in ("steps", "up", "teardown"):
                self.judge_probes()  # on what the probes saw, whole or cut short by an error
            self.report_events()
            rep.phases["total"] = round(time.monotonic() - t0 + rep.phases.get("validate", 0),
                                        3)
            rep.logs = {p.name: p.name for p in sorted(self.run_dir.glob("*.log"))}
            rep.finish()
            rep.write(self.run_dir)
            if serve is not None:
                self.record.error = rep.error
                self.publish("down" if rep.error is None else "error", registry=False)
        return rep

    @contextlib.contextmanager
    def timed(self, phase: str, key: str | None = None) -> Iterator[None]:
        """A phase of the run: what an error names, and its seconds in report.phases."""
        self.phase = phase
        t = time.monotonic()
        yield
        self.report.phases[key or phase] = round(time.monotonic() - t, 3)

    def publish(self, status: str | None = None, registry: bool = True) -> None:
        """Write the lab's record as it is now (state.json, and the registry of labs)."""
        with self._publish_lock:
            r = self.record
            if status is not None:
                r.status = status
            r.qemu_pid = self.vm.pid if self.vm else None
            r.gdb_socket = self.vm.gdb_socket if self.vm else None
            states = self.watch.level_states(list(self.levels))
            r.levels = {n: {"port": st.ssh_port, "via": st.level.parent,
                            "host_key": st.image.host_key if st.image else None,
                            "console_log": f"{n}.console.log", "timeline": st.timeline,
                            "state": states[n]}
                        for n, st in self.levels.items()}
            r.events = self.watch.to_dicts()
            # A lab that is down has no entry in the registry (an event's late publish
            # must not bring one back).
            live = registry and r.status not in ("down", "error")
            r.write(self.registry if live else None)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    # -- failure detection -----------------------------------------------------------------
    def _on_event(self, ev: Event) -> None:
        """A kernel event on some level's console: in the lab's record at once (on the
        console's reader thread, which must go on reading whatever happens here)."""
        try:
            self.publish()
        except Exception as e:
            log.warning(f"recording kernel event #{ev.seq}: {e}")

    def check(self) -> None:
        """Raise at once if a level's kernel had an unexpected event or L0's machine is
        gone."""
        self.watch.raise_if_crashed()
        vm = self.vm
        if vm is None or vm.alive():
            return
        # QEMU exits on a panic (panic=-1, -no-reboot): let the console tell why.
        for st in self.levels.values():
            if st.console:
                st.console.settle(quiet=0.5, limit=2.0)
        self.watch.raise_if_crashed()
        vm.check_alive()

    def report_events(self, settled: float = 0.0) -> None:
        """Every kernel event so far, completed and decoded, into the report (and record)."""
        done = self.watch.complete(settled)
        if done:
            try:
                self._decode(done)
            except Exception as e:  # decoding is a help, never a failure of the run
                log.warning(f"decoding kernel events: {e}")
        self.report.events = self.watch.to_dicts()
        if done:
            with contextlib.suppress(OSError):
                self.publish()

    def _decode(self, evs: list[Event]) -> None:
        release = _release(self.levels["l0"].image)
        syms = Symbols(None, None, built_modules=self.cache / "kmod")
        with contextlib.suppress(LabError):
            files = self._l0_running_kernel().files
            roots = [self.kernel_tree] if self.kernel_tree else []
            roots += [self.cache / "kernel-source" / str(release)]
            syms = Symbols(files.vmlinux, files.module_root, self.cache / "kmod", roots)
        # A nested level runs L0's kernel (the same symbols) or its own (none held).
        same = {n for n, st in self.levels.items() if _release(st.image) == release}
        decode(evs, syms, only=lambda ev: ev.level in same or ev.module is not None)

    # -- build -----------------------------------------------------------------------------
    def recipe(self, level: str) -> Recipe:
        """A level's image recipe, L0's kernel replaced as the user asked."""
        l0 = level == "l0"
        return load_recipe(self.levels[level].level.recipe,
                           kernel_tree=self.kernel_tree if l0 else None,
                           debian=self.inputs.debian if l0 else None, latest=self.inputs.latest)

    def build(self) -> None:
        builder = Builder(self.cache)
        child: BuiltImage | None = None
        # Deepest level first: a parent's image carries its child's kernel and initramfs.
        for name in reversed(list(self.levels)):
            st = self.levels[name]
            recipe = self.recipes[name] = self.recipe(name)
            if name == "l0":
                self.l0_kernel = recipe.kernel
            # L0's symbols are a must where probes or an injection use them; else welcome.
            needs = name == "l0" and bool(self.pb.probes or self.pb.inject)
            st.image = builder.build(recipe, child=child, qemu=st.level.qemu,
                                     with_debug=True if needs else self.inputs.debug)
            child = st.image
            self.report.levels[name] = {
                "image": st.image.dir.name,
                "kernel": {**st.image.manifest["kernel"], **_pin(recipe.kernel)},  # type: ignore[dict-item]
                "memory_mb": st.level.memory_mb, "cpus": st.level.cpus, "timeline": {}}
            if name == "l0":
                self._choose_la57(st.image.release)
        self.report.levels = {n: self.report.levels[n] for n in self.levels}  # topology order
        # The KVM selftests of each level's kernel that a step runs, built before anything
        # boots: a test the kernel does not have is an error now, not after the boot.
        for step in self.pb.steps:
            if step.selftests is None or step.on in self.selftests_built:
                continue
            kernel = self.recipes[step.on].kernel
            built = self.selftests_built[step.on] = selftests.build(kernel, self.cache)
            built.select(step.selftests.tests, self.profile.vendor, step.selftests.where)

    def _choose_la57(self, release: str) -> None:
        """L0's CPU with or without LA57, now that L0's kernel release is known."""
        choice = self.inputs.la57
        if choice == "auto" and "l1" not in self.levels:
            choice = "on"  # no L1 of the lab's to build a 5-level nested page table
        on, why = self.profile.la57_for(choice, release)
        self.l0_la57 = on
        self.report.levels["l0"]["la57"] = on
        if why:
            self.report.levels["l0"]["la57_why"] = why
            log.info(f"l0: {why}")

    # -- boot ------------------------------------------------------------------------------
    def boot(self) -> None:
        """Every level up and answering: warm (restored) where a saved lab fits, else cold,
        level by level."""
        warm.boot(self, self._boot_cold)
        self.publish("up")
        self._write_gdbinit(modules=True)
        self._write_access()

    def _boot_cold(self) -> None:
        for name in self.levels:
            self.boot_level(name)

    def boot_level(self, name: str) -> None:
        """Boot one level (its parent must be up) and wait until it answers over SSH."""
        if name == "l0":
            self.launch_l0()
            if self.hold:
                self._write_gdbinit(modules=False)
                self.publish("held")
                log.info(f"l0: CPUs held until a debugger continues them: "
                         f"gdb -x {self.run_dir}/gdbinit (then `continue`)")
            self._await_level("l0", since=0)
        else:
            self._boot_nested(name)
        self._write_access()

    def l0_request(self, incoming: bool = False) -> machines.L0Request:
        st = self.levels["l0"]
        assert st.image is not None
        mods: list[str] = list(st.image.manifest.get("modules") or [])  # type: ignore[call-overload]
        return machines.L0Request(
            profile=self.profile, level=st.level, kernel=st.image.kernel,
            initrd=st.image.initrd,
            append=machines.kernel_cmdline(self.profile, st.level, nested=False),
            consoles=list(self.levels), run_dir=self.run_dir, sock_dir=self.sock_dir,
            cache=self.cache, hold=self.hold, incoming=incoming,
            image_modules=mods, la57=self.l0_la57)

    def launch_l0(self, incoming: bool = False) -> None:
        """Start L0's machine and attach its consoles (incoming: CPUs held for a restore)."""
        st = self.levels["l0"]
        st.timeline["launch"] = self.now()
        self.vm, st.ssh_port = machines.launch(self.l0_request(incoming), self.watch.watch)
        self.publish()
        self.report.levels["l0"].update(self.vm.describe())
        for n in self.levels:
            self.levels[n].console = self.vm.consoles[n]

    def nested_spec(self, name: str) -> VMSpec:
        lv = self.levels[name].level
        below = [n for n in self.levels if n > name]  # deeper levels relayed through this one
        return nested.spec(self.profile, lv, below,
                           machines.kernel_cmdline(self.profile, lv, nested=True))

    def _boot_nested(self, name: str) -> None:
        st = self.levels[name]
        assert st.level.parent is not None
        parent = self.levels[st.level.parent].ssh
        assert parent is not None and st.console is not None
        st.ssh_port = nested.CHILD_SSH_PORT
        st.vm = nested.NestedVM(self.nested_spec(name), parent)
        since = len(st.console.lines)
        st.timeline["launch"] = self.now()
        st.vm.start()
        # A nested QEMU that exits is only visible from its parent: look there.
        self._await_level(name, since=since, alive=st.vm.check_alive)

    def _await_level(self, name: str, since: int,
                     alive: Callable[[], None] | None = None) -> None:
        st = self.levels[name]
        check = checker(self.check, alive)

        def on_init(seconds: float) -> None:
            if name == "l0" and not self.hold:  # L0's boot is what measures this host
                self.speed = hostspeed.record(self.cache, self.profile.name,
                                              self.profile.reference_l0_init_s, seconds)
                self.report.host_speed = self.speed.to_dict()

        deadline = wait_booted(st, since, self.t0, self.speed.factor,
                               self.hold and name == "l0", check, on_init)
        # Its SSH server starts right after the ready mark: a level extended for being slow
        # still gets a fair window to answer.
        self.connect(name, max(deadline, time.monotonic() + PROGRESS_WINDOW * self.speed.factor),
                     alive)
        launch = st.timeline["launch"]
        log.info(f"{name}: up: /init after {st.timeline['init'] - launch:.1f} s, SSH after "
                 f"{st.timeline['ssh_ready'] - launch:.1f} s")

    def connect(self, name: str, deadline: float, alive: Callable[[], None] | None = None,
                record: bool = True) -> None:
        """Open the SSH session to a level that is up (through its parent's session)."""
        st = self.levels[name]
        parent = self.levels[st.level.parent].ssh if st.level.parent else None
        open_session(st, parent, self.key_file, deadline, checker(self.check, alive))
        if record:
            st.timeline["ssh_ready"] = self.now()
            self.report.levels[name]["timeline"] = dict(st.timeline)

    def boot_budget(self) -> float:
        return max(st.level.boot_timeout for st in self.levels.values()) * self.speed.factor

    def close_sessions(self) -> None:
        for st in reversed(list(self.levels.values())):
            if st.ssh is not None:
                with contextlib.suppress(Exception):
                    st.ssh.close()
                st.ssh = None

    def reset_levels(self) -> None:
        """Forget a failed restore: sessions closed, L0 stopped, state as before boot."""
        self.close_sessions()
        if self.vm is not None:
            self.vm.stop()
            self.vm = None
        for st in self.levels.values():
            st.console, st.timeline, st.ssh_port = None, {}, 0
            self.report.levels[st.level.name].pop("restored", None)
        self.watch.forget()

    def _write_access(self) -> None:
        levels = [access.LevelAccess(n, st.ssh_port, st.level.parent, st.image.host_key)
                  for n, st in self.levels.items() if st.image is not None and st.ssh_port]
        access.write_ssh_files(self.run_dir, self.key_file, levels)
        self.publish()

    # -- debugging ---------------------------------------------------------------------------
    def _l0_running_kernel(self) -> RunningKernel:
        if self.l0_symbols is None:
            st = self.levels["l0"]
            assert st.image is not None
            self.l0_symbols = RunningKernel(debug_files(st.image.manifest, self.cache))
        return self.l0_symbols

    def _write_gdbinit(self, modules: bool) -> None:
        """RUN/gdbinit, for `lab gdb`; with the modules once L0 is up."""
        if self.vm is None or self.vm.gdb_socket is None:
            return
        try:
            kernel = self._l0_running_kernel()
        except LabError as e:
            log.warning(f"no gdbinit: {e}")
            return
        ssh = self.levels["l0"].ssh
        offset, loaded = kernel.read(ssh) if modules and ssh else (0, None)
        write_gdbinit(self.run_dir, self.vm.gdb_socket, kernel.files.vmlinux, offset, loaded)

    def start_probes(self) -> None:
        """Inject the playbook's bug and arm its probes (lab/probes/rig.py)."""
        l0 = self.levels["l0"].ssh
        assert l0 is not None and self.vm is not None
        self.rig.start(l0, self.vm.gdb_socket, self._l0_running_kernel(), self.l0_kernel)

    def _on_gdbstub_owner(self, owner: str) -> None:
        self.record.gdbstub_owner = owner
        self.publish()

    def _on_hold(self, held: dict[str, Any] | None) -> None:
        """A probe stopped L0 for a person (or let it go): say so in the lab's record."""
        self.record.held = held
        self.publish()

    def judge_probes(self) -> None:
        """The playbook's probe checks, on every hit the probes recorded (lab/probes/checks.py)."""
        results = checks.run_all(self.pb.checks, self.report.probes)
        self.report.checks = [r.to_dict() for r in results]
        self.report.invalidation = checks.invalidation_table(self.report.probes)
        for r in results:
            log.info(f"check {r.name}: {r.status.upper()}: {r.message}")

    # -- steps -----------------------------------------------------------------------------
    def run_steps(self) -> None:
        steps_dir = self.run_dir / "steps"
        steps_dir.mkdir(mode=0o700, exist_ok=True)
        for i, step in enumerate(self.pb.steps, 1):
            ssh = self.levels[step.on].ssh
            assert ssh is not None
            self.watch.step = step  # its expected events are expected while it runs
            try:
                run: Callable[..., object] = steps.run
                if step.kvm_unit_tests is not None:
                    assert self.inputs.kvm_unit_tests is not None  # Inputs.check said so
                    run = functools.partial(kut.run, build=kut.load_build(
                        self.inputs.kvm_unit_tests))
                elif step.selftests is not None:
                    run = functools.partial(selftests.run, built=(
                        self.selftests_built[step.on], self.profile.vendor))
                run(step, i, ssh, steps_dir, self.speed.factor, self.check,
                    into=self.report.steps, missing_events=functools.partial(self._missing, step))
            finally:
                self.watch.step = None
            self.check()

    def _missing(self, step: Step) -> list[str]:
        if not step.expect_events:
            return []
        self.watch.settle()  # a report still on its way up from a nested level
        return [e.describe() for e in self.watch.missing(step)]

    # -- teardown --------------------------------------------------------------------------
    def teardown(self) -> None:
        try:
            self.rig.stop()
        except Exception as e:
            self.report.probe_setup["error"] = f"stopping probes: {e}"
        inj, l0 = self.report.injection, self.levels["l0"].ssh
        if inj and inj.get("mechanism") == "kprobe module" and l0 is not None:
            with contextlib.suppress(Exception):
                inj["skipped_calls"] = inject.module_skipped(l0)
        self.close_sessions()
        if self.vm is not None:
            self.vm.stop()
        if self.record.status not in ("down", "error"):
            with contextlib.suppress(OSError, LabError):
                self.publish("down", registry=False)
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        self.registry.remove(self.id)


def _pin(kernel: KernelSource) -> dict[str, Any]:
    """How a Debian kernel was chosen, for the report: pinned (and whether the archive has a
    newer one for the same request, by the package lists as they are) or --latest."""
    if not isinstance(kernel, DebianKernel):
        return {}
    pkg = kernel._resolve()
    out: dict[str, Any] = {"request": kernel.request, "pinned": kernel.lock is not None,
                           "package": pkg.name, "version": pkg.version}
    try:
        now = kernel.resolve_latest()
    except LabError as e:  # an archive that cannot be read says so, and the run goes on
        out["newer"] = None
        out["newer_error"] = str(e).splitlines()[0]
        return out
    out["newer"] = f"{now.name}={now.version}" if now != pkg else None
    return out


def _release(image: BuiltImage | None) -> str | None:
    """The kernel release an image boots."""
    k = image.manifest.get("kernel") if image else None
    return str(k.get("release")) if isinstance(k, dict) else None
