/*
 * libFuzzer target for the split-virtqueue parser (native/virtio/queue.c): the input is a
 * guest's RAM (descriptor table, rings and buffers, all attacker-chosen) plus the queue
 * layout the driver would program. The parser must never touch memory outside that RAM,
 * loop without bound, or crash; ASan and UBSan check the first and last.
 */
#include <stdint.h>
#include <string.h>

#include "../virtio/virtio.h"

#define RAM_SIZE (64 * 1024)

static uint8_t ram[RAM_SIZE];

static uint64_t take(const uint8_t **p, size_t *n, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes && *n; i++, (*p)++, (*n)--)
		v |= (uint64_t)**p << (8 * i);
	return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fl_guest_mem mem = {.n = 2};
	static struct fl_vq_chain chain;
	struct fl_vq vq;
	const uint8_t *p = data;
	size_t n = size;

	/* Two regions, as a machine with RAM above 4 GiB has: [0, 48K) and 4G + [0, 16K). */
	mem.r[0].gpa = 0;
	mem.r[0].len = 48 * 1024;
	mem.r[0].host = ram;
	mem.r[1].gpa = 1ULL << 32;
	mem.r[1].len = 16 * 1024;
	mem.r[1].host = ram + 48 * 1024;

	memset(&vq, 0, sizeof(vq));
	vq.cfg.size = (uint16_t)take(&p, &n, 2);
	vq.cfg.desc = take(&p, &n, 2) | (take(&p, &n, 1) & 1 ? 1ULL << 32 : 0);
	vq.cfg.avail = take(&p, &n, 2);
	vq.cfg.used = take(&p, &n, 2);
	vq.last_avail = (uint16_t)take(&p, &n, 2);
	vq.used_idx = (uint16_t)take(&p, &n, 2);
	memset(ram, 0, sizeof(ram));
	memcpy(ram, p, n < sizeof(ram) ? n : sizeof(ram));

	if (fl_vq_enable(&vq, &mem) < 0)
		return 0;
	for (unsigned round = 0; round < 2 * FL_VQ_MAX_SIZE; round++) {
		int rc = fl_vq_pop(&vq, &mem, &chain);
		if (rc <= 0)
			break;
		/* Everything the parser handed out must be inside RAM and add up. */
		uint64_t out = 0, in = 0;
		for (uint32_t i = 0; i < chain.nout + chain.nin; i++) {
			const uint8_t *b = chain.iov[i].iov_base;
			if (b < ram || b + chain.iov[i].iov_len > ram + sizeof(ram))
				__builtin_trap();
			if (i < chain.nout)
				out += chain.iov[i].iov_len;
			else
				in += chain.iov[i].iov_len;
		}
		if (out != chain.out_len || in != chain.in_len || chain.head >= vq.cfg.size)
			__builtin_trap();
		/* What devices do next: copy a header out, a status in, answer the chain. */
		uint8_t hdr[16];
		fl_iov_from(chain.iov, chain.nout, 0, hdr, sizeof(hdr));
		if (chain.nin)
			fl_iov_to(chain.iov + chain.nout, chain.nin, chain.in_len - 1, hdr, 1);
		fl_vq_push(&vq, chain.head, chain.in_len);
		(void)fl_vq_should_notify(&vq);
	}
	return 0;
}
