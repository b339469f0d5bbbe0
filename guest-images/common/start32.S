/* 32-bit start code for the tandem test guests (PVH entry).
 *
 * Entry (PVH): 32-bit protected mode, paging off, flat segments, IF=0,
 * EBX = physical address of struct hvm_start_info, ESP undefined.
 *
 * Interrupt handlers never use IRET (KVM's emulator cannot run it outside
 * real mode): see irq_common below.
 */
#include "pvh_note.h"

PVH_NOTE(_start)

    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $stack_top, %esp

    /* zero .bss (EBX is kept) */
    movl $__bss_start, %edi
2:  cmpl $__bss_end, %edi
    jae 3f
    movl $0, (%edi)
    addl $4, %edi
    jmp 2b
3:
    /* the PVH start info, if EBX points at a valid one */
    xorl %eax, %eax
    cmpl $0x336ec578, (%ebx)
    jne 4f
    movl %ebx, %eax
4:  movl %eax, pvh_start_info_paddr

    xorl %ebp, %ebp
    call idt_init           /* exceptions 0..31 print + exit */
    call main
    pushl %eax
    call exit               /* exit(main's return value) */
5:  cli
    hlt
    jmp 5b

/* ---- exception stubs: never return; run on a private stack ---- */
    .macro EXC_STUB n
exc_stub_\n:
    cli
    movl $exc_stack_top, %esp
    pushl $\n
    call exception_handler
    .endm

    .text
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    EXC_STUB \n
    .endr

/* ---- IRQ stubs: vector 0x20 + n ---- */
    .macro IRQ_STUB n
irq_stub_\n:
    pushl $\n
    jmp irq_common
    .endm
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    IRQ_STUB \n
    .endr

/* Frame on entry (same privilege, 32-bit): [esp]=irq, EIP, CS, EFLAGS. */
irq_common:
    pushl %eax
    pushl %ecx
    pushl %edx
    cld
    pushl 12(%esp)          /* irq number */
    call irq_dispatch       /* handler + EOI */
    addl $4, %esp
    popl %edx
    popl %ecx
    popl %eax
    addl $4, %esp           /* drop irq number */
    /* Manual interrupt return (no IRET): */
    popl irq_ret_eip        /* saved EIP */
    addl $4, %esp           /* drop saved CS */
    andl $0xfffffdff, (%esp) /* clear IF in the saved EFLAGS */
    popfl                   /* restore flags with IF=0 */
    sti                     /* interrupt shadow covers the jmp */
    jmp *irq_ret_eip

    .section .rodata
    .balign 4
    .globl exc_stub_table
exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long exc_stub_\n
    .endr
    .globl irq_stub_table
irq_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .long irq_stub_\n
    .endr

    .balign 8
gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00cf9a000000ffff    /* 0x08 code32, flat */
    .quad 0x00cf92000000ffff    /* 0x10 data, flat */
    .quad 0x00af9a000000ffff    /* 0x18 code64 */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .data
    .balign 4
irq_ret_eip:
    .long 0

    .section .bss
    .balign 16
    .space 16384
stack_top:
    .space 4096
exc_stack_top:

    .section .note.GNU-stack, "", @progbits
