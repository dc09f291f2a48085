#include "virtio.h"
#include "cpu.h"
#include "intr.h"
#include "io.h"
#include "layout.h"
#include "lib.h"
#include "mem.h"
#include "print.h"
#include "bootinfo.h"
#include "time.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC 0x080
#define REG_QUEUE_DRIVER 0x090
#define REG_QUEUE_DEVICE 0x0a0
#define REG_CONFIG 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define VERSION_1 (1UL << 32)
/* A used entry usually lands within a few tens of microseconds; spinning
 * that long natively is cheaper than an interrupt (~15-20 us under PVM). */
#define SPIN_US 300

static struct vdev devices[VIRTIO_MAX_DEVICES];
static unsigned ndevices;

static u32 rd(struct vdev *d, u32 reg) { return mmio_read32(d->base + reg); }
static void wr(struct vdev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }

static bool parse_device(const char *s, u64 *base, u64 *irq)
{
	/* <size>@<base>:<irq>, each decimal or 0x-hex */
	char buf[64];
	usize n = strlen(s);
	if (n >= sizeof(buf))
		return false;
	memcpy(buf, s, n + 1);
	char *at = NULL, *colon = NULL;
	for (char *p = buf; *p; p++) {
		if (*p == '@' && !at)
			at = p;
		else if (*p == ':' && at && !colon)
			colon = p;
	}
	if (!at || !colon)
		return false;
	*at = *colon = 0;
	u64 size;
	return parse_u64(buf, &size) && parse_u64(at + 1, base) && parse_u64(colon + 1, irq) &&
	       size >= 0x200 && *irq < 24;
}

void virtio_scan(const char *cmdline)
{
	static const char key[] = "virtio_mmio.device=";
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *w = p;
		while (*p && *p != ' ')
			p++;
		usize len = (usize)(p - w);
		char word[80];
		if (len >= sizeof(word) || len < sizeof(key) - 1)
			continue;
		memcpy(word, w, len);
		word[len] = 0;
		if (!str_starts(word, key))
			continue;
		u64 base, irq;
		if (ndevices >= VIRTIO_MAX_DEVICES || !parse_device(word + sizeof(key) - 1, &base, &irq))
			continue;
		struct vdev *d = &devices[ndevices];
		d->base = base;
		d->irq = (u32)irq;
		if (rd(d, REG_MAGIC) != 0x74726976 || rd(d, REG_VERSION) != 2)
			continue;
		d->device_id = rd(d, REG_DEVICE_ID);
		ndevices++;
	}
}

struct vdev *virtio_find(u32 device_id, unsigned nth)
{
	for (unsigned i = 0; i < ndevices; i++)
		if (devices[i].device_id == device_id && nth-- == 0)
			return &devices[i];
	return NULL;
}

u32 virtio_status(struct vdev *d) { return rd(d, REG_STATUS); }
void virtio_reset(struct vdev *d) { wr(d, REG_STATUS, 0); }
u8 virtio_config8(struct vdev *d, unsigned off) { return mmio_read8(d->base + REG_CONFIG + off); }
u32 virtio_config32(struct vdev *d, unsigned off) { return rd(d, REG_CONFIG + off); }
void virtio_ack(struct vdev *d) { wr(d, REG_INTERRUPT_ACK, rd(d, REG_INTERRUPT_STATUS)); }

