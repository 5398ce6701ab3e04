"""`lab merge`: the run directories of a suite's cells, from any number of CI jobs or machines,
read back against the suite's matrix into one report.json, one junit.xml and one report.html
with the matrix table (rows: playbook and case; columns: kernel x profile).

Inputs are checked before anything is written: an unreadable report, a run that belongs to no
cell, or two runs claiming one cell stop the merge (exit 2). A cell without a run is merged as
an error of its own (the job died before writing anything) and makes the verdict an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import junit, suite
from lab.cache import write_atomic
from lab.errors import EXIT_INFRA, EXIT_PASSED, EXIT_STEP_FAILED, UsageError
from lab.matrix import DEBIAN, Cell, Kernel

log = logging.getLogger(__name__)


@dataclass
class Merged:
    cell: Cell
    run_dir: Path | None
    report: dict[str, Any] | None

    @property
    def outcome(self) -> tuple[bool, str]:
        if self.report is None:
            return False, "missing: no run directory holds this cell"
        return self.cell.entry.outcome(self.report)


def read_run(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "report.json"
    try:
        rep: dict[str, Any] = json.loads(p.read_text())
    except OSError as e:
        raise UsageError(f"{p}: unreadable: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"{p}: not JSON: {e}") from None
    for key in ("name", "profile", "status", "steps", "levels"):
        if key not in rep:
            raise UsageError(f"{p}: {key}: missing (not a lab run's report)")
    return rep


def coordinates(rep: dict[str, Any], kernels: list[Kernel],
                where: Path) -> tuple[str, str, str]:
    tree = rep.get("kernel_tree")
    choice = rep.get("kernel_choice")
    if choice is not None:
        found = [k.label for k in kernels if k.debian is not None and k.debian.spec == choice]
        if not found:
            raise UsageError(f"{where}/report.json: kernel_choice: {choice} is on no kernel of "
                             "the matrix (--kernels)")
        label = found[0]
    elif tree is None:
        label = DEBIAN
    else:
        found = [k.label for k in kernels if k.tree is not None and str(k.tree) == tree]
        if not found:
            raise UsageError(f"{where}/report.json: kernel_tree: {tree} is on no kernel of the "
                             f"matrix (--kernels)")
        label = found[0]
    return (str(rep["name"]), str(rep["profile"]), label)


def match(cells: list[Cell], kernels: list[Kernel], run_dirs: list[Path]) -> list[Merged]:
    by_coord = {(c.name, c.profile, c.kernel.label): c for c in cells}
    found: dict[str, Merged] = {}
    for d in run_dirs:
        rep = read_run(d)
        coord = coordinates(rep, kernels, d)
        cell = by_coord.get(coord)
        if cell is None:
            raise UsageError(f"{d}/report.json: {'.'.join(coord)} is no cell of the matrix "
                             f"(expected one of {', '.join(c.key for c in cells)})")
        if cell.key in found:
            raise UsageError(f"{d}: cell {cell.key} is claimed by {found[cell.key].run_dir} "
                             "too")
        found[cell.key] = Merged(cell, d, rep)
    return [found.get(c.key) or Merged(c, None, None) for c in cells]


def _boot_s(rep: dict[str, Any] | None) -> float | None:
    return None if rep is None else rep.get("phases", {}).get("boot")


# A run that ended on one of these could not run on its kernel (a code path an injection
# patches is not there, say): its cell is skipped, with the reason, not failed.
SKIP_KINDS = ("injection", "unsupported")


def _skipped(rep: dict[str, Any]) -> str | None:
    err = rep.get("error") or {}
    return str(err.get("message") or err.get("kind")) if err.get("kind") in SKIP_KINDS else None


def summary(name: str, suite_path: Path, merged: list[Merged],
            kernels: list[Kernel], left_out: list[tuple[Cell, str]] | None = None
            ) -> dict[str, Any]:
    """The matrix's verdict and its cells; `left_out`: combinations that cannot run at all
    (a playbook that needs a gdbstub under Bochs), shown as skipped with their reason."""
    cells = []
    for m in merged:
        met, why = m.outcome
        rep = m.report or {}
        status = rep.get("status", "error")
        skip = _skipped(rep)
        if skip is not None:
            met, why, status = True, f"skipped: {skip}", "skipped"
        elif status == "error" and rep.get("error"):
            why = f"{why}: {str(rep['error'].get('message', '')).splitlines()[0][:300]}"
        cells.append({
            "key": m.cell.key, "playbook": m.cell.name, "profile": m.cell.profile,
            "kernel": m.cell.kernel.label, "expect": m.cell.expect, "met": met, "why": why,
            "status": status, "exit_status": rep.get("exit_status"),
            "run_dir": str(m.run_dir) if m.run_dir else None, "boot_s": _boot_s(m.report),
            "seconds": rep.get("phases", {}).get("total"),
            "l0_kernel": (rep.get("levels", {}).get("l0", {}).get("kernel") or {}).get("release"),
            # How the cell's L0 differed from the playbook's (a CPU without LA57)
            "note": rep.get("levels", {}).get("l0", {}).get("la57_why"),
            "cases": _cases(rep)})
    for cell, why in left_out or []:
        cells.append({
            "key": cell.key, "playbook": cell.name, "profile": cell.profile,
            "kernel": cell.kernel.label, "expect": cell.expect, "met": True,
            "why": f"skipped: {why}", "status": "skipped", "exit_status": None, "run_dir": None,
            "boot_s": None, "seconds": None, "l0_kernel": None, "note": None, "cases": {}})
    if any(c["status"] == "error" for c in cells):
        code = EXIT_INFRA
    elif all(c["met"] for c in cells):
        code = EXIT_PASSED
    else:
        code = EXIT_STEP_FAILED
    return {"name": name, "suite": str(suite_path), "exit_status": code,
            "status": {0: "passed", 1: "failed"}.get(code, "error"),
            "profiles": sorted({c["profile"] for c in cells}),
            "kernels": [k.label for k in kernels], "cells": cells}


def _cases(rep: dict[str, Any]) -> dict[str, str]:
    """The run's verdicts by case: each TAP case, each step without cases."""
    out: dict[str, str] = {}
    for s in rep.get("steps", []):
        if s.get("cases"):
            for c in s["cases"]:
                out[f"{s['level']}: {c['name']}"] = c["status"]
        else:
            out[f"{s['level']}: {s['name']}"] = s["status"]
    return out


