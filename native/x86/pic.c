/*
 * Ports 0x20/0x21 and 0xA0/0xA1 without 8259s behind them (the MADT has no PCAT_COMPAT and
 * the FADT is hardware-reduced). They answer as two PICs with every input masked and nothing
 * pending, so a guest that masks them first, or probes the mask register, reads what it
 * expects; everything it writes (ICWs, OCWs, EOIs, masks) is absorbed.
 */
#include "../devices.h"

void fl_pic_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	(void)dev;
	if (is_write)
		return;
	/* Offset 0: IRR/ISR/poll, all empty; offset 1: the interrupt mask register. */
	for (uint32_t i = 0; i < size; i++)
		data[i] = offset + i == 1 ? 0xff : 0x00;
}
