/* kvm-mutate: does a guest of this KVM see its memory change when userspace changes it?
 *
 * Run inside L1 (a Linux guest hypervisor): it uses L1's KVM API to run a small test VM (L2)
 * whose memory L1 userspace backs, then changes the backing and the mappings: memslot delete,
 * move and re-create, MADV_DONTNEED, munmap and map new contents, mprotect read-only, dirty
 * logging. Each change makes L1's KVM rewrite its nested page tables (EPT/NPT) and flush; L0
 * (the kernel under test) must then invalidate its shadow of those tables. After each change
 * the test checks what L2 observes: new data, zeros, an exit to L1, a dirty bit.
 *
 * Output: TAP, one line per case. Exit 0 all passed, 1 a case failed, 2 setup failed.
 * Usage: kvm-mutate [-n ITERATIONS] [CASE...]
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

#define CODE_GPA   0x0
#define CODE_SIZE  0x10000
#define R_READ     0x1000             /* mov (%esi),%eax; out %eax,$0x10; hlt */
#define R_WRITE    0x1100             /* mov %edi,(%esi); out %al,$0x11; hlt */
#define DATA_GPA   0x100000           /* slot 1: the memory under test */
#define ALT_GPA    0x200000           /* where slot-move moves it */
#define NPAGES     16
#define DATA_SIZE  (NPAGES * 4096ul)
#define PORT_READ  0x10
#define PORT_WRITE 0x11

extern const uint8_t r_read[], r_read_end[], r_write[], r_write_end[];
__asm__(".pushsection .rodata\n"
        ".code32\n"
        "r_read:\n"
        "  mov (%esi), %eax\n"
        "  out %eax, $0x10\n"
        "  hlt\n"
        "r_read_end:\n"
        "r_write:\n"
        "  mov %edi, (%esi)\n"
        "  out %al, $0x11\n"
        "  hlt\n"
        "r_write_end:\n"
        ".code64\n"
        ".popsection\n");

static int kvm;
static long iterations = 50;

struct vm {
    int fd, vcpu;
    struct kvm_run *run;
    size_t run_size;
    uint8_t *code;
    uint8_t *data;           /* backing of slot 1 (MAP_PRIVATE anonymous, 4K pages) */
    uint32_t data_flags;
    uint64_t data_gpa;
};

/* What one access by L2 came to. */
struct outcome {
    int kind;                /* 0 value read/written, 1 MMIO exit, 2 KVM_RUN error */
    int wrote;
    uint32_t value;
    uint64_t mmio_addr;
    int err;
};

static uint8_t *alloc_backing(void)
{
    uint8_t *p = mmap(NULL, DATA_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(2); }
    /* 4K mappings in L1: a huge page would hide leaf-level changes */
    madvise(p, DATA_SIZE, MADV_NOHUGEPAGE);
    memset(p, 0x11, DATA_SIZE);
    return p;
}

static int set_slot(struct vm *vm, int slot, uint64_t gpa, uint64_t size, void *hva, uint32_t flags)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)hva,
    };
    return ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r);
}

static int data_slot(struct vm *vm, uint64_t gpa)
{
    vm->data_gpa = gpa;
    return set_slot(vm, 1, gpa, gpa ? DATA_SIZE : 0, vm->data, vm->data_flags);
}

static int vm_create(struct vm *vm, uint32_t data_flags)
{
    memset(vm, 0, sizeof(*vm));
    vm->fd = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm->fd < 0) { perror("KVM_CREATE_VM"); return -1; }
    vm->code = mmap(NULL, CODE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    memcpy(vm->code + R_READ, r_read, r_read_end - r_read);
    memcpy(vm->code + R_WRITE, r_write, r_write_end - r_write);
    if (set_slot(vm, 0, CODE_GPA, CODE_SIZE, vm->code, 0) < 0) { perror("code slot"); return -1; }
    vm->data = alloc_backing();
    vm->data_flags = data_flags;
    if (data_slot(vm, DATA_GPA) < 0) { perror("data slot"); return -1; }
    vm->vcpu = ioctl(vm->fd, KVM_CREATE_VCPU, 0);
    if (vm->vcpu < 0) { perror("KVM_CREATE_VCPU"); return -1; }
    vm->run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
    struct kvm_sregs s;
    if (ioctl(vm->vcpu, KVM_GET_SREGS, &s) < 0) { perror("GET_SREGS"); return -1; }
    /* 32-bit flat protected mode, paging off: L2 addresses are guest-physical */
    struct kvm_segment cs = { .base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
                              .present = 1, .db = 1, .s = 1, .g = 1 };
    struct kvm_segment ds = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3,
                              .present = 1, .db = 1, .s = 1, .g = 1 };
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.cr0 = 0x11;
    if (ioctl(vm->vcpu, KVM_SET_SREGS, &s) < 0) { perror("SET_SREGS"); return -1; }
    return 0;
}

