"""Playbook validation: every problem is one line naming file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab import playbook
from lab.errors import UsageError

GOOD = """\
name: t
topology:
  l0:
    image: default
    memory: 2048
  l1:
    memory: 1024
steps:
  - name: hello
    on: l1
    run: echo hi
    expect: 0
    timeout: 10
"""


def make(tmp_path: Path, text: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "default.yaml").write_text("kernel: {debian: linux-image-cloud-amd64}\n")
    (tmp_path / "playbooks").mkdir(exist_ok=True)
    p = tmp_path / "playbooks" / "t.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(UsageError) as e:
        playbook.load(make(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_playbook(tmp_path: Path) -> None:
    pb = playbook.load(make(tmp_path, GOOD))
    assert list(pb.levels) == ["l0", "l1"]
    assert pb.levels["l1"].parent == "l0"
    assert pb.levels["l0"].memory_mb == 2048
    assert pb.steps[0].on == "l1" and pb.steps[0].timeout == 10
    assert pb.child("l0") == "l1" and pb.child("l1") is None


def test_repo_playbooks_load(root: Path) -> None:
    from lab import suite

    for p in sorted((root / "playbooks").glob("*.yaml")):
        if suite.is_suite(p):
            assert suite.load(p).entries
            continue
        pb = playbook.load(p)
        assert "l0" in pb.levels, p


def test_unknown_key_names_file_line_field(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("    memory: 2048", "    memroy: 2048"))
    assert msg.startswith(f"{tmp_path}/playbooks/t.yaml:5: topology.l0.memroy: unknown key")


def test_wrong_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("timeout: 10", "timeout: soon"))
    assert ":13: steps[0].timeout: expected an integer >= 1, got 'soon'" in msg


def test_a_step_is_exactly_one_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("    run: echo hi\n", ""))
    assert msg.endswith(":9: steps[0]: expected exactly one of run, kvm_unit_tests, "
                        "selftests, got none")
    msg = error_of(tmp_path, GOOD.replace("    run: echo hi\n",
                                          "    run: echo hi\n    selftests: {}\n"))
    assert msg.endswith("got run, selftests")


def test_peer_steps_name_tests_never_paths(tmp_path: Path) -> None:
    pb = playbook.load(make(tmp_path, GOOD.replace(
        "    run: echo hi\n", "    kvm_unit_tests: {tests: [svm, vmx_apic]}\n")))
    st = pb.steps[0]
    assert st.kvm_unit_tests is not None and st.kvm_unit_tests.tests == ["svm", "vmx_apic"]
    assert pb.levels["l1"].qemu and not pb.levels["l0"].qemu  # QEMU goes where it runs
    msg = error_of(tmp_path, GOOD.replace(
        "    run: echo hi\n", "    kvm_unit_tests: {dir: /home/me/kut}\n"))
    assert "steps[0].kvm_unit_tests.dir: unknown key (expected one of: tests, groups)" in msg
    msg = error_of(tmp_path, GOOD.replace(
        "    run: echo hi\n", "    selftests: {tests: [../../bin/sh]}\n"))
    assert "steps[0].selftests.tests[0]: expected a test's name" in msg


def test_kvm_unit_tests_step_needs_a_build(tmp_path: Path) -> None:
    p = make(tmp_path, GOOD.replace("    run: echo hi\n", "    kvm_unit_tests: {}\n"))
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "lab", "run", str(p), "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "steps[0].kvm_unit_tests: needs a kvm-unit-tests build; give --kvm-unit-tests" \
        in r.stderr
    r = subprocess.run([sys.executable, "-m", "lab", "run", str(p), "--kvm-unit-tests",
                        str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "no x86/unittests.cfg there" in r.stderr


def test_missing_image_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("image: default", "image: nosuch"))
    assert ":4: topology.l0.image: no recipe 'nosuch'" in msg


def test_level_without_parent(tmp_path: Path) -> None:
    text = GOOD.replace("  l1:\n    memory: 1024\n", "  l2:\n    memory: 256\n")
    text = text.replace("on: l1", "on: l0")
    assert "topology.l2: needs its parent l1" in error_of(tmp_path, text)


def test_child_memory_must_fit(tmp_path: Path) -> None:
    msg = error_of(tmp_path, GOOD.replace("memory: 1024", "memory: 1900"))
    assert "topology.l0.memory: 2048 MiB cannot hold l1" in msg and ":5:" in msg


def test_parent_needs_nested(tmp_path: Path) -> None:
    text = GOOD.replace("    memory: 2048\n",
                        "    memory: 2048\n    modules: {kvm_amd: {nested: 0}}\n")
    assert "modules.kvm_amd.nested: l0 runs l1, so it needs nested=1" in error_of(tmp_path, text)


def test_step_on_absent_level(tmp_path: Path) -> None:
    text = GOOD.replace("on: l1", "on: l2")
    assert "steps[0].on: level l2 is not in the topology" in error_of(tmp_path, text)


def test_bad_level_name(tmp_path: Path) -> None:
    text = GOOD.replace("  l1:\n", "  l7:\n")
    assert "topology.l7: expected a level (l0, l1, l2)" in error_of(tmp_path, text)


def test_invalid_yaml(tmp_path: Path) -> None:
    assert "not valid YAML" in error_of(tmp_path, "topology: [\n")


def test_module_params_keep_strings(tmp_path: Path) -> None:
    text = GOOD.replace("    memory: 2048\n",
                        "    memory: 2048\n    modules: {kvm_amd: {npt: true, avic: 0}}\n")
    pb = playbook.load(make(tmp_path, text))
    assert pb.levels["l0"].modules == {"kvm_amd": {"npt": "1", "avic": "0"}}


@pytest.mark.parametrize("cmd", ["run", "up"])
def test_cli_bad_playbook_exits_2_with_one_line(tmp_path: Path, cmd: str) -> None:
    p = make(tmp_path, GOOD.replace("expect: 0", "expect: lots"))
    r = subprocess.run([sys.executable, "-m", "lab", cmd, str(p), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "steps[0].expect" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "state.json").exists()


def test_cli_missing_playbook_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lab", "run", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_extends_replaces_only_the_keys_it_sets(tmp_path: Path) -> None:
    base = make(tmp_path, GOOD)
    child = base.with_name("child.yaml")
    child.write_text("extends: t.yaml\nname: child\ninject: invalidate-too-little\n"
                     "steps:\n  - {run: 'true', on: l0}\n")
    pb = playbook.load(child)
    assert pb.name == "child" and pb.inject == "invalidate-too-little"
    assert list(pb.levels) == ["l0", "l1"]  # from the base
    assert [s.run for s in pb.steps] == ["true"]  # replaced


def test_extends_errors(tmp_path: Path) -> None:
    make(tmp_path, GOOD)
    loop = tmp_path / "playbooks" / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(UsageError, match="extends itself"):
        playbook.load(loop)
    missing = tmp_path / "playbooks" / "m.yaml"
    missing.write_text("extends: nope.yaml\n")
    with pytest.raises(UsageError, match=r"m.yaml:1: extends: no playbook"):
        playbook.load(missing)


# -- values that would reach gdb, a shell or a path (issue: host-side holes) ----------------
PROBE_PB = """\
name: x
topology: {l0: {}}
probes:
  - at: %s
    if: %s
    capture: {v: %s}
