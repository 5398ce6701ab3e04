"""A GDB/MI session (pygdbmi) on L0's gdbstub.

No MI record is lost: every record read is logged to the run's gdb log, and asynchronous ones
(`*stopped` can arrive in the same read as `^running`) are queued for whoever waits for them.
No command waits out a fixed delay: pygdbmi returns as soon as gdb has said something and
gone quiet for 10 ms, and each command returns when its own result record arrives.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pygdbmi.gdbcontroller import GdbController

from lab.errors import LabError

# Evaluates a batch of expressions in one round trip (a probe hit with five captures costs
# one MI command, not five). Values come back as gdb prints them; lab/gdbvalue.py parses them.
GDB_HELPER = r'''
import base64, json
import gdb

def _lab_eval(b64, caller=0):
    """Evaluate each expression in the selected frame; with caller=1, what is not known
    there is looked up in the calling frame (a probe on X called from F captures F's
    variables, as the tracefs backend does at F's call of X)."""
    out = []
    frame = gdb.selected_frame()
    for expr in json.loads(base64.b64decode(b64).decode()):
        try:
            out.append([True, str(gdb.parse_and_eval(expr))])
        except gdb.error as e:
            older = frame.older() if caller else None
            if older is None:
                out.append([False, str(e)])
                continue
            try:
                older.select()
                out.append([True, str(gdb.parse_and_eval(expr))])
            except gdb.error as e2:
                out.append([False, f"{e}; in the caller: {e2}"])
            finally:
                frame.select()
    print("LAB-EVAL " + json.dumps(out))

def _lab_save_args():
    """Keep the current frame's arguments as $NAME, for captures after `finish`."""
    frame = gdb.selected_frame()
    names = []
    try:
        block = frame.block()
    except RuntimeError:
        block = None
    while block is not None and block.function is None:
        block = block.superblock
    if block is not None:
        for sym in block:
            if sym.is_argument:
                try:
                    gdb.set_convenience_variable(sym.name, frame.read_var(sym))
                    names.append(sym.name)
                except (gdb.error, ValueError):
                    pass
    print("LAB-ARGS " + json.dumps(names))
'''


class GdbError(LabError):
    kind = "gdb"


class GdbSession:
    def __init__(self, log_path: Path, gdb: str = "gdb", controller: Any = None) -> None:
        self.log_file = open(log_path, "a")  # noqa: SIM115 (lives as long as the session)
        # `controller` replaces gdb with a recorded transcript in unit tests.
        self.ctl = controller or GdbController(
            command=[gdb, "--nx", "--quiet", "--interpreter=mi3"],
            time_to_check_for_additional_output_sec=0.01)
        self.token = 0
        self.pending: collections.deque[dict[str, Any]] = collections.deque()
        self.running = False
        self._log("#", "started")
        for c in ("-gdb-set mi-async on", "-gdb-set confirm off", "-gdb-set pagination off",
                  "-gdb-set breakpoint pending on", "-gdb-set print pretty off",
                  "-gdb-set print elements 1000", "-gdb-set width 0", "-gdb-set height 0"):
            self.cmd(c)
        self._load_helper()

    # -- plumbing ------------------------------------------------------------------------------
    def _log(self, kind: str, payload: Any) -> None:
        self.log_file.write(f"{time.time():.3f} {kind} {json.dumps(payload)}\n")
        self.log_file.flush()

    def _read(self, timeout: float) -> list[dict[str, Any]]:
        try:
            recs: list[dict[str, Any]] = self.ctl.get_gdb_response(
                timeout_sec=timeout, raise_error_on_timeout=False)
        except Exception as e:  # pygdbmi raises plain exceptions when gdb dies
            raise GdbError(f"gdb: {e}") from None
        for r in recs:
            self._log("<", r)
            # Records are handled in arrival order, so a *stopped that came in the same read
            # as ^running leaves the state at "stopped".
            if r.get("type") == "result" and r.get("message") == "running":
                self.running = True
            if r.get("type") == "notify":
                if r.get("message") == "running":
                    self.running = True
                elif r.get("message") == "stopped":
                    self.running = False
                self.pending.append(r)
        return recs

    def _load_helper(self) -> None:
        path = Path(self.log_file.name).with_name("gdb-helper.py")
        path.write_text(GDB_HELPER)
        self.console(f"source {path}")

    def cmd(self, command: str, timeout: float = 60.0) -> tuple[dict[str, Any], list[str]]:
        """Send one MI command; return its result record and the stream text it produced."""
        # An MI command is one line: a newline (or any control character) would end it and
        # start another, such as `shell`. Whatever the caller, nothing like that goes out.
        if any(ord(c) < 0x20 or c == "\x7f" for c in command):
            raise GdbError(f"gdb: refusing a command with a control character: {command!r}")
        self.token += 1
        tok = self.token
        self._log(">", f"{tok}{command}")
        self.ctl.write(f"{tok}{command}", read_response=False)
        end = time.monotonic() + timeout
        streams: list[str] = []
        while True:
            for r in self._read(min(max(end - time.monotonic(), 0.01), 1.0)):
                if r.get("type") in ("console", "log", "target") and r.get("payload"):
                    streams.append(str(r["payload"]))
                if r.get("type") == "result" and r.get("token") == tok:
                    if r.get("message") == "error":
                        msg = (r.get("payload") or {}).get("msg", "?")
                        raise GdbError(f"gdb: {command}: {msg}")
                    return r, streams
            if time.monotonic() > end:
                raise GdbError(f"gdb: no answer to {command!r} within {timeout:g} s")

    def console(self, command: str, timeout: float = 60.0) -> str:
        c = command.replace("\\", "\\\\").replace('"', '\\"')
        _, streams = self.cmd(f'-interpreter-exec console "{c}"', timeout)
        return "".join(streams)

    def evaluate(self, exprs: list[str], timeout: float = 60.0,
                 caller: bool = False) -> list[tuple[bool, str]]:
        """Evaluate expressions in the selected frame: (ok, value-or-error) for each; with
        `caller`, what the frame does not know is looked up in its caller's."""
        if not exprs:
            return []
        b64 = base64.b64encode(json.dumps(exprs).encode()).decode()
        text = self.console(f'python _lab_eval("{b64}"{", 1" if caller else ""})', timeout)
        m = re.search(r"LAB-EVAL (\[.*\])", text, re.S)
        if not m:
            raise GdbError(f"gdb: evaluation helper said: {text.strip()[:300]}")
        return [(bool(ok), str(v)) for ok, v in json.loads(m.group(1))]

    def save_args(self) -> list[str]:
        text = self.console("python _lab_save_args()")
        m = re.search(r"LAB-ARGS (\[.*\])", text)
        return list(json.loads(m.group(1))) if m else []

    def wait_stopped(self, timeout: float,
                     check: Callable[[], None] | None = None) -> dict[str, Any] | None:
        """The next *stopped record, or None after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            while self.pending:
                r = self.pending.popleft()
                if r.get("message") == "stopped":
                    return r
            left = end - time.monotonic()
            if left <= 0:
                return None
            self._read(min(left, 0.2))
            if check:
                check()

    # -- target --------------------------------------------------------------------------------
    def load_kernel(self, vmlinux: Path, offset: int = 0) -> float:
        t = time.monotonic()
        if offset:
            # KASLR: relocate every symbol by the runtime offset of _text.
            self.console(f"symbol-file {vmlinux} -o {offset:#x}", timeout=300)
        else:
            self.cmd(f"-file-exec-and-symbols {vmlinux}", timeout=300)
        return time.monotonic() - t

    def attach(self, target: str, timeout: float = 30.0) -> dict[str, Any] | None:
        """Connect to a gdbstub; the target stops, as gdb always stops it on attach."""
        self.cmd(f"-target-select remote {target}", timeout=timeout)
        return self.wait_stopped(5.0)

    def stop_in_host(self, hostname: str, tries: int = 100) -> int:
        """Make sure L0 is stopped in its own context; return how many re-stops it took.

        QEMU's gdbstub reads memory through the vCPU's current page tables. A TCG vCPU that
        gdb stopped while it was running a nested guest (L1 or L2) has the guest's CR3 loaded:
        L0's module text and data are then unreadable or, since every level runs the same
        kernel at the same addresses, silently the guest's. L0's own hostname, read from the
        kernel's uts namespace, tells which one gdb sees; until it is L0's, let it run a
        moment and stop it again. The language is fixed to C for the same reason: gdb picks
        it from the frame it stopped in, which may be code it has no symbols for.
        """
        self.console("set language c")
        want = " && ".join([*(f"init_uts_ns.name.nodename[{i}] == {ord(c)}"
                              for i, c in enumerate(hostname)),
                            f"init_uts_ns.name.nodename[{len(hostname)}] == 0"])
        for attempt in range(tries):
            (ok, value), = self.evaluate([f"({want})"])
            if ok and value.strip() == "1":
                return attempt
            self.cont()
            time.sleep(0.02)
            self.interrupt()
        raise GdbError(f"gdb: L0 did not stop in its own context in {tries} tries (it kept "
                       "stopping inside a nested guest)")

    def add_module(self, ko: Path, sections: dict[str, int], present: set[str]) -> None:
        self.console(add_symbol_file_command(ko, sections, present), timeout=120)

    def cont(self) -> None:
        self.cmd("-exec-continue")

    def interrupt(self, timeout: float = 30.0) -> None:
        if not self.running:
            return
        self.cmd("-exec-interrupt")
        if self.wait_stopped(timeout) is None:
            raise GdbError("gdb: the target did not stop on interrupt")

    def detach(self) -> None:
        self.cmd("-target-detach", timeout=30)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # gdb may be gone already
            self.ctl.exit()
        self._log("#", "closed")
        self.log_file.close()


def add_symbol_file_command(ko: Path, sections: dict[str, int], present: set[str]) -> str:
    """add-symbol-file for a loaded module, as lx-symbols builds it.

    `.init.*` is left out: after load the module's init memory is freed and reused (kvm's
    .init.text address later holds kvm_amd's .text).
    """
    parts = [f"add-symbol-file {ko} {sections['.text']:#x}"]
    for name in sorted(sections):
        if name == ".text" or name not in present or name.startswith(".init"):
            continue
        parts.append(f"-s {name} {sections[name]:#x}")
    return " ".join(parts)
