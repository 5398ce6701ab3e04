"""The gdb probe backend: stop L0 in KVM through its gdbstub, capture its state, let it run on.

Breakpoints (with their conditions) are gdb's; captures are evaluated at the stop, and
`when: return` finishes the function and evaluates again, with the entry's arguments saved as
convenience variables. A probe hit costs a stop of L0 (tens of milliseconds under TCG), which is
why each probe has `max_hits`. Every probe done, gdb detaches and L0 runs at full speed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.gdb import GdbError, GdbSession
from lab.gdbvalue import parse
from lab.probes import held as held_console
from lab.probes.spec import (
    INVALID_PAGE,
    CaptureSpec,
    ProbeSpec,
    guest_mmu_record,
    probe_record,
    root_record,
)

log = logging.getLogger(__name__)


@dataclass
class MmuLayout:
    """Where struct kvm_mmu keeps its roots, as gdb says for this kernel."""

    current: str  # "root" (>= 5.18) or "split" (root_hpa + root_pgd/root_cr3)
    pgd_field: str  # root_pgd / root_cr3 for "split"; pgd / cr3 inside kvm_mmu_root_info

    @classmethod
    def from_ptype(cls, kvm_mmu: str, root_info: str) -> MmuLayout:
        info_pgd = "cr3" if re.search(r"\bcr3;", root_info) else "pgd"
        if re.search(r"struct kvm_mmu_root_info root;", kvm_mmu):
            return cls("root", info_pgd)
        if re.search(r"\broot_hpa;", kvm_mmu):
            return cls("split", "root_cr3" if re.search(r"\broot_cr3;", kvm_mmu) else "root_pgd")
        raise ValueError("struct kvm_mmu has neither `root` nor `root_hpa`")


def _root(entry: dict[str, Any], pgd_key: str) -> dict[str, Any]:
    return root_record(int(entry.get(pgd_key, 0)), int(entry.get("hpa", INVALID_PAGE)))


class Capture:
    name: str

    def exprs(self, layout: MmuLayout | None) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def assemble(self, values: list[tuple[bool, str]], layout: MmuLayout | None) -> Any:
        raise NotImplementedError  # pragma: no cover


@dataclass
class ExprCapture(Capture):
    name: str
    expr: str

    def exprs(self, layout: MmuLayout | None) -> list[str]:
        return [self.expr]

    def assemble(self, values: list[tuple[bool, str]], layout: MmuLayout | None) -> Any:
        ok, v = values[0]
        return parse(v) if ok else {"error": v}


@dataclass
class GuestMmuCapture(Capture):
    """vcpu->arch.guest_mmu's current and previous roots, and whether it is the active mmu."""

    name: str
    vcpu: str

    def exprs(self, layout: MmuLayout | None) -> list[str]:
        assert layout is not None
        m = f"({self.vcpu})->arch.guest_mmu"
        active = f"({self.vcpu})->arch.mmu == &({self.vcpu})->arch.guest_mmu"
        if layout.current == "root":
            return [f"{m}.root", f"{m}.prev_roots", active]
        return [f"{m}.root_hpa", f"{m}.{layout.pgd_field}", f"{m}.prev_roots", active]

    def assemble(self, values: list[tuple[bool, str]], layout: MmuLayout | None) -> Any:
        assert layout is not None
        bad = [v for ok, v in values if not ok]
        if bad:
            return {"error": bad[0]}
        parsed = [parse(v) for _, v in values]
        if layout.current == "root":
            current = _root(parsed[0], layout.pgd_field)
            prev, active = parsed[1], parsed[2]
        else:
            current = _root({"hpa": parsed[0], "pgd": parsed[1]}, "pgd")
            prev, active = parsed[2], parsed[3]
        info_pgd = "cr3" if layout.pgd_field in ("cr3", "root_cr3") else "pgd"
        return guest_mmu_record(
            current, [_root(e, info_pgd) for e in prev] if isinstance(prev, list) else [],
            bool(active) if isinstance(active, bool | int) else active == "true")


def compile_capture(name: str, cap: CaptureSpec) -> Capture:
    if cap.kind == "guest_mmu":
        return GuestMmuCapture(name, cap.arg)
    return ExprCapture(name, cap.arg)


