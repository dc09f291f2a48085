/*
 * 8250/16550A UART (COM1). Output goes to an fd byte by byte; input is queued by the console
 * thread into a 64-byte FIFO. Interrupts (RDA, THRE) drive one level-triggered line.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "devices.h"

enum {
	UART_RBR_THR = 0,
	UART_IER = 1,
	UART_IIR_FCR = 2,
	UART_LCR = 3,
	UART_MCR = 4,
	UART_LSR = 5,
	UART_MSR = 6,
	UART_SCR = 7,
};

#define IER_RDI 0x01
#define IER_THRI 0x02
#define IIR_NONE 0x01
#define IIR_THRI 0x02
#define IIR_RDI 0x04
#define IIR_FIFO 0xc0
#define FCR_ENABLE 0x01
#define FCR_CLEAR_RX 0x02
#define LCR_DLAB 0x80
#define MCR_LOOP 0x10
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40

static uint8_t iir_of(const struct fl_serial_state *s)
{
	uint8_t fifo = (s->fcr & FCR_ENABLE) ? IIR_FIFO : 0;

	if ((s->ier & IER_RDI) && s->rx_count)
		return IIR_RDI | fifo;
	if ((s->ier & IER_THRI) && s->thr_ipending)
		return IIR_THRI | fifo;
	return IIR_NONE | fifo;
}

static void update_irq(struct fl_serial *uart)
{
	int level = (iir_of(&uart->s) & IIR_NONE) == 0;

	/* Every port access lands here; KVM_IRQ_LINE only when the line moves. */
	if (level != uart->irq_level && uart->irq.set_level) {
		uart->irq.set_level(uart->irq.ctx, uart->irq.gsi, level);
		uart->irq_level = level;
	}
}

static void rx_push(struct fl_serial_state *s, uint8_t b)
{
	if (s->rx_count < FL_SERIAL_FIFO) {
		s->rx[(s->rx_head + s->rx_count) % FL_SERIAL_FIFO] = b;
		s->rx_count++;
	}
}

