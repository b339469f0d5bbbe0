/* The compute guest's work (see compute.c for the algorithm), shared with
 * user64, which runs it in user mode and must reach the same hash. */
#ifndef TANDEM_GUEST_COMPUTE_RUN_H
#define TANDEM_GUEST_COMPUTE_RUN_H

#include "common/lib.h"

static inline u64 rotl64(u64 x, unsigned k) { return (x << k) | (x >> (64 - k)); }

static inline u64 compute_run(u8 *buf, u64 size, u32 rounds)
{
    u64 state = 0;
    for (u64 i = 0; i < size; i++)
        buf[i] = (u8)(i * 31);
    for (u32 r = 0; r < rounds; r++) {
        u64 h = 0xcbf29ce484222325ull;
        for (u64 i = 0; i < size; i++)
            h = (h ^ buf[i]) * 0x100000001b3ull;
        state = rotl64(state, 13) ^ h;
        for (u64 i = 0; i < size; i++)
            buf[i] = (u8)((buf[i] ^ (u8)(state >> (8 * (i & 7)))) + (u8)r);
    }
    return state;
}

#endif
