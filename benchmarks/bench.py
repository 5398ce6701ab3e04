#!/usr/bin/env python3
"""Benchmarks behind the numbers in the closing notes (not tests: they only measure).

    .venv/bin/python benchmarks/bench.py images   # cold build with/without downloads, no-op rebuild
    .venv/bin/python benchmarks/bench.py smoke    # `lab run smoke` vs bare QEMU until SSH answers
    .venv/bin/python benchmarks/bench.py nested   # `lab run nested` vs the raw chain of poc/
    .venv/bin/python benchmarks/bench.py probes   # invept.yaml with probes on and off
    .venv/bin/python benchmarks/bench.py bochs    # nested.yaml under bochs-vmx vs tcg-svm
    .venv/bin/python benchmarks/bench.py hitcost  # a probe hit: kprobe event vs gdb stop, same L0
                                                  # (--profile bochs-vmx: the kprobe cost there)
    .venv/bin/python benchmarks/bench.py chain [--variant NAME ...] [-n N] [--cpu-quota F]
        # the nested chain's timeline under controlled variations of the nested levels' QEMU
        # and kernel arguments, with what L2's boot costs: exits seen by L0's and L1's KVM,
        # TCG's full TLB flushes (QMP `info jit`), the host's steal time, each level's dmesg.
        # --cpu-quota 0.5 runs the lab in a cgroup capped at half a core: a slower host.
    .venv/bin/python benchmarks/bench.py warm [-n N]
        # cold (--cold) vs warm `lab run` of nested.yaml and invept.yaml: wall time, L2
        # SSH-ready since the command started, what the restore took, the host speed factor

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
from lab.machines.base import free_port  # noqa: E402
from lab.machines.qemu import Serial, VMSpec, build_command  # noqa: E402
from lab.profiles import get_profile  # noqa: E402
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
        b = Builder(Path(d))
        out["cold_build_with_downloads_s"] = timed(b.build, load_recipe(RECIPE))
    with tempfile.TemporaryDirectory() as d:
        os.environ["LAB_CACHE"] = d
        for part in ("kernels", "debug"):  # unpacked packages: same files, no network
            if (main_cache / part).is_dir():
                shutil.copytree(main_cache / part, Path(d) / part, copy_function=os.link)
        b = Builder(Path(d))
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


def run_playbook(path: Path, out: Path, *args: str) -> tuple[float, dict[str, object]]:
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "lab", "run", str(path), "--out", str(out), *args],
                   cwd=ROOT, capture_output=True)
    rep: dict[str, object] = json.loads((out / "report.json").read_text())
    return round(time.monotonic() - t, 3), rep


def poc_raw_chain(work: Path) -> dict[str, float] | str:
    """The throwaway chain of shared/reference/poc (its own /init launches the next level),
    booted from the same Debian kernel: seconds from QEMU start to each level's /init."""
    poc = ROOT.parent / "shared" / "reference" / "poc"
    if not (poc / "nested-build.sh").exists():
        return f"{poc} is not there"
    from lab.kernel import DebianKernel

    kernel = DebianKernel().fetch(cache_root())
    w = work / "poc" / "work"
    (w / "src").mkdir(parents=True)
    shutil.copy(poc / "nested-build.sh", work / "poc" / "nested-build.sh")
    shutil.copy(poc / "nested-init.sh", w / "src" / "init")
    shutil.copy(poc / "kvmtest.c", w / "src" / "kvmtest.c")
    (w / "kcloud").symlink_to(kernel.bzimage.parent.parent)
    # No benchmarks inside the levels: only the boot chain is timed.
    env = dict(os.environ,
               L1_APPEND="console=ttyS0 nokaslr panic=-1 quiet feas.level=1 feas.next=1 "
                         "feas.kvmtest=1,1",
               L2_APPEND="console=ttyS0 nokaslr panic=-1 quiet feas.level=2 feas.next=0 "
                         "feas.kvmtest=1,1")
    subprocess.run(["bash", str(work / "poc" / "nested-build.sh")], check=True, env=env,
                   capture_output=True)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "3072", "-smp", "1",
           "-nographic", "-no-reboot", "-vga", "none", "-nic", "none", "-kernel",
           str(kernel.bzimage), "-initrd", str(w / "initrd-L0.cpio"), "-append",
           "console=ttyS0 nokaslr panic=-1 feas.level=0 feas.kvmtest=1,1 feas.next=1"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    seen: dict[str, float] = {}
    assert p.stdout is not None
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            for lvl in ("0", "1", "2"):
                if f"FEAS L{lvl}: /init reached" in line and f"l{lvl}" not in seen:
                    seen[f"l{lvl}_init"] = round(time.monotonic() - t0, 3)
                    seen[f"l{lvl}"] = 1
            if "l2_init" in seen or time.monotonic() - t0 > 300:
                break
    finally:
        p.kill()
        p.wait()
    return {k: v for k, v in seen.items() if k.endswith("_init")}


