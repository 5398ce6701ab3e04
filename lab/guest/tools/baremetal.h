/* baremetal.h: the part of svm-npt-test and vmx-ept-test that is the same for both vendors: a
 * KVM VM (run from userspace) whose guest is a tiny 64-bit bare-metal L1 hypervisor, identity-
 * mapped with 2M pages, that follows a script of operations written into its memory and records
 * what its own guest L2 saw. The vendor part (VMCB or VMCS, NPT or EPT, the L1 code itself)
 * stays in each program, which defines l1_start/l1_end and the L2 routines before including.
 *
 * L1 may have two vCPUs (the several-vCPU cases): each has its own stack, script, results and
 * vendor pages, and L1's code finds them in registers the VMM sets: r13 the script, r14 the
 * results, r15 the vendor's per-CPU base (L2's code never touches r13-r15, and VMRUN/VM exits
 * leave them as they are). The two hand each other turns through OP_WAIT on shared words. */
#ifndef BAREMETAL_H
#define BAREMETAL_H

#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* L1 physical memory, as both L1s use it */
#define MEM_SIZE   0x400000ul
#define L1_CODE    0x1000
#define L1_PML4    0x2000
#define L1_PDPT    0x3000
#define L1_PD      0x4000
#define L2_READ    0x7000          /* L2: read X */
#define L2_WRITE   0x7100          /* L2: read X, write X+8 */
#define L2_READV   0x7200          /* L2, paging on: read V */
#define L1_STACK   0x1F000
#define X_GPA      0x10000         /* the L2 address under test: leaf index 16 */
#define PAGES      0x20000         /* data pages P0..P3, decoy at P4 */
#define OPS        0x40000         /* the script */
#define OPS_END    0x100000
#define ROOT_C     0x110000        /* third and fourth NPT/EPT roots (4 pages each) */
#define ROOT_D     0x114000
#define ALT_PT     0x118000        /* a second leaf table for root A's first 2M */
#define L2_PGD     0x119000        /* L2's own page directory (32-bit paging, PSE) */
#define L2_PT      0x11A000        /* ... and the page table that maps V */
#define RESULTS    0x200000        /* what L1 recorded, one struct result per L2 run */
#define SYNC_GEN   0x108000        /* words the two vCPUs hand each other turns through */
#define SYNC_ACK   0x108040
#define SYNC_ABORT 0x108080        /* set by the VMM when a vCPU failed: OP_WAIT gives up */
#define CPU1_PAGE_A 0x11B000       /* vCPU 1: the vendor's two pages (HSAVE, VMCB or VMXON, */
#define CPU1_PAGE_B 0x11C000       /* VMCS) and its pointer area (VMX) */
#define CPU1_PTRS  0x11D000
#define L1_STACK1  0x11F000
#define OPS1       0x120000        /* vCPU 1's script */
#define OPS1_END   0x180000
#define RESULTS1   0x300000
#define V_GVA      0x400000        /* the L2 virtual address under test when L2 pages */
/* What L2 reads at X when a 2M leaf maps L2's first 2M straight onto L1's (X's own page in
 * L1 holds this): distinct from every data page, so a split or merge that L0 missed shows. */
#define LARGE_PATTERN 0x12121212u

enum { OP_END = 0, OP_STORE = 1,    /* the vendor adds its own kinds from 2 on */
       OP_WAIT = 9 };                /* spin (PAUSE) until the qword at a equals b */
struct op { uint64_t kind, a, b, c; };
struct result { uint64_t exit, rax, rbx, addr; };   /* exit code/reason, L2's eax/ebx, GPA */

extern const uint8_t l1_start[], l1_end[], l2r_start[], l2r_end[], l2w_start[], l2w_end[],
    l2v_start[], l2v_end[];

static const uint32_t pattern[5] = { 0xAAAAAAAA, 0xBBBBBBBB, 0xCCCCCCCC, 0xDDDDDDDD, 0xEEEEEEEE };
#define DECOY 4

static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t page(int i) { return PAGES + (uint64_t)i * 0x1000; }

struct vm {
    int fd, vcpu, nops;             /* vCPU 0 */
    int vcpu1, nops1;               /* vCPU 1, when a case made one (vcpu1 > 0) */
    int ntable;                     /* vmx-ept-test: entries in its VMCS table */
    uint8_t *mem;
    struct kvm_run *run, *run1;
    size_t run_size;
    struct op *ops, *ops1;
};

