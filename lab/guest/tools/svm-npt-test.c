/* svm-npt-test: does L0 invalidate enough when a bare-metal L1 changes its nested page tables?
 *
 * Runs in L0's userspace (the kernel under test), as a KVM VMM whose guest is a tiny bare-metal
 * L1 hypervisor. That L1 owns nested page tables (NPT) for its own guest L2 and follows a script
 * of operations the VMM writes into its memory: store a value (rewrite an NPT leaf, switch nCR3),
 * or VMRUN L2 and record what L2 saw. L0's KVM must shadow L1's NPT in guest_mmu and resync it
 * whenever L1 changes it; too little invalidation shows as L2 reading a page it no longer maps,
 * or writing through an entry L1 made read-only.
 *
 * Every case maps L2's GPA X = 0x10000 through a 4K NPT leaf and rewrites that same leaf many
 * times (a stale shadow entry only appears once L0 has let the leaf table go unsync).
 *
 * Output: TAP, one line per case. Exit 0 all passed, 1 a case failed, 2 setup failed.
 * Usage: svm-npt-test [-n ITERATIONS] [CASE...]
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

#include "labtest.h"

/* L1 physical memory (identity-mapped with 2M pages for L1 itself) */
#define MEM_SIZE   0x400000ul
#define L1_CODE    0x1000
#define L1_PML4    0x2000
#define L1_PDPT    0x3000
#define L1_PD      0x4000
#define VMCB       0x5000
#define HSAVE      0x6000
#define L2_READ    0x7000
#define L2_WRITE   0x7100
#define NPT_A      0x8000          /* PML4, PDPT, PD, PT at +0, +0x1000, +0x2000, +0x3000 */
#define NPT_B      0xC000
#define L1_STACK   0x1F000
#define X_GPA      0x10000         /* the L2 address under test: leaf index 16 */
#define PAGES      0x20000         /* data pages P0..P3, decoy at P4 */
#define OPS        0x40000
#define OPS_END    0x100000
#define IOPM       0x100000
#define MSRPM      0x104000
#define RESULTS    0x200000
#define RESULTS_END MEM_SIZE

#define NPT_LEAF(root) ((root) + 0x3000 + 16 * 8)
#define PTE_P  1ull
#define PTE_RW 2ull
#define PTE_US 4ull                /* NPT walks are user accesses */

/* VMCB offsets (AMD APM vol. 2, appendix B) */
#define VMCB_ASID      0x58
#define VMCB_TLB_CTL   0x5c
#define VMCB_EXIT_CODE 0x70
#define VMCB_EXIT_INFO2 0x80
#define VMCB_NP_ENABLE 0x90
#define VMCB_NCR3      0xb0
#define VMCB_CLEAN     0xc0
#define VMCB_SAVE      0x400
#define VMCB_RIP       (VMCB_SAVE + 0x178)
#define VMCB_RAX       (VMCB_SAVE + 0x1f8)

#define EXIT_HLT 0x78
#define EXIT_NPF 0x400

enum { OP_END = 0, OP_STORE = 1, OP_VMRUN = 2 };
struct op { uint64_t kind, a, b, c; };          /* STORE: [a] = b; VMRUN: rip a, tlb_ctl b, asid c */
struct result { uint64_t exit_code, rax, rbx, info2; };

/* L1: interprets the script at OPS; results of each VMRUN go to RESULTS. GPRs other than
 * rax/rsp survive VMRUN/#VMEXIT, so L2's rbx is still in rbx afterwards. */
