/* Minimal virtio-mmio (version 2) driver library: see virtio.h. */
#include "virtio.h"

struct virtio_dev virtio_devs[VIRTIO_MAX_DEVS];
int virtio_ndevs;
volatile u32 virtio_ticks;

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

void copy32(void *d, const void *s, u32 n)
{
    volatile u32 *p = d;
    const u32 *q = s;
    for (n = (n + 3) >> 2; n; n--)
        *p++ = *q++;
}

/* ---- command-line discovery ---- */

static const char TOKEN[] = "virtio_mmio.device=";

/* "<size>[K|M]@<base>:<irq>" */
static int parse_token(const char *t, u32 *size, u32 *base, u32 *irq)
{
    if (!parse_u32(&t, size))
        return 0;
    if (*t == 'K' || *t == 'k') {
        *size <<= 10;
        t++;
    } else if (*t == 'M' || *t == 'm') {
        *size <<= 20;
        t++;
    }
    if (*t++ != '@' || !parse_u32(&t, base) || *t++ != ':' || !parse_u32(&t, irq))
        return 0;
    return !*t || cmdline_space(*t);
}

int virtio_probe(void)
{
    const char *p = cmdline();
    int debug = (int)cmdline_u32("virtio_debug", 0);
    virtio_ndevs = 0;
    if (debug)
        printf("virtio: cmdline \"%s\"\n", p);
    while (*p) {
        while (cmdline_space(*p))
            p++;
        const char *k = TOKEN, *t = p;
        while (*k && *t == *k) {
            k++;
            t++;
        }
        u32 size, base, irq;
        if (!*k && parse_token(t, &size, &base, &irq) && irq < 16 && virtio_ndevs < VIRTIO_MAX_DEVS) {
            struct virtio_dev *d = &virtio_devs[virtio_ndevs];
            d->base = base;
            d->size = size;
            d->irq = (int)irq;
            if (vio_read(d, VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC) {
                d->version = vio_read(d, VIRTIO_MMIO_VERSION);
                d->device_id = vio_read(d, VIRTIO_MMIO_DEVICE_ID);
                d->vendor_id = vio_read(d, VIRTIO_MMIO_VENDOR_ID);
                if (debug)
                    printf("virtio: window 0x%08x irq %u version %u device %u vendor 0x%08x\n", base, irq,
                           d->version, d->device_id, d->vendor_id);
                if (d->device_id) /* 0 = placeholder window */
                    virtio_ndevs++;
            } else if (debug) {
                printf("virtio: window 0x%08x: bad magic\n", base);
            }
        }
        while (*p && !cmdline_space(*p))
            p++;
    }
    return virtio_ndevs;
}

struct virtio_dev *virtio_find(u32 id, int nth)
{
    for (int i = 0; i < virtio_ndevs; i++)
        if (virtio_devs[i].device_id == id && nth-- == 0)
            return &virtio_devs[i];
    return 0;
}

/* ---- initialisation ---- */

u32 virtio_reset(struct virtio_dev *d)
{
    u32 s = 0;
    vio_write(d, VIRTIO_MMIO_STATUS, 0);
    for (int i = 0; i < 1000; i++) {
        s = vio_read(d, VIRTIO_MMIO_STATUS);
        if (!s)
            break;
    }
    if (d->irq_stuck) {
        d->irq_stuck = 0;
        d->irq_spurious = 0;
        pic_unmask(d->irq);
    }
    return s;
}

int virtio_negotiate(struct virtio_dev *d, u32 want_lo)
{
    if (d->version != 2) {
        printf("virtio: device at 0x%08x has version %u (need 2)\n", (u32)d->base, d->version);
        return -1;
    }
    if (virtio_reset(d)) {
        printf("virtio: device at 0x%08x does not reset\n", (u32)d->base);
        return -1;
    }
    vio_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    vio_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    for (u32 sel = 0; sel < 2; sel++) {
        vio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        d->dev_features[sel] = vio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    }
    if (!feature_has(d->dev_features, VIRTIO_F_VERSION_1)) {
        printf("virtio: device at 0x%08x lacks VIRTIO_F_VERSION_1\n", (u32)d->base);
        vio_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
        return -1;
    }
    d->drv_features[0] = d->dev_features[0] & want_lo;
    d->drv_features[1] = 1u << (VIRTIO_F_VERSION_1 - 32);
    for (u32 sel = 0; sel < 2; sel++) {
        vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        vio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, d->drv_features[sel]);
    }
    vio_write(d, VIRTIO_MMIO_STATUS,
              VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    u32 s = vio_read(d, VIRTIO_MMIO_STATUS);
    if (!(s & VIRTIO_STATUS_FEATURES_OK)) {
        printf("virtio: device at 0x%08x refused features (status=0x%02x)\n", (u32)d->base, s);
        vio_write(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
        return -1;
    }
    return 0;
}

int virtq_setup(struct virtio_dev *d, struct virtq *q, u32 qidx, u32 num, uptr mem)
{
    vio_write(d, VIRTIO_MMIO_QUEUE_SEL, qidx);
    if (vio_read(d, VIRTIO_MMIO_QUEUE_READY)) {
        printf("virtio: queue %u already ready\n", qidx);
        return -1;
    }
    u32 max = vio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (!max) {
        printf("virtio: queue %u not available\n", qidx);
        return -1;
    }
    if (num > max)
        num = max;
    if (num > 256)
        num = 256;
    while (num & (num - 1)) /* round down to a power of two */
        num &= num - 1;
    mem = (mem + 15) & ~(uptr)15;
    q->index = qidx;
    q->num = num;
    q->desc = (volatile struct virtq_desc *)mem;
    q->avail = (volatile struct virtq_avail *)(mem + 16 * num);
    q->used = (volatile struct virtq_used *)((mem + 16 * num + 6 + 2 * num + 3) & ~(uptr)3);
    q->avail_idx = 0;
    q->last_used = 0;
    /* zero the three areas, 32 bits at a time */
    volatile u32 *z = (volatile u32 *)mem;
    volatile u32 *end = (volatile u32 *)((uptr)q->used + 6 + 8 * num + 4);
    while (z < end)
        *z++ = 0;
    vio_write(d, VIRTIO_MMIO_QUEUE_NUM, num);
    vio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(uptr)q->desc);
    vio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    vio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(uptr)q->avail);
    vio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
    vio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(uptr)q->used);
    vio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
    vio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    vio_write(d, VIRTIO_MMIO_STATUS, vio_read(d, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_DRIVER_OK);
}

