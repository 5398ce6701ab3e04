/* svm-npt-test: does L0 invalidate enough when a bare-metal L1 changes its nested page tables?
 *
 * Runs in L0's userspace (the kernel under test), as a KVM VMM whose guest is a tiny bare-metal
 * L1 hypervisor. That L1 owns nested page tables (NPT) for its own guest L2 and follows a script
 * of operations the VMM writes into its memory: store a value (rewrite an NPT leaf, switch nCR3),
 * or VMRUN L2 and record what L2 saw. L0's KVM must shadow L1's NPT in guest_mmu and resync it
 * whenever L1 changes it; too little invalidation shows as L2 reading a page it no longer maps,
 * or writing through an entry L1 made read-only.
 *
 * Most cases map L2's GPA X = 0x10000 through a 4K NPT leaf and rewrite that same leaf many
 * times (a stale shadow entry only appears once L0 has let the leaf table go unsync); others
 * rotate four nCR3s (more than the three roots KVM caches), split and merge a 2M leaf, repoint
 * a non-leaf entry at a table page rewritten while it was out of the tree, give L2 paging of
 * its own over the NPT, or turn nested paging off and invalidate one L2 page with INVLPGA.
 * A case whose feature L0's KVM does not offer L1 (CPUID 0x8000000A: FlushByAsid, the number
 * of ASIDs) is skipped with the reason, never run against rules L1 was not given.
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

#include "baremetal.h"
#include "labtest.h"

/* L1 physical memory beyond what baremetal.h lays out */
#define VMCB       0x5000
#define HSAVE      0x6000
#define NPT_A      0x8000          /* PML4, PDPT, PD, PT at +0, +0x1000, +0x2000, +0x3000 */
#define NPT_B      0xC000
#define NPT_C      ROOT_C
#define NPT_D      ROOT_D
#define IOPM       0x100000
#define MSRPM      0x104000

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
#define VMCB_CR4       (VMCB + VMCB_SAVE + 0x148)   /* L1 addresses */
#define VMCB_CR3       (VMCB + VMCB_SAVE + 0x150)
#define VMCB_CR0       (VMCB + VMCB_SAVE + 0x158)
#define VMCB_SAVE      0x400
#define VMCB_RIP       (VMCB_SAVE + 0x178)
#define VMCB_RAX       (VMCB_SAVE + 0x1f8)

#define EXIT_HLT 0x78
#define EXIT_NPF 0x400

enum { OP_VMRUN = 2,                             /* VMRUN: rip a, tlb_ctl b, asid c */
       OP_INVLPGA = 3,                           /* INVLPGA: address a, ASID b */
       OP_LOAD = 7 };       /* record the qword at a as a result (exit LOADED, value in rax) */
#define LOADED 0x10000      /* not a #VMEXIT code: what OP_LOAD records as `exit` */

/* L1: interprets its script (r13); results of each VMRUN go to its results (r14); its VMCB is
 * at r15. GPRs other than rax/rsp survive VMRUN/#VMEXIT, so L2's rbx is still in rbx
 * afterwards, and L2's code never touches r13-r15. */
