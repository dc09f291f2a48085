/*
 * The reset control register at port 0xCF9, as on the PIIX/ICH chipsets QEMU models: a write
 * with RST_CPU (bit 2) set resets the machine (-> REBOOT). The FADT names it as the ACPI
 * RESET_REG (value 0x06), so `reboot=acpi` and `reboot=pci` both land here. Stateless: reads
 * return 0 (no reset pending), so a read-modify-write sequence works.
 */
#include "devices.h"

#define RCR_RST_CPU 0x04

void fl_resetctl_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_signal_dev *rc = dev;

	(void)offset;
	if (!is_write) {
		fl_le_put(data, size, 0);
		return;
	}
	if ((data[0] & RCR_RST_CPU) && rc->sink.raise)
		rc->sink.raise(rc->sink.ctx, FL_EVENT_REBOOT, 0, data[0], "reset_control");
}
