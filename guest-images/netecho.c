/* netecho: a tiny IPv4 host on the first virtio-net device, with a crash-
 * safe counter service persisted on the first virtio-blk device.
 *
 * Options: ip= (dotted quad, default 10.0.0.2). Only the local segment is
 * served (no gateway, no routing: replies go to the requester's MAC).
 *
 * Answers: ARP requests for ip (reply with the MAC from the device config,
 * VIRTIO_NET_F_MAC; 02:00:00:00:00:01 if the device offers none); ICMP echo
 * request -> echo reply (same id/seq/payload; checksum updated
 * incrementally, RFC 1624); UDP port 7 -> the same payload back to the
 * sender's address/port (UDP checksum unchanged: swapping the addresses
 * and ports keeps it valid); UDP port 9000 -> counter service; UDP port
 * 9001 with payload "quit" (optionally followed by "\n" or "\r\n") ->
 * prints "netecho: bye" and exits 0. Everything else is dropped, as are IP
 * fragments, packets with a bad IPv4 header checksum, and packets for other
 * addresses. Nothing is printed per packet.
 *
 * Counter service (UDP 9000): request payload >= 8 bytes:
 *     client_id u32 LE, request_id u32 LE       (extra bytes ignored;
 *                                                shorter payloads dropped)
 *   value = counter + 1; sector 0 := {"TNDMCNTR", value u64 LE, 496 zero
 *   bytes}; write it, wait for completion, FLUSH (if VIRTIO_BLK_F_FLUSH),
 *   wait for completion; only then reply (UDP 9000 -> requester's port):
 *     client_id u32 LE, request_id u32 LE, value u64 LE, probe u32 LE
 *     (20 bytes)
 *   and counter = value. Every request (duplicates included) increments
 *   the counter; requests are served one at a time in arrival order, so a
 *   reply never carries a value that is not yet on stable storage.
 * Each request also reads port 0x604 as a dword, the reply's `probe`: the
 * device-model version register (tandem's device-model version 2 on;
 * unmapped, 0xffffffff, in version 1). The reply carries it, so a client
 * sees the machine change under the guest (what a secondary running the
 * wrong version would do once live).
 * UDP port 9002, payload "crash": the guest crashes on purpose ("netecho:
 * crashing", a panic report on the pvpanic port 0x505, then cli; hlt);
 * payload "hang": it arms the watchdog (port 0x508, 500 ms) and spins
 * forever without petting it ("netecho: hanging"); payload "fragile": a
 * timing bug on purpose. The handler spends 15 ms of guest time (measured
 * on the PIT's channel 0 count) in a window where a timer interrupt crashes
 * the guest (a pvpanic report at once, then cli; hlt). With the 100 Hz
 * timer a tick always lands in it, unless the timer is late (as after a
 * rollback to a checkpoint, which delays it); a handler
 * that gets through prints "netecho: fragile window done (R reads, T
 * ticks)" and echoes the datagram back to the sender.
 * Option spin=1: the main loop never sleeps in HLT; between frames it
 * busy-waits, with no exit, for the next timer tick or a frame (a guest
 * that spins, for failover tests and chaos).
 * Option fill=N: at boot, write a pattern over N MiB of memory from 8 MiB
 * up ("netecho: filled N MiB"), so a benchmark has memory in use to
 * re-protect.
 * On-disk format (sector 0 of the disk): bytes 0..7 = "TNDMCNTR", bytes
 * 8..15 = counter, u64 LE; the rest zero. At boot sector 0 is read: with
 * the magic the counter continues from the stored value, else it starts at 0
 * (sector 0 is not written until the first request).
 *
 * Output: "netecho: up ip=A.B.C.D mac=xx:xx:xx:xx:xx:xx counter=N" once
 * ready; then it sleeps in sti;hlt and handles RX interrupts.
 * Exit codes: 0 on "quit"; 2 bad ip= option; 3 disk request failed
 * ("netecho: disk <op> status=N", "... timeout" (2 s) or "... needs-reset");
 * 4 no virtio-net or no virtio-blk device, a read-only disk, or a device
 * init failure.
 */
#include "common/lib.h"
#include "common/virtio.h"

