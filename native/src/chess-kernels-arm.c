// aarch64 NEON fast routes of the CHESS kernels (SDOT in the up kernels when the target has
// __ARM_FEATURE_DOTPROD): the same schemes and thread ownership as the x86 files, so results
// are deterministic for any thread count. Dispatch is in chess-kernels.c.
#include "chess-kernels-impl.h"

#if defined(CHESS_NEON)

// ---------------------------------------------------------------------------------------------
// output-sparse up projection

// ---- NEON (aarch64) multi-row integer dot: the AVX2 up kernels above, on ARM ------------------
// Same scheme: CH_UP_ROWS rows per pass share each x block (Q8_0 / Q8_1 / Q8_K as ggml prepares
// it), one float accumulator vector per row, one horizontal sum per row at the end. The weight
// levels are made signed in the bytes (Q4_0 - 8, Q5_0 - 16, Q6_K - 32; Q4_1/Q5_1/Q4_K/Q5_K levels are
// valid s8 as they are) and multiplied by x's s8 with SDOT when the target has it
// (armv8.2-a+dotprod), else with widening multiplies + pairwise adds: exact in int32 either way
// (the two group the products into lanes differently, so their float results may differ in the
// last bits). Q4_1/Q5_1's min goes through Q8_1's stored d*sum(x), Q4_K/Q5_K mins through Q8_K's
// per-16 sums, as on x86.
#define CH_UP_ROWS 4

enum { CH_NQ8_0, CH_NQ4_0, CH_NQ4_1, CH_NQ5_0, CH_NQ5_1 };
enum { CH_NQ4_K = 8, CH_NQ6_K, CH_NQ5_K };

// acc + the 4 int32 partial sums of a[e] * b[e] (16 s8 each)
static inline int32x4_t ch_neon_dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b))); // |a*b| <= 2^14: fits int16
    return vpadalq_s16(acc, vmull_high_s8(a, b));
#endif
}

// the 32 bits at qh4 as bytes: *lo byte e = 0x10 if bit e is set, *hi byte e if bit 16 + e is
static inline void ch_neon_bits_0x10(const uint8_t * qh4, uint8x16_t * lo, uint8x16_t * hi) {
    static const uint8_t sel[32] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                     2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3 };
    static const uint8_t bit[16] = { 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128 };
    uint32_t u;
    memcpy(&u, qh4, 4);
    const uint8x16_t v = vreinterpretq_u8_u32(vdupq_n_u32(u)); // bytes 0..3 of u, repeated
    const uint8x16_t m = vld1q_u8(bit), h = vdupq_n_u8(0x10);
    *lo = vandq_u8(vtstq_u8(vqtbl1q_u8(v, vld1q_u8(sel)), m), h);
    *hi = vandq_u8(vtstq_u8(vqtbl1q_u8(v, vld1q_u8(sel + 16)), m), h);
}

// the 32 levels of one 32-block as s8 (Q4_0/Q5_0 centred): elements 0..15 in *lo, 16..31 in *hi
static inline void ch_neon_levels(int kind, const uint8_t * b, int8x16_t * lo, int8x16_t * hi) {
    if (kind == CH_NQ8_0) {
        *lo = vld1q_s8((const int8_t *) (b + 2));
        *hi = vld1q_s8((const int8_t *) (b + 18));
        return;
    }
    const int o = kind == CH_NQ4_0 ? 2 : kind == CH_NQ4_1 ? 4 : kind == CH_NQ5_0 ? 6 : 8; // qs
    const uint8x16_t q = vld1q_u8(b + o);
    uint8x16_t l = vandq_u8(q, vdupq_n_u8(0x0F)), h = vshrq_n_u8(q, 4);
    if (kind == CH_NQ5_0 || kind == CH_NQ5_1) {
        uint8x16_t bl, bh;
        ch_neon_bits_0x10(b + o - 4, &bl, &bh); // qh[4] right before qs
        l = vorrq_u8(l, bl);
        h = vorrq_u8(h, bh);
    }
    *lo = vreinterpretq_s8_u8(l);
    *hi = vreinterpretq_s8_u8(h);
    if (kind == CH_NQ4_0 || kind == CH_NQ5_0) {
        const int8x16_t z = vdupq_n_s8(kind == CH_NQ4_0 ? 8 : 16);
        *lo = vsubq_s8(*lo, z);
        *hi = vsubq_s8(*hi, z);
    }
}

