/* badjump: prints "badjump: jumping\n", loads a zero-limit IDT (so any
 * exception becomes a triple fault instead of a clean exit) and jumps to
 * garbage:
 *   addr=0 (default): a 4 KiB page of 0xff bytes inside the image
 *                     (ff ff = invalid opcode -> #UD -> triple fault, or
 *                     an emulation failure in KVM's emulator);
 *   addr=A          : jump to physical address A, e.g. addr=0x7ff00000
 *                     (past the end of RAM: no memory to fetch from).
 * Either way the VMM must report it; the guest never exits cleanly. */
#include "common/lib.h"

static const u8 garbage[4096] __attribute__((aligned(4096))) = {
    [0 ... 4095] = 0xff,
};

int main(void)
{
    u32 addr = cmdline_u32("addr", 0);
    uptr target = addr ? (uptr)addr : (uptr)garbage;
    serial_puts("badjump: jumping\n");
    idt_load_null();
    __asm__ volatile("jmp *%0" : : "r"(target));
    __builtin_unreachable();
}