__asm__(".pushsection .rodata\n"
        ".code64\n"
        "l1_start:\n"
        "  mov %r13, %rsi\n"
        "  mov %r14, %rdi\n"
        "1: mov (%rsi), %rax\n"
        "  test %rax, %rax\n"
        "  jz 9f\n"
        "  cmp $1, %rax\n"
        "  jne 3f\n"
        "  mov 8(%rsi), %rdx\n"
        "  mov 16(%rsi), %rcx\n"
        "  mov %rcx, (%rdx)\n"
        "  jmp 8f\n"
        "3: cmp $3, %rax\n"
        "  jne 4f\n"
        "  mov 8(%rsi), %rax\n"
        "  mov 16(%rsi), %rcx\n"
        "  invlpga %rax, %ecx\n"
        "  jmp 8f\n"
        "4: cmp $7, %rax\n"             /* LOAD: [a] into the results */
        "  jne 6f\n"
        "  mov 8(%rsi), %rdx\n"
        "  mov (%rdx), %rax\n"
        "  movq $0x10000, (%rdi)\n"
        "  mov %rax, 8(%rdi)\n"
        "  movq $0, 16(%rdi)\n"
        "  mov %rdx, 24(%rdi)\n"
        "  add $32, %rdi\n"
        "  jmp 8f\n"
        "6: cmp $9, %rax\n"             /* WAIT until [a] == b (or the VMM gives up) */
        "  jne 2f\n"
        "  mov 8(%rsi), %rdx\n"
        "  mov 16(%rsi), %rcx\n"
        "5: cmp %rcx, (%rdx)\n"
        "  je 8f\n"
        "  cmpq $0, 0x108080\n"
        "  jne 9f\n"
        "  pause\n"
        "  jmp 5b\n"
        "2: mov 8(%rsi), %rdx\n"
        "  mov %rdx, 0x578(%r15)\n"     /* save.rip */
        "  movq $0, 0x5f8(%r15)\n"      /* save.rax */
        "  mov 16(%rsi), %rdx\n"
        "  movb %dl, 0x5c(%r15)\n"      /* tlb_ctl */
        "  mov 24(%rsi), %rdx\n"
        "  movl %edx, 0x58(%r15)\n"     /* asid */
        "  movl $0, 0xc0(%r15)\n"       /* clean bits: nothing cached */
        "  xor %ebx, %ebx\n"
        "  push %rsi\n"
        "  push %rdi\n"
        "  mov %r15, %rax\n"
        "  vmrun %rax\n"
        "  pop %rdi\n"
        "  pop %rsi\n"
        "  mov 0x70(%r15), %rax\n"
        "  mov %rax, (%rdi)\n"
        "  mov 0x5f8(%r15), %rax\n"
        "  mov %rax, 8(%rdi)\n"
        "  mov %rbx, 16(%rdi)\n"
        "  mov 0x80(%r15), %rax\n"
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
        "l2v_start:\n"                  /* L2 with paging on: read V */
        "  mov 0x400000, %eax\n"
        "  mov 0x400004, %ebx\n"
        "  hlt\n"
        "l2v_end:\n"
        ".code64\n"
        ".popsection\n");

static uint64_t leaf(int i, uint64_t flags) { return page(i) | PTE_P | PTE_US | flags; }

static void vmrun(struct vm *vm, uint64_t rip, int tlb_ctl, int asid)
{
    op(vm, OP_VMRUN, rip, tlb_ctl, asid);
}

/* What L0's KVM offers L1 (KVM_GET_SUPPORTED_CPUID 0x8000000A): ASIDs, and FlushByAsid, which
 * TLB_CONTROL 3 and 7 need (APM vol. 2, 15.16.1: without it only 0 and 1 are defined). */
static uint32_t nasid;
static int flush_by_asid, gbpages;

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
    if (l1_memory(kvm, vm) < 0) return -1;
    uint8_t *m = vm->mem;
    npt_build(m, NPT_A, 0);
    npt_build(m, NPT_B, 1);
    npt_build(m, NPT_C, 2);
    npt_build(m, NPT_D, 3);

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

    /* VM_HSAVE_PA; L1 in long mode with PAE and EFER.SVME */
    return l1_vcpu(kvm, vm, 0xc0010117, HSAVE, 0x20, 0x1500, VMCB);
}

/* What one VMRUN should give; filled by each case, checked by check(). */
struct expect { uint64_t exit_code; uint32_t value; uint64_t info2; uint64_t set_bits; };
#define READS(v) ((struct expect){ .exit_code = EXIT_HLT, .value = (v) })
#define FAULTS(a) ((struct expect){ .exit_code = EXIT_NPF, .info2 = (a) })
#define LOADS_BITS(b) ((struct expect){ .exit_code = LOADED, .set_bits = (b) })

static long iterations = 50;

/* Compare one vCPU's VMRUN results with expect[]: how many differ, the first one, and what
 * L2 saw there. */
