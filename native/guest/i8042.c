#include "i8042.h"
#include "io.h"

#define STATUS_OBF 0x01 /* output buffer full: a byte waits on 0x60 */
#define STATUS_IBF 0x02 /* input buffer full: controller busy */

#define SC_CTRL 0x1d
#define SC_ALT 0x38
#define SC_DEL 0x53
#define SC_BREAK 0x80
#define SC_EXTENDED 0xe0 /* right Ctrl/Alt and the Del key prefix this */

static bool ctrl_down, alt_down;

bool i8042_poll_ctrl_alt_del(unsigned *read)
{
	for (int i = 0; i < 16; i++) {
		u8 st = inb(I8042_STATUS);
		/* 0xFF: no controller on the bus. */
		if (st == 0xff || !(st & STATUS_OBF))
			return false;
		u8 sc = inb(I8042_DATA);
		(*read)++;
		if (sc == SC_EXTENDED)
			continue;
		bool up = (sc & SC_BREAK) != 0;
		switch (sc & ~SC_BREAK) {
		case SC_CTRL:
			ctrl_down = !up;
			break;
		case SC_ALT:
			alt_down = !up;
			break;
		case SC_DEL:
			if (!up && ctrl_down && alt_down)
				return true;
			break;
		default:
			break;
		}
	}
	return false;
}

#define CMD_READ_CONFIG 0x20
#define CMD_WRITE_CONFIG 0x60
#define CONFIG_TRANSLATE 0x40

void i8042_init(void)
{
	if (inb(I8042_STATUS) == 0xff)
		return;
	i8042_drain();
	outb(I8042_STATUS, CMD_READ_CONFIG);
	for (int i = 0; i < 100; i++) {
		if (inb(I8042_STATUS) & STATUS_OBF) {
			u8 config = inb(I8042_DATA);
			if (!(config & CONFIG_TRANSLATE)) {
				outb(I8042_STATUS, CMD_WRITE_CONFIG);
				outb(I8042_DATA, config | CONFIG_TRANSLATE);
			}
			return;
		}
	}
}

void i8042_reset(void)
{
	for (int i = 0; i < 1000 && (inb(I8042_STATUS) & STATUS_IBF); i++)
		;
	outb(I8042_STATUS, 0xfe);
}

void i8042_drain(void)
{
	for (int i = 0; i < 64; i++) {
		u8 st = inb(I8042_STATUS);
		if (st == 0xff || !(st & STATUS_OBF))
			return;
		(void)inb(I8042_DATA);
	}
}
