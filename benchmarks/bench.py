#!/usr/bin/env python3
"""Benchmarks behind the numbers in the closing notes (not tests: they only measure).

    .venv/bin/python benchmarks/bench.py images   # cold build with/without downloads, no-op rebuild
    .venv/bin/python benchmarks/bench.py smoke    # `lab run smoke` vs bare QEMU until SSH answers
    .venv/bin/python benchmarks/bench.py nested   # `lab run nested`: per-level boot timeline

Each prints one JSON object. Run one at a time on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.cache import cache_root  # noqa: E402
from lab.image import Builder, load_recipe  # noqa: E402
from lab.profiles import get_profile  # noqa: E402
from lab.qemu import Serial, VMSpec, build_command, free_port  # noqa: E402
from lab.ssh import SSHSession  # noqa: E402

RECIPE = ROOT / "images" / "default.yaml"


def timed(fn, *a, **kw) -> float:  # type: ignore[no-untyped-def]
    t = time.monotonic()
    fn(*a, **kw)
    return round(time.monotonic() - t, 3)


def bench_images() -> dict[str, float]:
    out: dict[str, float] = {}
    main_cache = cache_root()
    with tempfile.TemporaryDirectory() as d:
        os.environ["LAB_CACHE"] = d
        b = Builder(Path(d), log=lambda m: None)
        out["cold_build_with_downloads_s"] = timed(b.build, load_recipe(RECIPE))
    with tempfile.TemporaryDirectory() as d:
        os.environ["LAB_CACHE"] = d
        shutil.copytree(main_cache / "downloads", Path(d) / "downloads",
                        copy_function=os.link)  # same files, no network
        b = Builder(Path(d), log=lambda m: None)
        out["cold_build_without_downloads_s"] = timed(b.build, load_recipe(RECIPE))
        out["rebuild_nothing_changed_s"] = timed(b.build, load_recipe(RECIPE))
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "lab", "images", "build", "default"], cwd=ROOT,
                       check=True, capture_output=True)
        out["lab_images_build_command_cached_s"] = round(time.monotonic() - t, 3)
    os.environ.pop("LAB_CACHE", None)
    return out


def bare_boot_until_ssh(img_dir: Path, work: Path) -> float:
    """The same image, booted by a bare QEMU command; seconds until SSH runs `true`."""
    from lab.image import BuiltImage

    img = BuiltImage.load(img_dir)
    port = free_port()
    prof = get_profile("tcg-svm")
    spec = VMSpec(level="bare", accel=prof.accel, cpu=prof.l0_cpu, memory_mb=1024, cpus=1,
                  kernel=str(img.kernel), initrd=str(img.initrd),
                  append="console=ttyS0 nokaslr panic=-1 lab.level=l0 kvm_amd.nested=1",
                  ssh_port=port, serials=[Serial("bare", "file", str(work / "bare.console"))])
    key = cache_root() / "keys" / "id_ed25519"
    t0 = time.monotonic()
    p = subprocess.Popen(build_command(spec), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        s = SSHSession("bare", port, key, img.host_key)
        # Before the guest listens, slirp accepts and then stalls: poll with short attempts.
        s.connect(time.monotonic() + 120, attempt_timeout=0.5)
        assert s.run("true").exit_status == 0
        dt = time.monotonic() - t0
        s.close()
    finally:
        p.kill()
        p.wait()
    return round(dt, 3)


def bench_smoke(n: int) -> dict[str, object]:
    res: dict[str, object] = {"lab_run_s": [], "bare_until_ssh_s": [], "lab_until_ssh_s": []}
    with tempfile.TemporaryDirectory() as d:
        for i in range(n):
            out = Path(d) / f"run{i}"
            t = time.monotonic()
            subprocess.run([sys.executable, "-m", "lab", "run", "playbooks/smoke.yaml", "--out",
                            str(out)], cwd=ROOT, check=True, capture_output=True)
            res["lab_run_s"].append(round(time.monotonic() - t, 3))  # type: ignore[attr-defined]
            rep = json.loads((out / "report.json").read_text())
            tl = rep["levels"]["l0"]["timeline"]
            res["lab_until_ssh_s"].append(  # type: ignore[attr-defined]
                round(tl["ssh_ready"] - tl["launch"], 3))
            img_dir = cache_root() / "images" / rep["levels"]["l0"]["image"]
            res["bare_until_ssh_s"].append(  # type: ignore[attr-defined]
                bare_boot_until_ssh(img_dir, Path(d)))
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}  # type: ignore[union-attr]
    res["median"] = med
    res["ratio_lab_run_over_bare"] = round(med["lab_run_s"] / med["bare_until_ssh_s"], 3)
    res["ratio_lab_boot_over_bare"] = round(med["lab_until_ssh_s"] / med["bare_until_ssh_s"], 3)
    return res


def bench_nested() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "lab", "run", "playbooks/nested.yaml", "--out",
                        str(out)], cwd=ROOT, check=True, capture_output=True)
        total = round(time.monotonic() - t, 3)
        rep = json.loads((out / "report.json").read_text())
    l0 = rep["levels"]["l0"]["timeline"]["launch"]
    per = {lv: {k: round(v - l0, 3) for k, v in info["timeline"].items()}
           for lv, info in rep["levels"].items()}
    return {"lab_run_total_s": total, "phases": rep["phases"],
            "since_l0_launch_s": per,
            "l2_ssh_ready_since_lab_start_s": rep["levels"]["l2"]["timeline"]["ssh_ready"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["images", "smoke", "nested"])
    ap.add_argument("-n", type=int, default=3, help="repetitions (smoke)")
    a = ap.parse_args()
    fn = {"images": bench_images, "smoke": lambda: bench_smoke(a.n), "nested": bench_nested}
    print(json.dumps(fn[a.what](), indent=1))


if __name__ == "__main__":
    main()
