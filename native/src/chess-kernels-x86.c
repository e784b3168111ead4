// x86 fast routes of the CHESS kernels (AVX2 + FMA + F16C; a few AVX-512 refinements where the
// compiler targets it): multi-row integer dots for the output-sparse up kernel, fused decode + FMA
// for transposed block rows, and the integer x4 kernel. Dispatch is in chess-kernels.c.
#include "chess-kernels-impl.h"

#if defined(CHESS_AVX2)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CHESS_AVX512 1
#endif

// 16 bytes of nibbles -> 32 bytes: element e < 16 is the low nibble of byte e, e >= 16 the high
static inline __m256i ch_nibbles(const uint8_t * qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *) qs);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// 32 bits -> 32 bytes, byte e = 0x10 if bit e is set (the 5th bit of Q5 levels)
static inline __m256i ch_bits_0x10(const uint8_t * qh4) {
    uint32_t u;
    memcpy(&u, qh4, 4);
    const __m256i sel = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                          0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i bit = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32((int) u), sel); // byte e = byte e/8 of u
    x = _mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit);
    return _mm256_and_si256(x, _mm256_set1_epi8(0x10));
}


// ---------------------------------------------------------------------------------------------
// output-sparse up projection: s[k] = dot(W_up[kept[k]], x), CH_UP_ROWS kept rows per pass (each
// x load serves 4 rows, 4 independent accumulator chains), integer dots on ggml's 8-bit x
// (Q8_0 / Q8_1 / Q8_K as the type's vec_dot_type), the rows 8 kept rows ahead prefetched a line at a
// time as the pass advances (a burst of whole-row prefetches stalls the core, see ch_pf_list).
// Measured against ggml's dense mul_mat on the same weights: docs/kernels.md.
#define CH_UP_ROWS 4

enum { CH_UQ8_0, CH_UQ4_0, CH_UQ4_1, CH_UQ5_0, CH_UQ5_1, CH_UQ4_K, CH_UQ5_K, CH_UQ6_K };

static inline float ch_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int ch_hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// 8 int32 partial sums of w (u8) * x (s8), pairs of products within int16 (|w| <= 127, |x| <= 127)
static inline __m256i ch_dot_u8s8(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// ---- Q4_0, Q4_1, Q5_0, Q5_1: two blocks per step. x is rearranged once per call so that one
// register holds elements 0..15 of two consecutive blocks and another their elements 16..31, which
// is how the blocks' nibbles come out of one 16+16-byte load: 2 maddubs per 64 weights, and the two
// blocks' scales applied by one vector multiply. Offsets: Q4_0/Q5_0's zero point as -8/-16 * sum(x)
// per block in the integer sums, Q4_1/Q5_1's min times Q8_1's stored d*sum(x) in float.
typedef struct {
    __m256i x0, x1; // [b0 0..15 | b1 0..15], [b0 16..31 | b1 16..31] (s8)
    __m256  dx;     // [d_x b0 x4 | d_x b1 x4]
    __m256i z;      // Q4_0/Q5_0: [-z*sum b0, 0, 0, 0 | -z*sum b1, 0, 0, 0] (int32)
    __m256  xs;     // Q4_1/Q5_1: [s b0, 0, 0, 0 | s b1, 0, 0, 0]
} ch_upx2;

// x prepared for ch_up_rows2: nb blocks (an odd last block gets a zero partner)
static const ch_upx2 * ch_upx2_prepare(int kind, const uint8_t * xq, int64_t nb) {
    const bool x1 = kind == CH_UQ4_1 || kind == CH_UQ5_1;
    const size_t xb = x1 ? 36 : 34;
    const int zp = kind == CH_UQ4_0 ? 8 : kind == CH_UQ5_0 ? 16 : 0;
    ch_upx2 * X = ch_scratch(CH_BUF_DEQ, (size_t) ((nb + 1) / 2) * sizeof(ch_upx2));
    for (int64_t p = 0; p < (nb + 1) / 2; p++) {
        float d[2] = { 0, 0 }, s[2] = { 0, 0 };
        int32_t z[2] = { 0, 0 };
        int8_t q[2][32];
        for (int h = 0; h < 2; h++) {
            const int64_t b = 2 * p + h;
            if (b >= nb) {
                memset(q[h], 0, 32);
                continue;
            }
            const uint8_t * blk = xq + b * xb;
            d[h] = ch_h2f(((const ggml_fp16_t *) blk)[0]);
            s[h] = x1 ? ch_h2f(((const ggml_fp16_t *) blk)[1]) : 0.0f;
            memcpy(q[h], blk + (x1 ? 4 : 2), 32);
            int32_t sum = 0;
            for (int e = 0; e < 32; e++) sum += q[h][e];
            z[h] = -zp * sum;
        }
        X[p].x0 = _mm256_set_m128i(_mm_loadu_si128((const __m128i *) q[1]), _mm_loadu_si128((const __m128i *) q[0]));
        X[p].x1 = _mm256_set_m128i(_mm_loadu_si128((const __m128i *) (q[1] + 16)), _mm_loadu_si128((const __m128i *) (q[0] + 16)));
        X[p].dx = _mm256_setr_ps(d[0], d[0], d[0], d[0], d[1], d[1], d[1], d[1]);
        X[p].z  = _mm256_setr_epi32(z[0], 0, 0, 0, z[1], 0, 0, 0);
        X[p].xs = _mm256_setr_ps(s[0], 0, 0, 0, s[1], 0, 0, 0);
    }
    return X;
}

// the 5th bits of elements 0..15 (lo) and 16..31 (hi) of two Q5 blocks, as 0x10 bytes in the
// lanes [b0 | b1] of the nibble registers
static inline void ch_q5_hbits2(const uint8_t * qh0, const uint8_t * qh1, __m256i * lo, __m256i * hi) {
    uint32_t h0, h1;
    memcpy(&h0, qh0, 4);
    memcpy(&h1, qh1, 4);
    const uint32_t l = (h0 & 0xFFFF) | (h1 << 16), u = (h0 >> 16) | (h1 & 0xFFFF0000u);
    *lo = ch_bits_0x10((const uint8_t *) &l);
    *hi = ch_bits_0x10((const uint8_t *) &u);
}

CH_INLINE void ch_up_rows2(const int kind, const int NR, const uint8_t * const * rows, const uint8_t * const * ahead,
                           int64_t nb, const ch_upx2 * X, float * sums) {
    const size_t ts = kind == CH_UQ4_0 ? 18 : kind == CH_UQ4_1 ? 20 : kind == CH_UQ5_0 ? 22 : 24;
    const int qo = kind == CH_UQ4_0 ? 2 : kind == CH_UQ4_1 ? 4 : kind == CH_UQ5_0 ? 6 : 8; // qs in the block
    const bool has_m = kind == CH_UQ4_1 || kind == CH_UQ5_1, has_z = kind == CH_UQ4_0 || kind == CH_UQ5_0;
    const bool q5 = kind == CH_UQ5_0 || kind == CH_UQ5_1;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i dsel = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), msel = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
    __m256 acc[CH_UP_ROWS], accm[CH_UP_ROWS];
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm256_setzero_ps();
        accm[r] = _mm256_setzero_ps();
    }
    const int64_t np = nb / 2;
    for (int64_t p = 0; p <= np; p++) {
        const bool tail = p == np; // an odd last block: its partner is itself, with x = 0
        if (tail && nb % 2 == 0) break;
        const ch_upx2 * xp = X + p;
        for (int r = 0; r < NR; r++) {
            const uint8_t * b0 = rows[r] + 2 * p * ts, * b1 = tail ? b0 : b0 + ts;
            if (ahead) CH_PREFETCH(ahead[r] + 2 * p * ts);
            const __m256i wr = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) (b0 + qo))),
                                                       _mm_loadu_si128((const __m128i *) (b1 + qo)), 1);
            __m256i lo = _mm256_and_si256(wr, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wr, 4), m4);
            if (q5) {
                __m256i hl, hh;
                ch_q5_hbits2(b0 + qo - 4, b1 + qo - 4, &hl, &hh);
                lo = _mm256_or_si256(lo, hl);
                hi = _mm256_or_si256(hi, hh);
            }
            // |q| <= 31, |x| <= 127: each int16 pair sum <= 7874, two of them added <= 15748
            __m256i i32 = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xp->x0), _mm256_maddubs_epi16(hi, xp->x1)), ones);
            if (has_z) i32 = _mm256_add_epi32(i32, xp->z);
            // the blocks' (d, m) (or d and the first code bytes, unused): [d0, m0, d1, m1] as floats
            uint32_t u0, u1;
            memcpy(&u0, b0, 4);
            memcpy(&u1, b1, 4);
            const __m256 dm = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_set_epi32(0, 0, (int) u1, (int) u0)));
            const __m256 dw = _mm256_permutevar8x32_ps(dm, dsel);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(dw, xp->dx), acc[r]);
            if (has_m) accm[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dm, msel), xp->xs, accm[r]);
        }
    }
    for (int r = 0; r < NR; r++) {
        sums[r] = ch_hsum8(has_m ? _mm256_add_ps(acc[r], accm[r]) : acc[r]);
    }
}

