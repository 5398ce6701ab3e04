#!/usr/bin/env python3
"""Run one playbook N times and count how its verdicts hold: every run's status, and every case
and probe check that did not pass, with how often. A false positive of a clean playbook shows
here as a failed case in some runs only.

    .venv/bin/python benchmarks/repeat.py playbooks/invept.yaml 20 --out runs/repeat-invept
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("playbook")
    ap.add_argument("n", type=int)
    ap.add_argument("--out", default="runs/repeat", help="a run directory per run goes in here")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    statuses: collections.Counter[str] = collections.Counter()
    not_passed: collections.Counter[str] = collections.Counter()
    seconds = []
    for i in range(args.n):
        d = out / f"{i + 1:03d}"
        t = time.monotonic()
        subprocess.run([str(ROOT / ".venv" / "bin" / "lab"), "-q", "run", args.playbook,
                        "--out", str(d)], cwd=ROOT, stdout=subprocess.DEVNULL)
        seconds.append(round(time.monotonic() - t, 1))
        try:
            rep = json.loads((d / "report.json").read_text())
        except (OSError, ValueError):
            statuses["no report"] += 1
            continue
        statuses[rep["status"]] += 1
        for s in rep["steps"]:
            for c in s.get("cases") or [s]:
                if c["status"] not in ("passed", "skipped"):
                    not_passed[f"{c['name']}: {c['status']}"] += 1
        for c in rep.get("checks", []):
            if c["status"] != "passed":
                not_passed[f"check {c['name']}: {c['status']}"] += 1
        if rep.get("error"):
            not_passed[f"error {rep['error'].get('kind')}: "
                       f"{str(rep['error'].get('message'))[:100]}"] += 1
        print(f"[{i + 1}/{args.n}] {rep['status']} in {seconds[-1]} s", file=sys.stderr)
    summary = {"playbook": args.playbook, "runs": args.n, "statuses": dict(statuses),
               "not_passed": dict(not_passed), "seconds": seconds}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
