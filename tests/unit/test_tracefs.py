"""The tracing backend's pieces that need no guest: event lines, trace parsing, assembly."""

from __future__ import annotations

import json
from pathlib import Path

from lab.probes.spec import INVALID_PAGE, ProbeSpec, builtin_set
from lab.probes.tracefs import TraceProbes, assemble, event_line, parse_trace

# Offsets as gdb computed them for Debian 6.1.0-56.
COMPILED = {
    "name": "exits", "module": "kvm_amd", "error": None,
    "captures": {
        "nested_cr3": {"kind": "value", "fetch": {"v": "+0x1af0(%di):x64"}},
        "roots": {"kind": "guest_mmu", "guest_mmu_offset": 0x428, "extra": 0, "prev": 1,
                  "fetch": {"cur_hpa": "+0x468(%di):x64", "cur_pgd": "+0x460(%di):x64",
                            "p0_pgd": "+0x480(%di):x64", "p0_hpa": "+0x488(%di):x64",
                            "mmu": "+0x2a0(%di):x64", "vcpu": "%di:x64"}},
    },
}

# A line of /sys/kernel/tracing/trace from a real run (one prev root kept for brevity).
TRACE = """\
# tracer: nop
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
    svm-npt-test-140     [000] d..1.     4.890783: exits: (nested_svm_vmexit+0x0/0x4d0 [kvm_amd]) \
nested_cr3__v=0xc000 roots__cur_hpa=0x6b55000 roots__cur_pgd=0xc000 roots__p0_pgd=0x8000 \
roots__p0_hpa=0x6b5b000 roots__mmu=0xff11000005b83ef8 roots__vcpu=0xff11000005b83ad0
"""


def test_event_line() -> None:
    line = event_line(COMPILED, "nested_svm_vmexit")
    assert line.startswith("p:lab/exits kvm_amd:nested_svm_vmexit ")
    assert "nested_cr3__v=+0x1af0(%di):x64" in line and "roots__vcpu=%di:x64" in line


def test_parse_and_assemble() -> None:
    recs = parse_trace(TRACE)
    assert len(recs) == 1 and recs[0]["event"] == "exits" and recs[0]["ts"] == 4.890783
    caps = assemble(COMPILED["captures"], recs[0]["fields"])
    assert caps["nested_cr3"] == 0xC000
    roots = caps["roots"]
    assert roots["current"] == {"pgd": 0xC000, "hpa": 0x6B55000, "valid": True}
    assert roots["previous"] == [{"pgd": 0x8000, "hpa": 0x6B5B000, "valid": True}]
    # mmu == vcpu + offsetof(arch.guest_mmu): 0x...3ad0 + 0x428 == 0x...3ef8
    assert roots["active"] is True


def test_invalid_roots() -> None:
    fields = {f"roots__{k}": INVALID_PAGE for k in ("cur_hpa", "p0_pgd", "p0_hpa")}
    fields.update(roots__cur_pgd=0, roots__mmu=1, roots__vcpu=0, nested_cr3__v=0)
    roots = assemble(COMPILED["captures"], fields)["roots"]
    assert roots["current"]["valid"] is False and roots["active"] is False


# -- entries, ways out and calls: a recorded run of invept-vmx (Bochs L0, Debian 6.1.0-56) ------
DATA = Path(__file__).resolve().parents[1] / "data"


def recorded_probes() -> TraceProbes:
    specs = builtin_set("invalidation", "intel")
    compiled = json.loads((DATA / "tracefs-invept-compiled.json").read_text())
    tp = TraceProbes(None, specs, compiled, t0=0.0)  # type: ignore[arg-type]
    tp.parse((DATA / "tracefs-invept.trace").read_text())
    return tp


def test_compiled_sites_are_entry_return_and_call() -> None:
    tp = recorded_probes()
    lines = tp.lines
    assert lines["handle_invept"].startswith("p:lab/handle_invept kvm_intel:handle_invept ")
    # the way out, where vcpu is in %rbx (DWARF) and the frame still allocated (CFI)
    assert "kvm_intel:handle_invept+0x92 " in lines["handle_invept_1"]
    assert "guest_mmu__cur_hpa=+0x468(%bx):x64" in lines["handle_invept_1"]
    # the call of kvm_mmu_free_roots: its argument in %dx, handle_invept's locals beside it
    free = lines["invept_free_roots"]
    assert "kvm_intel:handle_invept+0x2e3 " in free
    assert "roots_to_free__v=%dx:x64" in free and "type__v=%bp:x64" in free
    assert "operand_eptp__v=+0x10(%sp):x64" in free


def test_entries_pair_with_their_return_and_list_inner_hits() -> None:
    res = {p["name"]: p for p in recorded_probes().results()}
    hi, frees = res["handle_invept"]["hits"], res["invept_free_roots"]["hits"]
    # The sample starts with a way out whose entry is not in it (ignored) and ends with an
    # entry whose way out is not (no return capture).
    assert len(hi) == 8 and len(frees) == 8
    assert [("return" in h["captures"]) for h in hi] == [True] * 7 + [False]
    assert [w for h in hi for w in h["within"]] == [
        {"probe": "invept_free_roots", "hit": n} for n in range(1, 9)]
    single, glob = frees[0]["captures"]["entry"], frees[5]["captures"]["entry"]
    assert single["type"] == 1 and single["roots_to_free"] == 1 and single["operand_eptp"] == 0x801E
    assert glob["type"] == 2 and glob["roots_to_free"] == INVALID_PAGE  # KVM_MMU_ROOTS_ALL
    # the root the single-context INVEPT named is gone on return
    before = hi[0]["captures"]["entry"]["guest_mmu"]["current"]
    after = hi[0]["captures"]["return"]["guest_mmu"]["current"]
    assert before["valid"] and before["pgd"] == 0x801E and not after["valid"]
    assert hi[0]["return_site"] == "handle_invept+0x92"


def test_a_condition_becomes_fetched_fields_and_a_filter() -> None:
    compiled = {"name": "one", "module": "kvm_amd", "error": None, "captures": {},
                "sites": [{"func": "nested_svm_vmexit", "offset": 0, "when": "entry",
                           "captures": COMPILED["captures"],
                           "if_fetch": {"if0": "+0x1af0(%di):x64"},
                           "filter": "if0 == 0xc000"}]}
    line = event_line(compiled, "nested_svm_vmexit")
    assert line.startswith("p:lab/one kvm_amd:nested_svm_vmexit if0=+0x1af0(%di):x64 ")
    tp = TraceProbes(None, [ProbeSpec("one", "nested_svm_vmexit")], [compiled],  # type: ignore[arg-type]
                     t0=0.0)
    assert tp.events["one"][1]["filter"] == "if0 == 0xc000"
