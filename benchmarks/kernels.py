#!/usr/bin/env python3
"""Kernels by series: how long resolving and fetching each takes cold (a cache of its own) and
cached, and the nested chain's boot per kernel (cold, then warm). Prints one JSON object.

    .venv/bin/python benchmarks/kernels.py                  # 5.10 6.1 6.12 7.x
    .venv/bin/python benchmarks/kernels.py 6.12 --no-boot
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_fetch(series: str, cache: Path) -> dict[str, float]:
    """Resolve (the lab's apt root for the suite, lists included) and fetch image and debug
    symbols into `cache`, as the lab does for an image; seconds for each."""
    code = f"""
import json, time
from lab.image import load_recipe
from lab.matrix import SERIES
from lab.kernel import DebianChoice
from pathlib import Path
c = DebianChoice.parse(SERIES[{series!r}], "series")
t = time.monotonic()
k = load_recipe(Path({str(ROOT / 'images' / 'default.yaml')!r}), debian=c, latest=True).kernel
pkg = k._resolve()
t1 = time.monotonic()
k.fetch(Path({str(cache)!r}))
t2 = time.monotonic()
k.fetch_debug(Path({str(cache)!r}))
t3 = time.monotonic()
print(json.dumps({{"package": pkg.name + "=" + pkg.version, "resolve_s": round(t1 - t, 2),
                  "fetch_s": round(t2 - t1, 2), "debug_s": round(t3 - t2, 2)}}))
"""
    env = {**os.environ, "LAB_CACHE": str(cache)}
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], env=env,
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def boot(series: str, out: Path, cold: bool) -> dict[str, object]:
    from lab.matrix import SERIES

    args = [str(ROOT / ".venv" / "bin" / "lab"), "-q", "run", "playbooks/nested.yaml",
            "--kernel", SERIES[series], "--out", str(out)]
    if cold:
        args.append("--cold")
    subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL)
    rep = json.loads((out / "report.json").read_text())
    return {"status": rep["status"], "mode": rep["boot"].get("mode"),
            "boot_s": rep["phases"].get("boot"),
            "ssh_ready_s": {n: lv["timeline"].get("ssh_ready")
                            for n, lv in rep["levels"].items()},
            "error": (rep.get("error") or {}).get("message", "")[:200] or None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="*", default=["5.10", "6.1", "6.12", "7.x"])
    ap.add_argument("--no-boot", action="store_true")
    args = ap.parse_args()
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="lab-bench-kernels-") as d:
        for s in args.series:
            cold_cache = Path(d) / f"cache-{s}"
            cold_cache.mkdir()
            row: dict[str, object] = {"cold": timed_fetch(s, cold_cache)}
            row["cached"] = timed_fetch(s, cold_cache)
            shutil.rmtree(cold_cache)
            if not args.no_boot:
                row["nested_cold"] = boot(s, Path(d) / f"cold-{s}", cold=True)
                row["nested_warm"] = boot(s, Path(d) / f"warm-{s}", cold=False)
            result[s] = row
            print(json.dumps({s: row}), flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
