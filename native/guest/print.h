/* Console output. Every line goes out as "flotilla-guest: <text>\n". */
#ifndef GUEST_PRINT_H
#define GUEST_PRINT_H

#include "types.h"

#define LINE_PREFIX "flotilla-guest: "

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_end(ap) __builtin_va_end(ap)
#define va_arg(ap, type) __builtin_va_arg(ap, type)

/* Formats %s %c %d %u %x %p with l/ll, a 0 flag and a width. */
usize vsnprintf(char *buf, usize size, const char *fmt, va_list ap);
usize snprintf(char *buf, usize size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Print one whole prefixed line (fmt carries no newline). */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Echo one console input byte, prefixing each echoed line. */
void echo_byte(u8 c);

#endif