// ---- Q8_0: one block per step, the sign trick (|w| times x * sign(w)); scale per block ----
CH_INLINE void ch_up_rows_q8(const int NR, const uint8_t * const * rows, const uint8_t * const * ahead, int64_t nb,
                             const uint8_t * xq, float * sums) {
    __m256 acc[CH_UP_ROWS];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *) (xq + b * 34 + 2));
        const float dx = ch_h2f(*(const ggml_fp16_t *) (xq + b * 34));
        for (int r = 0; r < NR; r++) {
            const uint8_t * wb = rows[r] + b * 34;
            if (ahead) CH_PREFETCH(ahead[r] + b * 34);
            const __m256i w = _mm256_loadu_si256((const __m256i *) (wb + 2));
            const __m256i p = ch_dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ch_h2f(*(const ggml_fp16_t *) wb) * dx), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) sums[r] = ch_hsum8(acc[r]);
}

// ---- K-quants (256-element super-blocks, x in Q8_K: float d, int8 qs[256], int16 bsums[16]) ----
// Per row and super-block, sum_k sc_k * dot(q_k, x_k) accumulated in int32 (maddubs pairs, then
// madd by the sub-block's scale broadcast from one register), scaled once by d * d_x; Q4_K/Q5_K
// mins and Q6_K's -32 through Q8_K's per-16 sums of x.

// 6-bit scale and min of sub-block j of a Q4_K super-block (ggml's packing; the in kernels use it)
static inline void ch_q4k_scale_min(const uint8_t * q, int j, int * sc, int * m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m  = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m  = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// all 8 scales and mins of a Q4_K/Q5_K super-block as int16: [sc0..sc7 | m0..m7]
static inline __m256i ch_q4k_scales16(const uint8_t * s12) {
    uint32_t u[4];
    memcpy(u, s12, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t a = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = a;
    u[0] &= m1;
    return _mm256_cvtepu8_epi16(_mm_set_epi32((int) u[3], (int) u[2], (int) u[1], (int) u[0]));
}

// shuffle masks: int16 element a of a 128-bit lane into every int16 lane of the low lane, b of the high
#define CH_H8(k) 2*(k), 2*(k)+1, 2*(k), 2*(k)+1, 2*(k), 2*(k)+1, 2*(k), 2*(k)+1, \
                 2*(k), 2*(k)+1, 2*(k), 2*(k)+1, 2*(k), 2*(k)+1, 2*(k), 2*(k)+1
static const uint8_t ch_bcast16[8][32] = { // element k in both lanes (Q4_K/Q5_K: one scale per 32)
    { CH_H8(0), CH_H8(0) }, { CH_H8(1), CH_H8(1) }, { CH_H8(2), CH_H8(2) }, { CH_H8(3), CH_H8(3) },
    { CH_H8(4), CH_H8(4) }, { CH_H8(5), CH_H8(5) }, { CH_H8(6), CH_H8(6) }, { CH_H8(7), CH_H8(7) },
};
static const uint8_t ch_bcast16x2[4][32] = { // elements 2j, 2j+1 (Q6_K: one scale per 16)
    { CH_H8(0), CH_H8(1) }, { CH_H8(2), CH_H8(3) }, { CH_H8(4), CH_H8(5) }, { CH_H8(6), CH_H8(7) },
};
#undef CH_H8

// 32 u8 levels of sub-block s (elements 32s..32s+31 of the super-block) of Q4_K or Q6_K (0..63, the
// -32 of Q6_K is in the offset term)
static inline __m256i ch_k_levels(int kind, const uint8_t * sb, int s) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    if (kind == CH_UQ4_K) {
        const __m256i q = _mm256_loadu_si256((const __m256i *) (sb + 16 + 32 * (s / 2))); // qs after d, dmin, scales[12]
        return (s & 1) ? _mm256_and_si256(_mm256_srli_epi16(q, 4), m4) : _mm256_and_si256(q, m4);
    }
    const int n = s / 4, r = s % 4; // Q6_K: ql[128] qh[64] scales[16] d
    const __m256i ql = _mm256_loadu_si256((const __m256i *) (sb + 64 * n + 32 * (r & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *) (sb + 128 + 32 * n));
    const __m256i lo = r < 2 ? _mm256_and_si256(ql, m4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4);
    const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * r), 4), _mm256_set1_epi8(0x30));
    return _mm256_or_si256(lo, hi);
}

