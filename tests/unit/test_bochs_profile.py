"""The bochs-vmx profile's pieces that need no Bochs: the rendered configuration, the boot CD's
command line, and how a playbook adapts to a profile without a gdbstub."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import playbook
from lab.bochs import BochsSpec, render_bochsrc, render_slirp_conf
from lab.errors import UsageError
from lab.iso import isolinux_cfg
from lab.profiles import get_profile

ROOT = Path(__file__).resolve().parents[2]


def spec(memory: int = 2048) -> BochsSpec:
    return BochsSpec(level="l0", cpu_model="broadwell_ult", memory_mb=memory, cpus=1,
                     kernel="/k", initrd="/i", append="console=ttyS0,115200", ssh_port=40022,
                     serials={"l0": 40100, "l1": 40101, "l2": 40102})


def test_bochsrc_listens_on_loopback_only() -> None:
    rc = render_bochsrc(spec(), Path("/x/boot.iso"), Path("/x/slirp.conf"), Path("/x/log"))
    assert "cpu: model=broadwell_ult, count=1" in rc
    assert "ata0-master: type=cdrom, path=/x/boot.iso" in rc
    assert "e1000: enabled=1, mac=52:54:00:12:34:56, ethmod=slirp, script=/x/slirp.conf" in rc
    coms = [ln for ln in rc.splitlines() if ln.startswith("com")]
    assert coms == [f"com{i + 1}: enabled=1, mode=socket-server, dev=127.0.0.1:{40100 + i}"
                    for i in range(3)]
    settings = [ln for ln in rc.splitlines() if ln and not ln.startswith("#")]
    assert "display_library: sdl2" in settings and not any("rfb" in ln for ln in settings)
    assert "speaker: enabled=0" in rc


def test_memory_above_what_bochs_allocates() -> None:
    assert "memory: guest=3072, host=2048" in render_bochsrc(
        spec(3072), Path("i"), Path("s"), Path("l"))
    assert "memory: guest=1024, host=1024" in render_bochsrc(
        spec(1024), Path("i"), Path("s"), Path("l"))


def test_slirp_is_restricted_and_forwards_from_loopback() -> None:
    conf = render_slirp_conf(40022)
    assert conf.splitlines()[0] == "# slirp config"  # Bochs insists on this first line
    assert "restricted = 1" in conf
    assert "hostfwd = tcp:127.0.0.1:40022-:22" in conf


def test_isolinux_passes_the_command_line() -> None:
    cfg = isolinux_cfg("console=ttyS0,115200 nokaslr lab.level=l0")
    assert "SERIAL 0 115200" in cfg and "APPEND console=ttyS0,115200 nokaslr lab.level=l0" in cfg


def test_playbook_under_bochs_takes_its_image_backend_and_time() -> None:
    pb = playbook.load(ROOT / "playbooks" / "smoke.yaml")
    assert pb.levels["l0"].image == "default" and pb.probe_backend is None
    bochs = pb.for_profile(get_profile("bochs-vmx"))
    assert bochs.levels["l0"].image == "bochs-l0"
    assert bochs.levels["l0"].recipe == ROOT / "images" / "bochs-l0.yaml"
    assert bochs.levels["l0"].boot_timeout == 5 * pb.levels["l0"].boot_timeout
    assert bochs.probe_backend == "tracefs"
    tcg = pb.for_profile(get_profile("tcg-svm"))
    assert tcg.levels["l0"].image == "default" and tcg.probe_backend == "gdb"


def test_explicit_image_and_timeout_stay(tmp_path: Path) -> None:
    p = tmp_path / "pb.yaml"
    p.write_text(f"name: x\ntopology:\n  l0: {{image: {ROOT}/images/default.yaml, "
                 "boot_timeout: 30}\n")
    pb = playbook.load(p).for_profile(get_profile("bochs-vmx"))
    assert pb.levels["l0"].recipe == ROOT / "images" / "default.yaml"
    assert pb.levels["l0"].boot_timeout == 30


def test_gdb_backend_or_gdb_injection_without_gdbstub_is_bad_input(tmp_path: Path) -> None:
    p = tmp_path / "pb.yaml"
    p.write_text("name: x\ntopology:\n  l0: {}\nprobe_backend: gdb\nprobes:\n"
                 "  - set: invalidation\n")
    with pytest.raises(UsageError, match=r"pb.yaml:4: probe_backend: gdb cannot probe L0"):
        playbook.load(p).for_profile(get_profile("bochs-vmx"))
    # The SVM injection patches through gdb; the VMX one has a kprobe module.
    q = tmp_path / "inj.yaml"
    q.write_text("name: x\ntopology:\n  l0: {}\ninject: skip-nested-mmu-sync\n")
    with pytest.raises(UsageError, match=r"inj.yaml:4: inject: .*amd hosts"):
        playbook.load(q).for_profile(get_profile("bochs-vmx"))
    q.write_text("name: x\ntopology:\n  l0: {}\ninject: invalidate-too-little\n")
    assert playbook.load(q).for_profile(get_profile("bochs-vmx")).inject


def test_set_takes_max_hits_for_all_its_probes(tmp_path: Path) -> None:
    p = tmp_path / "pb.yaml"
    p.write_text("name: x\ntopology:\n  l0: {}\nprobes:\n  - set: invalidation\n"
                 "    max_hits: 500\n")
    specs = playbook.load(p).probe_specs("intel")
    assert [s.max_hits for s in specs] == [500, 500]
    p.write_text("name: x\ntopology:\n  l0: {}\nprobes:\n  - set: invalidation\n"
                 "    at: foo\n")
    with pytest.raises(UsageError, match="`set` takes only"):
        playbook.load(p)
