"""The nightly at scale: the matrix, the GitLab pipeline, `lab merge` and KCIDB, on reports
shaped as the lab writes them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import kcidb_io
import pytest
import yaml

from lab import ci, kcidb, matrix, merge
from lab.errors import UsageError
from lab.report import Report, StepResult


def _cells(root: Path, suite: str = "playbooks/nightly.yaml",
           profiles: str | None = None) -> tuple[Any, list[matrix.Cell], list[str]]:
    return matrix.cells(root / suite, matrix.parse_profiles(profiles),
                        matrix.parse_kernels(None))


def test_the_nightly_pipeline_has_a_job_per_cell_and_a_merge(root: Path,
                                                             monkeypatch: Any) -> None:
    monkeypatch.chdir(root)
    _, cells, left_out = _cells(root)
    assert [c.key for c in cells] == [
        "smoke.tcg-svm.debian", "nested.tcg-svm.debian", "invept.tcg-svm.debian",
        "invept-vmx.bochs-vmx.debian", "invept-svm.tcg-svm.debian",
        "invept-bug-injected.tcg-svm.debian", "invept-vmx-bug-injected.bochs-vmx.debian",
        "invept-vmx-free-current-only.bochs-vmx.debian",
        "invept-vmx-global-as-single.bochs-vmx.debian", "invept-svm-bug-injected.tcg-svm.debian",
        "invept-svm-forget-cached-ncr3.tcg-svm.debian"]
    assert left_out == []
    p = yaml.safe_load(ci.gitlab(root / "playbooks/nightly.yaml", cells, left_out, None,
                                 matrix.parse_kernels(None), "/srv/lab-cache"))
    assert p["stages"] == ["cells", "merge"] and p["variables"]["LAB_CACHE"] == "/srv/lab-cache"
    job = p["invept-vmx.bochs-vmx.debian"]
    assert job["tags"] == ["bochs"] and job["retry"] == {"max": 2, "exit_codes": [3]}
    assert job["script"] == [".venv/bin/lab run playbooks/invept-vmx.yaml --profile bochs-vmx "
                             "--out runs/invept-vmx.bochs-vmx.debian"]
    assert job["artifacts"]["reports"]["junit"] == "runs/invept-vmx.bochs-vmx.debian/junit.xml"
    assert int(job["timeout"].rstrip("m")) > int(p["smoke.tcg-svm.debian"]["timeout"][:-1])
    assert "allow_failure" not in job
    assert p["invept-bug-injected.tcg-svm.debian"]["allow_failure"] == {"exit_codes": [1]}
    assert p["merge"]["when"] == "always"
    assert p["merge"]["script"] == [".venv/bin/lab merge --suite playbooks/nightly.yaml "
                                    "--out merged runs/*/"]


def test_a_matrix_crosses_profiles_and_kernels_and_says_what_it_leaves_out(
        root: Path, tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    kernels = matrix.parse_kernels(f"debian,mine={tree}")
    _, cells, left = matrix.cells(root / "playbooks/nightly.yaml", ["tcg-svm", "bochs-vmx"],
                                  kernels)
    # An injection of one vendor is left out under the other's profile, and says why:
    # forget-cached-ncr3 (SVM) under bochs-vmx, free-current-only and global-as-single (VMX)
    # under tcg-svm; once per playbook and profile, for both kernels.
    assert len(cells) == (11 * 2 - 3) * 2 and len(left) == 3, left
    assert sorted(why.split(" is for ")[1].split()[0] for why in left) == [
        "amd", "intel", "intel"], left
    assert {c.kernel.label for c in cells} == {"debian", "mine"}
    # A playbook that insists on gdb cannot run under bochs-vmx (no gdbstub): left out, why
    pb = tmp_path / "gdb-only.yaml"
    pb.write_text(f"name: gdb-only\ntopology:\n  l0: {{image: {root}/images/default.yaml}}\n"
                  "probe_backend: gdb\nprobes: [{set: invalidation}]\n")
    _, cells, left = matrix.cells(pb, ["tcg-svm", "bochs-vmx"], kernels)
    assert [c.key for c in cells] == ["gdb-only.tcg-svm.debian", "gdb-only.tcg-svm.mine"]
    assert len(left) == 1 and left[0].startswith("gdb-only under bochs-vmx: ")
    assert "probe_backend: gdb cannot probe L0 under profile bochs-vmx" in left[0]
    assert next(c for c in cells if c.kernel.label == "mine").run_args()[-2:] == \
        ["--kernel-tree", str(tree)]
    with pytest.raises(UsageError, match=r"--kernels: 'x': expected `debian`, a series"):
        matrix.parse_kernels("x")
    with pytest.raises(UsageError, match=r"--profiles: 'kvm': expected one of"):
        matrix.parse_profiles("tcg-svm,kvm")


def _run(tmp: Path, key: str, name: str, profile: str, statuses: list[str],
         tree: str | None = None) -> Path:
    d = tmp / "runs" / key
    d.mkdir(parents=True)
    r = Report(playbook=f"{name}.yaml", name=name, run_dir=str(d), profile=profile,
               kernel_tree=tree, started="2026-12-01T16:00:00",
               logs={"l0.console.log": "l0.console.log"})
    r.levels["l0"] = {"kernel": {"release": "6.1.0-57-cloud-amd64", "source": "debian"},
                      "timeline": {"launch": 0.5, "init": 4.0, "ssh_ready": 6.0}}
    r.phases = {"boot": 6.1, "total": 9.0}
    for i, st in enumerate(statuses):
        r.steps.append(StepResult(name=f"step {i}", level="l0", command="true", expected=0,
                                  status=st, exit_status=0 if st == "passed" else 1,
                                  seconds=0.5))
    r.finish()
    r.write(d)
    return d


def test_merge_judges_each_cell_against_the_suite(root: Path, tmp_path: Path,
                                                   monkeypatch: Any) -> None:
    monkeypatch.chdir(root)
    kernels = matrix.parse_kernels(None)
    s, cells, _ = matrix.cells(root / "tests/data/ci-small.yaml", ["tcg-svm", "bochs-vmx"],
                               kernels)
    dirs = [_run(tmp_path, "a", "smoke", "tcg-svm", ["passed"]),
            _run(tmp_path, "b", "smoke", "bochs-vmx", ["passed"]),
            _run(tmp_path, "c", "step-fails", "tcg-svm", ["failed"]),
            _run(tmp_path, "d", "step-fails", "bochs-vmx", ["passed"])]  # did not fail
    merged = merge.match(cells, kernels, dirs)
    summ = merge.summary(s.name, root / "tests/data/ci-small.yaml", merged, kernels)
    assert [(c["key"], c["met"]) for c in summ["cells"]] == [
        ("smoke.tcg-svm.debian", True), ("smoke.bochs-vmx.debian", True),
        ("step-fails.tcg-svm.debian", True), ("step-fails.bochs-vmx.debian", False)]
    assert summ["status"] == "failed" and summ["exit_status"] == 1
    out = tmp_path / "merged"
    merge.write(out, summ, merged, s.name)
    root_el = ET.parse(out / "junit.xml").getroot()
    classes = {tc.get("classname") for tc in root_el.iter("testcase")}
    assert "debian.bochs-vmx.ci-small.expectations" in classes  # the axis in every classname
    assert all(c.startswith(("debian.tcg-svm.", "debian.bochs-vmx.")) for c in classes)
    page = (out / "report.html").read_text()
    assert page.count("<th>tcg-svm</th>") == 1 and "NOT met" in page and "boot 6.1 s" in page
    assert "../runs/a/report.html" in page
    # a missing cell is merged as an error; two runs of one cell, or a stray run, stop it
    merged = merge.match(cells, kernels, dirs[:3])
    summ = merge.summary(s.name, root / "tests/data/ci-small.yaml", merged, kernels)
    assert summ["exit_status"] == 3 and summ["cells"][3]["why"].startswith("missing")
    with pytest.raises(UsageError, match=r"cell smoke.tcg-svm.debian is claimed by .*/a too"):
        merge.match(cells, kernels, [*dirs, _run(tmp_path, "e", "smoke", "tcg-svm", [])])
    with pytest.raises(UsageError, match=r"nested.tcg-svm.debian is no cell of the matrix"):
        merge.match(cells, kernels, [_run(tmp_path, "f", "nested", "tcg-svm", [])])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{")
    with pytest.raises(UsageError, match=r"bad/report.json: not JSON"):
        merge.match(cells, kernels, [tmp_path / "bad"])


def test_kcidb_output_validates_against_the_schema(tmp_path: Path) -> None:
    d = _run(tmp_path, "a", "smoke", "tcg-svm", ["passed", "failed"])
    rep = json.loads((d / "report.json").read_text())
    rep["steps"][0]["cases"] = [{"name": "svm/remap", "status": "passed", "message": ""},
                                {"name": "svm/unmap", "status": "skipped", "message": "no"}]
    rep["events"] = [{"level": "l1", "kind": "WARNING", "expected": False,
                      "summary": "WARNING: kvm_intel: nested.c:4792"}]
    data = kcidb.convert([(d, rep)], "kvm_nested_lab")
    kcidb_io.schema.LATEST.validate(data)
    paths = {t["path"]: t["status"] for t in data["tests"]}
    assert paths["lab.smoke.tcg-svm.boot.l0"] == "PASS"
    assert paths["lab.smoke.tcg-svm.l0.step_0.svm_remap"] == "PASS"
    assert paths["lab.smoke.tcg-svm.l0.step_0.svm_unmap"] == "SKIP"
    assert paths["lab.smoke.tcg-svm.l0.step_1"] == "FAIL"
    assert paths["lab.smoke.tcg-svm.events.l1.WARNING"] == "FAIL"
    assert data["tests"][0]["output_files"][0]["url"].startswith("file:///")
    with pytest.raises(UsageError, match="--origin"):
        kcidb.convert([(d, rep)], "Bad Origin")