CH_INLINE void ch_up_rows_k(const int kind, const int NR, const uint8_t * const * rows, const uint8_t * const * ahead,
                            int64_t nsb, const uint8_t * xq, float * sums) {
    const size_t ts = kind == CH_UQ4_K ? 144 : kind == CH_UQ5_K ? 176 : 210;
    const __m256i m4 = _mm256_set1_epi8(0x0F), h10 = _mm256_set1_epi8(0x10);
    __m256 acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm256_setzero_ps();
        corr[r] = 0.0f;
    }
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t * xb = xq + b * 292;
        float dx;
        memcpy(&dx, xb, 4);
        const int8_t * x8 = (const int8_t *) (xb + 4);
        const __m256i bs = _mm256_loadu_si256((const __m256i *) (xb + 260)); // int16 bsums[16]
        // Q4_K/Q5_K: per 32-element sums (pairs of bsums) in int16 lanes 0..7
        const __m128i bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
        for (int r = 0; r < NR; r++) {
            const uint8_t * sb = rows[r] + b * ts;
            if (ahead) {
                for (size_t o = 0; o < ts; o += 64) CH_PREFETCH(ahead[r] + b * ts + o);
            }
            __m256i isum = _mm256_setzero_si256();
            if (kind == CH_UQ6_K) {
                const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) (sb + 192)));
                const int ioff = -32 * ch_hsum8i(_mm256_madd_epi16(sc16, bs));
                const __m256i slo = _mm256_permute4x64_epi64(sc16, 0x44), shi = _mm256_permute4x64_epi64(sc16, 0xEE);
                for (int j = 0; j < 8; j++) {
                    // int16 lanes 0-7 are elements 0-15 (scale 2j), lanes 8-15 elements 16-31 (scale 2j+1)
                    const __m256i scv = _mm256_shuffle_epi8(j < 4 ? slo : shi, _mm256_loadu_si256((const __m256i *) ch_bcast16x2[j % 4]));
                    const __m256i p = _mm256_maddubs_epi16(ch_k_levels(CH_UQ6_K, sb, j), _mm256_loadu_si256((const __m256i *) (x8 + 32 * j)));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, scv));
                }
                const float d = ch_h2f(*(const ggml_fp16_t *) (sb + 208)) * dx;
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc[r]);
                corr[r] = CH_FMA(d, (float) ioff, corr[r]);
            } else {
                const bool q5 = kind == CH_UQ5_K;
                const __m256i s16 = ch_q4k_scales16(sb + 4);
                __m128i mm = _mm_madd_epi16(_mm256_extracti128_si256(s16, 1), bs32);
                mm = _mm_add_epi32(mm, _mm_shuffle_epi32(mm, 0x4E));
                const int imin = _mm_cvtsi128_si32(_mm_add_epi32(mm, _mm_shuffle_epi32(mm, 0xB1)));
                const __m256i sc = _mm256_permute2x128_si256(s16, s16, 0x00);
                const uint8_t * qs = sb + (q5 ? 48 : 16);
                const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *) (sb + 16)) : _mm256_setzero_si256();
                for (int j = 0; j < 4; j++) {
                    const __m256i q = _mm256_loadu_si256((const __m256i *) (qs + 32 * j));
                    __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    if (q5) { // bits 2j and 2j+1 of qh[e] are the 5th bits of element e of sub-blocks 2j, 2j+1
                        const __m256i hl = 2 * j <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * j) : _mm256_srli_epi16(qh, 2 * j - 4);
                        const __m256i hh = 2 * j + 1 <= 4 ? _mm256_slli_epi16(qh, 3 - 2 * j) : _mm256_srli_epi16(qh, 2 * j - 3);
                        lo = _mm256_or_si256(lo, _mm256_and_si256(hl, h10));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(hh, h10));
                    }
                    const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *) (x8 + 64 * j)));
                    const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *) (x8 + 64 * j + 32)));
                    const __m256i sl = _mm256_shuffle_epi8(sc, _mm256_loadu_si256((const __m256i *) ch_bcast16[2 * j]));
                    const __m256i sh = _mm256_shuffle_epi8(sc, _mm256_loadu_si256((const __m256i *) ch_bcast16[2 * j + 1]));
                    isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_madd_epi16(pl, sl), _mm256_madd_epi16(ph, sh)));
                }
                const ggml_fp16_t * hp = (const ggml_fp16_t *) sb;
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(ch_h2f(hp[0]) * dx), acc[r]);
                corr[r] = CH_FMA(-ch_h2f(hp[1]) * dx, (float) imin, corr[r]);
            }
        }
    }
    for (int r = 0; r < NR; r++) sums[r] = ch_hsum8(acc[r]) + corr[r];
}

// The driver: CH_UP_ROWS kept rows per pass, then the tail row by row (same per-row arithmetic, so
// grouping never changes a result); the rows CH_UP_PF_ROWS kept rows ahead are prefetched by the pass.
CH_INLINE void ch_up_drive(const int kind, const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk,
                           const void * xq, float * s) {
    const bool k = kind >= CH_UQ4_K;
    const int64_t nb = n_in / (k ? 256 : 32);
    const ch_upx2 * X = kind != CH_UQ8_0 && !k ? ch_upx2_prepare(kind, (const uint8_t *) xq, nb) : NULL;
    const size_t ts = kind == CH_UQ8_0 ? 34 : kind == CH_UQ4_0 ? 18 : kind == CH_UQ4_1 ? 20 : kind == CH_UQ5_0 ? 22 :
                      kind == CH_UQ5_1 ? 24 : kind == CH_UQ4_K ? 144 : kind == CH_UQ5_K ? 176 : 210;
    for (int64_t q = 0; q < nk && q < CH_UP_PF_ROWS; q++) { // the first rows: nothing runs ahead of them
        ch_prefetch_bytes(w + (size_t) kept[q] * nb1, (size_t) nb * ts);
    }
    for (int64_t i = 0; i < nk; ) {
        const int nr = nk - i >= CH_UP_ROWS ? CH_UP_ROWS : 1;
        const uint8_t * rows[CH_UP_ROWS], * ahead[CH_UP_ROWS];
        const bool pf = i + CH_UP_PF_ROWS + nr <= nk;
        for (int r = 0; r < nr; r++) {
            rows[r] = (const uint8_t *) w + (size_t) kept[i + r] * nb1;
            ahead[r] = pf ? (const uint8_t *) w + (size_t) kept[i + CH_UP_PF_ROWS + r] * nb1 : NULL;
        }
#define CH_UP_CALL(NR) \
        if (kind == CH_UQ8_0)  ch_up_rows_q8(NR, rows, pf ? ahead : NULL, nb, (const uint8_t *) xq, s + i); \
        else if (k)            ch_up_rows_k(kind, NR, rows, pf ? ahead : NULL, nb, (const uint8_t *) xq, s + i); \
        else                   ch_up_rows2(kind, NR, rows, pf ? ahead : NULL, nb, X, s + i);
        if (nr == CH_UP_ROWS) {
            CH_UP_CALL(CH_UP_ROWS)
        } else {
            CH_UP_CALL(1)
        }
#undef CH_UP_CALL
        i += nr;
    }
}

#define CH_DEF_UP(name, kind) \
    static void name(const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk, const void * xq, \
                     float * s) { \
        ch_up_drive(kind, w, nb1, n_in, kept, nk, xq, s); \
    }
CH_DEF_UP(ch_up_q8_0, CH_UQ8_0)
CH_DEF_UP(ch_up_q4_0, CH_UQ4_0)
CH_DEF_UP(ch_up_q4_1, CH_UQ4_1)
CH_DEF_UP(ch_up_q5_0, CH_UQ5_0)
CH_DEF_UP(ch_up_q5_1, CH_UQ5_1)
CH_DEF_UP(ch_up_q4_k, CH_UQ4_K)
CH_DEF_UP(ch_up_q5_k, CH_UQ5_K)
CH_DEF_UP(ch_up_q6_k, CH_UQ6_K)
#undef CH_DEF_UP

