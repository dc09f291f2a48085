/*
 * libFuzzer target for the live-migration stream (native/migrate_stream.c) as a target
 * reads it from an untrusted source: the hello with its token, then records. Whatever the
 * checks accept is used as migrate.c uses it: a PAGES record's pages are copied into a
 * 64-page guest RAM (ASan sees any byte outside it), its debug checksums compared, a ZERO
 * range cleared, a CONFIG or STATE parsed by the snapshot format's checks. The target has
 * two disks, 0 copied (DISK0 bytes) and 1 shared: a DISKS record is checked against them
 * and, once accepted, a BLOCK record's data is copied into disk 0's buffer (ASan sees any
 * byte outside it) and its debug checksum compared.
 *
 * Input: a mode byte, then the stream's bytes.
 *   bit 0: put the right token into the hello, so the fuzzer gets past it
 *   bit 1: read the bytes as the target's replies (the source's side) instead
 */
#include <stdlib.h>
#include <string.h>

#include "../include/flotilla.h"
#include "../migrate.h"

#define NPAGES 64
#define DISK0 ((1u << 20) + 100) /* seeds.py's MIG_DISK0: a partial last chunk */
#define DISK1 (1u << 20)

static const uint8_t token[FL_MIG_TOKEN_LEN] = "flotilla-fuzz-token-0123456789ab";

static void replies(const uint8_t *p, size_t len)
{
	char err[256];

	while (len >= sizeof(struct fl_mig_record_header)) {
		struct fl_mig_record_header h;
		memcpy(&h, p, sizeof(h));
		p += sizeof(h);
		len -= sizeof(h);
		if (fl_mig_reply_check(&h, err, sizeof(err)) < 0 || h.length > len)
			return;
		if (h.length > FL_MIG_MAX_ERROR)
			__builtin_trap(); /* every reply the source reads fits its buffers */
		p += h.length;
		len -= h.length;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t *ram, *disk;
	static const uint64_t sizes[FL_MIG_MAX_DISKS] = {DISK0, DISK1};
	struct fl_mig_disks disks = {.count = 0};
	struct fl_mig_hello hello;
	char err[256];
	uint64_t sums[FL_MIG_MAX_BATCH];
	const uint8_t *p;
	size_t len;
	int debug;

	if (!ram && !(ram = malloc((size_t)NPAGES * FL_MIG_PAGE)))
		abort();
	if (!disk && !(disk = malloc(DISK0)))
		abort();
	if (size < 1)
		return 0;
	if (data[0] & 2) {
		replies(data + 1, size - 1);
		return 0;
	}
	if (size - 1 < sizeof(hello))
		return 0;
	memcpy(&hello, data + 1, sizeof(hello));
	if (data[0] & 1)
		memcpy(hello.token, token, sizeof(token));
	if (fl_mig_hello_check(&hello, token, err, sizeof(err)) < 0)
		return 0;
	debug = !!(hello.flags & FL_MIG_HELLO_DEBUG);
	p = data + 1 + sizeof(hello);
	len = size - 1 - sizeof(hello);
	while (len >= sizeof(struct fl_mig_record_header)) {
		struct fl_mig_record_header h;
		memcpy(&h, p, sizeof(h));
		p += sizeof(h);
		len -= sizeof(h);
		if (fl_mig_record_check(&h, NPAGES, debug, hello.version, err, sizeof(err)) < 0)
			return 0;
		if (h.length > len)
			return 0; /* a real target would wait for the rest */
		if (h.type == FL_MIG_PAGES || h.type == FL_MIG_ZERO) {
			struct fl_mig_pages pg;
			if (h.length < sizeof(pg))
				__builtin_trap(); /* the record check lets no short one through */
			memcpy(&pg, p, sizeof(pg));
			if (fl_mig_pages_check(&h, &pg, NPAGES, debug, err, sizeof(err)) < 0)
				return 0;
			if (h.type == FL_MIG_ZERO) {
				memset(ram + pg.first * FL_MIG_PAGE, 0, (size_t)pg.count * FL_MIG_PAGE);
			} else {
				const uint8_t *at = p + sizeof(pg);
				if (debug) {
					memcpy(sums, at, (size_t)pg.count * 8);
					at += (size_t)pg.count * 8;
				}
				memcpy(ram + pg.first * FL_MIG_PAGE, at, (size_t)pg.count * FL_MIG_PAGE);
				for (uint32_t i = 0; debug && i < pg.count; i++)
					if (fl_mig_page_sum(ram + (pg.first + i) * FL_MIG_PAGE) != sums[i])
						return 0; /* refused: damaged page */
			}
		} else if (h.type == FL_MIG_DISKS) {
			struct fl_mig_disks d;
			memcpy(&d, p, sizeof(d));
			if (fl_mig_disks_check(&d, 2, sizes, 1, err, sizeof(err)) < 0)
				return 0;
			disks = d;
		} else if (h.type == FL_MIG_BLOCK) {
			struct fl_mig_block b;
			uint64_t sum = 0;
			if (h.length < sizeof(b))
				__builtin_trap(); /* the record check lets no short one through */
			memcpy(&b, p, sizeof(b));
			/* Before DISKS, no disk is copied: refused like any other. */
			if (fl_mig_block_check(&h, &b, &disks, debug, err, sizeof(err)) < 0)
				return 0;
			if (b.disk != 0)
				__builtin_trap(); /* only disk 0 is copied */
			if (debug)
				memcpy(&sum, p + sizeof(b), 8);
			memcpy(disk + b.offset, p + sizeof(b) + (debug ? 8 : 0), b.length);
			if (debug && fl_mig_data_sum(disk + b.offset, b.length) != sum)
				return 0; /* refused: damaged block */
		} else if (h.type == FL_MIG_CONFIG) {
			struct fl_snap_config c;
			memcpy(&c, p, sizeof(c));
			fl_snap_check_config(&c, err, sizeof(err));
		} else if (h.type == FL_MIG_STATE) {
			struct fl_snap_parsed *parsed = malloc(sizeof(*parsed));
			uint8_t *copy = malloc(h.length);
			if (!parsed || !copy)
				abort();
			memcpy(copy, p, h.length);
			fl_snap_parse(copy, h.length, parsed, err, sizeof(err));
			free(copy);
			free(parsed);
		}
		p += h.length;
		len -= h.length;
	}
	return 0;
}
