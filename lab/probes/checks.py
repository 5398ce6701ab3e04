"""Probe checks: verdicts on what the probes captured, next to the guests' own.

A playbook's `checks:` run after its steps, on every probe's hits (report.json `probes`):
- built in, for the `invalidation` set on VMX (handle_invept and the roots it frees, which the
  tracefs backend records completely): `invept-frees-what-it-names`, `global-invept-frees-all`,
  `cached-root-path-ran`; on SVM (every #VMEXIT from L2 and every sync of the active guest_mmu):
  `nested-vmrun-syncs-guest-mmu`, `nested-cr3-switch-reused-a-cached-root`;
- a playbook's own: every hit of one probe (at entry or at return) must satisfy an expression
  of this module's small language (see `parse`; nothing of a playbook is ever eval'd).

A check fails when what it looks at is not all there: a probe that never hit, or a stream that
`max_hits` cut short (the hits it did not see could be the bad ones). Each check is a testcase
of its own (JUnit, report.html) and an entry of report.json's `checks`; a failed one fails the
run (exit 1). The same stream gives the over-invalidation table: per INVEPT, the roots freed
against the roots its operand named.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lab.errors import UsageError

KVM_MMU_ROOT_CURRENT = 1  # BIT(0); the previous roots are BIT(1 + i)
EPTP_PA_MASK = ((1 << 52) - 1) & ~0xFFF
INVEPT_SINGLE, INVEPT_GLOBAL = 1, 2  # VMX_EPT_EXTENT_CONTEXT / VMX_EPT_EXTENT_GLOBAL


@dataclass
class Result:
    name: str
    status: str  # passed | failed
    message: str
    saw: dict[str, Any] = field(default_factory=dict)  # what it looked at, counted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the expression language ---------------------------------------------------------------
# expr   := or ; or := and ("or" and)* ; and := not ("and" not)* ; not := "not" not | cmp
# cmp    := bits (("=="|"!="|"<"|"<="|">"|">=") bits)? ; bits := atom (("&"|"|") atom)*
# atom   := INT | "true" | "false" | PATH | "(" expr ")"
# PATH   := NAME ("." NAME | "[" INT "]")*  -- a capture of the hit, e.g. guest_mmu.current.valid
_TOKEN = re.compile(r"\s*(?:(0x[0-9a-fA-F]+|\d+)|([A-Za-z_][A-Za-z0-9_]*(?:(?:\.[A-Za-z_]"
                    r"[A-Za-z0-9_]*)|\[\d+\])*)|(==|!=|<=|>=|<|>|&|\||\(|\)))")
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
Node = tuple[Any, ...]


class Missing(Exception):
    """A path the hit does not have."""


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unexpected {text[pos:].strip()[:20]!r}")
        out.append(m.group(m.lastindex or 0))
        pos = m.end()
    return out


def parse(text: str) -> Node:
    """The expression as a tree; ValueError naming what is wrong."""
    toks = _tokens(text)
    pos = 0

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(toks):
            raise ValueError("the expression ends too soon")
        pos += 1
        return toks[pos - 1]

    def or_() -> Node:
        n = and_()
        while peek() == "or":
            take()
            n = ("or", n, and_())
        return n

    def and_() -> Node:
        n = not_()
        while peek() == "and":
            take()
            n = ("and", n, not_())
        return n

    def not_() -> Node:
        if peek() == "not":
            take()
            return ("not", not_())
        return cmp()

    def cmp() -> Node:
        n = bits()
        if peek() in _CMP:
            op = take()
            n = ("cmp", op, n, bits())
        return n

    def bits() -> Node:
        n = atom()
        while peek() in ("&", "|"):
            op = take()
            n = ("bits", op, n, atom())
        return n

    def atom() -> Node:
        t = take()
        if t == "(":
            n = or_()
            if take() != ")":
                raise ValueError("expected ')'")
            return n
        if t in ("true", "false"):
            return ("const", t == "true")
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", t):
            return ("const", int(t, 0))
        if t in ("and", "or", "not") or not re.match(r"[A-Za-z_]", t):
            raise ValueError(f"unexpected {t!r}")
        return ("path", t)

    tree = or_()
    if pos != len(toks):
        raise ValueError(f"unexpected {toks[pos]!r}")
    return tree


def _lookup(path: str, data: Any) -> Any:
    cur = data
    for name, index in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", path):
        try:
            cur = cur[name] if name else cur[int(index)]
        except (KeyError, IndexError, TypeError):
            raise Missing(path) from None
    return cur


def evaluate(tree: Node, data: dict[str, Any]) -> Any:
    kind = tree[0]
    if kind == "const":
        return tree[1]
    if kind == "path":
        return _lookup(tree[1], data)
    if kind == "not":
        return not evaluate(tree[1], data)
    if kind == "and":
        return evaluate(tree[1], data) and evaluate(tree[2], data)
    if kind == "or":
        return evaluate(tree[1], data) or evaluate(tree[2], data)
    a, b = evaluate(tree[2], data), evaluate(tree[3], data)
    if kind == "bits":
        return (a & b) if tree[1] == "&" else (a | b)
    try:
        return _CMP[tree[1]](a, b)
    except TypeError:
        raise Missing(f"{a!r} {tree[1]} {b!r}: not comparable") from None


# -- checks over the probes' records ---------------------------------------------------------
def _complete(probe: dict[str, Any] | None, name: str) -> str | None:
    """Why a probe's stream cannot carry a verdict, or None."""
    if probe is None:
        return f"probe {name} was not armed"
    if probe.get("error"):
        return f"probe {name} failed: {probe['error']}"
    if not probe["hits"]:
        return f"probe {name} never hit"
    if len(probe["hits"]) >= probe.get("max_hits", 0) > 0:
        return (f"probe {name} stopped at max_hits {probe['max_hits']}: the stream is cut "
                "short (raise max_hits, or probe with tracefs)")
    return None


