"""TAP and KTAP (Test Anything Protocol, and the kernel's dialect) from the guest-side suites, as
the lab reports it.

What it reads: `ok`/`not ok` lines with `# SKIP`/`# TODO` directives (with or without a space
after `#`), the plan (`1..0 # SKIP why` skips the whole run, with its reason), `Bail out!`, and
KTAP's nesting: an indented block of subtests (with its own plan) belongs to the result line
that follows it, and its cases are reported as PARENT/CHILD. A case's name is its description
up to ": " (the lab's own programs put the message after it); where that prefix repeats within
one output (kvm-unit-tests' `vmx: ...` lines, kselftest's `selftests: kvm: ...`), the whole
description is the name, so that names stay unique.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

_LINE = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$")
_PLAN = re.compile(r"^1\.\.(\d+)(?:\s*#\s*(?:SKIP|skip)\S*\s*(.*))?")
_DIRECTIVE = re.compile(r"\s*#\s*(SKIP|TODO)\S*\s*(.*)$", re.IGNORECASE)
_COMMENT = re.compile(r"\s+#\s*(.*)$")


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
    skip_all: str | None = None  # `1..0 # SKIP why`
    nested_problems: list[str] = field(default_factory=list)
    top_level: int = 0  # cases at this level (the plan counts these, not their subtests)

    @property
    def ok(self) -> bool:
        complete = self.planned is None or self.planned == self.top_level
        return complete and self.bailed_out is None and not self.nested_problems and \
            all(c.status != "failed" for c in self.cases)

    def problems(self) -> str:
        failed = [c.name for c in self.cases if c.status == "failed"]
        out = []
        if failed:
            out.append(f"{len(failed)} of {len(self.cases)} cases failed: {', '.join(failed)}")
        if self.bailed_out is not None:
            out.append(f"bailed out: {self.bailed_out}")
        if self.planned is not None and self.planned != self.top_level:
            out.append(f"planned {self.planned} cases, got {self.top_level}")
        out += self.nested_problems
        return "; ".join(out)


def _indent(raw: str) -> int:
    return len(raw) - len(raw.lstrip(" \t"))


def parse(text: str) -> TapResult:
    lines = [ln.rstrip("\r") for ln in text.splitlines()]
    base = min((_indent(ln) for ln in lines if _LINE.match(ln.strip()) or
                _PLAN.match(ln.strip())), default=0)
    return _parse_level(lines, base)


def _parse_level(lines: list[str], base: int) -> TapResult:
    raw_cases: list[tuple[int, str, str, str, list[TapCase], str | None]] = []
    planned: int | None = None
    bail: str | None = None
    skip_all: str | None = None
    nested: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if _indent(raw) > base:
            nested.append(raw)  # a subtest's line: it belongs to the next result line here
            continue
        m = _PLAN.match(line)
        if m:
            planned = int(m.group(1))
            if planned == 0:
                skip_all = (m.group(2) or "").strip() or "skipped"
            continue
        if line.startswith("Bail out!"):
            bail = line[len("Bail out!"):].strip() or "no reason given"
            continue
        m = _LINE.match(line)
        if not m:
            continue
        ok = m.group(1) == "ok"
        desc = m.group(3)
        directive, dmsg = "", ""
        d = _DIRECTIVE.search(desc)
        if d:
            directive, dmsg = d.group(1).upper(), d.group(2).strip()
            desc = desc[:d.start()].rstrip()
        else:
            c = _COMMENT.search(desc)  # `# exit=254`: a note, not part of the name
            if c:
                dmsg, desc = c.group(1).strip(), desc[:c.start()].rstrip()
        status, message = ("passed" if ok else "failed"), ("" if directive else dmsg)
        if directive == "SKIP":
            status, message = "skipped", dmsg or "skipped"
        elif directive == "TODO" and not ok:
            status, message = "skipped", "TODO: " + dmsg
        number = int(m.group(2)) if m.group(2) else len(raw_cases) + 1
        children: list[TapCase] = []
        problem = None
        if nested:
            sub = _parse_level(nested, min(_indent(x) for x in nested))
            children = sub.cases
            if not sub.ok and ok and directive != "SKIP":
                problem = f"subtests of case {number}: {sub.problems()}"
            nested = []
        raw_cases.append((number, desc, status, message, children, problem))
    # A name is the description up to ": ", unless that prefix repeats: then all of it.
    prefixes = [desc.partition(": ")[0].strip() for _, desc, *_ in raw_cases]
    cases: list[TapCase] = []
    problems: list[str] = []
    for (number, desc, status, message, children, problem), prefix in \
            zip(raw_cases, prefixes, strict=True):
        if prefixes.count(prefix) > 1:
            name, rest = desc.strip(), ""
        else:
            name, _, rest = desc.partition(": ")
            name = name.strip()
        name = name or f"case {number}"
        cases.append(TapCase(number, name, status, (message or rest).strip()))
        cases += [TapCase(c.number, f"{name}/{c.name}", c.status, c.message) for c in children]
        if problem:
            problems.append(problem)
    if skip_all is not None and not cases:
        cases.append(TapCase(0, "(all)", "skipped", skip_all))
        planned = None
    return TapResult(cases, planned, bail, skip_all, problems, len(raw_cases))


# -- writing ---------------------------------------------------------------------------------
def _tap_text(s: str) -> str:
    """A name or message on one TAP line: no newline, and no `#` that would start a directive."""
    return " ".join(s.split()).replace("#", "\\#")


def from_junit(root: Any) -> str:
    """`lab run --tap`: the run's JUnit (an ElementTree element: a <testsuites> of runs, or one
    <testsuite>) as TAP version 13, one line per testcase, each run a subtest block of its own
    when there are several (KTAP's nesting, indented four spaces)."""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))

    def block(suite: Any, indent: str) -> list[str]:
        cases = list(suite.iter("testcase"))
        out = [f"{indent}1..{len(cases)}"]
        for i, tc in enumerate(cases, 1):
            name = _tap_text(f"{tc.get('classname')}: {tc.get('name')}")
            bad = tc.find("failure")
            if bad is None:
                bad = tc.find("error")
            skip = tc.find("skipped")
            if bad is not None:
                out.append(f"{indent}not ok {i} {name}")
                out.append(f"{indent}  ---")
                out.append(f"{indent}  {bad.tag}: {json.dumps(bad.get('message') or '')}")
                out.append(f"{indent}  ...")
            elif skip is not None:
                why = _tap_text(skip.get("message") or "")
                out.append(f"{indent}ok {i} {name} # SKIP{' ' + why if why else ''}")
            else:
                out.append(f"{indent}ok {i} {name}")
        return out

    lines = ["TAP version 13"]
    if len(suites) == 1:
        lines += block(suites[0], "")
        return "\n".join(lines) + "\n"
    lines.append(f"1..{len(suites)}")
    for i, suite in enumerate(suites, 1):
        lines += block(suite, "    ")
        failed = int(suite.get("failures", "0")) + int(suite.get("errors", "0"))
        lines.append(f"{'not ok' if failed else 'ok'} {i} {_tap_text(suite.get('name', ''))}")
    return "\n".join(lines) + "\n"
