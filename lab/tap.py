"""TAP (Test Anything Protocol) from the guest-side suites, as the lab reports it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

_LINE = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$")
_PLAN = re.compile(r"^1\.\.(\d+)")


@dataclass
class TapCase:
    number: int
    name: str
    status: str  # passed | failed | skipped
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TapResult:
    cases: list[TapCase]
    planned: int | None
    bailed_out: str | None

    @property
    def ok(self) -> bool:
        complete = self.planned is None or self.planned == len(self.cases)
        return complete and self.bailed_out is None and \
            all(c.status != "failed" for c in self.cases)

    def problems(self) -> str:
        failed = [c.name for c in self.cases if c.status == "failed"]
        out = []
        if failed:
            out.append(f"{len(failed)} of {len(self.cases)} cases failed: {', '.join(failed)}")
        if self.bailed_out is not None:
            out.append(f"bailed out: {self.bailed_out}")
        if self.planned is not None and self.planned != len(self.cases):
            out.append(f"planned {self.planned} cases, got {len(self.cases)}")
        return "; ".join(out)


def parse(text: str) -> TapResult:
    cases: list[TapCase] = []
    planned = None
    bail = None
    for raw in text.splitlines():
        line = raw.strip()
        m = _PLAN.match(line)
        if m:
            planned = int(m.group(1))
            continue
        if line.startswith("Bail out!"):
            bail = line[len("Bail out!"):].strip() or "no reason given"
            continue
        m = _LINE.match(line)
        if not m:
            continue
        ok = m.group(1) == "ok"
        desc = m.group(3)
        directive = ""
        if " # " in desc or desc.startswith("# "):
            desc, _, directive = desc.partition("# ")
            desc = desc.rstrip()
        name, _, message = desc.partition(": ")
        status = "passed" if ok else "failed"
        if directive.upper().startswith("SKIP"):
            status = "skipped"
            message = directive[4:].strip() or "skipped"
        elif directive.upper().startswith("TODO") and not ok:
            status = "skipped"
            message = "TODO: " + directive[4:].strip()
        number = int(m.group(2)) if m.group(2) else len(cases) + 1
        cases.append(TapCase(number, name.strip() or f"case {number}", status, message.strip()))
    return TapResult(cases, planned, bail)
