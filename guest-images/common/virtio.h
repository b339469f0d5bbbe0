/* Minimal virtio-mmio (version 2, "modern") driver library for the tandem
 * test guests: device discovery from the kernel command line, feature
 * negotiation, split virtqueues, level-triggered PIC interrupts, bounded
 * HLT-driven waits (PIT IRQ0 at 100 Hz, unmasked only while waiting) and a
 * synchronous virtio-blk request helper.
 *
 * Devices are found by the `virtio_mmio.device=<size>@<base>:<irq>` tokens
 * the VMM appends to the kernel command line (Linux's format; size may be
 * decimal/hex with an optional K/M suffix). Only 32-bit register accesses.
 *
 * Fixed physical memory used by the library (outside the image, which must
 * end below 2 MiB): VIRTIO_MEM_BASE (3 MiB) .. 3 MiB + 1 MiB; the guests
 * keep their data buffers above 4 MiB.
 */
#ifndef TANDEM_GUEST_VIRTIO_H
#define TANDEM_GUEST_VIRTIO_H

#include "lib.h"

/* ---- virtio-mmio registers (spec 1.x §4.2.2) ---- */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */

/* Device status bits */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Device IDs */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* Feature bits (as bit numbers) */
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_NET_F_MAC 5

/* ---- split virtqueue layout ---- */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[]; /* num entries, then used_event */
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[]; /* num entries, then avail_event */
};

struct virtq {
    u32 index; /* queue index on its device */
    u32 num;   /* queue size (power of two) */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    u16 avail_idx; /* next free avail slot (free-running) */
    u16 last_used; /* next used entry to consume (free-running) */
};

/* Bytes of guest memory virtq_setup() needs for a queue of num entries
 * (descriptor table, avail ring at +16*num, used ring 4-aligned after). */
#define VIRTQ_MEM_SIZE(num) (16u * (num) + 6u + 2u * (num) + 3u + 6u + 8u * (num) + 16u)

/* ---- devices ---- */
#define VIRTIO_MAX_DEVS 8

struct virtio_dev {
    uptr base; /* window's physical address (identity-mapped) */
    u32 size;  /* window size from the token */
    int irq;   /* PIC line */
    u32 device_id;
    u32 vendor_id;
    u32 version;
    u32 dev_features[2];  /* offered (sel 0, sel 1) */
    u32 drv_features[2];  /* negotiated */
    volatile u32 isr_seen; /* OR of InterruptStatus values acked by the IRQ handler */
    volatile u32 irq_count;
    volatile u32 irq_spurious; /* consecutive interrupts with InterruptStatus 0 */
    volatile u32 irq_stuck;    /* line masked after 64 of them; virtio_reset() unmasks */
};

extern struct virtio_dev virtio_devs[VIRTIO_MAX_DEVS];
extern int virtio_ndevs;

/* Parse the command line, probe every window (magic + version), fill
 * virtio_devs[]. Windows whose magic is wrong are skipped. Returns count. */
int virtio_probe(void);
/* The nth (0-based) probed device with DeviceID id, or 0. */
struct virtio_dev *virtio_find(u32 id, int nth);

static inline u32 vio_read(struct virtio_dev *d, u32 off)
{
    return *(volatile u32 *)(d->base + off);
}
static inline void vio_write(struct virtio_dev *d, u32 off, u32 v)
{
    *(volatile u32 *)(d->base + off) = v;
}
static inline int feature_has(const u32 f[2], int bit) { return (f[bit >> 5] >> (bit & 31)) & 1; }

/* Status = 0, then wait (bounded) until it reads back 0; unmask the IRQ
 * line if the handler masked it as stuck. Returns the last Status value
 * read (0 on success). */
u32 virtio_reset(struct virtio_dev *d);
/* Reset, ACKNOWLEDGE, DRIVER, read features, write
 * (offered & want) | VERSION_1, FEATURES_OK and check it stuck.
 * want_lo: wanted feature bits 0..31. Returns 0 or -1 (and prints why). */
int virtio_negotiate(struct virtio_dev *d, u32 want_lo);
/* Select queue qidx, size it min(QueueNumMax, num) (power of two), lay
 * it out at mem (zeroed here; 16-byte aligned), program the addresses and
 * set QueueReady. Returns 0 or -1. */
int virtq_setup(struct virtio_dev *d, struct virtq *q, u32 qidx, u32 num, uptr mem);
/* Status |= DRIVER_OK. */
void virtio_driver_ok(struct virtio_dev *d);

