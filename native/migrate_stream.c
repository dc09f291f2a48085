/*
 * The live-migration stream's checks (migrate.h): every byte the target reads from the
 * source passes through one of these before it is used.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "migrate.h"

static int fail(char *err, size_t errlen, int e, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static int fail(char *err, size_t errlen, int e, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -e;
}

#define K1 0x9e3779b97f4a7c15ULL
#define K2 0xc2b2ae3d27d4eb4fULL

/* Two independent multiply-xor lanes over the page's words, folded: ~0.3 µs a page. */
uint64_t fl_mig_page_sum(const void *page)
{
	const uint64_t *w = page;
	uint64_t a = K1, b = K2;

	for (uint32_t i = 0; i < FL_MIG_PAGE / 8; i += 2) {
		a = (a ^ w[i]) * K1;
		b = (b ^ w[i + 1]) * K2;
		a ^= a >> 29;
		b ^= b >> 31;
	}
	return a ^ (b << 17 | b >> 47);
}

uint64_t fl_mig_sum_step(uint64_t h, uint64_t page_sum)
{
	h = (h ^ page_sum) * K1;
	return h ^ (h >> 32);
}

uint64_t fl_mig_ram_sum(const uint8_t *ram, uint64_t npages)
{
	uint64_t h = K2;

	for (uint64_t i = 0; i < npages; i++)
		h = fl_mig_sum_step(h, fl_mig_page_sum(ram + i * FL_MIG_PAGE));
	return h;
}

uint64_t fl_mig_data_sum(const uint8_t *buf, uint64_t len)
{
	uint64_t page[FL_MIG_PAGE / 8], h = K2, whole = len / FL_MIG_PAGE * FL_MIG_PAGE;

	for (uint64_t at = 0; at < whole; at += FL_MIG_PAGE)
		h = fl_mig_sum_step(h, fl_mig_page_sum(buf + at));
	if (whole < len) {
		memset(page, 0, sizeof(page));
		memcpy(page, buf + whole, len - whole);
		h = fl_mig_sum_step(h, fl_mig_page_sum(page));
	}
	return h;
}

int fl_mig_hello_check(const struct fl_mig_hello *h, const uint8_t *token, char *err,
		       size_t errlen)
{
	uint8_t diff = 0;

	if (h->magic != FL_MIG_MAGIC)
		return fail(err, errlen, EPROTO, "not a migration stream (bad magic)");
	if (h->version < FL_MIG_VERSION_MIN || h->version > FL_MIG_VERSION)
		return fail(err, errlen, EPROTO,
			    "migration stream version %u, this VMM speaks versions %d to %d",
			    h->version, FL_MIG_VERSION_MIN, FL_MIG_VERSION);
	/* Constant time: how many bytes matched says nothing to a peer guessing the token. */
	for (uint32_t i = 0; i < FL_MIG_TOKEN_LEN; i++)
		diff |= (uint8_t)(h->token[i] ^ token[i]);
	if (diff)
		return fail(err, errlen, EACCES, "wrong migration token");
	if (h->flags & ~FL_MIG_HELLO_DEBUG)
		return fail(err, errlen, EPROTO, "unknown migration flags 0x%x", h->flags);
	return 0;
}

int fl_mig_record_check(const struct fl_mig_record_header *r, uint64_t npages, int debug,
			uint32_t version, char *err, size_t errlen)
{
	if (version < 2 && (r->type == FL_MIG_DISKS || r->type == FL_MIG_BLOCK))
		return fail(err, errlen, EPROTO, "record type %u in a version %u stream", r->type,
			    version);
	uint64_t per_page = FL_MIG_PAGE + (debug ? 8 : 0), want = 0, max = 0;

	switch (r->type) {
	case FL_MIG_CONFIG:
		want = sizeof(struct fl_snap_config);
		break;
	case FL_MIG_PAGES:
		/* The exact length follows from the count (fl_mig_pages_check). */
		if (r->length < sizeof(struct fl_mig_pages) + per_page)
			return fail(err, errlen, EPROTO, "PAGES record of %llu bytes is too short",
				    (unsigned long long)r->length);
		max = sizeof(struct fl_mig_pages) + per_page * FL_MIG_MAX_BATCH;
		if (npages < FL_MIG_MAX_BATCH)
			max = sizeof(struct fl_mig_pages) + per_page * npages;
		break;
	case FL_MIG_ZERO:
		want = sizeof(struct fl_mig_pages);
		break;
	case FL_MIG_PAUSED:
		want = sizeof(struct fl_mig_paused);
		break;
	case FL_MIG_STATE:
		max = FL_SNAP_MAX_STATE;
		if (r->length == 0)
			return fail(err, errlen, EPROTO, "empty STATE record");
		break;
	case FL_MIG_END:
		want = version < 2 ? sizeof(struct fl_mig_end_v1) : sizeof(struct fl_mig_end);
		break;
	case FL_MIG_COMMIT:
	case FL_MIG_SYNC:
		want = 0;
		break;
	case FL_MIG_DISKS:
		want = sizeof(struct fl_mig_disks);
		break;
	case FL_MIG_BLOCK:
		/* The exact length follows from the range (fl_mig_block_check). */
		if (r->length <= sizeof(struct fl_mig_block) + (debug ? 8 : 0))
			return fail(err, errlen, EPROTO, "BLOCK record of %llu bytes is too short",
				    (unsigned long long)r->length);
		max = sizeof(struct fl_mig_block) + 8 + FL_MIG_MAX_BLOCK;
		break;
	case FL_MIG_ABORT:
		max = FL_MIG_MAX_ERROR;
		break;
	default:
		return fail(err, errlen, EPROTO, "unknown migration record type %u", r->type);
	}
	if (r->flags)
		return fail(err, errlen, EPROTO, "record type %u has flags 0x%x", r->type, r->flags);
	if (max ? r->length > max : r->length != want)
		return fail(err, errlen, EPROTO, "record type %u of %llu bytes (%s %llu)", r->type,
			    (unsigned long long)r->length, max ? "at most" : "want",
			    (unsigned long long)(max ? max : want));
	return 0;
}

