"""`lab bisect`: the first bad kernel between a good one and a bad one, with a playbook's exit
status as the oracle: 0 good, 1 bad, 3 (the infrastructure failed on that kernel) "skip this
one", as `git bisect run` treats 125.

Over Debian's kernels of one suite and flavour (`--good debian:bookworm/6.1.0-47 --bad
debian:bookworm/6.1.0-57`) it needs no build: each step is one lab run with L0 booting that
ABI's kernel. Over a kernel tree (`--kernel-tree DIR --good COMMIT --bad COMMIT --config FILE`)
it hands git the loop (`git bisect run`), each step `make` with the user's config plus one lab
run; `--print-run` prints that command for people who drive git themselves.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.errors import EXIT_INFRA, EXIT_PASSED, EXIT_STEP_FAILED, UsageError
from lab.kernel import DebianChoice

log = logging.getLogger(__name__)

GOOD, BAD, SKIP = "good", "bad", "skip"


def verdict_of(exit_status: int) -> str | None:
    """A run's exit status as bisect reads it; None: stop (bad input, exit 2)."""
    return {EXIT_PASSED: GOOD, EXIT_STEP_FAILED: BAD, EXIT_INFRA: SKIP}.get(exit_status)


@dataclass
class Outcome:
    first_bad: int | None  # index into the candidates; None: not found (all skipped between)
    tested: list[tuple[int, str]]  # (index, verdict), in the order they ran
    range: tuple[int, int]  # the last known good and first known bad, when skips left a gap


def search(n: int, oracle: Callable[[int], str]) -> Outcome:
    """Bisect candidates 0..n-1, where 0 is known good and n-1 known bad: the first bad one
    in about log2(n) calls of `oracle(i)`. A skipped candidate is stepped around (the one
    nearest the middle that is not skipped yet), as git does."""
    lo, hi = 0, n - 1
    skipped: set[int] = set()
    tested: list[tuple[int, str]] = []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        order = sorted((i for i in range(lo + 1, hi) if i not in skipped),
                       key=lambda i: (abs(i - mid), i))
        if not order:
            return Outcome(None, tested, (lo, hi))
        i = order[0]
        v = oracle(i)
        tested.append((i, v))
        if v == GOOD:
            lo = i
        elif v == BAD:
            hi = i
        else:
            skipped.add(i)
    return Outcome(hi, tested, (lo, hi))


# -- Debian kernels --------------------------------------------------------------------------
_ABI = re.compile(r"^(\d+)\.(\d+)\.(\d+)-(\d+)$")


def _abi_key(abi: str) -> tuple[int, ...]:
    m = _ABI.match(abi)
    assert m is not None
    return tuple(int(x) for x in m.groups())


def debian_candidates(good: DebianChoice, bad: DebianChoice, package: str,
                      available: list[str]) -> list[DebianChoice]:
    """The ABIs from `good` to `bad` (both included) that the suite has for the flavour of
    `package` (the recipe's), in order. `available`: the suite's image package names."""
    if good.suite != bad.suite or not good.abi or not bad.abi:
        raise UsageError("--good/--bad: two ABIs of one suite, like debian:bookworm/6.1.0-47 "
                         "and debian:bookworm/6.1.0-57")
    flavour = re.sub(r"^linux-image-(\d+\.\d+\.\d+-\d+-)?", "", package)
    rx = re.compile(rf"^linux-image-(\d+\.\d+\.\d+-\d+)-{re.escape(flavour)}$")
    abis = sorted({m.group(1) for name in available if (m := rx.match(name))}, key=_abi_key)
    lo, hi = _abi_key(good.abi), _abi_key(bad.abi)
    if lo >= hi:
        raise UsageError(f"--good {good.spec} must be older than --bad {bad.spec}")
    for c in (good, bad):
        if c.abi not in abis:
            raise UsageError(f"{c.spec}: {good.suite} has no linux-image-{c.abi}-{flavour} "
                             f"(it has {', '.join(abis[-12:]) or 'none'})")
    return [DebianChoice(good.suite, a) for a in abis if lo <= _abi_key(a) <= hi]


def image_packages(choice: DebianChoice) -> list[str]:
    """The names of the linux-image packages the suite's apt knows."""
    from lab.apt import Apt
    from lab.cache import cache_root

    apt = Apt(choice.suite, cache_root())
    out = apt.run(apt.cache_cmd("pkgnames", "linux-image-"), f"listing {choice.suite}'s kernels")
    return out.split()


# -- kernel trees ----------------------------------------------------------------------------
def run_command(playbook: Path, tree: Path, config: Path, out: Path, jobs: int,
                profile: str | None) -> str:
    """The command `git bisect run` runs at each commit: build with the user's config, then
    one lab run; a build that fails, or a lab that fails for itself (3), says 125: skip."""
    lab = [sys.executable, "-m", "lab", "run", str(playbook.resolve()), "--kernel-tree",
           str(tree.resolve())]
    if profile:
        lab += ["--profile", profile]
    build = (f"cp {shlex.quote(str(config.resolve()))} .config && make olddefconfig >/dev/null "
             f"&& make -j{jobs} bzImage modules >/dev/null")
    step = (f"{build} || exit 125; {' '.join(shlex.quote(a) for a in lab)} --out "
            f"{shlex.quote(str(out.resolve()))}/$(git rev-parse --short HEAD); s=$?; "
            "[ $s -eq 3 ] && exit 125; exit $s")
    return f"git bisect run sh -c {shlex.quote(step)}"


def tree(playbook: Path, tree_dir: Path, good: str, bad: str, config: Path, out: Path,
         jobs: int, profile: str | None, print_run: bool = False) -> int:
    """Bisect a kernel tree's commits: git drives the loop (`git bisect run`), each step is
    `make` with `config` and one lab run; the first bad commit printed, git's bisect reset
    after. `print_run`: print the two commands instead of running them."""
    for flag, rev in (("--good", good), ("--bad", bad)):
        # git bisect start takes a name it cannot resolve as a path to limit the search to.
        known = subprocess.run(["git", "-C", str(tree_dir), "rev-parse", "--verify", "-q",
                                f"{rev}^{{commit}}"], capture_output=True, text=True)
        if known.returncode != 0:
            raise UsageError(f"{flag} {rev}: not a commit of {tree_dir}")
    cmd = run_command(playbook, tree_dir, config, out, jobs, profile)
    start = ["git", "-C", str(tree_dir), "bisect", "start", bad, good, "--"]
    if print_run:
        print(" ".join(shlex.quote(a) for a in start))
        print(f"cd {shlex.quote(str(tree_dir))} && {cmd}")
        return EXIT_PASSED
    began = subprocess.run(start, capture_output=True, text=True)
    if began.returncode != 0:
        said = began.stderr.strip().splitlines() or [f"exit {began.returncode}"]
        raise UsageError(f"--good {good} --bad {bad}: git bisect start: {said[-1]}")
    try:
        r = subprocess.run(["sh", "-c", cmd], cwd=tree_dir, capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        m = re.search(r"^(\w+) is the first bad commit", r.stdout, re.M)
    finally:
        subprocess.run(["git", "-C", str(tree_dir), "bisect", "reset"], capture_output=True)
    if not m:
        print(f"no first bad commit found (git bisect run: {r.stderr.strip()[-300:]})")
        return EXIT_INFRA
    print(f"first bad: {m.group(1)}; its run: {out}/{m.group(1)[:7]}/report.html")
    return EXIT_PASSED