#define NET_HDR_LEN 12 /* struct virtio_net_hdr_v1 */
#define BUF_SIZE 2048u
#define RX_BUFS 0x500000u /* 16 x 2048 */
#define TX_BUFS 0x510000u /* 16 x 2048 */
#define SECTOR_BUF 0x400000u
#define QSIZE 16
#define DISK_TIMEOUT_MS 2000

#define PORT_ECHO 7
#define PORT_COUNTER 9000
#define PORT_QUIT 9001
#define PORT_CRASH 9002

static struct virtio_dev *netdev;
static struct virtq rxq, txq;
static struct blk blk;
static u8 mac[6];
static u8 my_ip[4];
static u64 counter;
static u8 tx_busy[QSIZE];
static u32 tx_next;

static inline u32 get16(const u8 *p) { return (u32)p[0] << 8 | p[1]; }
static inline void put16(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}
static inline u32 get32le(const u8 *p) { return p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static inline void put32le(u8 *p, u32 v)
{
    p[0] = (u8)v;
    p[1] = (u8)(v >> 8);
    p[2] = (u8)(v >> 16);
    p[3] = (u8)(v >> 24);
}
static inline int ip_eq(const u8 *a, const u8 *b) { return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]; }
static inline void cpy(u8 *d, const u8 *s, u32 n)
{
    while (n--)
        *d++ = *s++;
}

/* One's-complement sum of n bytes (big-endian 16-bit words), unfolded. */
static u32 csum_add(u32 sum, const u8 *p, u32 n)
{
    for (; n > 1; n -= 2, p += 2)
        sum += get16(p);
    if (n)
        sum += (u32)p[0] << 8;
    return sum;
}
static u32 csum_fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return sum;
}

/* ---- TX ---- */

static int tx_done(void *arg)
{
    (void)arg;
    return virtq_has_used(&txq);
}

static void tx_reclaim(void)
{
    u32 id, len;
    while (virtq_pop(&txq, &id, &len))
        if (id < QSIZE)
            tx_busy[id] = 0;
}

/* A free TX slot's frame area (after the zeroed net header), or 0. */
static u8 *tx_alloc(u32 *slot)
{
    for (int tries = 0; tries < 2; tries++) {
        tx_reclaim();
        for (u32 i = 0; i < txq.num; i++) {
            u32 s = (tx_next + i) & (txq.num - 1);
            if (!tx_busy[s]) {
                u8 *b = (u8 *)(uptr)(TX_BUFS + s * BUF_SIZE);
                *(volatile u32 *)b = 0; /* virtio_net_hdr_v1: all zero */
                *(volatile u32 *)(b + 4) = 0;
                *(volatile u32 *)(b + 8) = 0;
                *slot = s;
                return b + NET_HDR_LEN;
            }
        }
        virtio_wait(tx_done, 0, 1000);
    }
    return 0; /* device stuck: drop */
}

static void tx_send(u32 slot, u32 flen)
{
    u8 *f = (u8 *)(uptr)(TX_BUFS + slot * BUF_SIZE + NET_HDR_LEN);
    while (flen < 60) /* Ethernet minimum (without FCS) */
        f[flen++] = 0;
    txq.desc[slot].addr = TX_BUFS + slot * BUF_SIZE;
    txq.desc[slot].len = NET_HDR_LEN + flen;
    txq.desc[slot].flags = 0;
    txq.desc[slot].next = 0;
    tx_busy[slot] = 1;
    tx_next = (slot + 1) & (txq.num - 1);
    virtq_push(&txq, (u16)slot);
    virtq_notify(netdev, &txq);
}

/* ---- protocols ---- */

static void handle_arp(const u8 *f, u32 flen)
{
    const u8 *a = f + 14;
    if (flen < 42 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4 || get16(a + 6) != 1 ||
        !ip_eq(a + 24, my_ip))
        return;
    u32 slot;
    u8 *t = tx_alloc(&slot);
    if (!t)
        return;
    cpy(t, a + 8, 6); /* to the requester's MAC */
    cpy(t + 6, mac, 6);
    put16(t + 12, 0x0806);
    u8 *r = t + 14;
    put16(r, 1);
    put16(r + 2, 0x0800);
    r[4] = 6;
    r[5] = 4;
    put16(r + 6, 2); /* reply */
    cpy(r + 8, mac, 6);
    cpy(r + 14, my_ip, 4);
    cpy(r + 18, a + 8, 10); /* target = requester's MAC + IP */
    tx_send(slot, 42);
}