// ---------------------------------------------------------------------------------------------
// input-sparse, transposed block rows

// ---- AVX2 fused dequantize + FMA for the 32-element block types --------------------------------
// Each block is decoded to 32 integer levels q (as 4 x 8 floats) plus a scale d and an offset m,
// weight = d*q + m. y accumulates (c*d)*q by FMA; sum(c*m) is one scalar per block, added at
// the end of the tile (exact algebra; only the rounding order differs from the reference).

// 32 int8 -> 4 x 8 float
static inline void ch_i8x32_to_ps(__m256i q, __m256 f[4]) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
}

#define CH_Q8_0  0
#define CH_Q4_0  1
#define CH_Q4_1  2
#define CH_Q5_0  3
#define CH_Q5_1  4

// decode one block: levels into f[4], returns scale, *m = offset (0 for symmetric types)
static inline float ch_decode(int kind, const uint8_t * b, __m256 f[4], float * m) {
    const ggml_fp16_t * hp = (const ggml_fp16_t *) b;
    switch (kind) {
        case CH_Q8_0: {
            const int8_t * qs = (const int8_t *) (b + 2);
            f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (qs +  0))));
            f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (qs +  8))));
            f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (qs + 16))));
            f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (qs + 24))));
            *m = 0.0f;
            return ch_h2f(hp[0]);
        }
        case CH_Q4_0:
            ch_i8x32_to_ps(_mm256_sub_epi8(ch_nibbles(b + 2), _mm256_set1_epi8(8)), f);
            *m = 0.0f;
            return ch_h2f(hp[0]);
        case CH_Q4_1:
            ch_i8x32_to_ps(ch_nibbles(b + 4), f); // levels 0..15: fine as signed bytes
            *m = ch_h2f(hp[1]);
            return ch_h2f(hp[0]);
        case CH_Q5_0:
            ch_i8x32_to_ps(_mm256_sub_epi8(_mm256_or_si256(ch_nibbles(b + 6), ch_bits_0x10(b + 2)),
                                           _mm256_set1_epi8(16)), f);
            *m = 0.0f;
            return ch_h2f(hp[0]);
        default: // CH_Q5_1
            ch_i8x32_to_ps(_mm256_or_si256(ch_nibbles(b + 8), ch_bits_0x10(b + 4)), f);
            *m = ch_h2f(hp[1]);
            return ch_h2f(hp[0]);
    }
}

// The 32 accumulators of one block: 4 ymm, or 2 zmm when AVX-512 is there (half the
// conversion and FMA instructions per block; measured ~1.3x on Zen 4 for Q4_0).
#if defined(CHESS_AVX512)
typedef struct { __m512 v[2]; } ch_acc32;

static inline ch_acc32 ch_acc_load(const float * p) {
    ch_acc32 a = { { _mm512_loadu_ps(p), _mm512_loadu_ps(p + 16) } };
    return a;
}

static inline void ch_acc_store(float * p, ch_acc32 a) {
    _mm512_storeu_ps(p, a.v[0]);
    _mm512_storeu_ps(p + 16, a.v[1]);
}

// levels of elements 0..15 and 16..31 as 16 bytes each (signed for Q8_0/Q4_0/Q5_0)
static inline void ch_levels16(int kind, const uint8_t * b, __m128i * lo, __m128i * hi) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    switch (kind) {
        case CH_Q8_0:
            *lo = _mm_loadu_si128((const __m128i *) (b + 2));
            *hi = _mm_loadu_si128((const __m128i *) (b + 18));
            return;
        case CH_Q4_0:
        case CH_Q4_1: {
            const __m128i q = _mm_loadu_si128((const __m128i *) (b + (kind == CH_Q4_0 ? 2 : 4)));
            *lo = _mm_and_si128(q, m4);
            *hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            if (kind == CH_Q4_0) {
                *lo = _mm_sub_epi8(*lo, _mm_set1_epi8(8));
                *hi = _mm_sub_epi8(*hi, _mm_set1_epi8(8));
            }
            return;
        }
        default: { // Q5_0, Q5_1: bit e of qh is the 5th bit of element e
            const int o = kind == CH_Q5_0 ? 2 : 4;
            uint32_t qh;
            memcpy(&qh, b + o, 4);
            const __m128i q = _mm_loadu_si128((const __m128i *) (b + o + 4));
            const __m128i h = _mm_set1_epi8(0x10);
            *lo = _mm_or_si128(_mm_and_si128(q, m4), _mm_maskz_mov_epi8((__mmask16) (qh & 0xFFFF), h));
            *hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_maskz_mov_epi8((__mmask16) (qh >> 16), h));
            if (kind == CH_Q5_0) {
                *lo = _mm_sub_epi8(*lo, _mm_set1_epi8(16));
                *hi = _mm_sub_epi8(*hi, _mm_set1_epi8(16));
            }
            return;
        }
    }
}

static inline void ch_block_fma(int kind, const uint8_t * b, float c, ch_acc32 * a, float * bias) {
    const ggml_fp16_t * hp = (const ggml_fp16_t *) b;
    __m128i lo, hi;
    ch_levels16(kind, b, &lo, &hi);
    const bool sgn = kind == CH_Q8_0 || kind == CH_Q4_0 || kind == CH_Q5_0;
    const __m512 f0 = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(lo) : _mm512_cvtepu8_epi32(lo));
    const __m512 f1 = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(hi) : _mm512_cvtepu8_epi32(hi));
    const __m512 cd = _mm512_set1_ps(c * ch_h2f(hp[0]));
    a->v[0] = _mm512_fmadd_ps(cd, f0, a->v[0]);
    a->v[1] = _mm512_fmadd_ps(cd, f1, a->v[1]);
    if (kind == CH_Q4_1 || kind == CH_Q5_1) {
        *bias = CH_FMA(c, ch_h2f(hp[1]), *bias);
    }
}
#else
typedef struct { __m256 v[4]; } ch_acc32;

static inline ch_acc32 ch_acc_load(const float * p) {
    ch_acc32 a = { { _mm256_loadu_ps(p), _mm256_loadu_ps(p + 8), _mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24) } };
    return a;
}

// (explicitly unrolled: at -O2 GCC 12 kept loops over a.v[] in memory, 1.7x slower)
static inline void ch_acc_store(float * p, ch_acc32 a) {
    _mm256_storeu_ps(p,      a.v[0]);
    _mm256_storeu_ps(p + 8,  a.v[1]);
    _mm256_storeu_ps(p + 16, a.v[2]);
    _mm256_storeu_ps(p + 24, a.v[3]);
}

static inline void ch_block_fma(int kind, const uint8_t * b, float c, ch_acc32 * a, float * bias) {
    __m256 f[4];
    float m;
    const float d = ch_decode(kind, b, f, &m);
    const __m256 cd = _mm256_set1_ps(c * d);
    a->v[0] = _mm256_fmadd_ps(cd, f[0], a->v[0]);
    a->v[1] = _mm256_fmadd_ps(cd, f[1], a->v[1]);
    a->v[2] = _mm256_fmadd_ps(cd, f[2], a->v[2]);
    a->v[3] = _mm256_fmadd_ps(cd, f[3], a->v[3]);
    if (kind == CH_Q4_1 || kind == CH_Q5_1) {
        *bias = CH_FMA(c, m, *bias);
    }
}
#endif

