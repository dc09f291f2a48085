/*
 * The IOAPIC of a split irqchip: KVM keeps the local APICs, we keep this. 24 pins, version
 * 0x20 (with the EOI register at 0x40), reached through IOREGSEL/IOWIN at 0xFEC00000.
 * An interrupt leaves as an MSI built from the pin's redirection entry. Level-triggered pins
 * hold Remote IRR until the local APIC retires the vector (KVM_EXIT_IOAPIC_EOI, or a write
 * to the EOI register). Masked pins drop edges and ignore levels, as the 82093AA does.
 *
 * Every value here comes from the guest: register indices, pins, vectors, delivery modes and
 * destinations are checked or masked to the bits the hardware has.
 */
#include <errno.h>
#include <string.h>

#include "../devices.h"

#define REG_ID 0x00
#define REG_VERSION 0x01
#define REG_ARB 0x02
#define REG_REDIR 0x10
#define REG_REDIR_END (REG_REDIR + 2 * FL_IOAPIC_PINS)

#define MMIO_REGSEL 0x00
#define MMIO_WIN 0x10
#define MMIO_EOI 0x40

#define VERSION (0x20u | ((FL_IOAPIC_PINS - 1u) << 16))
#define ID_MASK 0xff000000u

#define RE_VECTOR 0xffULL
#define RE_DELIVERY_SHIFT 8
#define RE_LOGICAL (1ULL << 11)
#define RE_REMOTE_IRR (1ULL << 14)
#define RE_LEVEL (1ULL << 15)
#define RE_MASKED (1ULL << 16)
#define RE_DEST_SHIFT 56
/* Guest-writable bits: vector, delivery mode, destination mode, polarity, trigger, mask
 * (low half) and the 8-bit destination (high half). Delivery status stays 0: delivery is
 * immediate. */
#define RE_WRITABLE_LO 0x1afffULL
#define RE_WRITABLE_HI 0xff000000ULL
#define RE_VALID (RE_WRITABLE_LO | RE_REMOTE_IRR | (RE_WRITABLE_HI << 32))

#define DM_FIXED 0
#define DM_LOWEST 1
#define DM_NMI 4

#define MSI_BASE 0xfee00000u

static uint32_t delivery_mode(uint64_t e)
{
	return (uint32_t)(e >> RE_DELIVERY_SHIFT) & 7;
}

/* Fixed and lowest-priority need a real vector (0..15 are exceptions, refused by a real
 * local APIC); NMI ignores it. SMI, INIT, ExtINT and the reserved modes are not delivered:
 * nothing on this machine may reset or wedge a vCPU through the IOAPIC. */
static int deliverable(uint64_t e)
{
	uint32_t dm = delivery_mode(e);

	if (dm == DM_NMI)
		return 1;
	return (dm == DM_FIXED || dm == DM_LOWEST) && (e & RE_VECTOR) >= 16;
}

static int is_level(uint64_t e)
{
	/* An NMI has no EOI: it is always an edge. */
	return (e & RE_LEVEL) && delivery_mode(e) != DM_NMI;
}

static struct fl_msi msi_of(uint64_t e)
{
	uint32_t level = is_level(e);

	return (struct fl_msi){
		.address = MSI_BASE | (uint32_t)((e >> RE_DEST_SHIFT) & 0xff) << 12 |
			   ((e & RE_LOGICAL) ? 1u << 2 : 0),
		.data = (uint32_t)(e & RE_VECTOR) | delivery_mode(e) << 8 | level << 14 |
			level << 15,
	};
}

/* Hands the routes over when they differ from the last ones. A pin needs one while
 * something outside the IOAPIC may raise it, and while a level-triggered vector is in
 * flight: KVM exits on EOI only for vectors it finds in the routes. */