static int judge(struct result *r, struct expect *exp, int nexp, long *first, char *what,
                 size_t wlen)
{
    int bad = 0;
    for (int i = 0; i < nexp; i++) {
        uint32_t eax = (uint32_t)r[i].rax, ebx = (uint32_t)r[i].rbx;
        if (exp[i].exit_code == LOADED) {
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
        int ok = r[i].exit == exp[i].exit_code;
        if (ok && exp[i].exit_code == EXIT_HLT)
            ok = eax == exp[i].value && ebx == exp[i].value;
        if (ok && exp[i].exit_code == EXIT_NPF)
            ok = r[i].addr == exp[i].info2;
        if (ok)
            continue;
        if (!bad++) {
            *first = i;
            if (r[i].exit == EXIT_HLT && exp[i].exit_code == EXIT_NPF)
                snprintf(what, wlen, "L2 got through a leaf L1 had made %s, read %#x",
                         exp[i].info2 == X_GPA + 8 ? "read-only" : "not-present", eax);
            else if (r[i].exit == EXIT_HLT)
                snprintf(what, wlen, "L2 read %#x:%#x, expected %#x", ebx, eax, exp[i].value);
            else
                snprintf(what, wlen, "exit %#llx (info2 %#llx), expected exit %#llx",
                         (unsigned long long)r[i].exit, (unsigned long long)r[i].addr,
                         (unsigned long long)exp[i].exit_code);
        }
    }
    return bad;
}

/* Run the script(s), compare each vCPU's VMRUN results with its expect[], report one TAP
 * line. exp1/nexp1: vCPU 1's, for the cases that give L1 two vCPUs (else NULL, 0). */
static int finish2(struct vm *vm, const char *name, struct expect *exp, int nexp,
                   struct expect *exp1, int nexp1, double t0)
{
    char err[200] = "", what[200] = "", what1[200] = "";
    long first = -1, first1 = -1;
    if (l1_go(vm, err, sizeof err) < 0)
        return tap_result(name, nexp + nexp1, 0, 0, "", 0, err);
    double secs = now() - t0;
    int bad = judge(results(vm), exp, nexp, &first, what, sizeof what);
    int bad1 = exp1 ? judge(results1(vm), exp1, nexp1, &first1, what1, sizeof what1) : 0;
    if (!bad && bad1) {
        snprintf(what, sizeof what, "vCPU 1: %s", what1);
        first = first1;
    }
    return tap_result(name, nexp + nexp1, bad + bad1, first, what, secs, NULL);
}

static int finish(struct vm *vm, const char *name, struct expect *exp, int nexp, double t0)
{
    return finish2(vm, name, exp, nexp, NULL, 0, t0);
}

#define MAXEXP 20000

/* A case's frame: a VM with L1 in it and the expectations of its L2 runs; then run, judge,
 * report one TAP line, and destroy the VM. */
#define BEGIN(name) struct vm vm; static struct expect exp[MAXEXP]; int n = 0; \
    double t0 = now(); \
    if (vm_create(kvm, &vm) < 0) return tap_result(name, 0, 0, 0, "", 0, "vm_create");
#define END(name) int rc = finish(&vm, name, exp, n, t0); vm_destroy(&vm); return rc;

/* L2 pages of its own (32-bit, PSE), V mapped to `target` (lab/guest/tools/baremetal.h). */
static void l2_pages(struct vm *vm, uint64_t target)
{
    l2_paging(vm->mem, target);
    put64(vm->mem + VMCB_CR0, 0x80000011);    /* PG PE ET */
    put64(vm->mem + VMCB_CR3, L2_PGD);
    put64(vm->mem + VMCB_CR4, 0x10);          /* PSE */
}

/* remap: repoint X's leaf at another page between VMRUNs, with a given invalidation. */
static int case_remap(int kvm, const char *name, int tlb_ctl, int new_asid, int decoy)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = i % 4;
        if (decoy)  /* two writes to the leaf between VMRUNs */
            store(&vm, NPT_LEAF(NPT_A), leaf(DECOY, PTE_RW));
        store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
        /* a new ASID each run, from the nasid - 1 that L1 was given (0 is the host's) */
        vmrun(&vm, L2_READ, tlb_ctl, new_asid ? 1 + (int)(i % (nasid - 1)) : 1);
        exp[n++] = READS(pattern[p]);
    }
    END(name)
}

/* write-protect: even iterations make the leaf read-only, and L2's write must #NPF. */
static int case_write_protect(int kvm, const char *name)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int ro = (i % 2) == 0;
        store(&vm, NPT_LEAF(NPT_A), leaf(0, ro ? 0 : PTE_RW));
        vmrun(&vm, L2_WRITE, 1, 1);
        exp[n++] = ro ? FAULTS(X_GPA + 8)
                      : READS(pattern[0]);
    }
    END(name)
}

/* unmap: even iterations clear the leaf; L2's read must #NPF. Odd ones map another page. */
static int case_unmap(int kvm, const char *name)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (i / 2) % 4;
        if (i % 2 == 0) {
            store(&vm, NPT_LEAF(NPT_A), 0);
            vmrun(&vm, L2_READ, 1, 1);
            exp[n++] = FAULTS(X_GPA);
        } else {
            store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
            vmrun(&vm, L2_READ, 1, 1);
            exp[n++] = READS(pattern[p]);
        }
    }
    END(name)
}

