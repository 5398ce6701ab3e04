"""kvm-unit-tests from the developer's own build, run inside a level as `run_tests.sh` would.

The build directory comes from the user (`--kvm-unit-tests DIR` or the config file), never from
a playbook: a playbook names sections only. What is read from the build: `x86/unittests.cfg`
(sections with `file`, `smp`, `extra_params`, `qemu_params`, `test_args`, `groups`, `arch`,
`check`, `accel`, `timeout`, multi-line values between triple quotes) and the `.flat` files of
the sections asked for, which are copied into the level. Each section is then one QEMU inside
the level with kvm-unit-tests' own arguments (`x86/run`), judged by the debug-exit convention
(`scripts/arch-run.bash`: QEMU's status is (code << 1) | 1, so 1 passes, 77 is "all skipped")
and reported with a case per PASS/FAIL/SKIP line.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import steps
from lab.errors import UsageError
from lab.playbook import Step
from lab.report import StepResult
from lab.ssh import SSHSession
from lab.steps import Verdict

log = logging.getLogger(__name__)

GUEST_DIR = "/tmp/kvm-unit-tests"
# What QEMU needs besides the test's own timeout to start and stop inside the level.
QEMU_MARGIN_S = 60
DEFAULT_TIMEOUT_S = 90.0  # runtime.bash's TIMEOUT
ARCH = "x86_64"
# kvm-unit-tests' x86/run: the test devices, the serial port on stdout, no reboot.
QEMU = ("qemu-system-x86_64 --no-reboot -nodefaults -device pc-testdev "
        "-device isa-debug-exit,iobase=0xf4,iosize=0x4 -vnc none -serial stdio "
        "-device pci-testdev")
SKIP_MARK = "lab-kvm-unit-tests: SKIP "

_SECTION = re.compile(r"^\[(.*)\]\s*$")
_KEY = re.compile(r"^(\w+)\s*=\s*(.*)$")
_RESULT = re.compile(r"^(PASS|FAIL|SKIP|XPASS|XFAIL|ABORT): ?(.*)$")
_SIGNAL = re.compile(r"terminating on signal (\d+)")


@dataclass
class Section:
    """One `[name]` of unittests.cfg."""

    name: str
    line: int
    file: str = ""
    smp: str = "1"
    extra_params: str = ""  # older builds: every QEMU argument, -append included
    qemu_params: str = ""
    test_args: str = ""
    groups: list[str] = field(default_factory=list)
    arch: str = ""
    check: list[str] = field(default_factory=list)  # PATH=VALUE, all must hold
    accel: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S


def parse_timeout(text: str) -> float:
    """coreutils `timeout` durations, as unittests.cfg writes them: 90, 90s, 5m, 1h, 1d."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (expected like 90s, 5m)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_cfg(text: str, where: str) -> list[Section]:
    """The sections of a unittests.cfg; `where` names the file in errors."""
    sections: list[Section] = []
    cur: Section | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i]
        i += 1
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SECTION.match(line)
        if m:
            cur = Section(name=m.group(1).strip(), line=i)
            sections.append(cur)
            continue
        m = _KEY.match(line)
        if not m or cur is None:
            continue  # run_tests.sh ignores what it does not know, and so do we
        key, value = m.group(1), m.group(2).strip()
        if value.startswith('"""'):
            # A multi-line value: everything up to the closing triple quote.
            parts = [value[3:]]
            while '"""' not in parts[-1] and i < len(lines):
                parts.append(lines[i])
                i += 1
            if '"""' not in parts[-1]:
                raise UsageError(f"{where}:{cur.line}: [{cur.name}] {key}: no closing \"\"\"")
            parts[-1] = parts[-1].split('"""', 1)[0]
            value = " ".join(p.strip() for p in parts if p.strip())
        if key in ("file", "smp", "extra_params", "qemu_params", "test_args", "arch", "accel"):
            setattr(cur, key, value)
        elif key == "groups":
            cur.groups = value.split()
        elif key == "check":
            cur.check = value.split()
        elif key == "timeout":
            try:
                cur.timeout_s = parse_timeout(value)
            except ValueError as e:
                raise UsageError(f"{where}:{i}: [{cur.name}] timeout: {e}") from None
    return sections


