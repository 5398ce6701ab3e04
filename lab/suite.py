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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lab import junit, schema
from lab.errors import EXIT_INFRA, EXIT_PASSED, EXIT_STEP_FAILED, UsageError

SUITE_SPEC = schema.Map({
    "name": schema.Field(schema.run_name()),  # the suite's run directory's name too
    "description": schema.Field(schema.Str(multiline=True), default=""),
    "suite": schema.Field(schema.List(schema.Map({
        "playbook": schema.Field(schema.Str(), required=True),
        "expect": schema.Field(schema.Str(choices=("passed", "failed")), default="passed"),
    })), required=True),
})


@dataclass
class Entry:
    playbook: Path
    expect: str


@dataclass
class Suite:
    path: Path
    name: str
    description: str
    entries: list[Entry]


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
        entries.append(Entry(p, e["expect"]))
    if not entries:
        raise UsageError(f"{path}:1: suite: expected at least one playbook")
    return Suite(path, data["name"] or path.stem, data["description"], entries)


def outcome(expect: str, report: dict[str, Any]) -> tuple[bool, str]:
    """Did a run meet its expectation? An expected failure must fail by its tests (status
    failed, exit 1), never by an error of the lab."""
    status = report["status"]
    if expect == "passed":
        return status == "passed", status
    if status == "failed":
        caught = [c["name"] for s in report["steps"] for c in s.get("cases", [])
                  if c["status"] == "failed"] or [s["name"] for s in report["steps"]
                                                  if s["status"] == "failed"]
        return True, f"failed as expected; caught by: {', '.join(caught)}"
    return False, f"expected to fail, but {status}"


def judged_testsuite(suite_name: str, expect: str, rep: dict[str, Any],
                     axis: str = "") -> ET.Element:
    """A run's own testsuite (lab/junit.py, from its report), judged against what the suite
    expects of it; `axis` ("KERNEL.PROFILE.") leads every classname in a matrix."""
    sub = junit.testsuite(rep)
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
    met, why = outcome(expect, rep)
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
    return [judged_testsuite(suite.name, e.expect, rep) for e, _, rep in runs]


def exit_status(results: list[tuple[Entry, dict[str, Any]]]) -> int:
    if any(r["status"] == "error" for _, r in results):
        return EXIT_INFRA
    if all(outcome(e.expect, r)[0] for e, r in results):
        return EXIT_PASSED
    return EXIT_STEP_FAILED


def write(suite: Suite, run_dir: Path, runs: list[tuple[Entry, Path, dict[str, Any]]],
          seconds: float) -> int:
    code = exit_status([(e, r) for e, _, r in runs])
    summary = {
        "name": suite.name, "suite": str(suite.path), "exit_status": code,
        "status": {0: "passed", 1: "failed"}.get(code, "error"), "seconds": round(seconds, 3),
        "runs": [{"playbook": str(e.playbook), "expect": e.expect, "status": r["status"],
                  "exit_status": r.get("exit_status"), "met": outcome(e.expect, r)[0],
                  "why": outcome(e.expect, r)[1], "run_dir": str(d),
                  "seconds": r.get("phases", {}).get("total")} for e, d, r in runs],
    }
    (run_dir / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    junit.write(junit_suites(suite, runs), run_dir / "junit.xml", name=suite.name)
    from lab.html import write_suite

    write_suite(summary, run_dir)
    return code