/* Turn the copied request frame t (IPv4 at t+14, header length hl) around:
 * Ethernet and IP addresses swapped, TTL 64, header checksum redone. */
static void turn_around(u8 *t, const u8 *f, u32 hl)
{
    cpy(t, f + 6, 6);
    cpy(t + 6, mac, 6);
    u8 *ip = t + 14;
    cpy(ip + 12, f + 14 + 16, 4);
    cpy(ip + 16, f + 14 + 12, 4);
    ip[8] = 64;
    ip[10] = ip[11] = 0;
    put16(ip + 10, ~csum_fold(csum_add(0, ip, hl)) & 0xffff);
}

static void __attribute__((noreturn)) disk_fail(const char *op, int st)
{
    if (st == BLK_TIMEOUT || st == BLK_NEEDS_RESET)
        printf("netecho: disk %s %s\n", op, st == BLK_TIMEOUT ? "timeout" : "needs-reset");
    else
        printf("netecho: disk %s status=%d\n", op, st);
    exit(3);
}

/* Persist value (write + flush, both completed) before anything else. */
static void counter_store(u64 value)
{
    volatile u32 *s = (volatile u32 *)SECTOR_BUF;
    s[2] = (u32)value;
    s[3] = (u32)(value >> 32);
    int st = blk_rw(&blk, VIRTIO_BLK_T_OUT, 0, SECTOR_BUF, 512, DISK_TIMEOUT_MS);
    if (st != VIRTIO_BLK_S_OK)
        disk_fail("write", st);
    if (blk.flush) {
        st = blk_rw(&blk, VIRTIO_BLK_T_FLUSH, 0, 0, 0, DISK_TIMEOUT_MS);
        if (st != VIRTIO_BLK_S_OK)
            disk_fail("flush", st);
    }
}


/* ---- memory in use (fill=N) ---- */

#define FILL_BASE 0x800000u /* 8 MiB: above the code, stacks and buffers */

/* Writes a non-zero pattern over N MiB from FILL_BASE (as much as fits
 * below the memory the start info reports), so re-protection has that much
 * memory in use to copy. */
static void fill_memory(u32 mib)
{
    if (!mib)
        return;
    u64 len = (u64)mib << 20, top = 0;
    const struct hvm_start_info *si = (const struct hvm_start_info *)(uptr)pvh_start_info_paddr;
    if (si && si->memmap_entries) {
        const u64 *e = (const u64 *)(uptr)si->memmap_paddr; /* addr, size, type|reserved */
        for (u32 i = 0; i < si->memmap_entries; i++, e += 3)
            if ((u32)e[2] == 1 && e[0] + e[1] > top)
                top = e[0] + e[1];
    }
    if (top <= FILL_BASE)
        return;
    if (FILL_BASE + len > top)
        len = top - FILL_BASE;
    uptr words = (uptr)(len / sizeof(uptr));
    uptr *p = (uptr *)(uptr)FILL_BASE;
    __asm__ volatile("rep stos %2, (%0)" : "+D"(p), "+c"(words) : "a"((uptr)0x46494c4cu) : "memory");
    printf("netecho: filled %llu MiB\n", len >> 20);
}

/* ---- the "fragile" timing bug ---- */

/* Set while the fragile handler runs: a timer interrupt then crashes. */
static volatile u32 fragile;

static void netecho_timer(void)
{
    virtio_ticks++;
    if (fragile) {
        /* No message first: the panic report is the crash itself. */
        outb(0x505, 1);
        __asm__ volatile("cli; hlt" ::: "memory");
    }
}

/* 15 ms of guest time, counted on the PIT's channel 0 (mode 2 at
 * VIRTIO_TICK_HZ: the count runs down from the reload value and wraps), with
 * interrupts enabled. */
