/* compute: long mode (4 KiB identity-mapped pages over the first 16 MiB,
 * built by common/start64.S), PIT channel 0 at hz= (default 100) with a
 * timer handler counting ticks, then a CPU-bound hash with no port I/O:
 *
 * Options: size= (bytes, default 65536, clamped to 4194304),
 *          rounds= (default 4), hz= (default 100).
 * The buffer lives at physical 0x200000 (BUF_BASE). All arithmetic wraps:
 *
 *   state = 0                                              (u64)
 *   for i in 0..size:  buf[i] = (u8)(i * 31)
 *   for r in 0..rounds:
 *       h = 0xcbf29ce484222325                             (FNV-1a 64)
 *       for i in 0..size:  h = (h ^ buf[i]) * 0x100000001b3
 *       state = rotl64(state, 13) ^ h
 *       for i in 0..size:                                  (mutate)
 *           buf[i] = (u8)((buf[i] ^ (u8)(state >> (8 * (i % 8)))) + (u8)r)
 *   hash = state
 *
 * Output: "compute: size=N rounds=R hash=0x%016llx ticks=T\n", exit 0.
 * T (timer interrupts taken during the run) depends on time. */
#include "common/lib.h"
#include "common/compute_run.h"

#define BUF_BASE 0x200000ul
#define BUF_MAX (4ul << 20)

static volatile u64 ticks;

static void timer(void) { ticks++; }

int main(void)
{
    u64 size = cmdline_u32("size", 65536);
    u32 rounds = cmdline_u32("rounds", 4);
    u32 hz = cmdline_u32("hz", 100);
    if (size > BUF_MAX)
        size = BUF_MAX;

    pic_init();
    irq_set_handler(0, timer);
    pit_init(hz);
    pic_unmask(0);
    sti();

    u64 hash = compute_run((u8 *)BUF_BASE, size, rounds);

    cli();
    printf("compute: size=%llu rounds=%u hash=0x%016llx ticks=%llu\n", size, rounds, hash, ticks);
    return 0;
}