"""


@pytest.mark.parametrize("at, cond, cap, field", [
    ('"kvm_mmu_sync_roots\\nshell id > /tmp/x"', "1", "1", "probes[0].at"),
    ("kvm_mmu_sync_roots", '"1\\nshell id"', "1", "probes[0].if"),
    ("kvm_mmu_sync_roots", "1", '"1\\nshell id"', "probes[0].capture.v"),
    ("kvm_mmu_sync_roots", '"$_shell(\\"id\\")"', "1", "probes[0].if"),
    ("kvm_mmu_sync_roots", "1", '"$_shell(\\"id\\") + 1"', "probes[0].capture.v"),
    ('"foo; shell id"', "1", "1", "probes[0].at"),
])
def test_probe_values_that_would_reach_gdb_are_refused(tmp_path: Path, at: str, cond: str,
                                                       cap: str, field: str) -> None:
    p = make(tmp_path, PROBE_PB % (at, cond, cap))
    msg = error_of(tmp_path, PROBE_PB % (at, cond, cap))
    assert msg.startswith(f"{p}:") and field in msg, msg


def test_allowed_gdb_functions_and_linespecs_pass(tmp_path: Path) -> None:
    for at in ("handle_invept", "kvm_intel:handle_invept", "arch/x86/kvm/mmu/mmu.c:3500",
               "'*0xffffffffc0384400'"):
        playbook.load(make(tmp_path, PROBE_PB % (at, '"$_caller_is(\\"handle_invept\\", 1)"',
                                                 "vcpu->arch.mmu")))


@pytest.mark.parametrize("text, field", [
    ('name: "x/../../../escaped"\ntopology: {l0: {}}\n', "name"),
    ('name: ".hidden"\ntopology: {l0: {}}\n', "name"),
    ("name: x\ntopology: {l0: {}}\nsteps: [{run: ''}]\n", "steps[0].run"),
    ('name: x\ntopology: {l0: {}}\nsteps: [{run: "printf \\u001b[31m"}]\n', "steps[0].run"),
    ('name: x\ntopology: {l0: {append: "quiet\\nshell"}}\n', "topology.l0.append"),
    ('name: x\ntopology: {l0: {}}\nsteps: [{name: "a\\u0000b", run: "true"}]\n',
     "steps[0].name"),
])
def test_content_is_checked_not_only_type(tmp_path: Path, text: str, field: str) -> None:
    msg = error_of(tmp_path, text)
    assert f": {field}: expected" in msg, msg


def test_multiline_run_keeps_newlines_and_tabs(tmp_path: Path) -> None:
    p = make(tmp_path, 'name: x\ntopology: {l0: {}}\nsteps: [{run: "a\\n\\tb"}]\n')
    assert playbook.load(p).steps[0].run == "a\n\tb"