/* Put chain head into the avail ring (does not notify). */
void virtq_push(struct virtq *q, u16 head);
/* Write the queue index to QueueNotify. */
static inline void virtq_notify(struct virtio_dev *d, struct virtq *q)
{
    __asm__ volatile("" ::: "memory");
    vio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}
/* Has the device published used entries we have not consumed? */
static inline int virtq_has_used(struct virtq *q)
{
    return (u16)(q->used->idx - q->last_used) != 0;
}
/* Consume one used entry: returns 1 and sets *id / *len, or 0 if none. */
int virtq_pop(struct virtq *q, u32 *id, u32 *len);

/* Install a level-triggered IRQ handler for d (ELCR bit, handler that
 * reads InterruptStatus and writes it to InterruptACK, then the PIC EOI),
 * and unmask its line. pic_init() must have been called. A line that keeps
 * interrupting with InterruptStatus 0 (64 times in a row) is masked and
 * irq_stuck set, until virtio_reset(). */
void virtio_irq_enable(struct virtio_dev *d);

/* Sleep until q has a used entry (VQ_WAIT_USED), the device sets
 * DEVICE_NEEDS_RESET (VQ_WAIT_NEEDS_RESET; Status is read on each wake-up)
 * or timeout_ms passed (VQ_WAIT_TIMEOUT). Needs virtio_timer_init(). */
#define VQ_WAIT_USED 1
#define VQ_WAIT_TIMEOUT 0
#define VQ_WAIT_NEEDS_RESET (-1)
int virtq_wait_used(struct virtio_dev *d, struct virtq *q, u32 timeout_ms);

/* ---- timing: PIT ch0 at 100 Hz, IRQ0 unmasked only inside waits ---- */
#define VIRTIO_TICK_HZ 100
extern volatile u32 virtio_ticks;
/* pic_init() first. Programs the PIT and installs the IRQ0 handler. */
void virtio_timer_init(void);
/* Sleep (sti;hlt) until cond(arg) is true or timeout_ms passed.
 * Returns 1 if cond became true, 0 on timeout. Leaves IF=1. */
int virtio_wait(int (*cond)(void *), void *arg, u32 timeout_ms);

/* ---- virtio-blk ---- */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
/* blk_rw() results besides the status byte: no completion in time; the
 * device set DEVICE_NEEDS_RESET instead of completing. Either way the
 * request may still be in flight: reset the device before reusing it. */
#define BLK_TIMEOUT (-1)
#define BLK_NEEDS_RESET (-2)

struct virtio_blk_req_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct blk {
    struct virtio_dev *dev;
    struct virtq q;
    u64 capacity; /* 512-byte sectors */
    int ro;       /* VIRTIO_BLK_F_RO offered */
    int flush;    /* VIRTIO_BLK_F_FLUSH negotiated */
};

/* Negotiate (RO, FLUSH), set up queue 0 at VIRTIO_MEM_BLKQ, IRQ, DRIVER_OK.
 * Returns 0 or -1. virtio_timer_init() must have been called. */
int blk_init(struct blk *b, struct virtio_dev *d);
/* One request: header, one data descriptor (buf/len; none if len == 0;
 * device-writable for IN and GET_ID), status byte. Waits for the
 * completion up to timeout_ms. Returns the status byte (0..255),
 * BLK_TIMEOUT or BLK_NEEDS_RESET. */
int blk_rw(struct blk *b, u32 type, u64 sector, uptr buf, u32 len, u32 timeout_ms);

/* Fixed physical memory (below the guests' own buffers at 4 MiB+). */
#define VIRTIO_MEM_BASE 0x300000u
#define VIRTIO_MEM_BLKQ (VIRTIO_MEM_BASE + 0x00000)   /* blk queue 0 */
#define VIRTIO_MEM_NETRXQ (VIRTIO_MEM_BASE + 0x08000) /* net queue 0 */
#define VIRTIO_MEM_NETTXQ (VIRTIO_MEM_BASE + 0x10000) /* net queue 1 */
#define VIRTIO_MEM_SPAREQ (VIRTIO_MEM_BASE + 0x18000) /* free for guests */
#define VIRTIO_MEM_BLKREQ (VIRTIO_MEM_BASE + 0x20000) /* blk header + status */
#define VIRTIO_MEM_GUEST (VIRTIO_MEM_BASE + 0x21000)  /* free for guests .. 4 MiB */

/* 32-bit-word copy (n rounded up to 4; no rep movs). */
void copy32(void *d, const void *s, u32 n);

#endif