static inline __attribute__((always_inline)) void ch_in_avx2_kind(const int kind, const char * w, size_t nb1, size_t ts,
                                   const int32_t * idx, const float * c, int64_t na,
                                   float * y, int64_t j0, int64_t j1) {
    const int64_t tile = CH_TILE_COLS;
    const bool has_m = kind == CH_Q4_1 || kind == CH_Q5_1;
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
            // Active rows are random jumps the hardware prefetcher cannot predict: prefetch the
            // chunks of the group pfr rows ahead, block by block (near the end: our own rows).
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : k;
            const char * p0 = w + (size_t) idx[kn + 0] * nb1 + off, * p1 = w + (size_t) idx[kn + 1] * nb1 + off;
            const char * p2 = w + (size_t) idx[kn + 2] * nb1 + off, * p3 = w + (size_t) idx[kn + 3] * nb1 + off;
            for (int64_t b = 0; b < nb; b++) {
                CH_PREFETCH(p0 + b * ts);
                CH_PREFETCH(p1 + b * ts);
                CH_PREFETCH(p2 + b * ts);
                CH_PREFETCH(p3 + b * ts);
                ch_acc32 a = ch_acc_load(acc + 32 * b);
                float * bb = has_m ? bias + b : &bdummy;
                ch_block_fma(kind, r0 + b * ts, c[k + 0], &a, bb);
                ch_block_fma(kind, r1 + b * ts, c[k + 1], &a, bb);
                ch_block_fma(kind, r2 + b * ts, c[k + 2], &a, bb);
                ch_block_fma(kind, r3 + b * ts, c[k + 3], &a, bb);
                ch_acc_store(acc + 32 * b, a);
            }
        }
        for (; k < na; k++) {
            const uint8_t * r0 = (const uint8_t *) w + (size_t) idx[k] * nb1 + off;
            for (int64_t b = 0; b < nb; b++) {
                ch_acc32 a = ch_acc_load(acc + 32 * b);
                ch_block_fma(kind, r0 + b * ts, c[k], &a, has_m ? bias + b : &bdummy);
                ch_acc_store(acc + 32 * b, a);
            }
        }
        if (has_m) {
            for (int64_t b = 0; b < nb; b++) {
                const __m256 vb = _mm256_set1_ps(bias[b]);
                for (int e = 0; e < 32; e += 8) {
                    _mm256_storeu_ps(acc + 32*b + e, _mm256_add_ps(_mm256_loadu_ps(acc + 32*b + e), vb));
                }
            }
        }
    }
}

// ---- AVX2 fused convert + FMA for F32/F16/BF16 rows --------------------------------------------
// Same values and the same FMA chain as the generic route (bit-identical to it), without the
// round trip through scratch. Any column range (block size 1): scalar tail for the last < 8.

#define CH_F32  0
#define CH_F16  1
#define CH_BF16 2

static inline __m256 ch_load8(int kind, const char * row, int64_t j) {
    if (kind == CH_F32) {
        return _mm256_loadu_ps((const float *) row + j);
    }
    const __m128i h = _mm_loadu_si128((const __m128i *) ((const uint16_t *) row + j));
    if (kind == CH_F16) {
        return _mm256_cvtph_ps(h);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float ch_load1(int kind, const char * row, int64_t j) {
    if (kind == CH_F32) {
        return ((const float *) row)[j];
    }
    const uint16_t u = ((const uint16_t *) row)[j];
    if (kind == CH_F16) {
        return ch_h2f(u);
    }
    const uint32_t b = (uint32_t) u << 16;
    float f;
    memcpy(&f, &b, sizeof(f));
    return f;
}

static inline __attribute__((always_inline)) void ch_in_avx2_fp(const int kind, const char * w, size_t nb1,
        const int32_t * idx, const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const int64_t tile = CH_TILE_COLS;
    for (int64_t jt = j0; jt < j1; jt += tile) {
        const int64_t je = j1 - jt < tile ? j1 : jt + tile;
        memset(y + jt, 0, (size_t) (je - jt) * sizeof(float));
        const int64_t pfr = ch_pf_rows((size_t) (je - jt) * (kind == CH_F32 ? 4 : 2));
        int64_t k = 0;
        for (; k + 4 <= na; k += 4) {
            const char * r0 = w + (size_t) idx[k + 0] * nb1, * r1 = w + (size_t) idx[k + 1] * nb1;
            const char * r2 = w + (size_t) idx[k + 2] * nb1, * r3 = w + (size_t) idx[k + 3] * nb1;
            const float c0 = c[k], c1 = c[k + 1], c2 = c[k + 2], c3 = c[k + 3];
            const __m256 vc0 = _mm256_set1_ps(c0), vc1 = _mm256_set1_ps(c1);
            const __m256 vc2 = _mm256_set1_ps(c2), vc3 = _mm256_set1_ps(c3);
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : k; // see ch_in_avx2_kind
            const char * p0 = w + (size_t) idx[kn + 0] * nb1, * p1 = w + (size_t) idx[kn + 1] * nb1;
            const char * p2 = w + (size_t) idx[kn + 2] * nb1, * p3 = w + (size_t) idx[kn + 3] * nb1;
            const int64_t es = kind == CH_F32 ? 4 : 2;
            int64_t j = jt;
            for (; j + 8 <= je; j += 8) {
                if (((j * es) & 63) < 8 * es) { // the 8 columns start a new cache line
                    CH_PREFETCH(p0 + j * es);
                    CH_PREFETCH(p1 + j * es);
                    CH_PREFETCH(p2 + j * es);
                    CH_PREFETCH(p3 + j * es);
                }
                __m256 a = _mm256_loadu_ps(y + j);
                a = _mm256_fmadd_ps(vc0, ch_load8(kind, r0, j), a);
                a = _mm256_fmadd_ps(vc1, ch_load8(kind, r1, j), a);
                a = _mm256_fmadd_ps(vc2, ch_load8(kind, r2, j), a);
                a = _mm256_fmadd_ps(vc3, ch_load8(kind, r3, j), a);
                _mm256_storeu_ps(y + j, a);
            }
            for (; j < je; j++) {
                float a = y[j];
                a = fmaf(c0, ch_load1(kind, r0, j), a);
                a = fmaf(c1, ch_load1(kind, r1, j), a);
                a = fmaf(c2, ch_load1(kind, r2, j), a);
                a = fmaf(c3, ch_load1(kind, r3, j), a);
                y[j] = a;
            }
        }
        for (; k < na; k++) {
            const char * r0 = w + (size_t) idx[k] * nb1;
            const __m256 vc0 = _mm256_set1_ps(c[k]);
            int64_t j = jt;
            for (; j + 8 <= je; j += 8) {
                _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vc0, ch_load8(kind, r0, j), _mm256_loadu_ps(y + j)));
            }
            for (; j < je; j++) {
                y[j] = fmaf(c[k], ch_load1(kind, r0, j), y[j]);
            }
        }
    }
}