static uint8_t msr_of(const struct fl_serial_state *s)
{
	if (s->mcr & MCR_LOOP) {
		/* Loopback mirrors DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (Linux probes this). */
		uint8_t m = s->mcr;
		return (uint8_t)(((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) |
				 ((m & 0x08) << 4));
	}
	return 0xb0; /* DCD | DSR | CTS: a cable is always attached */
}

static void transmit(struct fl_serial *uart, uint8_t b)
{
	if (uart->s.mcr & MCR_LOOP) {
		rx_push(&uart->s, b);
		return;
	}
	__atomic_add_fetch(&uart->counters->console_out_bytes, 1, __ATOMIC_RELAXED);
	if (uart->out_fd < 0)
		return;
	/* A full or broken console must not stall or kill the guest: drop and count. */
	if (write(uart->out_fd, &b, 1) != 1)
		__atomic_add_fetch(&uart->counters->console_dropped, 1, __ATOMIC_RELAXED);
}

static uint8_t reg_read(struct fl_serial *uart, uint32_t reg)
{
	struct fl_serial_state *s = &uart->s;
	uint8_t v = 0;

	switch (reg) {
	case UART_RBR_THR:
		if (s->lcr & LCR_DLAB)
			return s->dll;
		if (s->rx_count) {
			int was_full = s->rx_count == FL_SERIAL_FIFO;
			v = s->rx[s->rx_head];
			s->rx_head = (s->rx_head + 1) % FL_SERIAL_FIFO;
			s->rx_count--;
			if (was_full && uart->wake_fd >= 0) {
				uint64_t one = 1;
				if (write(uart->wake_fd, &one, sizeof(one)) < 0) {
					/* the console thread polls again anyway */
				}
			}
		}
		return v;
	case UART_IER:
		return (s->lcr & LCR_DLAB) ? s->dlm : s->ier;
	case UART_IIR_FCR:
		v = iir_of(s);
		if ((v & 0x0f) == IIR_THRI)
			s->thr_ipending = 0;
		return v;
	case UART_LCR:
		return s->lcr;
	case UART_MCR:
		return s->mcr;
	case UART_LSR:
		return LSR_THRE | LSR_TEMT | (s->rx_count ? LSR_DR : 0);
	case UART_MSR:
		return msr_of(s);
	default:
		return s->scr;
	}
}

static void reg_write(struct fl_serial *uart, uint32_t reg, uint8_t v)
{
	struct fl_serial_state *s = &uart->s;

	switch (reg) {
	case UART_RBR_THR:
		if (s->lcr & LCR_DLAB) {
			s->dll = v;
			return;
		}
		transmit(uart, v);
		s->thr_ipending = 1; /* transmitted at once: THR empty again */
		return;
	case UART_IER:
		if (s->lcr & LCR_DLAB) {
			s->dlm = v;
			return;
		}
		if (!(s->ier & IER_THRI) && (v & IER_THRI))
			s->thr_ipending = 1;
		s->ier = v & 0x0f;
		return;
	case UART_IIR_FCR:
		s->fcr = v & 0xc9;
		if (v & FCR_CLEAR_RX)
			s->rx_count = 0;
		return;
	case UART_LCR:
		s->lcr = v;
		return;
	case UART_MCR:
		s->mcr = v & 0x1f;
		return;
	case UART_SCR:
		s->scr = v;
		return;
	default:
		return; /* LSR and MSR are read-only */
	}
}

void fl_serial_io(void *dev, uint64_t offset, uint8_t *data, uint32_t size, int is_write)
{
	struct fl_serial *uart = dev;

	pthread_mutex_lock(&uart->lock);
	/* A wide access touches consecutive registers, as on an ISA bus. */
	for (uint32_t i = 0; i < size; i++) {
		uint64_t reg = offset + i;
		if (reg > UART_SCR) {
			if (!is_write)
				data[i] = 0xff;
			continue;
		}
		if (is_write)
			reg_write(uart, (uint32_t)reg, data[i]);
		else
			data[i] = reg_read(uart, (uint32_t)reg);
	}
	update_irq(uart);
	pthread_mutex_unlock(&uart->lock);
}

uint32_t fl_serial_room(struct fl_serial *uart)
{
	uint32_t room;

	pthread_mutex_lock(&uart->lock);
	room = FL_SERIAL_FIFO - uart->s.rx_count;
	pthread_mutex_unlock(&uart->lock);
	return room;
}

uint32_t fl_serial_input(struct fl_serial *uart, const uint8_t *buf, uint32_t len)
{
	uint32_t n = 0;

	pthread_mutex_lock(&uart->lock);
	while (n < len && uart->s.rx_count < FL_SERIAL_FIFO)
		rx_push(&uart->s, buf[n++]);
	update_irq(uart);
	pthread_mutex_unlock(&uart->lock);
	__atomic_add_fetch(&uart->counters->console_in_bytes, n, __ATOMIC_RELAXED);
	return n;
}

int fl_serial_init(struct fl_serial *uart, struct fl_irq irq, int out_fd, int wake_fd,
		   struct fl_counters *counters)
{
	memset(uart, 0, sizeof(*uart));
	if (pthread_mutex_init(&uart->lock, NULL) != 0)
		return -ENOMEM;
	uart->irq = irq;
	uart->out_fd = out_fd;
	uart->wake_fd = wake_fd;
	uart->counters = counters;
	uart->irq_level = -1;
	uart->s.mcr = 0x08; /* OUT2, as firmware leaves it */
	return 0;
}

void fl_serial_fini(struct fl_serial *uart)
{
	pthread_mutex_destroy(&uart->lock);
}

void fl_serial_save(struct fl_serial *uart, struct fl_serial_state *out)
{
	pthread_mutex_lock(&uart->lock);
	*out = uart->s;
	pthread_mutex_unlock(&uart->lock);
}

int fl_serial_restore(struct fl_serial *uart, const struct fl_serial_state *in)
{
	/* Saved state is untrusted input too (a snapshot file). */
	if (in->rx_count > FL_SERIAL_FIFO || in->rx_head >= FL_SERIAL_FIFO)
		return -EINVAL;
	pthread_mutex_lock(&uart->lock);
	uart->s = *in;
	uart->irq_level = -1;
	update_irq(uart);
	pthread_mutex_unlock(&uart->lock);
	return 0;
}