static void sync_routes(struct fl_ioapic *io)
{
	struct fl_msi msi[FL_IOAPIC_PINS];
	uint8_t present[FL_IOAPIC_PINS];
	int changed = !io->routes_sent;

	memset(msi, 0, sizeof(msi));
	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++) {
		uint64_t e = io->s.redir[p];
		int unmasked = !(e & RE_MASKED);
		present[p] = deliverable(e) &&
			     ((unmasked && (is_level(e) || (io->want_route & (1u << p)))) ||
			      (is_level(e) && (e & RE_REMOTE_IRR)));
		if (present[p])
			msi[p] = msi_of(e);
		if (present[p] != io->routed_present[p] ||
		    (present[p] && (msi[p].address != io->routed[p].address ||
				    msi[p].data != io->routed[p].data)))
			changed = 1;
	}
	if (!changed || !io->sink.routes)
		return;
	memcpy(io->routed, msi, sizeof(msi));
	memcpy(io->routed_present, present, sizeof(present));
	io->routes_sent = 1;
	io->sink.routes(io->sink.ctx, msi, present, FL_IOAPIC_PINS);
}

/* Sends pin's interrupt if its line and entry allow it now. */
static void service(struct fl_ioapic *io, uint32_t pin)
{
	uint64_t *e = &io->s.redir[pin];
	struct fl_msi msi;

	if ((*e & RE_MASKED) || !(io->s.lines & (1u << pin)))
		return;
	if (is_level(*e) && (*e & RE_REMOTE_IRR))
		return; /* the last one is not retired yet */
	if (!deliverable(*e)) {
		io->dropped++;
		return;
	}
	if (is_level(*e))
		*e |= RE_REMOTE_IRR;
	msi = msi_of(*e);
	if (io->sink.deliver)
		io->sink.deliver(io->sink.ctx, &msi);
}

static void eoi_locked(struct fl_ioapic *io, uint8_t vector)
{
	uint32_t redeliver = 0;

	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++) {
		uint64_t *e = &io->s.redir[p];
		if (!(*e & RE_REMOTE_IRR) || (*e & RE_VECTOR) != vector)
			continue;
		*e &= ~RE_REMOTE_IRR;
		redeliver |= 1u << p;
	}
	if (!redeliver)
		return;
	sync_routes(io);
	/* A line still asserted interrupts again: that is what level-triggered means. */
	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++)
		if (redeliver & (1u << p))
			service(io, p);
}

static uint32_t reg_read(struct fl_ioapic *io, uint32_t reg)
{
	if (reg == REG_ID)
		return io->s.id;
	if (reg == REG_VERSION)
		return VERSION;
	if (reg == REG_ARB)
		return io->s.id;
	if (reg >= REG_REDIR && reg < REG_REDIR_END) {
		uint64_t e = io->s.redir[(reg - REG_REDIR) / 2];
		return (reg & 1) ? (uint32_t)(e >> 32) : (uint32_t)e;
	}
	return 0;
}

static void reg_write(struct fl_ioapic *io, uint32_t reg, uint32_t v)
{
	if (reg == REG_ID) {
		io->s.id = v & ID_MASK;
		return;
	}
	if (reg < REG_REDIR || reg >= REG_REDIR_END)
		return; /* version, arbitration and unimplemented registers are read-only */

	uint32_t pin = (reg - REG_REDIR) / 2;
	uint64_t *e = &io->s.redir[pin];
	if (reg & 1) {
		*e = (*e & ~(RE_WRITABLE_HI << 32)) | ((uint64_t)(v & RE_WRITABLE_HI) << 32);
	} else {
		*e = (*e & ~RE_WRITABLE_LO) | (v & RE_WRITABLE_LO);
		if (!(*e & RE_LEVEL))
			*e &= ~RE_REMOTE_IRR; /* an edge pin has no EOI to wait for */
	}
	sync_routes(io);
	/* Unmasking a level pin whose line is up interrupts; an edge that came while masked
	 * is gone. */
	if (is_level(*e))
		service(io, pin);
}

