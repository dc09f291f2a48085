/*
 * Reading a fuzz input as a stream of little-endian fields. Past the end every field reads
 * as zero, so any input is a valid (if short) program for a target.
 */
#ifndef FL_FUZZ_INPUT_H
#define FL_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct fz_input {
	const uint8_t *p;
	size_t n;
};

static inline uint64_t fz_take(struct fz_input *in, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes && in->n; i++, in->p++, in->n--)
		v |= (uint64_t)*in->p << (8 * i);
	return v;
}

/* Up to len bytes as a pointer into the input; *got says how many there were. */
static inline const uint8_t *fz_bytes(struct fz_input *in, size_t len, size_t *got)
{
	const uint8_t *p = in->p;

	*got = len < in->n ? len : in->n;
	in->p += *got;
	in->n -= *got;
	return p;
}

#endif
