/* virtio-abuse: drives the virtio-mmio devices like a buggy or hostile
 * driver would, then proves the VM still works.
 *
 * Needs the first virtio-blk device (exit 4 without one); the net steps
 * (6x) run only when a virtio-net device is present ("step 6 skipped (no
 * virtio-net device)" otherwise). No options (virtio_debug=1 lists the
 * windows found).
 *
 * Each step prints one line and then resets the device (Status = 0):
 *   virtio-abuse: step <id> <name> status=0x<SS> used=<n>|needs-reset|timeout|-
 *                 [blk=0x<BB>] isr=0x<I> [extra] [irq-stuck] [reset=0x<RR>]
 * status = the Status register after the attack (0x40 = DEVICE_NEEDS_RESET
 * is a fine answer), used = the queue's used index after the request
 * completed, needs-reset = the device set DEVICE_NEEDS_RESET instead of
 * completing, timeout = neither within 500 ms (also fine: what matters is
 * that nothing hangs or crashes), "-" = no request was sent (or nothing
 * waited for), blk = the request's status byte (0xff = never written; 0 OK,
 * 1 IOERR, 2 UNSUPP), isr = the InterruptStatus bits the IRQ handler
 * acknowledged during the step (1 used buffer, 2 config change), irq-stuck = the device's level-triggered line kept interrupting
 * with InterruptStatus 0 (64 times in a row) and was masked until the reset
 * (QEMU does that once it marks a device broken), reset = Status still
 * nonzero after writing 0 (a device bug).
 * Every wait is bounded (PIT ticks, 100 Hz).
 *
 * Steps: 1a QueueNum=3 (not a power of two) + QueueReady; 1b QueueNum >
 * QueueNumMax; 1c QueueNum=0; 2a QueueNotify before DRIVER_OK; 2b DRIVER_OK
 * without FEATURES_OK; 2c FEATURES_OK without VERSION_1; 2d features
 * rewritten after FEATURES_OK; 2e 8- and 16-bit register accesses; 2f
 * reserved/out-of-window offsets, writes to read-only registers, unaligned
 * read; 3a-3d blk header / data / status outside guest RAM (0xfff00000),
 * data crossing 4 GiB and a 64-bit address that wraps; 4a descriptor loop
 * (next = itself, NEXT set); 4b 3-descriptor cycle; 4c next out of range;
 * 5a zero-length data; 5b 1 GiB data; 5c 8-byte header; 5d zero-length
 * status; 5e unknown request type (expect blk=0x02); 5f read at sector =
 * capacity (expect blk=0x01); 5g IN into a device-read-only buffer (expect
 * blk=0x01 data=intact); 6a net
 * TX and RX notified with no buffers; 6b TX buffer outside RAM; 6c TX
 * zero-length and header-only buffers; 6d TX 1 GiB buffer; 6e TX avail
 * index jumped by num + 1000; 7a avail ring head >= QueueNum; 7b rings
 * outside RAM; 7c misaligned rings; 8 reset with a request in flight; 9
 * InterruptACK with bits never raised.
 *
 * Finally: blk re-initialised normally, sector 0 written with a pattern
 * (byte i = (i * 7 + 3) & 0xff), flushed, read back and compared ("read-only
 * disk: read only" if VIRTIO_BLK_F_RO); the net device (if any) is
 * re-initialised and must reach DRIVER_OK without NEEDS_RESET. Then
 * "virtio-abuse: survived", exit 0.
 * Exit codes: 0 survived; 3 final check failed ("virtio-abuse: final ...");
 * 4 no virtio-blk device or it cannot be initialised.
 */
#include "common/lib.h"
#include "common/virtio.h"

#define STEP_MS 500
#define FINAL_MS 2000
#define DATA 0x400000u   /* scratch data buffers, up to 4 MiB + 64 KiB */
#define BAD 0xfff00000u  /* not guest RAM */
#define NETBUF 0x480000u /* a TX frame */

