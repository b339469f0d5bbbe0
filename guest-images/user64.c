/* user64: compute's hash (guest-images/compute.c, the same algorithm and
 * result), run in 64-bit user mode (CPL3) while PIT interrupts arrive.
 * On the development hosts' KVM, 64-bit CPL3 code runs natively and no
 * position counter counts it: a recorder must fall back to sync points
 * for the stops that land there.
 *
 * Options: size= (65536, max 4194304), rounds= (4), hz= (100).
 * The kernel part (CPL0) sets up user segments, a TSS (RSP0) and the U bit
 * on every page, and enters user mode with SYSEXIT (no IRETQ and no SYSRET
 * on the development hosts' KVM). The timer interrupt returns to user mode
 * through SYSEXIT to a user-mode trampoline that restores RCX, RDX and
 * RFLAGS (SYSEXIT takes RCX and RDX). When the user code is done
 * (a flag), the next tick does not return: the kernel prints
 *   "user64: size=N rounds=R hash=0x%016llx ticks=T user_ticks=U"
 * and exits 0. U counts the ticks that interrupted user mode (at least
 * one, or the guest says so and exits 2). */
#include "common/lib.h"
#include "common/compute_run.h"

#define BUF_BASE 0x200000ul
#define BUF_MAX (4ul << 20)

/* GDT selectors: SYSEXIT (64-bit) loads CS = SYSENTER_CS + 32 and
 * SS = SYSENTER_CS + 40, with RPL 3. */
#define KCODE64 0x18
#define UCODE64 (KCODE64 + 32)
#define UDATA (KCODE64 + 40)
#define TSS_SEL 0x48
#define MSR_SYSENTER_CS 0x174

static u64 gdt[11] __attribute__((aligned(16)));
static u8 tss[104] __attribute__((aligned(16)));
static u8 kstack[16384] __attribute__((aligned(16)));
static u8 ustack[16384] __attribute__((aligned(16)));

static volatile u64 ticks, user_ticks;
static volatile int user_done;
static volatile u64 user_hash;
static u64 opt_size;
static u32 opt_rounds;

/* CPL3: the work, then wait for the kernel to take over at a tick. */
void user_main(void) __attribute__((noreturn, used));
void user_main(void)
{
    user_hash = compute_run((u8 *)BUF_BASE, opt_size, opt_rounds);
    user_done = 1;
    for (;;)
        __asm__ volatile("pause");
}

/* CPL0, from the timer stub: 1 = do not return to user mode. */
int user64_tick(u64 cs) __attribute__((used));
int user64_tick(u64 cs)
{
    ticks++;
    if ((cs & 3) == 3)
        user_ticks++;
    pic_eoi(0);
    return user_done;
}

/* CPL0, on the kernel stack, once the user code is done. */
void user64_finish(void) __attribute__((noreturn, used));
void user64_finish(void)
{
    printf("user64: size=%llu rounds=%u hash=0x%016llx ticks=%llu user_ticks=%llu\n", opt_size,
           opt_rounds, user_hash, ticks, user_ticks);
    exit(user_ticks ? 0 : 2);
}

void user_irq0(void);
void enter_user(u64 rip, u64 rsp) __attribute__((noreturn));

/* The timer's entry (vector 0x20) and the way back to user mode. The
 * frame the CPU pushed: RIP, CS, RFLAGS, RSP, SS. The way back puts the
 * user's RCX, RDX, RFLAGS and RIP on the user stack (no red zone here) and
 * SYSEXITs, with interrupts on, to a trampoline that pops them: an
 * interrupt in the trampoline stacks another such block and comes back to
 * where it was, so it is re-entrant. */
