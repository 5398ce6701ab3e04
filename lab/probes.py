"""Probes: stop L0 in KVM, capture its state, let it run on.

A probe names a place (function or file:line), an optional condition, what to capture (gdb
expressions and the built-in `guest_mmu(VCPU)`), when (on entry and/or on return), how many hits
at most, and what to do after. The description is backend-neutral; `GdbProbes` runs it through
L0's gdbstub, `lab.tracefs.TraceProbes` through kprobe events inside L0.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from lab import schema
from lab.errors import UsageError
from lab.gdb import GdbError, GdbSession
from lab.gdbvalue import parse

INVALID_PAGE = (1 << 64) - 1

# What reaches gdb (and, for tracefs, L0's shell) from a playbook is checked against what it
# must be; nothing else gets through. A place: a function (module:function for tracefs),
# FILE:LINE, or *ADDRESS.
LINESPEC = (r"(?:[A-Za-z_][A-Za-z0-9_]*:)?[A-Za-z_][A-Za-z0-9_.]*"
            r"|[A-Za-z0-9_./-]+:[0-9]+|\*0x[0-9a-fA-F]+")
# gdb's convenience functions that conditions and captures may call ($_shell runs a host
# command, $_as_string and the like are of no use here).
ALLOWED_FUNCTIONS = frozenset({"$_caller_is", "$_caller_matches", "$_any_caller_is",
                               "$_any_caller_matches", "$_streq", "$_strlen", "$_memeq",
                               "$_regex"})
_FUNCTION = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*(?=\s*\()")


class Expression(schema.Str):
    """A condition or capture: one line of C, calling no gdb function off the allow-list."""

    def __init__(self) -> None:
        super().__init__(pattern_what="a C expression", nonempty=True, max_len=1000)

    def check(self, node: yaml.Node, path: str, file: str) -> str:
        value = super().check(node, path, file)
        for fn in _FUNCTION.findall(value):
            if fn not in ALLOWED_FUNCTIONS:
                raise schema.fail(file, node, path, f"gdb function {fn} is not allowed "
                                  f"(expected one of {', '.join(sorted(ALLOWED_FUNCTIONS))})")
        return value


EXPRESSION = Expression()
PROBE_SPEC = schema.Map({
    "name": schema.Field(schema.Str(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}",
                                    pattern_what="a name of letters, digits, '_', '.', '-'")),
    "set": schema.Field(schema.Str(choices=("invalidation",))),
    "at": schema.Field(schema.Str(pattern=LINESPEC,
                                  pattern_what="a function, FILE:LINE or *ADDRESS")),
    "if": schema.Field(EXPRESSION),
    "capture": schema.Field(schema.Dict(EXPRESSION, key_what="a capture name"), default=None),
    "when": schema.Field(schema.List(schema.Str(choices=("entry", "return"))), default=None),
    "max_hits": schema.Field(schema.Int(minimum=1, maximum=100000), default=10),
    "then": schema.Field(schema.Str(choices=("continue", "stop")), default="continue"),
})


@dataclass
class ProbeSpec:
    name: str
    at: str
    condition: str | None = None
    captures: dict[str, str] = field(default_factory=dict)
    when: list[str] = field(default_factory=lambda: ["entry"])
    max_hits: int = 10
    then: str = "continue"
    origin: str = "playbook"  # or the built-in set it came from


def builtin_set(name: str, vendor: str) -> list[ProbeSpec]:
    """The probes that watch L0 handle L1's invalidations, for the host's vendor."""
    assert name == "invalidation"
    origin = f"invalidation/{'vmx' if vendor == 'intel' else 'svm'}"
    if vendor == "intel":
        return [
            # handle_invept is reached through the exit-handler table, never inlined. On
            # return, guest_mmu must hold no root the INVEPT named (the seed's fix).
            ProbeSpec("handle_invept", "handle_invept", captures={
                "eptp12": "((struct vcpu_vmx *)vcpu)->nested.cached_vmcs12->ept_pointer",
                "guest_mmu": "guest_mmu(vcpu)"}, when=["entry", "return"], origin=origin),
            # The call that frees the roots: what handle_invept decided (INVEPT type 1 =
            # single-context, 2 = global; the operand's EPTP; which roots) and the roots it
            # is about to free. Caller variables (type, operand, vcpu) are handle_invept's.
            ProbeSpec("invept_free_roots", "kvm_mmu_free_roots",
                      condition='$_caller_is("handle_invept", 1)',
                      captures={"type": "type", "operand_eptp": "operand.eptp",
                                "roots_to_free": "roots_to_free",
                                "guest_mmu": "guest_mmu(vcpu)"}, origin=origin),
        ]
    return [
        # Every #VMEXIT from L2: guest_mmu is active and its root shadows L1's nested CR3.
        ProbeSpec("nested_svm_vmexit", "nested_svm_vmexit", captures={
            "nested_cr3": "svm->nested.ctl.nested_cr3", "tlb_ctl": "svm->nested.ctl.tlb_ctl",
            "exit_code": "svm->vmcb->control.exit_code", "guest_mmu": "guest_mmu(&svm->vcpu)"},
            max_hits=5, origin=origin),
        # The sync KVM_REQ_MMU_SYNC asks for on nested VMRUN/#VMEXIT: roots before and after.
        ProbeSpec("sync_guest_mmu", "kvm_mmu_sync_roots",
                  condition="vcpu->arch.mmu == &vcpu->arch.guest_mmu",
                  captures={"guest_mmu": "guest_mmu(vcpu)",
                            "nested_cr3": "((struct vcpu_svm *)vcpu)->nested.ctl.nested_cr3"},
                  when=["entry", "return"], max_hits=5, origin=origin),
    ]


def load_probes(items: list[Any], vendor: str) -> list[ProbeSpec]:
    specs: list[ProbeSpec] = []
    for i, p in enumerate(items):
        if p["set"]:
            if p["at"] or p["capture"] or p["if"] or p["when"]:
                raise UsageError(f"{p.where('set')}: probes[{i}]: `set` takes only "
                                 f"`max_hits` and `then` (no `at`, `if`, `capture`, `when`)")
            for spec in builtin_set(p["set"], vendor):
                # A set's own limits, unless the playbook gives its own for the whole set.
                if "max_hits" in p.lines:
                    spec.max_hits = p["max_hits"]
                if "then" in p.lines:
                    spec.then = p["then"]
                specs.append(spec)
            continue
        if not p["at"]:
            raise UsageError(f"{p.where()}: probes[{i}].at: missing (a function or FILE:LINE)")
        for cname, expr in (p["capture"] or {}).items():
            try:
                compile_capture(cname, expr)
            except ValueError as e:
                raise UsageError(f"{p.where('capture')}: probes[{i}].capture.{cname}: {e}") \
                    from None
        specs.append(ProbeSpec(name=p["name"] or p["at"], at=p["at"], condition=p["if"],
                               captures=dict(p["capture"] or {}),
                               when=p["when"] or ["entry"], max_hits=p["max_hits"],
                               then=p["then"]))
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"probes: duplicate probe name(s): {', '.join(sorted(dup))}")
    return specs


# -- captures ----------------------------------------------------------------------------------
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
    hpa = int(entry.get("hpa", INVALID_PAGE))
    return {"pgd": int(entry.get(pgd_key, 0)), "hpa": hpa, "valid": hpa != INVALID_PAGE}


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
        return {"current": current,
                "previous": [_root(e, info_pgd) for e in prev] if isinstance(prev, list) else [],
                "active": bool(active) if isinstance(active, bool | int) else active == "true"}


_BUILTIN = re.compile(r"^\s*guest_mmu\((.+)\)\s*$")


def compile_capture(name: str, expr: str) -> Capture:
    m = _BUILTIN.match(expr)
    if m:
        return GuestMmuCapture(name, m.group(1).strip())
    if not expr.strip():
        raise ValueError("empty expression")
    return ExprCapture(name, expr)


def rewrite_args(expr: str, args: list[str]) -> str:
    """After `finish` the probed function's frame is gone: name its arguments as the $NAME
    convenience variables saved at entry."""
    for a in sorted(args, key=len, reverse=True):
        expr = re.sub(rf"(?<![\w$.>]){re.escape(a)}\b", f"${a}", expr)
    return expr


# -- backend interface ----------------------------------------------------------------------
class ProbeBackend(Protocol):
    """What the lab needs of a probe backend (gdb now, tracing inside L0 later)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def results(self) -> list[dict[str, Any]]: ...


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
                 log: Any = print, console_socket: Path | None = None,
                 on_hold: Any = None) -> None:
        self.gdb = gdb
        self.t0 = t0
        self.log = log
        self.probes = [ProbeState(s, [compile_capture(n, e) for n, e in s.captures.items()])
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
            cond = f'-c "{_mi_quote(p.spec.condition)}" ' if p.spec.condition else ""
            try:
                r, _ = self.gdb.cmd(f"-break-insert {cond}{p.spec.at}")
            except GdbError as e:
                p.error, p.done = str(e), True
                self.log(f"probe {p.spec.name}: {e}")
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
            self.log(f"probes: {self.error}; detaching so that L0 runs on")
            # Never leave L0 stopped behind a dead prober: the lab's steps would hang.
            try:
                self._finish()
            except Exception as e2:
                self.log(f"probes: detaching failed too: {e2}")

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
            self.log(f"probe {p.spec.name}: L0 held at hit {hit['hit']} ({p.location}); "
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
        if self.console_socket is None:
            self._stop.wait()
            return False
        path = self.console_socket
        path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(str(path))
            os.chmod(path, 0o600)
            srv.listen(1)
            srv.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn, conn.makefile("rw") as f:
                    f.write(json.dumps({"held": self.held}) + "\n")
                    f.flush()
                    for line in f:
                        cmd = json.loads(line).get("cmd", "").strip()
                        if cmd in ("c", "cont", "continue"):
                            f.write(json.dumps({"out": "L0 runs on", "released": True}) + "\n")
                            f.flush()
                            return True
                        try:
                            out = self.gdb.console(cmd) if cmd else ""
                            reply = {"out": out}
                        except GdbError as e:
                            reply = {"error": str(e)}
                        f.write(json.dumps(reply) + "\n")
                        f.flush()
            return False
        finally:
            srv.close()
            path.unlink(missing_ok=True)

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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if not self.detached:
            try:
                self._finish()
            except GdbError as e:
                self.log(f"probes: detaching: {e}")

    def results(self) -> list[dict[str, Any]]:
        return [{"name": p.spec.name, "at": p.spec.at, "location": p.location,
                 "condition": p.spec.condition, "when": p.spec.when, "origin": p.spec.origin,
                 "max_hits": p.spec.max_hits, "error": p.error, "hits": p.hits}
                for p in self.probes]


def _mi_quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def timeline(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All hits of all probes in time order, for the report's readable timeline."""
    rows = []
    for p in results:
        for h in p["hits"]:
            rows.append({"t": h["t"], "probe": p["name"], "hit": h["hit"],
                         "where": h["location"].get("func"), "captures": h["captures"]})
    return sorted(rows, key=lambda r: r["t"])


