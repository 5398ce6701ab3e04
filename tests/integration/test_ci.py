"""The nightly on an existing CI engine (issue 16), for real: `lab ci gitlab` writes the
pipeline of a small suite over two profiles, gitlab-ci-local runs it on this machine (shell
executor, one job at a time: each job is a real lab), `lab merge` of its artifacts must give
the same verdicts as running the suite directly, and `lab kcidb` of them must validate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import kcidb_io
import pytest
import yaml

from .helpers import ROOT, lab, report

pytestmark = pytest.mark.integration
GCL = ROOT / ".venv" / "node" / "node_modules" / ".bin" / "gitlab-ci-local"
SUITE = "tests/data/ci-small.yaml"
PROFILES = ("tcg-svm", "bochs-vmx")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout for the pipeline to run in: this tree's playbooks, images and data, and its
    venv (the lab as it is in this working tree)."""
    assert GCL.exists(), f"{GCL}: missing; `./bootstrap --test` installs it"
    w = tmp_path_factory.mktemp("ci") / "checkout"
    w.mkdir()
    for d in ("playbooks", "images"):
        shutil.copytree(ROOT / d, w / d)
    (w / "tests" / "data").mkdir(parents=True)
    for f in ("ci-small.yaml", "step-fails.yaml"):
        shutil.copy(ROOT / "tests" / "data" / f, w / "tests" / "data" / f)
    (w / ".venv").symlink_to(ROOT / ".venv")
    subprocess.run(["git", "init", "-q"], cwd=w, check=True)
    subprocess.run(["git", "-c", "user.email=lab@localhost", "-c", "user.name=lab", "commit",
                    "-q", "--allow-empty", "-m", "ci test"], cwd=w, check=True)
    return w


def test_the_pipeline_runs_to_the_end_and_merges_to_the_suites_verdicts(checkout: Path) -> None:
    w = checkout
    cache = os.environ.get("LAB_CACHE") or str(Path.home() / ".cache" / "lab")
    r = lab("ci", "gitlab", SUITE, "--profiles", ",".join(PROFILES), "--cache", cache,
            "-o", ".gitlab-ci.yml", cwd=w, check=True)
    pipeline = yaml.safe_load((w / ".gitlab-ci.yml").read_text())
    cells = [k for k, v in pipeline.items() if isinstance(v, dict) and v.get("stage") == "cells"]
    assert len(cells) == 4, cells
    r = subprocess.run([str(GCL), "--concurrency", "1", "--no-color"], cwd=w,
                       capture_output=True, text=True, timeout=3600,
                       env={k: v for k, v in os.environ.items() if k != "LAB_CACHE"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    merged = json.loads((w / "merged" / "report.json").read_text())
    assert merged["status"] == "passed" and merged["exit_status"] == 0, merged
    assert merged["profiles"] == sorted(PROFILES) and merged["kernels"] == ["debian"]
    got = {(c["playbook"], c["profile"]): (c["met"], c["status"]) for c in merged["cells"]}
    assert got[("step-fails", "bochs-vmx")] == (True, "failed")  # expected, and caught
    # The same suite run directly (its playbooks under their own profile, tcg-svm here): the
    # same verdicts for its cells. (Bochs boots take a minute each: the bochs-vmx cells are
    # not run a second time.)
    out = w / "direct"
    lab("run", SUITE, "--out", str(out), cwd=w, timeout=1800)
    direct = {(Path(run["playbook"]).stem, "tcg-svm"): (run["met"], run["status"])
              for run in report(out)["runs"]}
    assert len(direct) == 2 and direct == {k: v for k, v in got.items() if k[1] == "tcg-svm"}
    # Every cell's JUnit, in one file, with the axes in the classnames.
    junit = (w / "merged" / "junit.xml").read_text()
    assert 'classname="debian.bochs-vmx.smoke.boot"' in junit
    # KCIDB from the pipeline's artifacts validates.
    runs = sorted(str(p) for p in (w / "runs").iterdir())
    out = lab("kcidb", *runs, cwd=w, check=True).stdout
    data = json.loads(out)
    kcidb_io.schema.LATEST.validate(data)
    assert len(data["tests"]) >= 8 and len(data["checkouts"]) == 2  # cloud and generic kernel