void virtq_push(struct virtq *q, u16 head)
{
    q->avail->ring[q->avail_idx & (q->num - 1)] = head;
    barrier(); /* x86 keeps stores in order; the compiler must too */
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
}

int virtq_pop(struct virtq *q, u32 *id, u32 *len)
{
    if (!virtq_has_used(q))
        return 0;
    barrier();
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used & (q->num - 1)];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}

/* ---- interrupts ---- */

static struct virtio_dev *irq_dev[16];

static void virtio_irq(int irq)
{
    struct virtio_dev *d = irq_dev[irq];
    if (!d)
        return;
    u32 isr = vio_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr) {
        vio_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
        d->irq_spurious = 0;
    } else if (++d->irq_spurious >= 64) {
        /* The line stays high with nothing to acknowledge (QEMU does this
         * once a device is "broken"): without masking it every instruction
         * would be interrupted. virtio_reset() unmasks it again. */
        pic_mask(irq);
        d->irq_stuck = 1;
    }
    d->isr_seen |= isr;
    d->irq_count++;
}

#define IRQ_TRAMPOLINE(n) \
    static void virtio_irq##n(void) { virtio_irq(n); }
IRQ_TRAMPOLINE(3)
IRQ_TRAMPOLINE(4)
IRQ_TRAMPOLINE(5)
IRQ_TRAMPOLINE(6)
IRQ_TRAMPOLINE(7)
IRQ_TRAMPOLINE(9)
IRQ_TRAMPOLINE(10)
IRQ_TRAMPOLINE(11)
IRQ_TRAMPOLINE(12)
IRQ_TRAMPOLINE(14)
IRQ_TRAMPOLINE(15)

static void (*const trampolines[16])(void) = {
    [3] = virtio_irq3,   [4] = virtio_irq4,   [5] = virtio_irq5,   [6] = virtio_irq6,
    [7] = virtio_irq7,   [9] = virtio_irq9,   [10] = virtio_irq10, [11] = virtio_irq11,
    [12] = virtio_irq12, [14] = virtio_irq14, [15] = virtio_irq15,
};

void virtio_irq_enable(struct virtio_dev *d)
{
    int irq = d->irq;
    if (irq < 0 || irq > 15 || !trampolines[irq]) {
        printf("virtio: unsupported irq %d\n", irq);
        return;
    }
    irq_dev[irq] = d;
    irq_set_handler(irq, trampolines[irq]);
    u16 port = irq < 8 ? 0x4d0 : 0x4d1;
    outb(port, (u8)(inb(port) | (1u << (irq & 7)))); /* level-triggered */
    pic_unmask(irq);
}

/* ---- timing ---- */

static void timer_irq(void) { virtio_ticks++; }

void virtio_timer_init(void)
{
    /* QEMU's microvm machine (the only QEMU machine with virtio-mmio) has
     * no firmware that routes the 8259 through the local APIC: option
     * lapic_extint=1 software-enables the LAPIC and sets LVT LINT0 to
     * ExtINT. Not used under tandem (no LAPIC there). */
    if (cmdline_u32("lapic_extint", 0)) {
        *(volatile u32 *)0xfee000f0u = 0x1ff; /* SVR: enabled, vector 0xff */
        *(volatile u32 *)0xfee00350u = 0x700; /* LINT0: ExtINT, unmasked */
    }
    irq_set_handler(0, timer_irq);
    pit_init(VIRTIO_TICK_HZ);
}

