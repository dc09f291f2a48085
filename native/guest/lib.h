/* The few libc functions gcc may emit calls to, plus string helpers. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include "types.h"

void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
void *memmove(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int strcmp(const char *a, const char *b);
bool str_starts(const char *s, const char *prefix);
/* Parse a decimal or 0x-hex number covering all of s; false on junk or overflow. */
bool parse_u64(const char *s, u64 *out);

#endif