static void fragile_window(void)
{
    const u32 reload = PIT_HZ / VIRTIO_TICK_HZ;
    const u32 want = PIT_HZ / 1000 * 15;
    u32 elapsed = 0, prev = pit_read_ch0(), reads = 0, t0 = virtio_ticks;
    fragile = 1;
    pic_unmask(0); /* the timer is masked outside disk waits */
    while (elapsed < want) {
        u32 now = pit_read_ch0();
        elapsed += (prev >= now) ? prev - now : prev + reload - now;
        prev = now;
        reads++;
    }
    pic_mask(0);
    fragile = 0;
    printf("netecho: fragile window done (%u reads, %u ticks)\n", reads, virtio_ticks - t0);
}

static void handle_counter(const u8 *f, const u8 *udp, const u8 *payload)
{
    u32 client = get32le(payload), request = get32le(payload + 4);
    u32 probe = inl(0x604);
    u64 value = counter + 1;
    counter_store(value);
    u32 slot;
    u8 *t = tx_alloc(&slot);
    counter = value; /* stored: the next request continues from it */
    if (!t)
        return;
    cpy(t, f + 6, 6);
    cpy(t + 6, mac, 6);
    put16(t + 12, 0x0800);
    u8 *ip = t + 14;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, 20 + 8 + 20);
    put16(ip + 4, (u32)value); /* identification */
    put16(ip + 6, 0x4000);     /* DF */
    ip[8] = 64;
    ip[9] = 17;
    ip[10] = ip[11] = 0;
    cpy(ip + 12, my_ip, 4);
    cpy(ip + 16, f + 14 + 12, 4);
    put16(ip + 10, ~csum_fold(csum_add(0, ip, 20)) & 0xffff);
    u8 *u = ip + 20;
    put16(u, PORT_COUNTER);
    cpy(u + 2, udp, 2); /* to the requester's port */
    put16(u + 4, 8 + 20);
    u[6] = u[7] = 0;
    put32le(u + 8, client);
    put32le(u + 12, request);
    put32le(u + 16, (u32)value);
    put32le(u + 20, (u32)(value >> 32));
    put32le(u + 24, probe);
    u32 sum = csum_add(0, ip + 12, 8) + 17 + 28; /* pseudo header */
    sum = csum_fold(csum_add(sum, u, 28));
    sum = ~sum & 0xffff;
    put16(u + 6, sum ? sum : 0xffff);
    tx_send(slot, 14 + 20 + 28);
}

/* Sends the UDP datagram f (IPv4 header hl bytes, total length tot, UDP
 * header at l4) back to its sender, payload unchanged (swapping the
 * addresses and ports keeps the UDP checksum valid). */
static void echo_udp(const u8 *f, const u8 *l4, u32 hl, u32 tot)
{
    u32 slot;
    u8 *t = tx_alloc(&slot);
    if (!t)
        return;
    copy32(t, f, 14 + tot);
    turn_around(t, f, hl);
    u8 *u = t + 14 + hl;
    cpy(u, l4 + 2, 2); /* swap ports */
    cpy(u + 2, l4, 2);
    tx_send(slot, 14 + tot);
}

