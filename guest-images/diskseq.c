/* diskseq: sequential write / flush / read-back / verify on the first
 * virtio-blk device (virtio-mmio v2, found via virtio_mmio.device= tokens).
 *
 * Options: seed= (1), start= (first sector, 0), count= (sectors, 256),
 *          bench= (0; 1 = same requests, no pattern generated or checked),
 *          chunk= (sectors per request, 8; 1..2048), write= (1; 0 = skip the
 *          write and flush and only read back + verify what an earlier run
 *          wrote, e.g. on a read-only disk).
 *
 * Pattern (all u32 arithmetic wraps; s = sector number, j = 0..511):
 *
 *   x = seed ^ s;  if x == 0: x = 0x6d2b79f5
 *   for j in 0..512:
 *       x ^= x << 13;  x ^= x >> 17;  x ^= x << 5       (xorshift32)
 *       byte[s][j] = x & 0xff
 *
 * Checksum: FNV-1a 32 (h = 0x811c9dc5; per byte h = (h ^ b) * 0x01000193)
 * over all bytes read, sectors start..start+count-1 in order.
 *
 * Flow: write [start, start+count) in requests of `chunk` sectors (one
 * request in flight), FLUSH (if VIRTIO_BLK_F_FLUSH was offered), read the
 * range back in the same chunks, verify byte for byte, then print
 * "diskseq: sectors=N checksum=0x%08x" and exit 0.
 *
 * Read-only disk (VIRTIO_BLK_F_RO offered) with write=1: one write request
 * (sector `start`, `chunk` sectors of pattern) is sent; it must complete with
 * IOERR: prints "diskseq: write rejected (read-only)" and exits 0 without the
 * rest. A read-only disk with write=0 is read and verified normally.
 *
 * Exit codes: 0 ok; 2 verify mismatch ("diskseq: mismatch sector S byte J
 * got 0xGG want 0xWW"); 3 unexpected request status or a request timeout
 * (2 s) or DEVICE_NEEDS_RESET ("diskseq: <op> sector S status=N" / "...
 * timeout" / "... needs-reset"), also a write to
 * a read-only disk that succeeds; 4 no usable virtio-blk device; 5 bad
 * options (chunk out of range, range beyond the capacity).
 */
#include "common/lib.h"
#include "common/virtio.h"

#define BUF_BASE 0x400000u /* data buffer, chunk * 512 bytes (max 1 MiB) */
#define CHUNK_MAX 2048u
#define TIMEOUT_MS 2000

static struct blk blk;

/* Fill one 512-byte sector of pattern, 4 bytes per store. */
static void gen_sector(u32 seed, u32 s, volatile u32 *out)
{
    u32 x = seed ^ s;
    if (!x)
        x = 0x6d2b79f5;
    for (int j = 0; j < 128; j++) {
        u32 w;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        w = x & 0xff;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        w |= (x & 0xff) << 8;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        w |= (x & 0xff) << 16;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        w |= x << 24;
        out[j] = w;
    }
}

/* Verify one sector against the pattern and fold it into the FNV hash:
 * word compares, per-byte FNV only (the emulator runs ~1.5 M insn/s). */
static u32 check_sector(u32 seed, u32 s, const volatile u32 *in, u32 h)
{
    u32 x = seed ^ s;
    if (!x)
        x = 0x6d2b79f5;
    for (int j = 0; j < 128; j++) {
        u32 w = in[j], e;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        e = x & 0xff;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        e |= (x & 0xff) << 8;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        e |= (x & 0xff) << 16;
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        e |= x << 24;
        if (w != e) {
            int k = 0;
            while (((w ^ e) >> (8 * k)) & 0xff ? 0 : 1)
                k++;
            printf("diskseq: mismatch sector %u byte %u got 0x%02x want 0x%02x\n", s, (u32)(4 * j + k),
                   (w >> (8 * k)) & 0xff, (e >> (8 * k)) & 0xff);
            exit(2);
        }
        h = (h ^ (w & 0xff)) * 0x01000193u;
        h = (h ^ ((w >> 8) & 0xff)) * 0x01000193u;
        h = (h ^ ((w >> 16) & 0xff)) * 0x01000193u;
        h = (h ^ (w >> 24)) * 0x01000193u;
    }
    return h;
}

