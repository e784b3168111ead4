// Internal header of the CHESS kernels (not installed): what chess-kernels.c (dispatch, generic
// routes), chess-kernels-ref.c (scalar references), chess-kernels-x86-{up,in}.c (AVX2) and
// chess-kernels-arm.c (NEON) share. Names here are internal (hidden in the shared library).
#pragma once

#include "chess-kernels.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CHESS_AVX2 1
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(CHESS_AVX2)
#include <arm_neon.h>
#define CHESS_NEON 1 // aarch64 NEON paths (SDOT for the up kernels with __ARM_FEATURE_DOTPROD)
#endif

#if defined(__GNUC__)
#define CH_HIDDEN __attribute__((visibility("hidden")))
#define CH_INLINE static inline __attribute__((always_inline))
// Loops over the rows of a pass (trip count a compile-time constant after inlining): unrolled so
// their per-row accumulators live in registers. GCC leaves them as loops with the accumulator
// arrays on the stack otherwise (seen in perf: a store and reload of every zmm per super-block).
#define CH_UNROLL _Pragma("GCC unroll 8")
#else
#define CH_UNROLL
#define CH_HIDDEN
#define CH_INLINE static inline
#endif

// Fused multiply-add used by every accumulation, vector and scalar alike, so an output element
// gets the same rounding whichever code path (vector body or scalar tail) computes it.
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define CH_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define CH_FMA(a, b, c) ((a) * (b) + (c))
#endif

// ---- thread-local scratch (no work buffer in a ggml custom op): grows, never shrinks, freed at
// thread exit (chess-kernels.c) -------------------------------------------------------------------
typedef struct { void * p; size_t cap; } ch_buf;
enum { CH_BUF_LIST, CH_BUF_DEQ, CH_BUF_X, CH_BUF_TILE, CH_BUF_GROUPS, CH_BUF_PART, CH_N_BUFS };
CH_HIDDEN void * ch_scratch(int which, size_t need); // 64-byte aligned, >= need bytes

CH_HIDDEN extern bool ch_force_generic; // chess_kernels_force_generic

static inline float ch_h2f(ggml_fp16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(CHESS_NEON)
    __fp16 f; // IEEE half on aarch64: one fcvt
    memcpy(&f, &h, sizeof(f));
    return (float) f;
#else
    return ggml_fp16_to_fp32(h);
#endif
}

// threshold lookup: per-channel array, one scalar, or none
static inline float ch_thr(const float * t, int64_t n_t, int64_t i) {
    return t ? t[n_t == 1 ? 0 : i] : 0.0f;
}

// ---- software prefetch of active/kept rows: random jumps the hardware prefetcher cannot follow.
// The input-sparse kernels prefetch CH_PF_BYTES of weights ahead of what they compute, the up
// kernels whole rows CH_UP_PF_ROWS kept rows ahead (docs/kernels.md has the measurements).
#ifndef CH_PF_BYTES
#define CH_PF_BYTES 3072
#endif
#ifndef CH_UP_PF_ROWS
#define CH_UP_PF_ROWS 8
#endif
#ifndef CH_PF_LOC
#define CH_PF_LOC 2
#endif
#define CH_PREFETCH(p) __builtin_prefetch((p), 0, CH_PF_LOC) // locality 2 = prefetcht1 on x86

static inline int64_t ch_pf_rows(size_t slice_bytes) {
    int64_t r = (int64_t) (CH_PF_BYTES / (slice_bytes ? slice_bytes : 1));
    r = r < 8 ? 8 : r > 64 ? 64 : r;
    return r & ~(int64_t) 3;
}

// every cache line of [p, p + n): rows are not line-aligned (a Q4_1 row of 576 is 360 bytes), and
// stepping 64 bytes from p itself would miss the row's last line (one demand miss per row).
static inline void ch_prefetch_bytes(const char * p, size_t n) {
    const uintptr_t end = (uintptr_t) p + n;
    for (uintptr_t a = (uintptr_t) p & ~(uintptr_t) 63; a < end; a += 64) {
        CH_PREFETCH((const char *) a);
    }
}