@dataclass
class Build:
    """A kvm-unit-tests build directory the user pointed the lab at."""

    dir: Path
    sections: dict[str, Section]

    @property
    def test_dir(self) -> Path:
        return self.dir / "x86"

    def select(self, tests: list[str], groups: list[str], where: str) -> list[Section]:
        """The sections named (in that order), or those in any of `groups`, or every section
        that is not `nodefault` (as run_tests.sh does without -g)."""
        for t in tests:
            if t not in self.sections:
                known = ", ".join(sorted(self.sections)[:20])
                raise UsageError(f"{where}.tests: no section [{t}] in {self.test_dir}/"
                                 f"unittests.cfg (it has: {known})")
        if tests:
            return [self.sections[t] for t in tests]
        if groups:
            return [s for s in self.sections.values() if set(s.groups) & set(groups)]
        return [s for s in self.sections.values() if "nodefault" not in s.groups]


def _trusted(path: Path, what: str) -> None:
    """The lab runs what the build holds: it must be this user's (or root's), and writable by
    no one else."""
    try:
        st = path.stat()
    except OSError as e:
        raise UsageError(f"--kvm-unit-tests: {what} {path}: {e.strerror}") from None
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"--kvm-unit-tests: {what} {path} is owned or writable by another "
                         "user; expected this user's own build")


def load_build(arg: str | Path) -> Build:
    """The build at `arg` (its top directory, holding x86/unittests.cfg), checked."""
    d = Path(arg).expanduser().resolve()
    cfg = d / "x86" / "unittests.cfg"
    if not cfg.is_file():
        raise UsageError(f"--kvm-unit-tests {arg}: no x86/unittests.cfg there (expected a "
                         "kvm-unit-tests build directory, after ./configure && make)")
    for p, what in ((d, "directory"), (d / "x86", "directory"), (cfg, "file")):
        _trusted(p, what)
    sections = parse_cfg(cfg.read_text(errors="replace"), str(cfg))
    return Build(dir=d, sections={s.name: s for s in sections})


def flat_files(build: Build, sections: list[Section]) -> list[Path]:
    """The test binaries the sections need, each once, checked like the build itself."""
    out: list[Path] = []
    for s in sections:
        if not s.file or (s.arch and s.arch != ARCH):
            continue
        p = build.test_dir / s.file
        if not p.is_file() or p.resolve().parent != build.test_dir.resolve():
            raise UsageError(f"{build.test_dir}/unittests.cfg:{s.line}: [{s.name}] file: "
                             f"{s.file} is not a built test in {build.test_dir} (run make)")
        _trusted(p, "file")
        if p not in out:
            out.append(p)
    return out


def command(s: Section, timeout_s: float) -> str:
    """The shell command the level runs for one section: its checks, then QEMU as x86/run
    starts it, under `timeout` (which QEMU reports as "terminating on signal 15")."""
    lines = [f"cd {GUEST_DIR}/x86 || exit 2"]
    if s.arch and s.arch != ARCH:
        lines.append(f"echo {shlex.quote(SKIP_MARK + f'({s.arch} only)')}; exit 0")
        return "\n".join(lines)
    for c in s.check:
        path, _, value = c.partition("=")
        why = f"({path} not equal to {value})"
        lines.append(f'[ "$(cat {shlex.quote(path)} 2>/dev/null)" = {shlex.quote(value)} ] || '
                     f"{{ echo {shlex.quote(SKIP_MARK + why)}; exit 0; }}")
    accel = s.accel or "kvm"
    args = [QEMU, f"-machine accel={accel}", "-kernel", shlex.quote(s.file),
            "-smp", shlex.quote(s.smp)]
    # Like run_tests.sh, the parameters are shell text of the user's build (run in the guest).
    if s.extra_params:
        args.append(s.extra_params)
    if s.qemu_params:
        args.append(s.qemu_params)
    if s.test_args:
        args += ["-append", shlex.quote(s.test_args)]
    lines.append(f"timeout -s TERM {max(1, round(timeout_s))} {' '.join(args)} </dev/null")
    return "\n".join(lines)


