"""Re-creating "L0 invalidates too little" in a running L0: through gdb, or by a kprobe module.

Where L0 has a gdbstub (QEMU), the bug goes in through gdb as below. Where it has none (Bochs,
real machines), an injection that names a `kprobe` (TARGET returns at once when called from
CALLER) loads lab/guest/inject/lab_inject.c, built for L0's kernel (lab/kmod.py), instead.

Each injection finds its instructions by disassembling one KVM function and checking each
candidate against what DWARF says (struct offsets, call targets), then overwrites them with a
NOP of the same length. A one-time code patch costs nothing per event (a breakpoint that skips
the work costs ~10 ms per stop under TCG) and needs no breakpoint command scripts, which
pygdbmi cannot parse.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.errors import LabError
from lab.ssh import SSHSession

if TYPE_CHECKING:  # validating a playbook (which names injections) needs no gdb
    from lab.gdb import GdbSession

log = logging.getLogger(__name__)
NOP5 = "0f1f440000"
KVM_REQ_MMU_SYNC = 8 + 3  # KVM_ARCH_REQ(3) in arch/x86/include/asm/kvm_host.h (4.x to 6.x)


class InjectionError(LabError):
    kind = "injection"


@dataclass
class Patch:
    function: str
    address: int
    instruction: str
    original: str
    replacement: str


@dataclass
class Injection:
    name: str
    vendor: str
    function: str
    why: str
    # (TARGET, CALLER) for the kprobe module: TARGET returns at once when CALLER calls it,
    # or, with `mask`, runs with its third argument masked.
    kprobe: tuple[str, str] | None = None
    mask: int = 0
    only_when: int = 0  # with mask: only calls whose third argument has all these bits
    # the module's switched_only: TARGET(vcpu) is skipped only when the active guest_mmu's
    # root changed since that vCPU's last call
    switched_only: bool = False
    gdb: bool = True  # False: only the kprobe module puts it in (gdb or not)
    # Helpers `function` calls where newer kernels moved the code (looked in, in order, only
    # when `function` itself has none of it and does call them).
    moved_to: tuple[str, ...] = ()
    # Where kernels without `function` do the same work (looked in, in order, with the same
    # helpers): 5.10 has no nested_vmcb02_prepare_control.
    older: tuple[str, ...] = ()

    def locate(self, gdb: GdbSession) -> list[Patch]:
        if not self.gdb:
            raise InjectionError(f"{self.name} goes in by the kprobe module only (it changes "
                                 "an argument, which a code patch cannot)")
        function, insns = self._first_present(gdb)
        if self.name != "skip-nested-mmu-sync":
            return self._locate_calls(insns, "kvm_mmu_free_roots")
        patches = self._locate_request(gdb, insns, KVM_REQ_MMU_SYNC, function)
        for helper in self.moved_to:
            if patches:
                break
            if any(f"<{helper}>" in _text(i) for i in insns if _text(i).startswith("call")):
                patches = self._locate_request(gdb, disassemble(gdb, helper),
                                               KVM_REQ_MMU_SYNC, helper)
        if len(patches) != 1:
            where = " or ".join((function, *self.moved_to))
            raise InjectionError(f"{self.name}: expected one KVM_REQ_MMU_SYNC request in "
                                 f"{where}, found {len(patches)}")
        return patches

    def _first_present(self, gdb: GdbSession) -> tuple[str, list[dict[str, Any]]]:
        """`function`, or the first of `older` this kernel has, disassembled."""
        if not self.older:
            return self.function, disassemble(gdb, self.function)
        candidates = (self.function, *self.older)
        for f in candidates:
            try:
                return f, disassemble(gdb, f)
            except InjectionError:
                log.info(f"{self.name}: no {f} in this kernel")
        raise InjectionError(f"{self.name}: none of {', '.join(candidates)} is in this kernel: "
                             "the code path this injection patches is not there (never "
                             "patched blind)")

    def _locate_request(self, gdb: GdbSession, insns: list[dict[str, Any]],
                        request: int, function: str) -> list[Patch]:
        # kvm_make_request() is `lock orb $BIT, OFFSET(%reg)` on vcpu->requests (the kernel
        # rewrites LOCK to DS on a 1-CPU guest: match both, decode rather than pattern-match).
        ok, base = gdb.evaluate(["(unsigned long)&((struct kvm_vcpu *)0)->requests"])[0]
        if not ok:
            raise InjectionError(f"{self.name}: cannot read struct kvm_vcpu: {base}")
        disp = int(base, 0) + request // 8
        bit = 1 << (request % 8)
        rx = re.compile(rf"^(?:lock |ds )?orb\s+\$0x{bit:x},0x{disp:x}\(%r\w+\)$")
        found = [i for i in insns if rx.match(_text(i))]
        patches = []
        for i in found:
            raw = i.get("opcodes", "").replace(" ", "")
            if len(raw) != 10 or raw[:2] not in ("f0", "3e"):
                raise InjectionError(f"{self.name}: unexpected encoding {raw} for {_text(i)}")
            patches.append(Patch(function, int(i["address"], 16), _text(i), raw, NOP5))
        return patches

    def _locate_calls(self, insns: list[dict[str, Any]], callee: str) -> list[Patch]:
        patches = []
        for i in insns:
            t = _text(i)
            raw = i.get("opcodes", "").replace(" ", "")
            if t.startswith("call") and f"<{callee}>" in t and raw.startswith("e8") \
                    and len(raw) == 10:
                patches.append(Patch(self.function, int(i["address"], 16), t, raw, NOP5))
        if not patches:
            raise InjectionError(f"{self.name}: no call to {callee} in {self.function}")
        return patches


INJECTIONS: dict[str, Injection] = {
    i.name: i for i in (
        Injection(
            "skip-nested-mmu-sync", "amd", "nested_vmcb02_prepare_control",
            "On nested VMRUN, L0 must resync guest_mmu (its shadow of L1's NPT) with whatever "
            "L1 changed since; 6.1 ignores L1's TLB_CONTROL and relies on this "
            "KVM_REQ_MMU_SYNC alone. Without it, leaves L0 has let go unsync keep their old "
            "translation: the SVM twin of the seed's INVEPT bug. From 6.12 the request is in "
            "nested_svm_transition_tlb_flush, which #VMEXIT calls too: both lose it.",
            # 5.10 requests the sync in __kvm_mmu_new_pgd, which kvm_init_shadow_npt_mmu
            # calls at every nested VMRUN; it also serves shadow-paged L2s' CR3 loads
            # (nested_svm_load_cr3 without NPT), so on 5.10 those lose their sync too.
            moved_to=("nested_svm_transition_tlb_flush", "__kvm_mmu_new_pgd"),
            older=("kvm_init_shadow_npt_mmu",)),
        Injection(
            "skip-invept-free-roots", "intel", "handle_invept",
            "The seed's bug: handle_invept() decides which guest_mmu roots L1's INVEPT "
            "invalidates and then does not free them, so L2 keeps L1's old EPT translations.",
            kprobe=("kvm_mmu_free_roots", "handle_invept")),
        Injection(
            "free-current-only", "intel", "handle_invept",
            "A subtler bug than the seed's: handle_invept() frees the current guest_mmu root "
            "an INVEPT names but forgets the cached (previous) ones, so only an L2 that "
            "switches back to a cached EPTP sees stale translations.",
            kprobe=("kvm_mmu_free_roots", "handle_invept"), mask=1, gdb=False),
        Injection(
            "global-as-single", "intel", "handle_invept",
            "A global (all-context) INVEPT handled like a single-context one of the running "
            "EPTP: handle_invept frees the current guest_mmu root only, and every cached root "
            "survives a global INVEPT; single-context INVEPTs stay right. Only an L2 that "
            "switches to a cached EPTP after a global INVEPT sees stale translations.",
            # KVM_MMU_ROOT_CURRENT | the three KVM_MMU_ROOT_PREVIOUS bits: only a global
            # INVEPT's KVM_MMU_ROOTS_ALL has all four (a single-context one names one EPTP,
            # which is in one slot at most).
            kprobe=("kvm_mmu_free_roots", "handle_invept"), mask=1, only_when=0xF, gdb=False),
        Injection(
            "forget-cached-ncr3", "amd", "kvm_mmu_sync_roots",
            "SVM's counterpart of forgetting cached roots: the guest_mmu sync that nested VMRUN "
            "requests is skipped when L1 switched to another nested CR3 whose root KVM had "
            "cached, and done when the nested CR3 stayed. Only an L2 that runs on a cached "
            "root after L1 changed that root's NPT sees stale translations.",
            # Called from vcpu_enter_guest (inlined into vcpu_run on some builds): any caller;
            # the module looks at guest_mmu itself.
            kprobe=("kvm_mmu_sync_roots", ""), switched_only=True, gdb=False),
    )
}
ALIASES = {"invalidate-too-little": {"amd": "skip-nested-mmu-sync",
                                     "intel": "skip-invept-free-roots"}}
NAMES = (*ALIASES, *INJECTIONS)


def resolve(name: str, vendor: str) -> Injection:
    real = ALIASES.get(name, {}).get(vendor, name)
    inj = INJECTIONS.get(real)
    if inj is None:
        raise InjectionError(f"unknown injection {name!r}")
    if inj.vendor != vendor:
        raise InjectionError(f"injection {real} is for {inj.vendor} hosts, this lab is {vendor}")
    return inj


def apply(gdb: GdbSession, inj: Injection) -> list[Patch]:
    """Patch the running L0 (target stopped). Returns what was changed."""
    patches = inj.locate(gdb)
    for p in patches:
        gdb.cmd(f"-data-write-memory-bytes {p.address:#x} {p.replacement}")
        r, _ = gdb.cmd(f"-data-read-memory-bytes {p.address:#x} {len(p.replacement) // 2}")
        now = r["payload"]["memory"][0]["contents"]
        if now != p.replacement:
            raise InjectionError(f"{inj.name}: write to {p.address:#x} did not stick ({now})")
    return patches


def restore(gdb: GdbSession, patches: list[Patch]) -> None:
    for p in patches:
        gdb.cmd(f"-data-write-memory-bytes {p.address:#x} {p.original}")


def describe(inj: Injection, patches: list[Patch]) -> dict[str, Any]:
    return {"name": inj.name, "vendor": inj.vendor, "function": inj.function, "why": inj.why,
            "mechanism": "gdb code patch", "patches": [asdict(p) for p in patches]}


MODULE = "lab_inject"


def load_module(ssh: SSHSession, ko: Path, inj: Injection) -> dict[str, Any]:
    """Copy the kprobe module into L0 and load it for `inj`; what happened, for the report."""
    assert inj.kprobe is not None
    target, caller = inj.kprobe
    remote = f"/tmp/{MODULE}.ko"
    ssh.put(ko, remote)
    r = ssh.run(f"insmod {remote} target={target} caller={caller} mask={inj.mask} "
                f"only_when={inj.only_when} switched_only={int(inj.switched_only)} && "
                f"dmesg | grep '{MODULE}:' | tail -1", timeout=120)
    if r.exit_status != 0:
        raise InjectionError(f"{inj.name}: insmod {MODULE} failed: "
                             f"{(r.stderr or r.stdout).strip()[-300:]}")
    return {"name": inj.name, "vendor": inj.vendor, "function": inj.function, "why": inj.why,
            "mechanism": "kprobe module", "module": str(ko), "target": target,
            "caller": caller, "mask": inj.mask, "only_when": inj.only_when,
            "switched_only": inj.switched_only,
            "loaded": r.stdout.strip(), "patches": []}


def by_gdb(gdb: GdbSession, name: str, vendor: str) -> dict[str, Any]:
    """Patch L0's KVM through gdb (L0 stopped); the report's `injection`."""
    inj = resolve(name, vendor)
    desc = describe(inj, apply(gdb, inj))
    log.info(f"injected {inj.name}: " + ", ".join(
        f"{p['instruction']} at {p['address']:#x} ({p['function']})" for p in desc["patches"]))
    return desc


def by_module(ssh: SSHSession, name: str, vendor: str, kernel: Any,
              cache: Path) -> dict[str, Any]:
    """No gdbstub: the bug goes in as a kprobe module built for L0's kernel (`kernel`, a
    lab.kernel.KernelSource); the report's `injection`."""
    from lab import kmod

    inj = resolve(name, vendor)
    t = time.monotonic()
    ko = kmod.build(MODULE, kernel.fetch_build_dir(cache), cache)
    desc = load_module(ssh, ko, inj)
    desc["seconds"] = round(time.monotonic() - t, 3)
    log.info(f"injected {inj.name}: {desc['loaded']}")
    return desc


def module_skipped(ssh: SSHSession) -> int | None:
    """How many calls the kprobe module has skipped so far (None if unknown)."""
    r = ssh.run(f"cat /sys/module/{MODULE}/parameters/skipped", timeout=30)
    try:
        return int(r.stdout.strip())
    except ValueError:
        return None


def disassemble(gdb: GdbSession, function: str) -> list[dict[str, Any]]:
    from lab.gdb import GdbError

    try:
        r, _ = gdb.cmd(f"-data-disassemble -a {function} -- 2", timeout=120)
    except GdbError as e:
        if "No symbol" not in str(e):
            raise
        # A kernel whose code is shaped otherwise (5.10 has no nested_vmcb02_prepare_control):
        # the injection does not know where its instructions are there, and says so.
        raise InjectionError(f"{function} is not in this kernel: the code path this "
                             "injection patches is not there (never patched blind)") from None
    insns: list[dict[str, Any]] = r["payload"].get("asm_insns", [])
    if not insns:
        raise InjectionError(f"cannot disassemble {function}")
    return insns


def _text(insn: dict[str, Any]) -> str:
    return re.sub(r"\s+", " ", str(insn.get("inst", ""))).strip()