static void vm_destroy(struct vm *vm)
{
    munmap(vm->run, vm->run_size);
    close(vm->vcpu);
    close(vm->fd);
    munmap(vm->code, CODE_SIZE);
    munmap(vm->data, DATA_SIZE);
}

/* Let L2 run one routine to its hlt; say what its memory access came to. */
static struct outcome access_gpa(struct vm *vm, uint64_t routine, uint64_t gpa, uint32_t val)
{
    struct outcome o = { 0, routine == R_WRITE, 0, 0, 0 };
    struct kvm_regs regs = { .rip = routine, .rsi = gpa, .rdi = val, .rflags = 0x2,
                             .rsp = 0x8000 };
    if (ioctl(vm->vcpu, KVM_SET_REGS, &regs) < 0) { o.kind = 2; o.err = errno; return o; }
    for (int k = 0; k < 8; k++) {
        if (ioctl(vm->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            o.kind = 2; o.err = errno;
            return o;
        }
        struct kvm_run *r = vm->run;
        switch (r->exit_reason) {
        case KVM_EXIT_IO:
            if (r->io.port == PORT_READ && o.kind == 0)
                memcpy(&o.value, (uint8_t *)r + r->io.data_offset, 4);
            continue;
        case KVM_EXIT_MMIO:
            o.kind = 1;
            o.mmio_addr = r->mmio.phys_addr;
            if (!r->mmio.is_write) memset(r->mmio.data, 0xff, sizeof r->mmio.data);
            continue;
        case KVM_EXIT_HLT:
            return o;
        default:
            o.kind = 2; o.err = -(int)r->exit_reason;
            return o;
        }
    }
    o.kind = 2; o.err = -1000;
    return o;
}

static struct outcome l2_read(struct vm *vm, uint64_t gpa) { return access_gpa(vm, R_READ, gpa, 0); }
static struct outcome l2_write(struct vm *vm, uint64_t gpa, uint32_t v) { return access_gpa(vm, R_WRITE, gpa, v); }

static void describe(char *buf, size_t len, struct outcome o)
{
    if (o.kind == 0 && o.wrote) snprintf(buf, len, "L2's write went through");
    else if (o.kind == 0) snprintf(buf, len, "L2 read %#x", o.value);
    else if (o.kind == 1) snprintf(buf, len, "MMIO exit at %#llx", (unsigned long long)o.mmio_addr);
    else snprintf(buf, len, "KVM_RUN failed (%s)", o.err > 0 ? strerror(o.err) : "unexpected exit");
}

/* Per-case bookkeeping: count checks, remember the first failure. */
struct tally { const char *name; long checks, bad, first_iter; char first[256]; double t0; };

static void check(struct tally *t, long iter, int ok, const char *expected, struct outcome o)
{
    t->checks++;
    if (ok) return;
    if (!t->bad++) {
        char got[128];
        describe(got, sizeof got, o);
        t->first_iter = iter;
        snprintf(t->first, sizeof t->first, "%s, expected %s", got, expected);
    }
}

static int done(struct tally *t, const char *setup_error)
{
    return tap_result(t->name, t->checks, t->bad, t->first_iter, t->first, now() - t->t0,
                      setup_error);
}

static uint32_t stamp(long i, int k) { return 0xC0DE0000u ^ (uint32_t)(i * 131 + k * 7 + 1); }
static void fill(uint8_t *page, uint32_t v) { for (int k = 0; k < 4096; k += 4) memcpy(page + k, &v, 4); }
static int is_value(struct outcome o, uint32_t v) { return o.kind == 0 && o.value == v; }
static int is_mmio(struct outcome o, uint64_t a) { return o.kind == 1 && o.mmio_addr == a; }

#define SETUP(t, flags) struct vm vm; if (vm_create(&vm, flags) < 0) return done(&(t), "vm_create")

/* delete the memslot: L2's access must exit to userspace as MMIO; re-create: data again */
static int case_slot_delete(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, 0);
    for (long i = 0; i < iterations; i++) {
        uint64_t off = (i % NPAGES) * 4096;
        uint32_t v = stamp(i, 0);
        fill(vm.data + off, v);
        struct outcome o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v), "the slot's data", o);
        if (data_slot(&vm, 0) < 0) return done(&t, "delete slot");
        o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_mmio(o, DATA_GPA + off), "an MMIO exit (slot deleted)", o);
        fill(vm.data + off, v + 1);
        if (data_slot(&vm, DATA_GPA) < 0) return done(&t, "re-create slot");
        o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v + 1), "the re-created slot's data", o);
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

