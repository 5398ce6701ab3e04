"""A playbook's steps: each run on its level over SSH, its output kept, its verdict given.

`verdict` is the whole of how a step passes or fails, as a pure function of what the step
asked for and what came back; `run` is the part with a lifecycle (the SSH command, the output
files).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import tap
from lab.errors import LabError
from lab.playbook import Step
from lab.report import StepResult
from lab.ssh import RunResult, SSHSession

log = logging.getLogger(__name__)

OUTPUT_KEEP = 64 << 10  # bytes of head and of tail of a step's output kept in the report


@dataclass
class Verdict:
    status: str  # passed | failed
    message: str = ""
    cases: list[dict[str, Any]] = field(default_factory=list)  # TAP cases, if any


def verdict(step: Step, exit_status: int, stdout: str,
            missing_events: list[str] | None = None) -> Verdict:
    """Passed when the exit status is the one expected, for a TAP step every case is, and
    every kernel event the step expected came (`missing_events`: those that did not)."""
    v = Verdict("passed")
    if step.tap:
        parsed = tap.parse(stdout)
        v.cases = [c.to_dict() for c in parsed.cases]
        if not parsed.cases:
            v.status, v.message = "failed", "no TAP output"
        elif not parsed.ok:
            v.status, v.message = "failed", parsed.problems()
    if v.status == "passed" and exit_status != step.expect:
        v.status, v.message = "failed", f"exit status {exit_status}, expected {step.expect}"
    return with_events(v, missing_events)


def with_events(v: Verdict, missing_events: list[str] | None) -> Verdict:
    """`v`, failed if a kernel event the step expected did not come."""
    if v.status == "passed" and missing_events:
        v.status = "failed"
        v.message = f"expected kernel event(s) did not come: {'; '.join(missing_events)}"
    return v


def run(step: Step, index: int, ssh: SSHSession, steps_dir: Path, speed_factor: float,
        check: Callable[[], None], into: list[StepResult],
        missing_events: Callable[[], list[str]] = lambda: [],
        judge: Callable[[RunResult], Verdict] | None = None) -> StepResult:
    """Run one step and judge it; its result goes `into` the list before it runs, so that a
    LabError (SSH gone, a level crashed, the timeout) leaves it there, as an error.
    `missing_events()`, once the command ended: the expected kernel events that did not
    come. `judge`: how a peer suite's runner reads the output (default: `verdict`)."""
    log.info(f"[{step.on}] {step.name}: {step.run.strip().splitlines()[0]}")
    # The step's timeout was written for the reference host: scaled to this one.
    timeout = round(step.timeout * speed_factor, 1)
    res = StepResult(name=step.name, level=step.on, command=step.run, expected=step.expect,
                     status="error", timeout=timeout)
    into.append(res)
    t = time.monotonic()
    # Every byte of the output goes to RUN/steps/ as it came (binary kept exact); the
    # report keeps a bounded head and tail, however much the step prints.
    base = steps_dir / f"{index:02d}-{file_name(step.name)}"
    res.output_files = [f"steps/{base.name}.out", f"steps/{base.name}.err"]
    try:
        with open(f"{base}.out", "wb") as fo, open(f"{base}.err", "wb") as fe:
            r = ssh.run(step.run, timeout=timeout, check=check, keep=OUTPUT_KEEP,
                        sinks=(fo, fe))
    except LabError as e:
        res.seconds = round(time.monotonic() - t, 3)
        res.message = str(e).splitlines()[0]
        raise
    res.exit_status, res.stdout, res.stderr = r.exit_status, r.stdout, r.stderr
    res.stdout_bytes, res.stderr_bytes = r.stdout_bytes, r.stderr_bytes
    res.seconds = round(r.seconds, 3)
    if judge is None:
        v = verdict(step, r.exit_status, r.stdout, missing_events())
    else:
        v = with_events(judge(r), missing_events())
    res.status, res.message, res.cases = v.status, v.message, v.cases
    if res.status == "failed":
        log.info(f"  FAILED: {res.message}\n{_indent(r.stdout + r.stderr)}")
    return res


def run_part(step: Step, part: str, command: str, timeout: float,
             judge: Callable[[int, str, str], Verdict], index: int, ssh: SSHSession,
             steps_dir: Path, speed_factor: float, check: Callable[[], None],
             into: list[StepResult], missing_events: Callable[[], list[str]]) -> StepResult:
    """One part of a peer suite's step (a kvm-unit-tests section, a selftest) run as a step of
    its own, `STEP PART` in the report and JUnit, judged by `judge(status, stdout, stderr)`;
    `timeout` as written for the reference host (scaled like any step's)."""
    sub = dataclasses.replace(step, name=f"{step.name} {part}", run=command, tap=False,
                              timeout=round(timeout))
    return run(sub, index, ssh, steps_dir, speed_factor, check, into, missing_events,
               judge=lambda r: judge(r.exit_status, r.stdout, r.stderr))


def file_name(name: str) -> str:
    """A step's name as part of a file name: nothing in it can leave the directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-")
    return safe[:60] or "step"


def _indent(text: str, prefix: str = "    ") -> str:
    lines = text.rstrip().splitlines()[-20:]
    return "\n".join(prefix + ln for ln in lines)
