/* isa-debug-exit at port 0xf4, as QEMU's: writing v powers off with status (v << 1) | 1. */
#include "devices.h"

void fl_debugexit_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_signal_dev *dx = dev;

	if (!is_write) {
		fl_le_put(data, size, 0);
		return;
	}
	if (offset != 0 || !dx->sink.raise)
		return; /* only a write at the base port counts */
	uint64_t v = fl_le_get(data, size);
	dx->sink.raise(dx->sink.ctx, FL_EVENT_POWEROFF, (int64_t)((v << 1) | 1), v, "debug_exit");
}