/* move the memslot between two GPAs: the old one must exit as MMIO, the new one read data */
static int case_slot_move(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, 0);
    for (long i = 0; i < iterations; i++) {
        uint64_t off = (i % NPAGES) * 4096;
        uint64_t from = vm.data_gpa, to = from == DATA_GPA ? ALT_GPA : DATA_GPA;
        uint32_t v = stamp(i, 1);
        fill(vm.data + off, v);
        struct outcome o = l2_read(&vm, from + off);
        check(&t, i, is_value(o, v), "the slot's data", o);
        if (data_slot(&vm, to) < 0) return done(&t, "move slot");
        o = l2_read(&vm, to + off);
        check(&t, i, is_value(o, v), "the data at the slot's new GPA", o);
        o = l2_read(&vm, from + off);
        check(&t, i, is_mmio(o, from + off), "an MMIO exit at the slot's old GPA", o);
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

/* re-create the memslot on a different userspace buffer: L2 must read the new buffer */
static int case_slot_new_backing(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, 0);
    for (long i = 0; i < iterations; i++) {
        uint64_t off = (i % NPAGES) * 4096;
        uint32_t v = stamp(i, 2);
        fill(vm.data + off, v);
        struct outcome o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v), "the slot's data", o);
        uint8_t *fresh = alloc_backing();
        fill(fresh + off, v ^ 0xFFFF);
        if (data_slot(&vm, 0) < 0) return done(&t, "delete slot");
        munmap(vm.data, DATA_SIZE);
        vm.data = fresh;
        if (data_slot(&vm, DATA_GPA) < 0) return done(&t, "re-create slot");
        o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v ^ 0xFFFF), "the new buffer's data", o);
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

/* MADV_DONTNEED drops the backing page: L2 must read zeros, never the old data */
static int case_madvise(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, 0);
    for (long i = 0; i < iterations; i++) {
        uint64_t off = (i % NPAGES) * 4096;
        uint32_t v = stamp(i, 3);
        fill(vm.data + off, v);
        struct outcome o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v), "the page's data", o);
        if (madvise(vm.data + off, 4096, MADV_DONTNEED) < 0) return done(&t, "madvise");
        o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, 0), "zeros after MADV_DONTNEED", o);
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

/* replace the backing page by a new page with new contents at the same address. The new page
 * is made before the old one goes (mremap over it), so it cannot be the old page recycled:
 * a stale translation would show the old contents. */
static int case_remap(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, 0);
    for (long i = 0; i < iterations; i++) {
        uint64_t off = (i % NPAGES) * 4096;
        uint32_t v = stamp(i, 4);
        fill(vm.data + off, v);
        struct outcome o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v), "the page's data", o);
        uint8_t *fresh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                              -1, 0);
        if (fresh == MAP_FAILED) return done(&t, "mmap");
        fill(fresh, v ^ 0x5555);
        if (mremap(fresh, 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED, vm.data + off) == MAP_FAILED)
            return done(&t, "mremap");
        o = l2_read(&vm, DATA_GPA + off);
        check(&t, i, is_value(o, v ^ 0x5555), "the new mapping's data", o);
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

