/* Splitting the command line into action words. */
#ifndef GUEST_CMDLINE_H
#define GUEST_CMDLINE_H

#include "types.h"

#define WORD_MAX 128

struct word {
	char name[WORD_MAX]; /* before '=' */
	char *value;         /* after '=' inside name[], or NULL */
	char text[WORD_MAX]; /* the word as written */
};

/* Copy the next whitespace-separated word at *cursor into w and advance;
 * false at the end. Over-long words are truncated. */
bool cmdline_next(const char **cursor, struct word *w);

#endif
