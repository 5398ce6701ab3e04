"""Booting L0 under Bochs without the kernel's decompressor (PVH entry).

A bzImage starts by decompressing itself; Debian's is xz, and under Bochs that takes ~43 s of
a ~77 s boot. Linux can also be entered uncompressed at its PVH entry point (CONFIG_PVH, on in
Debian's kernels): the host unpacks the vmlinux ELF from the bzImage once (Python's lzma), and a
small multiboot program (lab/guest/pvhboot), loaded by syslinux's mboot.c32 with the vmlinux and
the initramfs as modules, copies the ELF's segments into place and enters the kernel with a
struct hvm_start_info (command line, initramfs, memory map). Same kernel, another door: the
setup code and decompressor of the bzImage do not run, and neither does KASLR (the decompressor
does that), so a level with `kaslr: true` boots the bzImage.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import subprocess
from importlib import resources
from pathlib import Path

from lab.cache import file_sha256, locked
from lab.errors import LabError

XEN_ELFNOTE_PHYS32_ENTRY = 18


class NoPvh(LabError):
    """This kernel cannot be entered through PVH (the lab then boots the bzImage)."""


def vmlinux_from_bzimage(bzimage: Path, cache: Path) -> Path:
    """The ELF inside the bzImage (its payload, decompressed), cached by the bzImage's hash."""
    key = file_sha256(bzimage)[:20]
    out = cache / "vmlinux-elf" / f"{key}.elf"
    with locked(cache / "vmlinux-elf" / f".{key}.lock"):
        if out.exists():
            return out
        data = bzimage.read_bytes()
        if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
            raise NoPvh(f"{bzimage}: not a bzImage with a payload pointer (boot protocol 2.08+)")
        setup_sects = data[0x1F1] or 4
        offset, length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + offset
        payload = data[start:start + length]
        elf = _decompress(bzimage, payload)
        if not _has_pvh_entry(elf):
            raise NoPvh(f"{bzimage}: the kernel has no PVH entry (CONFIG_PVH)")
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(elf)
        tmp.rename(out)
    return out


def _decompress(bzimage: Path, payload: bytes) -> bytes:
    """The payload's ELF: xz (Debian up to 6.1) or zstd (6.12 on). The kernel's build appends
    the uncompressed size as 4 bytes; zstd's own tool wants the frame alone."""
    if payload.startswith(b"\xfd7zXZ"):
        try:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        except lzma.LZMAError as e:
            raise NoPvh(f"{bzimage}: cannot unpack its payload: {e}") from None
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
        try:
            p = subprocess.run(["zstd", "-d", "-c", "-q"], input=payload[:-4],
                               capture_output=True, timeout=300)
        except FileNotFoundError:
            raise NoPvh(f"{bzimage}: its payload is zstd and zstd is not installed") from None
        if p.returncode != 0 or len(p.stdout) != size:
            raise NoPvh(f"{bzimage}: cannot unpack its zstd payload: "
                        f"{p.stderr.decode(errors='replace').strip()[:200]}")
        return p.stdout
    raise NoPvh(f"{bzimage}: payload is neither xz nor zstd ({payload[:4].hex()})")


def _has_pvh_entry(elf: bytes) -> bool:
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        ptype, _, off, _, _, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        p, end = off, off + filesz
        while p + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, p)
            name = elf[p + 12:p + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            p += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def loader(cache: Path) -> Path:
    """pvhboot.elf, built from lab/guest/pvhboot (32-bit, freestanding) and cached."""
    src_dir = resources.files("lab") / "guest" / "pvhboot"
    c, ld = (src_dir / "pvhboot.c").read_bytes(), (src_dir / "link.ld").read_bytes()
    key = hashlib.sha256(c + ld).hexdigest()[:16]
    out = cache / "pvhboot" / f"pvhboot-{key}.elf"
    with locked(cache / "pvhboot" / ".lock"):
        if out.exists():
            return out
        tmp = out.parent / f".build-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "pvhboot.c").write_bytes(c)
        (tmp / "link.ld").write_bytes(ld)
        for cmd in (["gcc", "-m32", "-ffreestanding", "-fno-pic", "-fno-pie",
                     "-fno-stack-protector", "-nostdlib", "-O2", "-Wall", "-c", "pvhboot.c",
                     "-o", "pvhboot.o"],
                    ["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", "link.ld", "-o",
                     "pvhboot.elf", "pvhboot.o"]):
            p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if p.returncode != 0:
                raise NoPvh(f"building the PVH loader: {' '.join(cmd[:2])}: "
                            f"{p.stderr.strip()[-400:]}")
        (tmp / "pvhboot.elf").rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out