static void check_status(const char *op, u32 sector, int st)
{
    if (st == BLK_TIMEOUT || st == BLK_NEEDS_RESET) {
        printf("diskseq: %s sector %u %s\n", op, sector, st == BLK_TIMEOUT ? "timeout" : "needs-reset");
        exit(3);
    }
    if (st != VIRTIO_BLK_S_OK) {
        printf("diskseq: %s sector %u status=%d\n", op, sector, st);
        exit(3);
    }
}

int main(void)
{
    u32 seed = cmdline_u32("seed", 1);
    u32 start = cmdline_u32("start", 0);
    u32 count = cmdline_u32("count", 256);
    u32 chunk = cmdline_u32("chunk", 8);
    u32 do_write = cmdline_u32("write", 1);
    /* bench=1: the same requests without generating or checking the
     * pattern, so the run measures the block path, not the guest's CPU. */
    u32 bench = cmdline_u32("bench", 0);

    pic_init();
    virtio_timer_init();
    sti();
    virtio_probe();
    struct virtio_dev *d = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!d) {
        printf("diskseq: no virtio-blk device\n");
        return 4;
    }
    if (blk_init(&blk, d)) {
        printf("diskseq: virtio-blk init failed\n");
        return 4;
    }
    printf("diskseq: capacity=%llu ro=%d flush=%d\n", blk.capacity, blk.ro, blk.flush);
    if (!chunk || chunk > CHUNK_MAX) {
        printf("diskseq: chunk must be 1..%u\n", CHUNK_MAX);
        return 5;
    }
    if ((u64)start + count > blk.capacity) {
        printf("diskseq: range %u+%u beyond capacity %llu\n", start, count, blk.capacity);
        return 5;
    }

    if (do_write && blk.ro) {
        u32 n = chunk < count ? chunk : (count ? count : 1);
        for (u32 i = 0; i < n; i++)
            gen_sector(seed, start + i, (volatile u32 *)(uptr)(BUF_BASE + 512 * i));
        int st = blk_rw(&blk, VIRTIO_BLK_T_OUT, start, BUF_BASE, 512 * n, TIMEOUT_MS);
        if (st == VIRTIO_BLK_S_IOERR) {
            printf("diskseq: write rejected (read-only)\n");
            return 0;
        }
        if (st == BLK_TIMEOUT || st == BLK_NEEDS_RESET)
            printf("diskseq: write to read-only disk: %s\n", st == BLK_TIMEOUT ? "timeout" : "needs-reset");
        else
            printf("diskseq: write to read-only disk: status=%d (expected 1)\n", st);
        return 3;
    }

    if (do_write) {
        for (u32 s = start; s < start + count; s += chunk) {
            u32 n = start + count - s < chunk ? start + count - s : chunk;
            for (u32 i = 0; i < n && !bench; i++)
                gen_sector(seed, s + i, (volatile u32 *)(uptr)(BUF_BASE + 512 * i));
            check_status("write", s, blk_rw(&blk, VIRTIO_BLK_T_OUT, s, BUF_BASE, 512 * n, TIMEOUT_MS));
        }
        if (blk.flush)
            check_status("flush", 0, blk_rw(&blk, VIRTIO_BLK_T_FLUSH, 0, 0, 0, TIMEOUT_MS));
    }

    u32 h = 0x811c9dc5u;
    for (u32 s = start; s < start + count; s += chunk) {
        u32 n = start + count - s < chunk ? start + count - s : chunk;
        /* poison the buffer's first word per sector so a short read shows */
        for (u32 i = 0; i < n && !bench; i++)
            *(volatile u32 *)(uptr)(BUF_BASE + 512 * i) = 0xdeadbeef;
        check_status("read", s, blk_rw(&blk, VIRTIO_BLK_T_IN, s, BUF_BASE, 512 * n, TIMEOUT_MS));
        for (u32 i = 0; i < n && !bench; i++)
            h = check_sector(seed, s + i, (const volatile u32 *)(uptr)(BUF_BASE + 512 * i), h);
    }
    if (bench) {
        printf("diskseq: bench sectors=%u\n", count);
        return 0;
    }
    printf("diskseq: sectors=%u checksum=0x%08x\n", count, h);
    return 0;
}
