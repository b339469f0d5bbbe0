/* spinner: a guest that never sleeps. PIT channel 0 at hz= (default 100)
 * through the PIC; between two timer interrupts it busy-waits in a loop
 * that makes no exit (no HLT, no port I/O), so only an injected timer
 * interrupt moves it on. Every every= ticks (default 25) it prints
 * "spinner: tick N"; with ticks= (default 0: forever) it exits 0 after
 * that many ticks.
 *
 * What it is for: a VMM that stops injecting timer interrupts into a guest
 * that never exits (as a secondary that went live once did) leaves this
 * guest spinning forever, and its output stops. */
#include "common/lib.h"

static volatile u32 ticks;

static void timer(void) { ticks++; }

int main(void)
{
    u32 hz = cmdline_u32("hz", 100);
    u32 every = cmdline_u32("every", 25);
    u32 limit = cmdline_u32("ticks", 0);
    if (every == 0)
        every = 1;

    pic_init();
    irq_set_handler(0, timer);
    pit_init(hz);
    pic_unmask(0);
    sti();
    printf("spinner: up hz=%u\n", hz);

    u32 seen = 0;
    for (;;) {
        while (ticks == seen)
            ; /* spin: no exit until the next timer interrupt */
        seen = ticks;
        if (seen % every == 0)
            printf("spinner: tick %u\n", seen);
        if (limit && seen >= limit)
            break;
    }
    cli();
    printf("spinner: done ticks=%u\n", ticks);
    return 0;
}
