"""What a run leaves behind: the Report, written as report.json (for machines), junit.xml
(lab/junit.py, for CI servers) and report.html (lab/html.py, for people)."""

from __future__ import annotations

import json
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
    kernel_tree: str | None = None  # L0 booted from this build tree (None: the recipe's)
    kernel_choice: str | None = None  # L0's Debian kernel as --kernel gave it (debian:SUITE)
    started: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[StepResult] = field(default_factory=list)
    error: dict[str, Any] | None = None
    logs: dict[str, str] = field(default_factory=dict)
    probe_backend: str | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)
    probe_timeline: list[dict[str, Any]] = field(default_factory=list)
    # How the probe backend was set up: symbols, KASLR offset, attach or compile times,
    # kprobe events, the probe sets armed, and its error if it failed as a whole.
    probe_setup: dict[str, Any] = field(default_factory=dict)
    injection: dict[str, Any] | None = None
    # How the chain came up: {"mode": "cold" | "warm", the saved lab, what saving or
    # restoring took}; and how fast this host runs next to the reference (lab/hostspeed.py).
    boot: dict[str, Any] = field(default_factory=dict)
    host_speed: dict[str, Any] = field(default_factory=dict)
    # Every kernel event on every level's console (lab/events.py), expected or not.
    events: list[dict[str, Any]] = field(default_factory=list)
    # The playbook's probe checks (lab/probes/checks.py) and, where the probes saw INVEPTs whole,
    # roots freed against roots named, per INVEPT type.
    checks: list[dict[str, Any]] = field(default_factory=list)
    invalidation: dict[str, Any] | None = None

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
        unexpected = [e for e in self.events if not e.get("expected")]
        if unexpected and self.error is None:
            # A kernel that WARNed (or worse) where nobody said it would: never a pass.
            first = unexpected[0]
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            self.error = {"kind": "kernel-event", "level": first["level"], "exit_status": 3,
                          "message": f"{first['level']}: kernel event: {first['summary']}"
                                     f"{more}", "detail": first.get("excerpt", "")}
        if self.error is not None or any(s.status == "error" for s in self.steps):
            self.status = "error"
        elif any(s.status == "failed" for s in self.steps) or \
                any(c["status"] == "failed" for c in self.checks):
            self.status = "failed"
        else:
            self.status = "passed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_status"] = self.exit_status
        return d

    def write(self, run_dir: Path) -> None:
        """report.json, junit.xml and report.html, each by its own writer."""
        from lab import html, junit

        d = self.to_dict()
        write_json(d, run_dir)
        junit.write([junit.testsuite(d)], run_dir / "junit.xml")
        html.write(d, run_dir)


def write_json(report: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")


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