static struct virtio_dev *bd, *nd;
static struct virtq q, q2;
static u64 capacity;
static volatile struct virtio_blk_req_hdr *const hdr = (volatile struct virtio_blk_req_hdr *)VIRTIO_MEM_BLKREQ;
static volatile u8 *const stb = (volatile u8 *)(VIRTIO_MEM_BLKREQ + 16);

#define NOTHING_SENT (-2)

static int used_cond(void *arg) { return virtq_has_used(arg); }

static void d(struct virtq *vq, u32 i, u64 addr, u32 len, u16 flags, u16 next)
{
    vq->desc[i].addr = addr;
    vq->desc[i].len = len;
    vq->desc[i].flags = flags;
    vq->desc[i].next = next;
}

static void fill_hdr(u32 type, u64 sector)
{
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *stb = 0xff;
}

/* Standard three-descriptor blk request in descriptors 0..2. */
static void std_req(struct virtq *vq, u32 type, u64 sector, u64 data, u32 len, u16 dflags)
{
    fill_hdr(type, sector);
    d(vq, 0, VIRTIO_MEM_BLKREQ, 16, VIRTQ_DESC_F_NEXT, 1);
    d(vq, 1, data, len, VIRTQ_DESC_F_NEXT | dflags, 2);
    d(vq, 2, VIRTIO_MEM_BLKREQ + 16, 1, VIRTQ_DESC_F_WRITE, 0);
}

/* Push head, notify, wait: VQ_WAIT_USED, VQ_WAIT_TIMEOUT or
 * VQ_WAIT_NEEDS_RESET. */
static int kick(struct virtio_dev *dev, struct virtq *vq, u16 head)
{
    virtq_push(vq, head);
    virtq_notify(dev, vq);
    return virtq_wait_used(dev, vq, STEP_MS);
}

/* Negotiate + queue 0 (num 16) on the blk device; DRIVER_OK if ok. */
static int blk_up(int driver_ok)
{
    if (virtio_negotiate(bd, (1u << VIRTIO_BLK_F_RO) | (1u << VIRTIO_BLK_F_FLUSH)))
        return -1;
    if (virtq_setup(bd, &q, 0, 16, VIRTIO_MEM_SPAREQ))
        return -1;
    if (driver_ok)
        virtio_driver_ok(bd);
    return 0;
}

/* completed: a VQ_WAIT_* value or NOTHING_SENT. Prints without newline. */
static void report(const char *id, const char *name, struct virtio_dev *dev, struct virtq *vq, int completed,
                int show_blk)
{
    u32 s = vio_read(dev, VIRTIO_MMIO_STATUS);
    printf("virtio-abuse: step %s %s status=0x%02x", id, name, s);
    if (completed == VQ_WAIT_USED)
        printf(" used=%u", (u32)vq->used->idx);
    else if (completed == VQ_WAIT_TIMEOUT)
        printf(" timeout");
    else if (completed == VQ_WAIT_NEEDS_RESET)
        printf(" needs-reset");
    else
        printf(" -");
    if (show_blk)
        printf(" blk=0x%02x", (u32)*stb);
    printf(" isr=0x%x", dev->isr_seen);
}

static void end(struct virtio_dev *dev)
{
    if (dev->irq_stuck)
        printf(" irq-stuck");
    u32 r = virtio_reset(dev);
    if (r)
        printf(" reset=0x%02x", r);
    dev->isr_seen = 0;
    serial_putc('\n');
}

/* A blk step: bring the device up, let setup() build the chain at head 0,
 * kick, report. */
static void blk_step(const char *id, const char *name, void (*setup)(void))
{
    if (blk_up(1)) {
        printf("virtio-abuse: step %s %s init failed\n", id, name);
        virtio_reset(bd);
        return;
    }
    setup();
    int c = kick(bd, &q, 0);
    report(id, name, bd, &q, c, 1);
    end(bd);
}