// sums[r] = dot(row r, x) for NR rows: per block the integer dot scaled by d_w*d_x, plus
// (Q4_1/Q5_1) m_w * s_x. The per-row arithmetic does not depend on NR (groups vs tail rows).
static inline __attribute__((always_inline)) void ch_up_rows_neon(const int kind, const int NR,
        const uint8_t * const * rows, size_t ts, const uint8_t * xq, size_t xs_bytes, const float * dx,
        const float * xs, int64_t nb, float * sums) {
    float32x4_t acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        acc[r] = vdupq_n_f32(0.0f);
        corr[r] = 0.0f;
    }
    const bool has_m = kind == CH_NQ4_1 || kind == CH_NQ5_1;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t * xb = (const int8_t *) (xq + b * xs_bytes + (has_m ? 4 : 2));
        const int8x16_t xl = vld1q_s8(xb), xh = vld1q_s8(xb + 16);
        CH_UNROLL
        for (int r = 0; r < NR; r++) {
            const uint8_t * wb = rows[r] + b * ts;
            const ggml_fp16_t * hp = (const ggml_fp16_t *) wb;
            int8x16_t wl, wh;
            ch_neon_levels(kind, wb, &wl, &wh);
            const int32x4_t p = ch_neon_dot16(ch_neon_dot16(vdupq_n_s32(0), wl, xl), wh, xh);
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(p), ch_h2f(hp[0]) * dx[b]);
            if (has_m) {
                corr[r] = fmaf(ch_h2f(hp[1]), xs[b], corr[r]);
            }
        }
    }
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        sums[r] = vaddvq_f32(acc[r]) + corr[r];
    }
}

// 6-bit scale and min of sub-block j of a Q4_K super-block (ggml's packing)
static inline void ch_neon_q4k_scale_min(const uint8_t * q, int j, int * sc, int * m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m  = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m  = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// the 32 levels of sub-block s (elements 32s..32s+31) of a K super-block as s8 (Q6_K: q - 32)
static inline void ch_neon_k_levels(int kind, const uint8_t * sb, int s, int8x16_t * lo, int8x16_t * hi) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    uint8x16_t l, h;
    if (kind == CH_NQ4_K || kind == CH_NQ5_K) {
        // qs after d, dmin, scales[12] (Q5_K: and qh[32], whose bit s is the 5th bit of sub-block s)
        const uint8_t * q = sb + (kind == CH_NQ4_K ? 16 : 48) + 32 * (s / 2);
        l = vld1q_u8(q);
        h = vld1q_u8(q + 16);
        if (s & 1) {
            l = vshrq_n_u8(l, 4);
            h = vshrq_n_u8(h, 4);
        } else {
            l = vandq_u8(l, m4);
            h = vandq_u8(h, m4);
        }
        if (kind == CH_NQ5_K) {
            const int8x16_t sh = vdupq_n_s8((int8_t) (4 - s)); // bit s of qh -> bit 4
            const uint8x16_t m10 = vdupq_n_u8(0x10);
            l = vorrq_u8(l, vandq_u8(vshlq_u8(vld1q_u8(sb + 16), sh), m10));
            h = vorrq_u8(h, vandq_u8(vshlq_u8(vld1q_u8(sb + 32), sh), m10));
        }
        *lo = vreinterpretq_s8_u8(l);
        *hi = vreinterpretq_s8_u8(h);
        return;
    }
    const int n = s / 4, r = s % 4; // Q6_K: ql[128] qh[64] scales[16] d
    const uint8_t * ql = sb + 64 * n + 32 * (r & 1);
    const uint8_t * qh = sb + 128 + 32 * n;
    l = vld1q_u8(ql);
    h = vld1q_u8(ql + 16);
    if (r < 2) {
        l = vandq_u8(l, m4);
        h = vandq_u8(h, m4);
    } else {
        l = vshrq_n_u8(l, 4);
        h = vshrq_n_u8(h, 4);
    }
    const int8x16_t sh = vdupq_n_s8((int8_t) (4 - 2 * r)); // bits 2r, 2r+1 of qh -> bits 4, 5
    const uint8x16_t m30 = vdupq_n_u8(0x30);
    l = vorrq_u8(l, vandq_u8(vshlq_u8(vld1q_u8(qh), sh), m30));
    h = vorrq_u8(h, vandq_u8(vshlq_u8(vld1q_u8(qh + 16), sh), m30));
    *lo = vsubq_s8(vreinterpretq_s8_u8(l), vdupq_n_s8(32));
    *hi = vsubq_s8(vreinterpretq_s8_u8(h), vdupq_n_s8(32));
}

