"""What a person is told of a running lab's kernel events, by the commands they use on it.

The lab records every event in its record (state.json) the moment it happens. The next `lab
ssh`, `lab cp`, `lab gdb` or `lab status` prints a one-line alert on stderr for each event no
command has told of yet (RUN/alerts.seen keeps the count), and refuses to reach a level whose
kernel crashed instead of timing out on it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from lab import access
from lab.cache import write_atomic

SEEN = "alerts.seen"


def line(ev: dict[str, Any], run_dir: Path) -> str:
    exp = f", expected by {ev['expected_by']}" if ev.get("expected") else ""
    return (f"lab: alert: {ev['level']}: kernel event #{ev['seq']} at {ev['t']:.1f} s"
            f"{exp}: {ev['summary']} ({run_dir}/{ev['level']}.console.log)")


def tell(run_dir: Path, state: dict[str, Any]) -> None:
    """Print the alerts no command has printed yet, once each."""
    evs = state.get("events") or []
    seen = 0
    with contextlib.suppress(OSError, ValueError):
        seen = int((run_dir / SEEN).read_text().strip() or 0)
    new = [ev for ev in evs if int(ev.get("seq", 0)) > seen]
    for ev in new:
        print(line(ev, run_dir), file=sys.stderr)
    if new:
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            write_atomic(run_dir / SEEN, str(max(int(ev["seq"]) for ev in new)))


def crashed(state: dict[str, Any], level: str) -> str | None:
    """Why `level` cannot be reached (its kernel, or its parent's, crashed), or None."""
    levels = state.get("levels") or {}
    if (levels.get(level) or {}).get("state") != "crashed":
        return None
    chain = access.chain(levels, level)
    fatal = [ev for ev in state.get("events") or [] if ev.get("fatal")
             and ev.get("level") in chain]
    if not fatal:
        return f"{level}'s kernel crashed"
    ev = fatal[0]
    where = "" if ev["level"] == level else f" ({level} runs inside {ev['level']})"
    return (f"{ev['level']}'s kernel crashed{where}: kernel event #{ev['seq']} at "
            f"{ev['t']:.1f} s: {ev['summary']}")


def status_text(run_dir: Path, st: dict[str, Any]) -> str:
    """`lab status`: the lab, its levels and their state, and every event so far."""
    out = [f"lab {st.get('id')}: {st.get('status')} (playbook {st.get('playbook')}, profile "
           f"{st.get('profile')}); {run_dir}"]
    if st.get("problem"):
        out.append(f"  problem: {st['problem']}")
    for name, lv in (st.get("levels") or {}).items():
        state = lv.get("state", "?") if st.get("status") == "up" else st.get("status")
        via = f" via {lv['via']}" if lv.get("via") else ""
        out.append(f"  {name}: {state}{via}; console {run_dir}/{lv.get('console_log')}")
    evs = st.get("events") or []
    out.append(f"kernel events: {len(evs)}" + (":" if evs else ""))
    for ev in evs:
        tag = f"expected by {ev['expected_by']}" if ev.get("expected") else "UNEXPECTED"
        out.append(f"  #{ev['seq']} {ev['t']:8.1f} s  {ev['level']}  {ev['summary']}  [{tag}]")
    return "\n".join(out)