void fl_ioapic_mmio(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_ioapic *io = dev;
	uint32_t v = (uint32_t)fl_le_get(data, size);

	pthread_mutex_lock(&io->lock);
	if (offset < MMIO_REGSEL + 4) {
		/* IOREGSEL: its low byte is the index; narrower accesses reach their bytes. */
		uint32_t shift = 8 * (uint32_t)offset;
		if (is_write) {
			if (offset == 0)
				io->s.regsel = v & 0xff;
		} else {
			fl_le_put(data, size, (uint64_t)io->s.regsel >> shift);
		}
	} else if (offset >= MMIO_WIN && offset < MMIO_WIN + 4) {
		uint32_t shift = 8 * (uint32_t)(offset - MMIO_WIN);
		/* Only an aligned 32-bit write changes a register: a partial one would leave a
		 * half-written entry live. Reads of any width see the register's bytes. */
		if (is_write) {
			if (offset == MMIO_WIN && size == 4)
				reg_write(io, io->s.regsel, v);
		} else {
			fl_le_put(data, size, (uint64_t)reg_read(io, io->s.regsel) >> shift);
		}
	} else if (offset == MMIO_EOI) {
		if (is_write)
			eoi_locked(io, (uint8_t)v);
		else
			fl_le_put(data, size, 0);
	} else if (!is_write) {
		fl_le_put(data, size, 0);
	}
	pthread_mutex_unlock(&io->lock);
}

void fl_ioapic_set_level(struct fl_ioapic *io, uint32_t pin, int level)
{
	uint32_t bit;

	if (pin >= FL_IOAPIC_PINS)
		return;
	bit = 1u << pin;
	pthread_mutex_lock(&io->lock);
	if (!level) {
		io->s.lines &= ~bit;
	} else if (!(io->s.lines & bit) || is_level(io->s.redir[pin])) {
		io->s.lines |= bit;
		service(io, pin);
	}
	pthread_mutex_unlock(&io->lock);
}

void fl_ioapic_eoi(struct fl_ioapic *io, uint8_t vector)
{
	pthread_mutex_lock(&io->lock);
	eoi_locked(io, vector);
	pthread_mutex_unlock(&io->lock);
}

int fl_ioapic_want_route(struct fl_ioapic *io, uint32_t pin, int on)
{
	if (pin >= FL_IOAPIC_PINS)
		return -EINVAL;
	pthread_mutex_lock(&io->lock);
	if (on)
		io->want_route |= 1u << pin;
	else
		io->want_route &= ~(1u << pin);
	sync_routes(io);
	pthread_mutex_unlock(&io->lock);
	return 0;
}

static void reset(struct fl_ioapic_state *s, uint8_t id)
{
	memset(s, 0, sizeof(*s));
	s->id = (uint32_t)id << 24;
	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++)
		s->redir[p] = RE_MASKED;
}

int fl_ioapic_init(struct fl_ioapic *io, uint8_t id, struct fl_msi_sink sink)
{
	memset(io, 0, sizeof(*io));
	if (pthread_mutex_init(&io->lock, NULL) != 0)
		return -ENOMEM;
	reset(&io->s, id);
	io->sink = sink;
	io->routes_sent = 1; /* KVM's split irqchip starts with no routes, as do we */
	return 0;
}

void fl_ioapic_fini(struct fl_ioapic *io)
{
	pthread_mutex_destroy(&io->lock);
}

void fl_ioapic_save(struct fl_ioapic *io, struct fl_ioapic_state *out)
{
	pthread_mutex_lock(&io->lock);
	*out = io->s;
	pthread_mutex_unlock(&io->lock);
}

/* The state is untrusted input: only bits the hardware has survive. */
int fl_ioapic_restore(struct fl_ioapic *io, const struct fl_ioapic_state *in)
{
	pthread_mutex_lock(&io->lock);
	io->s.id = in->id & ID_MASK;
	io->s.regsel = in->regsel & 0xff;
	io->s.lines = in->lines & ((1u << FL_IOAPIC_PINS) - 1);
	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++) {
		uint64_t e = in->redir[p] & RE_VALID;
		if (!(e & RE_LEVEL))
			e &= ~RE_REMOTE_IRR;
		io->s.redir[p] = e;
	}
	io->routes_sent = 0;
	sync_routes(io);
	/* Every line that is up interrupts again, an edge pin's too. A save takes the vCPUs
	 * before this IOAPIC, so a line raised in between is up here while no local APIC in
	 * the snapshot holds its vector: without a new edge that pin would never fire again.
	 * If a local APIC does hold it, the second delivery merges into its IRR or finds the
	 * device with nothing to say, which drivers of edge devices (8250, i8042, virtio-mmio)
	 * take as a spurious interrupt. */
	for (uint32_t p = 0; p < FL_IOAPIC_PINS; p++)
		service(io, p);
	pthread_mutex_unlock(&io->lock);
	return 0;
}
