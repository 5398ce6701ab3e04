"""Probes, backend-neutral: what a playbook may say about them, the built-in sets, what a
capture is, and the records every backend returns.

A probe names a place (function or file:line), an optional condition, what to capture (C
expressions and the built-in `guest_mmu(VCPU)`), when (on entry and/or on return), how many hits
at most, and what to do after. `lab.probes.gdb` runs probes through L0's gdbstub,
`lab.probes.tracefs` through kprobe events inside L0; a new backend is one more module that
implements `ProbeBackend` and returns `probe_record`s. Importing this module imports no backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from lab import schema
from lab.errors import UsageError

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
    # Keep only the hits where this guest_mmu(...) capture is the vCPU's active MMU (L2 runs
    # on it). A condition of two fields, which a kprobe filter cannot express: gdb makes it
    # the breakpoint's condition, tracefs drops the other hits as it reads the trace.
    active_only: str | None = None
    # The captures parsed, once, here (ValueError on a bad one).
    parsed: dict[str, CaptureSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.parsed = {}
        for n, e in self.captures.items():
            try:
                self.parsed[n] = parse_capture(e)
            except ValueError as err:
                raise ValueError(f"capture.{n}: {err}") from None
        if self.active_only is not None:
            c = self.parsed.get(self.active_only)
            assert c is not None and c.kind == "guest_mmu", self.active_only

    def gdb_condition(self) -> str | None:
        """The breakpoint condition for gdb: `condition`, and `active_only` spelled out."""
        terms = [f"({self.condition})"] if self.condition else []
        if self.active_only is not None:
            vcpu = self.parsed[self.active_only].arg
            terms.append(f"({vcpu})->arch.mmu == &({vcpu})->arch.guest_mmu")
        return " && ".join(terms) or None


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
        # The sync KVM_REQ_MMU_SYNC asks for on nested VMRUN/#VMEXIT, while L2's guest_mmu
        # is the active MMU: roots before and after.
        ProbeSpec("sync_guest_mmu", "kvm_mmu_sync_roots", active_only="guest_mmu",
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
        try:
            specs.append(ProbeSpec(name=p["name"] or p["at"], at=p["at"], condition=p["if"],
                                   captures=dict(p["capture"] or {}),
                                   when=p["when"] or ["entry"], max_hits=p["max_hits"],
                                   then=p["then"]))
        except ValueError as e:
            raise UsageError(f"{p.where('capture')}: probes[{i}].{e}") from None
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"probes: duplicate probe name(s): {', '.join(sorted(dup))}")
    return specs


# -- captures ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureSpec:
    """One capture, parsed once: `kind` "expr" (a C expression, `arg`) or "guest_mmu" (the
    built-in: vcpu->arch.guest_mmu's roots, `arg` the vcpu pointer expression)."""

    kind: str
    arg: str


_BUILTIN = re.compile(r"^\s*guest_mmu\((.+)\)\s*$")


def parse_capture(expr: str) -> CaptureSpec:
    """The one reader of the capture syntax (ValueError on an empty expression)."""
    m = _BUILTIN.match(expr)
    if m:
        return CaptureSpec("guest_mmu", m.group(1).strip())
    if not expr.strip():
        raise ValueError("empty expression")
    return CaptureSpec("expr", expr)


def root_record(pgd: int, hpa: int) -> dict[str, Any]:
    """One root of an MMU: the guest page-table root it shadows and the host page of its
    table (INVALID_PAGE: the slot is empty)."""
    return {"pgd": pgd, "hpa": hpa, "valid": hpa != INVALID_PAGE}


def guest_mmu_record(current: dict[str, Any], previous: list[dict[str, Any]],
                     active: bool, vcpu: int | None = None) -> dict[str, Any]:
    """What a guest_mmu(...) capture yields, whichever backend read it. `kind` tells the
    report (and checks) what the value is, whatever the capture is called; `vcpu` (the
    struct kvm_vcpu's address, where the backend reads it) tells one vCPU's hits from
    another's."""
    rec = {"kind": "guest_mmu", "current": current, "previous": previous, "active": active}
    if vcpu is not None:
        rec["vcpu"] = vcpu
    return rec


def probe_record(spec: ProbeSpec, location: str, error: str | None,
                 hits: list[dict[str, Any]]) -> dict[str, Any]:
    """One probe's result, as every backend reports it."""
    return {"name": spec.name, "at": spec.at, "location": location,
            "condition": spec.gdb_condition(), "when": spec.when, "origin": spec.origin,
            "max_hits": spec.max_hits, "error": error, "hits": hits}


# -- backend interface ----------------------------------------------------------------------
class ProbeBackend(Protocol):
    """What the lab needs of a probe backend (gdb through L0's gdbstub, or kprobe events in
    L0's tracefs)."""

    name: str
    error: str | None  # the backend failed as a whole (each probe has its own `error` too)
    setup: dict[str, Any]  # how it was set up (symbols, timings): the report's probe_setup

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def results(self) -> list[dict[str, Any]]: ...

    def releases_gdbstub(self) -> bool: ...  # L0's gdbstub is free for a person now


def timeline(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All hits of all probes in time order, for the report's readable timeline."""
    rows = []
    for p in results:
        for h in p["hits"]:
            rows.append({"t": h["t"], "probe": p["name"], "hit": h["hit"],
                         "where": h["location"].get("func"), "captures": h["captures"]})
    return sorted(rows, key=lambda r: r["t"])


