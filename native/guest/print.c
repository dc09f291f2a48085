#include "print.h"
#include "lib.h"
#include "uart.h"

static usize fmt_uint(char *out, u64 v, unsigned base, int width, char pad)
{
	char tmp[24];
	usize n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while ((int)n < width && n < sizeof(tmp))
		tmp[n++] = pad;
	for (usize i = 0; i < n; i++)
		out[i] = tmp[n - 1 - i];
	return n;
}

usize vsnprintf(char *buf, usize size, const char *fmt, va_list ap)
{
	usize len = 0;
#define PUT(ch)                           \
	do {                              \
		if (len + 1 < size)       \
			buf[len] = (ch);  \
		len++;                    \
	} while (0)

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			PUT(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, longs = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}
		char num[24];
		usize n = 0;
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				PUT(*s++);
			continue;
		}
		case 'c':
			PUT((char)va_arg(ap, int));
			continue;
		case 'd': {
			s64 v = longs ? va_arg(ap, s64) : va_arg(ap, int);
			if (v < 0) {
				PUT('-');
				v = -v;
			}
			n = fmt_uint(num, (u64)v, 10, width, pad);
			break;
		}
		case 'u':
			n = fmt_uint(num, longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad);
			break;
		case 'x':
			n = fmt_uint(num, longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad);
			break;
		case 'p':
			PUT('0');
			PUT('x');
			n = fmt_uint(num, (u64)va_arg(ap, void *), 16, width, pad);
			break;
		case '%':
			PUT('%');
			continue;
		default:
			PUT('%');
			if (!*fmt)
				goto out;
			PUT(*fmt);
			continue;
		}
		for (usize i = 0; i < n; i++)
			PUT(num[i]);
	}
out:
	if (size)
		buf[len < size ? len : size - 1] = 0;
	return len;
#undef PUT
}

usize snprintf(char *buf, usize size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	usize n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

/* True while an echoed line is open (no newline yet): a say() in between
 * ends it first so that every line keeps its prefix. */
static bool echo_line_open;
static u8 echo_prev;

void say(const char *fmt, ...)
{
	char line[256];
	usize plen = sizeof(LINE_PREFIX) - 1;
	usize start = 0;
	if (echo_line_open) {
		line[start++] = '\n';
		echo_line_open = false;
	}
	memcpy(line + start, LINE_PREFIX, plen);
	start += plen;
	va_list ap;
	va_start(ap, fmt);
	usize n = vsnprintf(line + start, sizeof(line) - start - 1, fmt, ap);
	va_end(ap);
	if (n > sizeof(line) - start - 2)
		n = sizeof(line) - start - 2;
	line[start + n] = '\n';
	uart_write(line, start + n + 1);
}

void echo_byte(u8 c)
{
	/* A terminal sends CR for Enter: end the line there and swallow the
	 * LF of a CR LF pair. */
	u8 prev = echo_prev;
	echo_prev = c;
	if (c == '\n' && prev == '\r')
		return;
	if (c == '\r')
		c = '\n';
	if (!echo_line_open) {
		uart_write(LINE_PREFIX, sizeof(LINE_PREFIX) - 1);
		echo_line_open = true;
	}
	uart_write((const char *)&c, 1);
	if (c == '\n')
		echo_line_open = false;
}
