"""A suite's matrix as a pipeline of an existing CI engine (GitLab CI): one job per cell, each a
`lab run` with its run directory as the job's artifact, then one `lab merge` job that judges
the cells against the suite and writes the merged report. The lab schedules nothing itself:
the engine's runners (tagged by what the host can run) do.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from lab.errors import EXIT_INFRA  # the lab's own failures: retried; a test's (1) never is
from lab.matrix import DEBIAN, Cell, Kernel, budget_minutes

# What a runner must offer for a profile: the tags its jobs ask for.
TAGS = {"kvm-vmx": "kvm-vmx", "kvm-svm": "kvm-svm", "tcg-svm": "tcg", "bochs-vmx": "bochs"}
RUNS = "runs"  # each cell's run directory: runs/CELL (the job's artifact)
MERGED = "merged"
LAB = ".venv/bin/lab"


def _relative(p: Path) -> str:
    """A path as the pipeline names it: relative to the checkout (this directory)."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def axes_args(profiles: list[str] | None, kernels: list[Kernel]) -> list[str]:
    """The matrix options, as `lab merge` must be given them to rebuild the same matrix."""
    args: list[str] = []
    if profiles:
        args += ["--profiles", ",".join(profiles)]
    if kernels != [Kernel(DEBIAN)]:
        args += ["--kernels", ",".join(k.label if k.tree is None else f"{k.label}={k.tree}"
                                       for k in kernels)]
    return args


def gitlab(suite_path: Path, cells: list[Cell], left_out: list[str],
           profiles: list[str] | None, kernels: list[Kernel], cache: str) -> str:
    """The child pipeline, as YAML text."""
    jobs: dict[str, Any] = {
        "stages": ["cells", "merge"],
        # The cache (images, downloads, saved labs) stays on the runner: per runner, not per
        # pipeline, and never uploaded.
        "variables": {"LAB_CACHE": cache},
        "default": {"before_script": [f"test -x {LAB} || ./bootstrap"]},
    }
    for c in cells:
        out = f"{RUNS}/{c.key}"
        cmd = [LAB, "run", _relative(c.playbook), *c.run_args(), "--out", out]
        job: dict[str, Any] = {
            "stage": "cells",
            "tags": [TAGS[c.profile]],
            "timeout": f"{budget_minutes(c)}m",
            "script": [shlex.join(cmd)],
            "artifacts": {"when": "always", "paths": [f"{out}/"], "expire_in": "30 days",
                          "reports": {"junit": f"{out}/junit.xml"}},
            # Only the lab's own failures (boot, SSH, emulator) are worth a second try.
            "retry": {"max": 2, "exit_codes": [EXIT_INFRA]},
        }
        if c.expect == "failed":
            # The injected bug must be caught (exit 1): the merge job judges that; the cell's
            # failure does not fail the pipeline by itself.
            job["allow_failure"] = {"exit_codes": [1]}
        jobs[c.key] = job
    merge = [LAB, "merge", "--suite", _relative(suite_path), *axes_args(profiles, kernels),
             "--out", MERGED]
    jobs["merge"] = {
        "stage": "merge",
        "when": "always",  # judge whatever the cells left, failed ones included
        "script": [shlex.join(merge) + f" {RUNS}/*/"],
        "artifacts": {"when": "always", "paths": [f"{MERGED}/"], "expire_in": "30 days",
                      "reports": {"junit": f"{MERGED}/junit.xml"}},
    }
    head = [f"# Written by `lab ci gitlab {_relative(suite_path)}`: {len(cells)} cells "
            f"(playbook x profile x kernel), each a job; then `lab merge`.",
            "# Runner tags by profile: " + ", ".join(f"{p}: {t}" for p, t in TAGS.items())
            + f"; LAB_CACHE is a runner-local directory ({cache})."]
    head += [f"# Left out: {why}" for why in left_out]
    return "\n".join(head) + "\n" + yaml.safe_dump(jobs, sort_keys=False, width=100)
