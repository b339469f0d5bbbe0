/* divzero: divides by zero with the normal exception handlers installed:
 * prints "exception 0\n" and exits with code 0x30 (EXC_EXIT_BASE + 0). */
#include "common/lib.h"

int main(void)
{
    volatile u32 zero = 0;
    u32 a = 1234, d = 0;
    serial_puts("divzero: dividing\n");
    __asm__ volatile("divl %2" : "+a"(a), "+d"(d) : "r"(zero));
    printf("divzero: survived (%u)\n", a);
    return 1;
}