extern const uint8_t l1_start[], l1_end[], l2r_start[], l2r_end[], l2w_start[], l2w_end[];
__asm__(".pushsection .rodata\n"
        ".code64\n"
        "l1_start:\n"
        "  mov $0x40000, %rsi\n"
        "  mov $0x200000, %rdi\n"
        "1: mov (%rsi), %rax\n"
        "  test %rax, %rax\n"
        "  jz 9f\n"
        "  cmp $1, %rax\n"
        "  jne 2f\n"
        "  mov 8(%rsi), %rdx\n"
        "  mov 16(%rsi), %rcx\n"
        "  mov %rcx, (%rdx)\n"
        "  jmp 8f\n"
        "2: mov 8(%rsi), %rdx\n"
        "  mov %rdx, 0x5578\n"          /* save.rip */
        "  movq $0, 0x55f8\n"           /* save.rax */
        "  mov 16(%rsi), %rdx\n"
        "  movb %dl, 0x505c\n"          /* tlb_ctl */
        "  mov 24(%rsi), %rdx\n"
        "  movl %edx, 0x5058\n"         /* asid */
        "  movl $0, 0x50c0\n"           /* clean bits: nothing cached */
        "  xor %ebx, %ebx\n"
        "  push %rsi\n"
        "  push %rdi\n"
        "  mov $0x5000, %eax\n"
        "  vmrun %rax\n"
        "  pop %rdi\n"
        "  pop %rsi\n"
        "  mov 0x5070, %rax\n"
        "  mov %rax, (%rdi)\n"
        "  mov 0x55f8, %rax\n"
        "  mov %rax, 8(%rdi)\n"
        "  mov %rbx, 16(%rdi)\n"
        "  mov 0x5080, %rax\n"
        "  mov %rax, 24(%rdi)\n"
        "  add $32, %rdi\n"
        "8: add $32, %rsi\n"
        "  jmp 1b\n"
        "9: hlt\n"
        "  jmp 9b\n"
        "l1_end:\n"
        ".code32\n"
        "l2r_start:\n"                  /* L2, 32-bit flat, paging off: read X */
        "  mov 0x10000, %eax\n"
        "  mov 0x10004, %ebx\n"
        "  hlt\n"
        "l2r_end:\n"
        "l2w_start:\n"                  /* read X, then write X+8 */
        "  mov 0x10000, %eax\n"
        "  mov 0x10004, %ebx\n"
        "  movl $0x5a5a5a5a, 0x10008\n"
        "  hlt\n"
        "l2w_end:\n"
        ".code64\n"
        ".popsection\n");

static const uint32_t pattern[5] = { 0xAAAAAAAA, 0xBBBBBBBB, 0xCCCCCCCC, 0xDDDDDDDD, 0xEEEEEEEE };
#define DECOY 4

static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

struct vm {
    int fd, vcpu;
    uint8_t *mem;
    struct kvm_run *run;
    size_t run_size;
    int nops;
    struct op *ops;
};

static uint64_t page(int i) { return PAGES + (uint64_t)i * 0x1000; }
static uint64_t leaf(int i, uint64_t flags) { return page(i) | PTE_P | PTE_US | flags; }

static void op(struct vm *vm, uint64_t kind, uint64_t a, uint64_t b, uint64_t c)
{
    if ((uint64_t)(vm->nops + 2) * sizeof(struct op) > OPS_END - OPS) {
        fprintf(stderr, "svm-npt-test: script too long\n");
        exit(2);
    }
    vm->ops[vm->nops++] = (struct op){ kind, a, b, c };
    vm->ops[vm->nops] = (struct op){ OP_END, 0, 0, 0 };
}
static void store(struct vm *vm, uint64_t addr, uint64_t val) { op(vm, OP_STORE, addr, val, 0); }
static void vmrun(struct vm *vm, uint64_t rip, int tlb_ctl, int asid)
{
    op(vm, OP_VMRUN, rip, tlb_ctl, asid);
}

static void npt_build(uint8_t *mem, uint64_t root, int data_page)
{
    put64(mem + root, (root + 0x1000) | 7);
    put64(mem + root + 0x1000, (root + 0x2000) | 7);
    put64(mem + root + 0x2000, (root + 0x3000) | 7);
    put64(mem + root + 0x2000 + 8, 0x200000 | 0x87);     /* 2M..4M: one large page */
    for (int i = 0; i < 512; i++)
        put64(mem + root + 0x3000 + i * 8, ((uint64_t)i << 12) | 7);
    put64(mem + NPT_LEAF(root), leaf(data_page, PTE_RW));
}

