/* virtio-blk from ring 3: one request is a 3-descriptor chain (header, data,
 * status) in a fixed slot of the descriptor table, so up to SLOTS requests
 * are in flight without a free list. */
#include "blk.h"
#include "io.h"
#include "lib.h"
#include "mem.h"
#include "print.h"
#include "time.h"
#include "virtio.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define F_RO (1UL << 5)
#define SECTOR 512UL
#define QSIZE 128
#define SLOTS 32
#define MAX_REQ (128 * 1024UL) /* bytes per request */
#define BUF_SIZE (1024 * 1024UL)
#define TIMEOUT_US 5000000
#define PATTERN_MUL 0x9e3779b97f4a7c15UL
#define FNV_OFFSET 0xcbf29ce484222325UL
#define FNV_PRIME 0x100000001b3UL

struct req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct {
	struct vdev *dev;
	struct vq q;
	bool up, ro;
	u64 capacity;
	struct req_hdr *hdr; /* [SLOTS] */
	volatile u8 *status; /* [SLOTS] */
	u8 *buf;	     /* BUF_SIZE */
} blk;

static const char *status_name(int s)
{
	return s == 0 ? "ok" : s == 1 ? "ioerr" : s == 2 ? "unsupp" : s == -1 ? "timeout" : "bad";
}

static bool blk_up(void)
{
	if (blk.up)
		return true;
	blk.dev = virtio_find(VIRTIO_ID_BLOCK, 0);
	if (!blk.dev) {
		say("BLK FAILED no block device");
		return false;
	}
	u64 got = 0;
	if (!virtio_start(blk.dev, F_RO, &got) || !virtio_queue(blk.dev, &blk.q, 0, QSIZE) ||
	    !virtio_driver_ok(blk.dev)) {
		say("BLK FAILED device setup");
		return false;
	}
	blk.ro = (got & F_RO) != 0;
	blk.capacity = virtio_config32(blk.dev, 0) | (u64)virtio_config32(blk.dev, 4) << 32;
	if (!blk.hdr) {
		blk.hdr = (struct req_hdr *)mem_alloc(sizeof(struct req_hdr) * SLOTS, 16);
		blk.status = (volatile u8 *)mem_alloc(SLOTS, 8);
		blk.buf = (u8 *)mem_alloc(BUF_SIZE, 4096);
		if (!blk.hdr || !blk.status || !blk.buf) {
			say("BLK FAILED out of memory");
			return false;
		}
	}
	blk.up = true;
	return true;
}

/* Queue request `slot` (no notify). len 0: no data descriptor. */
static void submit(unsigned slot, u32 type, u64 sector, u64 data, u32 len)
{
	struct vring_desc *d = blk.q.desc + 3 * slot;
	blk.hdr[slot] = (struct req_hdr){type, 0, sector};
	blk.status[slot] = 0xff;
	u16 head = (u16)(3 * slot);
	u16 next = head + 1;
	d[0] = (struct vring_desc){(u64)&blk.hdr[slot], sizeof(struct req_hdr), VRING_DESC_F_NEXT, next};
	if (len) {
		u16 flags = VRING_DESC_F_NEXT | (type == T_OUT ? 0 : VRING_DESC_F_WRITE);
		d[1] = (struct vring_desc){data, len, flags, (u16)(head + 2)};
	} else {
		d[0].next = head + 2;
	}
	d[2] = (struct vring_desc){(u64)&blk.status[slot], 1, VRING_DESC_F_WRITE, 0};
	vq_post(&blk.q, head);
}

/* Wait for one completion; returns its slot or -1 on timeout. */
static int complete(u64 deadline, u32 *len)
{
	u32 id;
	while (!vq_take(&blk.q, &id, len))
		if (!vq_wait(blk.dev, &blk.q, deadline))
			return -1;
	return (int)(id / 3);
}

static int request(u32 type, u64 sector, u64 data, u32 len, u32 *used_len)
{
	u32 dummy;
	submit(0, type, sector, data, len);
	vq_notify(blk.dev, &blk.q);
	if (complete(rdtsc() + time_us_to_tsc(TIMEOUT_US), used_len ? used_len : &dummy) < 0)
		return -1;
	return blk.status[0];
}

