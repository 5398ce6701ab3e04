/* vmx-ept-test: does L0 invalidate enough when a bare-metal L1 changes its EPT and INVEPTs?
 *
 * The VMX twin of svm-npt-test, and the test for the seed's bug ("KVM: nVMX: Invalidate all
 * EPTP contexts when emulating INVEPT for L1"). It runs in L0's userspace as a KVM VMM whose
 * guest is a tiny bare-metal L1 hypervisor: L1 turns VMX on, builds a VMCS for its L2 with EPT
 * and unrestricted guest, and follows a script the VMM writes into its memory (store a value,
 * INVEPT single-context or global, switch the EPTP, enter L2 and record what L2 saw). L0's KVM
 * shadows L1's EPT in guest_mmu; after every change and INVEPT, L2 must see the change.
 *
 * Beyond the seed's two EPTPs: four EPTPs in rotation (more than the three roots KVM caches),
 * a 2M leaf split and merged, a non-leaf entry repointed at a table page rewritten while out
 * of the tree, L2 paging of its own over the EPT, and INVVPID (individual-address,
 * single-context, all-context) for an L2 that pages with VPID on and EPT off, EPT A/D bits
 * set again after an INVEPT, and an L1 with two vCPUs taking turns on one EPTP.
 *
 * The VMCS control values are computed here from the VMX capability MSRs that L0's KVM reports
 * for the vCPU, so that L1 only has to vmwrite a table.
 *
 * Output: TAP, one line per case (SKIP with the reason where VMX or a feature is missing).
 * Exit 0 all passed or skipped, 1 a case failed, 2 setup failed.
 * Usage: vmx-ept-test [-n ITERATIONS] [-x] [CASE...]
 *   -x  negative control: L1 leaves out its INVEPTs (and INVVPIDs). L0 may then keep stale
 *       translations, and the cases should fail: this shows they can see "too little
 *       invalidation" at all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "baremetal.h"
#include "labtest.h"

/* L1 physical memory beyond what baremetal.h lays out */
#define VMXON_PAGE 0x5000
#define VMCS_PAGE  0x6000
#define EPT_A      0x8000          /* PML4, PDPT, PD, PT at +0, +0x1000, +0x2000, +0x3000 */
#define EPT_B      0xC000
#define EPT_C      ROOT_C
#define EPT_D      ROOT_D
#define PTRS       0x30000         /* [0] vmxon PA, [8] vmcs PA, [16..] saved rsi/rdi, launched */
#define INVEPT_DESC 0x30100        /* 16 bytes: EPTP, reserved */
#define INVVPID_DESC 0x30110       /* 16 bytes: VPID, linear address */
#define TABLE      0x31000         /* VMCS (field, value) pairs, ended by field ~0 */

#define EPT_LEAF(root) ((root) + 0x3000 + 16 * 8)
#define EPT_RWX    7ull
#define EPT_WB     (6ull << 3)
#define EPTP(root) ((root) | (3ull << 3) | 6ull)   /* 4-level walk, write-back */

#define EXIT_HLT 12
#define EXIT_EPT_VIOLATION 48

enum { OP_ENTER = 2, OP_INVEPT = 3, OP_VMWRITE = 4, OP_INVVPID = 5,
       OP_LOAD = 7 };       /* record the qword at a as a result (exit LOADED, value in rax) */
#define LOADED 0x10000      /* not a VM exit reason: what OP_LOAD records as `exit` */

/* L1: VMXON, VMCLEAR/VMPTRLD, vmwrite the table, then interpret its script (r13), recording
 * into its results (r14); its VMXON/VMCS pointers, descriptors and saved registers are at r15
 * (PTRS for vCPU 0), which L2's code never touches and VM exits leave as they were.
 * Failures of VMX instructions are recorded as exit_reason 0xfff000NN with the VM-instruction
 * error (or the step) in the low bits. */
