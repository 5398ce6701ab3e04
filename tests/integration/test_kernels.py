"""Kernels from every Debian suite the lab knows, for real: a matrix run over three kernel
series (each resolved through the lab's own apt root, pinned, booted as L0) read back as one
JUnit and one table, and `lab bisect` finding a planted regression among Debian's 6.1 ABIs in
about log2(n) runs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .helpers import ROOT, lab, qemu_pids

pytestmark = pytest.mark.integration


def test_matrix_over_kernel_series(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = lab("run", str(ROOT / "tests" / "data" / "matrix-small.yaml"), "--out", str(out),
            timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not qemu_pids(str(out))
    rep = json.loads((out / "report.json").read_text())
    cells = {c["kernel"]: c for c in rep["cells"]}
    assert set(cells) == {"6.1", "6.12", "7.x"} and rep["profiles"] == ["tcg-svm"]
    releases = {k: c["l0_kernel"] for k, c in cells.items()}
    assert releases["6.1"].startswith("6.1.0-") and releases["6.12"].startswith("6.12.")
    assert releases["7.x"].startswith("7.")
    for k, c in cells.items():
        assert c["met"] and c["status"] == "passed", (k, c["why"])
        assert c["boot_s"] is not None
        run = json.loads((Path(c["run_dir"]) / "report.json").read_text())
        pin = run["levels"]["l0"]["kernel"]
        assert pin["pinned"] and pin["package"].startswith("linux-image-"), pin
    # One JUnit: the axis in every testcase's classname.
    junit = ET.parse(out / "junit.xml").getroot()
    classes = {tc.get("classname", "") for tc in junit.iter("testcase")}
    for k in ("6.1", "6.12", "7.x"):
        assert any(c.startswith(f"{k}.tcg-svm.") for c in classes), (k, sorted(classes)[:5])
    html = (out / "report.html").read_text()
    assert "6.12" in html and "7.x" in html and "smoke" in html


def test_5_10_runs_l2_on_a_cpu_without_la57(tmp_path: Path) -> None:
    """Debian's 5.10 as L0 walks L1's 5-level nested page table 4 levels deep while L2 is in
    real mode, so L2 never leaves its reset vector when L1 has LA57: `--la57 auto` (the
    default) gives such an L0 a CPU without it, and the whole chain comes up."""
    out = tmp_path / "run"
    r = lab("run", "playbooks/nested.yaml", "--kernel", "debian:bullseye/5.10.0-32",
            "--out", str(out), timeout=1200)
    rep = json.loads((out / "report.json").read_text())
    l0 = rep["levels"]["l0"]
    assert l0["kernel"]["release"].startswith("5.10.0-32")
    assert l0["la57"] is False and "walks L1's 5-level nested page table" in l0["la57_why"]
    assert "without LA57" in (out / "lab.log").read_text()
    # What LA57 decides: L2 boots to its SSH server (with it, L2 never leaves 0xfffffff0).
    assert "ssh_ready" in rep["levels"]["l2"]["timeline"], r.stdout[-2000:] + r.stderr[-2000:]
    assert not qemu_pids(str(out))
    if r.returncode != 0:
        # Seen once in CI under load: L1 (6.1) warned in __hrtimer_run_queues (base->running
        # != timer) while running L2 on this L0, a kernel event the lab rightly fails the run
        # for. It is not what this test is about; it is reported, not hidden.
        err = rep.get("error") or {}
        assert err.get("kind") == "crash" and err.get("level") == "l1", \
            r.stdout[-2000:] + r.stderr[-2000:]
        warnings.warn(f"5.10 as L0: {err.get('message')}", stacklevel=1)
    else:
        assert [s["status"] for s in rep["steps"] if s["level"] == "l2"] == ["passed"]


def test_bisect_finds_the_planted_regression(tmp_path: Path) -> None:
    out = tmp_path / "b"
    r = lab("bisect", str(ROOT / "tests" / "data" / "bisect-oracle.yaml"),
            "--good", "debian:bookworm/6.1.0-47", "--bad", "debian:bookworm/6.1.0-57",
            "--out", str(out), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "first bad: debian:bookworm/6.1.0-53 after" in r.stdout
    res = json.loads((out / "bisect.json").read_text())
    assert res["first_bad"] == "debian:bookworm/6.1.0-53"
    n = len(res["candidates"])
    assert res["candidates"][0].endswith("6.1.0-47") and res["candidates"][-1].endswith("-57")
    assert len(res["tested"]) <= math.ceil(math.log2(n)), res["tested"]
    verdicts = {t["kernel"]: t["verdict"] for t in res["tested"]}
    assert verdicts["debian:bookworm/6.1.0-53"] == "bad"
    for k, v in verdicts.items():  # every verdict is the kernel's truth
        assert v == ("bad" if int(k.rsplit("-", 1)[1]) >= 53 else "good"), (k, v)
    assert not qemu_pids(str(out))


def _assemble_tree(tree: Path, abi: str) -> None:
    """A kernel build tree as `--kernel-tree` reads one (bzImage, kernel.release, the *.ko in
    place), assembled from Debian's files of one 6.1 ABI, with a Makefile whose targets have
    nothing left to build."""
    from lab.cache import cache_root
    from lab.kernel import DebianChoice

    files = DebianChoice("bookworm", abi).kernel_for("linux-image-cloud-amd64").fetch(
        cache_root())
    # The modules the images load and what they depend on (virtio, net, kvm, input).
    wanted = ("drivers", "net", "virt", "lib", "arch")
    for d in wanted:
        shutil.rmtree(tree / d, ignore_errors=True)
    for ko in files.module_root.rglob("*.ko"):
        rel = ko.relative_to(files.module_root)
        if rel.parts[0] in wanted:
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ko, tree / rel)
    (tree / "arch/x86/boot").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files.bzimage, tree / "arch/x86/boot/bzImage")
    (tree / "include/config").mkdir(parents=True, exist_ok=True)
    (tree / "include/config/kernel.release").write_text(files.release + "\n")
    (tree / "Makefile").write_text("olddefconfig bzImage modules:\n\t@true\n")


def test_kernel_tree_boots_and_bisects(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    git = ["git", "-C", str(tree), "-c", "user.name=lab", "-c", "user.email=lab@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    commits = []
    for abi in ("6.1.0-52", "6.1.0-53", "6.1.0-54"):
        _assemble_tree(tree, abi)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", abi], check=True)
        commits.append(subprocess.run([*git, "rev-parse", "HEAD"], check=True, text=True,
                                      capture_output=True).stdout.strip())
    # The tree as it is (6.1.0-54) boots as L0.
    out = tmp_path / "run"
    r = lab("run", "playbooks/smoke.yaml", "--kernel-tree", str(tree), "--out", str(out),
            timeout=900)
    rep = json.loads((out / "report.json").read_text())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert rep["kernel_tree"] == str(tree) and \
        rep["levels"]["l0"]["kernel"]["release"] == "6.1.0-54-cloud-amd64"
    # Its history bisected by git with a lab run at each commit: 6.1.0-53 is the first bad.
    cfg = tmp_path / "config"
    cfg.write_text("CONFIG_KVM=m\n")
    r = lab("bisect", str(ROOT / "tests" / "data" / "bisect-oracle.yaml"), "--kernel-tree",
            str(tree), "--good", commits[0], "--bad", commits[2], "--config", str(cfg),
            "--out", str(tmp_path / "bisect"), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"first bad: {commits[1]}" in r.stdout
    assert subprocess.run([*git, "bisect", "log"], capture_output=True).returncode != 0, \
        "git bisect was left started"
