"""The VMX bare-metal suite for real, without Intel hardware: the lab's own L0 image booted
under Bochs (which emulates VMX with EPT), where the kernel under test's kvm_intel runs
vmx-ept-test's L1. Until the bochs-vmx profile exists (issue 6), this test drives Bochs itself:
an ISO of the lab's kernel and initramfs, plus an overlay that runs the suite at boot and
powers off; the serial console goes to a file.

Checked both ways: with L1's INVEPTs every case passes; with them left out (-x, the negative
control) the cases must fail, so they can see stale EPT translations at all."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import tap
from lab.cache import cache_root
from lab.image import Builder, load_recipe

from .helpers import ROOT

pytestmark = pytest.mark.integration

RUN = """
echo "VMX-TEST: kvm_intel nested=$(cat /sys/module/kvm_intel/parameters/nested)"
echo "VMX-TEST: begin"
vmx-ept-test -n 20
echo "VMX-TEST: control"
vmx-ept-test -n 20 -x
echo "VMX-TEST: end"
sleep 1  # let the UART drain before the power goes
poweroff -f
"""

BOCHSRC = """\
megs: 1024
cpu: model=corei7_skylake_x, count=1, ips=100000000, reset_on_triple_fault=0, ignore_bad_msrs=1
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev={serial}
log: {log}
panic: action=fatal
error: action=ignore
info: action=ignore
debug: action=ignore
clock: sync=none, time0=local
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
display_library: sdl2
"""


def test_vmx_suite_under_bochs(tmp_path: Path) -> None:
    for tool in ("bochs", "genisoimage"):
        assert shutil.which(tool), f"{tool} is needed for this test (.ci/run installs it)"
    img = Builder(cache_root(), log=lambda m: None).build(
        load_recipe(ROOT / "images" / "default.yaml"))
    iso = tmp_path / "iso"
    (iso / "isolinux").mkdir(parents=True)
    shutil.copy("/usr/lib/ISOLINUX/isolinux.bin", iso / "isolinux")
    shutil.copy("/usr/lib/syslinux/modules/bios/ldlinux.c32", iso / "isolinux")
    shutil.copy(img.kernel, iso / "vmlinuz")
    # A later cpio member replaces an earlier one: the overlay's rcS runs the suite.
    ov = tmp_path / "overlay"
    (ov / "etc" / "lab").mkdir(parents=True)
    rcs = ov / "etc" / "lab" / "rcS"
    rcs.write_text((ROOT / "lab" / "guest" / "rcS").read_text() + RUN)
    rcs.chmod(0o755)
    overlay = subprocess.run("find . | cpio -o -H newc --quiet", shell=True, cwd=ov,
                             capture_output=True, check=True).stdout
    (iso / "initrd.img").write_bytes(img.initrd.read_bytes() + overlay)
    (iso / "isolinux" / "isolinux.cfg").write_text(
        "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n"
        "  KERNEL /vmlinuz\n  INITRD /initrd.img\n"
        "  APPEND console=ttyS0,115200 nokaslr panic=-1 lab.level=l0 loglevel=5 "
        "kvm_intel.nested=1 kvm_intel.ept=1\n")
    subprocess.run(["genisoimage", "-quiet", "-o", str(tmp_path / "boot.iso"), "-b",
                    "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
                    "-boot-load-size", "4", "-boot-info-table", "-R", "-J", str(iso)], check=True)
    serial = tmp_path / "serial.txt"
    (tmp_path / "bochsrc").write_text(BOCHSRC.format(iso=tmp_path / "boot.iso", serial=serial,
                                                     log=tmp_path / "bochs.log"))
    (tmp_path / "cont.rc").write_text("c\n")
    env = dict(os.environ, SDL_VIDEODRIVER="dummy")  # no display, no listener
    p = subprocess.run(["bochs", "-q", "-rc", str(tmp_path / "cont.rc"), "-f",
                        str(tmp_path / "bochsrc")], cwd=tmp_path, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=900)
    out = serial.read_text(errors="replace")
    assert "VMX-TEST: end" in out, (p.stdout[-2000:], out[-3000:])
    assert "kvm_intel nested=Y" in out
    clean = tap.parse(out.split("VMX-TEST: begin")[1].split("VMX-TEST: control")[0])
    control = tap.parse(out.split("VMX-TEST: control")[1].split("VMX-TEST: end")[0])
    assert len(clean.cases) == 7 and clean.ok, [c.to_dict() for c in clean.cases]
    assert all(c.status == "passed" for c in clean.cases)
    names = {c.name for c in clean.cases}
    assert {"vmx/remap-invept-single", "vmx/remap-invept-global",
            "vmx/cached-root-single"} <= names
    failed = [c.name for c in control.cases if c.status == "failed"]
    assert failed, "without INVEPT the cases should see stale translations"