// K-quants: per row and super-block, sum_k sc_k * dot_k accumulated in int32 (|sum| < 2^25),
// scaled once by d * d_x; Q4_K/Q5_K mins from Q8_K's bsums.
static inline __attribute__((always_inline)) void ch_up_rows_k_neon(const int kind, const int NR,
        const uint8_t * const * rows, size_t ts, const uint8_t * xq, int64_t nsb, float * sums) {
    float32x4_t acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        acc[r] = vdupq_n_f32(0.0f);
        corr[r] = 0.0f;
    }
    const int32x4_t z = vdupq_n_s32(0);
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t * xb = xq + b * 292; // block_q8_K: float d, int8 qs[256], int16 bsums[16]
        float dx;
        memcpy(&dx, xb, 4);
        const int8_t * x8 = (const int8_t *) (xb + 4);
        const int16_t * bsums = (const int16_t *) (xb + 260);
        CH_UNROLL
        for (int r = 0; r < NR; r++) {
            const uint8_t * sb = rows[r] + b * ts;
            int32x4_t isum = z;
            int8x16_t lo, hi;
            float d;
            if (kind == CH_NQ4_K || kind == CH_NQ5_K) {
                int ioff = 0;
                for (int j = 0; j < 8; j++) {
                    int sc, m;
                    ch_neon_q4k_scale_min(sb + 4, j, &sc, &m);
                    ioff += m * (bsums[2 * j] + bsums[2 * j + 1]);
                    ch_neon_k_levels(kind, sb, j, &lo, &hi);
                    const int32x4_t p = ch_neon_dot16(ch_neon_dot16(z, lo, vld1q_s8(x8 + 32 * j)), hi, vld1q_s8(x8 + 32 * j + 16));
                    isum = vmlaq_n_s32(isum, p, sc);
                }
                const ggml_fp16_t * hp = (const ggml_fp16_t *) sb;
                d = ch_h2f(hp[0]) * dx;
                corr[r] = fmaf(-ch_h2f(hp[1]) * dx, (float) ioff, corr[r]);
            } else {
                const int8_t * sc = (const int8_t *) (sb + 192);
                for (int j = 0; j < 8; j++) {
                    ch_neon_k_levels(kind, sb, j, &lo, &hi);
                    isum = vmlaq_n_s32(isum, ch_neon_dot16(z, lo, vld1q_s8(x8 + 32 * j)), sc[2 * j]);
                    isum = vmlaq_n_s32(isum, ch_neon_dot16(z, hi, vld1q_s8(x8 + 32 * j + 16)), sc[2 * j + 1]);
                }
                d = ch_h2f(*(const ggml_fp16_t *) (sb + 208)) * dx;
            }
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(isum), d);
        }
    }
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        sums[r] = vaddvq_f32(acc[r]) + corr[r];
    }
}

// s[k] = dot(W_up[kept[k]], x), CH_UP_ROWS kept rows per pass, whole rows prefetched
// CH_UP_PF_ROWS kept rows ahead (as the x86 route)
static inline __attribute__((always_inline)) void ch_up_neon_kind(const int kind, const char * w, size_t nb1,
        int64_t n_in, const int32_t * kept, int64_t nk, const void * xq_, float * s) {
    const uint8_t * xq = (const uint8_t *) xq_;
    const bool kq = kind == CH_NQ4_K || kind == CH_NQ5_K || kind == CH_NQ6_K;
    const size_t ts = kind == CH_NQ8_0 ? 34 : kind == CH_NQ4_0 ? 18 : kind == CH_NQ4_1 ? 20 :
                      kind == CH_NQ5_0 ? 22 : kind == CH_NQ5_1 ? 24 : kind == CH_NQ4_K ? 144 :
                      kind == CH_NQ5_K ? 176 : 210;
    const bool x1 = kind == CH_NQ4_1 || kind == CH_NQ5_1; // x in Q8_1 (36-byte blocks with s)
    const size_t xs_bytes = x1 ? 36 : 34;
    const int64_t nb = n_in / (kq ? 256 : 32);
    float * dx = NULL, * xs = NULL;
    if (!kq) { // per-block x scales (and Q8_1's s), once per call
        dx = ch_scratch(CH_BUF_DEQ, 2 * (size_t) nb * sizeof(float));
        xs = dx + nb;
        for (int64_t b = 0; b < nb; b++) {
            const ggml_fp16_t * hp = (const ggml_fp16_t *) (xq + b * xs_bytes);
            dx[b] = ch_h2f(hp[0]);
            xs[b] = x1 ? ch_h2f(hp[1]) : 0.0f;
        }
    }
    const size_t row_bytes = (size_t) nb * ts;
    for (int64_t k = 0; k < nk && k < CH_UP_PF_ROWS; k++) {
        ch_prefetch_bytes(w + (size_t) kept[k] * nb1, row_bytes);
    }
    int64_t k = 0;
    for (; k + CH_UP_ROWS <= nk; k += CH_UP_ROWS) {
        for (int r = 0; r < CH_UP_ROWS && k + CH_UP_PF_ROWS + r < nk; r++) {
            ch_prefetch_bytes(w + (size_t) kept[k + CH_UP_PF_ROWS + r] * nb1, row_bytes);
        }
        const uint8_t * rows[CH_UP_ROWS];
        for (int r = 0; r < CH_UP_ROWS; r++) rows[r] = (const uint8_t *) w + (size_t) kept[k + r] * nb1;
        if (kq) {
            ch_up_rows_k_neon(kind, CH_UP_ROWS, rows, ts, xq, nb, s + k);
        } else {
            ch_up_rows_neon(kind, CH_UP_ROWS, rows, ts, xq, xs_bytes, dx, xs, nb, s + k);
        }
    }
    for (; k < nk; k++) { // same per-row arithmetic as in a group: identical results
        const uint8_t * rows[1] = { (const uint8_t *) w + (size_t) kept[k] * nb1 };
        if (kq) {
            ch_up_rows_k_neon(kind, 1, rows, ts, xq, nb, s + k);
        } else {
            ch_up_rows_neon(kind, 1, rows, ts, xq, xs_bytes, dx, xs, nb, s + k);
        }
    }
}

#define CH_DEF_UP(name, kind) \
    static void name(const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk, const void * xq, \
                     float * s) { \
        ch_up_neon_kind(kind, w, nb1, n_in, kept, nk, xq, s); \
    }