def bench_nested() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        total, rep = run_playbook(ROOT / "playbooks" / "nested.yaml", Path(d) / "run")
        raw = poc_raw_chain(Path(d))
    levels: dict[str, dict[str, dict[str, float]]] = rep["levels"]  # type: ignore[assignment]
    l0 = levels["l0"]["timeline"]["launch"]
    per = {lv: {k: round(v - l0, 3) for k, v in info["timeline"].items()}
           for lv, info in levels.items()}
    return {"lab_run_total_s": total, "phases": rep["phases"], "lab_since_l0_launch_s": per,
            "l2_ssh_ready_since_lab_start_s": levels["l2"]["timeline"]["ssh_ready"],
            "poc_raw_chain_since_qemu_start_s": raw}


def bench_probes() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as d:
        off = Path(d) / "invept-no-probes.yaml"
        off.write_text(f"extends: {ROOT / 'playbooks' / 'invept.yaml'}\nname: no-probes\n"
                       "probes: []\n")
        t_on, on = run_playbook(ROOT / "playbooks" / "invept.yaml", Path(d) / "on")
        t_off, offr = run_playbook(off, Path(d) / "off")
    hits = [h for p in on["probes"] for h in p["hits"]]  # type: ignore[attr-defined]
    costs: dict[str, list[float]] = {}
    for p in on["probes"]:  # type: ignore[attr-defined]
        costs[p["name"]] = [h["cost_ms"] for h in p["hits"]]
    rates = {}
    for rep in (on, offr):
        for s in rep["steps"]:  # type: ignore[attr-defined]
            n = sum(1 for c in s.get("cases", []))
            if n:
                rates[f"{rep['name']}:{s['level']}"] = round(n / max(s["seconds"], 1e-3), 2)
    return {"with_probes_total_s": t_on, "without_probes_total_s": t_off,
            "slowdown": round(t_on / t_off, 3), "phases_with": on["phases"],
            "phases_without": offr["phases"], "probe_setup": on["probe_setup"], "hits": len(hits),
            "hit_cost_ms": costs, "cases_per_second_by_level": rates}


def bench_bochs() -> dict[str, object]:
    """The same playbook (nested.yaml: L0 -> L1 -> L2, same steps) under both profiles:
    seconds from each level's launch to its /init and to SSH, and the whole run."""
    res: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as d:
        for prof in ("tcg-svm", "bochs-vmx"):
            total, rep = run_playbook(ROOT / "playbooks" / "nested.yaml", Path(d) / prof,
                                      "--profile", prof)
            levels: dict[str, dict[str, dict[str, float]]] = rep["levels"]  # type: ignore
            res[prof] = {
                "status": rep["status"], "lab_run_total_s": total,
                "per_level_s": {lv: {"init": round(i["timeline"]["init"] -
                                                   i["timeline"]["launch"], 1),
                                     "ssh": round(i["timeline"]["ssh_ready"] -
                                                  i["timeline"]["launch"], 1)}
                                for lv, i in levels.items()}}
    return res


