#!/usr/bin/env python3
"""A real `--kernel-tree`: Debian's linux-source of L0's kernel, configured small, built with
the tree's own make on this host's cores, then booted as L0. Prints one JSON object: how long
fetching and unpacking the source, configuring, building and booting took.

    .venv/bin/python benchmarks/kernel_tree.py                   # build (or reuse) and boot
    .venv/bin/python benchmarks/kernel_tree.py --fresh --debug-info

Too slow for CI on 2 cores (see the README's "Kernels"), so it is a benchmark; the tree path
itself is tested in CI with a tree assembled from a Debian kernel's files
(tests/integration/test_kernels.py). The tree is kept in the lab's cache (`bench-tree/`) and
reused while its config is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# x86_64_defconfig + kvm_guest.config, then what the lab's images load as modules (a tree's
# modules are read from the tree, so they must be modules, not built in) and KVM itself.
MODULES = ("KVM", "KVM_AMD", "KVM_INTEL", "VIRTIO_PCI", "VIRTIO_NET", "INPUT_EVDEV",
           "ACPI_BUTTON")
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc")


def run(cmd: list[str], cwd: Path, log: Path) -> float:
    t = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return round(time.monotonic() - t, 1)


def config_lines(debug_info: bool) -> list[list[str]]:
    sc = ["./scripts/config"]
    lines = [[*sc, "--module", m] for m in MODULES]
    lines.append([*sc, "--disable", "MODULE_SIG"])
    if debug_info:  # what gdb and the tracefs compiler read guest_mmu's layout from
        lines += [[*sc, "--disable", "DEBUG_INFO_NONE"],
                  [*sc, "--enable", "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT"]]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="unpack and build again")
    ap.add_argument("--debug-info", action="store_true",
                    help="build with DWARF (needed for gdb/tracefs probes; slower)")
    ap.add_argument("--playbook", default="playbooks/nested.yaml")
    ap.add_argument("-j", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing or not Path("/usr/include/libelf.h").exists():
        print(f"kernel_tree.py: a kernel build needs {', '.join(missing or ['libelf-dev'])} "
              "(apt-get install flex bison bc libelf-dev libssl-dev)", file=sys.stderr)
        return 2

    from lab.cache import cache_root
    from lab.image import load_recipe
    from lab.peers.selftests import source_tree

    cache = cache_root()
    kernel = load_recipe(ROOT / "images" / "default.yaml").kernel
    version = kernel._resolve().version
    key = hashlib.sha256(json.dumps([version, config_lines(args.debug_info)]).encode())
    base = cache / "bench-tree" / f"{version}-{key.hexdigest()[:12]}"
    log = base / "build.log"
    result: dict[str, object] = {"source": f"linux-source={version}", "cores": args.j,
                                 "debug_info": args.debug_info, "log": str(log)}
    if args.fresh:
        shutil.rmtree(base, ignore_errors=True)
    tree = next(base.glob("linux-source-*"), None) if base.exists() else None
    if tree is None or not (tree / "arch/x86/boot/bzImage").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        t = time.monotonic()
        tree = source_tree(kernel, cache, base)
        result["fetch_unpack_s"] = round(time.monotonic() - t, 1)
        result["configure_s"] = run(["make", "x86_64_defconfig", "kvm_guest.config"], tree, log)
        for line in config_lines(args.debug_info):
            run(line, tree, log)
        result["configure_s"] += run(["make", "olddefconfig"], tree, log)
        result["build_s"] = run(["make", f"-j{args.j}", "bzImage", "modules"], tree, log)
    else:
        result["build"] = "cached"
    result["tree"] = str(tree)
    result["modules"] = sum(1 for _ in tree.rglob("*.ko"))
    result["bzimage_mb"] = round((tree / "arch/x86/boot/bzImage").stat().st_size / 2**20, 1)

    with tempfile.TemporaryDirectory(prefix="lab-bench-tree-") as d:
        out = Path(d) / "run"
        t = time.monotonic()
        rc = subprocess.run([str(ROOT / ".venv" / "bin" / "lab"), "-q", "run", args.playbook,
                             "--kernel-tree", str(tree), "--out", str(out), "--cold"],
                            cwd=ROOT, stdout=subprocess.DEVNULL).returncode
        rep = json.loads((out / "report.json").read_text())
        result["run"] = {
            "playbook": args.playbook, "exit": rc, "status": rep["status"],
            "wall_s": round(time.monotonic() - t, 1),
            "release": rep["levels"]["l0"]["kernel"]["release"],
            "ssh_ready_s": {n: lv["timeline"].get("ssh_ready")
                            for n, lv in rep["levels"].items()}}
    print(json.dumps(result, indent=1))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