def translate(exit_status: int, stderr: str) -> int:
    """run_qemu's fixup of QEMU's status: 0 is an exit without debug-exit (or a signal, which
    stderr tells), 1 is success unless QEMU complained."""
    sig = _SIGNAL.search(stderr)
    if exit_status == 0:
        return 128 + int(sig.group(1)) if sig else 1
    if exit_status == 1:
        complaints = [ln for ln in stderr.splitlines()
                      if ln.strip() and "warning" not in ln.lower()]
        return 1 if complaints else 0
    return exit_status


def judge(s: Section, exit_status: int, stdout: str, stderr: str,
          timeout_s: float) -> Verdict:
    """A section's verdict and its cases, from what its command printed and its status."""
    for line in stdout.splitlines():
        if line.startswith(SKIP_MARK):
            why = line[len(SKIP_MARK):].strip()
            return Verdict("passed", f"skipped {why}",
                           [_case(1, s.name, "skipped", why)])
    cases: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    summary = ""
    for line in stdout.splitlines():
        line = line.rstrip("\r")
        if line.startswith("SUMMARY: "):
            summary = line[len("SUMMARY: "):]
            continue
        m = _RESULT.match(line)
        if not m:
            continue
        kind, text = m.group(1), m.group(2).strip() or s.name
        seen[text] = seen.get(text, 0) + 1
        name = text if seen[text] == 1 else f"{text} #{seen[text]}"
        status = {"PASS": "passed", "XFAIL": "passed", "SKIP": "skipped"}.get(kind, "failed")
        cases.append(_case(len(cases) + 1, name, status,
                           {"XFAIL": "expected failure", "XPASS": "unexpectedly passed",
                            "ABORT": "aborted", "SKIP": text}.get(kind, "")))
    ret = translate(exit_status, stderr)
    detail = f" ({summary})" if summary else ""
    if ret == 0:
        return Verdict("passed", f"PASS{detail}", cases)
    if ret == 77:
        return Verdict("passed", f"SKIP{detail}", cases or [_case(1, s.name, "skipped", summary)])
    if ret == 128 + 15:
        msg = f"FAIL (timeout; duration={round(timeout_s)}s)"
    elif ret > 127:
        msg = f"FAIL (terminated on signal {ret - 128})"
    elif not cases and ret == 1:
        last = stderr.strip().splitlines()[-1:] or ["QEMU exited without the test's status"]
        msg = f"FAIL (QEMU: {last[0][:300]})"
    else:
        msg = f"FAIL{detail or f' (status {ret})'}"
    return Verdict("failed", msg, cases)


def _case(n: int, name: str, status: str, message: str) -> dict[str, Any]:
    return {"number": n, "name": name, "status": status, "message": message}


def run(step: Step, index: int, ssh: SSHSession, steps_dir: Path, speed_factor: float,
        check: Callable[[], None], into: list[StepResult],
        missing_events: Callable[[], list[str]], build: Build) -> None:
    """A kvm_unit_tests step: the sections' test files copied into the level, then each
    section run and judged as a step of its own (`STEP SECTION` in the report and JUnit)."""
    assert step.kvm_unit_tests is not None
    want = step.kvm_unit_tests
    sections = build.select(want.tests, want.groups, want.where)
    ssh.run(f"mkdir -p {GUEST_DIR}/x86", timeout=30, check=check)
    files = flat_files(build, sections)
    for f in files:
        ssh.put(f, f"{GUEST_DIR}/x86/{f.name}")
    log.info(f"[{step.on}] kvm-unit-tests from {build.dir}: {len(sections)} sections, "
             f"{len(files)} test files copied")
    for s in sections:
        # The section's timeout was written for the host kvm-unit-tests runs on: scaled too.
        timeout_s = s.timeout_s * speed_factor
        steps.run_part(step, s.name, command(s, timeout_s), s.timeout_s + QEMU_MARGIN_S,
                       functools.partial(judge, s, timeout_s=timeout_s), index, ssh,
                       steps_dir, speed_factor, check, into, missing_events)
