"""Suites: a playbook of playbooks (the nightly run), with one JUnit file a CI server reads.

    name: nightly
    suite:
      - playbook: smoke.yaml
      - playbook: invept-bug-injected.yaml
        expect: failed          # an expected failure: it passes when the bug is caught

Every playbook of the suite is validated before anything boots.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab import junit, schema
from lab.errors import EXIT_INFRA, EXIT_PASSED, EXIT_STEP_FAILED, UsageError
from lab.profiles import PROFILES

SUITE_SPEC = schema.Map({
    "name": schema.Field(schema.run_name()),  # the suite's run directory's name too
    "description": schema.Field(schema.Str(multiline=True), default=""),
    "suite": schema.Field(schema.List(schema.Map({
        "playbook": schema.Field(schema.Str(), required=True),
        "expect": schema.Field(schema.Str(choices=("passed", "failed")), default="passed"),
        # For an expected failure: the cases (TAP cases, steps or probe checks) that must fail,
        # by a stale or wrong read rather than an error of their own, and those that must pass.
        "cases": schema.Field(schema.Map({
            "failed": schema.Field(schema.List(schema.Str(max_len=200)), default=None),
            "passed": schema.Field(schema.List(schema.Str(max_len=200)), default=None),
        }), default=None),
    })), required=True),
    # Every playbook under every kernel and profile named (lab/matrix.py); `lab run` runs the
    # cells one after another, `lab ci gitlab` makes a job of each.
    "matrix": schema.Field(schema.Map({
        "kernel": schema.Field(schema.List(schema.Str(max_len=300)), default=None),
        "profile": schema.Field(schema.List(schema.Str(choices=tuple(PROFILES))),
                                default=None),
    }), default=None),
})


@dataclass
class Entry:
    playbook: Path
    expect: str
    must_fail: list[str] = field(default_factory=list)  # cases that must catch the bug
    must_pass: list[str] = field(default_factory=list)  # cases that cannot see it

    def outcome(self, report: dict[str, Any]) -> tuple[bool, str]:
        return outcome(self.expect, report, self.must_fail, self.must_pass)


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    entries: list[Entry]
    kernels: list[str] | None = None  # the matrix's kernel axis, as written (None: no matrix)
    profiles: list[str] | None = None
    line: int = 1  # where the matrix is, for errors

    @property
    def is_matrix(self) -> bool:
        return self.kernels is not None or self.profiles is not None


def is_suite(path: Path) -> bool:
    try:
        node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(node, yaml.MappingNode) and any(
        isinstance(k, yaml.ScalarNode) and k.value == "suite" for k, _ in node.value)


def load(path: Path) -> Suite:
    from lab import playbook

    data = schema.load(path, SUITE_SPEC)
    entries = []
    for i, e in enumerate(data["suite"]):
        p = (path.parent / e["playbook"]).resolve()
        if not p.exists():
            raise UsageError(f"{e.where('playbook')}: suite[{i}].playbook: no file {p}")
        if is_suite(p):
            raise UsageError(f"{e.where('playbook')}: suite[{i}].playbook: suites do not nest")
        playbook.load(p)  # validate now, before anything boots
        cases = e["cases"] or {"failed": None, "passed": None}
        if (cases["failed"] or cases["passed"]) and e["expect"] != "failed":
            raise UsageError(f"{e.where('cases')}: suite[{i}].cases: only an expected failure "
                             "(expect: failed) names its cases")
        entries.append(Entry(p, e["expect"], list(cases["failed"] or []),
                             list(cases["passed"] or [])))
    if not entries:
        raise UsageError(f"{path}:1: suite: expected at least one playbook")
    m = data["matrix"]
    return Suite(path, data["name"] or path.stem, data["description"], entries,
                 kernels=list(m["kernel"]) if m and m["kernel"] else None,
                 profiles=list(m["profile"]) if m and m["profile"] else None,
                 line=data.lines.get("matrix", 1))


STALE = "stale or wrong"  # what a guest case says when it read what L0 should have dropped


def verdicts(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every case of a run by name: TAP cases, steps without cases, probe checks ->
    (status, message)."""
    out: dict[str, tuple[str, str]] = {}
    for s in report["steps"]:
        for c in s.get("cases", []):
            out[c["name"]] = (c["status"], c.get("message", ""))
        if not s.get("cases"):
            out[s["name"]] = (s["status"], s.get("message", ""))
    for c in report.get("checks", []):
        out[c["name"]] = (c["status"], c.get("message", ""))
    return out