CH_DEF_UP(ch_up_neon_q8_0, CH_NQ8_0)
CH_DEF_UP(ch_up_neon_q4_0, CH_NQ4_0)
CH_DEF_UP(ch_up_neon_q4_1, CH_NQ4_1)
CH_DEF_UP(ch_up_neon_q5_0, CH_NQ5_0)
CH_DEF_UP(ch_up_neon_q5_1, CH_NQ5_1)
CH_DEF_UP(ch_up_neon_q4_k, CH_NQ4_K)
CH_DEF_UP(ch_up_neon_q5_k, CH_NQ5_K)
CH_DEF_UP(ch_up_neon_q6_k, CH_NQ6_K)
#undef CH_DEF_UP

#if defined(__ARM_FEATURE_DOTPROD)
#define CH_NUPNAME(t) "dotprod-" t
#else
#define CH_NUPNAME(t) "neon-" t
#endif

// ---------------------------------------------------------------------------------------------
// input-sparse, transposed block rows

// ---- NEON fused dequantize + FMA on transposed rows: the AVX2 in kernels above, on aarch64 ----
// Per tile of CH_TILE_COLS outputs, per group of 4 active rows, each 32-block's levels (s8, from
// ch_neon_levels / ch_neon_k_levels) are widened to 8 x 4 floats and FMA'd with c*d into the
// block's 32 accumulators (8 q registers); Q4_1/Q5_1 mins and Q4_K mins become one bias per 32
// outputs, added at the end of the tile. Same values and order per output as the AVX2 route.

typedef struct { float32x4_t v[8]; } ch_nacc32;

static inline ch_nacc32 ch_nacc_load(const float * p) {
    ch_nacc32 a = { { vld1q_f32(p),      vld1q_f32(p + 4),  vld1q_f32(p + 8),  vld1q_f32(p + 12),
                      vld1q_f32(p + 16), vld1q_f32(p + 20), vld1q_f32(p + 24), vld1q_f32(p + 28) } };
    return a;
}

static inline void ch_nacc_store(float * p, ch_nacc32 a) {
    vst1q_f32(p,      a.v[0]);
    vst1q_f32(p + 4,  a.v[1]);
    vst1q_f32(p + 8,  a.v[2]);
    vst1q_f32(p + 12, a.v[3]);
    vst1q_f32(p + 16, a.v[4]);
    vst1q_f32(p + 20, a.v[5]);
    vst1q_f32(p + 24, a.v[6]);
    vst1q_f32(p + 28, a.v[7]);
}

// a[0..3] (16 floats) += cd * q[0..15]
static inline void ch_neon_fma16(float32x4_t * a, int8x16_t q, float cd) {
    const int16x8_t l = vmovl_s8(vget_low_s8(q)), h = vmovl_high_s8(q);
    a[0] = vfmaq_n_f32(a[0], vcvtq_f32_s32(vmovl_s16(vget_low_s16(l))), cd);
    a[1] = vfmaq_n_f32(a[1], vcvtq_f32_s32(vmovl_high_s16(l)), cd);
    a[2] = vfmaq_n_f32(a[2], vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), cd);
    a[3] = vfmaq_n_f32(a[3], vcvtq_f32_s32(vmovl_high_s16(h)), cd);
}

static inline void ch_neon_block_fma(int kind, const uint8_t * b, float c, ch_nacc32 * a, float * bias) {
    const ggml_fp16_t * hp = (const ggml_fp16_t *) b;
    int8x16_t lo, hi;
    ch_neon_levels(kind, b, &lo, &hi);
    const float cd = c * ch_h2f(hp[0]);
    ch_neon_fma16(a->v, lo, cd);
    ch_neon_fma16(a->v + 4, hi, cd);
    if (kind == CH_NQ4_1 || kind == CH_NQ5_1) {
        *bias = fmaf(c, ch_h2f(hp[1]), *bias);
    }
}

// adds bias[s] to the 32 outputs of block s, s < nb
static inline void ch_neon_add_bias(float * acc, const float * bias, int64_t nb) {
    for (int64_t s = 0; s < nb; s++) {
        const float32x4_t vb = vdupq_n_f32(bias[s]);
        for (int e = 0; e < 32; e += 4) {
            vst1q_f32(acc + 32 * s + e, vaddq_f32(vld1q_f32(acc + 32 * s + e), vb));
        }
    }
}

