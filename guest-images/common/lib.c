/* Tiny freestanding library shared by the tandem test guests.
 * Compiled once per mode (-m32 / -m64). */
#include <stdarg.h>
#include "lib.h"

#ifdef __x86_64__
#define CODE_SEL 0x18
#else
#define CODE_SEL 0x08
#endif

u32 pvh_start_info_paddr; /* written by the start code */

void *memset(void *d, int c, uptr n)
{
    volatile u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, uptr n)
{
    volatile u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ---- COM1 ---- */

void serial_putc(char c)
{
    /* Poll LSR.THRE (bit 5); bounded so a broken UART cannot hang us. */
    for (u32 i = 0; i < 1000000; i++)
        if (inb(COM1 + 5) & 0x20)
            break;
    outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/* 64-bit divide by 10 with shifts only (no libgcc __udivdi3 in -m32). */
static u64 divmod10(u64 n, u32 *rem)
{
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= 10) {
            r -= 10;
            q |= 1ULL << i;
        }
    }
    *rem = (u32)r;
    return q;
}

static void put_num(u64 v, int base, int width, char pad, int neg)
{
    char buf[24];
    int n = 0;
    do {
        u32 d;
        if (base == 16) {
            d = (u32)(v & 15);
            v >>= 4;
        } else {
            v = divmod10(v, &d);
        }
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    } while (v && n < (int)sizeof buf);
    if (neg)
        buf[n++] = '-';
    while (width > n) {
        serial_putc(pad);
        width--;
    }
    while (n)
        serial_putc(buf[--n]);
}

/* printf subset: %% %c %s %d %u %x with optional 0-padding width and
 * l / ll length modifiers. */
void printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            serial_puts(s ? s : "(null)");
            break;
        }
        case 'd': {
            long long v = lng >= 2 ? va_arg(ap, long long) : lng ? va_arg(ap, long) : va_arg(ap, int);
            put_num(v < 0 ? (u64)-v : (u64)v, 10, width, pad, v < 0);
            break;
        }
        case 'u':
        case 'x': {
            u64 v = lng >= 2 ? va_arg(ap, unsigned long long)
                    : lng    ? va_arg(ap, unsigned long)
                             : va_arg(ap, unsigned int);
            put_num(v, *fmt == 'x' ? 16 : 10, width, pad, 0);
            break;
        }
        case 0:
            fmt--;
            break;
        default:
            serial_putc('%');
            serial_putc(*fmt);
        }
    }
    va_end(ap);
}

void exit(u8 code)
{
    outb(DEBUG_EXIT_PORT, code);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- command line ---- */

const char *cmdline(void)
{
    const struct hvm_start_info *si = (const struct hvm_start_info *)(uptr)pvh_start_info_paddr;
    if (!si || si->magic != HVM_START_MAGIC || !si->cmdline_paddr || si->cmdline_paddr >= 0x100000000ULL)
        return "";
    return (const char *)(uptr)si->cmdline_paddr;
}

int cmdline_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int parse_u32(const char **pp, u32 *out)
{
    const char *t = *pp;
    u32 v = 0, base = 10;
    int digits = 0;
    if (t[0] == '0' && (t[1] == 'x' || t[1] == 'X')) {
        base = 16;
        t += 2;
    }
    for (;; t++) {
        u32 d;
        if (*t >= '0' && *t <= '9')
            d = (u32)(*t - '0');
        else if (base == 16 && *t >= 'a' && *t <= 'f')
            d = (u32)(*t - 'a' + 10);
        else if (base == 16 && *t >= 'A' && *t <= 'F')
            d = (u32)(*t - 'A' + 10);
        else
            break;
        v = v * base + d;
        digits++;
    }
    *pp = t;
    *out = v;
    return digits > 0;
}

u32 cmdline_u32(const char *key, u32 def)
{
    const char *p = cmdline();
    while (*p) {
        while (cmdline_space(*p))
            p++;
        const char *k = key, *t = p;
        while (*k && *t == *k) {
            k++;
            t++;
        }
        if (!*k && *t == '=') {
            t++;
            u32 v;
            if (parse_u32(&t, &v) && (!*t || cmdline_space(*t)))
                return v;
        }
        while (*p && !cmdline_space(*p))
            p++;
    }
    return def;
}

/* ---- IDT ---- */

extern const uptr exc_stub_table[32]; /* start code */
extern const uptr irq_stub_table[16];

#ifdef __x86_64__
struct idt_gate {
    u16 off_lo, sel;
    u8 ist, type;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));
#else
struct idt_gate {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));
#endif