static void s3a(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[0].addr = BAD;
}
static void s3b(void) { std_req(&q, VIRTIO_BLK_T_IN, 0, BAD, 512, VIRTQ_DESC_F_WRITE); }
static void s3c(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[2].addr = BAD;
}
static void s3d(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, 0xfffffe00u, 1024, VIRTQ_DESC_F_WRITE);
    d(&q, 2, 0xfffffffffffff000ull, 0x2000, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 3);
    d(&q, 3, VIRTIO_MEM_BLKREQ + 16, 1, VIRTQ_DESC_F_WRITE, 0);
}
static void s4a(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[1].next = 1;
}
static void s4b(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[2].flags = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
    q.desc[2].next = 0;
}
static void s4c(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[1].next = 0xffff;
}
static void s5a(void) { std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 0, VIRTQ_DESC_F_WRITE); }
static void s5b(void) { std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 0x40000000u, VIRTQ_DESC_F_WRITE); }
static void s5c(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[0].len = 8;
}
static void s5d(void)
{
    std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
    q.desc[2].len = 0;
}
static void s5e(void) { std_req(&q, 0x1234, 0, DATA, 512, VIRTQ_DESC_F_WRITE); }
static void s5f(void) { std_req(&q, VIRTIO_BLK_T_IN, capacity, DATA, 512, VIRTQ_DESC_F_WRITE); }
static void s5g(void) { std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, 0); }

/* ---- step groups ---- */

static void steps_queue_num(void)
{
    static const u32 nums[3] = { 3, 0, 0 };
    static const char *const ids[3] = { "1a", "1b", "1c" };
    static const char *const names[3] = { "qnum-not-pow2", "qnum-over-max", "qnum-zero" };
    for (int i = 0; i < 3; i++) {
        if (virtio_negotiate(bd, 0)) {
            printf("virtio-abuse: step %s init failed\n", ids[i]);
            virtio_reset(bd);
            continue;
        }
        vio_write(bd, VIRTIO_MMIO_QUEUE_SEL, 0);
        u32 max = vio_read(bd, VIRTIO_MMIO_QUEUE_NUM_MAX);
        u32 num = i == 1 ? (max ? max * 2 : 0x10000) : nums[i];
        vio_write(bd, VIRTIO_MMIO_QUEUE_NUM, num);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MEM_SPAREQ);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DRIVER_LOW, VIRTIO_MEM_SPAREQ + 0x2000);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DEVICE_LOW, VIRTIO_MEM_SPAREQ + 0x4000);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
        /* an empty avail ring, so a notify finds nothing */
        *(volatile u32 *)(VIRTIO_MEM_SPAREQ + 0x2000) = 0;
        *(volatile u32 *)(VIRTIO_MEM_SPAREQ + 0x4000) = 0;
        vio_write(bd, VIRTIO_MMIO_QUEUE_READY, 1);
        u32 ready = vio_read(bd, VIRTIO_MMIO_QUEUE_READY);
        virtio_driver_ok(bd);
        vio_write(bd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        report(ids[i], names[i], bd, &q, NOTHING_SENT, 0);
        printf(" num=%u max=%u ready=%u", num, max, ready);
        end(bd);
    }
}

