/* Tiny freestanding library shared by the tandem test guests. */
#ifndef TANDEM_GUEST_LIB_H
#define TANDEM_GUEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define SCRATCH_PORT 0x600

/* Exit code written to the debug-exit port when CPU exception N (0..31)
 * reaches its IDT handler: EXC_EXIT_BASE + N (0x30..0x4f).
 * QEMU's isa-debug-exit reports it as ((0x30 + N) << 1) | 1. */
#define EXC_EXIT_BASE 0x30

/* PVH start info (struct hvm_start_info), see xen/include/public/arch-x86/hvm/start_info.h */
struct hvm_start_info {
    u32 magic; /* 0x336ec578 */
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};
#define HVM_START_MAGIC 0x336ec578u

/* Set by the start code: EBX at the PVH entry (0 if invalid). */
extern u32 pvh_start_info_paddr;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* sti's interrupt shadow covers the hlt: no wake-up can be lost. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

/* lib.c */
void *memset(void *d, int c, uptr n);
void *memcpy(void *d, const void *s, uptr n);

void serial_putc(char c);
void serial_puts(const char *s);
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Write code to port 0xf4 (the VM ends), then cli;hlt forever. */
void exit(u8 code) __attribute__((noreturn));

/* Kernel command line from the PVH start info ("" if none). */
const char *cmdline(void);
/* Value of key=N on the command line (decimal or 0x-hex), else def. */
u32 cmdline_u32(const char *key, u32 def);
/* Command-line separators: space, tab, CR, LF. */
int cmdline_space(char c);
/* Parse a number (decimal or 0x-hex) at *pp and advance *pp; 0 if no
 * digits. */
int parse_u32(const char **pp, u32 *out);

/* Descriptor tables (the start code loads the GDT; idt_init fills and
 * loads the IDT: exceptions 0..31 and IRQ vectors 0x20..0x2f). */
void idt_init(void);
/* Load a zero-limit IDT: any exception now triple-faults. */
void idt_load_null(void);
/* Points IDT vector `vector` at `fn` (an interrupt gate, DPL0). */
void idt_set(int vector, uptr fn);

/* i8259 PIC: ICW2 = 0x20 / 0x28; all lines masked after init. */
#define IRQ_BASE 0x20
void pic_init(void);
void pic_unmask(int irq);
void pic_mask(int irq);
void pic_eoi(int irq);
/* Handler called (with IF=0) for IRQ n; the dispatcher sends the EOI. */
void irq_set_handler(int irq, void (*fn)(void));

/* i8254 PIT */
#define PIT_HZ 1193182u
/* Program channel 0, mode 2 (rate generator), lobyte/hibyte, at hz. */
void pit_init(u32 hz);
/* Counter-latch channel 0 and read the 16-bit current count. */
u16 pit_read_ch0(void);

/* CMOS RTC register read (waits for UIP clear, bounded). */
u8 rtc_read(u8 reg);

#endif