static unsigned parse_list(const char *s, u64 *out, unsigned max)
{
	char buf[64];
	unsigned n = 0;
	usize len = strlen(s);
	if (len >= sizeof(buf))
		return 0;
	memcpy(buf, s, len + 1);
	char *p = buf;
	while (n < max) {
		char *c = p;
		while (*c && *c != ',')
			c++;
		bool last = !*c;
		*c = 0;
		if (!parse_u64(p, &out[n]))
			return 0;
		n++;
		if (last)
			return n;
		p = c + 1;
	}
	return 0;
}

static u64 pattern(u64 off, u64 seed) { return (off ^ (seed << 48)) * PATTERN_MUL + seed; }

static u64 fnv_words(const u64 *w, u64 words, u64 h)
{
	for (u64 i = 0; i < words; i++)
		h = (h ^ w[i]) * FNV_PRIME;
	return h;
}

void blk_info(void)
{
	if (!blk_up())
		return;
	char id[21];
	memset(id, 0, sizeof(id));
	int s = request(T_GET_ID, 0, (u64)blk.buf, 20, NULL);
	if (s == 0)
		memcpy(id, blk.buf, 20);
	for (unsigned i = 0; i < 20; i++)
		if (id[i] && (id[i] < 0x21 || id[i] > 0x7e))
			id[i] = '?';
	say("BLK capacity=%lu ro=%u id=%s", blk.capacity, blk.ro ? 1 : 0, id[0] ? id : "-");
}

/* Runs fn over [sector, sector+count) in chunks; prints the outcome. */
static bool range_args(const char *args, u64 *sector, u64 *count, u64 *seed)
{
	u64 v[3] = {0, 0, 0};
	unsigned n = parse_list(args, v, 3);
	if (n < 2 || v[1] == 0 || v[1] > (1UL << 32)) {
		say("unknown action value %s", args);
		return false;
	}
	*sector = v[0];
	*count = v[1];
	*seed = n > 2 ? v[2] : 1;
	return blk_up();
}

static int write_range(u64 sector, u64 count, u64 seed)
{
	int s = 0;
	for (u64 done = 0; done < count && s == 0;) {
		u64 n = count - done < MAX_REQ / SECTOR ? count - done : MAX_REQ / SECTOR;
		u64 *w = (u64 *)blk.buf;
		u64 off = (sector + done) * SECTOR;
		for (u64 i = 0; i < n * SECTOR / 8; i++)
			w[i] = pattern(off + 8 * i, seed);
		s = request(T_OUT, sector + done, (u64)blk.buf, (u32)(n * SECTOR), NULL);
		done += n;
	}
	return s;
}

void blk_write(const char *args)
{
	u64 sector, count, seed;
	if (!range_args(args, &sector, &count, &seed))
		return;
	int s = write_range(sector, count, seed);
	say("BLK write sector=%lu count=%lu status=%s", sector, count, status_name(s));
}

/* A guest that keeps writing: the range again and again, each pass with the next seed (so
 * a pass lost on the way shows as the previous seed's pattern). */
void blk_loop(const char *args)
{
	u64 sector, count, passes, pass;
	int s = 0;
	if (!range_args(args, &sector, &count, &passes))
		return;
	for (pass = 1; pass <= passes && s == 0; pass++) {
		s = write_range(sector, count, pass);
		say("BLK loop pass=%lu", pass);
	}
	say("BLK loop sector=%lu count=%lu passes=%lu status=%s", sector, count, passes,
	    status_name(s));
}

/* Reads the range; calls back per chunk. Returns the status. */
static int read_range(u64 sector, u64 count, u64 *hash, u64 seed, u64 *bad_at)
{
	int s = 0;
	*hash = FNV_OFFSET;
	*bad_at = ~0UL;
	for (u64 done = 0; done < count && s == 0;) {
		u64 n = count - done < MAX_REQ / SECTOR ? count - done : MAX_REQ / SECTOR;
		s = request(T_IN, sector + done, (u64)blk.buf, (u32)(n * SECTOR), NULL);
		if (s != 0)
			break;
		u64 *w = (u64 *)blk.buf, words = n * SECTOR / 8;
		*hash = fnv_words(w, words, *hash);
		u64 off = (sector + done) * SECTOR;
		for (u64 i = 0; seed && *bad_at == ~0UL && i < words; i++)
			if (w[i] != pattern(off + 8 * i, seed))
				*bad_at = off + 8 * i;
		done += n;
	}
	return s;
}

