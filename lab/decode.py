"""Where a kernel event happened, in the source: `func+0xoff [module]` resolved to file:line
(and the source line itself where the lab has the source) by gdb, on the debug object the lab
already holds: the kernel's vmlinux and module debug files (its -dbg package or build tree),
or a module the lab built itself.

A WARNING names its file:line already; decoding confirms it from the code address, adds the
inline chain's innermost line, and reads the line. Source comes from the kernel build tree
(`--kernel-tree`), a source tree in the cache (`cache/kernel-source/RELEASE/`, when one is
there), or, for a module the lab built, its own source beside it; without source, file:line.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.events import Event
from lab.kernel import module_index

log = logging.getLogger(__name__)

_LINE = re.compile(r'^Line (\d+) of "([^"]+)"')
_MARK = "LAB-DECODE"


@dataclass
class Symbols:
    """One kernel's debug objects, and where its source may be."""

    vmlinux: Path | None
    module_root: Path | None
    built_modules: Path | None = None  # the lab's own modules (cache/kmod/NAME-HASH/NAME.ko)
    source_roots: list[Path] = field(default_factory=list)

    def object_for(self, module: str | None) -> Path | None:
        if module is None:
            return self.vmlinux
        if self.module_root is not None:
            ko = module_index(self.module_root).get(module)
            if ko is not None:
                return ko
        if self.built_modules is not None and self.built_modules.is_dir():
            # The newest build of that name: the one the lab loaded last.
            kos = sorted(self.built_modules.glob(f"{module}-*/{module}.ko"),
                         key=lambda p: p.stat().st_mtime)
            if kos:
                return kos[-1]
        return None


def _info_lines(obj: Path, places: list[str]) -> list[tuple[str, int] | None]:
    """gdb's `info line *(PLACE)` for each place: (file, line) or None."""
    cmd = ["gdb", "-batch", "-nx", "-q", str(obj)]
    for i, place in enumerate(places):
        cmd += ["-ex", f"echo {_MARK} {i}\\n", "-ex", f"info line *({place})"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning(f"decoding events with gdb on {obj.name}: {e}")
        return [None] * len(places)
    out: list[tuple[str, int] | None] = [None] * len(places)
    current = -1
    for line in p.stdout.splitlines():
        if line.startswith(_MARK + " "):
            current = int(line.split()[1])
            continue
        m = _LINE.match(line)
        if m and 0 <= current < len(places) and out[current] is None:
            out[current] = (m.group(2), int(m.group(1)))
    return out


def _source_line(path: str, line: int, obj: Path, roots: list[Path]) -> str | None:
    rel = path[2:] if path.startswith("./") else path
    candidates = [Path(rel)] if rel.startswith("/") else []
    candidates += [r / rel for r in roots if not rel.startswith("/")]
    candidates.append(obj.parent / Path(rel).name)  # a module the lab built: source beside it
    for c in candidates:
        try:
            lines = c.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if 0 < line <= len(lines):
            return lines[line - 1].strip()
    return None


def decode(events: list[Event], syms: Symbols,
           only: Callable[[Event], bool] = lambda ev: True) -> None:
    """Fill in `decoded` of every event that names a function (and passes `only`: a level
    running another kernel than the symbols' is not decoded with them)."""
    by_object: dict[Path, list[Event]] = {}
    for ev in events:
        if ev.decoded is not None or not ev.function or not only(ev):
            continue
        obj = syms.object_for(ev.module)
        if obj is None:
            ev.decoded = {"error": f"no debug object for {ev.module or 'the kernel'}"}
            continue
        by_object.setdefault(obj, []).append(ev)
    for obj, evs in by_object.items():
        places = [ev.function.split("/")[0] for ev in evs if ev.function]
        for ev, found in zip(evs, _info_lines(obj, places), strict=True):
            if found is None:
                ev.decoded = {"object": obj.name, "error": "gdb found no line for it"}
                continue
            path, line = found
            rel = path[2:] if path.startswith("./") else path
            # The source line of the place the kernel named (a WARN's own line), else of the
            # innermost inlined line gdb found for the address.
            src_path, src_line = path, line
            if ev.file_line:
                p, _, n = ev.file_line.rpartition(":")
                src_path, src_line = p, int(n)
            ev.decoded = {"object": obj.name, "file_line": f"{rel}:{line}",
                          "function": (ev.function or "").split("+")[0],
                          "source": _source_line(src_path, src_line, obj, syms.source_roots)}