/* Append one operation to a vCPU's script. */
static inline void op_on(struct vm *vm, int cpu, uint64_t kind, uint64_t a, uint64_t b,
                         uint64_t c)
{
    struct op *ops = cpu ? vm->ops1 : vm->ops;
    int *n = cpu ? &vm->nops1 : &vm->nops;
    uint64_t room = cpu ? OPS1_END - OPS1 : OPS_END - OPS;
    if ((uint64_t)(*n + 2) * sizeof(struct op) > room) {
        fprintf(stderr, "script too long\n");
        exit(2);
    }
    ops[(*n)++] = (struct op){ kind, a, b, c };
    ops[*n] = (struct op){ OP_END, 0, 0, 0 };
}
static inline void op(struct vm *vm, uint64_t kind, uint64_t a, uint64_t b, uint64_t c)
{
    op_on(vm, 0, kind, a, b, c);
}
static inline void store(struct vm *vm, uint64_t addr, uint64_t val)
{
    op(vm, OP_STORE, addr, val, 0);
}

/* The VM and L1's memory: code, L2's routines, the data pages, L1's own page tables. */
static inline int l1_memory(int kvm, struct vm *vm)
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
    memcpy(m + L2_READV, l2v_start, l2v_end - l2v_start);
    for (int p = 0; p < 5; p++)
        for (int k = 0; k < 0x1000; k += 4)
            put32(m + page(p) + k, pattern[p]);
    for (int k = 0; k < 0x1000; k += 4)
        put32(m + X_GPA + k, LARGE_PATTERN);
    put64(m + L1_PML4, L1_PDPT | 3);
    put64(m + L1_PDPT, L1_PD | 3);
    put64(m + L1_PD, 0x000000 | 0x83);
    put64(m + L1_PD + 8, 0x200000 | 0x83);
    vm->ops = (struct op *)(m + OPS);
    vm->ops[0] = (struct op){ OP_END, 0, 0, 0 };
    vm->ops1 = (struct op *)(m + OPS1);
    vm->ops1[0] = (struct op){ OP_END, 0, 0, 0 };
    return 0;
}

/* One L1 vCPU: CPUID as KVM supports it, one MSR the vendor needs set, and L1 in 64-bit mode
 * at L1_CODE with the given CR4 and EFER, its stack, and its script, results and vendor base
 * in r13, r14, r15. */
static inline int l1_cpu(int kvm, struct vm *vm, int cpu, uint32_t msr, uint64_t msr_value,
                         uint64_t cr4, uint64_t efer, uint64_t base)
{
    int fd = ioctl(vm->fd, KVM_CREATE_VCPU, cpu);
    if (fd < 0) { perror("KVM_CREATE_VCPU"); return -1; }
    *(cpu ? &vm->vcpu1 : &vm->vcpu) = fd;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 128 * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = 128;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) { perror("GET_SUPPORTED_CPUID"); return -1; }
    if (ioctl(fd, KVM_SET_CPUID2, cpuid) < 0) { perror("SET_CPUID2"); return -1; }
    free(cpuid);
    struct { struct kvm_msrs h; struct kvm_msr_entry e[1]; } msrs = {
        .h.nmsrs = 1, .e[0] = { .index = msr, .data = msr_value } };
    if (ioctl(fd, KVM_SET_MSRS, &msrs) != 1) { perror("SET_MSRS"); return -1; }
    vm->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    *(cpu ? &vm->run1 : &vm->run) = run;

    struct kvm_sregs s;
    if (ioctl(fd, KVM_GET_SREGS, &s) < 0) { perror("GET_SREGS"); return -1; }
    struct kvm_segment cs = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
                              .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment ds = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3,
                              .present = 1, .db = 1, .s = 1, .g = 1 };
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.tr.type = 11; s.tr.present = 1; s.tr.limit = 0x67; s.tr.selector = 0x18; s.tr.s = 0;
    s.cr0 = 0x80050033; s.cr3 = L1_PML4; s.cr4 = cr4; s.efer = efer;
    if (ioctl(fd, KVM_SET_SREGS, &s) < 0) { perror("SET_SREGS"); return -1; }
    struct kvm_regs regs = { .rip = L1_CODE, .rflags = 0x2,
                             .rsp = cpu ? L1_STACK1 : L1_STACK,
                             .r13 = cpu ? OPS1 : OPS, .r14 = cpu ? RESULTS1 : RESULTS,
                             .r15 = base };
    if (ioctl(fd, KVM_SET_REGS, &regs) < 0) { perror("SET_REGS"); return -1; }
    return 0;
}