struct idt_ptr {
    u16 limit;
    uptr base;
} __attribute__((packed));

#define IDT_ENTRIES 48 /* 0..31 exceptions, 0x20..0x2f PIC IRQs */
static struct idt_gate idt[IDT_ENTRIES] __attribute__((aligned(16)));

static void set_gate(int v, uptr fn)
{
    struct idt_gate *g = &idt[v];
    memset(g, 0, sizeof *g);
    g->off_lo = (u16)fn;
    g->sel = CODE_SEL;
    g->type = 0x8e; /* present, DPL0, interrupt gate (IF cleared on entry) */
#ifdef __x86_64__
    g->off_mid = (u16)(fn >> 16);
    g->off_hi = (u32)(fn >> 32);
#else
    g->off_hi = (u16)(fn >> 16);
#endif
}

void idt_init(void)
{
    for (int v = 0; v < 32; v++)
        set_gate(v, exc_stub_table[v]);
    for (int i = 0; i < 16; i++)
        set_gate(IRQ_BASE + i, irq_stub_table[i]);
    struct idt_ptr p = { sizeof idt - 1, (uptr)idt };
    __asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

void idt_set(int vector, uptr fn)
{
    if (vector >= 0 && vector < IDT_ENTRIES)
        set_gate(vector, fn);
}

void idt_load_null(void)
{
    struct idt_ptr p = { 0, 0 };
    __asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

/* Called by the exception stubs on a private stack; never returns. */
void exception_handler(uptr vec) __attribute__((noreturn, used));
void exception_handler(uptr vec)
{
    static volatile int nested;
    if (nested++ == 0)
        printf("exception %u\n", (u32)vec);
    exit((u8)(EXC_EXIT_BASE + (vec & 31)));
}

/* ---- PIC ---- */

static u8 pic_mask_bits[2] = { 0xff, 0xff };

void pic_init(void)
{
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    outb(0x20, 0x11); /* ICW1: edge, cascade, ICW4 */
    outb(0xa0, 0x11);
    outb(0x21, IRQ_BASE); /* ICW2 */
    outb(0xa1, IRQ_BASE + 8);
    outb(0x21, 0x04); /* ICW3: slave on IRQ2 */
    outb(0xa1, 0x02);
    outb(0x21, 0x01); /* ICW4: 8086 mode */
    outb(0xa1, 0x01);
    pic_mask_bits[0] = 0xff;
    pic_mask_bits[1] = 0xff;
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

static void pic_write_masks(void)
{
    outb(0x21, pic_mask_bits[0]);
    outb(0xa1, pic_mask_bits[1]);
}

void pic_unmask(int irq)
{
    pic_mask_bits[irq >> 3] &= (u8)~(1u << (irq & 7));
    if (irq >= 8)
        pic_mask_bits[0] &= (u8)~(1u << 2); /* cascade */
    pic_write_masks();
}

void pic_mask(int irq)
{
    pic_mask_bits[irq >> 3] |= (u8)(1u << (irq & 7));
    pic_write_masks();
}

void pic_eoi(int irq)
{
    if (irq >= 8)
        outb(0xa0, 0x20);
    outb(0x20, 0x20);
}

static void (*irq_handlers[16])(void);

void irq_set_handler(int irq, void (*fn)(void)) { irq_handlers[irq & 15] = fn; }

/* Called by the IRQ stubs with IF=0; the stub returns by hand (no IRET). */
void irq_dispatch(uptr irq) __attribute__((used));
void irq_dispatch(uptr irq)
{
    irq &= 15;
    if (irq_handlers[irq])
        irq_handlers[irq]();
    pic_eoi((int)irq);
}

/* ---- PIT ---- */

void pit_init(u32 hz)
{
    if (!hz)
        hz = 1;
    u32 div = PIT_HZ / hz;
    if (div < 1)
        div = 1;
    if (div > 65535)
        div = 0; /* 0 = 65536 */
    outb(0x43, 0x34); /* ch0, lobyte/hibyte, mode 2, binary */
    outb(0x40, (u8)div);
    outb(0x40, (u8)(div >> 8));
}

u16 pit_read_ch0(void)
{
    outb(0x43, 0x00); /* counter latch, ch0 */
    u8 lo = inb(0x40);
    u8 hi = inb(0x40);
    return (u16)(lo | (hi << 8));
}

/* ---- RTC ---- */

u8 rtc_read(u8 reg)
{
    for (u32 i = 0; i < 10000; i++) {
        outb(0x70, 0x0a);
        if (!(inb(0x71) & 0x80))
            break;
    }
    outb(0x70, reg);
    return inb(0x71);
}