static void handle_ipv4(const u8 *f, u32 flen)
{
    const u8 *ip = f + 14;
    if (flen < 34 || (ip[0] >> 4) != 4)
        return;
    u32 hl = (ip[0] & 15) * 4, tot = get16(ip + 2);
    if (hl < 20 || tot < hl || tot > flen - 14 || !ip_eq(ip + 16, my_ip))
        return;
    if ((get16(ip + 6) & 0x3fff) != 0) /* MF or fragment offset */
        return;
    if (csum_fold(csum_add(0, ip, hl)) != 0xffff)
        return;
    const u8 *l4 = ip + hl;
    u32 l4len = tot - hl;
    u32 slot;
    u8 *t;

    if (ip[9] == 1) { /* ICMP */
        if (l4len < 8 || l4[0] != 8 || l4[1] != 0)
            return;
        if (!(t = tx_alloc(&slot)))
            return;
        copy32(t, f, 14 + tot);
        turn_around(t, f, hl);
        u8 *ic = t + 14 + hl;
        ic[0] = 0; /* echo reply */
        /* RFC 1624: HC' = ~(~HC + ~m + m'), m = 0x0800 -> m' = 0x0000 */
        u32 sum = (~get16(ic + 2) & 0xffff) + (~0x0800u & 0xffff);
        put16(ic + 2, ~csum_fold(sum) & 0xffff);
        tx_send(slot, 14 + tot);
        return;
    }
    if (ip[9] != 17 || l4len < 8)
        return;
    u32 ulen = get16(l4 + 4), dport = get16(l4 + 2);
    if (ulen < 8 || ulen > l4len)
        return;
    const u8 *payload = l4 + 8;
    u32 plen = ulen - 8;
    if (dport == PORT_ECHO) {
        echo_udp(f, l4, hl, tot);
    } else if (dport == PORT_COUNTER) {
        if (plen >= 8)
            handle_counter(f, l4, payload);
    } else if (dport == PORT_QUIT) {
        if (plen >= 4 && payload[0] == 'q' && payload[1] == 'u' && payload[2] == 'i' && payload[3] == 't' &&
            (plen == 4 || (plen == 5 && payload[4] == '\n') ||
             (plen == 6 && payload[4] == '\r' && payload[5] == '\n'))) {
            serial_puts("netecho: bye\n");
            exit(0);
        }
    } else if (dport == PORT_CRASH) {
        if (plen >= 5 && payload[0] == 'c' && payload[1] == 'r' && payload[2] == 'a' && payload[3] == 's' &&
            payload[4] == 'h') {
            /* A guest software crash on request: report it on the pvpanic
             * port, then stop the CPU for good (HLT with interrupts off,
             * itself a crash tandem detects where there is no pvpanic). */
            serial_puts("netecho: crashing\n");
            outb(0x505, 1);
            __asm__ volatile("cli; hlt" ::: "memory");
        } else if (plen >= 7 && payload[0] == 'f' && payload[1] == 'r' && payload[2] == 'a' && payload[3] == 'g' &&
                   payload[4] == 'i' && payload[5] == 'l' && payload[6] == 'e') {
            fragile_window();
            echo_udp(f, l4, hl, tot);
        } else if (plen >= 4 && payload[0] == 'h' && payload[1] == 'a' && payload[2] == 'n' && payload[3] == 'g') {
            /* A hang: arm the watchdog (port 0x508, 500 ms) and never pet
             * it; the CPU keeps running, interrupts on. */
            serial_puts("netecho: hanging\n");
            outl(0x508, 500);
            volatile u32 spin = 0;
            for (;;)
                spin++;
        }
    }
}

static void handle_frame(const u8 *f, u32 flen)
{
    if (flen < 14)
        return;
    u32 type = get16(f + 12);
    if (type == 0x0806)
        handle_arp(f, flen);
    else if (type == 0x0800)
        handle_ipv4(f, flen);
}

/* ---- setup ---- */