__asm__(".text\n"
        ".globl user_irq0\n"
        "user_irq0:\n"
        "  pushq %rax\n  pushq %rbx\n  pushq %rcx\n  pushq %rdx\n  pushq %rsi\n"
        "  pushq %rdi\n  pushq %rbp\n  pushq %r8\n  pushq %r9\n  pushq %r10\n"
        "  pushq %r11\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  cld\n"
        "  movq 128(%rsp), %rdi\n"         /* the interrupted CS */
        "  call user64_tick\n"
        "  testl %eax, %eax\n"
        "  jnz 2f\n"
        "  movq 144(%rsp), %rbx\n"         /* the user RSP */
        "  subq $32, %rbx\n"
        "  movq 96(%rsp), %rax\n  movq %rax, 0(%rbx)\n"    /* RCX */
        "  movq 88(%rsp), %rax\n  movq %rax, 8(%rbx)\n"    /* RDX */
        "  movq 136(%rsp), %rax\n  movq %rax, 16(%rbx)\n"  /* RFLAGS */
        "  movq 120(%rsp), %rax\n  movq %rax, 24(%rbx)\n"  /* RIP */
        "  movq %rbx, %rcx\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %r11\n"
        "  popq %r10\n  popq %r9\n  popq %r8\n  popq %rbp\n  popq %rdi\n"
        "  popq %rsi\n  addq $16, %rsp\n  popq %rbx\n  popq %rax\n"
        "  addq $40, %rsp\n"
        "  leaq user_trampoline(%rip), %rdx\n"
        "  sti\n"                          /* its shadow covers the sysexit */
        "  sysexitq\n"
        "2:\n"
        "  call user64_finish\n"
        ".globl user_trampoline\n"
        "user_trampoline:\n"
        "  popq %rcx\n"
        "  popq %rdx\n"
        "  popfq\n"
        "  ret\n"
        /* enter_user(rip, rsp): the first entry, the same way. */
        ".globl enter_user\n"
        "enter_user:\n"
        "  subq $32, %rsi\n"
        "  movq $0, 0(%rsi)\n"
        "  movq $0, 8(%rsi)\n"
        "  movq $0x202, 16(%rsi)\n"
        "  movq %rdi, 24(%rsi)\n"
        "  movq %rsi, %rcx\n"
        "  leaq user_trampoline(%rip), %rdx\n"
        "  sti\n"
        "  sysexitq\n");

/* A GDT descriptor for a 64-bit TSS at `base` (two entries). */
static void tss_descriptor(u64 *at, u64 base)
{
    u64 limit = sizeof tss - 1;
    at[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
            (((base >> 24) & 0xff) << 56);
    at[1] = base >> 32;
}

/* Sets the U bit on every entry of the identity map start64.S built. */
static void pages_for_user(void)
{
    u64 cr3;
    __asm__ volatile("movq %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffull);
    pml4[0] |= 4;
    u64 *pdpt = (u64 *)(pml4[0] & ~0xfffull);
    pdpt[0] |= 4;
    u64 *pd = (u64 *)(pdpt[0] & ~0xfffull);
    for (int i = 0; i < 8; i++) {
        pd[i] |= 4;
        u64 *pt = (u64 *)(pd[i] & ~0xfffull);
        for (int j = 0; j < 512; j++)
            pt[j] |= 4;
    }
    __asm__ volatile("movq %0, %%cr3" : : "r"(cr3) : "memory");
}

int main(void)
{
    opt_size = cmdline_u32("size", 65536);
    opt_rounds = cmdline_u32("rounds", 4);
    u32 hz = cmdline_u32("hz", 100);
    if (opt_size > BUF_MAX)
        opt_size = BUF_MAX;

    gdt[1] = 0x00cf9a000000ffffull; /* 0x08 code32 */
    gdt[2] = 0x00cf92000000ffffull; /* 0x10 data */
    gdt[3] = 0x00af9a000000ffffull; /* 0x18 code64 */
    gdt[UCODE64 / 8] = 0x00affa000000ffffull; /* code64, DPL3 */
    gdt[UDATA / 8] = 0x00cff2000000ffffull; /* data, DPL3 */
    *(u64 *)(tss + 4) = (u64)(kstack + sizeof kstack); /* RSP0 */
    *(u16 *)(tss + 102) = sizeof tss; /* no I/O bitmap */
    tss_descriptor(&gdt[TSS_SEL / 8], (u64)tss);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) gp = { sizeof gdt - 1, (u64)gdt };
    __asm__ volatile("lgdt %0" : : "m"(gp) : "memory");
    __asm__ volatile("ltr %w0" : : "r"((u16)TSS_SEL));
    __asm__ volatile("wrmsr" : : "c"(MSR_SYSENTER_CS), "a"(KCODE64), "d"(0));
    pages_for_user();

    pic_init();
    idt_set(IRQ_BASE + 0, (uptr)user_irq0);
    pit_init(hz);
    pic_unmask(0);
    /* The user stack as if user_main had been called (RSP = 8 mod 16). */
    enter_user((u64)user_main, (u64)(ustack + sizeof ustack - 8));
}