/* The memslot and vCPU 0 (see l1_cpu). */
static inline int l1_vcpu(int kvm, struct vm *vm, uint32_t msr, uint64_t msr_value,
                          uint64_t cr4, uint64_t efer, uint64_t base)
{
    struct kvm_userspace_memory_region reg = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)vm->mem,
    };
    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &reg) < 0) { perror("SET_USER_MEMORY_REGION"); return -1; }
    return l1_cpu(kvm, vm, 0, msr, msr_value, cr4, efer, base);
}

static inline void vm_destroy(struct vm *vm)
{
    munmap(vm->run, vm->run_size);
    close(vm->vcpu);
    if (vm->vcpu1 > 0) {
        munmap(vm->run1, vm->run_size);
        close(vm->vcpu1);
    }
    close(vm->fd);
    munmap(vm->mem, MEM_SIZE);
}

/* Run one L1 vCPU until it halts at the end of its script. */
static inline int l1_run(int fd, struct kvm_run *run, char *err, size_t errlen)
{
    for (int k = 0; k < 100000; k++) {
        if (ioctl(fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            snprintf(err, errlen, "KVM_RUN: %s", strerror(errno));
            return -1;
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            return 0;
        if (run->exit_reason == KVM_EXIT_INTR)
            continue;
        struct kvm_regs r;
        ioctl(fd, KVM_GET_REGS, &r);
        snprintf(err, errlen, "L1 exit reason %u at rip %#llx", run->exit_reason,
                 (unsigned long long)r.rip);
        return -1;
    }
    snprintf(err, errlen, "L1 did not halt");
    return -1;
}

struct cpu1_job { struct vm *vm; char err[200]; int rc; };
static inline void *cpu1_thread(void *arg)
{
    struct cpu1_job *j = arg;
    j->rc = l1_run(j->vm->vcpu1, j->vm->run1, j->err, sizeof j->err);
    if (j->rc < 0)  /* vCPU 0 may be waiting for a turn that will not come */
        __atomic_store_n((uint64_t *)(j->vm->mem + SYNC_ABORT), 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* Run L1 until every vCPU halts at the end of its script (vCPU 1 in a thread of its own). */
static inline int l1_go(struct vm *vm, char *err, size_t errlen)
{
    if (vm->vcpu1 <= 0)
        return l1_run(vm->vcpu, vm->run, err, errlen);
    static struct cpu1_job job;
    job = (struct cpu1_job){ .vm = vm };
    pthread_t t;
    if (pthread_create(&t, NULL, cpu1_thread, &job)) {
        snprintf(err, errlen, "pthread_create failed");
        return -1;
    }
    int rc = l1_run(vm->vcpu, vm->run, err, errlen);
    if (rc < 0)  /* vCPU 1 may be waiting for a turn that will not come */
        __atomic_store_n((uint64_t *)(vm->mem + SYNC_ABORT), 1, __ATOMIC_SEQ_CST);
    pthread_join(t, NULL);
    if (rc == 0 && job.rc < 0) {
        snprintf(err, errlen, "vCPU 1: %s", job.err);
        rc = -1;
    }
    return rc;
}

/* L2's own page tables (32-bit, CR4.PSE): its first 4M mapped 1:1 by a 4M page (its code),
 * V by a 4K entry of L2_PT that points at `target` (an L2-physical address). */
static inline void l2_paging(uint8_t *mem, uint64_t target)
{
    put32(mem + L2_PGD, 0x87);                              /* 0..4M: P RW US PS */
    put32(mem + L2_PGD + 4, (uint32_t)L2_PT | 7);
    put32(mem + L2_PT, (uint32_t)target | 7);
}
#define L2_PTE L2_PT                /* the entry that maps V */

static inline struct result *results(struct vm *vm)
{
    return (struct result *)(vm->mem + RESULTS);
}
static inline struct result *results1(struct vm *vm)
{
    return (struct result *)(vm->mem + RESULTS1);
}

#endif
