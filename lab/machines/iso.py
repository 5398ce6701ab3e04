"""A bootable ISO holding a kernel, its initramfs and its command line (ISOLINUX).

Bochs has no -kernel: its BIOS boots a disk or a CD, and ISOLINUX on a CD is the shortest path
from there to a Linux kernel with an initramfs and a command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lab.errors import LabError

# Debian's isolinux and syslinux-common packages.
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
SYSLINUX_MODULES = Path("/usr/lib/syslinux/modules/bios")
LDLINUX_C32 = SYSLINUX_MODULES / "ldlinux.c32"
# What syslinux's multiboot loader needs beside ldlinux.c32 (the PVH path, lab/machines/pvh.py).
MBOOT_C32 = ["mboot.c32", "libcom32.c32"]


def isolinux_cfg(append: str, pvh: bool = False) -> str:
    # SERIAL 0: ISOLINUX's own messages go to COM1 too, so a boot that stalls before the
    # kernel still shows where on the lab's console.
    head = "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n"
    if pvh:
        # mboot.c32 PROGRAM --- MODULE ARGS --- MODULE: the vmlinux module's arguments after
        # its own name are the kernel's command line.
        return head + ("  KERNEL /isolinux/mboot.c32\n"
                       f"  APPEND /pvhboot.elf --- /vmlinux.elf {append} --- /initrd.img\n")
    return head + f"  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {append}\n"


def make_boot_iso(kernel: Path, initrd: Path, append: str, dest: Path,
                  pvh: tuple[Path, Path] | None = None) -> Path:
    """Write dest (an ISO9660 image booting `kernel` with `initrd` and `append`); with
    pvh=(loader, vmlinux ELF), through the kernel's PVH entry instead of the bzImage."""
    needed = [ISOLINUX_BIN, LDLINUX_C32, *([SYSLINUX_MODULES / m for m in MBOOT_C32]
                                           if pvh else [])]
    for f in needed:
        if not f.exists():
            raise LabError(f"{f} is missing (Debian packages isolinux and syslinux-common; "
                           "see `lab doctor`)")
    if len(append) > 2000:
        raise LabError(f"kernel command line too long for ISOLINUX ({len(append)} bytes)")
    tree = dest.with_name(dest.name + ".d")
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "isolinux").mkdir(parents=True)
    try:
        shutil.copyfile(ISOLINUX_BIN, tree / "isolinux" / "isolinux.bin")
        for f in needed[1:]:
            shutil.copyfile(f, tree / "isolinux" / f.name)
        (tree / "isolinux" / "isolinux.cfg").write_text(isolinux_cfg(append, pvh is not None))
        files = [(initrd, "initrd.img")]
        files += [(pvh[0], "pvhboot.elf"), (pvh[1], "vmlinux.elf")] if pvh else \
            [(kernel, "vmlinuz")]
        # Hard links: the kernel and initramfs are big and must not be copied per boot.
        for src, name in files:
            try:
                (tree / name).hardlink_to(src)
            except OSError:
                shutil.copyfile(src, tree / name)
        # It carries the initramfs, and so the image's SSH host key: this user's only (the
        # file exists 0600 before genisoimage writes into it).
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        os.chmod(dest, 0o600)
        cmd = ["genisoimage", "-quiet", "-o", str(dest), "-b", "isolinux/isolinux.bin",
               "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
               "-boot-info-table", "-R", "-J", str(tree)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise LabError("genisoimage is not installed (see `lab doctor`)") from None
        if p.returncode != 0:
            raise LabError(f"making the boot ISO failed: {p.stderr.strip()[-500:]}")
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return dest
