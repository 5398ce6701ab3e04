// SPDX-License-Identifier: GPL-2.0-only
/*
 * pvhboot: boot an uncompressed vmlinux through its PVH entry, from a multiboot loader
 * (syslinux's mboot.c32). Under Bochs, the bzImage's own decompressor (xz) takes ~43 s of a
 * ~77 s boot; copying the ELF's segments takes well under a second.
 *
 * mboot.c32 loads this program and two modules: the vmlinux ELF, whose module command line
 * after its first word is the kernel's command line, and the initramfs. We move both modules
 * out of the kernel's way, copy the ELF's PT_LOAD segments to their physical addresses, and
 * enter the kernel at XEN_ELFNOTE_PHYS32_ENTRY in 32-bit protected mode with paging off and
 * %ebx pointing at a struct hvm_start_info (version 1: command line, initramfs, memory map),
 * as arch/x86/platform/pvh/head.S expects.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, want a memory map */

__attribute__((section(".multiboot"), used, aligned(4)))
static const u32 mb_header[3] = { MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS) };

struct mb_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
	u32 syms[4], mmap_length, mmap_addr;
};
struct mb_mod { u32 start, end, string, reserved; };
struct mb_mmap { u32 size; u64 addr, len; u32 type; } __attribute__((packed));

struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};
struct hvm_modlist_entry { u64 paddr, size, cmdline_paddr, reserved; };
struct hvm_memmap_table_entry { u64 addr, size; u32 type, reserved; };

struct elf64_ehdr {
	u8 ident[16]; u16 type, machine; u32 version; u64 entry, phoff, shoff;
	u32 flags; u16 ehsize, phentsize, phnum, shentsize, shnum, shstrndx;
};
struct elf64_phdr { u32 type, flags; u64 offset, vaddr, paddr, filesz, memsz, align; };
struct elf_note { u32 namesz, descsz, type; };

#define PT_LOAD 1
#define PT_NOTE 4
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MAX_MAP 64

static struct hvm_start_info start_info;
static struct hvm_modlist_entry module;
static struct hvm_memmap_table_entry memmap[MAX_MAP];
static char cmdline[2048];

static void *copy(void *dst, const void *src, u32 n)
{
	u8 *d = dst;
	const u8 *s = src;

	if (d < s)
		while (n--)
			*d++ = *s++;
	else
		while (n--)
			d[n] = s[n];
	return dst;
}

static void zero(void *dst, u32 n)
{
	u8 *d = dst;

	while (n--)
		*d++ = 0;
}

static void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void say(const char *s)  /* COM1, already set up by the BIOS and ISOLINUX */
{
	for (; *s; s++) {
		while (!(inb(0x3f8 + 5) & 0x20))
			;
		outb(0x3f8, *s);
	}
}