extern const uint8_t l1_exited[];
__asm__(".pushsection .rodata\n"
        ".code64\n"
        "l1_start:\n"
        "  vmxon (%r15)\n"
        "  jbe 90f\n"
        "  vmclear 8(%r15)\n"
        "  jbe 91f\n"
        "  vmptrld 8(%r15)\n"
        "  jbe 92f\n"
        "  mov $0x31000, %rsi\n"
        "1: mov (%rsi), %rdx\n"
        "  cmp $-1, %rdx\n"
        "  je 2f\n"
        "  mov 8(%rsi), %rax\n"
        "  vmwrite %rax, %rdx\n"
        "  jbe 93f\n"
        "  add $16, %rsi\n"
        "  jmp 1b\n"
        "2: mov %r13, %rsi\n"
        "  mov %r14, %rdi\n"
        "3: mov (%rsi), %rax\n"
        "  test %rax, %rax\n"
        "  jz 99f\n"
        "  cmp $1, %rax\n"
        "  jne 4f\n"
        "  mov 8(%rsi), %rdx\n"         /* STORE */
        "  mov 16(%rsi), %rcx\n"
        "  mov %rcx, (%rdx)\n"
        "  jmp 8f\n"
        "4: cmp $3, %rax\n"
        "  jne 5f\n"
        "  mov 16(%rsi), %rcx\n"        /* INVEPT type a, EPTP b */
        "  mov %rcx, 0x100(%r15)\n"
        "  movq $0, 0x108(%r15)\n"
        "  mov 8(%rsi), %rdx\n"
        "  invept 0x100(%r15), %rdx\n"
        "  jbe 94f\n"
        "  jmp 8f\n"
        "5: cmp $5, %rax\n"
        "  jne 51f\n"
        "  mov 16(%rsi), %rcx\n"        /* INVVPID type a, VPID b, address c */
        "  mov %rcx, 0x110(%r15)\n"
        "  mov 24(%rsi), %rcx\n"
        "  mov %rcx, 0x118(%r15)\n"
        "  mov 8(%rsi), %rdx\n"
        "  invvpid 0x110(%r15), %rdx\n"
        "  jbe 96f\n"
        "  jmp 8f\n"
        "51: cmp $7, %rax\n"              /* LOAD: [a] into the results */
        "  jne 54f\n"
        "  mov 8(%rsi), %rdx\n"
        "  mov (%rdx), %rax\n"
        "  movq $0x10000, (%rdi)\n"
        "  mov %rax, 8(%rdi)\n"
        "  movq $0, 16(%rdi)\n"
        "  mov %rdx, 24(%rdi)\n"
        "  add $32, %rdi\n"
        "  jmp 8f\n"
        "54: cmp $9, %rax\n"              /* WAIT until [a] == b (or the VMM gives up) */
        "  jne 52f\n"
        "  mov 8(%rsi), %rdx\n"
        "  mov 16(%rsi), %rcx\n"
        "53: cmp %rcx, (%rdx)\n"
        "  je 8f\n"
        "  cmpq $0, 0x108080\n"
        "  jne 99f\n"
        "  pause\n"
        "  jmp 53b\n"
        "52: cmp $4, %rax\n"
        "  jne 6f\n"
        "  mov 8(%rsi), %rdx\n"         /* VMWRITE field a = b */
        "  mov 16(%rsi), %rax\n"
        "  vmwrite %rax, %rdx\n"
        "  jbe 93f\n"
        "  jmp 8f\n"
        "6: mov 8(%rsi), %rax\n"        /* ENTER L2 at rip a */
        "  mov $0x681e, %rdx\n"
        "  vmwrite %rax, %rdx\n"
        "  mov $0x6c14, %rdx\n"         /* HOST_RSP */
        "  vmwrite %rsp, %rdx\n"
        "  mov %rsi, 0x10(%r15)\n"
        "  mov %rdi, 0x18(%r15)\n"
        "  xor %eax, %eax\n"
        "  xor %ebx, %ebx\n"
        "  cmpq $0, 0x20(%r15)\n"
        "  jne 7f\n"
        "  vmlaunch\n"
        "  jmp 95f\n"                   /* only reached if the entry failed */
        "7: vmresume\n"
        "  jmp 95f\n"
        ".globl l1_exited\n"
        "l1_exited:\n"                  /* HOST_RIP: L2's eax/ebx are still in rax/rbx */
        "  mov 0x10(%r15), %rsi\n"
        "  mov 0x18(%r15), %rdi\n"
        "  movq $1, 0x20(%r15)\n"
        "  mov %rax, 8(%rdi)\n"
        "  mov %rbx, 16(%rdi)\n"
        "  mov $0x4402, %rdx\n"
        "  vmread %rdx, %rax\n"
        "  mov %rax, (%rdi)\n"
        "  mov $0x2400, %rdx\n"
        "  vmread %rdx, %rax\n"
        "  mov %rax, 24(%rdi)\n"
        "  add $32, %rdi\n"
        "8: add $32, %rsi\n"
        "  jmp 3b\n"
        "90: mov $0xfff00100, %rax\n jmp 98f\n"
        "91: mov $0xfff00200, %rax\n jmp 98f\n"
        "92: mov $0xfff00300, %rax\n jmp 98f\n"
        "93: mov %rdx, 0x28(%r15)\n mov $0xfff00400, %rax\n jmp 97f\n"
        "94: mov $0xfff00500, %rax\n jmp 97f\n"
        "95: mov 0x10(%r15), %rsi\n mov 0x18(%r15), %rdi\n mov $0xfff00600, %rax\n jmp 97f\n"
        "96: mov $0xfff00700, %rax\n"
        "97: mov $0x4400, %rdx\n"       /* add VM-instruction error when a VMCS is current */
        "  vmread %rdx, %rcx\n"
        "  or %rcx, %rax\n"
        "98: mov %rax, 0x30(%r15)\n"       /* fatal: stop the script */
        "99: hlt\n"
        "  jmp 99b\n"
        "l1_end:\n"
        ".code32\n"
        "l2r_start:\n"
        "  mov 0x10000, %eax\n"
        "  mov 0x10004, %ebx\n"
        "  hlt\n"
        "l2r_end:\n"
        "l2w_start:\n"
        "  mov 0x10000, %eax\n"
        "  mov 0x10004, %ebx\n"
        "  movl $0x5a5a5a5a, 0x10008\n"
        "  hlt\n"
        "l2w_end:\n"
        "l2v_start:\n"                  /* L2 with paging on: read V */
        "  mov 0x400000, %eax\n"
        "  mov 0x400004, %ebx\n"
        "  hlt\n"
        "l2v_end:\n"
        ".code64\n"
        ".popsection\n");

/* VMX capability MSRs of the vCPU, as L0's KVM reports them to L1 */
struct caps {
    uint64_t basic, pin, proc, exit, entry, proc2, ept_vpid, cr0_0, cr0_1, cr4_0, cr4_1;
};

static int kvm;
static struct caps caps;
static long iterations = 50;

static uint64_t leaf(int i, uint64_t perms) { return page(i) | EPT_WB | perms; }

static uint32_t adjust(uint32_t want, uint64_t msr)
{
    return (want | (uint32_t)msr) & (uint32_t)(msr >> 32);
}

