"""The `lab` command line: the parser, and which module does each command. Exit statuses: 0
passed, 1 a step failed, 2 bad input or usage, 3 infrastructure failure (boot, SSH, QEMU,
crash, timeout); `lab ssh` passes the remote command's own status on, and 255 for its own
failure."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from types import FrameType

from lab import doctor, driver, procs, running, signals
from lab.cache import cache_root
from lab.errors import EXIT_INFRA, EXIT_USAGE, Aborted, LabError, UsageError
from lab.profiles import LA57_CHOICES, PROFILES

log = logging.getLogger("lab")
DESCRIPTION = ("A nested-virtualization lab for KVM developers: L0 -> L1 -> L2, probes in L0's "
               "KVM, guest-side tests. Exit statuses: 0 passed, 1 a step or a probe check "
               "failed, 2 bad input or usage, 3 infrastructure failure (boot, SSH, emulator, a "
               "kernel event nobody expected, timeout); `lab ssh` passes the remote command's "
               "status on, and 255 for its own failure.")


def _raise_aborted(signum: int, frame: FrameType | None) -> None:
    signals.raise_or_defer(Aborted(f"stopped by signal {signal.Signals(signum).name}"))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    signals.raise_or_defer(KeyboardInterrupt())


def _install_signal_handlers(interrupt: bool = False) -> None:
    # SIGTERM and SIGHUP unwind like Ctrl-C, so every context manager tears its part down;
    # none of them inside paramiko (lab/signals.py).
    signal.signal(signal.SIGTERM, _raise_aborted)
    signal.signal(signal.SIGHUP, _raise_aborted)
    signal.signal(signal.SIGINT, _raise_aborted if interrupt else _raise_interrupt)


def _setup_logging(verbosity: int) -> None:
    """The lab's messages on stderr, `[lab HH:MM:SS] ...`: -q warnings and worse only, -v
    debug too. A run also writes them to RUN/lab.log (driver.run_log)."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(driver.log_format())
    log.addHandler(h)
    log.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    log.propagate = False


def _version() -> str:
    try:
        return metadata.version("kvm-nested-lab")
    except metadata.PackageNotFoundError:
        return "(not installed)"


# -- commands ------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    rep = doctor.probe()
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(doctor.format_report(rep))
    return 0 if rep.can_run else EXIT_INFRA


def cmd_images_build(args: argparse.Namespace) -> int:
    from lab.image import Builder, load_recipe

    builder = Builder(cache_root())
    for path in _recipes(Path(args.images_dir), args.names):
        tree = driver.kernel_tree(args.kernel_tree)
        t = time.monotonic()
        img = builder.build(load_recipe(path, kernel_tree=tree), with_debug=not args.no_debug)
        k = img.manifest["kernel"]
        print(f"{path.stem}: {img.dir} (kernel {k['release']}, {k['source']}; "  # type: ignore[index]
              f"{time.monotonic() - t:.2f} s)")
    return 0


def _recipes(images: Path, names: list[str]) -> list[Path]:
    """Recipes by name (from the images directory) or path; all of the directory's by default."""
    names = names or sorted(p.stem for p in images.glob("*.yaml") if p.name != "lock.yaml")
    if not names:
        raise UsageError(f"{images}: no image recipes (*.yaml)")
    out = []
    for name in names:
        path = Path(name) if name.endswith(".yaml") else images / f"{name}.yaml"
        if not path.exists():
            raise UsageError(f"image {name!r}: no recipe {path}")
        out.append(path)
    return out


def cmd_images_update(args: argparse.Namespace) -> int:
    """Move the lock file's pins to what the archive has now: each recipe's own, and those a
    `--kernel debian:...` run pinned beside it (or the ones --kernel names)."""
    from lab import lock
    from lab.image import load_recipe
    from lab.kernel import DebianChoice, DebianKernel

    images = Path(args.images_dir)
    choices = [DebianChoice.parse(k, "--kernel") for k in args.kernel or []]
    suites_updated: set[str | None] = set()
    for path in _recipes(images, args.names):
        pins = lock.read(lock.path_for(path))
        wanted: list[DebianChoice | None] = [None, *choices]
        for entry in pins:  # overrides pinned earlier move too
            name, _, spec = entry.partition("@")
            if name == path.stem and spec:
                c = DebianChoice.parse(spec, f"{lock.path_for(path)}: {entry}")
                if c not in wanted:
                    wanted.append(c)
        for choice in wanted:
            recipe = load_recipe(path, debian=choice)
            kernel = recipe.kernel
            if not isinstance(kernel, DebianKernel):
                print(f"{path.stem}: a build tree, nothing to pin")
                break
            if kernel.suite not in suites_updated:
                kernel.apt.update()  # the host's lists are the host's: left as they are
                suites_updated.add(kernel.suite)
            entry = lock.key(path, choice.spec if choice else None)
            before = kernel.pinned()
            now = kernel.resolve_latest()
            lock.record(lock.path_for(path), entry,
                        lock.Pin(kernel.request, now.name, now.version, now.sha256, now.size))
            moved = "unchanged" if before == now else \
                f"was {before.name}={before.version}" if before else "new"
            print(f"{entry}: {now.name}={now.version} ({moved})")
    return 0


