#include "uart.h"
#include "io.h"

#define UART_RBR 0 /* THR on write; DLL with DLAB */
#define UART_IER 1 /* DLM with DLAB */
#define UART_IIR 2 /* FCR on write */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define IER_RDI 0x01
#define LSR_DR 0x01
#define LSR_THRE 0x20

/* Bytes we may write after seeing THRE: 16 with a working FIFO, else 1.
 * Every port access is a VM exit (~16 us under PVM), so bursts matter. */
static unsigned tx_burst = 1;
/* IER as the guest wants it; uart_init (also run after `hostile`) restores it. */
static u8 ier;
static void (*tx_hook)(void);

void uart_set_tx_hook(void (*hook)(void)) { tx_hook = hook; }

void uart_init(void)
{
	outb(COM1 + UART_IER, 0x00);
	outb(COM1 + UART_LCR, 0x80); /* DLAB: 115200 baud */
	outb(COM1 + UART_RBR, 0x01);
	outb(COM1 + UART_IER, 0x00);
	outb(COM1 + UART_LCR, 0x03); /* 8N1 */
	outb(COM1 + UART_IIR, 0x07); /* enable and clear the FIFOs */
	outb(COM1 + UART_MCR, 0x0b); /* DTR | RTS | OUT2 (gates the IRQ on a PC) */
	tx_burst = (inb(COM1 + UART_IIR) & 0xc0) == 0xc0 ? 16 : 1;
	outb(COM1 + UART_IER, ier);
}

void uart_set_rx_irq(bool on)
{
	ier = on ? IER_RDI : 0;
	outb(COM1 + UART_IER, ier);
}

void uart_write(const char *s, usize n)
{
	for (bool first = true; n; first = false) {
		/* Each port access is an exit, a line ~100 of them: let the rest of the guest run
		 * between bursts (never from inside the hook's own work: it does not print). */
		if (!first && tx_hook)
			tx_hook();
		/* Bounded: a wedged or absent UART must not hang the guest. */
		for (unsigned spins = 0; spins < 100000; spins++)
			if (inb(COM1 + UART_LSR) & LSR_THRE)
				break;
		for (unsigned i = 0; i < tx_burst && n; i++, n--)
			outb(COM1, (u8)*s++);
	}
}

int uart_poll_rx(void)
{
	if (!(inb(COM1 + UART_LSR) & LSR_DR))
		return -1;
	return inb(COM1 + UART_RBR);
}
