#include "cmdline.h"

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

bool cmdline_next(const char **cursor, struct word *w)
{
	const char *p = *cursor;
	while (is_space(*p))
		p++;
	if (!*p)
		return false;
	usize n = 0;
	for (; *p && !is_space(*p); p++)
		if (n < WORD_MAX - 1)
			w->text[n++] = *p;
	w->text[n] = 0;
	*cursor = p;

	w->value = NULL;
	for (usize i = 0; i <= n; i++) {
		w->name[i] = w->text[i];
		if (w->text[i] == '=' && !w->value) {
			w->name[i] = 0;
			w->value = &w->name[i + 1];
		}
	}
	return true;
}