static inline __attribute__((always_inline)) void ch_in_neon_kind(const int kind, const char * w, size_t nb1, size_t ts,
        const int32_t * idx, const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const int64_t tile = CH_TILE_COLS;
    const bool has_m = kind == CH_NQ4_1 || kind == CH_NQ5_1;
    float * bias = has_m ? ch_scratch(CH_BUF_DEQ, (tile / 32) * sizeof(float)) : NULL;
    for (int64_t jt = j0; jt < j1; jt += tile) {
        const int64_t nt = j1 - jt < tile ? j1 - jt : tile; // whole blocks: rows are whole blocks
        const int64_t nb = nt / 32;
        const size_t  off = (size_t) (jt / 32) * ts;
        const int64_t pfr = ch_pf_rows((size_t) nb * ts);
        float * acc = y + jt;
        memset(acc, 0, (size_t) nt * sizeof(float));
        if (has_m) {
            memset(bias, 0, (size_t) nb * sizeof(float));
        }
        float bdummy = 0.0f;
        int64_t k = 0;
        for (; k + 4 <= na; k += 4) {
            const uint8_t * r0 = (const uint8_t *) w + (size_t) idx[k + 0] * nb1 + off;
            const uint8_t * r1 = (const uint8_t *) w + (size_t) idx[k + 1] * nb1 + off;
            const uint8_t * r2 = (const uint8_t *) w + (size_t) idx[k + 2] * nb1 + off;
            const uint8_t * r3 = (const uint8_t *) w + (size_t) idx[k + 3] * nb1 + off;
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : k; // as in ch_in_avx2_kind
            const char * p0 = w + (size_t) idx[kn + 0] * nb1 + off, * p1 = w + (size_t) idx[kn + 1] * nb1 + off;
            const char * p2 = w + (size_t) idx[kn + 2] * nb1 + off, * p3 = w + (size_t) idx[kn + 3] * nb1 + off;
            for (int64_t b = 0; b < nb; b++) {
                CH_PREFETCH(p0 + b * ts);
                CH_PREFETCH(p1 + b * ts);
                CH_PREFETCH(p2 + b * ts);
                CH_PREFETCH(p3 + b * ts);
                ch_nacc32 a = ch_nacc_load(acc + 32 * b);
                float * bb = has_m ? bias + b : &bdummy;
                ch_neon_block_fma(kind, r0 + b * ts, c[k + 0], &a, bb);
                ch_neon_block_fma(kind, r1 + b * ts, c[k + 1], &a, bb);
                ch_neon_block_fma(kind, r2 + b * ts, c[k + 2], &a, bb);
                ch_neon_block_fma(kind, r3 + b * ts, c[k + 3], &a, bb);
                ch_nacc_store(acc + 32 * b, a);
            }
        }
        for (; k < na; k++) {
            const uint8_t * r0 = (const uint8_t *) w + (size_t) idx[k] * nb1 + off;
            for (int64_t b = 0; b < nb; b++) {
                ch_nacc32 a = ch_nacc_load(acc + 32 * b);
                ch_neon_block_fma(kind, r0 + b * ts, c[k], &a, has_m ? bias + b : &bdummy);
                ch_nacc_store(acc + 32 * b, a);
            }
        }
        if (has_m) {
            ch_neon_add_bias(acc, bias, nb);
        }
    }
}

#define CH_DEF(name, kind) \
    static void name(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, \
                     int64_t na, float * y, int64_t j0, int64_t j1) { \
        ch_in_neon_kind(kind, w, nb1, ts, idx, c, na, y, j0, j1); \
    }
CH_DEF(ch_in_neon_q8_0, CH_NQ8_0)
CH_DEF(ch_in_neon_q4_0, CH_NQ4_0)
CH_DEF(ch_in_neon_q4_1, CH_NQ4_1)
CH_DEF(ch_in_neon_q5_0, CH_NQ5_0)
CH_DEF(ch_in_neon_q5_1, CH_NQ5_1)
#undef CH_DEF

// K-quant transposed rows (Q4_K, Q6_K): per super-block of 256 outputs and row, the scales are
// decoded once into per-half multipliers c*d*sc (as ch_k_mults), the sub-blocks then go through
// the same widen + FMA; Q4_K's mins become one bias per 32 outputs.
static inline void ch_neon_k_mults(int kind, const uint8_t * sb, float c, float mul[16], float off[8]) {
    if (kind == CH_NQ4_K) {
        const ggml_fp16_t * hp = (const ggml_fp16_t *) sb;
        const float d = c * ch_h2f(hp[0]), dm = -c * ch_h2f(hp[1]);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            ch_neon_q4k_scale_min(sb + 4, j, &sc, &m);
            mul[2 * j] = mul[2 * j + 1] = d * (float) sc;
            off[j] = dm * (float) m;
        }
    } else {
        const int8_t * sc = (const int8_t *) (sb + 192);
        const float d = c * ch_h2f(*(const ggml_fp16_t *) (sb + 208));
        for (int k = 0; k < 16; k++) {
            mul[k] = d * (float) sc[k];
        }
    }
}