static void seg(uint8_t *vmcb, int idx, uint16_t sel, uint16_t attr, uint32_t limit)
{
    uint8_t *s = vmcb + VMCB_SAVE + idx * 16;
    put16(s, sel); put16(s + 2, attr); put32(s + 4, limit); put64(s + 8, 0);
}

static int vm_create(int kvm, struct vm *vm)
{
    memset(vm, 0, sizeof(*vm));
    vm->fd = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm->fd < 0) { perror("KVM_CREATE_VM"); return -1; }
    vm->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (vm->mem == MAP_FAILED) { perror("mmap"); return -1; }
    uint8_t *m = vm->mem;
    memcpy(m + L1_CODE, l1_start, l1_end - l1_start);
    memcpy(m + L2_READ, l2r_start, l2r_end - l2r_start);
    memcpy(m + L2_WRITE, l2w_start, l2w_end - l2w_start);
    for (int p = 0; p < 5; p++)
        for (int k = 0; k < 0x1000; k += 4)
            put32(m + page(p) + k, pattern[p]);
    put64(m + L1_PML4, L1_PDPT | 3);
    put64(m + L1_PDPT, L1_PD | 3);
    put64(m + L1_PD, 0x000000 | 0x83);
    put64(m + L1_PD + 8, 0x200000 | 0x83);
    npt_build(m, NPT_A, 0);
    npt_build(m, NPT_B, 1);
    vm->ops = (struct op *)(m + OPS);
    vm->ops[0] = (struct op){ OP_END, 0, 0, 0 };

    uint8_t *v = m + VMCB;
    put32(v + 0x0c, 1u << 24);            /* intercept HLT */
    put32(v + 0x10, 1u << 0);             /* intercept VMRUN (required) */
    put64(v + 0x40, IOPM);
    put64(v + 0x48, MSRPM);
    put32(v + VMCB_ASID, 1);
    put64(v + VMCB_NP_ENABLE, 1);
    put64(v + VMCB_NCR3, NPT_A);
    seg(v, 0, 0x10, 0xc93, 0xffffffff);   /* es */
    seg(v, 1, 0x08, 0xc9b, 0xffffffff);   /* cs: 32-bit code */
    seg(v, 2, 0x10, 0xc93, 0xffffffff);   /* ss */
    seg(v, 3, 0x10, 0xc93, 0xffffffff);   /* ds */
    seg(v, 4, 0x10, 0xc93, 0xffffffff);   /* fs */
    seg(v, 5, 0x10, 0xc93, 0xffffffff);   /* gs */
    seg(v, 6, 0, 0, 0xffff);              /* gdtr */
    seg(v, 7, 0, 0x82, 0xffff);           /* ldtr */
    seg(v, 8, 0, 0, 0xffff);              /* idtr */
    seg(v, 9, 0, 0x8b, 0xffff);           /* tr */
    put64(v + VMCB_SAVE + 0xd0, 0x1000);  /* efer: SVME */
    put64(v + VMCB_SAVE + 0x148, 0);      /* cr4 */
    put64(v + VMCB_SAVE + 0x150, 0);      /* cr3 */
    put64(v + VMCB_SAVE + 0x158, 0x11);   /* cr0: PE, ET; no paging */
    put64(v + VMCB_SAVE + 0x160, 0x400);  /* dr7 */
    put64(v + VMCB_SAVE + 0x168, 0xffff0ff0);
    put64(v + VMCB_SAVE + 0x170, 0x2);    /* rflags */
    put64(v + VMCB_SAVE + 0x1d8, 0x7ff0); /* rsp */
    put64(v + VMCB_SAVE + 0x268, 0x0007040600070406ull); /* g_pat */

    struct kvm_userspace_memory_region reg = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)m,
    };
    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &reg) < 0) { perror("SET_USER_MEMORY_REGION"); return -1; }
    vm->vcpu = ioctl(vm->fd, KVM_CREATE_VCPU, 0);
    if (vm->vcpu < 0) { perror("KVM_CREATE_VCPU"); return -1; }
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 128 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 128;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) { perror("GET_SUPPORTED_CPUID"); return -1; }
    if (ioctl(vm->vcpu, KVM_SET_CPUID2, cpuid) < 0) { perror("SET_CPUID2"); return -1; }
    free(cpuid);
    struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } msrs = {
        .h.nmsrs = 1, .e[0] = { .index = 0xc0010117, .data = HSAVE } };   /* VM_HSAVE_PA */
    if (ioctl(vm->vcpu, KVM_SET_MSRS, &msrs) != 1) { perror("SET_MSRS"); return -1; }
    vm->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);

    struct kvm_sregs s;
    if (ioctl(vm->vcpu, KVM_GET_SREGS, &s) < 0) { perror("GET_SREGS"); return -1; }
    struct kvm_segment cs = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
                              .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment ds = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3,
                              .present = 1, .db = 1, .s = 1, .g = 1 };
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.tr.type = 11; s.tr.present = 1; s.tr.limit = 0x67; s.tr.selector = 0x18; s.tr.s = 0;
    s.cr0 = 0x80050033; s.cr3 = L1_PML4; s.cr4 = 0x20; s.efer = 0x1500;  /* LME LMA SVME */
    if (ioctl(vm->vcpu, KVM_SET_SREGS, &s) < 0) { perror("SET_SREGS"); return -1; }
    struct kvm_regs regs = { .rip = L1_CODE, .rflags = 0x2, .rsp = L1_STACK };
    if (ioctl(vm->vcpu, KVM_SET_REGS, &regs) < 0) { perror("SET_REGS"); return -1; }
    return 0;
}

