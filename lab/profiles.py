"""Acceleration profiles: how L0 runs on this host and which CPU virtualization it exposes.

A profile fixes the vendor of the whole chain: every level that runs another one needs the same
virtualization extension (vmx or svm) and the matching KVM module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    vendor: str  # "intel" | "amd"
    accel: str  # how the host runs L0: "kvm" | "tcg"
    l0_cpu: str  # QEMU -cpu for L0
    description: str

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

    def nested_accel(self) -> str:
        return "kvm"


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("kvm-vmx", "intel", "kvm", "host",
                "hardware KVM on an Intel host with VMX; L0 sees vmx (host nested=1)"),
        Profile("kvm-svm", "amd", "kvm", "host",
                "hardware KVM on an AMD host with SVM; L0 sees svm+npt (host nested=1)"),
        # TCG emulates AMD SVM with nested paging but not VMX (see FACTS.md). `max` carries
        # svm and npt under TCG; `qemu64` has svm without npt.
        Profile("tcg-svm", "amd", "tcg", "max",
                "QEMU TCG with an AMD CPU model that has svm+npt (no hardware virtualization)"),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}") from None
