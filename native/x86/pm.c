/*
 * ACPI hardware-reduced sleep registers (FADT SLEEP_CONTROL_REG at 0x600, SLEEP_STATUS_REG
 * at 0x601). Writing SLP_TYP 5 (our \_S5) with SLP_EN powers the machine off.
 */
#include "../devices.h"

#define SLP_EN 0x20
#define SLP_TYP_SHIFT 2
#define SLP_TYP_MASK 0x7
#define SLP_TYP_S5 5

void fl_pm_init(struct fl_pm *pm, struct fl_sink sink)
{
	pm->s.sleep_status = 0;
	pm->sink = sink;
}

void fl_pm_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_pm *pm = dev;

	if (!is_write) {
		fl_le_put(data, size, offset == 1 ? pm->s.sleep_status : 0);
		return;
	}
	if (offset == 1) { /* status: write-1-to-clear */
		pm->s.sleep_status &= (uint8_t)~data[0];
		return;
	}
	uint8_t v = data[0];
	if ((v & SLP_EN) && ((v >> SLP_TYP_SHIFT) & SLP_TYP_MASK) == SLP_TYP_S5 && pm->sink.raise)
		pm->sink.raise(pm->sink.ctx, FL_EVENT_POWEROFF, 0, v, "acpi_s5");
}