static inline __attribute__((always_inline)) void ch_in_k_neon(const int kind, const char * w, size_t nb1,
        const int32_t * idx, const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const size_t ts = kind == CH_NQ4_K ? 144 : 210;
    const bool has_m = kind == CH_NQ4_K;
    const int64_t tile = CH_TILE_COLS; // a multiple of 256
    float * bias = ch_scratch(CH_BUF_DEQ, (tile / 32) * sizeof(float));
    for (int64_t jt = j0; jt < j1; jt += tile) {
        const int64_t nt = j1 - jt < tile ? j1 - jt : tile;
        const int64_t nsb = nt / 256;
        const size_t off = (size_t) (jt / 256) * ts;
        const int64_t pfr = ch_pf_rows((size_t) nsb * ts);
        float * acc = y + jt;
        memset(acc, 0, (size_t) nt * sizeof(float));
        memset(bias, 0, (size_t) (nt / 32) * sizeof(float));
        for (int64_t k = 0; k < na; k += 4) {
            const int nr = na - k < 4 ? (int) (na - k) : 4; // the last group may be short
            const uint8_t * r[4];
            for (int q = 0; q < nr; q++) r[q] = (const uint8_t *) w + (size_t) idx[k + q] * nb1 + off;
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : -1;
            for (int64_t b = 0; b < nsb; b++) {
                if (kn >= 0) {
                    for (int q = 0; q < 4; q++) ch_prefetch_bytes(w + (size_t) idx[kn + q] * nb1 + off + b * ts, ts);
                }
                float mul[4][16], offs[4][8];
                for (int q = 0; q < nr; q++) ch_neon_k_mults(kind, r[q] + b * ts, c[k + q], mul[q], offs[q]);
                for (int j = 0; j < 8; j++) {
                    float * ap = acc + 256 * b + 32 * j;
                    ch_nacc32 a = ch_nacc_load(ap);
                    for (int q = 0; q < nr; q++) {
                        int8x16_t lo, hi;
                        ch_neon_k_levels(kind, r[q] + b * ts, j, &lo, &hi);
                        ch_neon_fma16(a.v, lo, mul[q][2 * j]);
                        ch_neon_fma16(a.v + 4, hi, mul[q][2 * j + 1]);
                        if (has_m) bias[8 * b + j] += offs[q][j];
                    }
                    ch_nacc_store(ap, a);
                }
            }
        }
        if (has_m) {
            ch_neon_add_bias(acc, bias, nt / 32);
        }
    }
}

static void ch_in_neon_q4_k(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, int64_t na,
                            float * y, int64_t j0, int64_t j1) {
    (void) ts;
    ch_in_k_neon(CH_NQ4_K, w, nb1, idx, c, na, y, j0, j1);
}
static void ch_in_neon_q6_k(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, int64_t na,
                            float * y, int64_t j0, int64_t j1) {
    (void) ts;
    ch_in_k_neon(CH_NQ6_K, w, nb1, idx, c, na, y, j0, j1);
}

// ---- F32/F16/BF16 rows: fused convert + FMA, 8 columns per step, fmaf tail (same rounding) ----
enum { CH_NF32, CH_NF16, CH_NBF16 };

static inline void ch_neon_load8(int kind, const char * row, int64_t j, float32x4_t * lo, float32x4_t * hi) {
    if (kind == CH_NF32) {
        *lo = vld1q_f32((const float *) row + j);
        *hi = vld1q_f32((const float *) row + j + 4);
    } else if (kind == CH_NF16) {
        const float16x8_t h = vld1q_f16((const float16_t *) row + j);
        *lo = vcvt_f32_f16(vget_low_f16(h));
        *hi = vcvt_high_f32_f16(h);
    } else {
        const uint16x8_t u = vld1q_u16((const uint16_t *) row + j);
        *lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(u), 16));
        *hi = vreinterpretq_f32_u32(vshll_high_n_u16(u, 16));
    }
}

static inline float ch_neon_load1(int kind, const char * row, int64_t j) {
    if (kind == CH_NF32) {
        return ((const float *) row)[j];
    }
    const uint16_t u = ((const uint16_t *) row)[j];
    if (kind == CH_NF16) {
        return ch_h2f(u);
    }
    const uint32_t b = (uint32_t) u << 16;
    float f;
    memcpy(&f, &b, sizeof(f));
    return f;
}

