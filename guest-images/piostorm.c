/* piostorm: n iterations (cmdline n=, default 300000) of one 32-bit write
 * and one 32-bit read of the scratch register at port 0x600:
 *
 *   sum = 0x811c9dc5
 *   for i in 0..n:                       (u32 arithmetic, wrapping)
 *       v = i * 0x9e3779b1 + 0x12345678
 *       outl(0x600, v); r = inl(0x600)
 *       if r != v: print "piostorm: mismatch at <i>\n", exit 2
 *       sum = (sum ^ r) * 0x01000193
 *
 * (2n port accesses in all.) port= (default 0x600) picks another 32-bit
 * latch, e.g. port=0xe0 with QEMU's -device pc-testdev, for side-by-side
 * runs under QEMU, which has no scratch register at 0x600. hz= (default 0:
 * none) runs PIT channel 0 at that rate through the PIC during the storm,
 * interrupts on, and adds " ticks=T" to the output (a guest whose timer
 * interrupts can wait for its own exits); spin= (default 0) adds that many
 * iterations of an exit-free loop before each write (exits further apart
 * than a tick). Output: "piostorm: n=N
 * sum=0x%08x\n", exit 0. */
#include "common/lib.h"

static volatile u32 ticks;

static void timer(void) { ticks++; }

int main(void)
{
    u32 n = cmdline_u32("n", 300000);
    u16 port = (u16)cmdline_u32("port", SCRATCH_PORT);
    u32 hz = cmdline_u32("hz", 0);
    u32 spin = cmdline_u32("spin", 0);
    u32 sum = 0x811c9dc5u;
    if (hz) {
        pic_init();
        irq_set_handler(0, timer);
        pit_init(hz);
        pic_unmask(0);
        sti();
    }
    for (u32 i = 0; i < n; i++) {
        for (volatile u32 s = 0; s < spin; s++)
            ;
        u32 v = i * 0x9e3779b1u + 0x12345678u;
        outl(port, v);
        u32 r = inl(port);
        if (r != v) {
            printf("piostorm: mismatch at %u\n", i);
            exit(2);
        }
        sum = (sum ^ r) * 0x01000193u;
    }
    cli();
    if (hz)
        printf("piostorm: n=%u sum=0x%08x ticks=%u\n", n, sum, ticks);
    else
        printf("piostorm: n=%u sum=0x%08x\n", n, sum);
    return 0;
}
