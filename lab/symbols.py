"""Debug symbols for L0 on the host: an indexed vmlinux, module section addresses, KASLR, and
the gdbinit that `lab gdb` (or `gdb -x RUN/gdbinit`) attaches with."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cache import locked
from lab.elfinfo import alloc_sections
from lab.errors import LabError
from lab.kernel import module_index
from lab.ssh import SSHSession

log = logging.getLogger(__name__)

KVM_MODULES = ("irqbypass", "kvm", "kvm_amd", "kvm_intel")


def indexed_vmlinux(vmlinux: Path, cache: Path) -> Path:
    """A copy of vmlinux with a .gdb_index, made once per vmlinux (type look-ups go from
    ~14 s to ~0.5 s, measured on Debian's 6.1 vmlinux). The copy is named `vmlinux`, as the
    kernel's gdb scripts expect."""
    st = vmlinux.stat()
    key = f"{vmlinux.name}-{st.st_size}-{st.st_mtime_ns}"
    dest = cache / "gdb-index" / key / "vmlinux"
    if dest.exists():
        return dest
    with locked(cache / "gdb-index" / f"{key}.lock"):
        if dest.exists():
            return dest
        tmp = dest.parent.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(vmlinux, tmp / "vmlinux")
        t = time.monotonic()
        log.info(f"indexing {vmlinux.name} for gdb (once per kernel; gdb then starts in well "
                 "under a second)")
        p = subprocess.run(["gdb-add-index", str(tmp / "vmlinux")], capture_output=True,
                           text=True, timeout=600)
        log.info(f"indexed {vmlinux.name} in {time.monotonic() - t:.1f} s")
        if p.returncode != 0:
            raise LabError(f"gdb-add-index {vmlinux}: {p.stderr.strip()[-300:]}")
        tmp.rename(dest.parent)
    return dest


@dataclass
class LoadedModule:
    name: str
    debug_file: Path
    sections: dict[str, int]
    present: set[str]  # allocated sections in the debug object


def read_module_sections(ssh: SSHSession, names: tuple[str, ...] = KVM_MODULES
                         ) -> dict[str, dict[str, int]]:
    """Section addresses of loaded modules, from /sys/module/*/sections in the guest."""
    # One grep per module (`cat` per section file costs ~0.7 s under TCG; the shell's `read`
    # gets "0": these sysfs files answer only whole reads).
    script = ("for m in " + " ".join(names) + "; do [ -d /sys/module/$m/sections ] && "
              "cd /sys/module/$m/sections && grep -H . .* * 2>/dev/null | sed \"s/^/$m /\"; "
              "done; true")
    r = ssh.run(script, timeout=60)
    out: dict[str, dict[str, int]] = {}
    for line in r.stdout.splitlines():
        mod, _, rest = line.partition(" ")
        section, _, addr = rest.rpartition(":")
        if mod and section and addr.startswith("0x"):
            out.setdefault(mod, {})[section] = int(addr, 16)
    return out


def loaded_modules(ssh: SSHSession, debug_root: Path) -> list[LoadedModule]:
    index = module_index(debug_root)
    mods = []
    for name, sections in read_module_sections(ssh).items():
        if name not in index or ".text" not in sections:
            continue
        ko = index[name]
        mods.append(LoadedModule(name, ko, sections, alloc_sections(ko)))
    return mods


def kaslr_offset(ssh: SSHSession, system_map: Path | None) -> int:
    """Runtime _text minus link-time _text (0 with nokaslr)."""
    if system_map is None or not system_map.exists():
        return 0
    m = re.search(r"^([0-9a-f]+) T _text$", system_map.read_text(), re.M)
    if not m:
        return 0
    r = ssh.run("grep -m1 ' _text$' /proc/kallsyms", timeout=30)
    run = r.stdout.split()
    if not run or int(run[0], 16) == 0:
        return 0  # kptr_restrict hides it: assume nokaslr
    return int(run[0], 16) - int(m.group(1), 16)


@dataclass
class DebugFiles:
    vmlinux: Path  # indexed (see indexed_vmlinux)
    module_root: Path  # where the modules' debug objects are
    system_map: Path | None


def debug_files(manifest: dict[str, Any], cache: Path, level: str = "l0") -> DebugFiles:
    """The debug files of an image's kernel, as its manifest records them."""
    dbg: dict[str, str] | None = manifest.get("debug")
    if not dbg:
        raise LabError(f"{level}'s image was built without debug symbols (lab images build "
                       "without --no-debug)", level=level)
    smap = Path(dbg["system_map"]) if dbg.get("system_map") else None
    return DebugFiles(indexed_vmlinux(Path(dbg["vmlinux"]), cache), Path(dbg["module_root"]),
                      smap)


class RunningKernel:
    """A running kernel's KASLR offset and loaded KVM modules, read over SSH once (gdbinit
    and the probes both need them; the modules do not move while the lab runs)."""

    def __init__(self, files: DebugFiles) -> None:
        self.files = files
        self._read: tuple[int, list[LoadedModule]] | None = None

    def read(self, ssh: SSHSession) -> tuple[int, list[LoadedModule]]:
        if self._read is None:
            self._read = (kaslr_offset(ssh, self.files.system_map),
                          loaded_modules(ssh, self.files.module_root))
        return self._read


def write_gdbinit(run_dir: Path, gdb_socket: str, vmlinux: Path, offset: int,
                  modules: list[LoadedModule] | None) -> None:
    """RUN/gdbinit: attach to L0's gdbstub with the kernel's symbols. Module symbols live in
    RUN/modules.gdb: with --hold the modules load after gdb attaches (`modules` None), and the
    `lab-modules` command loads them then (the lab writes the file once L0 is up)."""
    from lab.gdb import add_symbol_file_command

    lines = ["# Written by `lab`: attaches to L0's gdbstub with the kernel's symbols.",
             "set pagination off", "set confirm off",
             f"symbol-file {vmlinux}" + (f" -o {offset:#x}" if offset else ""),
             f"target remote {gdb_socket}"]
    mods_file = run_dir / "modules.gdb"
    lines += ["define lab-modules", f"  source {mods_file}", "end",
              "document lab-modules", "Load the symbols of L0's KVM modules (kvm, kvm_amd, "
              "kvm_intel) at the addresses they are loaded at.", "end"]
    if modules is not None:
        mods_file.write_text("\n".join(add_symbol_file_command(m.debug_file, m.sections,
                                                               m.present)
                                       for m in modules) + "\n")
        lines.append("lab-modules")
    (run_dir / "gdbinit").write_text("\n".join(lines) + "\n")
