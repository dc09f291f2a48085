/*
 * The machine's interrupt-relevant device state as text, for a person looking at a guest that
 * stands still (QEMU's `info irq`, `info pic` and `info virtio-queue-status` in one): the
 * IOAPIC's lines and live redirection entries, the UART's registers, and for each virtio
 * queue our indexes beside the guest's. Each device is read under its own lock; the machine
 * may run meanwhile, so the parts are each consistent, not the whole.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "virtio/virtio.h"
#include "vmm.h"

void fl_text_put(struct fl_text *t, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (t->used + 1 >= t->len)
		return;
	va_start(ap, fmt);
	n = vsnprintf(t->buf + t->used, t->len - t->used, fmt, ap);
	va_end(ap);
	if (n > 0)
		t->used += (size_t)n < t->len - t->used ? (size_t)n : t->len - t->used - 1;
}

static void describe_ioapic(struct fl_vm *vm, struct fl_text *t)
{
	struct fl_ioapic *io = &vm->ioapic;

	pthread_mutex_lock(&io->lock);
	fl_text_put(t, "ioapic: lines=0x%x dropped=%llu irq_errors=%llu\n", io->s.lines,
		    (unsigned long long)io->dropped, (unsigned long long)vm->irq_errors);
	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++) {
		uint64_t e = io->s.redir[p];
		int masked = (e >> 16) & 1, line = (io->s.lines >> p) & 1;
		if (masked && !line && !(e & (1ULL << 14)))
			continue;
		fl_text_put(t,
			    "  pin %u: vector %llu mode %llu dest %llu%s %s%s%s line=%d route=%s "
			    "irqfd=%s\n",
			    p, (unsigned long long)(e & 0xff), (unsigned long long)((e >> 8) & 7),
			    (unsigned long long)(e >> 56), (e >> 11) & 1 ? " logical" : "",
			    (e >> 15) & 1 ? "level" : "edge", masked ? " masked" : "",
			    (e >> 14) & 1 ? " remote-irr" : "", line,
			    io->routed_present[p] ? "yes" : "no",
			    (io->want_route >> p) & 1 ? "yes" : "no");
	}
	pthread_mutex_unlock(&io->lock);
}

static void describe_serial(struct fl_vm *vm, struct fl_text *t)
{
	struct fl_serial *u = &vm->serial;

	pthread_mutex_lock(&u->lock);
	/* No LSR: it is computed on each read (THR always empty, DR from rx_count). */
	fl_text_put(t,
		    "serial: ier=0x%x lcr=0x%x mcr=0x%x fcr=0x%x thr_ipending=%u rx_count=%u "
		    "irq_level=%d\n",
		    u->s.ier, u->s.lcr, u->s.mcr, u->s.fcr, u->s.thr_ipending, u->s.rx_count,
		    u->irq_level);
	pthread_mutex_unlock(&u->lock);
}

static uint16_t guest16(const uint8_t *p)
{
	return p ? __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED) : 0;
}

static void describe_virtio(struct fl_vm *vm, struct fl_text *t)
{
	for (uint32_t slot = 0; slot < vm->nvirtio; slot++) {
		struct fl_virtio_dev *d = vm->virtio[slot].dev;
		pthread_mutex_lock(&d->lock);
		fl_text_put(t,
			    "virtio %u (%s, pin %u): status=0x%x interrupt_status=0x%x "
			    "interrupts=%llu%s\n",
			    slot, d->name, vm->virtio[slot].gsi, d->s.status, d->s.interrupt_status,
			    (unsigned long long)d->interrupts, d->s.broken ? " broken" : "");
		for (uint32_t q = 0; q < d->nqueues; q++) {
			struct fl_vq *vq = &d->vq[q];
			if (!vq->enabled) {
				fl_text_put(t, "  queue %u: not enabled\n", q);
				continue;
			}
			/* The guest's side, read as it stands: avail flags and idx, used idx. */
			fl_text_put(t,
				    "  queue %u: size %u; ours: last_avail %u used_idx %u; guest's: "
				    "avail.idx %u avail.flags 0x%x used.idx %u\n",
				    q, vq->cfg.size, vq->last_avail, vq->used_idx,
				    guest16(vq->avail + 2), guest16(vq->avail), guest16(vq->used + 2));
		}
		pthread_mutex_unlock(&d->lock);
	}
}

int fl_vm_describe(struct fl_vm *vm, char *buf, size_t len)
{
	struct fl_text t = {.buf = buf, .len = len, .used = 0};

	if (!vm || !buf || len == 0)
		return -EINVAL;
	buf[0] = '\0';
	if (!vm->devices_ready)
		return fl_fail(vm, EAGAIN, "the machine's devices are not built yet");
	describe_ioapic(vm, &t);
	describe_serial(vm, &t);
	describe_virtio(vm, &t);
	return (int)t.used;
}
