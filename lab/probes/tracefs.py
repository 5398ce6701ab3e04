"""The second probe backend: kprobe events in L0's tracefs, driven over SSH.

For L0s without a gdbstub (Bochs, real machines), and for probes too hot for a debugger stop
(a kprobe hit costs microseconds, a gdb stop tens of milliseconds). The same probe descriptions
as the gdb backend: captures are compiled on the host by gdb from the vmlinux and module DWARF
into kprobe fetch arguments (+OFFSET(BASE)), so nothing is hard-coded per kernel. Hits come back
as the same records.

Return probes cannot fetch entry arguments, so `when: return` becomes one kprobe per way out
of the function, at the last instruction where DWARF still locates what the captures need
(locals included); `if: $_caller_is("F", 1)` becomes one kprobe per call in F; comparisons of
an expression with a number, joined by && or ||, become the event's filter. What tracing
cannot do, it says per probe (error), instead of guessing: comparing two fields, and
expressions beyond VAR->field chains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.probes.spec import ProbeSpec, guest_mmu_record, probe_record, root_record
from lab.ssh import SSHSession

log = logging.getLogger(__name__)

TRACE = "/sys/kernel/tracing"
GROUP = "lab"
_LINE = re.compile(r"^\s*\S+-\d+\s+\[(?P<cpu>\d+)\]\s+\S+\s+(?P<ts>\d+\.\d+): (?P<event>\w+): "
                   r"\((?P<where>[^)]*)\)(?P<fields>.*)$")


def compile_probes(specs: list[ProbeSpec], vmlinux: Path, modules: list[Path],
                   log_dir: Path) -> list[dict[str, Any]]:
    """Ask gdb (batch, on the host) for every offset the probes' captures need."""
    helper = log_dir / "tracefs-compile.py"
    helper.write_bytes((resources.files("lab.probes") / "tracefs_compile.py").read_bytes())
    # Any distinct kernel-like address will do for a module's .text (offsets are what comes
    # back); at 0 gdb finds no block for a function's pc.
    bases = {str(ko): 0xFFFFFFFFC0000000 + i * 0x1000000 for i, ko in enumerate(modules)}
    req = {"probes": [{"name": s.name, "at": s.at, "when": s.when, "condition": s.condition,
                       "captures": {n: dataclasses.asdict(c) for n, c in s.parsed.items()}}
                      for s in specs], "bases": bases}
    cmd = ["gdb", "-batch", "-nx", "-q", str(vmlinux)]
    for ko, base in bases.items():
        cmd += ["-ex", f"add-symbol-file {ko} {base:#x}"]
    cmd += ["-x", str(helper)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, LAB_TRACEFS_REQUEST=json.dumps(req)))
    m = re.search(r"^LAB-TRACEFS (.*)$", p.stdout, re.M)
    if not m:
        raise LabError(f"compiling tracefs probes: gdb said: {(p.stdout + p.stderr)[-800:]}")
    compiled: list[dict[str, Any]] = json.loads(m.group(1))
    return compiled


def event_name(probe: str, site: int = 0) -> str:
    """The kprobe event of a probe's site: its first site is named after the probe."""
    base = re.sub(r"\W", "_", probe)[:56]
    return base if site == 0 else f"{base}_{site}"


def sites_of(compiled: dict[str, Any], at: str) -> list[dict[str, Any]]:
    """Where a compiled probe fires; one entry site at `at` if the compiler named none."""
    return compiled.get("sites") or [{"func": at, "offset": 0, "when": "entry",
                                      "captures": compiled["captures"]}]


def event_line(compiled: dict[str, Any], at: str, site: int = 0) -> str:
    s = sites_of(compiled, at)[site]
    where = s["func"] + (f"+{s['offset']:#x}" if s["offset"] else "")
    target = f"{compiled['module']}:{where}" if compiled.get("module") else where
    args = [f"{name}={fetch}" for name, fetch in (s.get("if_fetch") or {}).items()]
    for cname, cap in s["captures"].items():
        for field, fetch in cap["fetch"].items():
            args.append(f"{_field(cname, field)}={fetch}")
    return f"p:{GROUP}/{event_name(compiled['name'], site)} {target} " + " ".join(args)


def _field(capture: str, part: str) -> str:
    return re.sub(r"\W", "_", f"{capture}__{part}")