def rewrite_args(expr: str, args: list[str]) -> str:
    """After `finish` the probed function's frame is gone: name its arguments as the $NAME
    convenience variables saved at entry."""
    for a in sorted(args, key=len, reverse=True):
        expr = re.sub(rf"(?<![\w$.>]){re.escape(a)}\b", f"${a}", expr)
    return expr


@dataclass
class ProbeState:
    spec: ProbeSpec
    captures: list[Capture]
    number: str = ""  # gdb breakpoint number
    hits: list[dict[str, Any]] = field(default_factory=list)
    location: str = ""
    error: str | None = None
    done: bool = False


class GdbProbes:
    """Runs probes through gdb on a thread, while the lab's steps run."""

    name = "gdb"

    def __init__(self, gdb: GdbSession, specs: list[ProbeSpec], t0: float,
                 console_socket: Path | None = None, on_hold: Any = None,
                 setup: dict[str, Any] | None = None) -> None:
        self.gdb = gdb
        self.t0 = t0
        self.setup = setup or {}
        self.probes = [ProbeState(s, [compile_capture(n, c) for n, c in s.parsed.items()])
                       for s in specs]
        self.layout: MmuLayout | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.held: dict[str, Any] | None = None  # set while a probe keeps L0 stopped
        self.detached = False
        # `then: stop` hands the stopped L0 to a person through this socket (`lab gdb`):
        # detaching would let L0 run on (QEMU resumes on detach), so the probes' own gdb serves.
        self.console_socket = console_socket
        self.on_hold = on_hold

    def _detect_layout(self) -> None:
        if any(isinstance(c, GuestMmuCapture) for p in self.probes for c in p.captures):
            mmu = self.gdb.console("ptype struct kvm_mmu")
            info = self.gdb.console("ptype struct kvm_mmu_root_info")
            self.layout = MmuLayout.from_ptype(mmu, info)

    def arm(self) -> None:
        """Insert the breakpoints (target stopped); errors are per probe, not fatal."""
        self._detect_layout()
        for p in self.probes:
            c = p.spec.gdb_condition()
            cond = f'-c "{_mi_quote(c)}" ' if c else ""
            try:
                r, _ = self.gdb.cmd(f"-break-insert {cond}{p.spec.at}")
            except GdbError as e:
                p.error, p.done = str(e), True
                log.info(f"probe {p.spec.name}: {e}")
                continue
            bk = r["payload"]["bkpt"]
            p.number = str(bk["number"])
            p.location = f"{bk.get('func', '?')} {bk.get('file', '')}:{bk.get('line', '')}"

    def start(self) -> None:
        self.arm()
        self.gdb.cont()
        self._thread = threading.Thread(target=self._loop, name="probes", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if all(p.done for p in self.probes):
                    self._finish()
                    return
                st = self.gdb.wait_stopped(0.2)
                if st is None or self._stop.is_set():
                    if st is not None:
                        self.gdb.pending.appendleft(st)
                    continue
                self._on_stop(st)
        except Exception as e:  # reported in the run's report
            self.error = f"{type(e).__name__}: {e}"
            log.info(f"probes: {self.error}; detaching so that L0 runs on")
            # Never leave L0 stopped behind a dead prober: the lab's steps would hang.
            try:
                self._finish()
            except Exception as e2:
                log.info(f"probes: detaching failed too: {e2}")

    def _probe_for(self, st: dict[str, Any]) -> ProbeState | None:
        num = str(st.get("payload", {}).get("bkptno", ""))
        return next((p for p in self.probes if p.number == num), None)

    def _on_stop(self, st: dict[str, Any]) -> None:
        t_stop = time.monotonic()
        payload = st.get("payload", {})
        p = self._probe_for(st)
        if p is None or p.done:
            self.gdb.cont()  # not ours (or a late duplicate): let L0 run
            return
        frame = payload.get("frame", {})
        hit: dict[str, Any] = {
            "hit": len(p.hits) + 1, "t": round(t_stop - self.t0, 3),
            "location": {"func": frame.get("func"), "file": frame.get("file"),
                         "line": int(frame["line"]) if frame.get("line") else None,
                         "addr": int(frame["addr"], 16) if frame.get("addr") else None},
            "captures": {}}
        if "entry" in p.spec.when:
            hit["captures"]["entry"] = self._capture(p, [])
        elsewhere = None
        if "return" in p.spec.when:
            args = self.gdb.save_args()
            self.gdb.cmd("-exec-finish")
            fin = self.gdb.wait_stopped(60)
            if fin is not None and fin.get("payload", {}).get("reason") == "function-finished":
                cap = self._capture(p, args)
                rv = fin["payload"].get("return-value")
                if rv is not None:
                    cap["return_value"] = parse(rv)
                hit["captures"]["return"] = cap
            elif fin is None:
                # The function did not return within a minute: stop L0 so that it can go on.
                hit["captures"]["return"] = {"error": "no return within 60 s"}
                self.gdb.interrupt()
            else:
                # A breakpoint stopped L0 before the return (another probe, or this one
                # again): L0 is stopped there now, so that stop is the next hit to handle,
                # and L0 must not be continued from here.
                hit["captures"]["return"] = {"error": "stopped at another breakpoint before "
                                                      "the return"}
                elsewhere = fin
        p.hits.append(hit)
        if len(p.hits) >= p.spec.max_hits:
            p.done = True
            self.gdb.cmd(f"-break-delete {p.number}")
        if elsewhere is not None:
            self.gdb.pending.appendleft(elsewhere)
            hit["cost_ms"] = round((time.monotonic() - t_stop) * 1000, 1)
            return
        hit["cost_ms"] = round((time.monotonic() - t_stop) * 1000, 1)
        if p.spec.then == "stop":
            self.held = {"probe": p.spec.name, "hit": hit["hit"], "location": p.location}
            log.info(f"probe {p.spec.name}: L0 held at hit {hit['hit']} ({p.location}); "
                     f"`lab gdb` to look, `continue` there to let it run")
            if self.on_hold:
                self.on_hold(self.held)
            released = self._serve_person()
            self.held = None
            if self.on_hold:
                self.on_hold(None)
            if not released:
                return  # the lab is stopping: stop() detaches
        self.gdb.cont()

    def _serve_person(self) -> bool:
        """Answer gdb commands from `lab gdb` until it says continue; False if stopping."""
        if self.console_socket is None or self.held is None:
            self._stop.wait()
            return False
        return held_console.serve(self.console_socket, self.held, self.gdb.console,
                                  self._stop, GdbError)

    def _capture(self, p: ProbeState, args: list[str]) -> dict[str, Any]:
        exprs: list[str] = []
        spans = []
        for c in p.captures:
            es = [rewrite_args(e, args) for e in c.exprs(self.layout)]
            spans.append((c, len(exprs), len(es)))
            exprs += es
        # A probe on X "when called from F" may capture F's variables (see probes' docs).
        caller = bool(re.match(r'^\s*\$_caller_is\(', p.spec.condition or ""))
        values = self.gdb.evaluate(exprs, caller=caller)
        return {c.name: c.assemble(values[i:i + n], self.layout) for c, i, n in spans}

    def _finish(self) -> None:
        """Every probe is done: give L0 back its full speed."""
        if self.detached:
            return
        self.gdb.interrupt()
        self.gdb.cmd("-break-delete")
        self.gdb.detach()
        self.detached = True

    def stop(self) -> None:
        """Every probe ends, gdb detaches (L0 runs on) and exits."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(timeout=120)
            if not self.detached:
                try:
                    self._finish()
                except GdbError as e:
                    log.warning(f"probes: detaching: {e}")
        finally:
            self.gdb.close()

    def results(self) -> list[dict[str, Any]]:
        return [probe_record(p.spec, p.location, p.error, p.hits) for p in self.probes]

    def releases_gdbstub(self) -> bool:
        return self.detached


def _mi_quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def attach(socket_path: str, vmlinux: Path, kaslr_offset: int, modules: list[Any],
           log_path: Path) -> tuple[GdbSession, dict[str, Any]]:
    """A gdb attached to L0's gdbstub with the kernel's and the KVM modules' symbols, stopped
    in L0's own context (not a nested guest's); and how that went, for the report."""
    gdb = GdbSession(log_path)
    t_load = gdb.load_kernel(vmlinux, kaslr_offset)
    t = time.monotonic()
    gdb.attach(socket_path)
    for m in modules:
        gdb.add_module(m.debug_file, m.sections, m.present)
    restops = gdb.stop_in_host("l0")
    return gdb, {"vmlinux": str(vmlinux), "kaslr_offset": kaslr_offset,
                 "load_vmlinux_s": round(t_load, 3),
                 "ready_after_attach_s": round(time.monotonic() - t, 3),
                 "restops_to_l0_context": restops, "modules": [m.name for m in modules]}
