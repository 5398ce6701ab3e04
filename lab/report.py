"""What a run leaves behind: report.json (for machines), junit.xml (for CI servers)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import EXIT_INFRA, EXIT_PASSED, EXIT_STEP_FAILED


@dataclass
class StepResult:
    name: str
    level: str
    command: str
    expected: int
    status: str  # passed | failed | error
    exit_status: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    message: str = ""
    cases: list[dict[str, Any]] = field(default_factory=list)  # TAP cases, if the step has them
    timeout: float | None = None  # seconds, as scaled to this host's speed
    stdout_bytes: int = 0  # what the step printed in all (stdout/stderr keep head and tail)
    stderr_bytes: int = 0
    output_files: list[str] = field(default_factory=list)  # every byte, in the run directory


@dataclass
class Report:
    playbook: str
    name: str
    run_dir: str
    status: str = "error"  # passed | failed | error
    profile: str | None = None
    started: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[StepResult] = field(default_factory=list)
    error: dict[str, Any] | None = None
    logs: dict[str, str] = field(default_factory=dict)
    probe_backend: str | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    probe_timeline: list[dict[str, Any]] = field(default_factory=list)
    gdb: dict[str, Any] = field(default_factory=dict)
    injection: dict[str, Any] | None = None
    # How the chain came up: {"mode": "cold" | "warm", the saved lab, what saving or
    # restoring took}; and how fast this host runs next to the reference (lab/hostspeed.py).
    boot: dict[str, Any] = field(default_factory=dict)
    host_speed: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        if self.error is not None:
            return int(self.error.get("exit_status", EXIT_INFRA))
        if self.status == "passed":
            return EXIT_PASSED
        if self.status == "failed":
            return EXIT_STEP_FAILED
        return EXIT_INFRA

    def finish(self) -> None:
        if self.error is not None or any(s.status == "error" for s in self.steps):
            self.status = "error"
        elif any(s.status == "failed" for s in self.steps):
            self.status = "failed"
        else:
            self.status = "passed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_status"] = self.exit_status
        return d

    def write(self, run_dir: Path) -> None:
        (run_dir / "report.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        (run_dir / "junit.xml").write_bytes(junit(self))
        from lab import html

        html.write(self.to_dict(), run_dir)


def _clip(text: str, limit: int = 20000) -> str:
    return text if len(text) <= limit else text[:limit // 2] + "\n...\n" + text[-limit // 2:]


# Characters XML 1.0 cannot carry at all (not even escaped): a step that prints ESC or NUL
# would otherwise make the whole junit.xml unreadable.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """`text` with every character XML 1.0 forbids written as \\xNN (visible, not lost)."""
    return _XML_FORBIDDEN.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def xml_bytes(root: ET.Element) -> bytes:
    """A JUnit tree as a file's bytes, every text and attribute made XML-safe first: the one
    way both run and suite JUnit files are written."""
    for el in root.iter():
        if el.text:
            el.text = xml_safe(el.text)
        if el.tail:
            el.tail = xml_safe(el.tail)
        for k, v in el.attrib.items():
            el.set(k, xml_safe(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def junit(r: Report) -> bytes:
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name=r.name)
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="profile", value=str(r.profile))
    ET.SubElement(props, "property", name="run_dir", value=r.run_dir)
    n_fail = n_err = 0
    total = 0.0
    # One testcase per level's boot, with its timeline, so a CI server shows where time went.
    for level, info in r.levels.items():
        tl = info.get("timeline", {})
        case = ET.SubElement(suite, "testcase", classname=f"{r.name}.boot", name=f"boot {level}",
                             time=f"{tl.get('ssh_ready', 0.0) - tl.get('launch', 0.0):.3f}"
                             if "ssh_ready" in tl else "0")
        cprops = ET.SubElement(case, "properties")
        for k, v in tl.items():
            ET.SubElement(cprops, "property", name=k, value=f"{v:.3f}")
        if "ssh_ready" not in tl:
            n_err += 1
            msg = (r.error or {}).get("message", "did not boot")
            err = ET.SubElement(case, "error", message=str(msg)[:500])
            err.text = str((r.error or {}).get("detail", ""))
    for s in r.steps:
        total += s.seconds
        for c in s.cases:
            # One testcase per TAP case, under the level it ran at.
            tc = ET.SubElement(suite, "testcase", classname=f"{r.name}.{s.level}.{s.name}",
                               name=c["name"], time="0")
            if c["status"] == "failed":
                n_fail += 1
                ET.SubElement(tc, "failure", message=c["message"][:500] or "failed")
            elif c["status"] == "skipped":
                ET.SubElement(tc, "skipped", message=c["message"][:500])
        case_failed = any(c["status"] == "failed" for c in s.cases)
        if s.cases and (s.status == "passed" or (s.status == "failed" and case_failed)):
            continue  # the per-case testcases above tell it all
        case = ET.SubElement(suite, "testcase", classname=f"{r.name}.{s.level}", name=s.name,
                             time=f"{s.seconds:.3f}")
        if s.status == "failed":
            n_fail += 1
            f = ET.SubElement(case, "failure",
                              message=s.message or f"exit status {s.exit_status}, "
                                                   f"expected {s.expected}")
            f.text = _clip(s.stderr or s.stdout)
        elif s.status == "error":
            n_err += 1
            e = ET.SubElement(case, "error", message=s.message[:500])
            e.text = _clip(s.stderr or s.stdout)
        ET.SubElement(case, "system-out").text = _clip(s.stdout)
        if s.stderr:
            ET.SubElement(case, "system-err").text = _clip(s.stderr)
    if r.error is not None and not r.levels and not r.steps:
        case = ET.SubElement(suite, "testcase", classname=r.name, name="lab")
        n_err += 1
        ET.SubElement(case, "error", message=str(r.error.get("message", ""))[:500]).text = \
            str(r.error.get("detail", ""))
    suite.set("tests", str(len(suite.findall("testcase"))))
    suite.set("failures", str(n_fail))
    suite.set("skipped", str(len(suite.findall("testcase/skipped"))))
    suite.set("errors", str(n_err))
    suite.set("time", f"{r.phases.get('total', total):.3f}")
    return xml_bytes(suites)


def summary(r: Report) -> str:
    lines = [f"{r.name}: {r.status.upper()} (exit {r.exit_status}) in "
             f"{r.phases.get('total', 0):.1f} s; report in {r.run_dir}/report.json"]
    for s in r.steps:
        mark = {"passed": "ok  ", "failed": "FAIL", "error": "ERR "}[s.status]
        lines.append(f"  {mark} [{s.level}] {s.name} ({s.seconds:.2f} s)"
                     + (f": {s.message}" if s.status != "passed" and s.message else ""))
    if r.error:
        lines.append(f"  error ({r.error.get('kind')}): {r.error.get('message')}")
    return "\n".join(lines)
