"""The GDB/MI session and the probes, replayed from the transcript of a real run
(tests/data/gdb-svm-probes.log: `lab run playbooks/invept.yaml` on tcg-svm, Debian 6.1)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from lab.gdb import GdbSession, add_symbol_file_command
from lab.probes.gdb import (
    GdbProbes,
    GuestMmuCapture,
    MmuLayout,
    compile_capture,
    rewrite_args,
)
from lab.probes.spec import builtin_set, parse_capture


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
    probes = GdbProbes(s, builtin_set("invalidation", "amd"), time.monotonic())
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
    assert res["sync_guest_mmu"]["condition"] == "(vcpu)->arch.mmu == &(vcpu)->arch.guest_mmu"


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
    assert got == {"kind": "guest_mmu", "current": {"pgd": 32768, "hpa": 4096, "valid": True},
                   "previous": [{"pgd": 1, "hpa": 2**64 - 1, "valid": False}], "active": False}


def test_capture_compilation_and_arg_rewrite() -> None:
    assert isinstance(compile_capture("g", parse_capture("guest_mmu(&svm->vcpu)")), GuestMmuCapture)
    assert rewrite_args("vcpu->arch.mmu == &vcpu->arch.guest_mmu", ["vcpu"]) == \
        "$vcpu->arch.mmu == &$vcpu->arch.guest_mmu"
    assert rewrite_args("svm->vcpu.arch", ["vcpu"]) == "svm->vcpu.arch"  # a field, not the arg


def test_add_symbol_file_leaves_init_sections_out() -> None:
    cmd = add_symbol_file_command(Path("/d/kvm.ko"),
                                  {".text": 0x10, ".data": 0x20, ".init.text": 0x30,
                                   ".bss": 0x40, ".note.gnu": 0x50},
                                  {".text", ".data", ".init.text", ".bss"})
    assert cmd == "add-symbol-file /d/kvm.ko 0x10 -s .bss 0x40 -s .data 0x20"


class Scripted:
    """A gdb that answers by command kind, stopping the target at scripted places: for the
    race where `finish` is cut short by another breakpoint (seen in a real CI run)."""

    def __init__(self, stops: list[dict[str, Any]]) -> None:
        self.stops = stops
        self.out: list[dict[str, Any]] = []
        self.commands: list[str] = []
        self.running = False

    def _res(self, tok: str, msg: str = "done", payload: Any = None) -> None:
        self.out.append({"type": "result", "message": msg, "payload": payload,
                         "token": int(tok), "stream": "stdout"})

    def _go(self, tok: str) -> None:
        if self.running:
            self._res(tok, "error", {"msg": "Cannot execute this command while the selected "
                                            "thread is running."})
            return
        self._res(tok, "running")
        self.out.append({"type": "notify", "message": "running", "payload": {}, "token": None})
        self.running = True
        if self.stops:
            self.out.append({"type": "notify", "message": "stopped",
                             "payload": self.stops.pop(0), "token": None})
            self.running = False

    def _console(self, text: str) -> None:
        self.out.append({"type": "console", "message": None, "payload": text, "token": None})

    def write(self, command: str, read_response: bool = False) -> None:
        import base64
        import re

        tok, cmd = re.match(r"(\d+)(.*)", command).groups()  # type: ignore[union-attr]
        self.commands.append(cmd)
        if cmd.startswith(("-exec-continue", "-exec-finish")):
            self._go(tok)
            return
        if "_lab_eval" in cmd:
            b64 = re.search(r'_lab_eval\(\\"([A-Za-z0-9+/=]+)\\"', cmd).group(1)  # type: ignore[union-attr]
            exprs = json.loads(base64.b64decode(b64))
            self._console("LAB-EVAL " + json.dumps([[True, "1"]] * len(exprs)) + "\n")
        elif "_lab_save_args" in cmd:
            self._console('LAB-ARGS ["vcpu"]\n')
        elif cmd.startswith("-break-insert"):
            n = sum(c.startswith("-break-insert") for c in self.commands)
            self._res(tok, payload={"bkpt": {"number": str(n), "func": "f", "file": "x.c",
                                             "line": "1"}})
            return
        elif cmd.startswith("-exec-interrupt"):
            self._res(tok)
            self.out.append({"type": "notify", "message": "stopped",
                             "payload": {"reason": "signal-received"}, "token": None})
            self.running = False
            return
        self._res(tok)

    def get_gdb_response(self, timeout_sec: float = 1,
                         raise_error_on_timeout: bool = True) -> list[dict[str, Any]]:
        out, self.out = self.out, []
        if not out:
            time.sleep(min(timeout_sec, 0.01))
        return out

    def exit(self) -> None:
        pass


def _hit(n: str) -> dict[str, Any]:
    return {"reason": "breakpoint-hit", "bkptno": n, "frame": {"func": f"f{n}", "addr": "0x10"}}


def test_finish_cut_short_by_another_breakpoint(tmp_path: Path) -> None:
    from lab.probes.spec import ProbeSpec

    gdb = Scripted([_hit("1"), _hit("2"), _hit("1"),
                    {"reason": "function-finished", "frame": {"func": "caller"}}])
    s = GdbSession(tmp_path / "gdb.log", controller=gdb)
    specs = [ProbeSpec("with-return", "f1", captures={"x": "vcpu->x"},
                       when=["entry", "return"], max_hits=2),
             ProbeSpec("entry-only", "f2", captures={"y": "y"}, max_hits=1)]
    probes = GdbProbes(s, specs, time.monotonic())
    probes.start()
    deadline = time.monotonic() + 10
    while not probes.detached and time.monotonic() < deadline:
        time.sleep(0.01)
    probes.stop()
    assert probes.error is None, probes.error
    # After the finish that stopped at f2, the next command must handle f2, not continue.
    i = gdb.commands.index("-exec-finish")
    assert not gdb.commands[i + 1].startswith("-exec-continue")
    res = {p["name"]: p["hits"] for p in probes.results()}
    assert "error" in res["with-return"][0]["captures"]["return"]
    assert res["with-return"][1]["captures"]["return"] == {"x": 1}
    assert len(res["entry-only"]) == 1


def test_gdb_refuses_a_command_that_would_start_another(tmp_path: Path) -> None:
    """A newline ends an MI command: whatever builds the command, nothing after it runs."""
    import pytest

    from lab.gdb import GdbError, GdbSession

    g = GdbSession(tmp_path / "gdb.log")
    try:
        for bad in ("-break-insert foo\nshell touch /tmp/x", "print 1\rshell id", "p 1\x00"):
            with pytest.raises(GdbError):
                g.cmd(bad)
        assert "gdb-ok" in g.console("echo gdb-ok\\n")
    finally:
        g.close()
