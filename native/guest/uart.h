/* COM1 (8250/16550) driven by polling from ring 3. */
#ifndef GUEST_UART_H
#define GUEST_UART_H

#include "types.h"

#define COM1 0x3f8

void uart_init(void);
void uart_write(const char *s, usize n);
/* Called between the FIFO-sized bursts of a write: what a kernel's interrupts would do
 * meanwhile (the network answers while a line is printed). NULL: nothing. */
void uart_set_tx_hook(void (*hook)(void));
/* Next received byte, or -1 when none is waiting. */
int uart_poll_rx(void);
/* Raise IRQ 4 while received bytes wait (IER bit 0); off at boot. */
void uart_set_rx_irq(bool on);

#endif
