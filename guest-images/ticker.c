/* ticker: PIT channel 0 at 1 kHz through the PIC (IRQ0, vector 0x20);
 * takes exactly 2000 timer interrupts in a sti;hlt loop. Every 100 ticks
 * it reads RTC seconds and minutes and latches+reads PIT channel 0,
 * folding each value v into   checksum = rotl32(checksum, 5) ^ v
 * (starting at 0). The checksum depends on time, so it varies run to run.
 * Output: "ticks=2000 checksum=0x%08x\n", exit 0. */
#include "common/lib.h"

#define TARGET 2000u

static volatile u32 ticks;

static void timer(void)
{
    if (++ticks >= TARGET)
        pic_mask(0); /* exactly TARGET interrupts, no more */
}

static u32 fold(u32 sum, u32 v) { return ((sum << 5) | (sum >> 27)) ^ v; }

int main(void)
{
    u32 checksum = 0, seen = 0;

    pic_init();
    irq_set_handler(0, timer);
    pit_init(1000);
    pic_unmask(0);

    for (;;) {
        cli();
        u32 t = ticks;
        if (t >= TARGET)
            break;
        if (t / 100 != seen / 100) {
            seen = t;
            checksum = fold(checksum, rtc_read(0x00)); /* seconds */
            checksum = fold(checksum, rtc_read(0x02)); /* minutes */
            checksum = fold(checksum, pit_read_ch0());
        }
        sti_hlt();
    }
    printf("ticks=%u checksum=0x%08x\n", ticks, checksum);
    return 0;
}
