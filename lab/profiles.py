"""Acceleration profiles: how L0 runs on this host and which CPU virtualization it exposes.

A profile fixes the vendor of the whole chain: every level that runs another one needs the same
virtualization extension (vmx or svm) and the matching KVM module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lab.events import Expected

# `--la57` for L0's CPU: auto (below), on (as the CPU model has it), off (without it).
LA57_CHOICES = ("auto", "on", "off")
# The oldest L0 series seen walking L1's 5-level nested page table right under SVM (6.1).
# Debian's 5.10 does not (kvmmmu walk traces, 2026-12): with L2 in real mode it walked L1's
# 5-level nCR3 4 levels deep, found nothing, and handed the NPF to L1, whose table has the
# page, so L2 faulted at its reset vector forever; with L1 booted `no5lvl` (a 4-level nCR3)
# it walked 5 levels deep once L2's kernel ran, and L2 stalled there instead. The depth
# follows L2's paging, not L1's. L1 has 5-level paging whenever L0's CPU offers LA57 (TCG's
# `max` does), so `--la57 auto` takes LA57 from the CPU of an older SVM L0 (no level then
# has it, and every walk is 4 deep); `--la57 on` shows the bug.
LA57_NESTED_NPT_FROM = (6, 1)


@dataclass(frozen=True)
class Profile:
    name: str
    vendor: str  # "intel" | "amd"
    accel: str  # how the host runs L0: "kvm" | "tcg" (QEMU) | "emulated" (Bochs)
    l0_cpu: str  # QEMU -cpu, or Bochs cpu model, for L0
    description: str
    machine: str = "qemu"  # what runs L0 on the host: "qemu" | "bochs"
    l0_image: str = "default"  # L0's image recipe when the playbook names none
    # Boot timeouts that a playbook leaves at their defaults are multiplied by this: an
    # emulator that runs the guest 10-50x slower than TCG needs longer, not a failure.
    timeout_scale: float = 1.0
    # What every level run inside the lab (a parent running its child with QEMU/KVM) gets on
    # its QEMU command line and its kernel command line: see NESTED_QEMU_ARGS below.
    nested_qemu_args: tuple[str, ...] = ()
    nested_append: tuple[str, ...] = ()
    # Seconds from L0's launch to its /init on the host the default timeouts were written on:
    # this host's own time over it scales every timeout (lab/hostspeed.py). None: no scaling.
    reference_l0_init_s: float | None = None
    # Kernel events the emulator itself causes (not the kernel under test): expected in every
    # playbook run under this profile, reported, never failing the run.
    known_events: tuple[Expected, ...] = ()

    @property
    def has_gdbstub(self) -> bool:
        """Whether the host can stop L0 in gdb (Debian's Bochs is built
        without one: its internal debugger instead)."""
        return self.machine == "qemu"

    @property
    def virt_flag(self) -> str:
        return "vmx" if self.vendor == "intel" else "svm"

    @property
    def tdp_flag(self) -> str:
        """The /proc/cpuinfo flag for two-dimensional paging."""
        return "ept" if self.vendor == "intel" else "npt"

    @property
    def kvm_module(self) -> str:
        return "kvm_intel" if self.vendor == "intel" else "kvm_amd"

    @property
    def tdp_param(self) -> str:
        """The KVM vendor module's parameter that turns two-dimensional paging on."""
        return "ept" if self.vendor == "intel" else "npt"

    def nested_cpu(self) -> str:
        """-cpu for a level run by KVM inside the lab: pass the parent's CPU through.

        `host` forwards vmx/svm as the parent's KVM exposes them (nested=1 in the parent).
        Under TCG, the XSAVE state sizes that L0's KVM reports to L1 disagree with the
        features it exposes ("XSAVE consistency problem", a WARNING in fpu__init_system_xstate
        at every L1 boot): an emulation artefact, not KVM's, so the nested levels go without
        XSAVE there and their consoles stay clean for real warnings.
        """
        return "host,-xsave" if self.accel == "tcg" else "host"

    def l0_cpu_with(self, la57: bool) -> str:
        """L0's CPU, with or without LA57 (5-level paging), which the levels below inherit
        through `-cpu host`. Bochs's CPU models have no LA57 to take away."""
        return self.l0_cpu if la57 or self.machine != "qemu" else f"{self.l0_cpu},-la57"

    def la57_for(self, choice: str, release: str) -> tuple[bool, str]:
        """Whether L0's CPU offers LA57 under `--la57 choice` with L0's kernel `release`, and
        why not when auto says no."""
        if choice != "auto":
            return choice == "on", ""
        m = re.match(r"(\d+)\.(\d+)", release)
        if self.vendor == "amd" and m and (int(m[1]), int(m[2])) < LA57_NESTED_NPT_FROM:
            return False, (f"L0's CPU without LA57: {release} walks L1's 5-level nested page "
                           "table as deep as L2's paging is, not as L1 built it "
                           "(--la57 on to see it)")
        return True, ""

    def nested_accel(self) -> str:
        return "kvm"


# What the levels run inside the lab get (benchmarks/bench.py chain measures each change):
# - no HPET: QEMU emulates it in the parent's userspace, so every HPET read and every tick of
#   a nested guest is a round trip through each KVM above it; a KVM guest knows its TSC rate
#   and needs no HPET (kvm-clock is its clocksource).
# - no_timer_check: skips the early IO-APIC timer test, a busy wait for PIT ticks that are
#   exits through every level.
NESTED_QEMU_ARGS = ("-no-hpet",)
NESTED_APPEND = ("no_timer_check",)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("kvm-vmx", "intel", "kvm", "host",
                "hardware KVM on an Intel host with VMX; L0 sees vmx (host nested=1)"),
        Profile("kvm-svm", "amd", "kvm", "host",
                "hardware KVM on an AMD host with SVM; L0 sees svm+npt (host nested=1)"),
        # TCG emulates AMD SVM with nested paging but not VMX (QEMU 7.2). `max` carries
        # svm and npt under TCG; `qemu64` has svm without npt.
        Profile("tcg-svm", "amd", "tcg", "max",
                "QEMU TCG with an AMD CPU model that has svm+npt (no hardware virtualization)",
                nested_qemu_args=NESTED_QEMU_ARGS, nested_append=NESTED_APPEND,
                reference_l0_init_s=4.0),
        # Bochs emulates VMX with EPT. broadwell_ult rather than corei7_skylake_x:
        # both run nested KVM, but skylake_x's XSAVE sizes disagree with its features and
        # L0 boots with a WARNING in fpu__init_system_xstate that would read as a crash.
        # Its L0 image has e1000, the NIC Bochs's slirp serves (the cloud kernel has none).
        Profile("bochs-vmx", "intel", "emulated", "broadwell_ult",
                "Bochs emulating an Intel CPU with VMX+EPT (no Intel hardware needed; slow)",
                machine="bochs", l0_image="bochs-l0", timeout_scale=5.0,
                # 6.12 checks CPUID's legacy topology leaves and warns at boot about Bochs's
                # (parse_legacy); 6.1 does not look.
                known_events=(Expected("WARNING", "l0", "topology_common.c:57"),)),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}") from None
