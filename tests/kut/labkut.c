/*
 * labkut: a small test program that behaves as a kvm-unit-tests test does, so that the lab's
 * kvm-unit-tests runner (lab/peers/kut.py) is tested against a real guest without the suite
 * itself (which Debian does not package). Booted by QEMU as a multiboot kernel, it prints
 * PASS/FAIL/SKIP lines and a SUMMARY line on the serial port and ends through the isa-debug-exit
 * device at 0xf4, whose status convention it shares: exit(code) makes QEMU exit with
 * (code << 1) | 1, so 1 is success, 3 is failure and 77 is "everything skipped".
 *
 * What it checks is real: that it was entered by a multiboot loader, that it runs under a
 * hypervisor, and under KVM (the CPUID signature); whether the virtual CPU offers SVM or VMX
 * (SKIP when neither). Its command line (test_args) asks for the runner's other paths:
 * "fail" adds a failing check, "skip" skips everything, "hang" never exits (a timeout),
 * "tcg" expects no KVM signature.
 */
#include <stdint.h>

#define MULTIBOOT_MAGIC 0x2BADB002u
#define MBI_CMDLINE (1u << 2)

static int tests, failures, skipped;

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static void cpuid(uint32_t leaf, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			 : "a"(leaf), "c"(0));
}

static void puts_serial(const char *s)
{
	for (; *s; s++)
		outb(0x3f8, (uint8_t)*s);
}

static void put_uint(unsigned v)
{
	char buf[12];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i);
	puts_serial(&buf[i]);
}

static void report(const char *verdict, const char *name, const char *why)
{
	puts_serial(verdict);
	puts_serial(": labkut: ");
	puts_serial(name);
	if (why) {
		puts_serial(" (");
		puts_serial(why);
		puts_serial(")");
	}
	puts_serial("\n");
}

static void check(int ok, const char *name)
{
	tests++;
	if (!ok)
		failures++;
	report(ok ? "PASS" : "FAIL", name, 0);
}

static void skip(const char *name, const char *why)
{
	tests++;
	skipped++;
	report("SKIP", name, why);
}

/* Is `word` one of the space-separated words of `s`? */
static int has_word(const char *s, const char *word)
{
	while (s && *s) {
		const char *w = word;
		const char *p = s;

		while (*p && *p != ' ' && *w && *p == *w) {
			p++;
			w++;
		}
		if (!*w && (!*p || *p == ' '))
			return 1;
		while (*s && *s != ' ')
			s++;
		while (*s == ' ')
			s++;
	}
	return 0;
}

static int equal12(const char *a, const char *b)
{
	for (int i = 0; i < 12; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

uint32_t labkut_main(uint32_t magic, const uint32_t *mbi)
{
	const char *args = "";
	uint32_t r[4];
	char sig[12];

	if (magic == MULTIBOOT_MAGIC && (mbi[0] & MBI_CMDLINE))
		args = (const char *)(uintptr_t)mbi[4];
	puts_serial("labkut: args: ");
	puts_serial(args);
	puts_serial("\n");

	if (has_word(args, "hang")) {
		puts_serial("labkut: hanging as asked\n");
		for (;;)
			__asm__ volatile("hlt");
	}
	if (has_word(args, "skip")) {
		skip("multiboot entry", "asked to skip");
		skip("hypervisor", "asked to skip");
	} else {
		check(magic == MULTIBOOT_MAGIC, "multiboot entry");
		cpuid(1, r);
		check(!!(r[2] & (1u << 31)), "hypervisor bit");
		cpuid(0x40000000, r);
		((uint32_t *)sig)[0] = r[1];
		((uint32_t *)sig)[1] = r[2];
		((uint32_t *)sig)[2] = r[3];
		if (has_word(args, "tcg"))
			check(!equal12(sig, "KVMKVMKVM\0\0\0"), "no KVM signature under tcg");
		else
			check(equal12(sig, "KVMKVMKVM\0\0\0"), "KVM signature");
		cpuid(1, r);
		int vmx = !!(r[2] & (1u << 5));
		cpuid(0x80000000, r);
		int svm = 0;
		if (r[0] >= 0x80000001) {
			cpuid(0x80000001, r);
			svm = !!(r[2] & (1u << 2));
		}
		if (svm || vmx)
			check(1, svm ? "svm offered" : "vmx offered");
		else
			skip("svm or vmx offered", "the CPU model has neither");
		if (has_word(args, "fail"))
			check(0, "asked to fail");
	}
	puts_serial("SUMMARY: ");
	put_uint((unsigned)tests);
	puts_serial(" tests, ");
	put_uint((unsigned)failures);
	puts_serial(" unexpected failures");
	if (skipped) {
		puts_serial(", ");
		put_uint((unsigned)skipped);
		puts_serial(" skipped");
	}
	puts_serial("\n");
	if (tests == skipped)
		return 77 >> 1;
	return failures ? 1 : 0;
}

void labkut_exit(uint32_t code)
{
	outl(0xf4, code);
}
