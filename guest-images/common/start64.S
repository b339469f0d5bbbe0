/* Long-mode start code for the tandem test guests (PVH entry).
 *
 * Entry (PVH): 32-bit protected mode, paging off, flat segments, IF=0,
 * EBX = physical address of struct hvm_start_info, ESP undefined.
 *
 * Builds 4-level page tables identity-mapping the first 16 MiB with 4 KiB
 * pages (PML4 -> PDPT -> PD -> 8 PTs), enables PAE + EFER.LME + paging and
 * jumps to 64-bit code. Interrupt handlers never use IRETQ: see irq_common.
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
    xorl %eax, %eax
    cmpl $0x336ec578, (%ebx)
    jne 4f
    movl %ebx, %eax
4:  movl %eax, pvh_start_info_paddr

    /* page tables (present | writable); .bss is zero, so high halves are 0 */
    movl $pdpt, %eax
    orl $3, %eax
    movl %eax, pml4
    movl $pd, %eax
    orl $3, %eax
    movl %eax, pdpt
    xorl %ecx, %ecx             /* 8 PD entries -> 8 PTs = 16 MiB */
5:  movl %ecx, %eax
    shll $12, %eax
    addl $pt, %eax
    orl $3, %eax
    movl %eax, pd(,%ecx,8)
    incl %ecx
    cmpl $8, %ecx
    jb 5b
    xorl %ecx, %ecx             /* 4096 PTEs, 4 KiB each */
6:  movl %ecx, %eax
    shll $12, %eax
    orl $3, %eax
    movl %eax, pt(,%ecx,8)
    incl %ecx
    cmpl $4096, %ecx
    jb 6b

    movl %cr4, %eax
    orl $0x20, %eax             /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0
    ljmp $0x18, $long_mode

    .code64
long_mode:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    leaq stack_top(%rip), %rsp
    xorl %ebp, %ebp
    call idt_init
    call main
    movl %eax, %edi
    call exit
7:  cli
    hlt
    jmp 7b

/* ---- exception stubs: never return; run on a private stack ---- */
    .macro EXC_STUB n
exc_stub_\n:
    cli
    leaq exc_stack_top(%rip), %rsp
    movl $\n, %edi
    call exception_handler
    .endm

    .text
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    EXC_STUB \n
    .endr

    .macro IRQ_STUB n
irq_stub_\n:
    pushq $\n
    jmp irq_common
    .endm
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    IRQ_STUB \n
    .endr

/* Frame on entry (64-bit): [rsp]=irq, RIP, CS, RFLAGS, RSP, SS.
 * The CPU aligned RSP to 16 before pushing, so the frame's RSP (not
 * arithmetic) is what we return to. */
irq_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    subq $8, %rsp               /* 16-byte alignment for the call */
    movq 80(%rsp), %rdi         /* irq number */
    cld
    call irq_dispatch           /* handler + EOI */
    addq $8, %rsp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp               /* drop irq number */
    /* Manual interrupt return (no IRETQ): */
    popq irq_ret_rip(%rip)      /* saved RIP */
    addq $8, %rsp               /* drop saved CS */
    andq $-0x201, (%rsp)        /* clear IF in the saved RFLAGS */
    popfq                       /* restore flags with IF=0 */
    movq (%rsp), %rsp           /* saved RSP (SS is flat, dropped) */
    sti                         /* interrupt shadow covers the jmp */
    jmp *irq_ret_rip(%rip)

    .section .rodata
    .balign 8
    .globl exc_stub_table
exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr
    .globl irq_stub_table
irq_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .quad irq_stub_\n
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
    .balign 8
irq_ret_rip:
    .quad 0

    .section .bss
    .balign 4096
pml4:   .space 4096
pdpt:   .space 4096
pd:     .space 4096
pt:     .space 8 * 4096
    .balign 16
    .space 16384
stack_top:
    .space 4096
exc_stack_top:

    .section .note.GNU-stack, "", @progbits