def _invepts(probes: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Each INVEPT that handle_invept handled completely: its type, operand, roots_to_free,
    and guest_mmu before and after."""
    hi, frees = probes.get("handle_invept"), probes.get("invept_free_roots")
    why = _complete(hi, "handle_invept") or _complete(frees, "invept_free_roots")
    if why:
        return [], why
    assert hi is not None and frees is not None
    out = []
    for h in hi["hits"]:
        caps = h["captures"]
        if "return" not in caps or "error" in caps.get("return", {}):
            continue
        inner = [frees["hits"][w["hit"] - 1] for w in h.get("within", [])
                 if w["probe"] == "invept_free_roots" and w["hit"] <= len(frees["hits"])]
        if not inner:
            continue
        c = inner[0]["captures"]["entry"]
        out.append({"type": c["type"], "eptp": c["operand_eptp"], "roots": c["roots_to_free"],
                    "before": caps["entry"]["guest_mmu"], "after": caps["return"]["guest_mmu"]})
    if not out:
        return [], "no handle_invept hit with its return and the roots it freed"
    return out, None


def _roots(gm: dict[str, Any]) -> list[dict[str, Any]]:
    return [gm["current"], *gm["previous"]]


def _named(inv: dict[str, Any], root: dict[str, Any]) -> bool:
    return inv["type"] == INVEPT_GLOBAL or \
        root["pgd"] & EPTP_PA_MASK == inv["eptp"] & EPTP_PA_MASK


def _frees_what_it_names(probes: dict[str, dict[str, Any]]) -> Result:
    name = "invept-frees-what-it-names"
    invs, why = _invepts(probes)
    if why:
        return Result(name, "failed", why)
    stale = [(i, r) for i in invs for r in _roots(i["after"]) if r["valid"] and _named(i, r)]
    saw = {"invepts": len(invs), "stale_roots": len(stale)}
    if stale:
        i, r = stale[0]
        return Result(name, "failed", f"{len(stale)} root(s) L1 invalidated were still valid "
                      f"after the INVEPT; first: type {i['type']}, EPTP {i['eptp']:#x}, root "
                      f"pgd {r['pgd']:#x} hpa {r['hpa']:#x}", saw)
    return Result(name, "passed", f"{len(invs)} INVEPTs left no root they named valid", saw)


def _global_frees_all(probes: dict[str, dict[str, Any]]) -> Result:
    name = "global-invept-frees-all"
    invs, why = _invepts(probes)
    glob = [i for i in invs if i["type"] == INVEPT_GLOBAL]
    if why or not glob:
        return Result(name, "failed", why or "no global INVEPT seen")
    left = [i for i in glob if any(r["valid"] for r in _roots(i["after"]))]
    saw = {"global_invepts": len(glob), "left_a_root": len(left)}
    if left:
        return Result(name, "failed", f"{len(left)} of {len(glob)} global INVEPTs left a "
                      "guest_mmu root valid", saw)
    return Result(name, "passed", f"{len(glob)} global INVEPTs left no root valid", saw)


def _cached_root_path(probes: dict[str, dict[str, Any]]) -> Result:
    name = "cached-root-path-ran"
    invs, why = _invepts(probes)
    if why:
        return Result(name, "failed", why)
    cached = [i for i in invs if i["type"] == INVEPT_SINGLE
              and i["roots"] & ~KVM_MMU_ROOT_CURRENT and i["roots"] != (1 << 64) - 1]
    saw = {"single_context_naming_a_previous_root": len(cached)}
    if not cached:
        return Result(name, "failed", "no single-context INVEPT named a previous (cached) "
                      "root: the cached-root path did not run", saw)
    return Result(name, "passed", f"{len(cached)} single-context INVEPTs named a cached root",
                  saw)


def _ts(hit: dict[str, Any]) -> tuple[float, int]:
    """When a hit happened: L0's trace clock and the record's place in the trace (tracefs),
    else the lab's clock (gdb); one backend per run, so one clock per stream."""
    return float(hit.get("guest_ts", hit["t"])), int(hit.get("seq", 0))


def _l2_runs(probes: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Each stretch of L2 on nested paging (nested VMRUN to the #VMEXIT that ends it) that
    the probes saw whole: its nested CR3 and the syncs of the active guest_mmu inside it. 6.1
    makes nested VMRUN request KVM_REQ_MMU_SYNC whatever L1's TLB_CONTROL says
    (nested_vmcb02_prepare_control; from 6.12 nested_svm_transition_tlb_flush): L1's NPT
    changes reach guest_mmu through that sync, so a VMRUN without one runs L2 on what
    guest_mmu had."""
    exits, syncs = probes.get("nested_svm_vmexit"), probes.get("sync_guest_mmu")
    why = _complete(exits, "nested_svm_vmexit") or _complete(syncs, "sync_guest_mmu")
    if why:
        return [], why
    assert exits is not None and syncs is not None
    runs = []
    for vcpu in sorted({_vcpu(h) for h in exits["hits"]}, key=str):
        runs += _vcpu_runs(sorted((h for h in exits["hits"] if _vcpu(h) == vcpu), key=_ts),
                           sorted((h for h in syncs["hits"] if _vcpu(h) == vcpu), key=_ts))
    if not runs:
        return [], "one #VMEXIT from L2 only: no L2 run between two of them to judge"
    return runs, None


def _vcpu(hit: dict[str, Any]) -> int | None:
    """Which vCPU a hit was on (tracefs says; gdb's records leave it out: one stream)."""
    vcpu: int | None = hit["captures"]["entry"]["guest_mmu"].get("vcpu")
    return vcpu


def _vcpu_runs(ex: list[dict[str, Any]], sy: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One vCPU's L2 runs: between two of its #VMEXITs, the syncs it made."""
    runs, k = [], 0
    for prev, cur in itertools.pairwise(ex):
        while k < len(sy) and _ts(sy[k]) <= _ts(prev):
            k += 1
        inside = []
        while k < len(sy) and _ts(sy[k]) < _ts(cur):
            # A sync counts once it ran to its end (a way out of kvm_mmu_sync_roots was hit):
            # one entered and abandoned synced nothing.
            if "return" in sy[k]["captures"]:
                inside.append(sy[k]["captures"]["entry"])
            k += 1
        entry = cur["captures"]["entry"]
        if not entry["guest_mmu"]["active"]:
            continue  # L1 ran this L2 without nested paging: no guest_mmu to sync
        runs.append({"nested_cr3": entry["nested_cr3"], "syncs": inside, "t": cur["t"],
                     "vcpu": _vcpu(cur)})
    return runs


def _vmrun_syncs(probes: dict[str, dict[str, Any]]) -> Result:
    name = "nested-vmrun-syncs-guest-mmu"
    runs, why = _l2_runs(probes)
    if why:
        return Result(name, "failed", why)
    bare = [r for r in runs if not r["syncs"]]
    switched = [r for before, r in itertools.pairwise(runs)
                if not r["syncs"] and before["vcpu"] == r["vcpu"]
                and before["nested_cr3"] != r["nested_cr3"]]
    saw = {"l2_runs": len(runs), "without_sync": len(bare),
           "without_sync_after_a_nested_cr3_switch": len(switched)}
    if bare:
        return Result(name, "failed", f"{len(bare)} of {len(runs)} L2 runs began without a "
                      f"sync of guest_mmu ({len(switched)} right after L1 switched nested "
                      f"CR3); first: nested CR3 {bare[0]['nested_cr3']:#x} at "
                      f"{bare[0]['t']} s", saw)
    return Result(name, "passed", f"each of {len(runs)} L2 runs began with a sync of "
                  "guest_mmu", saw)


def _cached_ncr3(probes: dict[str, dict[str, Any]]) -> Result:
    """SVM's twin of cached-root-path-ran: an L2 run whose sync found guest_mmu already on
    a valid root for its nested CR3, which was a previous root of the run before (KVM's fast
    switch to a cached root), so the sync of a cached root is something the run exercised."""
    name = "nested-cr3-switch-reused-a-cached-root"
    runs, why = _l2_runs(probes)
    if why:
        return Result(name, "failed", why)
    reused = 0
    for before, r in itertools.pairwise(runs):
        if before["vcpu"] != r["vcpu"] or before["nested_cr3"] == r["nested_cr3"]:
            continue
        gm = r["syncs"][0]["guest_mmu"] if r["syncs"] else None
        if gm and gm["current"]["valid"] and gm["current"]["pgd"] == r["nested_cr3"]:
            reused += 1
    saw = {"l2_runs": len(runs), "switched_to_a_cached_root": reused}
    if not reused:
        return Result(name, "failed", "no L2 run switched to a nested CR3 whose root guest_mmu "
                      "had cached: the cached-root path did not run", saw)
    return Result(name, "passed", f"{reused} L2 runs switched to a cached nested CR3 root",
                  saw)


BUILTIN: dict[str, Callable[[dict[str, dict[str, Any]]], Result]] = {
    "invept-frees-what-it-names": _frees_what_it_names,
    "global-invept-frees-all": _global_frees_all,
    "cached-root-path-ran": _cached_root_path,
    "nested-vmrun-syncs-guest-mmu": _vmrun_syncs,
    "nested-cr3-switch-reused-a-cached-root": _cached_ncr3,
}


@dataclass
class Check:
    name: str
    builtin: str | None = None
    probe: str | None = None
    when: str = "entry"
    expect: str | None = None
    at_least: int = 1

    def run(self, probes: dict[str, dict[str, Any]]) -> Result:
        if self.builtin is not None:
            r = BUILTIN[self.builtin](probes)
            r.name = self.name
            return r
        assert self.probe is not None and self.expect is not None
        p = probes.get(self.probe)
        why = _complete(p, self.probe)
        if why:
            return Result(self.name, "failed", why)
        assert p is not None
        tree = parse(self.expect)
        hits = [h for h in p["hits"] if self.when in h["captures"]]
        bad: list[str] = []
        for h in hits:
            try:
                if not evaluate(tree, h["captures"][self.when]):
                    bad.append(f"hit {h['hit']} at {h['t']} s")
            except Missing as e:
                bad.append(f"hit {h['hit']}: {e} is not in it")
        saw = {"hits": len(hits), "failing": len(bad)}
        if len(hits) < self.at_least:
            return Result(self.name, "failed", f"{len(hits)} hits of {self.probe} at "
                          f"{self.when}, expected at least {self.at_least}", saw)
        if bad:
            return Result(self.name, "failed", f"{len(bad)} of {len(hits)} hits of "
                          f"{self.probe} do not satisfy {self.expect!r}; first: {bad[0]}", saw)
        return Result(self.name, "passed", f"{len(hits)} hits of {self.probe} satisfy "
                      f"{self.expect!r}", saw)


def run_all(checks: list[Check], probes: list[dict[str, Any]]) -> list[Result]:
    by_name = {p["name"]: p for p in probes}
    return [c.run(by_name) for c in checks]


def invalidation_table(probes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Over-invalidation, per INVEPT type: roots freed against roots the operand named.
    Needless frees cost L2 a rebuild of its EPT tables; too few are the bug."""
    invs, why = _invepts({p["name"]: p for p in probes})
    if why:
        return None
    rows: dict[str, dict[str, Any]] = {}
    for i in invs:
        before = [r for r in _roots(i["before"]) if r["valid"]]
        valid_after = {r["hpa"] for r in _roots(i["after"]) if r["valid"]}
        freed = [r for r in before if r["hpa"] not in valid_after]
        named = [r for r in before if _named(i, r)]
        row = rows.setdefault("global" if i["type"] == INVEPT_GLOBAL else "single-context",
                              {"invepts": 0, "freed": 0, "matched": 0, "needless": 0,
                               "missed": 0})
        row["invepts"] += 1
        row["freed"] += len(freed)
        row["matched"] += len(named)
        row["needless"] += len([r for r in freed if not _named(i, r)])
        row["missed"] += len([r for r in named if r["hpa"] in valid_after])
    for row in rows.values():
        row["ratio"] = round(row["freed"] / row["matched"], 2) if row["matched"] else None
    return rows


def load(items: list[Any], probe_names: set[str]) -> list[Check]:
    """The playbook's `checks`, validated (schema in lab/playbook.py)."""
    out = []
    for i, c in enumerate(items or []):
        if c["builtin"]:
            if c["probe"] or c["expect"]:
                raise UsageError(f"{c.where('builtin')}: checks[{i}]: a builtin check takes "
                                 "no `probe` or `expect`")
            out.append(Check(c["name"] or c["builtin"], builtin=c["builtin"]))
            continue
        if not (c["probe"] and c["expect"]):
            raise UsageError(f"{c.where()}: checks[{i}]: expected `builtin`, or `probe` and "
                             "`expect`")
        if c["probe"] not in probe_names:
            raise UsageError(f"{c.where('probe')}: checks[{i}].probe: no probe "
                             f"{c['probe']!r} (expected one of {', '.join(sorted(probe_names))})")
        try:
            parse(c["expect"])
        except ValueError as e:
            raise UsageError(f"{c.where('expect')}: checks[{i}].expect: {e}") from None
        out.append(Check(c["name"] or f"{c['probe']}: {c['expect']}", probe=c["probe"],
                         when=c["when"], expect=c["expect"], at_least=c["at_least"]))
    names = [c.name for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"checks: duplicate name(s): {', '.join(sorted(dup))}")
    return out