int virtio_wait(int (*cond)(void *), void *arg, u32 timeout_ms)
{
    u32 limit = timeout_ms / (1000 / VIRTIO_TICK_HZ) + 1, ok;
    cli();
    u32 start = virtio_ticks;
    pic_unmask(0);
    for (;;) {
        cli();
        if (cond(arg)) {
            ok = 1;
            break;
        }
        if (virtio_ticks - start > limit) {
            ok = 0;
            break;
        }
        sti_hlt(); /* the sti shadow covers the hlt: no lost wake-up */
    }
    pic_mask(0);
    sti();
    return ok;
}

/* ---- virtio-blk ---- */

int blk_init(struct blk *b, struct virtio_dev *d)
{
    b->dev = d;
    if (virtio_negotiate(d, (1u << VIRTIO_BLK_F_RO) | (1u << VIRTIO_BLK_F_FLUSH)))
        return -1;
    b->ro = feature_has(d->dev_features, VIRTIO_BLK_F_RO);
    b->flush = feature_has(d->drv_features, VIRTIO_BLK_F_FLUSH);
    u32 lo, hi, gen;
    do {
        gen = vio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = vio_read(d, VIRTIO_MMIO_CONFIG + 0);
        hi = vio_read(d, VIRTIO_MMIO_CONFIG + 4);
    } while (gen != vio_read(d, VIRTIO_MMIO_CONFIG_GENERATION));
    b->capacity = ((u64)hi << 32) | lo;
    if (virtq_setup(d, &b->q, 0, 16, VIRTIO_MEM_BLKQ))
        return -1;
    virtio_irq_enable(d);
    virtio_driver_ok(d);
    u32 s = vio_read(d, VIRTIO_MMIO_STATUS);
    if (s & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED) || !(s & VIRTIO_STATUS_DRIVER_OK)) {
        printf("virtio: blk device status 0x%02x after DRIVER_OK\n", s);
        return -1;
    }
    return 0;
}

struct used_wait {
    struct virtio_dev *d;
    struct virtq *q;
    int broken;
};

/* Runs on each wake-up (an interrupt), so the Status read is cheap. */
static int used_or_broken(void *arg)
{
    struct used_wait *w = arg;
    if (virtq_has_used(w->q))
        return 1;
    if (vio_read(w->d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET) {
        w->broken = 1;
        return 1;
    }
    return 0;
}

int virtq_wait_used(struct virtio_dev *d, struct virtq *q, u32 timeout_ms)
{
    struct used_wait w = { d, q, 0 };
    if (!virtio_wait(used_or_broken, &w, timeout_ms))
        return VQ_WAIT_TIMEOUT;
    return w.broken ? VQ_WAIT_NEEDS_RESET : VQ_WAIT_USED;
}

int blk_rw(struct blk *b, u32 type, u64 sector, uptr buf, u32 len, u32 timeout_ms)
{
    struct virtq *q = &b->q;
    volatile struct virtio_blk_req_hdr *h = (volatile struct virtio_blk_req_hdr *)VIRTIO_MEM_BLKREQ;
    volatile u8 *status = (volatile u8 *)(VIRTIO_MEM_BLKREQ + 16);
    h->type = type;
    h->reserved = 0;
    h->sector = sector;
    *status = 0xff;
    u16 dw = (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID) ? VIRTQ_DESC_F_WRITE : 0;
    /* one request in flight: descriptors 0 (header), 1 (data), 2 (status) */
    q->desc[0].addr = VIRTIO_MEM_BLKREQ;
    q->desc[0].len = 16;
    q->desc[0].flags = VIRTQ_DESC_F_NEXT;
    q->desc[0].next = len ? 1 : 2;
    q->desc[1].addr = buf;
    q->desc[1].len = len;
    q->desc[1].flags = VIRTQ_DESC_F_NEXT | dw;
    q->desc[1].next = 2;
    q->desc[2].addr = VIRTIO_MEM_BLKREQ + 16;
    q->desc[2].len = 1;
    q->desc[2].flags = VIRTQ_DESC_F_WRITE;
    q->desc[2].next = 0;
    virtq_push(q, 0);
    virtq_notify(b->dev, q);
    int w = virtq_wait_used(b->dev, q, timeout_ms);
    if (w == VQ_WAIT_TIMEOUT)
        return BLK_TIMEOUT;
    if (w == VQ_WAIT_NEEDS_RESET)
        return BLK_NEEDS_RESET;
    u32 id, ulen;
    virtq_pop(q, &id, &ulen);
    barrier();
    return *status;
}
