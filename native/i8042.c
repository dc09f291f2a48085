/*
 * i8042 keyboard controller: enough for a guest to probe it, read injected scancodes
 * (Ctrl-Alt-Del) and pulse the reset line (command 0xFE -> REBOOT).
 */
#include <errno.h>
#include <string.h>

#include "devices.h"

#define STATUS_OBF 0x01
#define STATUS_SYS 0x04
#define STATUS_UNLOCKED 0x10
#define CTR_KBD_INT 0x01
#define CTR_KBD_DISABLE 0x10
#define CTR_AUX_DISABLE 0x20

static void push(struct fl_i8042_state *s, uint8_t b)
{
	if (s->out_count < FL_I8042_QUEUE) {
		s->outq[(s->out_head + s->out_count) % FL_I8042_QUEUE] = b;
		s->out_count++;
	}
}

static void update_irq(struct fl_i8042 *kbd)
{
	uint8_t level = kbd->s.out_count && (kbd->s.ctr & CTR_KBD_INT);

	if (level != kbd->s.irq_level && kbd->irq.set_level) {
		kbd->irq.set_level(kbd->irq.ctx, kbd->irq.gsi, level);
		kbd->s.irq_level = level;
	}
}

static void command(struct fl_i8042 *kbd, uint8_t cmd)
{
	struct fl_i8042_state *s = &kbd->s;

	switch (cmd) {
	case 0x20: /* read configuration byte */
		push(s, s->ctr);
		break;
	case 0x60: /* write configuration byte */
	case 0xd1: /* write output port */
	case 0xd2: /* write keyboard output buffer */
	case 0xd3: /* write aux output buffer */
	case 0xd4: /* write to aux device */
		s->pending = cmd;
		break;
	case 0xa7:
		s->ctr |= CTR_AUX_DISABLE;
		break;
	case 0xa8:
		s->ctr &= (uint8_t)~CTR_AUX_DISABLE;
		break;
	case 0xa9: /* aux interface test: passes, but no mouse ever answers */
	case 0xab: /* keyboard interface test */
	case 0xc0: /* read input port */
		push(s, 0x00);
		break;
	case 0xaa: /* controller self-test */
		push(s, 0x55);
		break;
	case 0xad:
		s->ctr |= CTR_KBD_DISABLE;
		break;
	case 0xae:
		s->ctr &= (uint8_t)~CTR_KBD_DISABLE;
		break;
	case 0xd0: /* read output port: reset line high, A20 on */
		push(s, 0x03);
		break;
	case 0xfe: /* pulse the reset line */
		if (kbd->sink.raise)
			kbd->sink.raise(kbd->sink.ctx, FL_EVENT_REBOOT, 0, cmd, "i8042_reset");
		break;
	default:
		break;
	}
}

static void keyboard_command(struct fl_i8042_state *s, uint8_t b)
{
	switch (b) {
	case 0xff: /* reset: ack, self-test passed */
		push(s, 0xfa);
		push(s, 0xaa);
		break;
	case 0xf2: /* identify: MF2 keyboard */
		push(s, 0xfa);
		push(s, 0xab);
		push(s, 0x83);
		break;
	case 0xee: /* echo */
		push(s, 0xee);
		break;
	default:
		push(s, 0xfa);
		break;
	}
}

static void data_write(struct fl_i8042 *kbd, uint8_t b)
{
	struct fl_i8042_state *s = &kbd->s;
	uint8_t pending = s->pending;

	s->pending = 0;
	switch (pending) {
	case 0x60:
		s->ctr = b;
		break;
	case 0xd2:
		push(s, b);
		break;
	case 0xd1: /* output port (A20, reset): reset is only through 0xFE */
	case 0xd3:
	case 0xd4: /* no aux device */
		break;
	default:
		keyboard_command(s, b);
		break;
	}
}

static void port_io(struct fl_i8042 *kbd, int cmd_port, uint8_t *data, uint32_t size,
		    int is_write)
{
	struct fl_i8042_state *s = &kbd->s;

	/* Two single-byte ports; wider accesses use the low byte. */
	pthread_mutex_lock(&kbd->lock);
	if (!is_write)
		memset(data, 0xff, size);
	if (!cmd_port) { /* data port 0x60 */
		if (is_write) {
			data_write(kbd, data[0]);
		} else if (s->out_count) {
			data[0] = s->outq[s->out_head];
			s->out_head = (s->out_head + 1) % FL_I8042_QUEUE;
			s->out_count--;
		} else {
			data[0] = 0;
		}
	} else { /* command/status port 0x64 */
		if (is_write)
			command(kbd, data[0]);
		else
			data[0] = STATUS_SYS | STATUS_UNLOCKED | (s->out_count ? STATUS_OBF : 0);
	}
	update_irq(kbd);
	pthread_mutex_unlock(&kbd->lock);
}

void fl_i8042_data_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	(void)offset;
	port_io(dev, 0, data, size, is_write);
}

void fl_i8042_cmd_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	(void)offset;
	port_io(dev, 1, data, size, is_write);
}

int fl_i8042_inject(struct fl_i8042 *kbd, const uint8_t *codes, uint32_t n)
{
	int rc = 0;

	pthread_mutex_lock(&kbd->lock);
	if (kbd->s.out_count + n > FL_I8042_QUEUE) {
		rc = -EAGAIN;
	} else {
		for (uint32_t i = 0; i < n; i++)
			push(&kbd->s, codes[i]);
		update_irq(kbd);
	}
	pthread_mutex_unlock(&kbd->lock);
	return rc;
}

int fl_i8042_init(struct fl_i8042 *kbd, struct fl_irq irq, struct fl_sink sink)
{
	memset(kbd, 0, sizeof(*kbd));
	if (pthread_mutex_init(&kbd->lock, NULL) != 0)
		return -ENOMEM;
	kbd->irq = irq;
	kbd->sink = sink;
	kbd->s.ctr = CTR_KBD_INT | 0x04 | 0x40; /* interrupts on, system flag, translation */
	return 0;
}

void fl_i8042_fini(struct fl_i8042 *kbd)
{
	pthread_mutex_destroy(&kbd->lock);
}

void fl_i8042_save(struct fl_i8042 *kbd, struct fl_i8042_state *out)
{
	pthread_mutex_lock(&kbd->lock);
	*out = kbd->s;
	pthread_mutex_unlock(&kbd->lock);
}

int fl_i8042_restore(struct fl_i8042 *kbd, const struct fl_i8042_state *in)
{
	if (in->out_count > FL_I8042_QUEUE || in->out_head >= FL_I8042_QUEUE)
		return -EINVAL;
	pthread_mutex_lock(&kbd->lock);
	kbd->s = *in;
	kbd->s.irq_level = !in->irq_level; /* force the line to be re-driven */
	update_irq(kbd);
	pthread_mutex_unlock(&kbd->lock);
	return 0;
}
