"""A level's serial console: logged in full, watched for crashes, waited on for boot markers.

A reader thread splits the console's socket stream into lines; each line is timestamped,
written to the run directory's log (raw bytes go to the log as they came), and checked for a
kernel crash. A line is kept in memory in pieces of at most MAX_LINE_BYTES, so a guest that
prints without end costs the lab bounded memory and time (pexpect, which did this before,
keeps every byte since its last match and searches it again). A crash is noticed the moment
its first line arrives, so the lab fails fast instead of waiting out a timeout.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.deadline import TimedOut, connect_socket
from lab.errors import BootError, GuestCrash, VMDied


class ConsoleTimeout(BootError):
    """The awaited line did not come in time (the console is still open)."""


# Order matters: the first pattern that matches names the crash.
CRASH_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("KASAN", re.compile(r"BUG: KASAN: ")),
    ("panic", re.compile(r"Kernel panic - not syncing")),
    ("BUG", re.compile(r"(?:^|\] |\s)BUG: ")),
    ("Oops", re.compile(r"(?:^|\] |\s)Oops: ")),
    ("WARNING", re.compile(r"WARNING: CPU: \d+ PID: \d+ at ")),
    ("general protection fault", re.compile(r"general protection fault")),
]

EXCERPT_BEFORE = 5
EXCERPT_AFTER = 60
MAX_LINES = 20000
MAX_LINE_BYTES = 16 << 10  # a longer line is kept in pieces (the log file has it whole)


def classify(line: str) -> str | None:
    """The kind of kernel crash a console line starts, or None."""
    for kind, rx in CRASH_PATTERNS:
        if rx.search(line):
            return kind
    return None


@dataclass
class Line:
    t: float  # time.monotonic() when it arrived
    text: str


@dataclass
class Crash:
    kind: str
    index: int  # into Console.lines
    t: float
    line: str


class Console:
    def __init__(self, level: str, log_path: Path) -> None:
        self.level = level
        self.log_path = log_path
        self.lines: list[Line] = []
        self.first_output: float | None = None
        self.crash: Crash | None = None
        self.closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._on_crash: list[Callable[[Console], None]] = []
        self._log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the console)

    def on_crash(self, callback: Callable[[Console], None]) -> None:
        self._on_crash.append(callback)

    # -- attaching -------------------------------------------------------------------------
    def attach_unix(self, path: str, deadline: float) -> None:
        self._attach(socket.AF_UNIX, path, path, deadline)

    def attach_tcp(self, host: str, port: int, deadline: float,
                   alive: Callable[[], None] | None = None) -> None:
        """Connect to a console served on TCP (Bochs): retried until the port listens;
        `alive` raises if whatever should open it has died meanwhile."""
        self._attach(socket.AF_INET, (host, port), f"{host}:{port}", deadline, alive)

    def _attach(self, family: int, addr: str | tuple[str, int], what: str, deadline: float,
                alive: Callable[[], None] | None = None) -> None:
        try:
            self._start(connect_socket(family, addr, deadline, between=alive))
        except TimedOut as e:
            raise BootError(f"{self.level}: console socket {what} did not open: {e.last}",
                            level=self.level) from None

    def _start(self, sock: socket.socket) -> None:
        self._sock = sock
        self._thread = threading.Thread(target=self._reader, args=(sock,),
                                        name=f"console-{self.level}", daemon=True)
        self._thread.start()

    def _reader(self, sock: socket.socket) -> None:
        pending = bytearray()
        sock.settimeout(0.5)
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            self._log.write(data)
            pending += data
            start = 0
            while (nl := pending.find(b"\n", start)) >= 0:
                self._line(bytes(pending[start:nl]))
                start = nl + 1
            del pending[:start]
            while len(pending) > MAX_LINE_BYTES:  # an endless line, kept in pieces
                self._line(bytes(pending[:MAX_LINE_BYTES]))
                del pending[:MAX_LINE_BYTES]
            self._log.flush()
        if pending:
            self._line(bytes(pending))
        self._log.flush()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        now = time.monotonic()
        callbacks: list[Callable[[Console], None]] = []
        with self._cond:
            if self.first_output is None:
                self.first_output = now
            self.lines.append(Line(now, text))
            if len(self.lines) > MAX_LINES:  # keep memory bounded; the log file has it all
                drop = len(self.lines) - MAX_LINES
                del self.lines[:drop]
                if self.crash:
                    self.crash.index = max(0, self.crash.index - drop)
            if self.crash is None:
                kind = classify(text)
                if kind:
                    self.crash = Crash(kind, len(self.lines) - 1, now, text.strip())
                    callbacks = list(self._on_crash)
            self._cond.notify_all()
        self._log.flush()
        for cb in callbacks:
            cb(self)

    # -- reading ---------------------------------------------------------------------------
    def wait_for(self, pattern: str, timeout: float, since: int = 0,
                 abort: Callable[[], None] | None = None) -> tuple[int, Line]:
        """Wait for a line matching `pattern` (at index >= since); fail fast on a crash."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        pos = since
        with self._cond:
            while True:
                while pos < len(self.lines):
                    if rx.search(self.lines[pos].text):
                        return pos, self.lines[pos]
                    pos += 1
                if self.crash:
                    raise self.crash_error(settle=0)
                if abort:
                    abort()
                if self.closed:
                    raise VMDied(f"{self.level}: console closed while waiting for {pattern!r}"
                                 f"; last lines:\n{self.tail()}", level=self.level)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleTimeout(f"{self.level}: no {pattern!r} on the console within "
                                    f"{timeout:.0f} s; last lines:\n{self.tail()}",
                                    level=self.level, detail=self.tail())
                self._cond.wait(min(left, 0.2))

    def wait_progressing(self, pattern: str, since: int, deadline: float, hard: float,
                         window: float, check: Callable[[], None]) -> tuple[int, float]:
        """Wait for `pattern` until `deadline`, but while the console keeps speaking (a line
        within the last `window` s) the deadline moves on, up to `hard`: a slow machine is
        not a stuck one. `check` runs every 2 s at least (fail fast). Returns (the line's
        index, the deadline as extended); ConsoleTimeout when a silent console passes it."""
        pos = since
        while True:
            left = deadline - time.monotonic()
            try:
                idx, _ = self.wait_for(pattern, timeout=min(max(left, 0.01), 2.0), since=pos,
                                       abort=check)
                return idx, deadline
            except ConsoleTimeout:
                pos = len(self.lines)
                check()
                now = time.monotonic()
                if now >= deadline:
                    spoke = self.lines[-1].t if self.lines else 0.0
                    if now < hard and now - spoke < window:
                        deadline = min(hard, spoke + window)
                        continue
                    raise

    def tail(self, n: int = 15) -> str:
        return "\n".join(ln.text for ln in self.lines[-n:])

    def settle(self, quiet: float = 1.0, limit: float = 3.0) -> None:
        """Let a crash report finish arriving: until `quiet` s without output, `limit` at most."""
        end = time.monotonic() + limit
        with self._cond:
            while time.monotonic() < end and not self.closed:
                last = self.lines[-1].t if self.lines else 0.0
                if time.monotonic() - last >= quiet:
                    break
                self._cond.wait(0.1)

    def crash_error(self, settle: float = 3.0) -> GuestCrash:
        assert self.crash is not None
        if settle:
            self.settle(limit=settle)
        c = self.crash
        lines = self.lines[max(0, c.index - EXCERPT_BEFORE):c.index + EXCERPT_AFTER]
        excerpt = "\n".join(ln.text for ln in lines)
        return GuestCrash(self.level, f"{c.kind}: {c.line}", excerpt, str(self.log_path))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._log.close()
