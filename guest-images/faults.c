/* faults: takes invalid-opcode faults (UD2, #UD) in a loop while PIT
 * interrupts arrive, so that kicks land between a fault and its delivery
 * (the faulting instruction counted, RIP still on it, the exception
 * pending): a recorder positions such a stop at the handler's entry.
 *
 * Options: n= (20000) faults, hz= (1000).
 * The #UD handler counts the fault, steps the saved RIP over the UD2 and
 * returns without IRETQ (as irq_common does). Output:
 *   "faults: n=N faults=F hash=0x%016llx ticks=T"
 * and exit 0 (F == N), else exit 2. */
#include "common/lib.h"

static volatile u64 faults, ticks;

void ud_entry(void);

/* The frame (no error code for #UD): RIP, CS, RFLAGS, RSP, SS. */
__asm__(".text\n"
        ".globl ud_entry\n"
        "ud_entry:\n"
        "  incq faults(%rip)\n"
        "  addq $2, (%rsp)\n"                /* over the UD2 */
        "  popq ud_ret_rip(%rip)\n"
        "  addq $8, %rsp\n"                  /* drop CS */
        "  andq $-0x201, (%rsp)\n"           /* IF off until the sti */
        "  popfq\n"
        "  movq (%rsp), %rsp\n"
        "  sti\n"                            /* its shadow covers the jmp */
        "  jmp *ud_ret_rip(%rip)\n"
        ".data\n"
        ".balign 8\n"
        "ud_ret_rip: .quad 0\n"
        ".text\n");

static void timer(void) { ticks++; }

int main(void)
{
    u32 n = cmdline_u32("n", 20000);
    u32 hz = cmdline_u32("hz", 1000);
    idt_set(6, (uptr)ud_entry);
    pic_init();
    irq_set_handler(0, timer);
    pit_init(hz);
    pic_unmask(0);
    sti();
    u64 hash = 0xcbf29ce484222325ull;
    for (u32 i = 0; i < n; i++) {
        __asm__ volatile("ud2" ::: "memory");
        hash = (hash ^ i) * 0x100000001b3ull;
    }
    cli();
    printf("faults: n=%u faults=%llu hash=0x%016llx ticks=%llu\n", n, faults, hash, ticks);
    return faults == n ? 0 : 2;
}