// the lines that START within [p, p + n): a row prefetched piece by piece (one super-block per step)
// without issuing the line two pieces share twice; the caller prefetches the row's first line
static inline void ch_prefetch_span(const void * p, size_t n) {
    for (uintptr_t a = ((uintptr_t) p + 63) & ~(uintptr_t) 63; a < (uintptr_t) p + n; a += 64) {
        CH_PREFETCH((const char *) a);
    }
}

#define CH_TILE_COLS 2048 // output columns per pass over the active rows (8 KB of y: stays in L1)

// ---- routes: an ISA file offers a fast route for a type, or NULL (then the generic one runs) ----

// output-sparse up: s[k] = dot(W_up[kept[k]], xq) for the nk kept rows (rows of n_in, stride nb1)
typedef void (*ch_up_fn)(const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk,
                         const void * xq, float * s);
// input-sparse through a transposed weight of a block type: y[j0, j1) from the active list (idx, c)
typedef void (*ch_in_fn)(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, int64_t na,
                         float * y, int64_t j0, int64_t j1);

// ---- x4 with 8-bit activations (every tier computes the same integers) -------------------------
// Per group g of 32 input channels with active inputs: m = max |v_i| over them, u_i = round(v_i *
// 127/m) (int8, ties to even), s = m/127; then y_j += s * (a_j * T_j + b_j * U) with T_j = sum u_i *
// q_ij and U = sum u_i, both exact integers. The active inputs are taken in pairs (an odd one gets
// a partner with u = 0); T is accumulated in int16 segments of pairs whose sum of |u| stays
// <= CH_X4_SEG_SUM, so no int16 sum can overflow (15 * CH_X4_SEG_SUM <= 32767), then widened.
#define CH_X4_SEG_SUM 2184
#define CH_X4_MAX_SEG 4 // 32 inputs of |u| <= 127 fill at most 3 segments
typedef struct {
    int32_t g;                 // group (input channels 32g .. 32g+31)
    int32_t p0, np;            // its pairs in the pair table: [p0, p0 + np)
    int32_t nseg;              // segments: pairs [seg[k-1], seg[k]) (seg[-1] = 0), relative to p0
    int32_t seg[CH_X4_MAX_SEG];
    int32_t U;                 // sum of u
    float   s;                 // scale m/127
} ch_x4_group;
typedef struct {
    uint8_t  ca, cb;           // the pair's channels within the group (cb = ca for a padded pair)
    int16_t  pb;               // u_a | u_b << 8 (int8 each): one int16 broadcast for maddubs
    int8_t   ua, ub;
} ch_x4_pair;
typedef struct {
    const ch_x4_group * grp;
    const ch_x4_pair  * pair;
    int64_t ng, na;            // groups with active inputs, active inputs
} ch_x4_plan;

// The plan of an input vector: groups, pairs, scales. n_in a multiple of 32.
CH_HIDDEN ch_x4_plan ch_x4_prepare(const float * v, const float * thr, int64_t n_thr, int64_t n_in);
// y[j0, j1) from a plan, columns multiples of 32 (a fast route, or ch_x4_generic)
typedef void (*ch_x4_fn)(const char * w, size_t nb1, int64_t n_out, const ch_x4_plan * pl, float * y,
                         int64_t j0, int64_t j1);
CH_HIDDEN void ch_x4_generic(const char * w, size_t nb1, int64_t n_out, const ch_x4_plan * pl, float * y,
                             int64_t j0, int64_t j1);

// Per ISA (chess-kernels-x86-{up,in}.c, chess-kernels-arm.c; none in a portable build): the fast routes,
// NULL where there is none, *name set either way when non-NULL is returned.
CH_HIDDEN ch_up_fn ch_up_route_isa(enum ggml_type type, const char ** name);
CH_HIDDEN ch_in_fn ch_in_route_isa(enum ggml_type type, const char ** name);
CH_HIDDEN ch_x4_fn ch_x4_route_isa(const char ** name);
// active inputs of v in [0, n): v_i != 0 and |v_i| >= thr_i, increasing i, into idx/c (room for n + 16)
CH_HIDDEN int64_t ch_active_isa(const float * v, const float * thr, int64_t n_thr, int64_t n, int32_t * idx, float * c);
