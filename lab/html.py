"""report.html: what a person reads first. It opens from disk with nothing else running."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2

_env = jinja2.Environment(loader=jinja2.PackageLoader("lab", "templates"),
                          autoescape=jinja2.select_autoescape(["html", "j2"]),
                          undefined=jinja2.StrictUndefined)


class _Obj(dict[str, Any]):
    """Dict with attribute access, so templates read r.status rather than r['status']."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _wrap(v: Any) -> Any:
    if isinstance(v, dict):
        return _Obj({k: _wrap(x) for k, x in v.items()})
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


def render(report: dict[str, Any], run_dir: Path) -> str:
    r = _wrap(report)
    ends = [tl.get("ssh_ready", tl.get("launch", 0)) for lv in r["levels"].values()
            for tl in [lv.get("timeline", {})]]
    span = max([*ends, r["phases"].get("total", 1.0), 1.0])
    logs = sorted(p.name for p in run_dir.iterdir()
                  if p.suffix in (".log", ".xml", ".json") and p.is_file())
    return _env.get_template("report.html.j2").render(
        r=r, exit_status=report.get("exit_status"), span=span, logs=logs)


def write(report: dict[str, Any], run_dir: Path) -> Path:
    out = run_dir / "report.html"
    out.write_text(render(report, run_dir))
    return out


def write_suite(summary: dict[str, Any], run_dir: Path) -> Path:
    s = _wrap(summary)
    for r in s["runs"]:
        d = Path(r["run_dir"])
        r["link"] = f"{d.relative_to(run_dir)}/report.html" if d.is_relative_to(run_dir) \
            else f"file://{d}/report.html"
    out = run_dir / "report.html"
    out.write_text(_env.get_template("suite.html.j2").render(s=s))
    return out


def write_matrix(summary: dict[str, Any], out_dir: Path) -> Path:
    """The merged report of a suite's matrix (lab/merge.py): rows playbook and case, columns
    kernel x profile."""
    rows: dict[str, dict[str, Any]] = {}
    for c in summary["cells"]:
        row = rows.setdefault(c["playbook"], {"name": c["playbook"], "cells": {}, "cases": []})
        d = Path(c["run_dir"]) if c["run_dir"] else None
        link = f"{os.path.relpath(d, out_dir)}/report.html" if d is not None else ""
        row["cells"][(c["kernel"], c["profile"])] = _wrap({**c, "link": link})
        row["cases"] += [k for k in c["cases"] if k not in row["cases"]]
    out = out_dir / "report.html"
    out.write_text(_env.get_template("matrix.html.j2").render(s=_wrap(summary),
                                                               rows=list(rows.values())))
    return out
