/* PVH entry note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY),
 * desc = 32-bit physical address of the 32-bit protected-mode entry. */
#define PVH_NOTE(entry)                      \
    .pushsection .note.Xen, "a", @note;      \
    .balign 4;                               \
    .long 4;        /* namesz */             \
    .long 4;        /* descsz */             \
    .long 18;       /* XEN_ELFNOTE_PHYS32_ENTRY */ \
    .asciz "Xen";                            \
    .balign 4;                               \
    .long entry;                             \
    .balign 4;                               \
    .popsection