static void table(struct vm *vm, uint64_t field, uint64_t value)
{
    put64(vm->mem + TABLE + vm->ntable * 16, field);
    put64(vm->mem + TABLE + vm->ntable * 16 + 8, value);
    vm->ntable++;
    put64(vm->mem + TABLE + vm->ntable * 16, ~0ull);
}

static int omit_invept;
static void invept(struct vm *vm, int type, uint64_t eptp)
{
    if (!omit_invept) op(vm, OP_INVEPT, type, eptp, 0);
}
static void enter(struct vm *vm, uint64_t rip) { op(vm, OP_ENTER, rip, 0, 0); }
static void set_eptp(struct vm *vm, uint64_t root) { op(vm, OP_VMWRITE, 0x201a, EPTP(root), 0); }

static void ept_build(uint8_t *mem, uint64_t root, int data_page)
{
    put64(mem + root, (root + 0x1000) | EPT_RWX);
    put64(mem + root + 0x1000, (root + 0x2000) | EPT_RWX);
    put64(mem + root + 0x2000, (root + 0x3000) | EPT_RWX);
    for (int i = 0; i < 512; i++)
        put64(mem + root + 0x3000 + i * 8, ((uint64_t)i << 12) | EPT_WB | EPT_RWX);
    put64(mem + EPT_LEAF(root), leaf(data_page, EPT_RWX));
}

static int get_msrs(int vcpu, const uint32_t *idx, uint64_t *out, int n)
{
    struct { struct kvm_msrs h; struct kvm_msr_entry e[16]; } m;
    memset(&m, 0, sizeof m);
    m.h.nmsrs = n;
    for (int i = 0; i < n; i++) m.e[i].index = idx[i];
    if (ioctl(vcpu, KVM_GET_MSRS, &m) != n) return -1;
    for (int i = 0; i < n; i++) out[i] = m.e[i].data;
    return 0;
}

/* What vmcs_table() computed that the cases adapt: L2's CR0/CR4 (paging off) and the
 * secondary controls with VPID instead of EPT and unrestricted guest. */
static uint64_t l2_cr0, l2_cr4;
static uint32_t proc2_vpid;

static void vmcs_table(struct vm *vm)
{
    int trueb = (caps.basic >> 55) & 1;
    (void)trueb;
    uint32_t pin = adjust(0, caps.pin);
    uint32_t proc = adjust((1u << 7) | (1u << 31), caps.proc);          /* HLT exiting, 2nd ctls */
    proc &= ~((1u << 15) | (1u << 16));                                 /* no CR3 load/store exits */
    proc = adjust(proc, caps.proc);
    uint32_t proc2 = adjust((1u << 1) | (1u << 7), caps.proc2);         /* EPT, unrestricted */
    uint32_t exitc = adjust(1u << 9, caps.exit);                        /* 64-bit host */
    uint32_t entry = adjust(0, caps.entry);                             /* 32-bit guest */
    uint64_t cr0 = ((0x31ull | (caps.cr0_0 & ~0x80000001ull)) & caps.cr0_1) | 1; /* PE, NE, no PG */
    uint64_t cr4 = caps.cr4_0 & caps.cr4_1;
    l2_cr0 = cr0;
    l2_cr4 = cr4;
    proc2_vpid = adjust(1u << 5, caps.proc2);                           /* VPID only */
    table(vm, 0x4000, pin);
    table(vm, 0x4002, proc);
    table(vm, 0x401e, proc2);
    table(vm, 0x400c, exitc);
    table(vm, 0x4012, entry);
    table(vm, 0x4004, 0);                  /* exception bitmap */
    table(vm, 0x400a, 0);                  /* CR3 target count */
    table(vm, 0x400e, 0); table(vm, 0x4010, 0); table(vm, 0x4014, 0); table(vm, 0x4016, 0);
    table(vm, 0x6000, 0); table(vm, 0x6002, 0);     /* CR0/CR4 guest-host masks */
    table(vm, 0x6004, cr0); table(vm, 0x6006, cr4); /* read shadows */
    table(vm, 0x201a, EPTP(EPT_A));
    table(vm, 0x2800, ~0ull);              /* VMCS link pointer */
    /* guest state: 32-bit flat protected mode, paging off (unrestricted guest) */
    for (int s = 0; s < 6; s++) {          /* ES CS SS DS FS GS */
        int code = s == 1;
        table(vm, 0x800 + 2 * s, code ? 0x08 : 0x10);
        table(vm, 0x4800 + 2 * s, 0xffffffff);
        table(vm, 0x4814 + 2 * s, code ? 0xc09b : 0xc093);
        table(vm, 0x6806 + 2 * s, 0);
    }
    table(vm, 0x80c, 0); table(vm, 0x480c, 0); table(vm, 0x4820, 0x10000); table(vm, 0x6812, 0);
    table(vm, 0x80e, 0); table(vm, 0x480e, 0x67); table(vm, 0x4822, 0x8b); table(vm, 0x6814, 0);
    table(vm, 0x4810, 0xffff); table(vm, 0x6816, 0);   /* GDTR */
    table(vm, 0x4812, 0xffff); table(vm, 0x6818, 0);   /* IDTR */
    table(vm, 0x6800, cr0); table(vm, 0x6802, 0); table(vm, 0x6804, cr4);
    table(vm, 0x681a, 0x400);              /* DR7 */
    table(vm, 0x681c, 0x7ff0);             /* RSP */
    table(vm, 0x6820, 0x2);                /* RFLAGS */
    table(vm, 0x4824, 0); table(vm, 0x4826, 0); table(vm, 0x482a, 0);
    table(vm, 0x6822, 0); table(vm, 0x6824, 0); table(vm, 0x6826, 0);
    table(vm, 0x2802, 0);                  /* debugctl */
    /* host state: L1 as it is */
    table(vm, 0xc00, 0x10); table(vm, 0xc02, 0x08); table(vm, 0xc04, 0x10); table(vm, 0xc06, 0x10);
    table(vm, 0xc08, 0x10); table(vm, 0xc0a, 0x10); table(vm, 0xc0c, 0x18);
    table(vm, 0x6c00, 0x80050033); table(vm, 0x6c02, L1_PML4); table(vm, 0x6c04, 0x2020);
    table(vm, 0x6c06, 0); table(vm, 0x6c08, 0); table(vm, 0x6c0a, 0); table(vm, 0x6c0c, 0);
    table(vm, 0x6c0e, 0); table(vm, 0x6c10, 0); table(vm, 0x6c12, 0); table(vm, 0x4c00, 0);
    table(vm, 0x6c16, L1_CODE + (uint64_t)(l1_exited - l1_start));   /* HOST_RIP */
}

