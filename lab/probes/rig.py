"""How a lab arms what watches L0 and what breaks it: the playbook's probes through the backend
it runs under (gdb or tracefs), and its injected bug (a gdb code patch where L0 has a gdbstub,
a kprobe module where it has none).

The rig owns the probe backend for the run and fills the report's `probe_backend`,
`probe_setup`, `injection` and `probes`; the lab only starts and stops it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import inject
from lab.playbook import Playbook
from lab.probes.spec import ProbeBackend, ProbeSpec, timeline
from lab.profiles import Profile
from lab.report import Report
from lab.ssh import SSHSession
from lab.symbols import RunningKernel

log = logging.getLogger(__name__)

KVM_MODULES = ("kvm", "kvm_amd", "kvm_intel")


class Rig:
    def __init__(self, pb: Playbook, profile: Profile, report: Report, run_dir: Path,
                 sock_dir: Path, cache: Path, t0: float,
                 on_owner: Callable[[str], None],
                 on_hold: Callable[[dict[str, Any] | None], None]) -> None:
        self.pb = pb
        self.profile = profile
        self.report = report
        self.run_dir = run_dir
        self.sock_dir = sock_dir
        self.cache = cache
        self.t0 = t0
        self.on_owner = on_owner  # who has L0's gdbstub now: "probes" or "free"
        self.on_hold = on_hold  # a probe holds L0 stopped for a person (None: let go)
        self.backend: ProbeBackend | None = None
        self.owner = "free"

    def _own(self, owner: str) -> None:
        self.owner = owner
        self.on_owner(owner)

    def start(self, l0: SSHSession, gdb_socket: str | None, kernel: RunningKernel,
              kernel_source: Any) -> None:
        """Inject the playbook's bug and arm its probes. gdb, if it only injects, leaves
        again at once (the patch stays)."""
        specs = self.pb.probe_specs(self.profile.vendor)
        by_module = self.pb.inject is not None and (
            gdb_socket is None or not inject.resolve(self.pb.inject, self.profile.vendor).gdb)
        if self.pb.inject and by_module:
            self.report.injection = inject.by_module(l0, self.pb.inject, self.profile.vendor,
                                                     kernel_source, self.cache)
        if self.pb.probe_backend == "tracefs":
            self._start_tracefs(l0, specs, kernel)
            specs = []  # gdb, if needed at all, only injects
        if gdb_socket is not None and (specs or (self.pb.inject and not by_module)):
            self._start_gdb(l0, gdb_socket, specs, kernel, inject_too=not by_module)

    def _start_tracefs(self, l0: SSHSession, specs: list[ProbeSpec],
                       kernel: RunningKernel) -> None:
        from lab.kernel import module_index
        from lab.probes import tracefs

        index = module_index(kernel.files.module_root)
        mods = [index[m] for m in KVM_MODULES if m in index]
        self.backend = tracefs.start(l0, specs, kernel.files.vmlinux, mods, self.run_dir,
                                     self.t0)
        self.report.probe_backend = "tracefs"
        self.report.probe_setup = {**self.backend.setup,
                                   "probe_sets": sorted({s.origin for s in specs})}

    def _start_gdb(self, l0: SSHSession, gdb_socket: str, specs: list[ProbeSpec],
                   kernel: RunningKernel, inject_too: bool) -> None:
        from lab.probes import gdb as gdb_probes

        # Read what needs L0 running (SSH) before gdb stops it.
        offset, modules = kernel.read(l0)
        self._own("probes")
        gdb, setup = gdb_probes.attach(gdb_socket, kernel.files.vmlinux, offset, modules,
                                       self.run_dir / "gdb.log")
        if self.pb.inject and inject_too:
            self.report.injection = inject.by_gdb(gdb, self.pb.inject, self.profile.vendor)
        if self.backend is None:
            self.report.probe_backend = "gdb"
            self.report.probe_setup = {**setup, "probe_sets": sorted({s.origin for s in specs})}
        if not specs:
            # gdb only injected: it leaves at once, and L0 runs on (QEMU resumes on detach).
            try:
                gdb.detach()
            finally:
                gdb.close()
                self._own("free")
            return
        self.backend = gdb_probes.GdbProbes(gdb, specs, self.t0,
                                            console_socket=self.sock_dir / "gdb-console",
                                            on_hold=self.on_hold, setup=setup)
        self.backend.start()
        log.info(f"gdb: attached to L0, {len(modules)} modules, ready "
                 f"{setup['ready_after_attach_s']:.2f} s after attach; {len(specs)} probes "
                 f"armed ({', '.join(s.name for s in specs)})")

    def gdbstub_released(self) -> bool:
        """True once, when the probes are done with L0's gdbstub (a person's gdb may have
        it now)."""
        if self.owner == "probes" and self.backend is not None \
                and self.backend.releases_gdbstub():
            self._own("free")
            return True
        return False

    def stop(self) -> None:
        """Stop the probes (gdb detaches, tracing ends) and put their results in the report."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        try:
            backend.stop()
        finally:
            if self.owner != "free":
                self._own("free")
            self.report.probes = backend.results()
            self.report.probe_timeline = timeline(self.report.probes)
            if backend.error:
                self.report.probe_setup["error"] = backend.error