int fl_mig_pages_check(const struct fl_mig_record_header *r, const struct fl_mig_pages *p,
		       uint64_t npages, int debug, char *err, size_t errlen)
{
	uint64_t per_page = FL_MIG_PAGE + (debug ? 8 : 0);

	if (p->count == 0 || p->reserved || p->first >= npages || p->count > npages - p->first)
		return fail(err, errlen, EPROTO,
			    "pages %llu+%u lie outside the guest's %llu pages",
			    (unsigned long long)p->first, p->count, (unsigned long long)npages);
	if (r->type == FL_MIG_PAGES &&
	    (p->count > FL_MIG_MAX_BATCH ||
	     r->length != sizeof(*p) + per_page * (uint64_t)p->count))
		return fail(err, errlen, EPROTO, "PAGES record of %llu bytes for %u pages",
			    (unsigned long long)r->length, p->count);
	return 0;
}

int fl_mig_reply_check(const struct fl_mig_record_header *r, char *err, size_t errlen)
{
	uint64_t want;

	switch (r->type) {
	case FL_MIG_ACK:
		want = sizeof(struct fl_mig_ack);
		break;
	case FL_MIG_READY:
		want = sizeof(struct fl_mig_ready);
		break;
	case FL_MIG_RESUMED:
		want = sizeof(struct fl_mig_resumed);
		break;
	case FL_MIG_SYNCED:
		want = 0;
		break;
	case FL_MIG_ERROR:
		if (r->length > FL_MIG_MAX_ERROR || r->flags)
			return fail(err, errlen, EPROTO, "the target sent a malformed error");
		return 0;
	default:
		return fail(err, errlen, EPROTO, "the target sent record type %u", r->type);
	}
	if (r->length != want || r->flags)
		return fail(err, errlen, EPROTO, "the target sent record type %u of %llu bytes",
			    r->type, (unsigned long long)r->length);
	return 0;
}

int fl_mig_disks_check(const struct fl_mig_disks *d, uint32_t count, const uint64_t *size,
		       uint32_t copy, char *err, size_t errlen)
{
	if (d->count != count || count > FL_MIG_MAX_DISKS)
		return fail(err, errlen, EPROTO, "the source has %u disks, this side %u", d->count,
			    count);
	for (uint32_t i = 0; i < FL_MIG_MAX_DISKS; i++) {
		uint32_t bit = 1u << i;
		if (i >= count) {
			if (d->size[i] || d->copy & bit)
				return fail(err, errlen, EPROTO, "disk %u: beyond the %u disks", i,
					    count);
			continue;
		}
		if ((d->copy & bit) != (copy & bit))
			return fail(err, errlen, EINVAL,
				    d->copy & bit ? "disk %u: the source copies it, this side was "
						    "not given it to copy (shared storage?)"
						  : "disk %u: this side was given it to copy, the "
						    "source does not copy it",
				    i);
		if (d->size[i] != size[i])
			return fail(err, errlen, EINVAL,
				    "disk %u: %llu bytes at the source, %llu bytes here (sizes "
				    "must match)",
				    i, (unsigned long long)d->size[i], (unsigned long long)size[i]);
	}
	return 0;
}

int fl_mig_block_check(const struct fl_mig_record_header *r, const struct fl_mig_block *b,
		       const struct fl_mig_disks *disks, int debug, char *err, size_t errlen)
{
	uint64_t size;

	if (b->disk >= disks->count || b->disk >= FL_MIG_MAX_DISKS ||
	    !(disks->copy >> b->disk & 1))
		return fail(err, errlen, EPROTO, "BLOCK for disk %u, which is not copied", b->disk);
	size = disks->size[b->disk];
	if (b->reserved || b->length == 0 || b->length > FL_MIG_MAX_BLOCK ||
	    b->offset % FL_MIG_CHUNK || b->offset > size || b->length > size - b->offset)
		return fail(err, errlen, EPROTO,
			    "disk %u: block %llu+%llu lies outside its %llu bytes", b->disk,
			    (unsigned long long)b->offset, (unsigned long long)b->length,
			    (unsigned long long)size);
	if (r->length != sizeof(*b) + (debug ? 8 : 0) + b->length)
		return fail(err, errlen, EPROTO, "BLOCK record of %llu bytes for %llu bytes of disk",
			    (unsigned long long)r->length, (unsigned long long)b->length);
	return 0;
}
