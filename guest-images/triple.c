/* triple: prints "triple: faulting\n", loads a zero-limit IDT and executes
 * ud2 -> #UD cannot be delivered -> #DF cannot -> triple fault (shutdown). */
#include "common/lib.h"

int main(void)
{
    serial_puts("triple: faulting\n");
    idt_load_null();
    __asm__ volatile("ud2");
    serial_puts("triple: survived\n");
    return 1;
}
