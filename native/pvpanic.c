/* pvpanic at port 0x505: the guest reports a panic; the machine keeps running. */
#include "devices.h"

#define PVPANIC_PANICKED 0x01
#define PVPANIC_CRASH_LOADED 0x02

void fl_pvpanic_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_signal_dev *pv = dev;
	uint8_t v = data[0];

	(void)offset;
	if (!is_write) {
		fl_le_put(data, size, PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
		return;
	}
	if (!pv->sink.raise)
		return;
	if (v & PVPANIC_PANICKED)
		pv->sink.raise(pv->sink.ctx, FL_EVENT_CRASHED, 0, v, "pvpanic");
	else if (v & PVPANIC_CRASH_LOADED)
		pv->sink.raise(pv->sink.ctx, FL_EVENT_CRASHED, 0, v, "pvpanic_crash_loaded");
}