/* mprotect(PROT_READ): L2's write must fail into L1 userspace and not reach the page */
static int case_mprotect(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, 0);
    for (long i = 0; i < iterations; i++) {
        uint64_t off = (i % NPAGES) * 4096;
        uint32_t v = stamp(i, 5), old;
        struct outcome o = l2_write(&vm, DATA_GPA + off, v);   /* mapped writable in L1's TDP */
        memcpy(&old, vm.data + off, 4);
        check(&t, i, o.kind == 0 && old == v, "the write to land", o);
        if (mprotect(vm.data + off, 4096, PROT_READ) < 0) return done(&t, "mprotect RO");
        o = l2_write(&vm, DATA_GPA + off, v + 1);
        memcpy(&old, vm.data + off, 4);
        check(&t, i, o.kind == 2 && o.err == EFAULT && old == v,
              "KVM_RUN to fail with EFAULT, page unchanged", o);
        if (mprotect(vm.data + off, 4096, PROT_READ | PROT_WRITE) < 0) return done(&t, "mprotect RW");
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

/* dirty logging: after KVM_GET_DIRTY_LOG the page is write-protected again, so the next
 * L2 write to it must be logged */
static int case_dirty_log(const char *name)
{
    struct tally t = { .name = name, .t0 = now() };
    SETUP(t, KVM_MEM_LOG_DIRTY_PAGES);
    uint64_t bitmap[(NPAGES + 63) / 64];
    struct kvm_dirty_log log = { .slot = 1, .dirty_bitmap = bitmap };
    for (int k = 0; k < NPAGES; k++)      /* make every page present and writable first */
        l2_write(&vm, DATA_GPA + k * 4096ul, 1);
    for (long i = 0; i < iterations; i++) {
        int page = i % NPAGES;
        if (ioctl(vm.fd, KVM_GET_DIRTY_LOG, &log) < 0) return done(&t, "GET_DIRTY_LOG");
        struct outcome o = l2_write(&vm, DATA_GPA + page * 4096ul, stamp(i, 6));
        memset(bitmap, 0, sizeof bitmap);
        if (ioctl(vm.fd, KVM_GET_DIRTY_LOG, &log) < 0) return done(&t, "GET_DIRTY_LOG");
        int set = (bitmap[page / 64] >> (page % 64)) & 1;
        int others = 0;
        for (int k = 0; k < NPAGES; k++)
            if (k != page && ((bitmap[k / 64] >> (k % 64)) & 1)) others++;
        if (o.kind == 0 && !set) {
            t.checks++;
            if (!t.bad++) {
                t.first_iter = i;
                snprintf(t.first, sizeof t.first, "page %d written by L2 but not in the dirty log", page);
            }
            continue;
        }
        check(&t, i, o.kind == 0 && set && !others, "exactly the written page in the dirty log", o);
    }
    vm_destroy(&vm);
    return done(&t, NULL);
}

struct tcase { const char *name; int (*fn)(const char *); };
static const struct tcase cases[] = {
    { "kvm/slot-delete", case_slot_delete },
    { "kvm/slot-move", case_slot_move },
    { "kvm/slot-new-backing", case_slot_new_backing },
    { "kvm/madvise-dontneed", case_madvise },
    { "kvm/remap-new-page", case_remap },
    { "kvm/mprotect-ro", case_mprotect },
    { "kvm/dirty-log", case_dirty_log },
};
#define NCASES (int)(sizeof(cases) / sizeof(cases[0]))

static const char *case_name(int c) { return cases[c].name; }
static int run_case(int c) { return cases[c].fn(cases[c].name); }

static const char *prepare(void)
{
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        printf("Bail out! /dev/kvm: %s\n", strerror(errno));
        return LABTEST_BAIL;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct labtest t = {
        .prog = "kvm-mutate", .ncases = NCASES, .name = case_name,
        .iterations = &iterations, .min_iter = 1, .max_iter = 100000,
        .prepare = prepare, .run = run_case,
    };
    return labtest_main(argc, argv, &t);
}