bool virtio_start(struct vdev *d, u64 want, u64 *got)
{
	wr(d, REG_STATUS, 0);
	wr(d, REG_STATUS, ST_ACK);
	wr(d, REG_STATUS, ST_ACK | ST_DRIVER);
	wr(d, REG_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(d, REG_DEVICE_FEATURES);
	wr(d, REG_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(d, REG_DEVICE_FEATURES) << 32;
	u64 take = offered & (want | VERSION_1);
	wr(d, REG_DRIVER_FEATURES_SEL, 0);
	wr(d, REG_DRIVER_FEATURES, (u32)take);
	wr(d, REG_DRIVER_FEATURES_SEL, 1);
	wr(d, REG_DRIVER_FEATURES, (u32)(take >> 32));
	wr(d, REG_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(rd(d, REG_STATUS) & ST_FEATURES_OK)) {
		say("VIRTIO FAILED base=0x%lx features refused", d->base);
		return false;
	}
	if (got)
		*got = take;
	if (intr_setup())
		intr_route_pin(d->irq, VEC_VIRTIO);
	return true;
}

bool virtio_queue(struct vdev *d, struct vq *q, unsigned qi, u16 size)
{
	wr(d, REG_QUEUE_SEL, qi);
	if (rd(d, REG_QUEUE_NUM_MAX) < size)
		return false;
	memset(q, 0, sizeof(*q));
	q->size = size;
	q->index = (u16)qi;
	u64 desc = mem_alloc(16UL * size, 16);
	u64 avail = mem_alloc(6 + 2UL * size, 2);
	u64 used = mem_alloc(6 + 8UL * size, 4);
	if (!desc || !avail || !used)
		return false;
	q->desc = (struct vring_desc *)desc;
	q->avail = (volatile u16 *)avail;
	q->used = (volatile u8 *)used;
	q->avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
	wr(d, REG_QUEUE_NUM, size);
	wr(d, REG_QUEUE_DESC, (u32)desc);
	wr(d, REG_QUEUE_DESC + 4, (u32)(desc >> 32));
	wr(d, REG_QUEUE_DRIVER, (u32)avail);
	wr(d, REG_QUEUE_DRIVER + 4, (u32)(avail >> 32));
	wr(d, REG_QUEUE_DEVICE, (u32)used);
	wr(d, REG_QUEUE_DEVICE + 4, (u32)(used >> 32));
	wr(d, REG_QUEUE_READY, 1);
	return rd(d, REG_QUEUE_READY) == 1;
}

bool virtio_driver_ok(struct vdev *d)
{
	wr(d, REG_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	return (rd(d, REG_STATUS) & (ST_DRIVER_OK | VIRTIO_STATUS_NEEDS_RESET)) == ST_DRIVER_OK;
}

static void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

void vq_post(struct vq *q, u16 head)
{
	q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
	barrier(); /* x86 keeps stores in order; the compiler must too */
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
}

void vq_notify(struct vdev *d, struct vq *q)
{
	mb();
	wr(d, REG_QUEUE_NOTIFY, q->index);
}

static u16 used_idx(const struct vq *q) { return *(volatile u16 *)(q->used + 2); }

bool vq_pending(const struct vq *q) { return used_idx(q) != q->last_used; }

bool vq_take(struct vq *q, u32 *id, u32 *len)
{
	if (used_idx(q) == q->last_used)
		return false;
	barrier();
	volatile u8 *e = q->used + 4 + 8 * (q->last_used & (q->size - 1));
	*id = *(volatile u32 *)e;
	*len = *(volatile u32 *)(e + 4);
	q->last_used++;
	return true;
}

void vq_interrupts(struct vq *q, bool on)
{
	q->avail[0] = on ? 0 : VRING_AVAIL_F_NO_INTERRUPT;
	mb();
}

bool vq_wait(struct vdev *d, struct vq *q, u64 deadline)
{
	u64 spin_end = rdtsc() + time_us_to_tsc(SPIN_US);
	for (;;) {
		if (used_idx(q) != q->last_used)
			return true;
		u64 now = rdtsc();
		if (now >= deadline)
			return false;
		if (now < spin_end) {
			cpu_relax();
			continue;
		}
		/* Interrupts on, then look once more: a used entry that came in
		 * between sent no interrupt, but one after this will. */
		bool was_on = !(q->avail[0] & VRING_AVAIL_F_NO_INTERRUPT);
		vq_interrupts(q, true);
		if (used_idx(q) == q->last_used)
			wait_until(deadline);
		virtio_ack(d);
		if (!was_on)
			vq_interrupts(q, false);
	}
}

/* ---- hostile chains ---- */

enum hostile_case {
	H_ADDR_OUTSIDE_RAM,
	H_ADDR_PAST_RAM_END,
	H_HUGE_LENGTH,
	H_LOOP,
	H_NEXT_OUT_OF_RANGE,
	H_HEAD_OUT_OF_RANGE,
	H_AVAIL_IDX_JUMP,
	H_INDIRECT,
	H_READ_AFTER_WRITE,
	H_COUNT
};

static const char *const hostile_names[H_COUNT] = {
	"addr_outside_ram", "addr_past_ram_end", "huge_length",	 "loop",
	"next_out_of_range", "head_out_of_range", "avail_idx_jump", "indirect",
	"read_after_write",
};

static bool hostile_one(struct vdev *d, enum hostile_case c, u64 scratch)
{
	struct vq q;
	if (!virtio_start(d, 0, NULL) || !virtio_queue(d, &q, 0, 8) || !virtio_driver_ok(d))
		return false;
	struct vring_desc *v = q.desc;
	/* A well-formed read of sector 0 to start from: header, data, status. */
	u32 *hdr = (u32 *)scratch;
	hdr[0] = 0; hdr[1] = 0; hdr[2] = 0; hdr[3] = 0;
	v[0] = (struct vring_desc){scratch, 16, VRING_DESC_F_NEXT, 1};
	v[1] = (struct vring_desc){scratch + 512, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2};
	v[2] = (struct vring_desc){scratch + 1024, 1, VRING_DESC_F_WRITE, 0};
	u16 head = 0;
	switch (c) {
	case H_ADDR_OUTSIDE_RAM: v[1].addr = 0xf0000000UL; break;
	case H_ADDR_PAST_RAM_END: v[1].addr = boot.ram_top - 100; break;
	case H_HUGE_LENGTH: v[1].len = 0xffffffffu; break;
	case H_LOOP: v[2].flags |= VRING_DESC_F_NEXT; v[2].next = 0; break;
	case H_NEXT_OUT_OF_RANGE: v[1].next = 999; break;
	case H_HEAD_OUT_OF_RANGE: head = 200; break;
	case H_AVAIL_IDX_JUMP: break;
	case H_INDIRECT: v[0].flags |= 4; break;
	case H_READ_AFTER_WRITE: v[2].flags = 0; break; /* status readable, after data */
	default: break;
	}
	vq_post(&q, head);
	if (c == H_AVAIL_IDX_JUMP) {
		q.avail_idx += 100;
		q.avail[1] = q.avail_idx;
	}
	vq_notify(d, &q);
	u64 end = rdtsc() + time_us_to_tsc(1000000);
	while (rdtsc() < end) {
		if (virtio_status(d) & VIRTIO_STATUS_NEEDS_RESET)
			return true;
		delay_us(100);
	}
	return false;
}

void virtio_hostile(void)
{
	struct vdev *d = virtio_find(VIRTIO_ID_BLOCK, 0);
	if (!d) {
		say("VIRTIO HOSTILE FAILED no block device");
		return;
	}
	u64 scratch = mem_alloc(4096, 4096);
	unsigned broken = 0;
	for (unsigned c = 0; c < H_COUNT; c++) {
		bool ok = hostile_one(d, (enum hostile_case)c, scratch);
		say("VIRTIO HOSTILE case=%s needs_reset=%u", hostile_names[c], ok ? 1 : 0);
		broken += ok;
		virtio_reset(d);
	}
	say("VIRTIO HOSTILE done needs_reset=%u/%u", broken, (unsigned)H_COUNT);
}