void blk_read(const char *args)
{
	u64 sector, count, seed, hash, bad;
	if (!range_args(args, &sector, &count, &seed))
		return;
	int s = read_range(sector, count, &hash, 0, &bad);
	if (s == 0)
		say("BLK read sector=%lu count=%lu status=ok checksum=0x%016lx", sector, count, hash);
	else
		say("BLK read sector=%lu count=%lu status=%s", sector, count, status_name(s));
}

void blk_verify(const char *args)
{
	u64 sector, count, seed, hash, bad;
	if (!range_args(args, &sector, &count, &seed))
		return;
	int s = read_range(sector, count, &hash, seed, &bad);
	if (s != 0)
		say("BLK verify sector=%lu count=%lu status=%s", sector, count, status_name(s));
	else if (bad != ~0UL)
		say("BLK verify sector=%lu count=%lu mismatch at=%lu", sector, count, bad);
	else
		say("BLK verify sector=%lu count=%lu ok", sector, count);
}

void blk_flush(void)
{
	if (blk_up())
		say("BLK flush status=%s", status_name(request(T_FLUSH, 0, 0, 0, NULL)));
}

static u64 rng_state = 0x2545f4914f6cdd1dUL;
static u64 rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* Keeps `depth` requests of `len` bytes in flight until `total` completed. */
static void bench(const char *name, u64 total, u32 len, unsigned depth, bool random)
{
	u64 sectors = len / SECTOR, span = blk.capacity / sectors;
	if (span == 0 || depth > SLOTS || (u64)depth * len > BUF_SIZE) {
		say("BLKBENCH FAILED %s disk too small", name);
		return;
	}
	u64 next = 0, issued = 0, done = 0, errors = 0;
	u64 deadline = rdtsc() + time_us_to_tsc(60 * 1000000UL);
	u64 t0 = rdtsc();
	for (unsigned s = 0; s < depth && issued < total; s++, issued++) {
		u64 chunk = random ? rng() % span : next++ % span;
		submit(s, T_IN, chunk * sectors, (u64)blk.buf + (u64)s * len, len);
	}
	vq_notify(blk.dev, &blk.q);
	while (done < total) {
		u32 ulen;
		int s = complete(deadline, &ulen);
		if (s < 0) {
			say("BLKBENCH FAILED %s timeout done=%lu", name, done);
			return;
		}
		done++;
		errors += blk.status[s] != 0;
		/* Refill every completion found, then one notify for the batch. */
		bool posted = false;
		for (;;) {
			if (issued < total) {
				u64 chunk = random ? rng() % span : next++ % span;
				submit((unsigned)s, T_IN, chunk * sectors, (u64)blk.buf + (u64)s * len, len);
				issued++;
				posted = true;
			}
			u32 id;
			if (!vq_take(&blk.q, &id, &ulen))
				break;
			s = (int)(id / 3);
			done++;
			errors += blk.status[s] != 0;
		}
		if (posted)
			vq_notify(blk.dev, &blk.q);
	}
	u64 ns = (rdtsc() - t0) * 1000 / (time_tsc_hz() / 1000000);
	say("BLKBENCH %s ops=%lu bytes=%lu depth=%u errors=%lu ns=%lu", name, total, total * len,
	    depth, errors, ns);
}

void blk_bench(const char *args)
{
	const char *v = args;
	u64 n;
	if (!blk_up())
		return;
	if (str_starts(v, "randread,") && parse_u64(v + 9, &n) && n)
		bench("randread", n, 4096, 16, true);
	else if (str_starts(v, "seqread,") && parse_u64(v + 8, &n) && n)
		bench("seqread", n * (1024 * 1024UL) / (128 * 1024), 128 * 1024, 4, false);
	else
		say("unknown action value %s", args);
}
