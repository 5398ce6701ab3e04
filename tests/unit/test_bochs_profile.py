"""The bochs-vmx profile's pieces that need no Bochs: the rendered configuration, the boot CD's
command line, and how a playbook adapts to a profile without a gdbstub."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from lab import playbook
from lab.errors import UsageError
from lab.machines import pvh
from lab.machines.bochs import BochsSpec, render_bochsrc, render_slirp_conf
from lab.machines.iso import isolinux_cfg
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
    assert "KERNEL /vmlinuz" in cfg and "INITRD /initrd.img" in cfg
    pvh = isolinux_cfg("console=ttyS0,115200 lab.level=l0", pvh=True)
    assert "KERNEL /isolinux/mboot.c32" in pvh
    assert ("APPEND /pvhboot.elf --- /vmlinux.elf console=ttyS0,115200 lab.level=l0 --- "
            "/initrd.img") in pvh


def elf_with_note(name: bytes, ntype: int) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding one note."""
    desc = struct.pack("<Q", 0x1000850)
    note = struct.pack("<III", len(name) + 1, len(desc), ntype) + name + b"\0" * (
        4 - len(name) % 4) + desc
    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def test_pvh_entry_is_found_in_the_elf_notes() -> None:
    assert pvh._has_pvh_entry(elf_with_note(b"Xen", 18))
    assert not pvh._has_pvh_entry(elf_with_note(b"Xen", 17))
    assert not pvh._has_pvh_entry(elf_with_note(b"GNU", 18))
    assert not pvh._has_pvh_entry(b"not an elf" + bytes(100))


def test_a_bzimage_without_payload_pointer_is_refused(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(bytes(4096))
    with pytest.raises(pvh.NoPvh, match="not a bzImage"):
        pvh.vmlinux_from_bzimage(bz, tmp_path / "cache")


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


def test_the_emulators_own_boot_warning_is_expected_under_bochs_only() -> None:
    """6.12 warns at boot about Bochs's CPUID topology: Bochs's doing, not the kernel's under
    test, so every playbook under bochs-vmx expects it (and reports it); tcg-svm does not."""
    from pathlib import Path

    from lab import playbook
    from lab.events import Event
    from lab.profiles import get_profile

    pb = playbook.load(Path(__file__).resolve().parents[2] / "playbooks" / "smoke.yaml")
    ev = Event(seq=1, level="l0", kind="WARNING", t=0.1,
               line="WARNING: CPU: 0 PID: 0 at arch/x86/kernel/cpu/topology_common.c:57 "
                    "parse_legacy+0x11e/0x140", file_line="arch/x86/kernel/cpu/"
                                                          "topology_common.c:57")
    assert any(e.matches(ev) for e in pb.for_profile(get_profile("bochs-vmx")).expect_events)
    assert not any(e.matches(ev) for e in pb.for_profile(get_profile("tcg-svm")).expect_events)


def test_bzimage_payloads_xz_and_zstd(tmp_path: Path) -> None:
    """6.12 on compress the kernel with zstd (and append its size): both unpack for the PVH
    entry; anything else says what it is."""
    import lzma
    import struct
    import subprocess

    from lab.machines.pvh import NoPvh, _decompress

    elf = b"\x7fELF" + bytes(range(256)) * 64
    size = struct.pack("<I", len(elf))
    assert _decompress(tmp_path, lzma.compress(elf, format=lzma.FORMAT_XZ) + size) == elf
    z = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    assert _decompress(tmp_path, z + size) == elf
    with pytest.raises(NoPvh, match="cannot unpack its zstd payload"):
        _decompress(tmp_path, z + struct.pack("<I", len(elf) + 1))
    with pytest.raises(NoPvh, match="neither xz nor zstd"):
        _decompress(tmp_path, b"\x1f\x8b\x08\x00" + bytes(16))
