"""The GDB/MI session and the probes, replayed from the transcript of a real run
(tests/data/gdb-svm-probes.log: `lab run playbooks/invept.yaml` on tcg-svm, Debian 6.1)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from lab.gdb import GdbSession, add_symbol_file_command
from lab.probes import (
    GdbProbes,
    GuestMmuCapture,
    MmuLayout,
    builtin_set,
    compile_capture,
    rewrite_args,
)


class Replay:
    """Stands in for pygdbmi's GdbController: answers each command with what gdb answered."""

    def __init__(self, path: Path) -> None:
        self.entries: list[tuple[str, Any]] = []
        for line in path.read_text().splitlines():
            _, kind, payload = line.split(" ", 2)
            if kind in (">", "<"):
                self.entries.append((kind, json.loads(payload)))
        self.pos = 0

    def write(self, command: str, read_response: bool = False) -> None:
        kind, recorded = self.entries[self.pos]
        assert kind == ">", f"transcript expects gdb output, not {command!r}"
        # Same token and MI command; paths and ports differ between runs.
        assert command.split()[0] == recorded.split()[0], (command, recorded)
        self.pos += 1

    def get_gdb_response(self, timeout_sec: float = 1,
                         raise_error_on_timeout: bool = True) -> list[dict[str, Any]]:
        out = []
        while self.pos < len(self.entries) and self.entries[self.pos][0] == "<":
            out.append(self.entries[self.pos][1])
            self.pos += 1
        return out

    def exit(self) -> None:
        pass


@pytest.fixture
def transcript(data: Path) -> Path:
    return data / "gdb-svm-probes.log"


def test_session_keeps_stopped_that_arrives_before_the_result(transcript: Path,
                                                             tmp_path: Path) -> None:
    s = GdbSession(tmp_path / "gdb.log", controller=Replay(transcript))
    s.load_kernel(Path("vmlinux"))
    # In this transcript *stopped comes before ^connected: it must not be lost.
    st = s.attach("127.0.0.1:1")
    assert st is not None and st["payload"]["frame"]["func"] == "native_safe_halt"
    s.close()
    assert "native_safe_halt" in (tmp_path / "gdb.log").read_text()


def test_probes_replayed_capture_guest_mmu(transcript: Path, tmp_path: Path) -> None:
    s = GdbSession(tmp_path / "gdb.log", controller=Replay(transcript))
    s.load_kernel(Path("vmlinux"))
    s.attach("127.0.0.1:1")
    for _ in range(3):  # irqbypass, kvm, kvm_amd
        s.add_module(Path("m.ko"), {".text": 0x1000}, set())
    probes = GdbProbes(s, builtin_set("invalidation", "amd"), time.monotonic(), log=lambda m: None)
    probes.start()
    deadline = time.monotonic() + 20
    while not probes.detached and time.monotonic() < deadline:
        time.sleep(0.01)
    probes.stop()
    assert probes.error is None
    res = {p["name"]: p for p in probes.results()}
    exits = res["nested_svm_vmexit"]["hits"]
    assert len(exits) == 5
    for h in exits:
        cap = h["captures"]["entry"]
        gm = cap["guest_mmu"]
        assert gm["active"] is True and gm["current"]["valid"] is True
        assert gm["current"]["pgd"] == cap["nested_cr3"]  # the shadow of L1's nested CR3
        assert len(gm["previous"]) == 3
        assert all(p["valid"] is False for p in gm["previous"])
    syncs = res["sync_guest_mmu"]["hits"]
    assert len(syncs) == 5 and all("return" in h["captures"] for h in syncs)
    assert res["sync_guest_mmu"]["condition"] == "vcpu->arch.mmu == &vcpu->arch.guest_mmu"


def test_layout_detection_on_recorded_ptype(transcript: Path) -> None:
    text = transcript.read_text()
    consoles = [json.loads(ln.split(" ", 2)[2]) for ln in text.splitlines() if " < " in ln]
    payloads = "".join(r["payload"] for r in consoles
                       if r.get("type") == "console" and r.get("payload"))
    kvm_mmu = payloads[payloads.index("type = struct kvm_mmu {"):]
    info = payloads[payloads.index("type = struct kvm_mmu_root_info {"):]
    assert MmuLayout.from_ptype(kvm_mmu, info) == MmuLayout("root", "pgd")


def test_layouts_of_older_kernels() -> None:
    v57 = "type = struct kvm_mmu {\n    hpa_t root_hpa;\n    unsigned long root_cr3;\n}"
    v58 = "type = struct kvm_mmu {\n    hpa_t root_hpa;\n    gpa_t root_pgd;\n}"
    info_old = "type = struct kvm_mmu_root_info {\n    unsigned long cr3;\n    hpa_t hpa;\n}"
    info_new = "type = struct kvm_mmu_root_info {\n    gpa_t pgd;\n    hpa_t hpa;\n}"
    l57 = MmuLayout.from_ptype(v57, info_old)
    l58 = MmuLayout.from_ptype(v58, info_new)
    assert l57 == MmuLayout("split", "root_cr3") and l58 == MmuLayout("split", "root_pgd")
    cap = GuestMmuCapture("g", "vcpu")
    assert cap.exprs(l57)[1] == "(vcpu)->arch.guest_mmu.root_cr3"
    got = cap.assemble([(True, "4096"), (True, "32768"),
                        (True, "{{cr3 = 1, hpa = 18446744073709551615}}"), (True, "0")], l57)
    assert got == {"current": {"pgd": 32768, "hpa": 4096, "valid": True},
                   "previous": [{"pgd": 1, "hpa": 2**64 - 1, "valid": False}], "active": False}


def test_capture_compilation_and_arg_rewrite() -> None:
    assert isinstance(compile_capture("g", "guest_mmu(&svm->vcpu)"), GuestMmuCapture)
    assert rewrite_args("vcpu->arch.mmu == &vcpu->arch.guest_mmu", ["vcpu"]) == \
        "$vcpu->arch.mmu == &$vcpu->arch.guest_mmu"
    assert rewrite_args("svm->vcpu.arch", ["vcpu"]) == "svm->vcpu.arch"  # a field, not the arg


def test_add_symbol_file_leaves_init_sections_out() -> None:
    cmd = add_symbol_file_command(Path("/d/kvm.ko"),
                                  {".text": 0x10, ".data": 0x20, ".init.text": 0x30,
                                   ".bss": 0x40, ".note.gnu": 0x50},
                                  {".text", ".data", ".init.text", ".bss"})
    assert cmd == "add-symbol-file /d/kvm.ko 0x10 -s .bss 0x40 -s .data 0x20"
