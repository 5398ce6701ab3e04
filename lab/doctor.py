"""What this host can do: CPU virtualization, a usable /dev/kvm, tools, and the profile to use."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

# tool -> (how to find it, Debian package that installs it)
TOOLS: dict[str, tuple[str, str]] = {
    "qemu-system-x86_64": ("qemu-system-x86_64", "qemu-system-x86"),
    "gdb": ("gdb", "gdb"),
    "gdb-add-index": ("gdb-add-index", "gdb"),
    "busybox": ("/bin/busybox", "busybox-static"),
    "dropbear": ("/usr/sbin/dropbear", "dropbear-bin"),
    "dropbearkey": ("/usr/bin/dropbearkey", "dropbear-bin"),
    "sftp-server": ("/usr/lib/openssh/sftp-server", "openssh-sftp-server"),
    "ssh": ("ssh", "openssh-client"),
    "apt-get": ("apt-get", "apt"),
    "dpkg-deb": ("dpkg-deb", "dpkg"),
    "seabios": ("/usr/share/seabios/bios-256k.bin", "seabios"),
    "gcc": ("gcc", "gcc"),
    "linux/kvm.h": ("/usr/include/linux/kvm.h", "linux-libc-dev"),
    # tracefs probes (DWARF locations, call frames, relocations) and the kprobe module
    "readelf": ("readelf", "binutils"),
    "make": ("make", "make"),
}

# What the bochs-vmx profile needs besides the above (an L0 under Bochs boots from a CD).
BOCHS_TOOLS: dict[str, tuple[str, str]] = {
    "bochs": ("bochs", "bochs"),
    "bochs sdl2 display": ("/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_sdl2_gui.so",
                           "bochs-sdl"),
    "bochs BIOS": ("/usr/share/bochs/BIOS-bochs-latest", "bochsbios"),
    "VGA BIOS": ("/usr/share/vgabios/vgabios.bin", "vgabios"),
    "isolinux": ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux"),
    "ldlinux.c32": ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common"),
    "genisoimage": ("genisoimage", "genisoimage"),
}


@dataclass
class HostReport:
    cpu_vendor: str
    cpu_model: str
    vmx: bool
    svm: bool
    kvm_device: bool
    kvm_modules: list[str]
    kvm_usable: bool
    kvm_usable_reason: str
    nested: dict[str, str]
    qemu_version: str | None
    gdb_version: str | None
    missing: dict[str, str] = field(default_factory=dict)
    profile: str | None = None
    profile_reason: str = ""
    # bochs-vmx is never chosen by itself (TCG is faster); it runs when asked for, if this
    # host has what it needs.
    bochs_missing: dict[str, str] = field(default_factory=dict)
    bochs_version: str | None = None

    @property
    def bochs_can_run(self) -> bool:
        return not self.bochs_missing and not self.missing

    @property
    def install_command(self) -> str | None:
        if not self.missing:
            return None
        pkgs = sorted(set(self.missing.values()))
        return "apt-get install -y " + " ".join(pkgs)

    @property
    def can_run(self) -> bool:
        return self.profile is not None and not self.missing

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["install_command"] = self.install_command
        d["can_run"] = self.can_run
        d["bochs_can_run"] = self.bochs_can_run
        return d


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, str, set[str]]:
    vendor, model, flags = "unknown", "unknown", set[str]()
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor == "unknown":
            vendor = value.strip()
        elif key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return vendor, model, flags


def _version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    m = re.search(r"\d+\.\d+(\.\d+)?", first)
    return m.group(0) if m else (first or None)


def _find(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None


def probe(sys_module: Path = Path("/sys/module"), cpuinfo: Path = Path("/proc/cpuinfo"),
          dev_kvm: Path = Path("/dev/kvm"), versions: bool = True) -> HostReport:
    """What the host has. `versions=False` skips running qemu and gdb for their versions
    (what `lab run` needs to pick a profile is only whether QEMU is there)."""
    vendor, model, flags = _cpuinfo(cpuinfo)
    vmx, svm = "vmx" in flags, "svm" in flags
    mods = sorted(m for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")
                  if (sys_module / m).exists())
    nested: dict[str, str] = {}
    for m in ("kvm_intel", "kvm_amd"):
        p = sys_module / m / "parameters" / "nested"
        if p.exists():
            nested[m] = p.read_text().strip()
    has_dev = dev_kvm.exists()
    # /dev/kvm alone proves nothing: on these machines it is kvm_pvm, which cannot run a normal
    # kernel. Hardware virtualization needs the CPU flag and the vendor module.
    if not has_dev:
        usable, reason = False, "/dev/kvm is missing"
    elif vmx and "kvm_intel" in mods:
        usable, reason = True, "vmx flag and kvm_intel loaded"
    elif svm and "kvm_amd" in mods:
        usable, reason = True, "svm flag and kvm_amd loaded"
    else:
        extra = f" (modules: {', '.join(mods)})" if mods else ""
        usable, reason = False, f"/dev/kvm exists but the CPU has no vmx/svm flag{extra}"
    missing = {name: pkg for name, (path, pkg) in TOOLS.items() if not _find(path)}
    bochs_missing = {name: pkg for name, (path, pkg) in BOCHS_TOOLS.items() if not _find(path)}
    report = HostReport(
        cpu_vendor=vendor, cpu_model=model, vmx=vmx, svm=svm, kvm_device=has_dev,
        kvm_modules=mods, kvm_usable=usable, kvm_usable_reason=reason, nested=nested,
        qemu_version=_version(["qemu-system-x86_64", "--version"]) if versions else
        ("present" if shutil.which("qemu-system-x86_64") else None),
        gdb_version=_version(["gdb", "--version"]) if versions else None, missing=missing,
        bochs_missing=bochs_missing,
        bochs_version=_bochs_version() if versions and "bochs" not in bochs_missing else None,
    )
    report.profile, report.profile_reason = choose_profile(report)
    return report


def _bochs_version() -> str | None:
    # Bochs has no --version: `-help` prints its banner and exits.
    try:
        out = subprocess.run(["bochs", "-help"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Bochs x86 Emulator (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def choose_profile(r: HostReport) -> tuple[str | None, str]:
    if r.kvm_usable and r.vmx and r.nested.get("kvm_intel", "N") in ("Y", "1"):
        return "kvm-vmx", "hardware VMX with kvm_intel nested=1"
    if r.kvm_usable and r.svm and r.nested.get("kvm_amd", "0") in ("Y", "1"):
        return "kvm-svm", "hardware SVM with kvm_amd nested=1"
    if r.qemu_version is None:
        return None, "no qemu-system-x86_64"
    why = "no usable hardware virtualization" if not r.kvm_usable else "host KVM has nested=0"
    return "tcg-svm", f"{why}: QEMU TCG emulating AMD SVM with NPT"


def format_report(r: HostReport) -> str:
    yes = {True: "yes", False: "no"}
    lines = [
        f"CPU:              {r.cpu_vendor} ({r.cpu_model})",
        f"vmx / svm flags:  {yes[r.vmx]} / {yes[r.svm]}",
        f"/dev/kvm:         {'present' if r.kvm_device else 'missing'}; "
        f"usable for a lab: {yes[r.kvm_usable]} ({r.kvm_usable_reason})",
        f"kvm modules:      {', '.join(r.kvm_modules) or 'none'}",
        f"nested:           {', '.join(f'{k}={v}' for k, v in r.nested.items()) or 'n/a'}",
        f"QEMU:             {r.qemu_version or 'missing'}",
        f"GDB:              {r.gdb_version or 'missing'}",
        f"profile:          {r.profile or 'none'} ({r.profile_reason})",
    ]
    if r.missing:
        lines.append(f"missing tools:    {', '.join(sorted(r.missing))}")
        lines.append(f"install with:     {r.install_command}")
    if r.bochs_can_run:
        lines.append(f"bochs-vmx:        can run (Bochs {r.bochs_version or '?'}, emulated VMX "
                     "with EPT; choose it with --profile bochs-vmx)")
    elif r.bochs_missing:
        pkgs = " ".join(sorted(set(r.bochs_missing.values())))
        lines.append(f"bochs-vmx:        cannot run: missing {', '.join(sorted(r.bochs_missing))}"
                     f" (apt-get install -y {pkgs})")
    else:
        lines.append("bochs-vmx:        cannot run until the missing tools above are installed")
    lines.append("a lab can run here" if r.can_run else "a lab cannot run here yet")
    return "\n".join(lines)