/* cached-root: alternate nCR3 between two NPT roots, so that L0 keeps the inactive one among
 * guest_mmu's previous roots; change the tables behind the inactive root, switch to it. */
static int case_cached_root(int kvm, const char *name)
{
    BEGIN(name)
    int cur_a = 0, cur_b = 1;   /* the pages each root maps X to */
    vmrun(&vm, L2_READ, 1, 1);  /* root A, then B: both now known to L0 */
    exp[n++] = READS(pattern[cur_a]);
    store(&vm, VMCB + VMCB_NCR3, NPT_B);
    vmrun(&vm, L2_READ, 1, 1);
    exp[n++] = READS(pattern[cur_b]);
    for (long i = 0; i < iterations && n + 2 < MAXEXP; i++) {
        /* running on B: change A's leaf, then switch to A */
        cur_a = (cur_a + 1) % 4;
        store(&vm, NPT_LEAF(NPT_A), leaf(cur_a, PTE_RW));
        store(&vm, VMCB + VMCB_NCR3, NPT_A);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(pattern[cur_a]);
        /* running on A: change B's leaf, then switch to B */
        cur_b = (cur_b + 1) % 4;
        store(&vm, NPT_LEAF(NPT_B), leaf(cur_b, PTE_RW));
        store(&vm, VMCB + VMCB_NCR3, NPT_B);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(pattern[cur_b]);
    }
    END(name)
}

/* cached-root-deep: four nCR3s in rotation, more than the three previous roots KVM keeps,
 * so every cache slot fills and the oldest falls out: each step changes the leaf of the root
 * L1 is about to switch to (the one used longest ago), flushes, switches. */
static int case_cached_root_deep(int kvm, const char *name)
{
    static const uint64_t roots[4] = { NPT_A, NPT_B, NPT_C, NPT_D };
    int cur[4] = { 0, 1, 2, 3 };
    BEGIN(name)
    for (int r = 0; r < 4; r++) {              /* visit each root once: all known to L0 */
        store(&vm, VMCB + VMCB_NCR3, roots[r]);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(pattern[cur[r]]);
    }
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int r = (int)(i % 4);
        cur[r] = (cur[r] + 1) % 4;
        store(&vm, NPT_LEAF(roots[r]), leaf(cur[r], PTE_RW));
        store(&vm, VMCB + VMCB_NCR3, roots[r]);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(pattern[cur[r]]);
    }
    END(name)
}

/* large-page and huge-page-1g: split and merge. L2's first 2M (1G) alternates between one
 * NPT leaf in the directory (the PDPT, where L0 offers L1 1G pages) onto L1's own memory
 * (X reads L1's X page: LARGE_PATTERN) and the table below it (X reads data page p). */
static int split_merge(int kvm, const char *name, uint64_t entry, uint64_t below)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)(i / 2) % 4;
        if (i % 2 == 0) {
            store(&vm, entry, 0x87);                            /* merge: one leaf */
        } else {
            store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
            store(&vm, entry, below | 7);                       /* split: back to the table */
        }
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(i % 2 == 0 ? LARGE_PATTERN : pattern[p]);
    }
    END(name)
}

static int case_large_page(int kvm, const char *n)
{
    return split_merge(kvm, n, NPT_A + 0x2000, NPT_A + 0x3000);
}

static int case_huge_page_1g(int kvm, const char *n)
{
    return split_merge(kvm, n, NPT_A + 0x1000, NPT_A + 0x2000);
}

/* repoint-table: the directory entry for L2's first 2M alternates between root A's leaf table
 * and a second one (ALT_PT); the table out of the tree is rewritten before it comes back, so
 * L0 must not reuse what it shadowed from that page last time. */
static int case_repoint_table(int kvm, const char *name)
{
    BEGIN(name)
    memcpy(vm.mem + ALT_PT, vm.mem + NPT_A + 0x3000, 0x1000);
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)(i % 4);
        uint64_t table = i % 2 ? ALT_PT : NPT_A + 0x3000;
        store(&vm, table + 16 * 8, leaf(p, PTE_RW));           /* rewritten while unlinked */
        store(&vm, NPT_A + 0x2000, table | 7);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(pattern[p]);
    }
    END(name)
}

/* l2-paging: L2 pages (32-bit, PSE) over the NPT and reads V. Even runs: L2's PTE maps V to
 * GPA X, whose NPT leaf L1 repoints; odd runs: L2's PTE maps V straight to a data page. Both
 * dimensions change under a flush of the whole TLB. */
