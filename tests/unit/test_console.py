"""Console crash detection, on consoles recorded from real lab runs."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from lab.console import Console, ConsoleTimeout
from lab.errors import GuestCrash, VMDied
from lab.events import detect as classify

PANIC = """\
[   12.001] sysrq: Trigger a crash
[   12.002] Kernel panic - not syncing: sysrq triggered crash
[   12.003] CPU: 0 PID: 91 Comm: sh Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2
[   12.004] Call Trace:
"""


def test_recorded_clean_consoles_have_no_crash(data: Path) -> None:
    for name in ("console-l0-clean.log", "console-l2-clean.log"):
        text = (data / name).read_text(errors="replace")
        assert "LAB-INIT: ready" in text
        assert [ln for ln in text.splitlines() if classify(ln)] == []


def test_recorded_warning_is_detected(data: Path) -> None:
    lines = (data / "console-l1-xsave-warning.log").read_text().splitlines()
    hits = [(classify(ln), ln) for ln in lines if classify(ln)]
    assert hits and hits[0][0] == "WARNING" and "fpu__init_system_xstate" in hits[0][1]


@pytest.mark.parametrize("line,kind", [
    ("[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs", "panic"),
    ("[    3.1] BUG: kernel NULL pointer dereference, address: 0000000000000000", "BUG"),
    ("[    3.1] BUG: KASAN: use-after-free in kvm_mmu_free_roots+0x1c/0x300", "KASAN"),
    ("[    3.1] Oops: 0002 [#1] PREEMPT SMP NOPTI", "Oops"),
    ("[    3.1] WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/mmu.c:3461 f+0x1/0x2", "WARNING"),
    ("[    3.1] general protection fault, probably for non-canonical address",
     "general protection fault"),
    ("LAB-INIT: ready", None),
    ("debug: BUGS: none", None),
])
def test_classify(line: str, kind: str | None) -> None:
    assert classify(line) == kind


def _console(tmp_path: Path) -> tuple[Console, socket.socket]:
    a, b = socket.socketpair()
    con = Console("l9", tmp_path / "l9.console.log")
    con._start(a)
    return con, b


def test_waits_for_marker_and_logs_everything(tmp_path: Path) -> None:
    con, peer = _console(tmp_path)
    peer.sendall(b"first\r\nLAB-INIT: st")
    threading.Timer(0.2, lambda: peer.sendall(b"art 6.1\r\n")).start()
    idx, line = con.wait_for("LAB-INIT: start", timeout=5)
    assert line.text == "LAB-INIT: start 6.1" and idx == 1
    assert con.first_output is not None
    peer.close()
    con.close()
    assert (tmp_path / "l9.console.log").read_bytes() == b"first\r\nLAB-INIT: start 6.1\r\n"


def test_crash_fails_fast_with_excerpt(tmp_path: Path) -> None:
    con, peer = _console(tmp_path)
    seen: list[str] = []
    con.on_event(lambda c, ev: seen.append(c.level))
    t0 = time.monotonic()
    peer.sendall(b"booting\n" + PANIC.encode())
    with pytest.raises(GuestCrash) as e:
        con.wait_for("LAB-INIT: ready", timeout=60)
    assert time.monotonic() - t0 < 5
    assert seen == ["l9"]
    err = con.crash_error(settle=0.5)
    assert err.level == "l9" and "panic" in err.reason
    assert "Call Trace:" in err.excerpt and "sysrq: Trigger a crash" in err.excerpt
    assert e.value.level == "l9"
    peer.close()
    con.close()


def test_closed_console_is_reported(tmp_path: Path) -> None:
    con, peer = _console(tmp_path)
    peer.sendall(b"last words\n")
    peer.close()
    with pytest.raises(VMDied) as e:
        con.wait_for("never", timeout=10)
    assert "last words" in str(e.value)
    con.close()


def test_an_endless_line_is_kept_in_bounded_pieces(tmp_path: Path) -> None:
    from lab.console import MAX_LINE_BYTES

    con, peer = _console(tmp_path)
    blob = b"x" * (MAX_LINE_BYTES * 10 + 5)
    peer.sendall(blob)
    time.sleep(1.5)  # no newline: the reader cuts on its timeout
    peer.sendall(b"\nLAB-INIT: ready\n")
    con.wait_for("LAB-INIT: ready", timeout=5)
    assert max(len(ln.text) for ln in con.lines) <= MAX_LINE_BYTES
    assert sum(len(ln.text) for ln in con.lines[:-1]) == len(blob)
    peer.close()
    con.close()
    assert (tmp_path / "l9.console.log").read_bytes().startswith(blob)  # the log has it whole


def test_a_line_that_comes_as_a_wait_times_out_is_still_seen(tmp_path: Path) -> None:
    """The awaited line arrives just after one look at the console gave up (its 2 s slice
    ran out) and before the next begins: it must not be skipped (it once was: a level whose
    `LAB-INIT: ready` was in its console log failed to boot)."""
    con, peer = _console(tmp_path)
    peer.sendall(b"booting\r\n")
    con.wait_for("booting", timeout=5)
    real = con.wait_for
    calls = []

    def racing(pattern: str, timeout: float, since: int = 0, abort: object = None):  # type: ignore[no-untyped-def]
        calls.append(since)
        try:
            return real(pattern, timeout=min(timeout, 0.05), since=since)
        except ConsoleTimeout:
            if len(calls) == 1:
                con._line(b"LAB-INIT: ready")
            raise

    con.wait_for = racing  # type: ignore[method-assign]
    now = time.monotonic()
    idx, _ = con.wait_progressing("LAB-INIT: ready", 0, now + 1.0, now + 1.0, 0.0,
                                  lambda: None)
    assert con.lines[idx].text == "LAB-INIT: ready" and len(calls) == 2
    peer.close()
    con.close()
