"""`lab kcidb`: run directories as KernelCI's KCIDB I/O data (schema 5.3): the kernel under test
as a checkout and a build, each level's boot, each step or TAP case and each kernel event as a
test, with the run's logs as output files. Submitting is the user's:

    lab kcidb runs/*/ --origin myci > results.json
    kcidb-submit -p PROJECT -t TOPIC < results.json

The kernels are Debian's packages or a build tree: a checkout is identified by the kernel
release and where it came from (a git commit where the tree is a git checkout).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lab.errors import UsageError

VERSION = {"major": 5, "minor": 3}
_ORIGIN = re.compile(r"^[a-z0-9_]+$")
# Lab status -> KCIDB status: a failed case reports the kernel as faulty (FAIL); a lab error
# leaves the kernel's status unknown (ERROR); a skipped case did not apply (SKIP).
STATUS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}


def _part(s: str) -> str:
    """A piece of a test path: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "x"


def _url(base: str | None, run_dir: Path, name: str) -> str:
    if base:
        return f"{base.rstrip('/')}/{quote(run_dir.name)}/{quote(name)}"
    return (run_dir.resolve() / name).as_uri()


def _git_commit(tree: str | None) -> str | None:
    if not tree:
        return None
    try:
        r = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=30)
    except OSError:
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out) else None


def convert(runs: list[tuple[Path, dict[str, Any]]], origin: str,
            log_base: str | None = None) -> dict[str, Any]:
    """KCIDB I/O data for the runs (each: its directory and its report)."""
    if not _ORIGIN.match(origin):
        raise UsageError(f"--origin {origin!r}: expected lowercase letters, digits and '_'")
    checkouts: dict[str, dict[str, Any]] = {}
    builds: dict[str, dict[str, Any]] = {}
    tests: list[dict[str, Any]] = []
    for run_dir, rep in runs:
        l0 = rep.get("levels", {}).get("l0", {})
        kernel = l0.get("kernel") or {}
        release = str(kernel.get("release") or "unknown")
        tree = rep.get("kernel_tree")
        commit = _git_commit(tree)
        ident = commit or hashlib.sha256(f"{release} {tree or kernel.get('source')}"
                                         .encode()).hexdigest()[:16]
        checkout_id = f"{origin}:{ident}"
        checkouts.setdefault(checkout_id, {
            "id": checkout_id, "origin": origin,
            "tree_name": "local" if tree else "debian",
            **({"git_commit_hash": commit} if commit else {}),
            "comment": f"Linux {release}" + (f" from the build tree {tree}" if tree else
                                             f" ({kernel.get('source', 'Debian package')})"),
            "valid": True})
        build_id = f"{origin}:{ident}-x86_64"
        builds.setdefault(build_id, {
            "id": build_id, "origin": origin, "checkout_id": checkout_id,
            "architecture": "x86_64", "status": "PASS",
            "comment": f"{release}: the kernel booted as L0 (and as every level running it)"})
        base = ".".join(["lab", _part(rep["name"]), _part(str(rep.get("profile")))])
        run_id = _part(f"{run_dir.name}-{rep.get('started', '')}")
        env = {"comment": f"profile {rep.get('profile')}: L0 under the profile's emulator, "
                          f"levels {', '.join(rep.get('levels', {}))}",
               "misc": {"run_dir": str(run_dir), "profile": rep.get("profile")}}
        logs = [{"name": n, "url": _url(log_base, run_dir, n)}
                for n in sorted(rep.get("logs", {}))]

        def test(path: str, status: str, seconds: float | None = None, comment: str = "",
                 run_id: str = run_id, base: str = base, build_id: str = build_id,
                 env: dict[str, Any] = env, logs: list[dict[str, str]] = logs) -> None:
            t: dict[str, Any] = {
                "id": f"{origin}:{run_id}:{len(tests)}", "origin": origin,
                "build_id": build_id, "path": f"{base}.{path}", "status": status,
                "environment": env, "output_files": logs}
            if seconds is not None:
                t["duration"] = float(seconds)
            if comment:
                t["comment"] = comment[:1000]
            tests.append(t)

        err = rep.get("error") or {}
        for lv, info in rep.get("levels", {}).items():
            tl = info.get("timeline", {})
            ok = "ssh_ready" in tl
            test(f"boot.{_part(lv)}", "PASS" if ok else "ERROR",
                 tl["ssh_ready"] - tl.get("launch", 0.0) if ok else None,
                 "" if ok else str(err.get("message", "did not boot")))
        for s in rep.get("steps", []):
            spath = f"{_part(s['level'])}.{_part(s['name'])}"
            if s.get("cases"):
                for c in s["cases"]:
                    test(f"{spath}.{_part(c['name'])}", STATUS.get(c["status"], "ERROR"),
                         comment=c.get("message", ""))
            else:
                test(spath, STATUS.get(s["status"], "ERROR"), s.get("seconds"),
                     s.get("message", ""))
        for ev in rep.get("events", []):
            # An event nobody expected reports the kernel as faulty.
            test(f"events.{_part(ev['level'])}.{_part(ev['kind'])}",
                 "PASS" if ev.get("expected") else "FAIL", comment=ev.get("summary", ""))
    return {"version": VERSION, "checkouts": list(checkouts.values()),
            "builds": list(builds.values()), "tests": tests}