static void die(const char *why)
{
	say("pvhboot: ");
	say(why);
	say("\r\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

static u32 align_up(u32 v, u32 a) { return (v + a - 1) & ~(a - 1); }

void pvhboot_main(u32 magic, struct mb_info *mbi)
{
	struct mb_mod *mods = (struct mb_mod *)mbi->mods_addr;
	u32 kernel_end = 0, top, ram_top = 0, n = 0, entry = 0, i;
	struct elf64_ehdr *eh;
	struct elf64_phdr *ph;
	const char *arg;

	if (magic != 0x2BADB002)
		die("not started by a multiboot loader");
	if (!(mbi->flags & (1 << 3)) || mbi->mods_count != 2)
		die("expected two modules: vmlinux, initramfs");
	if (!(mbi->flags & (1 << 6)))
		die("no memory map");

	/* The memory map, for the kernel; and the top of the RAM block above 1 MB. */
	for (u32 off = 0; off < mbi->mmap_length && n < MAX_MAP;) {
		struct mb_mmap *m = (struct mb_mmap *)(mbi->mmap_addr + off);

		memmap[n].addr = m->addr;
		memmap[n].size = m->len;
		memmap[n].type = m->type;
		n++;
		/* The RAM block holding 1 MB, below 4 GB: where everything here happens. */
		if (m->type == 1 && m->addr <= 0x100000 && m->addr + m->len > 0x100000)
			ram_top = m->addr + m->len > 0xfffff000ULL ? 0xfffff000u
								    : (u32)(m->addr + m->len);
		off += m->size + 4;
	}

	eh = (struct elf64_ehdr *)mods[0].start;
	if (eh->ident[0] != 0x7f || eh->ident[1] != 'E' || eh->ident[4] != 2)
		die("module 1 is not a 64-bit ELF vmlinux");
	ph = (struct elf64_phdr *)(mods[0].start + (u32)eh->phoff);
	for (i = 0; i < eh->phnum; i++) {
		if (ph[i].type == PT_LOAD && (u32)(ph[i].paddr + ph[i].memsz) > kernel_end)
			kernel_end = (u32)(ph[i].paddr + ph[i].memsz);
		if (ph[i].type == PT_NOTE) {
			u32 p = mods[0].start + (u32)ph[i].offset, e = p + (u32)ph[i].filesz;

			while (p + sizeof(struct elf_note) <= e) {
				struct elf_note *nt = (struct elf_note *)p;
				const char *name = (const char *)(p + sizeof(*nt));
				u32 desc = p + sizeof(*nt) + align_up(nt->namesz, 4);

				if (nt->type == XEN_ELFNOTE_PHYS32_ENTRY && nt->namesz == 4 &&
				    name[0] == 'X' && name[1] == 'e' && name[2] == 'n')
					entry = *(u32 *)desc;
				p = desc + align_up(nt->descsz, 4);
			}
		}
	}
	if (!entry)
		die("the vmlinux has no PVH entry (CONFIG_PVH)");

	/* Move the initramfs to the top of RAM and the vmlinux just below it: both out of
	 * the way of the kernel's segments (and the initramfs where Linux keeps it). */
	{
		u32 isize = mods[1].end - mods[1].start, ksize = mods[0].end - mods[0].start;
		u32 idst = (ram_top - isize) & ~0xfffu, kdst = (idst - ksize) & ~0xfffu;

		if (kdst < align_up(kernel_end, 0x1000))
			die("not enough memory above the kernel");
		if (mods[1].start < mods[0].end || idst < mods[1].start)
			die("unexpected module placement");
		/* Order matters when the ranges overlap: the initramfs first, to the top. */
		copy((void *)idst, (void *)mods[1].start, isize);
		copy((void *)kdst, (void *)mods[0].start, ksize);
		module.paddr = idst;
		module.size = isize;
		eh = (struct elf64_ehdr *)kdst;
		ph = (struct elf64_phdr *)(kdst + (u32)eh->phoff);
		top = kdst;
	}
	for (i = 0; i < eh->phnum; i++) {
		if (ph[i].type != PT_LOAD)
			continue;
		copy((void *)(u32)ph[i].paddr, (void *)(top + (u32)ph[i].offset), (u32)ph[i].filesz);
		zero((void *)(u32)(ph[i].paddr + ph[i].filesz), (u32)(ph[i].memsz - ph[i].filesz));
	}

	/* The kernel's command line: the vmlinux module's, after its first word. */
	arg = (const char *)mods[0].string;
	while (arg && *arg && *arg != ' ')
		arg++;
	while (arg && *arg == ' ')
		arg++;
	for (i = 0; arg && arg[i] && i < sizeof(cmdline) - 1; i++)
		cmdline[i] = arg[i];
	cmdline[i] = 0;

	start_info.magic = 0x336ec578; /* XEN_HVM_START_MAGIC_VALUE */
	start_info.version = 1;
	start_info.nr_modules = 1;
	start_info.modlist_paddr = (u32)&module;
	start_info.cmdline_paddr = (u32)cmdline;
	start_info.memmap_paddr = (u32)memmap;
	start_info.memmap_entries = n;
	say("pvhboot: entering the kernel\r\n");
	__asm__ volatile("cli; jmp *%0" : : "r"(entry), "b"(&start_info) : "memory");
	for (;;)
		;
}

/* The entry: a stack, then pvhboot_main(magic, info) as the multiboot loader left them in
 * %eax and %ebx. push/popsection: the compiler's own code must stay in .text. */
__asm__(".pushsection .text\n"
	".globl _start\n"
	"_start:\n"
	"  mov $stack_top, %esp\n"
	"  push %ebx\n"
	"  push %eax\n"
	"  call pvhboot_main\n"
	"1: hlt\n"
	"  jmp 1b\n"
	".popsection\n"
	".pushsection .bss\n"
	".align 16\n"
	"stack: .skip 16384\n"
	"stack_top:\n"
	".popsection\n");