static inline __attribute__((always_inline)) void ch_in_neon_fp(const int kind, const char * w, size_t nb1,
        const int32_t * idx, const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const int64_t tile = CH_TILE_COLS;
    const int64_t es = kind == CH_NF32 ? 4 : 2;
    for (int64_t jt = j0; jt < j1; jt += tile) {
        const int64_t je = j1 - jt < tile ? j1 : jt + tile;
        memset(y + jt, 0, (size_t) (je - jt) * sizeof(float));
        const int64_t pfr = ch_pf_rows((size_t) (je - jt) * es);
        int64_t k = 0;
        for (; k + 4 <= na; k += 4) {
            const char * r[4];
            for (int q = 0; q < 4; q++) r[q] = w + (size_t) idx[k + q] * nb1;
            const float c0 = c[k], c1 = c[k + 1], c2 = c[k + 2], c3 = c[k + 3];
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : k;
            const char * p0 = w + (size_t) idx[kn + 0] * nb1, * p1 = w + (size_t) idx[kn + 1] * nb1;
            const char * p2 = w + (size_t) idx[kn + 2] * nb1, * p3 = w + (size_t) idx[kn + 3] * nb1;
            int64_t j = jt;
            for (; j + 8 <= je; j += 8) {
                if (((j * es) & 63) < 8 * es) { // the 8 columns start a new cache line
                    CH_PREFETCH(p0 + j * es);
                    CH_PREFETCH(p1 + j * es);
                    CH_PREFETCH(p2 + j * es);
                    CH_PREFETCH(p3 + j * es);
                }
                float32x4_t a0 = vld1q_f32(y + j), a1 = vld1q_f32(y + j + 4), w0, w1;
                ch_neon_load8(kind, r[0], j, &w0, &w1);
                a0 = vfmaq_n_f32(a0, w0, c0);
                a1 = vfmaq_n_f32(a1, w1, c0);
                ch_neon_load8(kind, r[1], j, &w0, &w1);
                a0 = vfmaq_n_f32(a0, w0, c1);
                a1 = vfmaq_n_f32(a1, w1, c1);
                ch_neon_load8(kind, r[2], j, &w0, &w1);
                a0 = vfmaq_n_f32(a0, w0, c2);
                a1 = vfmaq_n_f32(a1, w1, c2);
                ch_neon_load8(kind, r[3], j, &w0, &w1);
                a0 = vfmaq_n_f32(a0, w0, c3);
                a1 = vfmaq_n_f32(a1, w1, c3);
                vst1q_f32(y + j, a0);
                vst1q_f32(y + j + 4, a1);
            }
            for (; j < je; j++) {
                float a = y[j];
                a = fmaf(c0, ch_neon_load1(kind, r[0], j), a);
                a = fmaf(c1, ch_neon_load1(kind, r[1], j), a);
                a = fmaf(c2, ch_neon_load1(kind, r[2], j), a);
                a = fmaf(c3, ch_neon_load1(kind, r[3], j), a);
                y[j] = a;
            }
        }
        for (; k < na; k++) {
            const char * r0 = w + (size_t) idx[k] * nb1;
            int64_t j = jt;
            for (; j + 8 <= je; j += 8) {
                float32x4_t w0, w1;
                ch_neon_load8(kind, r0, j, &w0, &w1);
                vst1q_f32(y + j,     vfmaq_n_f32(vld1q_f32(y + j),     w0, c[k]));
                vst1q_f32(y + j + 4, vfmaq_n_f32(vld1q_f32(y + j + 4), w1, c[k]));
            }
            for (; j < je; j++) {
                y[j] = fmaf(c[k], ch_neon_load1(kind, r0, j), y[j]);
            }
        }
    }
}

#define CH_DEF_FP(name, kind) \
    static void name(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, \
                     int64_t na, float * y, int64_t j0, int64_t j1) { \
        (void) ts; \
        ch_in_neon_fp(kind, w, nb1, idx, c, na, y, j0, j1); \
    }
CH_DEF_FP(ch_in_neon_f32,  CH_NF32)
CH_DEF_FP(ch_in_neon_f16,  CH_NF16)
CH_DEF_FP(ch_in_neon_bf16, CH_NBF16)
#undef CH_DEF_FP

// ---------------------------------------------------------------------------------------------
// x4 with 8-bit activations (the plan: chess-kernels-impl.h): per tile, per group with active
// inputs, per 32 columns, per segment: each channel's 16 code bytes split into nibbles and
// multiplied by its u with widening multiply-accumulates (smlal) into 4 int16 accumulators
// (columns 0-7, 8-15, 16-23, 24-31), then widened, scaled by a_j * s and added to y as on x86.

CH_INLINE void ch_x4n_flush8(float * y, const ggml_fp16_t * a, const ggml_fp16_t * b, int16x8_t t, float s, float sU,
                             bool last) {
    const float16x8_t a8 = vld1q_f16((const float16_t *) a);
    const float32x4_t t0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(t))), t1 = vcvtq_f32_s32(vmovl_high_s16(t));
    float32x4_t y0 = vld1q_f32(y), y1 = vld1q_f32(y + 4);
    if (last) {
        const float16x8_t b8 = vld1q_f16((const float16_t *) b);
        y0 = vfmaq_n_f32(y0, vcvt_f32_f16(vget_low_f16(b8)), sU);
        y1 = vfmaq_n_f32(y1, vcvt_high_f32_f16(b8), sU);
    }
    vst1q_f32(y,     vfmaq_f32(y0, vmulq_n_f32(vcvt_f32_f16(vget_low_f16(a8)), s), t0));
    vst1q_f32(y + 4, vfmaq_f32(y1, vmulq_n_f32(vcvt_high_f32_f16(a8), s), t1));
}

CH_INLINE void ch_x4n_mla(int16x8_t * A, const uint8_t * r, int8_t u) {
    const uint8x16_t q = vld1q_u8(r);
    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), hi = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
    const int8x16_t uv = vdupq_n_s8(u);
    A[0] = vmlal_s8(A[0], vget_low_s8(lo), vget_low_s8(uv));
    A[1] = vmlal_high_s8(A[1], lo, uv);
    A[2] = vmlal_s8(A[2], vget_low_s8(hi), vget_low_s8(uv));
    A[3] = vmlal_high_s8(A[3], hi, uv);
}

