/* rdtsc: breaks determinism on purpose. RDTSC cannot be trapped under KVM,
 * so a replay sees different values; this guest lets tandem prove that it
 * detects the divergence (epoch state hashes differ) and repairs it.
 *
 * Options: n= (iterations, default 200), hz= (PIT rate, default 100; a
 *          timer handler counts ticks).
 * Each iteration i (u32 wrapping arithmetic):
 *
 *   (lo, hi) = rdtsc
 *   state = rotl32(state, 5) ^ lo ^ hi          (global in memory, start 0)
 *   buf[i % 1024] = state                       (4 KiB page-aligned buffer)
 *   busy work: FNV-1a 32 over a 512-byte array (≈ 3000 instructions,
 *              deterministic, independent of the TSC)
 *   every 50 iterations (i % 50 == 0): "rdtsc: i=I state=0x%08x\n"
 *
 * Then `tail=` (default 3) timer ticks of deterministic busy work.
 * Output (last line): "rdtsc: done n=N state=0x%08x ticks=T\n", exit 0.
 * state and T depend on time, so they vary run to run. */
#include "common/lib.h"

#define WORK_BYTES 512u
#define BUF_WORDS 1024u

static volatile u32 ticks;
static volatile u32 state;
static volatile u32 buf[BUF_WORDS] __attribute__((aligned(4096)));
static u8 work[WORK_BYTES];
static u32 work_hash;

static void timer(void) { ticks++; }

static inline void rdtsc(u32 *lo, u32 *hi)
{
    u32 a, d;
    __asm__ volatile("rdtsc" : "=a"(a), "=d"(d));
    *lo = a;
    *hi = d;
}

static u32 rotl32(u32 x, unsigned k) { return (x << k) | (x >> (32 - k)); }

/* Deterministic busy work: FNV-1a 32 over work[], then perturb one byte so
 * successive passes differ (still independent of the TSC). */
static void busy(u32 i)
{
    u32 h = 0x811c9dc5u ^ work_hash;
    for (u32 j = 0; j < WORK_BYTES; j++)
        h = (h ^ work[j]) * 0x01000193u;
    work[i % WORK_BYTES] ^= (u8)h;
    work_hash = h;
}

int main(void)
{
    u32 n = cmdline_u32("n", 200);
    u32 hz = cmdline_u32("hz", 100);

    for (u32 j = 0; j < WORK_BYTES; j++)
        work[j] = (u8)(j * 31 + 7);

    pic_init();
    irq_set_handler(0, timer);
    pit_init(hz);
    pic_unmask(0);
    sti();

    for (u32 i = 0; i < n; i++) {
        u32 lo, hi;
        rdtsc(&lo, &hi);
        u32 s = rotl32(state, 5) ^ lo ^ hi;
        state = s;
        buf[i % BUF_WORDS] = s;
        busy(i);
        if (i % 50 == 0)
            printf("rdtsc: i=%u state=0x%08x\n", i, s);
    }

    /* A deterministic tail of `tail=` timer ticks (default 3) of exit-free
     * work: the recorder's kicks there give the replay sync points after
     * the last RDTSC, so its divergence can be repaired before the end. */
    u32 tail = cmdline_u32("tail", 3);
    u32 t0 = ticks;
    for (u32 j = 0; ticks - t0 < tail; j++)
        busy(j);

    cli();
    printf("rdtsc: done n=%u state=0x%08x ticks=%u\n", n, state, ticks);
    return 0;
}
