/*
 * A small AML writer for the DSDT: named objects, devices, scopes, methods and resource
 * templates, built bottom-up into bounded buffers (an overflow is sticky and checked once).
 */
#ifndef FL_X86_AML_H
#define FL_X86_AML_H

#include <stdint.h>

#define FL_AML_MAX 4096

struct fl_aml {
	uint8_t buf[FL_AML_MAX];
	uint32_t len;
	int overflow;
};

void fl_aml_bytes(struct fl_aml *a, const void *p, uint32_t n);
/* Name (name, "text") and Name (name, integer). */
void fl_aml_name_string(struct fl_aml *a, const char *name, const char *text);
void fl_aml_name_int(struct fl_aml *a, const char *name, uint32_t v);
/* Name (_CRS, ResourceTemplate () { res... }): the end tag is added here. */
void fl_aml_name_resources(struct fl_aml *a, const char *name, const struct fl_aml *res);
/* Device (name) { body }, Scope (name) { body }, Method (name, nargs) { body }. */
void fl_aml_device(struct fl_aml *a, const char *name, const struct fl_aml *body);
void fl_aml_scope(struct fl_aml *a, const char *name, const struct fl_aml *body);
void fl_aml_method(struct fl_aml *a, const char *name, uint8_t nargs, const struct fl_aml *body);
/* Notify (name, value) */
void fl_aml_notify(struct fl_aml *a, const char *name, uint8_t value);

/* Resource descriptors for fl_aml_name_resources. */
void fl_aml_res_io(struct fl_aml *res, uint16_t port, uint8_t len);
void fl_aml_res_irq(struct fl_aml *res, uint8_t irq); /* IRQNoFlags: edge, active high */
void fl_aml_res_mem32(struct fl_aml *res, uint32_t base, uint32_t len);
/* Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } */
void fl_aml_res_interrupt(struct fl_aml *res, uint32_t gsi);

#endif
