"""Kernel events on a console: every BUG, Oops, panic, WARNING, KASAN or UBSAN report, lockup,
RCU stall and hung task a level's kernel prints, as records the lab keeps, reports and alerts
on.

`detect` names the event a console line starts (or None); `Event` is one event, filled in from
its first line (`parse`: the WARN's file:line, the function+offset and module) and, once more
of its report has arrived, from the lines after it (`complete`: the RIP line of an Oops, the
excerpt). Lines that belong to a report already open (an Oops after its BUG line, a second
"BUG:" inside a KASAN report) are not new events.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Order matters: the first pattern that matches names the event.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("soft lockup", re.compile(r"BUG: soft lockup - CPU")),
    ("hard lockup", re.compile(r"Watchdog detected hard LOCKUP")),
    ("KASAN", re.compile(r"BUG: KASAN: ")),
    ("UBSAN", re.compile(r"UBSAN: \S")),
    ("RCU stall", re.compile(r"rcu: INFO: \w+ (?:self-)?detected stalls?")),
    ("hung task", re.compile(r"INFO: task \S+ blocked for more than \d+ seconds")),
    ("panic", re.compile(r"Kernel panic - not syncing")),
    ("BUG", re.compile(r"(?:^|\] |\s)BUG: |kernel BUG at ")),
    ("Oops", re.compile(r"(?:^|\] |\s)Oops: ")),
    ("general protection fault", re.compile(r"general protection fault")),
    ("WARNING", re.compile(r"WARNING: CPU: \d+ PID: \d+ at |WARNING: \S+:\d+ at ")),
]
# After these the level's kernel is gone or cannot be trusted: it is "crashed".
FATAL = frozenset({"panic", "BUG", "Oops", "general protection fault", "hard lockup"})
# A BUG-like line this close after an open BUG-like report's first line, before its end
# marker, is part of that report (BUG -> Oops -> RIP; a GPF's Oops line).
REPORT_LINES = 40
CONTINUES = frozenset({"BUG", "Oops", "general protection fault", "KASAN"})
END_OF_REPORT = re.compile(r"---\[ end trace|---\[ end Kernel panic|^=+$")
EXCERPT_BEFORE = 5
EXCERPT_AFTER = 40

_AT_FILE = re.compile(r"\bat ([\w./-]+\.[chS]):(\d+)\b")
_FUNC = re.compile(r"(?:^|[\s:])([A-Za-z_][\w.]*)\+(0x[0-9a-f]+)/(0x[0-9a-f]+)(?: \[(\w+)\])?")
_RIP = re.compile(r"RIP: [0-9a-f]{4}:(.*)$")
_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\]\s*")


def detect(line: str) -> str | None:
    """The kind of kernel event a console line starts, or None."""
    for kind, rx in PATTERNS:
        if rx.search(line):
            return kind
    return None


@dataclass
class Event:
    level: str
    kind: str
    t: float  # seconds since the lab started
    line: str  # the first line, without the kernel's timestamp
    seq: int = 0  # the lab's own number for it, in order of arrival across every level
    file_line: str | None = None  # "arch/x86/kvm/vmx/nested.c:4792", as the kernel printed it
    function: str | None = None  # "nested_vmx_vmexit+0xd27/0x1880"
    module: str | None = None  # "kvm_intel"; None: the kernel itself
    excerpt: str = ""
    # Filled in by lab/decode.py where the lab holds the symbols.
    decoded: dict[str, Any] | None = None
    expected: bool = False  # the playbook or the running step said this event would come
    expected_by: str | None = None  # "playbook" or the step's name
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL

    def summary(self) -> str:
        """One line: what it is and where, as decoded as the lab could."""
        d = self.decoded or {}
        where = self.file_line or d.get("file_line")  # the WARN's own line first
        short = where.rsplit("/", 1)[-1] if where else None
        func = (self.function or "").split("+")[0] or None
        parts = [f"{self.module}:" if self.module else None, short,
                 d.get("source"), f"in {func}" if func else None]
        text = " ".join(p for p in parts if p)
        return f"{self.kind}: {text}" if text else f"{self.kind}: {self.line[:160]}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fatal"] = self.fatal
        d["summary"] = self.summary()
        return d


def parse(level: str, kind: str, t: float, line: str) -> Event:
    """An event from its first line: the WARN's file:line, the function+offset and module
    where the line names them."""
    text = _TIMESTAMP.sub("", line).strip()
    ev = Event(level=level, kind=kind, t=t, line=text)
    m = _AT_FILE.search(text)
    if m:
        ev.file_line = f"{m.group(1)}:{m.group(2)}"
    m = _FUNC.search(text[m.end():] if m else text)
    if m:
        ev.function = f"{m.group(1)}+{m.group(2)}/{m.group(3)}"
        ev.module = m.group(4)
    return ev


def continues(open_kind: str, kind: str) -> bool:
    """Whether a `kind` line can be part of an open `open_kind` report (not a new event)."""
    return open_kind in CONTINUES and kind in CONTINUES - {"KASAN"}


def complete(ev: Event, lines: list[str], first: int) -> None:
    """Fill in what came after the first line (`lines`: the excerpt, the event's own first
    line at `first`): the excerpt, and for a report that names no function on its first
    line, the one in its RIP line."""
    ev.excerpt = "\n".join(lines)
    if ev.function is None:
        for ln in lines[first:]:
            m = _RIP.search(ln)
            if m:
                f = _FUNC.search(" " + m.group(1))
                if f:
                    ev.function = f"{f.group(1)}+{f.group(2)}/{f.group(3)}"
                    ev.module = f.group(4)
                break


KINDS = tuple(kind for kind, _ in PATTERNS)


@dataclass(frozen=True)
class Expected:
    """An event a playbook (or one of its steps) says will come: of this kind, on this level
    (any if None), its first line or place containing `match` (a plain substring: a
    playbook's text is never a regular expression run on the host)."""

    kind: str
    level: str | None = None
    match: str = ""

    def matches(self, ev: Event) -> bool:
        if ev.kind != self.kind or (self.level is not None and ev.level != self.level):
            return False
        where = " ".join(x for x in (ev.line, ev.file_line, ev.function, ev.module) if x)
        return self.match in where

    def describe(self) -> str:
        return (f"{self.kind}" + (f" on {self.level}" if self.level else "")
                + (f" matching {self.match!r}" if self.match else ""))