#define CH_DEF_FP(name, kind) \
    static void name(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, \
                     int64_t na, float * y, int64_t j0, int64_t j1) { \
        (void) ts; \
        ch_in_avx2_fp(kind, w, nb1, idx, c, na, y, j0, j1); \
    }
CH_DEF_FP(ch_in_avx2_f32,  CH_F32)
CH_DEF_FP(ch_in_avx2_f16,  CH_F16)
CH_DEF_FP(ch_in_avx2_bf16, CH_BF16)
#undef CH_DEF_FP

// one instantiation per type so `kind` is a compile-time constant inside the hot loop
#define CH_DEF(name, kind) \
    static void name(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, \
                     int64_t na, float * y, int64_t j0, int64_t j1) { \
        ch_in_avx2_kind(kind, w, nb1, ts, idx, c, na, y, j0, j1); \
    }
CH_DEF(ch_in_avx2_q8_0, CH_Q8_0)
CH_DEF(ch_in_avx2_q4_0, CH_Q4_0)
CH_DEF(ch_in_avx2_q4_1, CH_Q4_1)
CH_DEF(ch_in_avx2_q5_0, CH_Q5_0)
CH_DEF(ch_in_avx2_q5_1, CH_Q5_1)
#undef CH_DEF

// ---- K-quant transposed rows (Q4_K, Q6_K): super-blocks of 256 outputs, 8 sub-blocks of 32 ----
// Each row's super-block scales are decoded once per group pass into per-half multipliers
// (c * d * sc); the sub-blocks then go through the same convert + FMA as the 32-blocks above.
// Q4_K's mins become one bias per 32 outputs (sum of c * -dmin * m), added at the end of the tile.

// acc (32 floats) += clo * levels[0..15] + chi * levels[16..31]
static inline void ch_fma_halves(ch_acc32 * a, __m256i q, bool sgn, float clo, float chi) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
#if defined(CHESS_AVX512)
    const __m512 f0 = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(lo) : _mm512_cvtepu8_epi32(lo));
    const __m512 f1 = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(hi) : _mm512_cvtepu8_epi32(hi));
    a->v[0] = _mm512_fmadd_ps(_mm512_set1_ps(clo), f0, a->v[0]);
    a->v[1] = _mm512_fmadd_ps(_mm512_set1_ps(chi), f1, a->v[1]);
#else
    const __m128i lo2 = _mm_unpackhi_epi64(lo, lo), hi2 = _mm_unpackhi_epi64(hi, hi);
    const __m256 f0 = _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(lo)  : _mm256_cvtepu8_epi32(lo));
    const __m256 f1 = _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(lo2) : _mm256_cvtepu8_epi32(lo2));
    const __m256 f2 = _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(hi)  : _mm256_cvtepu8_epi32(hi));
    const __m256 f3 = _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(hi2) : _mm256_cvtepu8_epi32(hi2));
    a->v[0] = _mm256_fmadd_ps(_mm256_set1_ps(clo), f0, a->v[0]);
    a->v[1] = _mm256_fmadd_ps(_mm256_set1_ps(clo), f1, a->v[1]);
    a->v[2] = _mm256_fmadd_ps(_mm256_set1_ps(chi), f2, a->v[2]);
    a->v[3] = _mm256_fmadd_ps(_mm256_set1_ps(chi), f3, a->v[3]);
#endif
}

// per-half multipliers of one super-block for coefficient c: mul[2j], mul[2j+1] for sub-block j;
// Q4_K: off[j] = c * -dmin * m_j
static inline void ch_k_mults(int kind, const uint8_t * sb, float c, float mul[16], float off[8]) {
    if (kind == CH_UQ4_K) {
        const ggml_fp16_t * hp = (const ggml_fp16_t *) sb;
        const float d = c * ch_h2f(hp[0]), dm = -c * ch_h2f(hp[1]);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            ch_q4k_scale_min(sb + 4, j, &sc, &m);
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

static inline __attribute__((always_inline)) void ch_in_k(const int kind, const char * w, size_t nb1,
        const int32_t * idx, const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const size_t ts = kind == CH_UQ4_K ? 144 : 210;
    const bool sgn = kind == CH_UQ6_K;
    const __m256i k32 = _mm256_set1_epi8(32);
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
        int64_t k = 0;
        for (; k < na; k += 4) {
            const int nr = na - k < 4 ? (int) (na - k) : 4; // the last group may be short
            const uint8_t * r[4];
            for (int q = 0; q < nr; q++) r[q] = (const uint8_t *) w + (size_t) idx[k + q] * nb1 + off;
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : -1;
            for (int64_t b = 0; b < nsb; b++) {
                if (kn >= 0) {
                    for (int q = 0; q < 4; q++) ch_prefetch_bytes(w + (size_t) idx[kn + q] * nb1 + off + b * ts, ts);
                }
                float mul[4][16], offs[4][8];
                for (int q = 0; q < nr; q++) ch_k_mults(kind, r[q] + b * ts, c[k + q], mul[q], offs[q]);
                for (int j = 0; j < 8; j++) {
                    float * ap = acc + 256 * b + 32 * j;
                    ch_acc32 a = ch_acc_load(ap);
                    for (int q = 0; q < nr; q++) {
                        __m256i lv = ch_k_levels(kind, r[q] + b * ts, j);
                        if (sgn) lv = _mm256_sub_epi8(lv, k32);
                        ch_fma_halves(&a, lv, sgn, mul[q][2 * j], mul[q][2 * j + 1]);
                        if (!sgn) bias[8 * b + j] += offs[q][j];
                    }
                    ch_acc_store(ap, a);
                }
            }
        }
        if (!sgn) {
            for (int64_t s = 0; s < nt / 32; s++) {
                const __m256 vb = _mm256_set1_ps(bias[s]);
                for (int e = 0; e < 32; e += 8) {
                    _mm256_storeu_ps(acc + 32 * s + e, _mm256_add_ps(_mm256_loadu_ps(acc + 32 * s + e), vb));
                }
            }
        }
    }
}

static void ch_in_q4_k(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, int64_t na,
                       float * y, int64_t j0, int64_t j1) {
    (void) ts;
    ch_in_k(CH_UQ4_K, w, nb1, idx, c, na, y, j0, j1);
}
static void ch_in_q6_k(const char * w, size_t nb1, size_t ts, const int32_t * idx, const float * c, int64_t na,
                       float * y, int64_t j0, int64_t j1) {
    (void) ts;
    ch_in_k(CH_UQ6_K, w, nb1, idx, c, na, y, j0, j1);
}

// ---------------------------------------------------------------------------------------------
// x4 with 8-bit activations (the plan: chess-kernels-impl.h). Per tile of output columns, per group
// with active inputs, per segment: passes of 2 pairs (4 code rows) over the tile: the two channels'
// code bytes of a pair are interleaved (unpack), split into nibbles and multiplied by the pair
// (u_a, u_b) with maddubs into int16 sums kept in a tile T in L1; then the segment's sums are
// widened, scaled by a_j * s and added to y (the last segment also adds b_j * s * U). Order of T per
// 64 columns: [0..7 | 32..39], [8..15 | 40..47], [16..23 | 48..55], [24..31 | 56..63].
// The next unit's lines are prefetched a few per step of the current one (ch_pf_list).

CH_INLINE void ch_x4_flush8(float * y, const ggml_fp16_t * a, const ggml_fp16_t * b, __m128i t16, __m256 sv,
                            __m256 sUv, bool last) {
    const __m256 t  = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(t16));
    const __m256 as = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) a)), sv);
    __m256 yv = _mm256_loadu_ps(y);
    if (last) {
        yv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) b)), sUv, yv);
    }
    _mm256_storeu_ps(y, _mm256_fmadd_ps(as, t, yv));
}