static int case_l2_paging(int kvm, const char *name)
{
    BEGIN(name)
    l2_pages(&vm, X_GPA);
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)(i / 2) % 4, q = (p + 2) % 4;
        if (i % 2 == 0) {
            store(&vm, L2_PTE, X_GPA | 7);
            store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
        } else {
            store(&vm, L2_PTE, page(q) | 7);
        }
        vmrun(&vm, L2_READV, 1, 1);
        exp[n++] = READS(pattern[i % 2 == 0 ? p : q]);
    }
    END(name)
}

/* invlpga: nested paging off, L1 shadows nothing itself: L2's own page tables are walked in
 * L1's physical memory. L1 repoints V's PTE and invalidates that one page with INVLPGA in
 * L2's ASID, then runs L2 with TLB_CONTROL 0 (no flush): the INVLPGA alone must be enough. */
static int case_invlpga(int kvm, const char *name)
{
    BEGIN(name)
    l2_pages(&vm, page(0));
    put64(vm.mem + VMCB + VMCB_NP_ENABLE, 0);
    vmrun(&vm, L2_READV, 1, 1);                 /* V is in L2's TLB now */
    exp[n++] = READS(pattern[0]);
    for (long i = 0; i < iterations && n < MAXEXP; i++) {
        int p = (int)((i + 1) % 4);
        store(&vm, L2_PTE, page(p) | 7);
        op(&vm, OP_INVLPGA, V_GVA, 1, 0);
        vmrun(&vm, L2_READV, 0, 1);
        exp[n++] = READS(pattern[p]);
    }
    END(name)
}

/* two-vcpus: L1 has two vCPUs on one NPT root. In turns: vCPU 0 repoints X's leaf and hands
 * over; vCPU 1 runs L2 (flushing its TLB) and must read the new page; then vCPU 0 runs L2
 * too. Shadow pages are the VM's, roots and their sync each vCPU's: a change made while one
 * vCPU ran must reach the other's guest_mmu. */
static int case_two_vcpus(int kvm, const char *name)
{
    static struct expect exp1[MAXEXP];
    int n1 = 0;
    BEGIN(name)
    memcpy(vm.mem + CPU1_PAGE_B, vm.mem + VMCB, 0x1000);      /* vCPU 1's VMCB: the same L2 */
    if (l1_cpu(kvm, &vm, 1, 0xc0010117, CPU1_PAGE_A, 0x20, 0x1500, CPU1_PAGE_B) < 0) {
        vm_destroy(&vm);
        return tap_result(name, 0, 0, 0, "", 0, "a second vCPU");
    }
    vmrun(&vm, L2_READ, 1, 1);                                /* both vCPUs have a root */
    exp[n++] = READS(pattern[0]);
    op_on(&vm, 1, OP_VMRUN, L2_READ, 1, 1);
    exp1[n1++] = READS(pattern[0]);
    op_on(&vm, 1, OP_STORE, SYNC_ACK, 1, 0);
    op(&vm, OP_WAIT, SYNC_ACK, 1, 0);
    for (long i = 1; i <= iterations && n1 < MAXEXP; i++) {
        int p = (int)(i % 4);
        store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));
        store(&vm, SYNC_GEN, (uint64_t)i + 1);
        op(&vm, OP_WAIT, SYNC_ACK, (uint64_t)i + 1, 0);
        vmrun(&vm, L2_READ, 1, 1);
        exp[n++] = READS(pattern[p]);
        op_on(&vm, 1, OP_WAIT, SYNC_GEN, (uint64_t)i + 1, 0);
        op_on(&vm, 1, OP_VMRUN, L2_READ, 1, 1);
        exp1[n1++] = READS(pattern[p]);
        op_on(&vm, 1, OP_STORE, SYNC_ACK, (uint64_t)i + 1, 0);
    }
    int rc = finish2(&vm, name, exp, n, exp1, n1, t0);
    vm_destroy(&vm);
    return rc;
}

/* npt-dirty-bit: the CPU sets a nested page table entry's accessed and dirty flags as it
 * walks the NPT (L0's KVM, shadowing it, sets L1's). L1 rewrites X's leaf with them clear and
 * flushes; L2 reads and writes X's page; L1 reads the leaf back: both must be set again. */
