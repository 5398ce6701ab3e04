"""What the probes and the injection read from each kernel, recorded from the Debian kernels'
own debug info (tests/data/layouts: gdb's `ptype` and `disassemble /r` of 5.10, 6.1, 6.12 and
7.x): guest_mmu's layout, and where KVM_REQ_MMU_SYNC is made on nested VMRUN."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lab import inject
from lab.gdb import GdbError
from lab.probes.gdb import MmuLayout

DATA = Path(__file__).resolve().parents[1] / "data" / "layouts"


def _ptypes(release: str) -> tuple[str, str]:
    text = (DATA / f"ptype-kvm_mmu-{release}.txt").read_text()
    mmu, _, info = text.partition("type = struct kvm_mmu_root_info")
    return mmu, info


@pytest.mark.parametrize("release,current,pgd", [
    ("5.10.0-32-cloud-amd64", "split", "root_pgd"),
    ("6.1.0-57-cloud-amd64", "root", "pgd"),
    ("6.12.118+deb13-cloud-amd64", "root", "pgd"),
    ("7.2.13+deb14-cloud-amd64", "root", "pgd"),
])
def test_guest_mmu_layout_of_each_series(release: str, current: str, pgd: str) -> None:
    layout = MmuLayout.from_ptype(*_ptypes(release))
    assert (layout.current, layout.pgd_field) == (current, pgd)


class RecordedGdb:
    """Answers the injection's questions from a recorded `disassemble /r` of kvm-amd.ko."""

    def __init__(self, release: str) -> None:
        self.text = (DATA / f"disasm-nested-svm-{release}.txt").read_text()

    def evaluate(self, exprs: list[str]) -> list[tuple[bool, str]]:
        assert "->requests" in exprs[0]
        return [(True, re.search(r"^\$1 = (\d+)", self.text, re.M).group(1))]  # type: ignore[union-attr]

    def cmd(self, command: str, timeout: float = 60) -> tuple[dict[str, Any], list[str]]:
        fn = re.search(r"-a (\w+) ", command).group(1)  # type: ignore[union-attr]
        m = re.search(rf"Dump of assembler code for function {fn}:\n(.*?)End of", self.text,
                      re.S)
        if m is None:
            raise GdbError(f'gdb: {command}: No symbol "{fn}" in current context.')
        insns = []
        for line in m.group(1).splitlines():
            parts = re.match(r"\s*(0x[0-9a-f]+) <\+\d+>:\t([0-9a-f ]+)\t(.*)$", line)
            if parts:
                insns.append({"address": parts.group(1), "opcodes": parts.group(2).strip(),
                              "inst": parts.group(3)})
        return {"payload": {"asm_insns": insns}}, []


@pytest.mark.parametrize("release,function", [
    # no nested_vmcb02_prepare_control: kvm_init_shadow_npt_mmu's helper makes the request
    ("5.10.0-32-cloud-amd64", "__kvm_mmu_new_pgd"),
    ("6.1.0-57-cloud-amd64", "nested_vmcb02_prepare_control"),
    ("6.12.118+deb13-cloud-amd64", "nested_svm_transition_tlb_flush"),  # moved into a helper
    ("7.2.13+deb14-cloud-amd64", "nested_vmcb02_prepare_control"),  # and back, inlined
])
def test_the_mmu_sync_request_is_found_where_each_kernel_makes_it(release: str,
                                                                   function: str) -> None:
    patches = inject.INJECTIONS["skip-nested-mmu-sync"].locate(RecordedGdb(release))  # type: ignore[arg-type]
    assert len(patches) == 1 and patches[0].function == function
    p = patches[0]
    assert re.fullmatch(r"(lock|ds) orb \$0x8,0x39\(%r\w+\)", p.instruction), p.instruction
    assert p.original[:2] in ("f0", "3e") and p.replacement == inject.NOP5


def test_a_kernel_without_the_function_is_refused_not_patched() -> None:
    gdb = RecordedGdb("6.1.0-57-cloud-amd64")
    gdb.text = gdb.text.replace("nested_vmcb02_prepare_control", "nested_prepare_vmcb_control")
    with pytest.raises(inject.InjectionError, match="none of nested_vmcb02_prepare_control, "
                       "kvm_init_shadow_npt_mmu is in this kernel"):
        inject.INJECTIONS["skip-nested-mmu-sync"].locate(gdb)  # type: ignore[arg-type]