static int vm_create(struct vm *vm)
{
    if (l1_memory(kvm, vm) < 0) return -1;
    uint8_t *m = vm->mem;
    ept_build(m, EPT_A, 0);
    ept_build(m, EPT_B, 1);
    ept_build(m, EPT_C, 2);
    ept_build(m, EPT_D, 3);
    put32(m + VMXON_PAGE, (uint32_t)caps.basic & 0x7fffffff);
    put32(m + VMCS_PAGE, (uint32_t)caps.basic & 0x7fffffff);
    put64(m + PTRS, VMXON_PAGE);
    put64(m + PTRS + 8, VMCS_PAGE);
    vmcs_table(vm);
    /* IA32_FEATURE_CONTROL: locked, VMXON allowed; L1 in long mode with PAE and CR4.VMXE */
    return l1_vcpu(kvm, vm, 0x3a, 0x5, 0x2020, 0x500, PTRS);
}

/* Run L1 to its end; a failed VMX instruction in L1 (either vCPU) is an error of the run. */
static int vm_go(struct vm *vm, char *err, size_t errlen)
{
    if (l1_go(vm, err, errlen) < 0)
        return -1;
    for (int cpu = 0; cpu < (vm->vcpu1 > 0 ? 2 : 1); cpu++) {
        const uint8_t *ptrs = vm->mem + (cpu ? CPU1_PTRS : PTRS);
        uint64_t fatal = get64(ptrs + 0x30);
        if (fatal) {
            snprintf(err, errlen, "L1's VMX instruction failed on vCPU %d: code %#llx "
                     "(field %#llx)", cpu, (unsigned long long)fatal,
                     (unsigned long long)get64(ptrs + 0x28));
            return -1;
        }
    }
    return 0;
}

/* One L2 run (exit reason, what L2 read, the faulting GPA), or with reason LOADED a qword L1
 * read, which must have every bit of `set_bits`. */
struct expect { uint64_t reason; uint32_t value; uint64_t gpa; uint64_t set_bits; };
#define READS(v) ((struct expect){ .reason = EXIT_HLT, .value = (v) })
#define FAULTS(g) ((struct expect){ .reason = EXIT_EPT_VIOLATION, .gpa = (g) })
#define LOADS_BITS(b) ((struct expect){ .reason = LOADED, .set_bits = (b) })

/* Compare one vCPU's L2 runs with expect[]: how many differ, the first, what L2 saw there. */
static int judge(struct result *r, struct expect *exp, int n, long *first, char *what,
                 size_t wlen)
{
    int bad = 0;
    for (int i = 0; i < n; i++) {
        uint32_t eax = (uint32_t)r[i].rax, ebx = (uint32_t)r[i].rbx;
        uint64_t reason = r[i].exit & 0xffff;
        if (exp[i].reason == LOADED) {
            if (r[i].exit == LOADED && (r[i].rax & exp[i].set_bits) == exp[i].set_bits)
                continue;
            if (!bad++) {
                *first = i;
                snprintf(what, wlen, "L1 read %#llx at %#llx, expected bits %#llx set",
                         (unsigned long long)r[i].rax, (unsigned long long)r[i].addr,
                         (unsigned long long)exp[i].set_bits);
            }
            continue;
        }
        int ok = reason == exp[i].reason && !(r[i].exit & (1ull << 31));
        if (ok && exp[i].reason == EXIT_HLT) ok = eax == exp[i].value && ebx == exp[i].value;
        if (ok && exp[i].reason == EXIT_EPT_VIOLATION) ok = r[i].addr == exp[i].gpa;
        if (ok)
            continue;
        if (!bad++) {
            *first = i;
            if (reason == EXIT_HLT && exp[i].reason == EXIT_EPT_VIOLATION)
                snprintf(what, wlen, "L2 got through an EPT entry L1 had made %s",
                         exp[i].gpa == X_GPA + 8 ? "read-only" : "not-present");
            else if (reason == EXIT_HLT)
                snprintf(what, wlen, "L2 read %#x:%#x, expected %#x", ebx, eax, exp[i].value);
            else
                snprintf(what, wlen, "exit reason %#llx (gpa %#llx), expected %llu",
                         (unsigned long long)r[i].exit, (unsigned long long)r[i].addr,
                         (unsigned long long)exp[i].reason);
        }
    }
    return bad;
}

