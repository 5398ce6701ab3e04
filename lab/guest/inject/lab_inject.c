// SPDX-License-Identifier: GPL-2.0-only
/*
 * lab_inject: make L0 invalidate too little without a debugger, for L0s that have no gdbstub
 * (Bochs, real machines). A kprobe on TARGET makes it return at once when it is called from
 * CALLER: `target=kvm_mmu_free_roots caller=handle_invept` is the seed's bug (handle_invept
 * decides which guest_mmu roots L1's INVEPT names, and then they are not freed). With `mask`,
 * TARGET runs, but its third argument (kvm_mmu_free_roots' roots_to_free, in %rdx) keeps only
 * the bits of `mask`: `mask=1` frees the current root alone and forgets the cached ones. With
 * `only_when` too, only calls whose third argument has every bit of `only_when` are masked:
 * `mask=1 only_when=0xf` touches the calls that free the current and all three cached roots
 * (KVM_MMU_ROOTS_ALL: a global INVEPT) and leaves single-context ones alone.
 *
 * Returning at once means resuming at a function that only returns (what the kernel's own
 * override_function_with_return() does for error injection): the stack is untouched, so it
 * works for int3 and ftrace-based kprobes alike, and the target's return address leads back
 * into its caller. TARGET must return void (its caller expects nothing in %rax).
 *
 * With `switched_only` (SVM's counterpart of forgetting a cached root), TARGET is
 * kvm_mmu_sync_roots(vcpu) and returns at once only when L2's guest_mmu is the active MMU and
 * its current root is not the one this vCPU synced last time: the nested CR3 was switched, to
 * a root KVM had cached (a fresh root has nothing to sync). An empty CALLER means any caller.
 *
 * /sys/module/lab_inject/parameters/skipped counts the calls skipped so far.
 */
#include <linux/atomic.h>
#include <linux/kallsyms.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/kvm_host.h>
#include <linux/module.h>
#include <linux/version.h>

static char target[KSYM_NAME_LEN] = "kvm_mmu_free_roots";
module_param_string(target, target, sizeof(target), 0444);
MODULE_PARM_DESC(target, "the function to make return at once");
static char caller[KSYM_NAME_LEN] = "handle_invept";
module_param_string(caller, caller, sizeof(caller), 0444);
MODULE_PARM_DESC(caller, "only when called from this function");

static unsigned long mask;
module_param(mask, ulong, 0444);
MODULE_PARM_DESC(mask, "0: return at once; else: and TARGET's third argument with this");

static unsigned long only_when;
module_param(only_when, ulong, 0444);
MODULE_PARM_DESC(only_when, "with mask: mask only calls whose third argument has all these bits");

static bool switched_only;
module_param(switched_only, bool, 0444);
MODULE_PARM_DESC(switched_only, "TARGET(vcpu) returns at once only when the active guest_mmu's "
		 "root changed since this vCPU's last call");

static atomic_long_t skipped_calls;

/* The root each vCPU's guest_mmu had at its last call (a few vCPUs at a time here). */
static struct { struct kvm_vcpu *vcpu; u64 pgd; } seen[16];

static bool guest_root_switched(struct kvm_vcpu *vcpu)
{
	struct kvm_mmu *mmu = vcpu->arch.mmu;
	int i, slot = -1;
	bool changed = false;
	u64 pgd;

	if (mmu != &vcpu->arch.guest_mmu)
		return false;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 18, 0)
	pgd = mmu->root.pgd;
#else
	pgd = mmu->root_pgd;
#endif
	for (i = 0; i < ARRAY_SIZE(seen); i++) {
		if (seen[i].vcpu == vcpu) {
			slot = i;
			changed = seen[i].pgd != pgd;
			break;
		}
		if (!seen[i].vcpu && slot < 0)
			slot = i;
	}
	if (slot < 0)
		slot = 0;
	seen[slot].vcpu = vcpu;
	seen[slot].pgd = pgd;
	return changed;
}
static int get_skipped(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%ld\n", atomic_long_read(&skipped_calls));
}
static const struct kernel_param_ops skipped_ops = { .get = get_skipped };
module_param_cb(skipped, &skipped_ops, NULL, 0444);

static unsigned long caller_start, caller_end;

static noinline void lab_just_return(void)
{
	asm volatile("");
}

static int pre(struct kprobe *p, struct pt_regs *regs)
{
	/* At the target's first instruction the stack's top is its return address. */
	unsigned long ret = *(unsigned long *)kernel_stack_pointer(regs);

	if (caller_end && (ret < caller_start || ret >= caller_end))
		return 0;
	if (switched_only && !guest_root_switched((struct kvm_vcpu *)regs->di))
		return 0;
	if (mask) {
		if ((regs->dx & only_when) != only_when)
			return 0;
		/* Restored into %rdx when the kprobe (int3 or ftrace) returns to the target. */
		if (regs->dx & ~mask)
			atomic_long_inc(&skipped_calls);
		regs->dx &= mask;
		return 0;
	}
	atomic_long_inc(&skipped_calls);
	instruction_pointer_set(regs, (unsigned long)lab_just_return);
	return 1; /* regs->ip changed: do not run the probed instruction */
}

static struct kprobe kp = { .pre_handler = pre };

/* Where CALLER is: a kprobe resolves its name, sprint_symbol() says its size. */
static int locate_caller(void)
{
	struct kprobe probe = { .symbol_name = caller };
	char buf[KSYM_SYMBOL_LEN], *slash;
	unsigned long size;
	int r = register_kprobe(&probe);

	if (r)
		return r;
	caller_start = (unsigned long)probe.addr;
	unregister_kprobe(&probe);
	sprint_symbol(buf, caller_start);
	slash = strchr(buf, '/');
	if (!slash || kstrtoul(strsep(&slash, " ") + 1, 16, &size))
		return -EINVAL;
	/* buf is now NAME+0x0 with the size after the slash */
	caller_end = caller_start + size;
	return 0;
}

static int __init lab_inject_init(void)
{
	int r = caller[0] ? locate_caller() : 0;

	if (r) {
		pr_err("lab_inject: cannot find caller %s: %d\n", caller, r);
		return r;
	}
	kp.symbol_name = target;
	r = register_kprobe(&kp);
	if (r) {
		pr_err("lab_inject: cannot probe %s: %d\n", target, r);
		return r;
	}
	if (mask)
		pr_info("lab_inject: %s keeps only %#lx of its 3rd argument (when it has %#lx) when "
			"called from %s (%#lx-%#lx)\n", target, mask, only_when, caller, caller_start,
			caller_end);
	else
		pr_info("lab_inject: %s returns at once when called from %s (%#lx-%#lx)%s\n",
			target, caller[0] ? caller : "anywhere", caller_start, caller_end,
			switched_only ? " and guest_mmu's root switched since the vCPU's last call" :
			"");
	return 0;
}

static void __exit lab_inject_exit(void)
{
	unregister_kprobe(&kp);
	pr_info("lab_inject: %s restored after %ld skipped calls\n", target,
		atomic_long_read(&skipped_calls));
}

module_init(lab_inject_init);
module_exit(lab_inject_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvm-nested-lab: re-create 'L0 invalidates too little' by a kprobe");
