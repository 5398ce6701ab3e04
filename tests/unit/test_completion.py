"""`lab completion bash`, run by a real bash the way bash's completion calls it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = subprocess.run([sys.executable, "-m", "lab", "completion", "bash"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    p = tmp_path_factory.mktemp("completion") / "lab.bash"
    p.write_text(out)
    return p


def complete(script: Path, *words: str) -> list[str]:
    if shutil.which("bash") is None:
        pytest.skip("no bash on this host")
    prog = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
            "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n_lab\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, cwd=ROOT,
                       check=True)
    return sorted(r.stdout.split())


def test_commands_options_and_choices(script: Path) -> None:
    assert {"run", "up", "ssh", "down", "doctor", "cache"} <= set(complete(script, "lab", ""))
    assert "_serve" not in complete(script, "lab", "_")  # hidden stays hidden
    assert complete(script, "lab", "run", "--k") == ["--kernel", "--kernel-tree", "--kernels",
                                                     "--kvm-unit-tests"]
    assert complete(script, "lab", "up", "--k") == ["--kernel", "--kernel-tree",
                                                    "--kvm-unit-tests"]
    assert complete(script, "lab", "run", "--profile", "") == ["bochs-vmx", "kvm-svm",
                                                              "kvm-vmx", "tcg-svm"]
    assert complete(script, "lab", "ssh", "") == ["l0", "l1", "l2"]
    assert complete(script, "lab", "cache", "prune", "--d") == ["--dry-run"]


def test_playbooks_complete_as_yaml_files(script: Path) -> None:
    assert complete(script, "lab", "run", "playbooks/smo") == ["playbooks/smoke.yaml"]
    assert complete(script, "lab", "up", "--cold", "playbooks/nes") == ["playbooks/nested.yaml"]