def outcome(expect: str, report: dict[str, Any], must_fail: list[str] | None = None,
            must_pass: list[str] | None = None) -> tuple[bool, str]:
    """Did a run meet its expectation? An expected failure must fail by its tests (status
    failed, exit 1), never by an error of the lab; named cases must fail by a stale or wrong
    read (a guest case) or a failed verdict (a probe check), and others must pass."""
    status = report["status"]
    if expect == "passed":
        return status == "passed", status
    if status != "failed":
        return False, f"expected to fail, but {status}"
    got = verdicts(report)
    caught = [n for n, (st, _) in got.items() if st == "failed"]
    wrong = []
    for name in must_fail or []:
        st, msg = got.get(name, ("missing", ""))
        if st != "failed":
            wrong.append(f"{name} {st}, expected to fail")
        elif name not in {c["name"] for c in report.get("checks", [])} and STALE not in msg:
            wrong.append(f"{name} failed, but not by a stale read ({msg[:80]})")
    for name in must_pass or []:
        st, _ = got.get(name, ("missing", ""))
        if st != "passed":
            wrong.append(f"{name} {st}, expected to pass")
    if wrong:
        return False, "failed, but not as expected: " + "; ".join(wrong)
    return True, f"failed as expected; caught by: {', '.join(caught)}"


def judged_testsuite(suite_name: str, entry: Entry, rep: dict[str, Any],
                     axis: str = "") -> ET.Element:
    """A run's own testsuite (lab/junit.py, from its report), judged against what the suite
    expects of it; `axis` ("KERNEL.PROFILE.") leads every classname in a matrix."""
    sub = junit.testsuite(rep)
    expect = entry.expect
    if expect == "failed":
        # Failing cases are the point of this run: report them as passed (caught), and a
        # case that did not fail as skipped (it cannot see the injected bug).
        for tc in sub.findall("testcase"):
            f = tc.find("failure")
            if f is not None:
                tc.remove(f)
                ET.SubElement(tc, "system-out").text = \
                    f"expected failure (caught): {f.get('message', '')}"
            elif tc.find("error") is None and tc.find("skipped") is None and \
                    tc.get("classname", "").split(".")[-1] not in ("boot", "events"):
                ET.SubElement(tc, "skipped", message="passed although the bug was "
                                                     "injected: this case does not catch it")
        sub.set("failures", "0")
    met, why = entry.outcome(rep)
    tc = ET.SubElement(sub, "testcase", classname=f"{suite_name}.expectations",
                       name=f"{rep.get('name', '?')} {expect}")
    if not met:
        ET.SubElement(tc, "failure", message=why)
        sub.set("failures", str(int(sub.get("failures", "0")) + 1))
    else:
        ET.SubElement(tc, "system-out").text = why
    if axis:
        for case in sub.findall("testcase"):
            case.set("classname", axis + case.get("classname", ""))
    sub.set("tests", str(len(sub.findall("testcase"))))
    sub.set("skipped", str(len(sub.findall("testcase/skipped"))))
    return sub


def junit_suites(suite: Suite,
                 runs: list[tuple[Entry, Path, dict[str, Any]]]) -> list[ET.Element]:
    return [judged_testsuite(suite.name, e, rep) for e, _, rep in runs]


def exit_status(results: list[tuple[Entry, dict[str, Any]]]) -> int:
    if any(r["status"] == "error" for _, r in results):
        return EXIT_INFRA
    if all(e.outcome(r)[0] for e, r in results):
        return EXIT_PASSED
    return EXIT_STEP_FAILED


def specificity(runs: list[tuple[Entry, Path, dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """Which case catches which injected bug: per injected run (column: the injection and the
    playbook), each case caught (failed), not caught (passed), or what else it was."""
    out: dict[str, dict[str, str]] = {}
    for _, _, r in runs:
        inj = (r.get("injection") or {}).get("name")
        if not inj:
            continue
        out[f"{inj} ({r.get('name')})"] = {
            name: {"failed": "caught", "passed": "not caught"}.get(st, st)
            for name, (st, _) in verdicts(r).items()}
    return out


def write(suite: Suite, run_dir: Path, runs: list[tuple[Entry, Path, dict[str, Any]]],
          seconds: float) -> int:
    code = exit_status([(e, r) for e, _, r in runs])
    summary = {
        "name": suite.name, "suite": str(suite.path), "exit_status": code,
        "status": {0: "passed", 1: "failed"}.get(code, "error"), "seconds": round(seconds, 3),
        "runs": [{"playbook": str(e.playbook), "expect": e.expect, "status": r["status"],
                  "exit_status": r.get("exit_status"), "met": met, "why": why,
                  "run_dir": str(d), "seconds": r.get("phases", {}).get("total")}
                 for e, d, r in runs for met, why in [e.outcome(r)]],
        "specificity": specificity(runs),
    }
    (run_dir / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    junit.write(junit_suites(suite, runs), run_dir / "junit.xml", name=suite.name)
    from lab.html import write_suite

    write_suite(summary, run_dir)
    return code