// The cache lines of the next group, prefetched a few at a time between computations: a burst of
// hundreds of prefetches stalls the core once its miss buffers are full, so memory and compute would
// not overlap (measured: a group's worth in one burst cost as much as the group's compute). A flat
// list of line addresses, so that issuing one is a load and a prefetch (no chain through memory).
typedef struct {
    const char ** line;
    int64_t n, i;
} ch_pf_list;

static inline void ch_pf_add(ch_pf_list * c, const void * p, size_t len) {
    const char * end = (const char *) p + len;
    for (const char * a = (const char *) ((uintptr_t) p & ~(uintptr_t) 63); a < end; a += 64) {
        c->line[c->n++] = a;
    }
}

CH_INLINE void ch_pf_step(ch_pf_list * c, int64_t k) {
    const int64_t e = c->i + k < c->n ? c->i + k : c->n;
    for (int64_t i = c->i; i < e; i++) {
        CH_PREFETCH(c->line[i]);
    }
    c->i = e;
}

// one pass of 1 or 2 pairs over the tile's columns into T
CH_INLINE void ch_x4_pass(const int npair, const uint8_t * const * rp, const ch_x4_pair * P, int64_t nt, int16_t * T,
                          bool first, ch_pf_list * pf, int64_t pfk) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i v0 = _mm256_set1_epi16(P[0].pb), v1 = _mm256_set1_epi16(npair > 1 ? P[1].pb : 0);
    for (int64_t jc = 0; jc < nt; jc += 64) {
        const bool half = nt - jc < 64;
        ch_pf_step(pf, pfk);
        __m256i A[4];
        for (int q = 0; q < 4; q++) {
            A[q] = first ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i *) (T + jc + 16 * q));
        }
        for (int pp = 0; pp < npair; pp++) {
            const uint8_t * pa = rp[2 * pp] + jc / 2, * pb = rp[2 * pp + 1] + jc / 2;
            const __m256i ra = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *) pa))
                                    : _mm256_loadu_si256((const __m256i *) pa);
            const __m256i rb = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *) pb))
                                    : _mm256_loadu_si256((const __m256i *) pb);
            const __m256i v = pp ? v1 : v0;
            const __m256i lo = _mm256_unpacklo_epi8(ra, rb), hi = _mm256_unpackhi_epi8(ra, rb);
            A[0] = _mm256_add_epi16(A[0], _mm256_maddubs_epi16(_mm256_and_si256(lo, m4), v));
            A[1] = _mm256_add_epi16(A[1], _mm256_maddubs_epi16(_mm256_and_si256(hi, m4), v));
            A[2] = _mm256_add_epi16(A[2], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(lo, 4), m4), v));
            A[3] = _mm256_add_epi16(A[3], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m4), v));
        }
        for (int q = 0; q < 4; q++) {
            _mm256_storeu_si256((__m256i *) (T + jc + 16 * q), A[q]);
        }
    }
}

// the lines group G reads for the columns [jt, jt + nt)
static void ch_x4_pf_group(ch_pf_list * c, const char * w, size_t nb1, int64_t n_out, const ch_x4_group * G,
                           const ch_x4_pair * P, int64_t jt, int64_t nt) {
    const size_t cs = (size_t) n_out / 2;
    const char * row = w + (size_t) G->g * nb1, * codes = row + 4 * n_out + jt / 2;
    c->n = c->i = 0;
    ch_pf_add(c, row + 2 * jt, 2 * (size_t) nt);
    ch_pf_add(c, row + 2 * (n_out + jt), 2 * (size_t) nt);
    for (int32_t p = 0; p < G->np; p++) {
        ch_pf_add(c, codes + P[p].ca * cs, (size_t) nt / 2);
        if (P[p].cb != P[p].ca) {
            ch_pf_add(c, codes + P[p].cb * cs, (size_t) nt / 2);
        }
    }
}

// Units of work: (group, tile of CH_TILE_COLS columns) in group-major order, so that a group's code
// rows are read from start to end (fewer pages and DRAM rows than tile-major: measured 0.6 -> 0.8 of
// ggml's dense speed at 4096x14336, 1 thread); y then lives in L2 for wide outputs (2 x its size per
// group, against ~32 multiply-adds per column).
static void ch_x4_avx2(const char * w, size_t nb1, int64_t n_out, const ch_x4_plan * pl, float * y,
                       int64_t j0, int64_t j1) {
    const size_t cs = (size_t) n_out / 2;
    const uint8_t * rp[2 * 16];
    int16_t * T = ch_scratch(CH_BUF_DEQ, (CH_TILE_COLS + 64) * sizeof(int16_t));
    const int64_t max_lines = (4 * CH_TILE_COLS + 16 * CH_TILE_COLS) / 64 + 34; // pairs + 32 code rows of nt/2
    ch_pf_list pf = { ch_scratch(CH_BUF_TILE, (size_t) max_lines * sizeof(char *)), 0, 0 };
    memset(y + j0, 0, (size_t) (j1 - j0) * sizeof(float));
    if (pl->ng > 0) { // the first unit: in one go
        const int64_t nt = j1 - j0 < CH_TILE_COLS ? j1 - j0 : CH_TILE_COLS;
        ch_x4_pf_group(&pf, w, nb1, n_out, &pl->grp[0], &pl->pair[pl->grp[0].p0], j0, nt);
        ch_pf_step(&pf, pf.n);
    }
    for (int64_t e = 0; e < pl->ng; e++) {
        const ch_x4_group * G = &pl->grp[e];
        const ch_x4_pair  * P = &pl->pair[G->p0];
        const char * row = w + (size_t) G->g * nb1;
        const __m256 sv = _mm256_set1_ps(G->s), sUv = _mm256_set1_ps(G->s * (float) G->U);
        for (int64_t jt = j0; jt < j1; jt += CH_TILE_COLS) {
            const int64_t nt = j1 - jt < CH_TILE_COLS ? j1 - jt : CH_TILE_COLS, nch = (nt + 63) / 64;
            const uint8_t * codes = (const uint8_t *) row + 4 * n_out + jt / 2;
            const ggml_fp16_t * a = (const ggml_fp16_t *) row + jt, * b = a + n_out;
            // the next unit's lines, spread over this unit's passes
            pf.n = pf.i = 0;
            if (jt + CH_TILE_COLS < j1) {
                const int64_t jn = jt + CH_TILE_COLS;
                ch_x4_pf_group(&pf, w, nb1, n_out, G, P, jn, j1 - jn < CH_TILE_COLS ? j1 - jn : CH_TILE_COLS);
            } else if (e + 1 < pl->ng) {
                ch_x4_pf_group(&pf, w, nb1, n_out, &pl->grp[e + 1], &pl->pair[pl->grp[e + 1].p0], j0,
                               j1 - j0 < CH_TILE_COLS ? j1 - j0 : CH_TILE_COLS);
            }
            const int64_t steps = (G->np + 1) / 2 * nch, pfk = (pf.n + steps - 1) / steps;
            for (int32_t p = 0; p < G->np; p++) {
                rp[2 * p]     = codes + P[p].ca * cs;
                rp[2 * p + 1] = codes + P[p].cb * cs;
            }
            int32_t p = 0;
            for (int32_t k = 0; k < G->nseg; k++) {
                for (bool first = true; p < G->seg[k]; first = false) {
                    if (G->seg[k] - p >= 2) {
                        ch_x4_pass(2, rp + 2 * p, P + p, nt, T, first, &pf, pfk);
                        p += 2;
                    } else {
                        ch_x4_pass(1, rp + 2 * p, P + p, nt, T, first, &pf, pfk);
                        p += 1;
                    }
                }
                const bool last = k == G->nseg - 1;
                for (int64_t jc = 0; jc < nt; jc += 64) {
                    const int16_t * t = T + jc;
                    float * yc = y + jt + jc;
                    for (int q = 0; q < 4; q++) {
                        const __m256i A = _mm256_loadu_si256((const __m256i *) (t + 16 * q));
                        ch_x4_flush8(yc + 8 * q, a + jc + 8 * q, b + jc + 8 * q, _mm256_castsi256_si128(A), sv, sUv, last);
                        if (nt - jc >= 64) {
                            ch_x4_flush8(yc + 32 + 8 * q, a + jc + 32 + 8 * q, b + jc + 32 + 8 * q,
                                         _mm256_extracti128_si256(A, 1), sv, sUv, last);
                        }
                    }
                }
            }
            ch_pf_step(&pf, pf.n); // what is left of the next unit
        }
    }
}