static void ch_x4_neon(const char * w, size_t nb1, int64_t n_out, const ch_x4_plan * pl, float * y,
                       int64_t j0, int64_t j1) {
    const size_t cs = (size_t) n_out / 2;
    for (int64_t jt = j0; jt < j1; jt += CH_TILE_COLS) {
        const int64_t nt = j1 - jt < CH_TILE_COLS ? j1 - jt : CH_TILE_COLS;
        memset(y + jt, 0, (size_t) nt * sizeof(float));
        for (int64_t e = 0; e < pl->ng; e++) {
            const ch_x4_group * G = &pl->grp[e];
            const ch_x4_pair  * P = &pl->pair[G->p0];
            const char * row = w + (size_t) G->g * nb1;
            const uint8_t * codes = (const uint8_t *) row + 4 * n_out + jt / 2;
            const ggml_fp16_t * a = (const ggml_fp16_t *) row + jt, * b = a + n_out;
            const size_t gbytes = (size_t) G->np * (size_t) nt + 4 * (size_t) nt; // as on x86
            const int64_t en = e + 1 + (int64_t) (CH_PF_BYTES / gbytes);
            if (en < pl->ng) {
                const ch_x4_group * Gn = &pl->grp[en];
                const char * nrow = w + (size_t) Gn->g * nb1;
                for (int32_t p = 0; p < Gn->np; p++) {
                    const ch_x4_pair * Q = &pl->pair[Gn->p0 + p];
                    ch_prefetch_bytes(nrow + 4 * n_out + jt / 2 + Q->ca * cs, (size_t) nt / 2);
                    ch_prefetch_bytes(nrow + 4 * n_out + jt / 2 + Q->cb * cs, (size_t) nt / 2);
                }
                ch_prefetch_bytes(nrow + 2 * jt, 2 * (size_t) nt);
                ch_prefetch_bytes(nrow + 2 * (n_out + jt), 2 * (size_t) nt);
            }
            const float s = G->s, sU = G->s * (float) G->U;
            for (int64_t jc = 0; jc < nt; jc += 32) {
                int32_t p = 0;
                for (int32_t k = 0; k < G->nseg; k++) {
                    int16x8_t A[4] = { vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0) };
                    for (; p < G->seg[k]; p++) {
                        ch_x4n_mla(A, codes + P[p].ca * cs + jc / 2, P[p].ua);
                        if (P[p].cb != P[p].ca) {
                            ch_x4n_mla(A, codes + P[p].cb * cs + jc / 2, P[p].ub);
                        }
                    }
                    const bool last = k == G->nseg - 1;
                    for (int q = 0; q < 4; q++) {
                        ch_x4n_flush8(y + jt + jc + 8 * q, a + jc + 8 * q, b + jc + 8 * q, A[q], s, sU, last);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// routes

int64_t ch_active_isa(const float * v, const float * thr, int64_t n_thr, int64_t n, int32_t * idx, float * c) {
    int64_t na = 0;
    for (int64_t i = 0; i < n; i++) {
        const float vi = v[i];
        if (vi != 0.0f && (!thr || fabsf(vi) >= ch_thr(thr, n_thr, i))) {
            idx[na] = (int32_t) i;
            c[na++] = vi;
        }
    }
    return na;
}

ch_up_fn ch_up_route_isa(enum ggml_type type, const char ** name) {
    switch (type) {
        case GGML_TYPE_Q8_0: *name = CH_NUPNAME("q8_0"); return ch_up_neon_q8_0;
        case GGML_TYPE_Q4_0: *name = CH_NUPNAME("q4_0"); return ch_up_neon_q4_0;
        case GGML_TYPE_Q4_1: *name = CH_NUPNAME("q4_1"); return ch_up_neon_q4_1;
        case GGML_TYPE_Q5_0: *name = CH_NUPNAME("q5_0"); return ch_up_neon_q5_0;
        case GGML_TYPE_Q5_1: *name = CH_NUPNAME("q5_1"); return ch_up_neon_q5_1;
        case GGML_TYPE_Q4_K: *name = CH_NUPNAME("q4_K"); return ch_up_neon_q4_k;
        case GGML_TYPE_Q5_K: *name = CH_NUPNAME("q5_K"); return ch_up_neon_q5_k;
        case GGML_TYPE_Q6_K: *name = CH_NUPNAME("q6_K"); return ch_up_neon_q6_k;
        default: return NULL;
    }
}

ch_in_fn ch_in_route_isa(enum ggml_type type, const char ** name) {
    switch (type) {
        case GGML_TYPE_F32:  *name = "neon-f32";  return ch_in_neon_f32;
        case GGML_TYPE_F16:  *name = "neon-f16";  return ch_in_neon_f16;
        case GGML_TYPE_BF16: *name = "neon-bf16"; return ch_in_neon_bf16;
        case GGML_TYPE_Q8_0: *name = "neon-q8_0"; return ch_in_neon_q8_0;
        case GGML_TYPE_Q4_0: *name = "neon-q4_0"; return ch_in_neon_q4_0;
        case GGML_TYPE_Q4_1: *name = "neon-q4_1"; return ch_in_neon_q4_1;
        case GGML_TYPE_Q5_0: *name = "neon-q5_0"; return ch_in_neon_q5_0;
        case GGML_TYPE_Q5_1: *name = "neon-q5_1"; return ch_in_neon_q5_1;
        case GGML_TYPE_Q4_K: *name = "neon-q4_K"; return ch_in_neon_q4_k;
        case GGML_TYPE_Q6_K: *name = "neon-q6_K"; return ch_in_neon_q6_k;
        default: return NULL;
    }
}

ch_x4_fn ch_x4_route_isa(const char ** name) {
    *name = "neon-x4";
    return ch_x4_neon;
}
#endif // CHESS_NEON