/* Run the script(s) and report one TAP line; exp1/n1: vCPU 1's (NULL, 0 with one vCPU). */
static int finish2(struct vm *vm, const char *name, struct expect *exp, int n,
                   struct expect *exp1, int n1, double t0)
{
    char err[256] = "", what[200] = "", what1[200] = "";
    long first = -1, first1 = -1;
    if (vm_go(vm, err, sizeof err) < 0) return tap_result(name, n + n1, 0, 0, "", 0, err);
    double secs = now() - t0;
    int bad = judge(results(vm), exp, n, &first, what, sizeof what);
    int bad1 = exp1 ? judge(results1(vm), exp1, n1, &first1, what1, sizeof what1) : 0;
    if (!bad && bad1) {
        snprintf(what, sizeof what, "vCPU 1: %s", what1);
        first = first1;
    }
    return tap_result(name, n + n1, bad + bad1, first, what, secs, NULL);
}

static int finish(struct vm *vm, const char *name, struct expect *exp, int n, double t0)
{
    return finish2(vm, name, exp, n, NULL, 0, t0);
}

#define MAXEXP 20000
#define INVEPT_SINGLE 1
#define INVEPT_GLOBAL 2

#define BEGIN(name) struct vm vm; static struct expect exp[MAXEXP]; int n = 0; double t0 = now(); \
    if (vm_create(&vm) < 0) return tap_result(name, 0, 0, 0, "", 0, "vm_create");
#define END(name) int rc = finish(&vm, name, exp, n, t0); vm_destroy(&vm); return rc;

static int case_remap(const char *name, int type, int decoy)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = i % 4;
        if (decoy) store(&vm, EPT_LEAF(EPT_A), leaf(DECOY, EPT_RWX));
        store(&vm, EPT_LEAF(EPT_A), leaf(p, EPT_RWX));
        invept(&vm, type, EPTP(EPT_A));
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[p]);
    }
    END(name)
}

static int case_write_protect(const char *name)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int ro = (i % 2) == 0;
        store(&vm, EPT_LEAF(EPT_A), leaf(0, ro ? 5 : EPT_RWX));   /* R+X, no W */
        invept(&vm, INVEPT_SINGLE, EPTP(EPT_A));
        enter(&vm, L2_WRITE);
        exp[n++] = ro ? FAULTS(X_GPA + 8)
                      : READS(pattern[0]);
    }
    END(name)
}

static int case_unmap(const char *name)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (i / 2) % 4;
        store(&vm, EPT_LEAF(EPT_A), i % 2 == 0 ? 0 : leaf(p, EPT_RWX));
        invept(&vm, INVEPT_SINGLE, EPTP(EPT_A));
        enter(&vm, L2_READ);
        exp[n++] = i % 2 == 0 ? FAULTS(X_GPA)
                              : READS(pattern[p]);
    }
    END(name)
}

/* The seed's scenario: two EPTPs, so L0 keeps the inactive one among guest_mmu's previous
 * roots; change the tables behind the inactive EPTP, INVEPT single-context on it, switch. */
static int case_cached_root(const char *name, int type)
{
    BEGIN(name)
    int cur_a = 0, cur_b = 1;
    enter(&vm, L2_READ);
    exp[n++] = READS(pattern[cur_a]);
    set_eptp(&vm, EPT_B);
    enter(&vm, L2_READ);
    exp[n++] = READS(pattern[cur_b]);
    for (long i = 0; i < iterations && n + 2 < MAXEXP; i++) {
        cur_a = (cur_a + 1) % 4;                       /* running on B: change A */
        store(&vm, EPT_LEAF(EPT_A), leaf(cur_a, EPT_RWX));
        invept(&vm, type, EPTP(EPT_A));
        set_eptp(&vm, EPT_A);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[cur_a]);
        cur_b = (cur_b + 1) % 4;                       /* running on A: change B */
        store(&vm, EPT_LEAF(EPT_B), leaf(cur_b, EPT_RWX));
        invept(&vm, type, EPTP(EPT_B));
        set_eptp(&vm, EPT_B);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[cur_b]);
    }
    END(name)
}

/* global-cached-root: each iteration runs L2 on B first (so A is a cached root), changes A's
 * tables, INVEPTs all-context naming B (the operand of a global INVEPT is ignored), switches
 * to A. In cached-root-global the root a wrong global INVEPT spared is freed by the next
 * one anyway; here A stays cached across every global INVEPT until L2 reads through it. */
static int case_global_cached_root(const char *name)
{
    int cur_a = 0;
    BEGIN(name)
    enter(&vm, L2_READ);
    exp[n++] = READS(pattern[cur_a]);
    for (long i = 0; i < iterations && n + 2 < MAXEXP; i++) {
        set_eptp(&vm, EPT_B);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[1]);
        cur_a = (cur_a + 1) % 4;
        store(&vm, EPT_LEAF(EPT_A), leaf(cur_a, EPT_RWX));
        invept(&vm, INVEPT_GLOBAL, EPTP(EPT_B));
        set_eptp(&vm, EPT_A);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[cur_a]);
    }
    END(name)
}

/* cached-root-deep: four EPTPs in rotation, more than the three previous roots KVM keeps:
 * each step changes the leaf behind the EPTP L1 is about to switch to (the one used longest
 * ago), INVEPTs it single-context, switches to it. */