def _skipped_suite(key: str, axis: str, name: str, why: str) -> Any:
    """A cell that could not run here, as JUnit says it: one skipped testcase, with why."""
    import xml.etree.ElementTree as ET

    sub = ET.Element("testsuite", name=key, tests="1", failures="0", errors="0", skipped="1")
    case = ET.SubElement(sub, "testcase", name=name, time="0", classname=f"{axis}{name}")
    ET.SubElement(case, "skipped", message=why[:500])
    return sub


def write(out: Path, summ: dict[str, Any], merged: list[Merged], suite_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(summ, indent=1) + "\n")
    suites = []
    for m in merged:
        axis = f"{m.cell.kernel.label}.{m.cell.profile}."
        skip = _skipped(m.report) if m.report is not None else None
        if skip is not None:
            sub = _skipped_suite(m.cell.key, axis, m.cell.name, skip)
        elif m.report is None:
            sub = junit.testsuite({"name": m.cell.name, "run_dir": "", "levels": {},
                                   "steps": [], "phases": {}, "profile": m.cell.profile,
                                   "error": {"message": m.outcome[1]}})
            for case in sub.findall("testcase"):
                case.set("classname", axis + case.get("classname", ""))
        else:
            sub = suite.judged_testsuite(suite_name, m.cell.entry, m.report, axis=axis)
        sub.set("name", m.cell.key)
        suites.append(sub)
    for c in summ["cells"]:  # combinations that never ran
        if c["status"] == "skipped" and c["run_dir"] is None:
            suites.append(_skipped_suite(c["key"], f"{c['kernel']}.{c['profile']}.",
                                         c["playbook"], c["why"].removeprefix("skipped: ")))
    junit.write(suites, out / "junit.xml", name=suite_name)
    from lab.html import write_matrix

    write_matrix(summ, out)
