"""Playbooks: a topology of levels (l0, l1, l2) and the steps to run on them.

Everything is validated before anything boots; a problem is one line naming the file, the line
and the field (exit status 2).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import schema
from lab.errors import UsageError
from lab.events import KINDS, Expected
from lab.inject import NAMES as INJECTION_NAMES
from lab.probes.checks import BUILTIN as BUILTIN_CHECKS
from lab.probes.checks import Check
from lab.probes.checks import load as load_checks
from lab.probes.spec import PROBE_SPEC, load_probes
from lab.profiles import PROFILES, Profile

LEVELS = ("l0", "l1", "l2")
PARENT = {"l1": "l0", "l2": "l1"}
# What a parent needs besides its child's memory: its own kernel, userspace, the child's
# initramfs (held twice while QEMU loads it) and QEMU itself.
PARENT_OVERHEAD_MB = 384

_NAME = re.compile(r"^[a-z0-9_]+$")


def _is_name(s: str) -> bool:
    return bool(_NAME.match(s))

LEVEL_SPEC = schema.Map({
    "image": schema.Field(schema.Str(), default=None),  # None: the profile's choice
    "memory": schema.Field(schema.Int(minimum=128, maximum=65536), default=None),
    "cpus": schema.Field(schema.Int(minimum=1, maximum=64), default=1),
    "append": schema.Field(schema.Str(max_len=2048), default=""),
    "modules": schema.Field(schema.Dict(
        schema.Dict(schema.Scalar(), key_check=_is_name, key_what="a parameter name"),
        key_check=_is_name, key_what="a module name (letters, digits, _)"), default=None),
    "boot_timeout": schema.Field(schema.Int(minimum=1), default=None),
    "kaslr": schema.Field(schema.Bool(), default=False),
    # Carry QEMU and its firmware without a child level (kvm-unit-tests steps imply it).
    "qemu": schema.Field(schema.Bool(), default=False),
})

# A kernel event (lab/events.py) the playbook, or a step, says will come: it is recorded and
# reported but does not fail the run. A step's must come while it runs, or the step fails.
EXPECTED_EVENT_SPEC = schema.Map({
    "kind": schema.Field(schema.Str(choices=KINDS), required=True),
    "level": schema.Field(schema.Str(choices=LEVELS), default=None),
    "match": schema.Field(schema.Str(max_len=200), default=""),
})

# A verdict on the probes' hits (lab/probes/checks.py): a built-in check, or every hit of one probe
# satisfying an expression of the checks' own small language.
CHECK_SPEC = schema.Map({
    "name": schema.Field(schema.Str(pattern=r"[A-Za-z0-9_][A-Za-z0-9_. -]{0,79}",
                                    pattern_what="a name of letters, digits, '_', '.', '-', ' '"),
                         default=None),
    "builtin": schema.Field(schema.Str(choices=tuple(BUILTIN_CHECKS)), default=None),
    "probe": schema.Field(schema.Str(max_len=64), default=None),
    "when": schema.Field(schema.Str(choices=("entry", "return")), default="entry"),
    "expect": schema.Field(schema.Str(nonempty=True, max_len=500), default=None),
    "at_least": schema.Field(schema.Int(minimum=0, maximum=1000000), default=1),
})

# The peer suites as steps (lab/peers/): sections of the user's kvm-unit-tests build, tests of
# the KVM selftests the lab builds for the level's kernel. Names only: where the build lives is
# the user's to say (--kvm-unit-tests), never a playbook's.
_TEST_NAME = schema.Str(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}",
                        pattern_what="a test's name (letters, digits, '_', '.', '+', '-')")
KVM_UNIT_TESTS_SPEC = schema.Map({
    "tests": schema.Field(schema.List(_TEST_NAME), default=None),
    "groups": schema.Field(schema.List(_TEST_NAME), default=None),
})
SELFTESTS_SPEC = schema.Map({
    "tests": schema.Field(schema.List(_TEST_NAME), default=None),
})
STEP_KINDS = ("run", "kvm_unit_tests", "selftests")

STEP_SPEC = schema.Map({
    "name": schema.Field(schema.Str(max_len=200)),
    "on": schema.Field(schema.Str(choices=LEVELS), default="l0"),
    "run": schema.Field(schema.Str(multiline=True, nonempty=True, pattern_what="a command"),
                        default=None),
    "kvm_unit_tests": schema.Field(KVM_UNIT_TESTS_SPEC, default=None),
    "selftests": schema.Field(SELFTESTS_SPEC, default=None),
    "expect": schema.Field(schema.Int(minimum=0, maximum=255), default=0),
    "timeout": schema.Field(schema.Int(minimum=1), default=120),
    "tap": schema.Field(schema.Bool(), default=False),
    "expect_events": schema.Field(schema.List(EXPECTED_EVENT_SPEC), default=None),
})

PLAYBOOK_SPEC = schema.Map({
    "name": schema.Field(schema.run_name()),
    "description": schema.Field(schema.Str(multiline=True), default=""),
    "profile": schema.Field(schema.Str(choices=("auto", *PROFILES)), default="auto"),
    "topology": schema.Field(schema.Dict(LEVEL_SPEC, key_check=lambda k: k in LEVELS,
                                         key_what="a level (l0, l1, l2)")),
    "steps": schema.Field(schema.List(STEP_SPEC), default=None),
    "probes": schema.Field(schema.List(PROBE_SPEC), default=None),
    "inject": schema.Field(schema.Str(choices=INJECTION_NAMES), default=None),
    # None: gdb where the profile has a gdbstub, tracefs where it has not.
    "probe_backend": schema.Field(schema.Str(choices=("gdb", "tracefs")), default=None),
    "extends": schema.Field(schema.Str(), default=None),
    # auto: restore a saved lab of this topology if there is one, else boot and save one.
    "snapshot": schema.Field(schema.Str(choices=("auto", "off")), default="auto"),
    "expect_events": schema.Field(schema.List(EXPECTED_EVENT_SPEC), default=None),
    "checks": schema.Field(schema.List(CHECK_SPEC), default=None),
})

DEFAULT_MEMORY = {"l0": 1024, "l1": 1024, "l2": 256}
DEFAULT_BOOT_TIMEOUT = {"l0": 120, "l1": 180, "l2": 300}


@dataclass
class Level:
    name: str
    image: str
    recipe: Path
    memory_mb: int
    cpus: int
    append: str
    modules: dict[str, dict[str, str]]
    boot_timeout: int
    line: int
    kaslr: bool = False  # boot with KASLR (the default is nokaslr); gdb relocates the symbols
    qemu: bool = False  # carries QEMU and its firmware even without a child
    image_given: bool = True  # False: `image` is the default, and a profile may choose another
    timeout_given: bool = True  # False: `boot_timeout` is the default, scaled by the profile

    @property
    def parent(self) -> str | None:
        return PARENT.get(self.name)


@dataclass
class Step:
    name: str
    on: str
    run: str
    expect: int
    timeout: int
    line: int
    tap: bool = False
    expect_events: list[Expected] = field(default_factory=list)  # must come while it runs
    # A peer-suite step instead of a command: which tests (empty: the runner's defaults).
    kvm_unit_tests: PeerTests | None = None
    selftests: PeerTests | None = None


@dataclass
class PeerTests:
    """The tests a kvm_unit_tests or selftests step asks for, by name or by group."""

    tests: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    where: str = ""  # FILE:LINE: steps[i].KIND, for errors found once the build is known


@dataclass
class Playbook:
    path: Path
    name: str
    description: str
    profile: str
    levels: dict[str, Level]
    steps: list[Step] = field(default_factory=list)
    probes: list[Any] = field(default_factory=list)  # validated items; expanded per vendor
    inject: str | None = None
    probe_backend: str | None = None  # None: decided by the profile (see for_profile)
    snapshot: str = "auto"  # "auto" | "off": warm start from a saved lab (lab/snapshot.py)
    lines: dict[str, int] = field(default_factory=dict)  # top-level field -> line, for errors
    expect_events: list[Expected] = field(default_factory=list)  # may come, at any time
    checks: list[Check] = field(default_factory=list)  # verdicts on the probes' hits

    def for_profile(self, profile: Profile) -> Playbook:
        """This playbook as it runs under `profile`: L0's image and the probe backend where
        the playbook leaves them to the profile, default boot timeouts scaled to its speed."""
        levels = {}
        for name, lv in self.levels.items():
            changes: dict[str, Any] = {}
            if name == "l0" and not lv.image_given and profile.l0_image != lv.image:
                recipe = find_image(self.path, profile.l0_image)
                if recipe is None:
                    looked = ", ".join(str(d) for d in image_dirs(self.path))
                    raise UsageError(f"{self.path}:{lv.line}: topology.l0.image: profile "
                                     f"{profile.name} needs image {profile.l0_image!r}, and "
                                     f"there is no such recipe (looked in {looked})")
                changes.update(image=profile.l0_image, recipe=recipe)
            if not lv.timeout_given:
                changes["boot_timeout"] = round(lv.boot_timeout * profile.timeout_scale)
            levels[name] = dataclasses.replace(lv, **changes)
        backend = self.probe_backend or ("gdb" if profile.has_gdbstub else "tracefs")
        if backend == "gdb" and not profile.has_gdbstub and self.probes:
            raise UsageError(f"{self.path}:{self.lines.get('probe_backend', 1)}: probe_backend: "
                             f"gdb cannot probe L0 under profile {profile.name} (it has no "
                             f"gdbstub); expected tracefs")
        if self.inject:
            from lab.inject import InjectionError, resolve

            # An injection is one vendor's code: a profile of the other one cannot take it,
            # whatever its way in (a matrix leaves that cell out, with this reason).
            try:
                by_module = resolve(self.inject, profile.vendor).kprobe is not None
            except InjectionError as e:
                raise UsageError(f"{self.path}:{self.lines.get('inject', 1)}: inject: {e}") \
                    from None
            if not by_module and not profile.has_gdbstub:
                raise UsageError(f"{self.path}:{self.lines.get('inject', 1)}: inject: "
                                 f"{self.inject} patches L0 through gdb, and profile "
                                 f"{profile.name} has no gdbstub")
        return dataclasses.replace(self, levels=levels, probe_backend=backend,
                                   expect_events=[*self.expect_events, *profile.known_events])

    def probe_specs(self, vendor: str) -> list[Any]:
        return load_probes(self.probes, vendor)

    def child(self, level: str) -> str | None:
        for name, parent in PARENT.items():
            if parent == level and name in self.levels:
                return name
        return None


def image_dirs(playbook: Path) -> list[Path]:
    """Where image names are looked up: next to the playbooks, then the working directory."""
    dirs = [playbook.resolve().parent.parent / "images", Path.cwd() / "images"]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def find_image(playbook: Path, name: str) -> Path | None:
    try:
        if name.endswith(".yaml") or "/" in name:
            p = (playbook.parent / name).resolve()
            return p if p.is_file() else None
        for d in image_dirs(playbook):
            if (d / f"{name}.yaml").is_file():
                return d / f"{name}.yaml"
    except OSError:  # no path at all (too long): no recipe
        return None
    return None


def _read(path: Path, seen: tuple[Path, ...] = ()) -> schema.Located:
    """The playbook's fields, with `extends: BASE` filled in from the base playbook: every
    top-level key the file itself sets replaces the base's."""
    data = schema.load(path, PLAYBOOK_SPEC)
    if not data["extends"]:
        if "topology" not in data.lines:
            raise UsageError(f"{path}:1: topology: missing required field")
        return data
    try:
        base_path = (path.parent / data["extends"]).resolve()
        found = base_path.is_file()
    except OSError as e:  # a name too long for a path, say
        raise UsageError(f"{data.where('extends')}: extends: not a playbook's path "
                         f"({e.strerror})") from None
    if base_path in seen or base_path == path.resolve():
        raise UsageError(f"{data.where('extends')}: extends: {data['extends']} extends itself")
    if not found:
        raise UsageError(f"{data.where('extends')}: extends: no playbook {base_path}")
    base = _read(base_path, (*seen, path.resolve()))
    for key in data.lines:
        if key != "extends":
            base[key] = data[key]
            base.lines[key] = data.lines[key]
    if "name" not in data.lines:
        base["name"] = None
    return base


