/* echo: interrupt-driven serial input. Enables the UART RX interrupt
 * (IER=1, MCR OUT2), unmasks IRQ4, prints "echo: ready\n" and sleeps in a
 * sti;hlt loop. The IRQ4 handler drains RBR while LSR.DR is set into a line
 * buffer; each completed non-empty line (ended by '\n' or '\r') is printed
 * as "echo: <line>\n" (lines longer than 127 bytes are truncated; empty
 * lines, e.g. from "\r\n", are ignored). The line "quit" prints
 * "echo: bye\n" and exits 0. */
#include "common/lib.h"

#define LINE_MAX 128

static char line[LINE_MAX];
static u32 len;

static int is_quit(void)
{
    return len == 4 && line[0] == 'q' && line[1] == 'u' && line[2] == 'i' && line[3] == 't';
}

static void rx_drain(void)
{
    while (inb(COM1 + 5) & 0x01) {
        char c = (char)inb(COM1);
        if (c == '\n' || c == '\r') {
            if (!len)
                continue;
            line[len] = 0;
            if (is_quit()) {
                serial_puts("echo: bye\n");
                exit(0);
            }
            printf("echo: %s\n", line);
            len = 0;
        } else if (len < LINE_MAX - 1) {
            line[len++] = c;
        }
    }
}

int main(void)
{
    pic_init();
    irq_set_handler(4, rx_drain);
    outb(COM1 + 3, 0x03); /* LCR: 8N1, DLAB=0 */
    outb(COM1 + 1, 0x01); /* IER: received data available */
    outb(COM1 + 4, 0x0b); /* MCR: DTR | RTS | OUT2 */
    pic_unmask(4);
    serial_puts("echo: ready\n");
    rx_drain(); /* input that arrived before IER was set */
    for (;;)
        sti_hlt();
}