static void steps_order(void)
{
    /* 2a: a valid read, notified before DRIVER_OK */
    if (blk_up(0) == 0) {
        std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
        int c1 = kick(bd, &q, 0);
        int c2 = c1;
        if (c1 != VQ_WAIT_USED) {
            virtio_driver_ok(bd);
            virtq_notify(bd, &q);
            c2 = virtq_wait_used(bd, &q, STEP_MS);
        }
        report("2a", "notify-before-driver-ok", bd, &q, c2, 1);
        printf(" before=%s", c1 == VQ_WAIT_USED ? "done" : c1 == VQ_WAIT_TIMEOUT ? "none" : "needs-reset");
        end(bd);
    }
    /* 2b: DRIVER_OK without FEATURES_OK (no features written at all) */
    virtio_reset(bd);
    vio_write(bd, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(bd, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    vio_write(bd, VIRTIO_MMIO_STATUS,
              VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK);
    vio_write(bd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    report("2b", "driver-ok-without-features-ok", bd, &q, NOTHING_SENT, 0);
    end(bd);
    /* 2c: FEATURES_OK without VERSION_1 (a legacy driver) */
    vio_write(bd, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    for (u32 sel = 0; sel < 2; sel++) {
        vio_write(bd, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        vio_write(bd, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    }
    vio_write(bd, VIRTIO_MMIO_STATUS,
              VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    report("2c", "features-ok-without-version-1", bd, &q, NOTHING_SENT, 0);
    end(bd);
    /* 2d: all feature bits written after FEATURES_OK, then a request */
    if (blk_up(0) == 0) {
        for (u32 sel = 0; sel < 4; sel++) {
            vio_write(bd, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            vio_write(bd, VIRTIO_MMIO_DRIVER_FEATURES, 0xffffffffu);
        }
        virtio_driver_ok(bd);
        std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
        int c = kick(bd, &q, 0);
        report("2d", "features-after-features-ok", bd, &q, c, 1);
        end(bd);
    }
    /* 2e: 8- and 16-bit accesses to 32-bit registers */
    {
        volatile u8 *b8 = (volatile u8 *)bd->base;
        volatile u16 *b16 = (volatile u16 *)bd->base;
        u32 m8 = b8[VIRTIO_MMIO_MAGIC_VALUE], m8h = b8[VIRTIO_MMIO_MAGIC_VALUE + 1];
        u32 m16 = b16[VIRTIO_MMIO_MAGIC_VALUE / 2], m16h = b16[VIRTIO_MMIO_MAGIC_VALUE / 2 + 1];
        b8[VIRTIO_MMIO_STATUS] = VIRTIO_STATUS_ACKNOWLEDGE;
        b16[VIRTIO_MMIO_STATUS / 2] = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
        b16[VIRTIO_MMIO_QUEUE_SEL / 2] = 0;
        b8[VIRTIO_MMIO_QUEUE_NUM] = 8;
        b8[VIRTIO_MMIO_QUEUE_NOTIFY] = 0;
        u32 s8 = b8[VIRTIO_MMIO_STATUS];
        report("2e", "narrow-access", bd, &q, NOTHING_SENT, 0);
        printf(" magic8=0x%02x,0x%02x magic16=0x%04x,0x%04x status8=0x%02x", m8, m8h, m16, m16h, s8);
        end(bd);
    }
    /* 2f: reserved / end-of-window offsets, read-only registers, unaligned */
    {
        u32 r0f0 = vio_read(bd, 0x0f0), rffc = vio_read(bd, 0xffc);
        vio_write(bd, VIRTIO_MMIO_MAGIC_VALUE, 0);
        vio_write(bd, VIRTIO_MMIO_DEVICE_ID, 0x1234);
        vio_write(bd, VIRTIO_MMIO_QUEUE_NUM_MAX, 0x10000);
        vio_write(bd, VIRTIO_MMIO_CONFIG, 0xffffffffu); /* capacity is read-only */
        vio_write(bd, 0xffc, 0xffffffffu);
        u32 una = *(volatile u32 *)(bd->base + 0x102);
        u32 magic = vio_read(bd, VIRTIO_MMIO_MAGIC_VALUE), id = vio_read(bd, VIRTIO_MMIO_DEVICE_ID);
        u32 cap = vio_read(bd, VIRTIO_MMIO_CONFIG);
        report("2f", "odd-offsets", bd, &q, NOTHING_SENT, 0);
        printf(" r0f0=0x%08x rffc=0x%08x unaligned=0x%08x magic=0x%08x id=%u cap_lo=%u", r0f0, rffc, una, magic,
               id, cap);
        end(bd);
    }
}

static void steps_requests(void)
{
    blk_step("3a", "header-outside-ram", s3a);
    blk_step("3b", "data-outside-ram", s3b);
    blk_step("3c", "status-outside-ram", s3c);
    blk_step("3d", "data-wraps-address-space", s3d);
    blk_step("4a", "desc-self-loop", s4a);
    blk_step("4b", "desc-cycle", s4b);
    blk_step("4c", "desc-next-out-of-range", s4c);
    blk_step("5a", "zero-length-data", s5a);
    blk_step("5b", "oversize-data-1g", s5b);
    blk_step("5c", "short-header", s5c);
    blk_step("5d", "zero-length-status", s5d);
    blk_step("5e", "unknown-type", s5e);
    blk_step("5f", "read-at-capacity", s5f);
    /* 5g: the data buffer lacks VIRTQ_DESC_F_WRITE; expect blk=0x01 and
     * the buffer untouched ("data=intact"; "data=written" otherwise). */
    if (blk_up(1) == 0) {
        volatile u8 *p = (volatile u8 *)DATA;
        for (u32 i = 0; i < 512; i++)
            p[i] = 0xa5;
        s5g();
        int c = kick(bd, &q, 0);
        report("5g", "in-to-readonly-buffer", bd, &q, c, 1);
        u32 changed = 0;
        for (u32 i = 0; i < 512; i++)
            changed |= p[i] ^ 0xa5u;
        printf(" data=%s", changed ? "written" : "intact");
        end(bd);
    } else {
        printf("virtio-abuse: step 5g in-to-readonly-buffer init failed\n");
        virtio_reset(bd);
    }
}

static void steps_rings(void)
{
    /* 7a: the avail ring names a head beyond the queue */
    if (blk_up(1) == 0) {
        std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 512, VIRTQ_DESC_F_WRITE);
        q.avail->ring[0] = 999;
        q.avail->idx = 1;
        q.avail_idx = 1;
        virtq_notify(bd, &q);
        int c = virtq_wait_used(bd, &q, STEP_MS);
        report("7a", "head-out-of-range", bd, &q, c, 1);
        end(bd);
    }
    /* 7b: rings outside RAM */
    if (virtio_negotiate(bd, 0) == 0) {
        vio_write(bd, VIRTIO_MMIO_QUEUE_SEL, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_NUM, 16);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DESC_LOW, BAD);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DRIVER_LOW, BAD + 0x1000);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DEVICE_LOW, BAD + 0x2000);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0x7fff); /* far beyond RAM */
        vio_write(bd, VIRTIO_MMIO_QUEUE_READY, 1);
        virtio_driver_ok(bd);
        vio_write(bd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        report("7b", "rings-outside-ram", bd, &q, NOTHING_SENT, 0);
        end(bd);
    }
    /* 7c: misaligned rings (desc 16-, avail 2-, used 4-byte alignment) */
    if (virtio_negotiate(bd, 0) == 0 && virtq_setup(bd, &q, 0, 16, VIRTIO_MEM_SPAREQ) == 0) {
        virtio_reset(bd);
        virtio_negotiate(bd, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_SEL, 0);
        vio_write(bd, VIRTIO_MMIO_QUEUE_NUM, 16);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MEM_SPAREQ + 1);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(uptr)q.avail + 1);
        vio_write(bd, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(uptr)q.used + 2);
        vio_write(bd, VIRTIO_MMIO_QUEUE_READY, 1);
        virtio_driver_ok(bd);
        *(volatile u16 *)((uptr)q.avail + 1 + 2) = 1; /* avail idx = 1 */
        vio_write(bd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        virtio_wait(used_cond, &q, 100); /* give it time to misbehave */
        report("7c", "misaligned-rings", bd, &q, NOTHING_SENT, 0);
        end(bd);
    }
    /* 8: reset with a request in flight, then a clean device must work */
    if (blk_up(1) == 0) {
        std_req(&q, VIRTIO_BLK_T_IN, 0, DATA, 65536, VIRTQ_DESC_F_WRITE);
        virtq_push(&q, 0);
        virtq_notify(bd, &q);
        u32 r = virtio_reset(bd);
        u16 idx_at_reset = q.used->idx;
        virtio_wait(used_cond, &q, 100);
        u16 idx_later = q.used->idx;
        u32 s = vio_read(bd, VIRTIO_MMIO_STATUS);
        printf("virtio-abuse: step 8 reset-in-flight status=0x%02x - blk=0x%02x isr=0x%x used_at_reset=%u "
               "used_later=%u",
               s, (u32)*stb, bd->isr_seen, (u32)idx_at_reset, (u32)idx_later);
        if (r)
            printf(" reset=0x%02x", r);
        bd->isr_seen = 0;
        serial_putc('\n');
    }
    /* 9: InterruptACK with bits never raised */
    if (blk_up(1) == 0) {
        vio_write(bd, VIRTIO_MMIO_INTERRUPT_ACK, 0xffffffffu);
        u32 isr = vio_read(bd, VIRTIO_MMIO_INTERRUPT_STATUS);
        report("9", "spurious-interrupt-ack", bd, &q, NOTHING_SENT, 0);
        printf(" isr_read=0x%x", isr);
        end(bd);
    }
}

static int net_up(void)
{
    if (virtio_negotiate(nd, 1u << VIRTIO_NET_F_MAC))
        return -1;
    if (virtq_setup(nd, &q, 0, 16, VIRTIO_MEM_NETRXQ) || virtq_setup(nd, &q2, 1, 16, VIRTIO_MEM_NETTXQ))
        return -1;
    virtio_driver_ok(nd);
    return 0;
}

static void tx_frame(u32 len)
{
    volatile u32 *f = (volatile u32 *)NETBUF;
    for (int i = 0; i < 3; i++) /* zero virtio_net_hdr_v1 */
        f[i] = 0;
    /* broadcast frame, ethertype 0x88b5 (local experimental) */
    volatile u8 *e = (volatile u8 *)(NETBUF + 12);
    for (int i = 0; i < 6; i++)
        e[i] = 0xff;
    for (int i = 6; i < 12; i++)
        e[i] = (u8)(i == 6 ? 0x02 : i);
    e[12] = 0x88;
    e[13] = 0xb5;
    d(&q2, 0, NETBUF, len, 0, 0);
}

static void steps_net(void)
{
    if (!nd) {
        printf("virtio-abuse: step 6 skipped (no virtio-net device)\n");
        return;
    }
    static const char *const ids[5] = { "6a", "6b", "6c", "6d", "6e" };
    static const char *const names[5] = { "net-notify-empty", "net-tx-outside-ram", "net-tx-zero-and-hdr-only",
                                          "net-tx-oversize-1g", "net-tx-avail-idx-jump" };
    for (int i = 0; i < 5; i++) {
        if (net_up()) {
            printf("virtio-abuse: step %s init failed\n", ids[i]);
            virtio_reset(nd);
            continue;
        }
        int c = NOTHING_SENT;
        switch (i) {
        case 0:
            vio_write(nd, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
            vio_write(nd, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
            vio_write(nd, VIRTIO_MMIO_QUEUE_NOTIFY, 7); /* no such queue */
            virtio_wait(used_cond, &q2, 50);
            break;
        case 1:
            tx_frame(60);
            q2.desc[0].addr = BAD;
            c = kick(nd, &q2, 0);
            break;
        case 2:
            tx_frame(0);
            d(&q2, 1, NETBUF, 12, 0, 0); /* header only, empty frame */
            virtq_push(&q2, 0);
            c = kick(nd, &q2, 1);
            break;
        case 3:
            tx_frame(0x40000000u);
            c = kick(nd, &q2, 0);
            break;
        case 4:
            tx_frame(60);
            for (u32 k = 0; k < q2.num; k++)
                q2.avail->ring[k] = (u16)(k * 0x1111);
            q2.avail_idx = (u16)(q2.num + 1000);
            q2.avail->idx = q2.avail_idx;
            virtq_notify(nd, &q2);
            c = virtq_wait_used(nd, &q2, STEP_MS);
            break;
        }
        report(ids[i], names[i], nd, &q2, c, 0);
        end(nd);
    }
}

/* ---- the final proof ---- */

static int final_check(void)
{
    static struct blk b;
    if (blk_init(&b, bd)) {
        printf("virtio-abuse: final blk init failed\n");
        return 4;
    }
    volatile u32 *w = (volatile u32 *)DATA, *r = (volatile u32 *)(DATA + 0x1000);
    for (u32 i = 0; i < 128; i++) {
        u32 v = 0;
        for (u32 k = 0; k < 4; k++)
            v |= (((4 * i + k) * 7 + 3) & 0xff) << (8 * k);
        w[i] = v;
        r[i] = ~v;
    }
    int st;
    if (!b.ro) {
        st = blk_rw(&b, VIRTIO_BLK_T_OUT, 0, DATA, 512, FINAL_MS);
        if (st != VIRTIO_BLK_S_OK) {
            printf("virtio-abuse: final write status=%d\n", st);
            return 3;
        }
        if (b.flush && (st = blk_rw(&b, VIRTIO_BLK_T_FLUSH, 0, 0, 0, FINAL_MS)) != VIRTIO_BLK_S_OK) {
            printf("virtio-abuse: final flush status=%d\n", st);
            return 3;
        }
    }
    st = blk_rw(&b, VIRTIO_BLK_T_IN, 0, DATA + 0x1000, 512, FINAL_MS);
    if (st != VIRTIO_BLK_S_OK) {
        printf("virtio-abuse: final read status=%d\n", st);
        return 3;
    }
    if (!b.ro)
        for (u32 i = 0; i < 128; i++)
            if (r[i] != w[i]) {
                printf("virtio-abuse: final mismatch at byte %u\n", 4 * i);
                return 3;
            }
    printf("virtio-abuse: final blk %s ok\n", b.ro ? "read (read-only disk)" : "write+flush+read");
    if (nd) {
        if (net_up()) {
            printf("virtio-abuse: final net init failed\n");
            return 3;
        }
        u32 s = vio_read(nd, VIRTIO_MMIO_STATUS);
        printf("virtio-abuse: final net status=0x%02x\n", s);
        if (!(s & VIRTIO_STATUS_DRIVER_OK) || (s & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)))
            return 3;
        virtio_reset(nd);
    }
    return 0;
}

int main(void)
{
    pic_init();
    virtio_timer_init();
    sti();
    virtio_probe();
    bd = virtio_find(VIRTIO_ID_BLOCK, 0);
    nd = virtio_find(VIRTIO_ID_NET, 0);
    if (!bd) {
        printf("virtio-abuse: no virtio-blk device\n");
        return 4;
    }
    if (bd->version != 2) {
        printf("virtio-abuse: virtio-blk version %u (need 2)\n", bd->version);
        return 4;
    }
    capacity = (u64)vio_read(bd, VIRTIO_MMIO_CONFIG + 4) << 32 | vio_read(bd, VIRTIO_MMIO_CONFIG);
    printf("virtio-abuse: blk capacity=%llu net=%s\n", capacity, nd ? "yes" : "no");
    virtio_irq_enable(bd);
    if (nd)
        virtio_irq_enable(nd);

    steps_queue_num();
    steps_order();
    steps_requests();
    steps_net();
    steps_rings();

    int rc = final_check();
    if (rc)
        return rc;
    printf("virtio-abuse: survived\n");
    return 0;
}