static int case_cached_root_deep(const char *name)
{
    static const uint64_t roots[4] = { EPT_A, EPT_B, EPT_C, EPT_D };
    int cur[4] = { 0, 1, 2, 3 };
    BEGIN(name)
    for (int r = 0; r < 4; r++) {              /* visit each EPTP once: all known to L0 */
        set_eptp(&vm, roots[r]);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[cur[r]]);
    }
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int r = (int)(i % 4);
        cur[r] = (cur[r] + 1) % 4;
        store(&vm, EPT_LEAF(roots[r]), leaf(cur[r], EPT_RWX));
        invept(&vm, INVEPT_SINGLE, EPTP(roots[r]));
        set_eptp(&vm, roots[r]);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[cur[r]]);
    }
    END(name)
}

/* large-page and huge-page-1g: split and merge. L2's first 2M (1G) alternates between one
 * EPT leaf in the directory (the PDPT, where L0 offers L1 1G pages) onto L1's own memory
 * (X reads LARGE_PATTERN) and the table below it (X reads data page p). */
static int split_merge(const char *name, uint64_t entry, uint64_t below)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)(i / 2) % 4;
        if (i % 2 == 0) {
            store(&vm, entry, (1ull << 7) | EPT_WB | EPT_RWX);             /* merge */
        } else {
            store(&vm, EPT_LEAF(EPT_A), leaf(p, EPT_RWX));
            store(&vm, entry, below | EPT_RWX);                             /* split */
        }
        invept(&vm, INVEPT_SINGLE, EPTP(EPT_A));
        enter(&vm, L2_READ);
        exp[n++] = READS(i % 2 == 0 ? LARGE_PATTERN : pattern[p]);
    }
    END(name)
}

static int case_large_page(const char *n) { return split_merge(n, EPT_A + 0x2000, EPT_A + 0x3000); }
static int case_huge_page_1g(const char *n) { return split_merge(n, EPT_A + 0x1000, EPT_A + 0x2000); }

/* repoint-table: the directory entry for L2's first 2M alternates between EPT_A's leaf table
 * and a second one (ALT_PT); the table out of the tree is rewritten before it comes back. */
static int case_repoint_table(const char *name)
{
    BEGIN(name)
    memcpy(vm.mem + ALT_PT, vm.mem + EPT_A + 0x3000, 0x1000);
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)(i % 4);
        uint64_t table = i % 2 ? ALT_PT : EPT_A + 0x3000;
        store(&vm, table + 16 * 8, leaf(p, EPT_RWX));          /* rewritten while unlinked */
        store(&vm, EPT_A + 0x2000, table | EPT_RWX);
        invept(&vm, INVEPT_SINGLE, EPTP(EPT_A));
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[p]);
    }
    END(name)
}

/* L2's guest state for paging of its own (32-bit, PSE): appended to the VMCS table, so these
 * vmwrites win over the table's paging-off ones. */
static void l2_pages(struct vm *vm, uint64_t v_target)
{
    l2_paging(vm->mem, v_target);
    table(vm, 0x6800, l2_cr0 | 0x80000001);    /* GUEST_CR0: PG PE */
    table(vm, 0x6802, L2_PGD);                 /* GUEST_CR3 */
    table(vm, 0x6804, l2_cr4 | 0x10);          /* GUEST_CR4: PSE */
}

/* l2-paging: L2 pages over the EPT and reads V. Even runs: L2's PTE maps V to GPA X, whose
 * EPT leaf L1 repoints (INVEPT single-context); odd runs: L2's PTE maps V straight to a data
 * page, and L1 invalidates L2's linear mappings with INVEPT too (it flushes combined ones). */
static int case_l2_paging(const char *name)
{
    BEGIN(name)
    l2_pages(&vm, X_GPA);
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)(i / 2) % 4, q = (p + 2) % 4;
        if (i % 2 == 0) {
            store(&vm, L2_PTE, X_GPA | 7);
            store(&vm, EPT_LEAF(EPT_A), leaf(p, EPT_RWX));
        } else {
            store(&vm, L2_PTE, page(q) | 7);
        }
        invept(&vm, INVEPT_SINGLE, EPTP(EPT_A));
        enter(&vm, L2_READV);
        exp[n++] = READS(pattern[i % 2 == 0 ? p : q]);
    }
    END(name)
}

/* invvpid-*: EPT off, VPID 1 on: L2's own page tables live in L1's physical memory. L1
 * repoints V's PTE and invalidates with INVVPID of the given type (0 one address, 1 the
 * context, 2 all contexts); L2 must read the new page. L0 runs L2 under VPID 1's translations
 * as it keeps them (its vpid02), so a missed INVVPID shows as a stale read. */
static int case_invvpid(const char *name, int type)
{
    BEGIN(name)
    table(&vm, 0x401e, proc2_vpid);            /* secondary controls: VPID, no EPT */
    table(&vm, 0x0000, 1);                     /* VIRTUAL_PROCESSOR_ID */
    l2_pages(&vm, page(0));
    enter(&vm, L2_READV);
    exp[n++] = READS(pattern[0]);
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)((i + 1) % 4);
        store(&vm, L2_PTE, page(p) | 7);
        if (!omit_invept) op(&vm, OP_INVVPID, type, 1, V_GVA);   /* -x: left out too */
        enter(&vm, L2_READV);
        exp[n++] = READS(pattern[p]);
    }
    END(name)
}

/* two-vcpus: L1 has two vCPUs on one EPTP. In turns: vCPU 0 repoints X's leaf, INVEPTs and
 * hands over; vCPU 1 INVEPTs (INVEPT is per logical processor: an L1 flushes every CPU, as
 * KVM's kvm_flush_remote_tlbs does) and runs L2, which must read the new page; then vCPU 0
 * runs L2 too. Shadow pages are the VM's, guest_mmu roots each vCPU's: a change made while
 * one vCPU ran must reach the other's. */