static int parse_ip(void)
{
    const char *p = cmdline();
    my_ip[0] = 10, my_ip[1] = 0, my_ip[2] = 0, my_ip[3] = 2;
    while (*p) {
        while (*p == ' ')
            p++;
        if (p[0] == 'i' && p[1] == 'p' && p[2] == '=') {
            p += 3;
            for (int i = 0; i < 4; i++) {
                u32 v = 0;
                int digits = 0;
                while (*p >= '0' && *p <= '9' && digits < 4) {
                    v = v * 10 + (u32)(*p++ - '0');
                    digits++;
                }
                if (!digits || v > 255 || (i < 3 && *p++ != '.'))
                    return -1;
                my_ip[i] = (u8)v;
            }
            return (*p && *p != ' ') ? -1 : 0;
        }
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

static void net_init(void)
{
    if (virtio_negotiate(netdev, 1u << VIRTIO_NET_F_MAC)) {
        printf("netecho: virtio-net init failed\n");
        exit(4);
    }
    if (feature_has(netdev->drv_features, VIRTIO_NET_F_MAC)) {
        u32 lo = vio_read(netdev, VIRTIO_MMIO_CONFIG), hi = vio_read(netdev, VIRTIO_MMIO_CONFIG + 4);
        put32le(mac, lo);
        mac[4] = (u8)hi;
        mac[5] = (u8)(hi >> 8);
    } else {
        mac[0] = 0x02, mac[5] = 0x01;
    }
    if (virtq_setup(netdev, &rxq, 0, QSIZE, VIRTIO_MEM_NETRXQ) ||
        virtq_setup(netdev, &txq, 1, QSIZE, VIRTIO_MEM_NETTXQ)) {
        printf("netecho: virtio-net queue setup failed\n");
        exit(4);
    }
    for (u32 i = 0; i < rxq.num; i++) {
        rxq.desc[i].addr = RX_BUFS + i * BUF_SIZE;
        rxq.desc[i].len = BUF_SIZE;
        rxq.desc[i].flags = VIRTQ_DESC_F_WRITE;
        rxq.desc[i].next = 0;
        virtq_push(&rxq, (u16)i);
    }
    virtio_irq_enable(netdev);
    virtio_driver_ok(netdev);
    u32 s = vio_read(netdev, VIRTIO_MMIO_STATUS);
    if (s & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) {
        printf("netecho: virtio-net status 0x%02x after DRIVER_OK\n", s);
        exit(4);
    }
    virtq_notify(netdev, &rxq);
}

static void counter_load(void)
{
    volatile u32 *s = (volatile u32 *)SECTOR_BUF;
    int st = blk_rw(&blk, VIRTIO_BLK_T_IN, 0, SECTOR_BUF, 512, DISK_TIMEOUT_MS);
    if (st != VIRTIO_BLK_S_OK)
        disk_fail("read", st);
    /* "TNDMCNTR" as two LE words */
    if (s[0] == 0x4d444e54u && s[1] == 0x52544e43u)
        counter = (u64)s[3] << 32 | s[2];
    else
        counter = 0;
    s[0] = 0x4d444e54u;
    s[1] = 0x52544e43u;
    for (int i = 4; i < 128; i++)
        s[i] = 0;
}

int main(void)
{
    if (parse_ip()) {
        printf("netecho: bad ip= option\n");
        return 2;
    }
    pic_init();
    virtio_timer_init();
    irq_set_handler(0, netecho_timer);
    sti();
    virtio_probe();
    netdev = virtio_find(VIRTIO_ID_NET, 0);
    struct virtio_dev *bd = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!netdev) {
        printf("netecho: no virtio-net device\n");
        return 4;
    }
    if (!bd) {
        printf("netecho: no virtio-blk device (the counter needs one)\n");
        return 4;
    }
    if (blk_init(&blk, bd)) {
        printf("netecho: virtio-blk init failed\n");
        return 4;
    }
    if (blk.ro) {
        printf("netecho: virtio-blk device is read-only (the counter needs writes)\n");
        return 4;
    }
    counter_load();
    fill_memory(cmdline_u32("fill", 0));
    net_init();
    printf("netecho: up ip=%u.%u.%u.%u mac=%02x:%02x:%02x:%02x:%02x:%02x counter=%llu\n", my_ip[0], my_ip[1],
           my_ip[2], my_ip[3], mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], counter);

    u32 spin = cmdline_u32("spin", 0);
    for (;;) {
        cli();
        if (!virtq_has_used(&rxq)) {
            if (spin) {
                /* spin=1: never sleep; busy-wait (no exit) for the next
                 * timer tick or a received frame. */
                u32 t = virtio_ticks;
                sti();
                while (virtio_ticks == t && !virtq_has_used(&rxq))
                    __asm__ volatile("" ::: "memory");
            } else {
                sti_hlt(); /* woken by the RX (or any) interrupt */
            }
            continue;
        }
        sti();
        u32 id, len, n = 0;
        while (virtq_pop(&rxq, &id, &len)) {
            if (id < rxq.num && len > NET_HDR_LEN && len <= BUF_SIZE)
                handle_frame((const u8 *)(uptr)(RX_BUFS + id * BUF_SIZE + NET_HDR_LEN), len - NET_HDR_LEN);
            if (id < rxq.num) {
                virtq_push(&rxq, (u16)id); /* descriptor id still describes buffer id */
                n++;
            }
        }
        if (n)
            virtq_notify(netdev, &rxq);
    }
}