def parse_trace(text: str) -> list[dict[str, Any]]:
    """Lines of /sys/kernel/tracing/trace -> {ts, event, where, fields{name: int}}."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        fields = {k: int(v, 0) for k, v in re.findall(r"(\w+)=(0x[0-9a-fA-F]+|-?\d+)",
                                                      m.group("fields"))}
        out.append({"ts": float(m.group("ts")), "event": m.group("event"),
                    "cpu": int(m.group("cpu")),
                    "where": m.group("where"), "fields": fields})
    return out


def assemble(captures: dict[str, Any], fields: dict[str, int]) -> dict[str, Any]:
    """One site's compiled captures, filled in from one trace record's fields."""
    caps: dict[str, Any] = {}
    for cname, cap in captures.items():
        def get(part: str, cname: str = cname) -> int:
            return fields[_field(cname, part)]

        if cap["kind"] == "value":
            caps[cname] = get("v")
            continue
        prev = [root_record(get(f"p{k}_pgd"), get(f"p{k}_hpa")) for k in range(cap["prev"])]
        vcpu = get("vcpu") + cap["extra"]
        caps[cname] = guest_mmu_record(
            root_record(get("cur_pgd"), get("cur_hpa")), prev,
            # "guest_mmu is active" is decided here: mmu == &vcpu->arch.guest_mmu
            get("mmu") == vcpu + cap["guest_mmu_offset"], vcpu=vcpu)
    return caps


class TraceProbes:
    """ProbeBackend through kprobe events in L0 (no stop, no gdbstub)."""

    name = "tracefs"

    def __init__(self, ssh: SSHSession, specs: list[ProbeSpec], compiled: list[dict[str, Any]],
                 t0: float, trace_log: Path | None = None,
                 setup: dict[str, Any] | None = None) -> None:
        self.ssh = ssh
        self.trace_log = trace_log  # where the raw trace goes (the run's tracefs.log)
        self.specs = specs
        self.compiled = compiled
        self.t0 = t0
        self.error: str | None = None
        self.setup = setup or {}
        self.hits: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
        self.errors = {c["name"]: c["error"] for c in compiled}
        self.lines: dict[str, str] = {}  # event -> its kprobe_events line
        # event -> (its probe, its site): looked up once per trace record
        self.events: dict[str, tuple[ProbeSpec, dict[str, Any]]] = {}
        for spec, c in zip(specs, compiled, strict=True):
            if c["error"]:
                continue
            for i, site in enumerate(sites_of(c, spec.at)):
                self.lines[event_name(spec.name, i)] = event_line(c, spec.at, i)
                self.events[event_name(spec.name, i)] = (spec, site)
        self.clock: tuple[float, float] | None = None  # (host t, guest trace ts) at start

    def _sh(self, script: str, timeout: float = 60) -> str:
        r = self.ssh.run(script, timeout=timeout)
        if r.exit_status != 0:
            raise LabError(f"tracefs: {r.stderr.strip() or r.stdout.strip()}", level="l0")
        return r.stdout

    def start(self) -> None:
        cmds = [f"mountpoint -q {TRACE} || mount -t tracefs nodev {TRACE}",
                f"echo 0 > {TRACE}/tracing_on", f"echo > {TRACE}/trace",
                # One clock for every CPU: a vCPU's hits taken on two of L0's CPUs must
                # still come out in the order they happened (the default clock is per CPU).
                f"echo global > {TRACE}/trace_clock",
                f"echo 16384 > {TRACE}/buffer_size_kb"]
        for spec, c in zip(self.specs, self.compiled, strict=True):
            if c["error"]:
                log.info(f"probe {spec.name}: {c['error']}")
        for ev, line in self.lines.items():
            spec, site = self.events[ev]
            cmds.append(f"echo '{line}' >> {TRACE}/kprobe_events || "
                        f"{{ echo \"{spec.name}: $(tail -3 {TRACE}/error_log)\"; }}")
            filt = site.get("filter")
            if filt:  # the probe's condition, compiled (lab/probes/tracefs_compile.py)
                cmds.append(f"echo '{filt}' > {TRACE}/events/{GROUP}/{ev}/filter || "
                            f"echo \"{spec.name}: filter {filt!r} refused\"")
            cmds.append(f"[ -d {TRACE}/events/{GROUP}/{ev} ] && "
                        f"echo 1 > {TRACE}/events/{GROUP}/{ev}/enable")
        cmds.append(f"echo 1 > {TRACE}/tracing_on")
        # The trace clock ("global": seconds since boot, like "local") against the host's,
        # to place hits.
        cmds.append("cut -d' ' -f1 /proc/uptime")
        out = self._sh("; ".join(cmds) + "; true")
        host_now = time.monotonic() - self.t0
        lines = out.strip().splitlines()
        for ln in lines[:-1]:
            name = ln.split(":", 1)[0]
            if name in self.errors and not self.errors[name]:
                self.errors[name] = f"kprobe_events refused it: {ln.split(':', 1)[1].strip()}"
        try:
            self.clock = (host_now, float(lines[-1]))
        except (IndexError, ValueError):
            self.clock = None
        log.info(f"tracefs: {len(self.lines)} kprobe events in L0 "
                 f"({', '.join(self.lines) or 'none'})")

    def stop(self) -> None:
        # Take down only the lab's own events; anything else in kprobe_events stays.
        cmds = [f"echo 0 > {TRACE}/tracing_on", f"cat {TRACE}/trace"]
        for ev in self.lines:
            cmds += [f"echo 0 > {TRACE}/events/{GROUP}/{ev}/enable",
                     f"echo '-:{GROUP}/{ev}' >> {TRACE}/kprobe_events"]
        text = self._sh("; ".join([*cmds, "true"]), timeout=300)
        if self.trace_log is not None:
            self.trace_log.write_text(text)
        self.parse(text)

    def parse(self, text: str) -> None:
        """Turn the trace into hits: entries open one, ways out close it, hits of other
        probes in between are `within` it."""
        open_hit: dict[tuple[str, int], dict[str, Any]] = {}  # (probe, cpu) -> awaiting return
        for seq, rec in enumerate(parse_trace(text)):
            if rec["event"] not in self.events:
                continue
            spec, site = self.events[rec["event"]]
            caps = assemble(site["captures"], rec["fields"])
            hits = self.hits[spec.name]
            if site["when"] == "return":
                # The way out belongs to the latest entry on the same CPU without one.
                hit = open_hit.pop((spec.name, rec["cpu"]), None)
                if hit is not None:
                    hit["captures"]["return"] = caps
                    hit["return_site"] = f"{site['func']}+{site['offset']:#x}"
                    hit["return_guest_ts"] = rec["ts"]
                continue
            if len(hits) >= spec.max_hits:
                continue
            if spec.active_only and not caps[spec.active_only]["active"]:
                continue  # the probe's "guest_mmu is active" (no kprobe filter can say it)
            # Another probe's hit between an entry and its return happened inside that call
            # (e.g. the roots handle_invept frees): say so on the outer hit.
            for (name, cpu), outer in open_hit.items():
                if cpu == rec["cpu"] and name != spec.name:
                    outer.setdefault("within", []).append(
                        {"probe": spec.name, "hit": len(hits) + 1})
            t = rec["ts"] - self.clock[1] + self.clock[0] if self.clock else 0.0
            # seq: the record's place in the trace, which keeps each CPU's order where the
            # clock gives two records one time (the global clock can, under TCG).
            hit = {"hit": len(hits) + 1, "t": round(t, 3), "guest_ts": rec["ts"], "seq": seq,
                   "location": {"func": rec["where"].split("+")[0], "file": None,
                                "line": None, "addr": None,
                                "site": f"{site['func']}+{site['offset']:#x}"},
                   "captures": {"entry": caps}}
            hits.append(hit)
            if "return" in spec.when:
                open_hit[(spec.name, rec["cpu"])] = hit

    def results(self) -> list[dict[str, Any]]:
        return [probe_record(s, "; ".join(ln for ev, ln in self.lines.items()
                                          if self.events[ev][0] is s),
                             self.errors.get(s.name), self.hits[s.name]) for s in self.specs]

    def releases_gdbstub(self) -> bool:
        return False  # it never had it


def start(ssh: SSHSession, specs: list[ProbeSpec], vmlinux: Path, modules: list[Path],
          run_dir: Path, t0: float) -> TraceProbes:
    """Compile the probes against L0's kernel and modules and start tracing in L0."""
    t = time.monotonic()
    compiled = compile_probes(specs, vmlinux, modules, run_dir)
    tp = TraceProbes(ssh, specs, compiled, t0, trace_log=run_dir / "tracefs.log")
    tp.start()
    tp.setup = {"tracefs_compile_s": round(time.monotonic() - t, 3),
                "kprobe_events": list(tp.lines.values())}
    return tp