static int case_two_vcpus(const char *name)
{
    static struct expect exp1[MAXEXP];
    int n1 = 0;
    BEGIN(name)
    uint8_t *m = vm.mem;
    put32(m + CPU1_PAGE_A, (uint32_t)caps.basic & 0x7fffffff);   /* vCPU 1's VMXON region */
    put32(m + CPU1_PAGE_B, (uint32_t)caps.basic & 0x7fffffff);   /* and VMCS */
    put64(m + CPU1_PTRS, CPU1_PAGE_A);
    put64(m + CPU1_PTRS + 8, CPU1_PAGE_B);
    if (l1_cpu(kvm, &vm, 1, 0x3a, 0x5, 0x2020, 0x500, CPU1_PTRS) < 0) {
        vm_destroy(&vm);
        return tap_result(name, 0, 0, 0, "", 0, "a second vCPU");
    }
    enter(&vm, L2_READ);                                    /* both vCPUs have a root */
    exp[n++] = READS(pattern[0]);
    op_on(&vm, 1, OP_ENTER, L2_READ, 0, 0);
    exp1[n1++] = READS(pattern[0]);
    op_on(&vm, 1, OP_STORE, SYNC_ACK, 1, 0);
    op(&vm, OP_WAIT, SYNC_ACK, 1, 0);
    for (long i = 1; i <= iterations && n1 < MAXEXP; i++) {
        int p = (int)(i % 4);
        store(&vm, EPT_LEAF(EPT_A), leaf(p, EPT_RWX));
        invept(&vm, INVEPT_SINGLE, EPTP(EPT_A));
        store(&vm, SYNC_GEN, (uint64_t)i + 1);
        op(&vm, OP_WAIT, SYNC_ACK, (uint64_t)i + 1, 0);
        enter(&vm, L2_READ);
        exp[n++] = READS(pattern[p]);
        op_on(&vm, 1, OP_WAIT, SYNC_GEN, (uint64_t)i + 1, 0);
        if (!omit_invept) op_on(&vm, 1, OP_INVEPT, INVEPT_SINGLE, EPTP(EPT_A), 0);
        op_on(&vm, 1, OP_ENTER, L2_READ, 0, 0);
        exp1[n1++] = READS(pattern[p]);
        op_on(&vm, 1, OP_STORE, SYNC_ACK, (uint64_t)i + 1, 0);
    }
    int rc = finish2(&vm, name, exp, n, exp1, n1, t0);
    vm_destroy(&vm);
    return rc;
}

/* ept-dirty-bit: EPT A/D on. L1 rewrites X's leaf with A and D clear and INVEPTs; L2 reads
 * and writes X's page; L1 reads the leaf back: the CPU (here L0's KVM, which shadows L1's EPT
 * and sets L1's A/D bits as it walks it) must have set A and D again. A shadow entry L0 kept
 * from before lets L2 write without a walk, and the bits stay clear. */
static int case_ept_dirty_bit(const char *name)
{
    BEGIN(name)
    uint64_t eptp = EPTP(EPT_A) | (1ull << 6);            /* accessed and dirty flags */
    table(&vm, 0x201a, eptp);
    for (long i = 0; i < iterations && n + 1 < MAXEXP; i++) {
        int p = (int)(i % 4);
        store(&vm, EPT_LEAF(EPT_A), leaf(p, EPT_RWX));      /* A (bit 8), D (bit 9) clear */
        invept(&vm, INVEPT_SINGLE, eptp);
        enter(&vm, L2_WRITE);
        exp[n++] = READS(pattern[p]);
        op(&vm, OP_LOAD, EPT_LEAF(EPT_A), 0, 0);
        exp[n++] = LOADS_BITS((1ull << 8) | (1ull << 9));
    }
    END(name)
}

static int remap_single(const char *n) { return case_remap(n, INVEPT_SINGLE, 0); }
static int remap_global(const char *n) { return case_remap(n, INVEPT_GLOBAL, 0); }
static int remap_twice(const char *n) { return case_remap(n, INVEPT_SINGLE, 1); }
static int cached_single(const char *n) { return case_cached_root(n, INVEPT_SINGLE); }
static int cached_global(const char *n) { return case_cached_root(n, INVEPT_GLOBAL); }
static int invvpid_addr(const char *n) { return case_invvpid(n, 0); }
static int invvpid_single(const char *n) { return case_invvpid(n, 1); }
static int invvpid_all(const char *n) { return case_invvpid(n, 2); }

