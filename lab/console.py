"""A level's serial console: logged in full, watched for kernel events, waited on for boot
markers.

A reader thread splits the console's socket stream into lines; each line is timestamped,
written to the run directory's log (raw bytes go to the log as they came), and checked for a
kernel event (lab/events.py: BUG, Oops, panic, WARNING, ...). A line is kept in memory in
pieces of at most MAX_LINE_BYTES, so a guest that prints without end costs the lab bounded
memory and time. Every event is recorded and handed to the lab the moment its first line
arrives; the first one the lab does not `accept` (expected by the playbook) is the console's
`crash`, and ends any wait on it at once instead of waiting out a timeout.
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

from lab import events
from lab.deadline import TimedOut, connect_socket
from lab.errors import BootError, GuestCrash, VMDied
from lab.events import Event


class ConsoleTimeout(BootError):
    """The awaited line did not come in time (the console is still open)."""

    scanned = 0  # lines looked at (and not matching) before the time ran out


EXCERPT_BEFORE = 5
EXCERPT_AFTER = 60
MAX_LINES = 20000
MAX_LINE_BYTES = 16 << 10  # a longer line is kept in pieces (the log file has it whole)


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


@dataclass
class _Seen:
    event: Event
    index: int  # of its first line in Console.lines (moved when old lines are dropped)
    done: bool = False  # its excerpt is filled in


class Console:
    def __init__(self, level: str, log_path: Path) -> None:
        self.level = level
        self.log_path = log_path
        self.lines: list[Line] = []
        self.first_output: float | None = None
        self.crash: Crash | None = None  # the first event not accepted
        self.closed = False
        self.t0 = 0.0  # events' times are seconds since this (the lab's start)
        # Whether an event is expected (then it is recorded but is no crash); the lab's.
        self.accept: Callable[[Event], bool] = lambda ev: False
        self._seen: list[_Seen] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._on_event: list[Callable[[Console, Event], None]] = []
        self._log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the console)

    def on_event(self, callback: Callable[[Console, Event], None]) -> None:
        """`callback(console, event)` for every kernel event, as its first line arrives (on
        the console's reader thread)."""
        self._on_event.append(callback)


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
        new: Event | None = None
        with self._cond:
            if self.first_output is None:
                self.first_output = now
            self.lines.append(Line(now, text))
            if len(self.lines) > MAX_LINES:  # keep memory bounded; the log file has it all
                drop = len(self.lines) - MAX_LINES
                del self.lines[:drop]
                if self.crash:
                    self.crash.index = max(0, self.crash.index - drop)
                for s in self._seen:
                    s.index = max(0, s.index - drop)
            kind = events.detect(text)
            if kind and not self._within_open_report(kind):
                new = events.parse(self.level, kind, round(now - self.t0, 3), text)
                self._seen.append(_Seen(new, len(self.lines) - 1))
                if self.crash is None and not self.accept(new):
                    self.crash = Crash(kind, len(self.lines) - 1, now, new.line)
            self._cond.notify_all()
        self._log.flush()
        if new is not None:
            for cb in list(self._on_event):
                cb(self, new)

    def _within_open_report(self, kind: str) -> bool:
        """Whether the `kind` line just added belongs to the report of the last event (its
        BUG line's Oops), not a new one."""
        if not self._seen or not events.continues(self._seen[-1].event.kind, kind):
            return False
        start = self._seen[-1].index
        last = len(self.lines) - 1
        if last - start > events.REPORT_LINES or last == start:
            return False
        return not any(events.END_OF_REPORT.search(ln.text)
                       for ln in self.lines[start + 1:last])

    def complete_events(self, settled: float = 2.0) -> list[Event]:
        """Fill in the excerpt (and an Oops's RIP function) of every event whose report has
        had `settled` seconds to arrive; returns those completed now."""
        done = []
        now = time.monotonic()
        with self._cond:
            for s in self._seen:
                if s.done:
                    continue
                first = self.lines[s.index].t if s.index < len(self.lines) else 0.0
                if now - first < settled and not self.closed:
                    continue
                start = max(0, s.index - events.EXCERPT_BEFORE)
                lines = [ln.text for ln in self.lines[start:s.index + events.EXCERPT_AFTER]]
                events.complete(s.event, lines, s.index - start)
                s.done = True
                done.append(s.event)
        return done

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
                    e = ConsoleTimeout(f"{self.level}: no {pattern!r} on the console within "
                                       f"{timeout:.0f} s; last lines:\n{self.tail()}",
                                       level=self.level, detail=self.tail())
                    e.scanned = pos
                    raise e
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
            except ConsoleTimeout as e:
                # Go on from where the look ended, not from the end of the lines now: a
                # line that came in between (the one awaited, perhaps) is still to be seen.
                pos = e.scanned
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
        reason = c.line if c.line.startswith(c.kind) else f"{c.kind}: {c.line}"
        return GuestCrash(self.level, reason, excerpt, str(self.log_path))

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
