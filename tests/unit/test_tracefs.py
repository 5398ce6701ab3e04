"""The tracing backend's pieces that need no guest: event lines, trace parsing, assembly."""

from __future__ import annotations

from lab.probes import INVALID_PAGE
from lab.tracefs import assemble, event_line, parse_trace

# Offsets as gdb computed them for Debian 6.1.0-56 (FACTS.md lists the same).
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
    caps = assemble(COMPILED, recs[0]["fields"])
    assert caps["nested_cr3"] == 0xC000
    roots = caps["roots"]
    assert roots["current"] == {"pgd": 0xC000, "hpa": 0x6B55000, "valid": True}
    assert roots["previous"] == [{"pgd": 0x8000, "hpa": 0x6B5B000, "valid": True}]
    # mmu == vcpu + offsetof(arch.guest_mmu): 0x...3ad0 + 0x428 == 0x...3ef8
    assert roots["active"] is True


def test_invalid_roots() -> None:
    fields = {f"roots__{k}": INVALID_PAGE for k in ("cur_hpa", "p0_pgd", "p0_hpa")}
    fields.update(roots__cur_pgd=0, roots__mmu=1, roots__vcpu=0, nested_cr3__v=0)
    roots = assemble(COMPILED, fields)["roots"]
    assert roots["current"]["valid"] is False and roots["active"] is False