def cmd_ci_gitlab(args: argparse.Namespace) -> int:
    from lab import ci, matrix

    kernels = matrix.parse_kernels(args.kernels)
    profiles = matrix.parse_profiles(args.profiles)
    _, cells, left_out = matrix.cells(Path(args.suite), profiles, kernels)
    if not cells:
        raise UsageError(f"{args.suite}: no cell can run (" + "; ".join(left_out) + ")")
    text = ci.gitlab(Path(args.suite), cells, left_out, profiles, kernels, args.cache)
    if args.output:
        Path(args.output).write_text(text)
        print(f"{args.output}: {len(cells)} cells", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for why in left_out:
        log.warning(f"left out: {why}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lab import matrix, merge

    kernels = matrix.parse_kernels(args.kernels)
    s, cells, _ = matrix.cells(Path(args.suite), matrix.parse_profiles(args.profiles), kernels)
    merged = merge.match(cells, kernels, [Path(d) for d in args.run_dirs])
    summ = merge.summary(s.name, Path(args.suite), merged, kernels)
    merge.write(Path(args.out), summ, merged, s.name)
    missing = [m.cell.key for m in merged if m.report is None]
    if missing:
        print(f"lab: error: no run for {len(missing)} cell(s): {', '.join(missing)}",
              file=sys.stderr)
    for c in summ["cells"]:
        print(f"  {'met ' if c['met'] else 'NOT '} {c['key']}: {c['why']}")
    print(f"{s.name}: {summ['status'].upper()} (exit {summ['exit_status']}); "
          f"{args.out}/report.html, {args.out}/junit.xml")
    return int(summ["exit_status"])


def cmd_kcidb(args: argparse.Namespace) -> int:
    from lab import kcidb, merge

    runs = [(Path(d), merge.read_run(Path(d))) for d in args.run_dirs]
    data = kcidb.convert(runs, args.origin, args.log_url_base)
    text = json.dumps(data, indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`lab cache`: what the cache holds; `lab cache prune`: drop what was not used lately."""
    from lab import cache

    root = cache_root()
    if args.cache_cmd == "prune":
        live = procs.Registry().live()
        if live:
            dirs = ", ".join(str(r.get("run_dir")) for r in live)
            raise UsageError(f"{len(live)} lab(s) running ({dirs}): `lab down` them first")
        gone = cache.prune(root, args.older_than, dry_run=args.dry_run)
        for p, size in gone:
            print(f"{'would drop' if args.dry_run else 'dropped'} {p} ({size >> 20} MiB)")
        print(f"{sum(s for _, s in gone) >> 20} MiB in {len(gone)} entries "
              f"{'would be ' if args.dry_run else ''}freed (not used for {args.older_than:g} "
              "days)")
        return 0
    total = 0
    print(f"{root}:")
    for name, size, entries, what in cache.usage(root):
        total += size
        print(f"  {name:12} {size / 2**30:6.2f} GB  {entries:4} entries  {what}")
    print(f"  {'total':12} {total / 2**30:6.2f} GB")
    return 0


def cmd_bisect(args: argparse.Namespace) -> int:
    from lab import bisect

    _install_signal_handlers()
    if not args.kernel_tree:
        if args.print_run or args.config:
            raise UsageError("--print-run/--config: for bisecting a --kernel-tree's commits")
        return driver.bisect(args.playbook, args.good, args.bad, args.out, args.profile)
    tree = driver.kernel_tree(args.kernel_tree)
    assert tree is not None
    if not args.config:
        raise UsageError("--config: a kernel tree is built at each step with your .config")
    config = Path(args.config)
    if not config.is_file():
        raise UsageError(f"--config {args.config}: no such file")
    out = Path(args.out or f"runs/bisect-{Path(args.playbook).stem}").resolve()
    return bisect.tree(Path(args.playbook), tree, args.good, args.bad, config, out, args.jobs,
                       args.profile, print_run=args.print_run)


def cmd_completion(args: argparse.Namespace) -> int:
    from lab import completion

    sys.stdout.write(completion.bash(build_parser()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _install_signal_handlers()
    return driver.run(Path(args.playbook), args.out, args.profile,
                      driver.Inputs.from_namespace(args), args.cold, tap_out=args.tap,
                      kernels_arg=args.kernels, profiles_arg=args.profiles)


def cmd_serve(args: argparse.Namespace) -> int:
    """`lab up`'s background half: the lab's owner until `lab down`."""
    from lab import playbook
    from lab.report import summary

    _install_signal_handlers(interrupt=True)
    t0 = time.monotonic()
    pb = playbook.load(Path(args.playbook))
    profile = driver.profile_for(args.profile, pb.profile)
    inputs = driver.Inputs.from_namespace(args)
    inputs.check(pb)
    rep = driver.run_playbook(pb, Path(args.out).resolve(), profile, inputs, hold=args.hold,
                              cold=args.cold, serve=True, started=t0)
    print(summary(rep), file=sys.stderr)
    return rep.exit_status


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"lab {_version()}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more messages")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("doctor", help="what this host can do, and the profile a lab would use")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_doctor)

    im = sub.add_parser("images", help="build images into the cache")
    imsub = im.add_subparsers(dest="images_cmd", required=True, metavar="ACTION")
    b = imsub.add_parser("build", help="build image recipes (default: all in images/)")
    b.add_argument("names", nargs="*", metavar="NAME")
    b.add_argument("--images-dir", default="images")
    b.add_argument("--kernel-tree", help="use this kernel build tree instead of the recipe's")
    b.add_argument("--no-debug", action="store_true", help="skip the debug-symbols package")
    b.set_defaults(func=cmd_images_build)
    u = imsub.add_parser("update", help="move the lock file's kernel pins to what Debian's "
                                        "archive has now")
    u.add_argument("names", nargs="*", metavar="NAME")
    u.add_argument("--images-dir", default="images")
    u.add_argument("--kernel", action="append", metavar="debian:SUITE[/ABI]",
                   help="pin this kernel for the recipes too (repeatable)")
    u.set_defaults(func=cmd_images_update)

    ca = sub.add_parser("cache", help="what the cache holds; `lab cache prune` drops the old")
    casub = ca.add_subparsers(dest="cache_cmd", metavar="ACTION")
    pr = casub.add_parser("prune", help="drop images, saved labs, boot CDs, gdb indexes and "
                                        "built modules not used for a while")
    pr.add_argument("--older-than", type=float, default=14.0, metavar="DAYS",
                    help="not used for this many days (default 14)")
    pr.add_argument("--dry-run", action="store_true", help="say what would go, drop nothing")
    ca.set_defaults(func=cmd_cache)

    profiles = sorted(PROFILES)
    for name, func, helptext in (
            ("run", cmd_run, "boot a playbook's lab, run its steps, tear down, report"),
            ("up", running.up, "boot a playbook's lab and leave it running in the background"),
            ("_serve", cmd_serve, argparse.SUPPRESS)):
        r = sub.add_parser(name, help=helptext) if helptext != argparse.SUPPRESS \
            else sub.add_parser(name)
        r.add_argument("playbook")
        r.add_argument("--out", help="run directory (default runs/<time>-<playbook>)")
        r.add_argument("--profile", choices=profiles, help="override the playbook's profile")
        r.add_argument("--kernel-tree", help="boot L0 from this kernel build tree")
        r.add_argument("--kernel", metavar="debian:SUITE[/ABI]",
                       help="boot L0 from Debian's kernel of another suite (bullseye, bookworm, "
                            "trixie, bookworm-backports, sid), or of an exact ABI (6.1.0-47)")
        r.add_argument("--latest", action="store_true",
                       help="the kernels the archive has now, not those pinned in the lock file")
        r.add_argument("--la57", choices=LA57_CHOICES, default="auto",
                       help="L0's CPU with LA57, 5-level paging (default auto: without it "
                            "for SVM L0 kernels older than 6.1, which misread L1's 5-level "
                            "nested page tables)")
        r.add_argument("--kvm-unit-tests", metavar="DIR",
                       help="your kvm-unit-tests build, for the playbook's kvm_unit_tests steps "
                            "(default: kvm_unit_tests in the config file)")
        r.add_argument("--cold", action="store_true",
                       help="boot every level, never restore a saved lab (one is still saved "
                            "unless the playbook says snapshot: off)")
        if name == "run":
            r.add_argument("--kernels", metavar="K1,K2",
                           help="a suite as a matrix over L0 kernels: debian, 5.10, 6.1, 6.12, "
                                "7.x, NAME=debian:SUITE[/ABI], NAME=PATH")
            r.add_argument("--profiles", metavar="P1,P2",
                           help="a suite as a matrix over profiles")
            r.add_argument("--tap", action="store_true",
                           help="print the results as TAP on stdout (the summary goes to "
                                "stderr), a line per testcase of junit.xml")
        else:
            r.add_argument("--hold", action="store_true",
                           help="start L0 with its CPUs held until a debugger continues")
        r.set_defaults(func=func)

    bi = sub.add_parser("bisect", help="the first bad kernel between a good and a bad one, a "
                                       "playbook's exit status the oracle")
    bi.add_argument("playbook")
    bi.add_argument("--good", required=True,
                    help="debian:SUITE/ABI (a Debian kernel) or a commit (with --kernel-tree)")
    bi.add_argument("--bad", required=True, help="the same kind as --good")
    bi.add_argument("--profile", choices=sorted(PROFILES), help="override the playbook's")
    bi.add_argument("--out", help="directory for the bisect's runs (default runs/<time>-bisect-"
                                  "<playbook>)")
    bi.add_argument("--kernel-tree", metavar="DIR", help="bisect the commits of this git tree")
    bi.add_argument("--config", metavar="FILE", help="the kernel .config for each build")
    bi.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="make -j")
    bi.add_argument("--print-run", action="store_true",
                    help="print the `git bisect run` command instead of running it")
    bi.set_defaults(func=cmd_bisect)

    comp = sub.add_parser("completion", help="print a shell completion script (bash)")
    comp.add_argument("shell", choices=("bash",))
    comp.set_defaults(func=cmd_completion)

    s = sub.add_parser("ssh", help="a shell or a command on a level of a running lab")
    s.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the command may run (default 600)")
    s.add_argument("level")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=running.ssh)

    c = sub.add_parser("cp", help="copy a file to or from a level (LEVEL:PATH)")
    c.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=running.cp)

    g = sub.add_parser("gdb", help="the real gdb, attached to a running lab's L0 with symbols")
    g.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    g.add_argument("gdb_args", nargs=argparse.REMAINDER, help="more arguments for gdb")
    g.set_defaults(func=running.gdb)

    ci = sub.add_parser("ci", help="a suite's matrix as a CI pipeline")
    cisub = ci.add_subparsers(dest="ci_cmd", required=True, metavar="ENGINE")
    gl = cisub.add_parser("gitlab", help="a GitLab CI child pipeline: a job per cell, then "
                                         "`lab merge`")
    gl.add_argument("suite", help="a suite (or a playbook)")
    _matrix_args(gl)
    gl.add_argument("--cache", default="/var/cache/lab",
                    help="LAB_CACHE on the runners (default /var/cache/lab)")
    gl.add_argument("-o", "--output", help="write the pipeline here (default: standard output)")
    gl.set_defaults(func=cmd_ci_gitlab)

    mg = sub.add_parser("merge", help="one report of a suite's cells run anywhere")
    mg.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    mg.add_argument("--suite", required=True, help="the suite the cells are of")
    _matrix_args(mg)
    mg.add_argument("--out", required=True, help="where the merged report goes")
    mg.set_defaults(func=cmd_merge)

    kc = sub.add_parser("kcidb", help="run directories as KCIDB I/O JSON (for kcidb-submit)")
    kc.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    kc.add_argument("--origin", default="kvm_nested_lab",
                    help="the CI system's KCIDB origin (default kvm_nested_lab)")
    kc.add_argument("--log-url-base", help="URL under which each RUN_DIR's files are published "
                                           "(default: file:// URLs of this host)")
    kc.add_argument("-o", "--output", help="write here (default: standard output)")
    kc.set_defaults(func=cmd_kcidb)

    st = sub.add_parser("status", help="a lab's levels and every kernel event so far")
    st.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=running.status)

    dn = sub.add_parser("down", help="stop a running lab")
    dn.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    dn.set_defaults(func=running.down)
    return p


def _matrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", help="profiles, comma-separated (default: each playbook's own; "
                                      "tcg-svm for those that leave it to the host)")
    p.add_argument("--kernels", help="kernels, comma-separated: `debian` (the recipes') or "
                                     "NAME=PATH of a build tree (default: debian)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        for line in procs.Registry().reap():
            log.info(line)
        return int(args.func(args))
    except UsageError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return EXIT_INFRA
