"""Running playbooks and suites to the end: `lab run`, and `lab up`'s background supervisor.

A playbook run is one Lab's lifecycle (lab/lab.py); a suite is its playbooks one after the
other, each in its own run directory, judged against what the suite expects of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import access, config, doctor, playbook, procs, suite
from lab.cache import cache_root
from lab.errors import EXIT_INFRA, LabError, UsageError
from lab.kernel import DebianChoice
from lab.profiles import Profile, get_profile
from lab.report import Report, summary

log = logging.getLogger(__name__)


def profile_for(given: str | None, playbook_profile: str) -> Profile:
    """--profile, else the playbook's own, where that is `auto` the user's default (config),
    else what this host can run."""
    if given:
        return resolve_profile(given)
    if playbook_profile == "auto" and config.load().profile:
        return resolve_profile(str(config.load().profile))
    return resolve_profile(playbook_profile)


def resolve_profile(name: str) -> Profile:
    if name == "auto":
        rep = doctor.probe(versions=False)
        if rep.profile is None:
            raise LabError(f"no profile can run on this host: {rep.profile_reason}")
        return get_profile(rep.profile)
    profile = get_profile(name)
    if profile.machine == "bochs":
        rep = doctor.probe(versions=False)
        if not rep.bochs_can_run:
            missing = {**rep.missing, **rep.bochs_missing}
            raise LabError(f"profile {name} cannot run on this host: missing "
                           f"{', '.join(sorted(missing))} (apt-get install -y "
                           f"{' '.join(sorted(set(missing.values())))})")
    return profile


def new_run_dir(out: str | None, name: str) -> Path:
    """The run directory: --out, or RUNS/<time>-<name> (RUNS: the user's config, else runs/);
    private to this user, and never one where a lab is running."""
    base = config.load().runs or Path("runs")
    d = Path(out) if out else base / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{name}"
    d = d.resolve()
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Keys, ssh_config and gdbinit go in here and are used from here: this user's only.
        procs.private_dir(d, "the run directory")
    except procs.UnsafeDirectory as e:
        raise UsageError(str(e)) from None
    if (d / "state.json").exists():
        st = access.read_state(d)
        if st.get("status") in ("up", "booting") and procs.alive(int(st.get("owner_pid", 0))):
            raise UsageError(f"--out {d}: a lab is running there; `lab down --run {d}` first")
    return d


def kernel_tree(arg: str | None) -> Path | None:
    tree = Path(arg).resolve() if arg else None
    if tree is not None and not tree.is_dir():
        raise UsageError(f"--kernel-tree {arg}: not a directory")
    return tree


@dataclass(frozen=True)
class Inputs:
    """What the user gives a run from the host, on the command line or in the config file:
    never from a playbook, which is data."""

    kernel_tree: Path | None = None
    kvm_unit_tests: Path | None = None  # a kvm-unit-tests build directory
    debian: DebianChoice | None = None  # L0's kernel from another suite (or ABI) of Debian's
    latest: bool = False  # what the archive has now, not the lock file's pins
    # L0's debug symbols where nothing needs them: None fetches them if the archive serves
    # them (for `lab gdb`, decoded events); False does not (a bisect step).
    debug: bool | None = None
    la57: str = "auto"  # L0's CPU with LA57: auto | on | off (lab/profiles.py)

    @classmethod
    def from_namespace(cls, args: Any) -> Inputs:
        """From `lab run`/`lab up`'s options (and the config file's defaults)."""
        kut = args.kvm_unit_tests or config.load().kvm_unit_tests
        if args.kernel and args.kernel_tree:
            raise UsageError("--kernel and --kernel-tree: give one kernel for L0, not two")
        return cls(kernel_tree=kernel_tree(args.kernel_tree),
                   kvm_unit_tests=Path(kut).expanduser().resolve() if kut else None,
                   debian=DebianChoice.parse(args.kernel, "--kernel") if args.kernel else None,
                   latest=args.latest, la57=args.la57)

    def argv(self) -> list[str]:
        """These inputs as `lab` options (for `lab up`'s background half, and CI jobs)."""
        out: list[str] = []
        if self.kernel_tree:
            out += ["--kernel-tree", str(self.kernel_tree)]
        if self.debian:
            out += ["--kernel", self.debian.spec]
        if self.kvm_unit_tests:
            out += ["--kvm-unit-tests", str(self.kvm_unit_tests)]
        if self.latest:
            out.append("--latest")
        if self.la57 != "auto":
            out += ["--la57", self.la57]
        return out

    def check(self, pb: playbook.Playbook) -> None:
        """Every input the playbook's steps need is given and names what they ask for:
        a bad one is an error before anything boots."""
        from lab.peers import kut

        for st in pb.steps:
            if st.kvm_unit_tests is None:
                continue
            if self.kvm_unit_tests is None:
                raise UsageError(f"{st.kvm_unit_tests.where}: needs a kvm-unit-tests build; "
                                 "give --kvm-unit-tests DIR (or kvm_unit_tests: DIR in "
                                 f"{config.path()})")
            build = kut.load_build(self.kvm_unit_tests)
            kut.flat_files(build, build.select(st.kvm_unit_tests.tests,
                                               st.kvm_unit_tests.groups, st.kvm_unit_tests.where))


def log_format() -> logging.Formatter:
    """`[lab HH:MM:SS] message`: the lab's lines on stderr and in RUN/lab.log alike."""
    return logging.Formatter("[lab %(asctime)s] %(message)s", "%H:%M:%S")


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Everything the lab logs during a run also goes to RUN/lab.log."""
    h = logging.FileHandler(run_dir / "lab.log")
    h.setFormatter(log_format())
    root = logging.getLogger("lab")
    root.addHandler(h)
    try:
        yield
    finally:
        root.removeHandler(h)
        h.close()


def run_playbook(pb: playbook.Playbook, run_dir: Path, profile: Profile, inputs: Inputs,
                 hold: bool = False, cold: bool = False, serve: bool = False,
                 started: float | None = None) -> Report:
    """One playbook's lab, start to end (or, `serve`, until `lab down`). `started`: when
    the command began (reading and checking the playbook is the run's `validate` phase)."""
    from lab.lab import Lab
    from lab.running import serve_until_stopped

    lab = Lab(pb, run_dir, profile, cache_root(), inputs=inputs, hold=hold, cold=cold)
    lab.report.phases["validate"] = round(time.monotonic() - (started or lab.t0), 3)
    if serve:  # the supervisor's stderr is RUN/lab.log already
        return lab.run(serve=serve_until_stopped)
    with run_log(run_dir):
        return lab.run()


def run_unattended(pb: playbook.Playbook, run_dir: Path, profile: Profile, inputs: Inputs,
                   cold: bool) -> Report:
    """One playbook of a suite or a matrix, where no one is there to run it again: a restored
    (warm) lab that ends in an infrastructure error is run once more, cold. A saved lab is an
    artefact of the lab, not of the kernel under test, and L1 has been seen to stop answering
    a few steps after a clean restore (once in several CI runs; once, too, right after a cold
    boot, so perhaps not the restore's doing: cause unknown).
    The warm attempt stays beside the run (`RUN.warm-failed/`) and the cold run's report says
    why it was run (`boot.retried_cold`)."""
    rep = run_playbook(pb, run_dir, profile, inputs, cold=cold, started=time.monotonic())
    err = rep.error or {}
    if rep.exit_status != EXIT_INFRA or rep.boot.get("mode") != "warm" or \
            err.get("kind") in ("aborted", "usage"):
        return rep
    why = str(err.get("message", "")).splitlines()[0][:300]
    kept = run_dir.with_name(run_dir.name + ".warm-failed")
    shutil.rmtree(kept, ignore_errors=True)
    run_dir.rename(kept)
    run_dir.mkdir(mode=0o700)
    log.warning(f"{pb.name}: the restored lab failed ({why}); running it once more, cold "
                f"(the warm attempt is in {kept})")
    rep = run_playbook(pb, run_dir, profile, inputs, cold=True, started=time.monotonic())
    rep.boot["retried_cold"] = {"warm_error": why, "warm_run_dir": str(kept)}
    rep.write(run_dir)
    return rep


def run(path: Path, out: str | None, profile_name: str | None, inputs: Inputs,
        cold: bool, tap_out: bool = False, kernels_arg: str | None = None,
        profiles_arg: str | None = None) -> int:
    """`lab run`: a playbook or a suite (or a matrix); the exit status. `tap_out`: stdout is
    the result as TAP (from the run's junit.xml), and the summary goes to stderr."""
    t0 = time.monotonic()
    if suite.is_suite(path):
        return run_suite(path, out, profile_name, inputs, cold, tap_out, kernels_arg,
                         profiles_arg)
    if kernels_arg or profiles_arg:  # one playbook as a matrix of its own
        from lab import matrix

        if profile_name:
            raise UsageError("--profile with --profiles: give the profiles as --profiles")
        one = matrix.single(path)
        inputs.check(playbook.load(path))
        return run_matrix(path, one, out, kernels_arg, profiles_arg, inputs, cold, tap_out)
    pb = playbook.load(path)
    profile = profile_for(profile_name, pb.profile)
    inputs.check(pb)
    rep = run_playbook(pb, new_run_dir(out, pb.name), profile, inputs, cold=cold, started=t0)
    print(summary(rep), file=sys.stderr if tap_out else sys.stdout)
    if tap_out:
        _print_tap(Path(rep.run_dir))
    return rep.exit_status


def _print_tap(run_dir: Path) -> None:
    import xml.etree.ElementTree as ET

    from lab import tap

    try:
        root = ET.parse(run_dir / "junit.xml").getroot()
    except (OSError, ET.ParseError) as e:  # a run that ended before it wrote one
        print(f"TAP version 13\n1..0 # SKIP no results ({e})")
        return
    sys.stdout.write(tap.from_junit(root))


def run_matrix(path: Path, s: suite.Suite, out: str | None, kernels_arg: str | None,
               profiles_arg: str | None, inputs: Inputs, cold: bool,
               tap_out: bool = False) -> int:
    """A suite's matrix here, one cell after another (each playbook under each kernel and
    profile), then one report of it all as `lab merge` writes it: report.json, junit.xml with
    the axis in every classname, report.html with the kernel x profile table."""
    from lab import matrix, merge

    if inputs.kernel_tree or inputs.debian:
        raise UsageError("--kernel/--kernel-tree: a matrix names its kernels itself "
                         "(--kernels or the suite's matrix.kernel)")
    if kernels_arg:
        kernels = matrix.parse_kernels(kernels_arg)
    else:
        kernels = matrix.parse_kernels(s.kernels, f"{path}:{s.line}: matrix.kernel",
                                       paths=False)
    profiles = matrix.parse_profiles(profiles_arg) if profiles_arg else s.profiles
    _, cells, skipped = matrix.plan(path, profiles, kernels)
    run_dir = new_run_dir(out, s.name)
    t0 = time.monotonic()
    text = sys.stderr if tap_out else sys.stdout
    merged: list[merge.Merged] = []
    for i, cell in enumerate(cells, 1):
        log.info(f"matrix {s.name}: [{i}/{len(cells)}] {cell.key}")
        sub = run_dir / cell.key
        sub.mkdir(mode=0o700, parents=True, exist_ok=True)
        cell_inputs = dataclasses.replace(inputs, kernel_tree=cell.kernel.tree,
                                          debian=cell.kernel.debian)
        rep = run_unattended(playbook.load(cell.playbook), sub, get_profile(cell.profile),
                             cell_inputs, cold)
        print(summary(rep), file=text)
        merged.append(merge.Merged(cell, sub, rep.to_dict()))
        if rep.error and rep.error.get("kind") == "aborted":
            break
    summ = merge.summary(s.name, path, merged, kernels, skipped)
    summ["seconds"] = round(time.monotonic() - t0, 1)
    merge.write(run_dir, summ, merged, s.name)
    for c in summ["cells"]:
        print(f"  {'met ' if c['met'] else 'NOT '} {c['key']}: {c['why']}", file=text)
    print(f"{s.name}: {summ['status'].upper()} (exit {summ['exit_status']}); "
          f"{run_dir}/junit.xml, {run_dir}/report.html", file=text)
    if tap_out:
        _print_tap(run_dir)
    return int(summ["exit_status"])


def run_suite(path: Path, out: str | None, profile_name: str | None, inputs: Inputs,
              cold: bool, tap_out: bool = False, kernels_arg: str | None = None,
              profiles_arg: str | None = None) -> int:
    t0 = time.monotonic()
    s = suite.load(path)  # validates every playbook before anything boots
    if s.is_matrix or kernels_arg or profiles_arg:
        if profile_name:
            raise UsageError("--profile: a matrix names its profiles (--profiles or the "
                             "suite's matrix.profile)")
        for entry in s.entries:
            inputs.check(playbook.load(entry.playbook))
        return run_matrix(path, s, out, kernels_arg, profiles_arg, inputs, cold, tap_out)
    for entry in s.entries:
        inputs.check(playbook.load(entry.playbook))
    run_dir = new_run_dir(out, s.name)
    runs = []
    for i, entry in enumerate(s.entries):
        pb = playbook.load(entry.playbook)
        profile = profile_for(profile_name, pb.profile)
        sub_dir = run_dir / f"{i + 1:02d}-{pb.name}"
        sub_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.info(f"suite {s.name}: [{i + 1}/{len(s.entries)}] {pb.name} "
                 f"(expect {entry.expect})")
        rep = run_unattended(pb, sub_dir, profile, inputs, cold)
        print(summary(rep), file=sys.stderr if tap_out else sys.stdout)
        runs.append((entry, sub_dir, rep.to_dict()))
        if rep.error and rep.error.get("kind") == "aborted":
            break
    code = suite.write(s, run_dir, runs, time.monotonic() - t0)
    text = sys.stderr if tap_out else sys.stdout
    for entry, _, r in runs:
        met, why = entry.outcome(r)
        print(f"  {'met ' if met else 'NOT '} {entry.playbook.name}: {why}", file=text)
    print(f"{s.name}: {'PASSED' if code == 0 else 'FAILED'} (exit {code}); "
          f"{run_dir}/junit.xml, {run_dir}/report.html", file=text)
    if tap_out:
        _print_tap(run_dir)
    return code


def bisect(playbook_arg: str, good: str, bad: str, out: str | None,
           profile_name: str | None) -> int:
    """`lab bisect` over Debian's kernels of one suite: the first bad ABI, each step one run."""
    from lab import bisect as bs
    from lab.image import load_recipe
    from lab.kernel import DebianKernel

    pb = playbook.load(Path(playbook_arg))
    profile = profile_for(profile_name, pb.profile)
    g, b = DebianChoice.parse(good, "--good"), DebianChoice.parse(bad, "--bad")
    recipe = load_recipe(pb.for_profile(profile).levels["l0"].recipe)
    if not isinstance(recipe.kernel, DebianKernel):
        raise UsageError(f"{recipe.path}: L0's recipe is a build tree; bisect it with "
                         "--kernel-tree")
    cands = bs.debian_candidates(g, b, recipe.kernel.package, bs.image_packages(g))
    run_dir = new_run_dir(out, f"bisect-{pb.name}")
    # Each kernel boots once: nothing to save for a warm start, no debug symbols to fetch.
    once = dataclasses.replace(pb, snapshot="off")
    print(f"bisect {pb.name}: {len(cands)} kernels from {g.spec} (good) to {b.spec} (bad)")

    def oracle(i: int) -> str:
        c = cands[i]
        sub = run_dir / str(c.abi)
        sub.mkdir(mode=0o700, parents=True, exist_ok=True)
        # An ABI names its kernel exactly: nothing to pin in the lock file for a bisect step.
        rep = run_playbook(once, sub, profile, Inputs(debian=c, debug=False, latest=True),
                           started=time.monotonic())
        v = bs.verdict_of(rep.exit_status)
        print(f"  {c.spec}: {v or 'stop'} (exit {rep.exit_status}) {sub}/report.html")
        if v is None:
            raise UsageError(f"{c.spec}: the playbook's run said exit {rep.exit_status}; "
                             "expected 0, 1 or 3")
        return v

    res = bs.search(len(cands), oracle)
    result = {"playbook": str(pb.path), "good": g.spec, "bad": b.spec,
              "candidates": [c.spec for c in cands],
              "tested": [{"kernel": cands[i].spec, "verdict": v} for i, v in res.tested],
              "first_bad": cands[res.first_bad].spec if res.first_bad is not None else None}
    (run_dir / "bisect.json").write_text(json.dumps(result, indent=1) + "\n")
    if res.first_bad is None:
        lo, hi = res.range
        print(f"no first bad kernel: every one between {cands[lo].spec} and {cands[hi].spec} "
              f"was skipped; {run_dir}/bisect.json")
        return EXIT_INFRA
    first = cands[res.first_bad]
    report = run_dir / str(first.abi) / "report.html"
    where = f"its report: {report}" if report.exists() else "(the --bad kernel: not run)"
    print(f"first bad: {first.spec} after {len(res.tested)} runs; {where}; "
          f"{run_dir}/bisect.json")
    return 0
