"""A suite as a matrix: each of its playbooks under each profile and each kernel, one cell per
combination, with the suite's expectation of it. The CI writers (lab/ci.py) make a job of each
cell; `lab merge` (lab/merge.py) reads the cells' run directories back against the same matrix.

The kernel axis, for L0: `debian` (what the playbooks' image recipes say), a series the lab
knows (5.10, 6.1, 6.12, 7.x: Debian's kernel of that series, of each recipe's flavour),
NAME=debian:SUITE[/ABI] (`lab run --kernel`), or NAME=PATH, a kernel build tree booted as L0
(`lab run --kernel-tree PATH`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lab import playbook, suite
from lab.errors import UsageError
from lab.kernel import DebianChoice
from lab.profiles import PROFILES, get_profile

DEBIAN = "debian"
# Debian's kernel series by the suite that carries them. 5.10 is pinned to the last ABI whose
# debug package the archive serves (bullseye-security lists later ones it does not serve).
SERIES = {"5.10": "debian:bullseye/5.10.0-32", "6.1": "debian:bookworm",
          "6.12": "debian:trixie", "7.x": "debian:sid"}
# Playbooks that leave the profile to the host (`auto`) run under this one when the matrix
# names none: it runs on any x86 host.
DEFAULT_PROFILE = "tcg-svm"
_LABEL = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")


@dataclass(frozen=True)
class Kernel:
    label: str
    tree: Path | None = None  # None: a Debian kernel (the recipes', or `debian`'s)
    debian: DebianChoice | None = None  # another suite's or ABI's (None: the recipes')


@dataclass(frozen=True)
class Cell:
    playbook: Path
    name: str  # the playbook's name
    profile: str
    kernel: Kernel
    entry: suite.Entry  # what the suite expects of it

    @property
    def expect(self) -> str:  # passed | failed
        return self.entry.expect

    @property
    def key(self) -> str:
        """The cell's coordinates as one name (a CI job's, a run directory's)."""
        return f"{self.name}.{self.profile}.{self.kernel.label}"

    def run_args(self) -> list[str]:
        args = ["--profile", self.profile]
        if self.kernel.tree is not None:
            args += ["--kernel-tree", str(self.kernel.tree)]
        if self.kernel.debian is not None:
            args += ["--kernel", self.kernel.debian.spec]
        return args


def parse_kernels(spec: str | list[str] | None, where: str = "--kernels",
                  paths: bool = True) -> list[Kernel]:
    """`debian,6.12,mytree=/src/linux,old=debian:bookworm/6.1.0-47` (or the list a suite's
    `matrix: {kernel: [...]}` gives) -> the kernel axis (default: debian alone). `paths`:
    whether NAME=PATH may name a kernel tree (the user's command line may; a suite, which is
    data, may not name host paths)."""
    if not spec:
        return [Kernel(DEBIAN)]
    items = spec.split(",") if isinstance(spec, str) else spec
    out: list[Kernel] = []
    for item in items:
        item = item.strip()
        if item == DEBIAN:
            out.append(Kernel(DEBIAN))
            continue
        if item in SERIES:
            out.append(Kernel(item, debian=DebianChoice.parse(SERIES[item], where)))
            continue
        label, sep, value = item.partition("=")
        if not sep or not _LABEL.match(label) or label == DEBIAN:
            raise UsageError(f"{where}: {item!r}: expected `debian`, a series "
                             f"({', '.join(SERIES)}), NAME=debian:SUITE[/ABI] or NAME=PATH "
                             "(NAME of lowercase letters, digits, '.', '_', '-')")
        if value.startswith("debian:"):
            out.append(Kernel(label, debian=DebianChoice.parse(value, f"{where}: {label}")))
            continue
        if not paths:
            raise UsageError(f"{where}: {item!r}: a suite names kernels, not host paths "
                             "(give a kernel tree on the command line: --kernels NAME=PATH)")
        tree = Path(value).expanduser().resolve()
        if not tree.is_dir():
            raise UsageError(f"{where}: {label}={value}: not a directory")
        out.append(Kernel(label, tree))
    labels = [k.label for k in out]
    if len(set(labels)) != len(labels):
        raise UsageError(f"{where}: a kernel named twice ({', '.join(labels)})")
    return out


def parse_profiles(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    names = [p.strip() for p in spec.split(",") if p.strip()]
    for n in names:
        if n not in PROFILES:
            raise UsageError(f"--profiles: {n!r}: expected one of {', '.join(PROFILES)}")
    return names


def cells(suite_path: Path, profiles: list[str] | None,
          kernels: list[Kernel]) -> tuple[suite.Suite, list[Cell], list[str]]:
    """The suite's cells, and why any combination was left out (a playbook that cannot run
    under a profile says so when it is validated for it)."""
    s, out, skipped = plan(suite_path, profiles, kernels)
    seen: list[str] = []
    for cell, why in skipped:
        line = f"{cell.name} under {cell.profile}: {why}"
        if line not in seen:
            seen.append(line)
    return s, out, seen


def plan(suite_path: Path, profiles: list[str] | None, kernels: list[Kernel]
         ) -> tuple[suite.Suite, list[Cell], list[tuple[Cell, str]]]:
    """The cells that run, and those that cannot, each with the reason."""
    s = suite.load(suite_path) if suite.is_suite(suite_path) else single(suite_path)
    out: list[Cell] = []
    skipped: list[tuple[Cell, str]] = []
    for entry in s.entries:
        pb = playbook.load(entry.playbook)
        names = profiles or [DEFAULT_PROFILE if pb.profile == "auto" else pb.profile]
        for prof in names:
            why = None
            try:
                pb.for_profile(get_profile(prof))
            except UsageError as e:
                why = str(e).splitlines()[0]
            for k in kernels:
                cell = Cell(entry.playbook, pb.name, prof, k, entry)
                if why is None:
                    out.append(cell)
                else:
                    skipped.append((cell, why))
    keys = [c.key for c in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise UsageError(f"{suite_path}: two cells would have the same coordinates: "
                         f"{', '.join(dup)} (two playbooks of one name)")
    return s, out, skipped


def single(path: Path) -> suite.Suite:
    """A playbook on its own is a suite of one."""
    pb = playbook.load(path)
    return suite.Suite(path, pb.name, pb.description, [suite.Entry(path.resolve(), "passed")])


def budget_minutes(cell: Cell) -> int:
    """How long a cell's job may take: its playbook's own boot and step timeouts under its
    profile, with room for building images on a fresh runner and for a slow host (the lab
    scales its own timeouts by the host's speed, up to 8x)."""
    pb = playbook.load(cell.playbook).for_profile(get_profile(cell.profile))
    seconds = sum(lv.boot_timeout for lv in pb.levels.values())
    seconds += sum(st.timeout for st in pb.steps) + 600  # images, probes, teardown
    return max(15, -(-seconds * 2 // 60))
