"""Kernel events on consoles: detection, parsing, grouping, expectations, decoding, verdict."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lab import events
from lab.console import Console
from lab.decode import Symbols, decode
from lab.events import Event, Expected, detect
from lab.report import Report

WARN = ("[  364.202117] WARNING: CPU: 0 PID: 250 at arch/x86/kvm/vmx/nested.c:4792 "
        "nested_vmx_vmexit+0xd27/0x1880 [kvm_intel]")


@pytest.mark.parametrize("line,kind", [
    ("[ 202.4] watchdog: BUG: soft lockup - CPU#0 stuck for 34s! [qemu-system-x86:250]",
     "soft lockup"),
    ("[ 9.1] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1", "hard lockup"),
    ("[ 9.1] rcu: INFO: rcu_preempt self-detected stall on CPU", "RCU stall"),
    ("[ 9.1] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:", "RCU stall"),
    ("[ 9.1] INFO: task kworker/0:1:33 blocked for more than 120 seconds.", "hung task"),
    ("[ 9.1] UBSAN: shift-out-of-bounds in arch/x86/kvm/mmu/mmu.c:99:5", "UBSAN"),
    ("[ 9.1] kernel BUG at mm/slub.c:435!", "BUG"),
    ("[ 9.1] WARNING: arch/x86/kvm/vmx/nested.c:4792 at nested_vmx_vmexit+0xd27/0x1880, "
     "CPU#0: qemu/250", "WARNING"),
    (WARN, "WARNING"),
])
def test_every_kind_is_detected(line: str, kind: str) -> None:
    assert detect(line) == kind


def test_a_warning_line_is_parsed_into_place_and_module() -> None:
    ev = events.parse("l0", "WARNING", 364.2, WARN)
    assert ev.file_line == "arch/x86/kvm/vmx/nested.c:4792"
    assert ev.function == "nested_vmx_vmexit+0xd27/0x1880" and ev.module == "kvm_intel"
    assert ev.line.startswith("WARNING: CPU: 0") and not ev.fatal
    assert ev.summary() == "WARNING: kvm_intel: nested.c:4792 in nested_vmx_vmexit"


def _feed(tmp_path: Path, text: str, accept: object = None) -> tuple[Console, list[Event]]:
    a, b = socket.socketpair()
    con = Console("l0", tmp_path / "l0.console.log")
    if accept is not None:
        con.accept = accept  # type: ignore[assignment]
    seen: list[Event] = []
    con.on_event(lambda c, ev: seen.append(ev))
    con._start(a)
    b.sendall(text.encode())
    b.close()
    con.settle(quiet=0.3, limit=5)
    deadline = time.monotonic() + 5
    while not con.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    return con, seen


def test_every_event_of_the_issues_console_is_recorded(tmp_path: Path, data: Path) -> None:
    # The console of issue 17 (lines as it quotes them): one lockup, then two WARNINGs. The
    # lab used to record the first only, and a `lab up` session's report said "passed".
    con, seen = _feed(tmp_path, (data / "console-l0-kvm-bug-on.log").read_text())
    assert [(e.kind, e.file_line) for e in seen] == [
        ("soft lockup", None), ("WARNING", "arch/x86/kvm/vmx/nested.c:4792"),
        ("WARNING", "arch/x86/kvm/vmx/vmx.c:6378")]
    assert con.crash is not None and con.crash.kind == "soft lockup"
    done = con.complete_events(settled=0)
    assert len(done) == 3
    assert seen[0].function == "vmx_vmexit+0x0/0x7" and seen[0].module == "kvm_intel"  # RIP
    assert "Call Trace:" in seen[0].excerpt
    con.close()


def test_a_bug_and_its_oops_are_one_event(tmp_path: Path) -> None:
    con, seen = _feed(tmp_path, "\n".join([
        "[ 5.1] BUG: kernel NULL pointer dereference, address: 0000000000000000",
        "[ 5.1] #PF: supervisor write access in kernel mode",
        "[ 5.1] Oops: 0002 [#1] PREEMPT SMP NOPTI",
        "[ 5.1] RIP: 0010:lab_crash+0x5/0x10 [lab_warn]",
        "[ 5.1] ---[ end trace 0000000000000000 ]---",
        "[ 5.2] Kernel panic - not syncing: Fatal exception", ""]))
    assert [e.kind for e in seen] == ["BUG", "panic"]
    con.complete_events(settled=0)
    assert seen[0].function == "lab_crash+0x5/0x10" and seen[0].fatal
    con.close()


def test_an_expected_event_is_recorded_but_is_no_crash(tmp_path: Path) -> None:
    exp = Expected("WARNING", "l0", "nested.c:4792")
    con, seen = _feed(tmp_path, WARN + "\n", accept=exp.matches)
    assert len(seen) == 1 and con.crash is None
    assert not Expected("WARNING", "l1").matches(seen[0])
    assert not Expected("WARNING", None, "mmu.c").matches(seen[0])
    assert Expected("WARNING", None, "kvm_intel").matches(seen[0])
    con.close()


def test_a_report_with_an_unexpected_event_is_an_error_never_passed() -> None:
    ev = events.parse("l1", "WARNING", 3.0, WARN)
    r = Report(playbook="p.yaml", name="p", run_dir="/r", events=[ev.to_dict()])
    r.finish()
    assert r.status == "error" and r.exit_status == 3
    assert r.error is not None and r.error["kind"] == "kernel-event"
    assert "l1: kernel event: WARNING: kvm_intel: nested.c:4792" in r.error["message"]
    ev.expected, ev.expected_by = True, "playbook"
    ok = Report(playbook="p.yaml", name="p", run_dir="/r", events=[ev.to_dict()])
    ok.finish()
    assert ok.status == "passed"


@pytest.mark.skipif(shutil.which("gdb") is None or shutil.which("gcc") is None,
                    reason="needs gdb and gcc")
def test_decoding_resolves_function_offset_to_file_line_and_source(tmp_path: Path) -> None:
    src = tmp_path / "warn.c"
    src.write_text("int g;\n\nint lab_fire(int x)\n{\n\tif (x > 3)\n\t\tg = x * 7;\n"
                   "\treturn g;\n}\n")
    obj = tmp_path / "warn.o"
    subprocess.run(["gcc", "-O0", "-g", "-c", str(src), "-o", str(obj)], check=True)
    ev = Event("l0", "WARNING", 1.0, "WARNING: ...", function="lab_fire+0x10/0x30")
    other = Event("l2", "WARNING", 1.0, "WARNING: ...", function="nowhere+0x1/0x2",
                  module="nosuch")
    decode([ev, other], Symbols(vmlinux=obj, module_root=None))
    assert ev.decoded is not None
    path, line = ev.decoded["file_line"].rsplit(":", 1)
    assert path == str(src) and int(line) in (5, 6)  # the `if` or the store, by -O0 code
    assert ev.decoded["source"] == src.read_text().splitlines()[int(line) - 1].strip()
    assert ev.summary() == f"WARNING: warn.c:{line} {ev.decoded['source']} in lab_fire"
    assert other.decoded == {"error": "no debug object for nosuch"}


def _playbook(tmp_path: Path, root: Path, body: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(f"name: p\ntopology:\n  l0: {{image: {root}/images/default.yaml, memory: 2048}}\n"
                 f"  l1: {{image: {root}/images/default.yaml}}\n" + body)
    return p


def test_playbook_and_step_expectations_are_read_and_checked(tmp_path: Path,
                                                             root: Path) -> None:
    from lab import playbook
    from lab.errors import UsageError

    pb = playbook.load(_playbook(tmp_path, root, """\