struct tcase { const char *name; int (*fn)(const char *); int needs; };
#define NEEDS_SINGLE 1
#define NEEDS_GLOBAL 2
#define NEEDS_2M 3
#define NEEDS_INVVPID_ADDR 4           /* INVVPID types 0..2: bits 40..42 of IA32_VMX_EPT_VPID_CAP */
#define NEEDS_INVVPID_SINGLE 5
#define NEEDS_INVVPID_ALL 6
#define NEEDS_AD 7                     /* EPT accessed/dirty flags: bit 21 of the same MSR */
#define NEEDS_1G 8                     /* 1G EPT pages: bit 17 */
static const struct tcase cases[] = {
    { "vmx/remap-invept-single", remap_single, NEEDS_SINGLE },
    { "vmx/remap-invept-global", remap_global, NEEDS_GLOBAL },
    { "vmx/remap-twice", remap_twice, NEEDS_SINGLE },
    { "vmx/write-protect", case_write_protect, NEEDS_SINGLE },
    { "vmx/unmap", case_unmap, NEEDS_SINGLE },
    { "vmx/cached-root-single", cached_single, NEEDS_SINGLE },
    { "vmx/cached-root-global", cached_global, NEEDS_GLOBAL },
    { "vmx/global-cached-root", case_global_cached_root, NEEDS_GLOBAL },
    { "vmx/cached-root-deep", case_cached_root_deep, NEEDS_SINGLE },
    { "vmx/large-page", case_large_page, NEEDS_2M },
    { "vmx/huge-page-1g", case_huge_page_1g, NEEDS_1G },
    { "vmx/repoint-table", case_repoint_table, NEEDS_SINGLE },
    { "vmx/l2-paging", case_l2_paging, NEEDS_SINGLE },
    { "vmx/invvpid-address", invvpid_addr, NEEDS_INVVPID_ADDR },
    { "vmx/invvpid-single", invvpid_single, NEEDS_INVVPID_SINGLE },
    { "vmx/invvpid-all", invvpid_all, NEEDS_INVVPID_ALL },
    { "vmx/two-vcpus", case_two_vcpus, NEEDS_SINGLE },
    { "vmx/ept-dirty-bit", case_ept_dirty_bit, NEEDS_AD },
};
#define NCASES (int)(sizeof(cases) / sizeof(cases[0]))

/* Read the vCPU's VMX capabilities; "" when usable, else why not. */
static const char *probe_caps(void)
{
    static char why[200];
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) return "KVM_CREATE_VM failed";
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 128 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 128;
    ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid);
    ioctl(vcpu, KVM_SET_CPUID2, cpuid);
    free(cpuid);
    const uint32_t idx[] = { 0x480, 0x481, 0x482, 0x483, 0x484, 0x48b, 0x48c, 0x486, 0x487,
                             0x488, 0x489, 0x48d, 0x48e, 0x48f, 0x490 };
    uint64_t v[15];
    int rc = get_msrs(vcpu, idx, v, 15);
    close(vcpu);
    close(vm);
    if (rc < 0) return "L0's KVM does not expose VMX to its guests (kvm_intel nested=0?)";
    caps = (struct caps){ v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10] };
    if ((caps.basic >> 55) & 1) {           /* TRUE controls allow clearing default-1 bits */
        caps.pin = v[11]; caps.proc = v[12]; caps.exit = v[13]; caps.entry = v[14];
    }
    uint32_t p2 = (uint32_t)(caps.proc2 >> 32);
    if (!((caps.proc >> 63) & 1)) return "no secondary processor-based controls";
    if (!(p2 & (1u << 1))) return "L0 offers no EPT to L1 (kvm_intel ept=0?)";
    if (!(p2 & (1u << 7))) return "L0 offers no unrestricted guest to L1";
    if (!((caps.ept_vpid >> 20) & 1)) return "no INVEPT";
    if (!((caps.ept_vpid >> 14) & 1) || !((caps.ept_vpid >> 6) & 1))
        return "no write-back 4-level EPT";
    why[0] = 0;
    return why;
}

static const char *case_name(int c) { return cases[c].name; }
static int run_case(int c) { return cases[c].fn(cases[c].name); }

static const char *prepare(void)
{
    if (!cpu_has("vmx"))
        return "this CPU has no VMX (an AMD/SVM host runs svm-npt-test)";
    if ((kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0) {
        printf("Bail out! /dev/kvm: %s\n", strerror(errno));
        return LABTEST_BAIL;
    }
    const char *why = probe_caps();
    return *why ? why : NULL;
}

/* The INVEPT type a case needs, as L0 offers it to L1. */
static const char *skip_case(int c)
{
    int single = (caps.ept_vpid >> 25) & 1, global = (caps.ept_vpid >> 26) & 1;
    if (cases[c].needs == NEEDS_GLOBAL && !global)
        return "L0 offers no INVEPT all-context";
    if (cases[c].needs == NEEDS_SINGLE && !single)
        return "L0 offers no INVEPT single-context";
    if (cases[c].needs == NEEDS_2M && (!single || !((caps.ept_vpid >> 16) & 1)))
        return "L0 offers no 2M EPT pages (or no INVEPT single-context)";
    if (cases[c].needs == NEEDS_1G)
        return single && ((caps.ept_vpid >> 17) & 1) ? NULL
               : "L0 offers no 1G EPT pages (or no INVEPT single-context)";
    if (cases[c].needs == NEEDS_AD) {
        if (!single)
            return "L0 offers no INVEPT single-context";
        return (caps.ept_vpid >> 21) & 1 ? NULL : "L0 offers L1 no EPT accessed/dirty flags";
    }
    if (cases[c].needs >= NEEDS_INVVPID_ADDR) {
        if (!((caps.proc2 >> 32) & (1u << 5)))
            return "L0 offers L1 no VPID";
        if (!((caps.ept_vpid >> 32) & 1))
            return "L0 offers L1 no INVVPID";
        int bit = 40 + cases[c].needs - NEEDS_INVVPID_ADDR;
        if (!((caps.ept_vpid >> bit) & 1))
            return "L0 does not offer L1 this INVVPID type";
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct labtest t = {
        .prog = "vmx-ept-test", .ncases = NCASES, .name = case_name,
        .iterations = &iterations, .min_iter = 2, .max_iter = 5000,
        .flag = 'x', .flag_set = &omit_invept,
        .prepare = prepare, .skip = skip_case, .run = run_case,
    };
    return labtest_main(argc, argv, &t);
}
