/* Port-I/O and MMIO dispatch: a short table of ranges, searched linearly. */
#include <errno.h>
#include <string.h>

#include "devices.h"

int fl_bus_add(struct fl_bus *bus, uint64_t base, uint64_t len, const char *name, void *dev,
	       fl_io_fn fn)
{
	struct fl_counters *c = bus->counters;

	if (len == 0 || base + len < base)
		return -EINVAL;
	if (bus->n >= FL_MAX_DEVICES || c->ndevices >= FL_MAX_DEVICES)
		return -ENOSPC;
	for (uint32_t i = 0; i < bus->n; i++) {
		const struct fl_bus_range *r = &bus->ranges[i];
		if (base < r->base + r->len && r->base < base + len)
			return -EEXIST;
	}
	struct fl_device_counters *dc = &c->devices[c->ndevices++];
	memset(dc, 0, sizeof(*dc));
	strncpy(dc->name, name, sizeof(dc->name) - 1);
	bus->ranges[bus->n++] = (struct fl_bus_range){
		.base = base, .len = len, .dev = dev, .fn = fn, .ctr = dc};
	return 0;
}

int fl_bus_dispatch(struct fl_bus *bus, uint64_t addr, uint8_t *data, uint32_t size,
		    int is_write)
{
	if (size == 0 || size > 8)
		return -EINVAL;
	for (uint32_t i = 0; i < bus->n; i++) {
		struct fl_bus_range *r = &bus->ranges[i];
		if (addr < r->base || addr - r->base >= r->len)
			continue;
		/* An access straddling the end of a range is refused as a whole. */
		if (size > r->len - (addr - r->base))
			return -ENOENT;
		/*
		 * Counted before the device acts: a handler may raise a machine event (debug exit,
		 * ACPI S5, i8042 reset), and whoever reads that event must find the access counted.
		 * Release ordering, and fl_event_raise publishes the event under ev_lock after
		 * this, so a reader that got the event (under the same lock) sees these counts.
		 */
		if (is_write) {
			__atomic_add_fetch(&r->ctr->writes, 1, __ATOMIC_RELEASE);
			__atomic_add_fetch(&r->ctr->bytes_out, size, __ATOMIC_RELEASE);
		} else {
			__atomic_add_fetch(&r->ctr->reads, 1, __ATOMIC_RELEASE);
			__atomic_add_fetch(&r->ctr->bytes_in, size, __ATOMIC_RELEASE);
		}
		r->fn(r->dev, addr - r->base, data, size, is_write);
		return 0;
	}
	return -ENOENT;
}
