/* AML encoding (ACPI 6.4, chapter 20) of the few constructs the DSDT needs. */
#include <string.h>

#include "../le.h"
#include "aml.h"

#define AML_NAME 0x08
#define AML_BYTE 0x0a
#define AML_DWORD 0x0c
#define AML_STRING 0x0d
#define AML_SCOPE 0x10
#define AML_BUFFER 0x11
#define AML_METHOD 0x14
#define AML_NOTIFY 0x86
#define AML_EXT 0x5b
#define AML_DEVICE 0x82

void fl_aml_bytes(struct fl_aml *a, const void *p, uint32_t n)
{
	if (a->overflow || n > FL_AML_MAX - a->len) {
		a->overflow = 1;
		return;
	}
	memcpy(a->buf + a->len, p, n);
	a->len += n;
}

static void byte(struct fl_aml *a, uint8_t b)
{
	fl_aml_bytes(a, &b, 1);
}

/* A NameSeg ("COM1") or a rooted one ("\\_SB_"): written as given. */
static void name(struct fl_aml *a, const char *n)
{
	fl_aml_bytes(a, n, (uint32_t)strlen(n));
}

/* PkgLength of `len` bytes following it: the encoding counts its own bytes. */
static void pkg_length(struct fl_aml *a, uint32_t len)
{
	uint8_t p[4];

	if (len + 1 < 0x40) {
		byte(a, (uint8_t)(len + 1));
		return;
	}
	uint32_t n = len + 2 < 0x1000 ? 2 : len + 3 < 0x100000 ? 3 : 4;
	uint32_t total = len + n;

	p[0] = (uint8_t)(((n - 1) << 6) | (total & 0xf));
	for (uint32_t i = 1; i < n; i++)
		p[i] = (uint8_t)(total >> (4 + 8 * (i - 1)));
	fl_aml_bytes(a, p, n);
}

static void wrap(struct fl_aml *a, const uint8_t *op, uint32_t oplen, const char *n,
		 const uint8_t *extra, uint32_t extralen, const struct fl_aml *body)
{
	if (body->overflow) {
		a->overflow = 1;
		return;
	}
	fl_aml_bytes(a, op, oplen);
	pkg_length(a, (uint32_t)strlen(n) + extralen + body->len);
	name(a, n);
	fl_aml_bytes(a, extra, extralen);
	fl_aml_bytes(a, body->buf, body->len);
}

void fl_aml_name_string(struct fl_aml *a, const char *n, const char *text)
{
	byte(a, AML_NAME);
	name(a, n);
	byte(a, AML_STRING);
	fl_aml_bytes(a, text, (uint32_t)strlen(text) + 1);
}

void fl_aml_name_int(struct fl_aml *a, const char *n, uint32_t v)
{
	uint8_t d[4];

	byte(a, AML_NAME);
	name(a, n);
	if (v <= 0xff) {
		byte(a, AML_BYTE);
		byte(a, (uint8_t)v);
		return;
	}
	byte(a, AML_DWORD);
	put32(d, v);
	fl_aml_bytes(a, d, 4);
}

void fl_aml_name_resources(struct fl_aml *a, const char *n, const struct fl_aml *res)
{
	uint32_t size = res->len + 2;
	uint8_t d[4];

	if (res->overflow) {
		a->overflow = 1;
		return;
	}
	byte(a, AML_NAME);
	name(a, n);
	byte(a, AML_BUFFER);
	/* BufferSize as a ByteConst or DWordConst, then the descriptors and the end tag. */
	uint32_t size_len = size <= 0xff ? 2 : 5;
	pkg_length(a, size_len + size);
	if (size <= 0xff) {
		byte(a, AML_BYTE);
		byte(a, (uint8_t)size);
	} else {
		byte(a, AML_DWORD);
		put32(d, size);
		fl_aml_bytes(a, d, 4);
	}
	fl_aml_bytes(a, res->buf, res->len);
	byte(a, 0x79); /* End Tag, checksum 0: "treated as checksummed" */
	byte(a, 0);
}

void fl_aml_device(struct fl_aml *a, const char *n, const struct fl_aml *body)
{
	static const uint8_t op[] = {AML_EXT, AML_DEVICE};

	wrap(a, op, sizeof(op), n, NULL, 0, body);
}

void fl_aml_scope(struct fl_aml *a, const char *n, const struct fl_aml *body)
{
	static const uint8_t op[] = {AML_SCOPE};

	wrap(a, op, sizeof(op), n, NULL, 0, body);
}

void fl_aml_method(struct fl_aml *a, const char *n, uint8_t nargs, const struct fl_aml *body)
{
	static const uint8_t op[] = {AML_METHOD};
	uint8_t flags = nargs & 7; /* not serialized, sync level 0 */

	wrap(a, op, sizeof(op), n, &flags, 1, body);
}

void fl_aml_notify(struct fl_aml *a, const char *n, uint8_t value)
{
	byte(a, AML_NOTIFY);
	name(a, n);
	byte(a, AML_BYTE);
	byte(a, value);
}

void fl_aml_res_io(struct fl_aml *res, uint16_t port, uint8_t len)
{
	uint8_t d[8] = {0x47, 0x01}; /* I/O port descriptor, 16-bit decode */

	put16(d + 2, port); /* minimum */
	put16(d + 4, port); /* maximum */
	d[6] = 1;	    /* alignment */
	d[7] = len;
	fl_aml_bytes(res, d, sizeof(d));
}

void fl_aml_res_irq(struct fl_aml *res, uint8_t irq)
{
	uint8_t d[3] = {0x22};

	put16(d + 1, (uint16_t)(1u << (irq & 15)));
	fl_aml_bytes(res, d, sizeof(d));
}

void fl_aml_res_mem32(struct fl_aml *res, uint32_t base, uint32_t len)
{
	uint8_t d[12] = {0x86, 9, 0, 1}; /* Memory32Fixed, read-write */

	put32(d + 4, base);
	put32(d + 8, len);
	fl_aml_bytes(res, d, sizeof(d));
}

void fl_aml_res_interrupt(struct fl_aml *res, uint32_t gsi)
{
	uint8_t d[9] = {0x89, 6, 0, 0x03, 1}; /* consumer, edge, active high, exclusive; 1 */

	put32(d + 5, gsi);
	fl_aml_bytes(res, d, sizeof(d));
}