def load(path: Path) -> Playbook:
    data = _read(path)
    topo = data["topology"]
    if "l0" not in topo:
        raise UsageError(f"{topo.where()}: topology: missing required level l0")
    levels: dict[str, Level] = {}
    for name in LEVELS:
        if name not in topo:
            continue
        lv = topo[name]
        parent = PARENT.get(name)
        if parent and parent not in topo:
            raise UsageError(f"{topo.where(name)}: topology.{name}: needs its parent {parent}")
        image = lv["image"] or "default"
        recipe = find_image(path, image)
        if recipe is None:
            looked = ", ".join(str(d) for d in image_dirs(path))
            raise UsageError(f"{lv.where('image')}: topology.{name}.image: no recipe "
                             f"{image!r} (looked in {looked})")
        levels[name] = Level(
            name=name, image=image, recipe=recipe,
            memory_mb=lv["memory"] or DEFAULT_MEMORY[name], cpus=lv["cpus"],
            append=lv["append"], modules={m: dict(p) for m, p in (lv["modules"] or {}).items()},
            boot_timeout=lv["boot_timeout"] or DEFAULT_BOOT_TIMEOUT[name],
            line=topo.lines[name], kaslr=lv["kaslr"], qemu=lv["qemu"],
            image_given=lv["image"] is not None,
            timeout_given=lv["boot_timeout"] is not None)
    for name, lv in levels.items():
        parent = lv.parent
        if parent is None:
            continue
        p = levels[parent]
        need = lv.memory_mb + PARENT_OVERHEAD_MB
        if need > p.memory_mb:
            raise UsageError(
                f"{path}:{topo[parent].lines.get('memory', p.line)}: topology.{parent}.memory: "
                f"{p.memory_mb} MiB cannot hold {name} ({lv.memory_mb} MiB + "
                f"{PARENT_OVERHEAD_MB} MiB for {parent} itself); expected at least {need}")
        for mod in ("kvm_amd", "kvm_intel"):
            if p.modules.get(mod, {}).get("nested") in ("0", "N", "n"):
                raise UsageError(f"{path}:{p.line}: topology.{parent}.modules.{mod}.nested: "
                                 f"{parent} runs {name}, so it needs nested=1")
    steps = []
    for i, st in enumerate(data["steps"] or []):
        if st["on"] not in levels:
            raise UsageError(f"{st.where('on')}: steps[{i}].on: level {st['on']} is not in "
                             f"the topology (expected one of {', '.join(levels)})")
        kinds = [k for k in STEP_KINDS if st[k] is not None]
        if len(kinds) != 1:
            raise UsageError(f"{st.where()}: steps[{i}]: expected exactly one of "
                             f"{', '.join(STEP_KINDS)}, got {', '.join(kinds) or 'none'}")
        peer = {k: PeerTests(tests=list(st[k]["tests"] or []),
                             groups=list(st[k].get("groups") or []),
                             where=f"{st.where(k)}: steps[{i}].{k}")
                for k in STEP_KINDS[1:] if st[k] is not None}
        if "kvm_unit_tests" in peer:
            # Each section is a QEMU inside the level, as run_tests.sh starts it.
            levels[st["on"]].qemu = True
        default_name = f"step {i + 1}" if kinds[0] == "run" else kinds[0].replace("_", "-")
        steps.append(Step(name=st["name"] or default_name, on=st["on"], run=st["run"] or "",
                          expect=st["expect"], timeout=st["timeout"], line=st.line,
                          tap=st["tap"],
                          expect_events=_expected(st["expect_events"], levels, f"steps[{i}]"),
                          **peer))
    probes = list(data["probes"] or [])
    load_probes(probes, "amd")  # validates; the lab expands the sets for the real vendor
    probe_names = {p.name for v in ("amd", "intel") for p in load_probes(probes, v)}
    checks = load_checks(data["checks"] or [], probe_names)
    return Playbook(path=path, name=data["name"] or path.stem, description=data["description"],
                    profile=data["profile"], levels=levels, steps=steps, probes=probes,
                    inject=data["inject"], probe_backend=data["probe_backend"],
                    snapshot=data["snapshot"], lines=dict(data.lines),
                    expect_events=_expected(data["expect_events"], levels, ""),
                    checks=checks)


def _expected(items: list[Any] | None, levels: dict[str, Level], where: str) -> list[Expected]:
    out = []
    for i, e in enumerate(items or []):
        if e["level"] is not None and e["level"] not in levels:
            raise UsageError(f"{e.where('level')}: {where + '.' if where else ''}expect_events[{i}]"
                             f".level: level {e['level']} is not in the topology (expected one "
                             f"of {', '.join(levels)})")
        out.append(Expected(e["kind"], e["level"], e["match"]))
    return out