static int case_npt_dirty_bit(int kvm, const char *name)
{
    BEGIN(name)
    for (long i = 0; i < iterations && n + 1 < MAXEXP; i++) {
        int p = (int)(i % 4);
        store(&vm, NPT_LEAF(NPT_A), leaf(p, PTE_RW));       /* A (bit 5), D (bit 6) clear */
        vmrun(&vm, L2_WRITE, 1, 1);
        exp[n++] = READS(pattern[p]);
        op(&vm, OP_LOAD, NPT_LEAF(NPT_A), 0, 0);
        exp[n++] = LOADS_BITS((1ull << 5) | (1ull << 6));
    }
    END(name)
}

struct tcase { const char *name; int (*fn)(int kvm, const char *name); int needs; };
#define NEEDS_FLUSH_BY_ASID 1
#define NEEDS_ASIDS 2
#define NEEDS_1G 3

static int remap_flush_all(int kvm, const char *n) { return case_remap(kvm, n, 1, 0, 0); }
static int remap_flush_asid(int kvm, const char *n) { return case_remap(kvm, n, 3, 0, 0); }
static int remap_new_asid(int kvm, const char *n) { return case_remap(kvm, n, 0, 1, 0); }
static int remap_flush_guest(int kvm, const char *n) { return case_remap(kvm, n, 7, 0, 0); }
static int remap_twice(int kvm, const char *n) { return case_remap(kvm, n, 1, 0, 1); }

static const struct tcase cases[] = {
    { "svm/remap-flush-all", remap_flush_all, 0 },
    { "svm/remap-flush-asid", remap_flush_asid, NEEDS_FLUSH_BY_ASID },
    { "svm/remap-flush-guest", remap_flush_guest, NEEDS_FLUSH_BY_ASID },
    { "svm/remap-new-asid", remap_new_asid, NEEDS_ASIDS },
    { "svm/remap-twice", remap_twice, 0 },
    { "svm/write-protect", case_write_protect, 0 },
    { "svm/unmap", case_unmap, 0 },
    { "svm/cached-root", case_cached_root, 0 },
    { "svm/cached-root-deep", case_cached_root_deep, 0 },
    { "svm/large-page", case_large_page, 0 },
    { "svm/huge-page-1g", case_huge_page_1g, NEEDS_1G },
    { "svm/repoint-table", case_repoint_table, 0 },
    { "svm/l2-paging", case_l2_paging, 0 },
    { "svm/invlpga", case_invlpga, 0 },
    { "svm/two-vcpus", case_two_vcpus, 0 },
    { "svm/npt-dirty-bit", case_npt_dirty_bit, 0 },
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

static int kvm_fd;
static const char *case_name(int c) { return cases[c].name; }
static int run_case(int c) { return cases[c].fn(kvm_fd, cases[c].name); }

static const char *prepare(void)
{
    const char *why = no_svm();
    if (why)
        return why;
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0) {
        printf("Bail out! /dev/kvm: %s\n", strerror(errno));
        return LABTEST_BAIL;
    }
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 128 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 128;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
        printf("Bail out! KVM_GET_SUPPORTED_CPUID: %s\n", strerror(errno));
        return LABTEST_BAIL;
    }
    for (unsigned i = 0; i < cpuid->nent; i++)
        if (cpuid->entries[i].function == 0x8000000a) {
            nasid = cpuid->entries[i].ebx;
            flush_by_asid = (cpuid->entries[i].edx >> 6) & 1;
        } else if (cpuid->entries[i].function == 0x80000001) {
            gbpages = (cpuid->entries[i].edx >> 26) & 1;  /* 1G leaves in L1's NPT */
        }
    free(cpuid);
    printf("# L0's KVM offers L1 %u ASIDs, FlushByAsid %s\n", nasid, flush_by_asid ? "yes" : "no");
    return NULL;
}

static const char *skip_case(int c)
{
    if (cases[c].needs == NEEDS_FLUSH_BY_ASID && !flush_by_asid)
        return "L0 does not offer L1 FlushByAsid (CPUID 0x8000000A EDX[6]): TLB_CONTROL 3 "
               "and 7 are not defined for it";
    if (cases[c].needs == NEEDS_1G && !gbpages)
        return "L0 does not offer L1 1G pages (CPUID 0x80000001 EDX[26])";
    if (cases[c].needs == NEEDS_ASIDS && nasid < 3)
        return "L0 offers L1 fewer than 2 guest ASIDs (CPUID 0x8000000A EBX)";
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct labtest t = {
        .prog = "svm-npt-test", .ncases = NCASES, .name = case_name,
        .iterations = &iterations, .min_iter = 2, .max_iter = 5000,
        .prepare = prepare, .skip = skip_case, .run = run_case,
    };
    return labtest_main(argc, argv, &t);
}
