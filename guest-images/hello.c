/* hello: prints "hello from tandem\n" and exits 0. 32-bit, no interrupts. */
#include "common/lib.h"

int main(void)
{
    serial_puts("hello from tandem\n");
    return 0;
}