HITCOST_READS = 200000


def bench_hitcost(profile: str) -> dict[str, object]:
    """One probe hit on the same L0 and the same function (ksys_read, hit once per read(2) of
    `dd bs=1`): a kprobe event with 14 fetch arguments (what guest_mmu() compiles to) against
    a gdb stop with the same number of captures (QEMU profiles only: Bochs has no gdbstub)."""
    fetch = " ".join(f"a{i}=+{8 * i:#x}(%sp):x64" for i in range(14))
    script = (
        "T=/sys/kernel/tracing; echo 0 > $T/tracing_on; echo > $T/trace; "
        "run() { s=$(cut -d' ' -f1 /proc/uptime); "
        f"dd if=/dev/zero of=/dev/null bs=1 count={HITCOST_READS} 2>/dev/null; "
        "e=$(cut -d' ' -f1 /proc/uptime); echo \"$s $e\"; }; "
        "run; run; "
        f"echo 'p:bench/read ksys_read {fetch}' >> $T/kprobe_events; "
        "echo 1 > $T/events/bench/enable; echo 1 > $T/tracing_on; "
        "run; run; echo 0 > $T/tracing_on; "
        # written = kept + overwritten (the buffer is smaller than 400k events)
        "echo \"hits $(awk '/^(entries|overrun):/{s+=$2} END{print s}' "
        "$T/per_cpu/cpu0/stats)\"; "
        "echo 0 > $T/events/bench/enable; echo '-:bench/read' >> $T/kprobe_events")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "trace"
        subprocess.run([sys.executable, "-m", "lab", "up", "playbooks/smoke.yaml", "--profile",
                        profile, "--out", str(out)], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            r = subprocess.run([sys.executable, "-m", "lab", "ssh", "--run", str(out), "l0",
                                "--", script], cwd=ROOT, capture_output=True, text=True,
                               check=True)
        finally:
            subprocess.run([sys.executable, "-m", "lab", "down", "--run", str(out)], cwd=ROOT,
                           capture_output=True)
        lines = r.stdout.split("\n")
        spans = [float(b) - float(a) for a, b in (ln.split() for ln in lines[:4])]
        hits = int(lines[4].split()[1])
        off, on = min(spans[:2]), min(spans[2:])
        tracefs_us = round((on - off) / HITCOST_READS * 1e6, 2)
        res: dict[str, object] = {
            "profile": profile, "reads_per_run": HITCOST_READS, "tracefs_hits_counted": hits,
            "reads_without_event_s": round(off, 3), "reads_with_event_s": round(on, 3),
            "tracefs_us_per_hit": tracefs_us}
        if profile == "bochs-vmx":
            return res
        pb = Path(d) / "gdb.yaml"
        caps = "\n".join(f"      a{i}: ((unsigned long *)$sp)[{i}]" for i in range(14))
        pb.write_text(f"name: gdb-hitcost\nprofile: {profile}\ntopology:\n  l0: {{}}\n"
                      f"probes:\n  - at: ksys_read\n    max_hits: 30\n    capture:\n{caps}\n"
                      "steps:\n  - run: dd if=/dev/zero of=/dev/null bs=1 count=100\n")
        _, rep = run_playbook(pb, Path(d) / "gdb")
        costs = [h["cost_ms"] for p in rep["probes"] for h in p["hits"]]  # type: ignore
    costs.sort()
    res.update(gdb_ms_per_hit_median=costs[len(costs) // 2] if costs else None,
               gdb_ms_per_hit_range=[costs[0], costs[-1]] if costs else None,
               gdb_hits=len(costs))
    return res


# Variations of what the nested levels get (Profile.nested_qemu_args / nested_append), one
# change at a time; "profile" is what the tcg-svm profile ships with.
CHAIN_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bare": ((), ()),
    "no-hpet": (("-no-hpet",), ()),
    "hpet-disable": ((), ("hpet=disable",)),
    "no-hpet+pit-discard": (("-no-hpet", "-global", "kvm-pit.lost_tick_policy=discard"), ()),
    "no-timer-check": ((), ("no_timer_check",)),
    "tsc-reliable": ((), ("tsc=reliable",)),
}


def _chain_counters(lab: object) -> dict[str, float]:
    """What the chain has cost so far: L0's and L1's KVM exit counters, TCG's TLB flushes,
    the host's steal and total CPU time (jiffies)."""
    from lab.lab import Lab

    assert isinstance(lab, Lab)
    out: dict[str, float] = {}
    for lv in ("l0", "l1"):
        ssh = lab.levels[lv].ssh
        if ssh is None:
            continue
        r = ssh.run("cd /sys/kernel/debug/kvm && for f in exits io_exits mmio_exits "
                    "halt_exits nested_run irq_injections; do echo $f $(cat $f); done",
                    timeout=60)
        for ln in r.stdout.split("\n"):
            if ln.strip():
                k, v = ln.split()
                out[f"{lv}_kvm_{k}"] = float(v)
    vm = lab.vm
    if vm is not None and getattr(vm, "qmp", None) is not None:
        jit = vm.qmp.execute("human-monitor-command", **{"command-line": "info jit"})
        for ln in str(jit).splitlines():
            for key in ("TLB full flushes", "TLB partial flushes", "TB flush count"):
                if ln.strip().startswith(key):
                    out["tcg_" + key.lower().replace(" ", "_")] = float(ln.split()[-1])
    cpu = Path("/proc/stat").read_text().split("\n")[0].split()[1:]
    out["host_steal_jiffies"] = float(cpu[7])
    out["host_busy_jiffies"] = float(sum(int(x) for x in cpu[:3]))
    return out


def chain_once(variant: str, out: Path) -> dict[str, object]:
    from dataclasses import replace

    from lab import playbook
    from lab.lab import Lab

    qargs, append = CHAIN_VARIANTS.get(variant, (None, None))  # type: ignore[assignment]
    prof = get_profile("tcg-svm")
    if qargs is not None:
        prof = replace(prof, nested_qemu_args=qargs, nested_append=append)
    pb = playbook.load(ROOT / "playbooks" / "nested.yaml")
    res: dict[str, object] = {"variant": variant, "nested_qemu_args": prof.nested_qemu_args,
                              "nested_append": prof.nested_append}
    with Lab(pb, out, prof, cache_root()) as lab:
        lab.build()
        t = time.monotonic()
        lab.boot_level("l0")
        lab.boot_level("l1")
        before = _chain_counters(lab)
        lab.boot_level("l2")
        after = _chain_counters(lab)
        res["boot_s"] = round(time.monotonic() - t, 3)
        res["l2_boot_cost"] = {k: round(after[k] - before.get(k, 0)) for k in after}
        tl = {n: st.timeline for n, st in lab.levels.items()}
        res["since_launch_s"] = {
            n: {k: round(v - t_["launch"], 2) for k, v in t_.items() if k != "launch"}
            for n, t_ in tl.items()}
        l1 = res["since_launch_s"]["l1"]  # type: ignore[index]
        l2 = res["since_launch_s"]["l2"]  # type: ignore[index]
        res["l2_over_l1_ssh"] = round(l2["ssh_ready"] / l1["ssh_ready"], 2)
        for n, st in lab.levels.items():
            assert st.ssh is not None
            dm = st.ssh.run("dmesg", timeout=60).stdout
            (out / f"{n}.dmesg").write_text(dm)
            last = [ln for ln in dm.splitlines() if ln.startswith("[")]
            res.setdefault("kernel_boot_s", {})[n] = (  # type: ignore[index]
                float(last[-1][1:].split("]")[0]) if last else None)
    return res


def bench_chain(variants: list[str], n: int, quota: float | None) -> dict[str, object]:
    if quota:
        # A slower host, made here: this process and every QEMU it starts share `quota` cores.
        cg = Path("/sys/fs/cgroup/cpu/lab-bench")
        cg.mkdir(exist_ok=True)
        (cg / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
        (cg / "cgroup.procs").write_text(str(os.getpid()))
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(n):
            for v in variants:
                runs.append(chain_once(v, Path(d) / f"{v}-{i}"))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary: dict[str, dict[str, float]] = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        l2 = sorted(r["since_launch_s"]["l2"]["ssh_ready"] for r in mine)  # type: ignore
        summary[v] = {"l2_ssh_ready_median_s": l2[len(l2) // 2],
                      "boot_median_s": sorted(r["boot_s"] for r in mine)[len(mine) // 2]}  # type: ignore
    return {"cpu_quota": quota, "runs": runs, "summary": summary}


def _timed_run(playbook: str, out: Path, *args: str) -> dict[str, object]:
    t = time.monotonic()
    total, rep = run_playbook(ROOT / "playbooks" / playbook, out, *args)
    levels: dict[str, dict[str, dict[str, float]]] = rep["levels"]  # type: ignore[assignment]
    boot: dict[str, object] = rep["boot"]  # type: ignore[assignment]
    # The report's times count from the lab's start; add what came before it (Python,
    # validation) to get the time since the command started.
    before = total - float(rep["phases"]["total"])  # type: ignore[index]
    return {"playbook": playbook, "status": rep["status"], "mode": boot.get("mode"),
            "wall_s": round(time.monotonic() - t, 2),
            "l2_ssh_ready_since_command_s": round(
                before + levels["l2"]["timeline"]["ssh_ready"], 2),
            "restore_s": boot.get("restore_s"), "save_s": boot.get("save_s"),
            "host_speed_factor": rep["host_speed"].get("factor")}  # type: ignore[attr-defined]


def bench_warm(n: int) -> dict[str, object]:
    runs = []
    with tempfile.TemporaryDirectory() as d:
        runs.append(_timed_run("nested.yaml", Path(d) / "cold", "--cold"))  # saves if needed
        for i in range(n):
            for pb in ("nested.yaml", "invept.yaml"):
                runs.append(_timed_run(pb, Path(d) / f"{pb}-{i}"))
    summary = {}
    for pb in ("nested.yaml", "invept.yaml"):
        warm = [r for r in runs if r["playbook"] == pb and r["mode"] == "warm"]
        if warm:
            walls = sorted(float(r["wall_s"]) for r in warm)  # type: ignore[arg-type]
            l2 = sorted(float(r["l2_ssh_ready_since_command_s"]) for r in warm)  # type: ignore
            summary[pb] = {"warm_runs": len(warm), "wall_median_s": walls[len(walls) // 2],
                           "wall_max_s": walls[-1], "l2_ssh_ready_median_s": l2[len(l2) // 2],
                           "l2_ssh_ready_max_s": l2[-1]}
    return {"runs": runs, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["images", "smoke", "nested", "probes", "bochs", "hitcost",
                                     "chain", "warm"])
    ap.add_argument("-n", type=int, default=3, help="repetitions (smoke, chain)")
    ap.add_argument("--variant", action="append",
                    help=f"chain: one of {', '.join(CHAIN_VARIANTS)} or 'profile' (repeatable)")
    ap.add_argument("--cpu-quota", type=float, help="chain: cores the whole run may use")
    ap.add_argument("--profile", default="tcg-svm", help="L0's profile (hitcost)")
    a = ap.parse_args()
    fn = {"images": bench_images, "smoke": lambda: bench_smoke(a.n), "nested": bench_nested,
          "probes": bench_probes, "bochs": bench_bochs, "hitcost": lambda: bench_hitcost(a.profile),
          "chain": lambda: bench_chain(a.variant or ["profile"], a.n, a.cpu_quota),
          "warm": lambda: bench_warm(a.n)}
    print(json.dumps(fn[a.what](), indent=1))


if __name__ == "__main__":
    main()