// ---------------------------------------------------------------------------------------------
// routes

int64_t ch_active_isa(const float * v, const float * thr, int64_t n_thr, int64_t n, int32_t * idx, float * c) {
    int64_t na = 0;
    int64_t i = 0;
#if defined(CHESS_AVX512)
    // register compress + full-width store (the memory form of vpcompress is microcoded on Zen 4)
#if defined(CHESS_AVX512)
    const __m512i step = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 t1 = _mm512_set1_ps(thr ? thr[0] : 0.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 vi = _mm512_loadu_ps(v + i);
        __mmask16 m = _mm512_cmp_ps_mask(vi, _mm512_setzero_ps(), _CMP_NEQ_UQ); // as vi != 0.0f
        if (thr) {
            const __m512 t = n_thr == 1 ? t1 : _mm512_loadu_ps(thr + i);
            m &= _mm512_cmp_ps_mask(_mm512_abs_ps(vi), t, _CMP_GE_OQ);             // as fabsf(vi) >= t
        }
        _mm512_storeu_si512(idx + na, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(step, _mm512_set1_epi32((int) i))));
        _mm512_storeu_ps(c + na, _mm512_maskz_compress_ps(m, vi));
        na += __builtin_popcount((unsigned) m);
    }
#endif
#else
    const __m256 t1 = _mm256_set1_ps(thr ? thr[0] : 0.0f);
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (; i + 8 <= n; i += 8) {
        const __m256 vi = _mm256_loadu_ps(v + i);
        __m256 m = _mm256_cmp_ps(vi, _mm256_setzero_ps(), _CMP_NEQ_UQ);                     // as vi != 0.0f
        if (thr) {
            const __m256 t = n_thr == 1 ? t1 : _mm256_loadu_ps(thr + i);
            m = _mm256_and_ps(m, _mm256_cmp_ps(_mm256_and_ps(vi, absm), t, _CMP_GE_OQ));    // as fabsf(vi) >= t
        }
        for (unsigned bits = (unsigned) _mm256_movemask_ps(m); bits; bits &= bits - 1) {
            const int k = __builtin_ctz(bits);
            idx[na] = (int32_t) (i + k);
            c[na++] = v[i + k];
        }
    }
#endif
    for (; i < n; i++) {
        const float vi = v[i];
        if (vi != 0.0f && (!thr || fabsf(vi) >= ch_thr(thr, n_thr, i))) {
            idx[na] = (int32_t) i;
            c[na++] = vi;
        }
    }
    return na;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CH_UPNAME(t) "vnni-" t
#else
#define CH_UPNAME(t) "avx2-" t
#endif

ch_up_fn ch_up_route_isa(enum ggml_type type, const char ** name) {
    switch (type) {
        case GGML_TYPE_Q8_0: *name = CH_UPNAME("q8_0"); return ch_up_q8_0;
        case GGML_TYPE_Q4_0: *name = CH_UPNAME("q4_0"); return ch_up_q4_0;
        case GGML_TYPE_Q4_1: *name = CH_UPNAME("q4_1"); return ch_up_q4_1;
        case GGML_TYPE_Q5_0: *name = CH_UPNAME("q5_0"); return ch_up_q5_0;
        case GGML_TYPE_Q5_1: *name = CH_UPNAME("q5_1"); return ch_up_q5_1;
        case GGML_TYPE_Q4_K: *name = CH_UPNAME("q4_K"); return ch_up_q4_k;
        case GGML_TYPE_Q5_K: *name = CH_UPNAME("q5_K"); return ch_up_q5_k;
        case GGML_TYPE_Q6_K: *name = CH_UPNAME("q6_K"); return ch_up_q6_k;
        default: return NULL;
    }
}

#if defined(CHESS_AVX512)
#define CH_QNAME(t) "avx512-" t
#else
#define CH_QNAME(t) "avx2-" t
#endif

ch_in_fn ch_in_route_isa(enum ggml_type type, const char ** name) {
    switch (type) {
        case GGML_TYPE_F32:  *name = "avx2-f32";  return ch_in_avx2_f32;
        case GGML_TYPE_F16:  *name = "avx2-f16";  return ch_in_avx2_f16;
        case GGML_TYPE_BF16: *name = "avx2-bf16"; return ch_in_avx2_bf16;
        case GGML_TYPE_Q8_0: *name = CH_QNAME("q8_0"); return ch_in_avx2_q8_0;
        case GGML_TYPE_Q4_0: *name = CH_QNAME("q4_0"); return ch_in_avx2_q4_0;
        case GGML_TYPE_Q4_1: *name = CH_QNAME("q4_1"); return ch_in_avx2_q4_1;
        case GGML_TYPE_Q5_0: *name = CH_QNAME("q5_0"); return ch_in_avx2_q5_0;
        case GGML_TYPE_Q5_1: *name = CH_QNAME("q5_1"); return ch_in_avx2_q5_1;
        case GGML_TYPE_Q4_K: *name = CH_QNAME("q4_K"); return ch_in_q4_k;
        case GGML_TYPE_Q6_K: *name = CH_QNAME("q6_K"); return ch_in_q6_k;
        default: return NULL;
    }
}

ch_x4_fn ch_x4_route_isa(const char ** name) {
    *name = "avx2-x4";
    return ch_x4_avx2;
}
#endif // CHESS_AVX2