expect_events: [{kind: WARNING, level: l1, match: xstate.c}]
steps:
  - name: warn on purpose
    run: insmod /root/lab_warn.ko
    expect_events: [{kind: WARNING, match: lab_warn}]
"""))
    assert pb.expect_events == [Expected("WARNING", "l1", "xstate.c")]
    assert pb.steps[0].expect_events == [Expected("WARNING", None, "lab_warn")]
    with pytest.raises(UsageError, match=r"p.yaml:\d+: expect_events\[0\].level: level l2 is "
                                         r"not in the topology"):
        playbook.load(_playbook(tmp_path, root, "expect_events: [{kind: WARNING, level: l2}]\n"))
    with pytest.raises(UsageError, match=r"kind: expected one of .*WARNING"):
        playbook.load(_playbook(tmp_path, root, "expect_events: [{kind: warning}]\n"))


def test_a_step_fails_when_its_expected_event_does_not_come(tmp_path: Path, root: Path) -> None:
    from lab import playbook, steps
    from lab.watch import Watch

    pb = playbook.load(_playbook(tmp_path, root, """\
steps:
  - name: warn on purpose
    run: insmod /root/lab_warn.ko
    expect_events: [{kind: WARNING, match: lab_warn}]
"""))
    step = pb.steps[0]
    w = Watch(pb, t0=0.0)
    warn = events.parse("l0", "WARNING", 1.0, "WARNING: CPU: 0 PID: 9 at lab_warn.c:16 "
                                                "lab_warn_fire+0xe/0x20 [lab_warn]")
    assert not w._accept(warn)  # no step running: nobody expected it
    w.step = step
    assert w._accept(warn) and warn.expected_by == "warn on purpose"
    assert w.missing(step) == [Expected("WARNING", None, "lab_warn")]  # not recorded yet
    w.events.append(warn)
    assert w.missing(step) == []
    v = steps.verdict(step, 0, "", ["WARNING matching 'lab_warn'"])
    assert v.status == "failed" and "did not come: WARNING matching 'lab_warn'" in v.message
    assert steps.verdict(step, 0, "", []).status == "passed"


def test_levels_under_a_crashed_one_are_crashed(tmp_path: Path, root: Path) -> None:
    from lab import playbook
    from lab.watch import Watch

    pb = playbook.load(_playbook(tmp_path, root, ""))
    w = Watch(pb, t0=0.0)
    w.events.append(events.parse("l1", "WARNING", 1.0, WARN))
    assert w.level_states(["l0", "l1", "l2"]) == {"l0": "up", "l1": "up", "l2": "up"}
    w.events.append(events.parse("l1", "panic", 2.0, "Kernel panic - not syncing: oops"))
    assert w.level_states(["l0", "l1", "l2"]) == {"l0": "up", "l1": "crashed", "l2": "crashed"}