static void vm_destroy(struct vm *vm)
{
    munmap(vm->run, vm->run_size);
    close(vm->vcpu);
    close(vm->fd);
    munmap(vm->mem, MEM_SIZE);
}

/* Run L1 until it halts at the end of its script. */
static int vm_go(struct vm *vm, char *err, size_t errlen)
{
    for (int k = 0; k < 1000; k++) {
        if (ioctl(vm->vcpu, KVM_RUN, 0) < 0) {
            snprintf(err, errlen, "KVM_RUN: %s", strerror(errno));
            return -1;
        }
        if (vm->run->exit_reason == KVM_EXIT_HLT)
            return 0;
        if (vm->run->exit_reason == KVM_EXIT_INTR)
            continue;
        struct kvm_regs r;
        ioctl(vm->vcpu, KVM_GET_REGS, &r);
        snprintf(err, errlen, "L1 exit reason %u at rip %#llx", vm->run->exit_reason,
                 (unsigned long long)r.rip);
        return -1;
    }
    snprintf(err, errlen, "L1 did not halt");
    return -1;
}

static struct result *results(struct vm *vm) { return (struct result *)(vm->mem + RESULTS); }

/* What one VMRUN should give; filled by each case, checked by check(). */
struct expect { uint64_t exit_code; uint32_t value; uint64_t info2; };

static long iterations = 50;

/* Run the script, compare each VMRUN's result with expect[], report one TAP line. */
static int finish(struct vm *vm, const char *name, struct expect *exp, int nexp, double t0)
{
    char err[200] = "", what[200] = "";
    int bad = 0;
    long first = -1;
    if (vm_go(vm, err, sizeof err) < 0) {
        return tap_result(name, nexp, 0, 0, "", 0, err);
    }
    double secs = now() - t0;
    struct result *r = results(vm);
    for (int i = 0; i < nexp; i++) {
        uint32_t eax = (uint32_t)r[i].rax, ebx = (uint32_t)r[i].rbx;
        int ok = r[i].exit_code == exp[i].exit_code;
        if (ok && exp[i].exit_code == EXIT_HLT)
            ok = eax == exp[i].value && ebx == exp[i].value;
        if (ok && exp[i].exit_code == EXIT_NPF)
            ok = r[i].info2 == exp[i].info2;
        if (!ok) {
            if (!bad) {
                first = i;
                if (r[i].exit_code == EXIT_HLT && exp[i].exit_code == EXIT_NPF)
                    snprintf(what, sizeof what, "L2 got through a leaf L1 had made %s, read %#x",
                             exp[i].info2 == X_GPA + 8 ? "read-only" : "not-present", eax);
                else if (r[i].exit_code == EXIT_HLT)
                    snprintf(what, sizeof what, "L2 read %#x:%#x, expected %#x", ebx, eax,
                             exp[i].value);
                else
                    snprintf(what, sizeof what, "exit %#llx (info2 %#llx), expected exit %#llx",
                             (unsigned long long)r[i].exit_code,
                             (unsigned long long)r[i].info2,
                             (unsigned long long)exp[i].exit_code);
            }
            bad++;
        }
    }
    return tap_result(name, nexp, bad, first, what, secs, NULL);
}

