"""lab bisect's search and the candidates it bisects; a matrix cell that cannot run on its
kernel shown as skipped with its reason, in the table and in JUnit."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from lab import bisect, matrix, merge, suite
from lab.errors import UsageError
from lab.kernel import DebianChoice

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n,first_bad", [(2, 1), (11, 6), (11, 1), (11, 10), (64, 37)])
def test_search_finds_the_first_bad_in_log2_steps(n: int, first_bad: int) -> None:
    calls: list[int] = []

    def oracle(i: int) -> str:
        calls.append(i)
        return bisect.BAD if i >= first_bad else bisect.GOOD

    res = bisect.search(n, oracle)
    assert res.first_bad == first_bad
    assert len(calls) <= math.ceil(math.log2(n)) and 0 not in calls and n - 1 not in calls


def test_search_steps_around_skips_and_says_when_it_cannot() -> None:
    res = bisect.search(11, lambda i: bisect.SKIP if i == 5 else
                        (bisect.BAD if i >= 7 else bisect.GOOD))
    assert res.first_bad == 7 and (5, bisect.SKIP) in res.tested
    res = bisect.search(5, lambda i: bisect.SKIP)  # nothing but skips between the ends
    assert res.first_bad is None and res.range == (0, 4)
    assert bisect.verdict_of(0) == "good" and bisect.verdict_of(1) == "bad"
    assert bisect.verdict_of(3) == "skip" and bisect.verdict_of(2) is None


def test_debian_candidates_of_the_recipes_flavour() -> None:
    names = [f"linux-image-6.1.0-{n}-cloud-amd64" for n in range(47, 58)] + \
        [f"linux-image-6.1.0-{n}-amd64" for n in range(40, 58)] + \
        ["linux-image-6.1.0-50-cloud-amd64-dbg", "linux-image-6.1.0-9-cloud-amd64"]
    c = bisect.debian_candidates(DebianChoice("bookworm", "6.1.0-49"),
                                 DebianChoice("bookworm", "6.1.0-52"),
                                 "linux-image-cloud-amd64", names)
    assert [x.spec for x in c] == [f"debian:bookworm/6.1.0-{n}" for n in (49, 50, 51, 52)]
    with pytest.raises(UsageError, match="must be older"):
        bisect.debian_candidates(DebianChoice("bookworm", "6.1.0-52"),
                                 DebianChoice("bookworm", "6.1.0-49"), "linux-image-amd64",
                                 names)
    with pytest.raises(UsageError, match=r"has no linux-image-6\.1\.0-58-cloud-amd64"):
        bisect.debian_candidates(DebianChoice("bookworm", "6.1.0-49"),
                                 DebianChoice("bookworm", "6.1.0-58"),
                                 "linux-image-cloud-amd64", names)
    with pytest.raises(UsageError, match="two ABIs of one suite"):
        bisect.debian_candidates(DebianChoice("bookworm"), DebianChoice("bookworm", "6.1.0-5"),
                                 "linux-image-amd64", names)


def test_tree_bisect_command_builds_runs_and_skips(tmp_path: Path) -> None:
    cfg = tmp_path / "my config"
    cfg.write_text("CONFIG_KVM=m\n")
    cmd = bisect.run_command(ROOT / "playbooks" / "smoke.yaml", tmp_path, cfg,
                             tmp_path / "out", 2, "tcg-svm")
    assert cmd.startswith("git bisect run sh -c ")
    step = shlex.split(cmd)[-1]
    assert f"cp {shlex.quote(str(cfg))} .config" in step  # a path with a space, quoted
    assert "make -j2 bzImage modules" in step and "|| exit 125" in step
    assert "--kernel-tree" in step and "--profile tcg-svm" in step
    assert "[ $s -eq 3 ] && exit 125; exit $s" in step


def test_series_and_named_debian_kernels_on_the_axis() -> None:
    ks = matrix.parse_kernels("debian,6.12,old=debian:bookworm/6.1.0-47")
    assert [(k.label, k.debian.spec if k.debian else None) for k in ks] == [
        ("debian", None), ("6.12", "debian:trixie"), ("old", "debian:bookworm/6.1.0-47")]
    with pytest.raises(UsageError, match=r"--kernels: old: 'debian:etch'"):
        matrix.parse_kernels("old=debian:etch")


def test_a_cell_that_cannot_run_is_skipped_with_its_reason(tmp_path: Path) -> None:
    entry = suite.Entry(ROOT / "playbooks" / "invept-bug-injected.yaml", "failed")
    k = matrix.Kernel("7.x", debian=DebianChoice("sid"))
    ran = matrix.Cell(entry.playbook, "invept-bug-injected", "tcg-svm", k, entry)
    rep = {"name": "invept-bug-injected", "profile": "tcg-svm", "status": "error",
           "exit_status": 3, "steps": [], "levels": {}, "phases": {}, "run_dir": str(tmp_path),
           "error": {"kind": "injection", "message": "skip-nested-mmu-sync: no kvm_make_request"
                                                     " in kvm_mmu_sync_roots"}}
    never = matrix.Cell(entry.playbook, "invept-vmx", "bochs-vmx", k, entry)
    summ = merge.summary("s", ROOT / "playbooks" / "kernels.yaml",
                         [merge.Merged(ran, tmp_path, rep)], [k],
                         [(never, "probe_backend: gdb cannot probe L0 under bochs-vmx")])
    by = {c["key"]: c for c in summ["cells"]}
    assert by[ran.key]["status"] == "skipped" and by[ran.key]["met"]
    assert "no kvm_make_request" in by[ran.key]["why"]
    assert by[never.key]["status"] == "skipped" and by[never.key]["run_dir"] is None
    assert summ["exit_status"] == 0  # nothing that ran failed
    merge.write(tmp_path / "out", summ, [merge.Merged(ran, tmp_path, rep)], "s")
    junit = (tmp_path / "out" / "junit.xml").read_text()
    assert junit.count("<skipped") == 2 and "cannot probe L0 under bochs-vmx" in junit
    html = (tmp_path / "out" / "report.html").read_text()
    assert "no kvm_make_request" in html and json.loads(
        (tmp_path / "out" / "report.json").read_text())["status"] == "passed"


def test_tree_bisect_refuses_a_name_that_is_no_commit(tmp_path: Path) -> None:
    """git bisect start would take such a name as a path to search in, and bisect nothing."""
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    cfg = tmp_path / "config"
    cfg.write_text("CONFIG_KVM=m\n")
    with pytest.raises(UsageError, match=r"^--good v9\.9: not a commit of "):
        bisect.tree(ROOT / "playbooks" / "smoke.yaml", tmp_path, "v9.9", "HEAD", cfg,
                    tmp_path / "out", 1, None)
    log = subprocess.run([*git, "bisect", "log"], capture_output=True)
    assert log.returncode != 0  # no bisect was started


def test_a_suites_matrix_names_no_host_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="a suite names kernels, not host paths"):
        matrix.parse_kernels(["mine=/src/linux"], "s.yaml:3: matrix.kernel", paths=False)
    assert matrix.parse_kernels([f"mine={tmp_path}"])[0].tree == tmp_path  # the user's own
    (tmp_path / "s.yaml").write_text(
        f"name: s\nsuite:\n  - playbook: {ROOT}/playbooks/smoke.yaml\n"
        f"matrix:\n  kernel: [\"mine={tmp_path}\"]\n")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lab", "run", str(tmp_path / "s.yaml"), "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "a suite names kernels, not host paths" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_cell_whose_l0_went_without_la57_says_so(tmp_path: Path) -> None:
    entry = suite.Entry(ROOT / "playbooks" / "nested.yaml", "passed")
    k = matrix.Kernel("5.10", debian=DebianChoice.parse(matrix.SERIES["5.10"], "t"))
    cell = matrix.Cell(entry.playbook, "nested", "tcg-svm", k, entry)
    why = "L0's CPU without LA57: 5.10.0-32-cloud-amd64 walks ..."
    rep = {"name": "nested", "profile": "tcg-svm", "status": "passed", "exit_status": 0,
           "steps": [], "phases": {}, "run_dir": str(tmp_path),
           "levels": {"l0": {"la57": False, "la57_why": why}}}
    summ = merge.summary("s", ROOT / "playbooks" / "kernels.yaml",
                         [merge.Merged(cell, tmp_path, rep)], [k])
    assert summ["cells"][0]["note"] == why
    merge.write(tmp_path / "out", summ, [merge.Merged(cell, tmp_path, rep)], "s")
    assert "without LA57" in (tmp_path / "out" / "report.html").read_text()
