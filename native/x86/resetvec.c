/*
 * The reset vector (F000:FFF0 = 0xFFFF0): the one piece of "firmware" the machine has.
 *
 * Linux on hardware-reduced ACPI without EFI runtime services picks reboot=efi, which falls
 * through to a "BIOS" reboot: it switches to real mode and jumps to the reset vector, as a
 * real CPU does after a reset, expecting the firmware there to reset the board. With nothing
 * there the guest spins forever on zero bytes. These bytes reset through the i8042 instead;
 * they decode the same in real, 16-bit and 32-bit protected mode:
 *   mov al, 0xfe; out 0x64, al; cli; hlt; jmp $-3 (back to hlt)
 */
#include <errno.h>
#include <string.h>

#include "../vmm.h"
#include "layout.h"

static const uint8_t reset_stub[] = {0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd};

int fl_reset_vector_write(struct fl_vm *vm)
{
	uint8_t *p = fl_mem_ptr(&vm->mem, FL_RESET_VECTOR_GPA, FL_BIOS_END - FL_RESET_VECTOR_GPA);

	if (!p)
		return fl_fail(vm, EINVAL, "no RAM behind the reset vector");
	memset(p, 0xf4, FL_BIOS_END - FL_RESET_VECTOR_GPA); /* hlt */
	memcpy(p, reset_stub, sizeof(reset_stub));
	return 0;
}