#define MAXEXP 20000

/* remap: repoint X's leaf at another page between VMRUNs, with a given invalidation. */
static int case_remap(int kvm, const char *name, int tlb_ctl, int new_asid, int decoy)
{
    struct vm vm;
    static struct expect exp[MAXEXP];
    int n = 0;
    double t0 = now();
    if (vm_create(kvm, &vm) < 0) { tap_result(name, 0, 0, 0, "", 0, "vm_create"); return 1; }
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = i % 4;
        if (decoy)  /* two writes to the leaf between VMRUNs */
            store(&vm, NPT_LEAF(NPT_A), leaf(DECOY, PTE_RW));
        store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
        vmrun(&vm, L2_READ, tlb_ctl, new_asid ? 1 + (int)(i % 60) : 1);
        exp[n++] = (struct expect){ EXIT_HLT, pattern[p], 0 };
    }
    int rc = finish(&vm, name, exp, n, t0);
    vm_destroy(&vm);
    return rc;
}

/* write-protect: even iterations make the leaf read-only, and L2's write must #NPF. */
static int case_write_protect(int kvm, const char *name)
{
    struct vm vm;
    static struct expect exp[MAXEXP];
    int n = 0;
    double t0 = now();
    if (vm_create(kvm, &vm) < 0) { tap_result(name, 0, 0, 0, "", 0, "vm_create"); return 1; }
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int ro = (i % 2) == 0;
        store(&vm, NPT_LEAF(NPT_A), leaf(0, ro ? 0 : PTE_RW));
        vmrun(&vm, L2_WRITE, 1, 1);
        exp[n++] = ro ? (struct expect){ EXIT_NPF, 0, X_GPA + 8 }
                      : (struct expect){ EXIT_HLT, pattern[0], 0 };
    }
    int rc = finish(&vm, name, exp, n, t0);
    vm_destroy(&vm);
    return rc;
}

/* unmap: even iterations clear the leaf; L2's read must #NPF. Odd ones map another page. */
static int case_unmap(int kvm, const char *name)
{
    struct vm vm;
    static struct expect exp[MAXEXP];
    int n = 0;
    double t0 = now();
    if (vm_create(kvm, &vm) < 0) { tap_result(name, 0, 0, 0, "", 0, "vm_create"); return 1; }
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (i / 2) % 4;
        if (i % 2 == 0) {
            store(&vm, NPT_LEAF(NPT_A), 0);
            vmrun(&vm, L2_READ, 1, 1);
            exp[n++] = (struct expect){ EXIT_NPF, 0, X_GPA };
        } else {
            store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
            vmrun(&vm, L2_READ, 1, 1);
            exp[n++] = (struct expect){ EXIT_HLT, pattern[p], 0 };
        }
    }
    int rc = finish(&vm, name, exp, n, t0);
    vm_destroy(&vm);
    return rc;
}

/* cached-root: alternate nCR3 between two NPT roots, so that L0 keeps the inactive one among
 * guest_mmu's previous roots; change the tables behind the inactive root, switch to it. */
