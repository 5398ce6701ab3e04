/* Multiboot (v1) entry of the lab's kvm-unit-tests stand-in: QEMU's -kernel loads an ELF32 with
 * this header, as it loads kvm-unit-tests' .flat files, and enters it in 32-bit protected mode
 * with EAX = the bootloader magic and EBX = the multiboot information. */
	.section .multiboot, "a"
	.align 4
	.long 0x1BADB002		/* magic */
	.long 0			/* flags: an ELF needs no address fields */
	.long -0x1BADB002		/* checksum */

	.text
	.globl _start
_start:
	mov $stack_top, %esp
	push %ebx
	push %eax
	call labkut_main
	push %eax
	call labkut_exit
1:	hlt
	jmp 1b

	.bss
	.align 16
	.space 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