static int case_cached_root(int kvm, const char *name)
{
    struct vm vm;
    static struct expect exp[MAXEXP];
    int n = 0;
    double t0 = now();
    if (vm_create(kvm, &vm) < 0) { tap_result(name, 0, 0, 0, "", 0, "vm_create"); return 1; }
    int cur_a = 0, cur_b = 1;   /* the pages each root maps X to */
    vmrun(&vm, L2_READ, 1, 1);  /* root A, then B: both now known to L0 */
    exp[n++] = (struct expect){ EXIT_HLT, pattern[cur_a], 0 };
    store(&vm, VMCB + VMCB_NCR3, NPT_B);
    vmrun(&vm, L2_READ, 1, 1);
    exp[n++] = (struct expect){ EXIT_HLT, pattern[cur_b], 0 };
    for (long i = 0; i < iterations && n + 2 < MAXEXP; i++) {
        /* running on B: change A's leaf, then switch to A */
        cur_a = (cur_a + 1) % 4;
        store(&vm, NPT_LEAF(NPT_A), leaf(cur_a, PTE_RW));
        store(&vm, VMCB + VMCB_NCR3, NPT_A);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = (struct expect){ EXIT_HLT, pattern[cur_a], 0 };
        /* running on A: change B's leaf, then switch to B */
        cur_b = (cur_b + 1) % 4;
        store(&vm, NPT_LEAF(NPT_B), leaf(cur_b, PTE_RW));
        store(&vm, VMCB + VMCB_NCR3, NPT_B);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = (struct expect){ EXIT_HLT, pattern[cur_b], 0 };
    }
    int rc = finish(&vm, name, exp, n, t0);
    vm_destroy(&vm);
    return rc;
}

struct tcase { const char *name; int (*fn)(int kvm, const char *name); };

static int remap_flush_all(int kvm, const char *n) { return case_remap(kvm, n, 1, 0, 0); }
static int remap_flush_asid(int kvm, const char *n) { return case_remap(kvm, n, 3, 0, 0); }
static int remap_new_asid(int kvm, const char *n) { return case_remap(kvm, n, 0, 1, 0); }
static int remap_twice(int kvm, const char *n) { return case_remap(kvm, n, 1, 0, 1); }

static const struct tcase cases[] = {
    { "svm/remap-flush-all", remap_flush_all },
    { "svm/remap-flush-asid", remap_flush_asid },
    { "svm/remap-new-asid", remap_new_asid },
    { "svm/remap-twice", remap_twice },
    { "svm/write-protect", case_write_protect },
    { "svm/unmap", case_unmap },
    { "svm/cached-root", case_cached_root },
};
#define NCASES (int)(sizeof(cases) / sizeof(cases[0]))

/* Why this host cannot run the cases, or NULL. */
static const char *no_svm(void)
{
    if (!cpu_has("svm"))
        return "this CPU has no SVM (an Intel/VMX host runs vmx-ept-test)";
    if (!cpu_has("npt"))
        return "this CPU has SVM without nested paging (npt)";
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int opt;
    while ((opt = getopt(argc, argv, "n:")) != -1) {
        if (opt == 'n') iterations = atol(optarg);
        else { fprintf(stderr, "usage: %s [-n ITERATIONS] [CASE...]\n", argv[0]); return 2; }
    }
    if (iterations < 2 || iterations > 5000) { fprintf(stderr, "bad -n\n"); return 2; }
    const char *names[NCASES];
    int selected[NCASES];
    for (int c = 0; c < NCASES; c++) names[c] = cases[c].name;
    int nsel = select_cases(argc, argv, optind, names, NCASES, selected);
    if (!nsel) { fprintf(stderr, "no such case\n"); return 2; }
    const char *why = no_svm();
    if (why) {
        for (int c = 0; c < NCASES; c++)
            if (selected[c]) tap_skip(cases[c].name, why);
        return 0;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { printf("Bail out! /dev/kvm: %s\n", strerror(errno)); return 2; }
    double t0 = now();
    int failed = 0;
    for (int c = 0; c < NCASES; c++)
        if (selected[c]) failed += cases[c].fn(kvm, cases[c].name);
    printf("# svm-npt-test: %d cases, %ld iterations each, %.2f s\n", nsel, iterations, now() - t0);
    return failed ? 1 : 0;
}
