// x86 output-sparse up kernels (AVX2 + FMA; VNNI where the compiler targets it): multi-row integer
// dots of kept W_up rows with ggml's 8-bit x. Dispatch is in chess-kernels.c.
#include "chess-kernels-x86.h"

#if defined(CHESS_AVX2)
// ---------------------------------------------------------------------------------------------
// output-sparse up projection: s[k] = dot(W_up[kept[k]], x), CH_UP_ROWS kept rows per pass (each
// x load serves 4 rows, 4 independent accumulator chains), integer dots on ggml's 8-bit x
// (Q8_0 / Q8_1 / Q8_K as the type's vec_dot_type), the rows 8 kept rows ahead prefetched a line at a
// time as the pass advances (a burst of whole-row prefetches stalls the core, see ch_pf_list).
// Measured against ggml's dense mul_mat on the same weights: docs/kernels.md.
#define CH_UP_ROWS 4
#define CH_K512_ROWS 2 // the AVX-512 K routes: 4 rows per pass measured no faster (docs/kernels.md)

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
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm256_setzero_ps();
        accm[r] = _mm256_setzero_ps();
    }
    const int64_t np = nb / 2;
    for (int64_t p = 0; p <= np; p++) {
        const bool tail = p == np; // an odd last block: its partner is itself, with x = 0
        if (tail && nb % 2 == 0) break;
        const ch_upx2 * xp = X + p;
        CH_UNROLL
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
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        sums[r] = ch_hsum8(has_m ? _mm256_add_ps(acc[r], accm[r]) : acc[r]);
    }
}

// ---- Q8_0: one block per step, the sign trick (|w| times x * sign(w)); scale per block ----
CH_INLINE void ch_up_rows_q8(const int NR, const uint8_t * const * rows, const uint8_t * const * ahead, int64_t nb,
                             const uint8_t * xq, float * sums) {
    __m256 acc[CH_UP_ROWS];
    CH_UNROLL
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *) (xq + b * 34 + 2));
        const float dx = ch_h2f(*(const ggml_fp16_t *) (xq + b * 34));
        CH_UNROLL
        for (int r = 0; r < NR; r++) {
            const uint8_t * wb = rows[r] + b * 34;
            if (ahead) CH_PREFETCH(ahead[r] + b * 34);
            const __m256i w = _mm256_loadu_si256((const __m256i *) (wb + 2));
            const __m256i p = ch_dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ch_h2f(*(const ggml_fp16_t *) wb) * dx), acc[r]);
        }
    }
    CH_UNROLL
    for (int r = 0; r < NR; r++) sums[r] = ch_hsum8(acc[r]);
}

// ---- K-quants (256-element super-blocks, x in Q8_K: float d, int8 qs[256], int16 bsums[16]) ----
// Per row and super-block, sum_k sc_k * dot(q_k, x_k) accumulated in int32 (maddubs pairs, then
// madd by the sub-block's scale broadcast from one register), scaled once by d * d_x; Q4_K/Q5_K
// mins and Q6_K's -32 through Q8_K's per-16 sums of x.

// all 8 scales and mins of a Q4_K/Q5_K super-block as int16: [sc0..sc7 | m0..m7], by byte shuffles
// (the 6-bit fields of the 12 packed bytes: sc_j / m_j = low 6 bits of bytes j / j+4 for j < 4; for
// j >= 4 a nibble of byte j+4 plus the top 2 bits of byte j-4 / j). One load instead of scalar
// unpacking and four inserts per row and super-block.
static inline __m256i ch_q4k_scales16(const uint8_t * s12) {
    const __m128i s = _mm_loadu_si128((const __m128i *) s12); // bytes 12..15 unused (still inside the block)
    const __m128i a = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i b = _mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m128i lo = _mm_blend_epi32(a, _mm_srli_epi16(a, 4), 0x8); // m4..m7 take the high nibbles
    const __m128i v = _mm_or_si128(_mm_and_si128(lo, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15)),
                                   _mm_and_si128(_mm_srli_epi16(b, 2), _mm_set1_epi8(0x30)));
    return _mm256_cvtepu8_epi16(v);
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

CH_INLINE void ch_up_rows_k(const int kind, const int NR, const uint8_t * const * rows, const uint8_t * const * ahead,
                            int64_t nsb, const uint8_t * xq, float * sums) {
    const size_t ts = kind == CH_UQ4_K ? 144 : kind == CH_UQ5_K ? 176 : 210;
    const __m256i m4 = _mm256_set1_epi8(0x0F), h10 = _mm256_set1_epi8(0x10);
    __m256 acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
    CH_UNROLL
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
        CH_UNROLL
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
    CH_UNROLL
    for (int r = 0; r < NR; r++) sums[r] = ch_hsum8(acc[r]) + corr[r];
}


#if defined(CHESS_AVX512)
// ---- Q4_K/Q5_K/Q6_K on AVX-512BW: 2 rows per pass, 2 x 64-byte loads per row and super-block. Bytes
// 0..63 of qs hold sub-blocks 0 and 2 in their low nibbles, 1 and 3 in their high ones, so x is
// rearranged once per call into that order ([x0 | x2], [x1 | x3], [x4 | x6], [x5 | x7]) and the
// row's 8 scales become int16 vectors [sc_a x16 | sc_b x16] by one vpermw each. The same integers
// as the 256-bit route (maddubs pairs, madd by the scale), summed in another order (exact);
// mins through Q8_K's per-32 sums of x, in a float vector per row.
typedef struct {
    __m512i x[4];
    __m128i bs32; // per-32 sums of x (int16, lanes 0..7)
    float   dx;
} ch_upk512;

static const ch_upk512 * ch_upk512_prepare(const uint8_t * xq, int64_t nsb) {
    uint8_t * buf = ch_scratch(CH_BUF_DEQ, (size_t) nsb * sizeof(ch_upk512) + 64);
    ch_upk512 * X = (ch_upk512 *) (((uintptr_t) buf + 63) & ~(uintptr_t) 63);
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t * xb = xq + b * 292; // Q8_K: float d, int8 qs[256], int16 bsums[16]
        const int8_t * x8 = (const int8_t *) (xb + 4);
        memcpy(&X[b].dx, xb, 4);
        for (int k = 0; k < 4; k++) {
            const int s0 = (k & 1) + 4 * (k >> 1); // sub-blocks s0 and s0 + 2
            X[b].x[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) (x8 + 32 * s0))),
                                           _mm256_loadu_si256((const __m256i *) (x8 + 32 * (s0 + 2))), 1);
        }
        const __m256i bs = _mm256_loadu_si256((const __m256i *) (xb + 260));
        X[b].bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
    }
    return X;
}

// acc + pairwise int16 products of a and b, summed into int32 lanes (exact either way; VNNI fuses
// the two: two accumulators per row keep its latency chain short, measured +12% in L2 on Q4_K)
static inline __m512i ch_madd_acc512(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

#define CH_V16(a, b) _mm512_inserti64x4(_mm512_set1_epi16(a), _mm256_set1_epi16(b), 1)

CH_INLINE void ch_up_rows_k512(const int kind, const int NR, const uint8_t * const * rows, const uint8_t * const * ahead,
                               int64_t nsb, const ch_upk512 * X, float * sums) {
    const size_t ts = kind == CH_UQ4_K ? 144 : 176;
    const bool q5 = kind == CH_UQ5_K;
    const __m512i m4 = _mm512_set1_epi8(0x0F), h10 = _mm512_set1_epi8(0x10);
    // indices into [sc0..sc7 | m0..m7] for the four vectors, and the shifts that bring Q5_K's 5th
    // bit of sub-block s (bit s of qh[e]) to 0x10: left for s = 0..3, right for s = 4..7
    const __m512i si0 = CH_V16(0, 2), si1 = CH_V16(1, 3), si2 = CH_V16(4, 6), si3 = CH_V16(5, 7);
    const __m512i sh0 = CH_V16(4, 2), sh1 = CH_V16(3, 1), sh2 = CH_V16(0, 2), sh3 = CH_V16(1, 3);
    __m512 acc[CH_K512_ROWS];
    __m128 accm[CH_K512_ROWS];
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm512_setzero_ps();
        accm[r] = _mm_setzero_ps();
        if (ahead) CH_PREFETCH(ahead[r]);
    }
    for (int64_t b = 0; b < nsb; b++) {
        const ch_upk512 * xb = X + b;
        CH_UNROLL
        for (int r = 0; r < NR; r++) {
            const uint8_t * sb = rows[r] + b * ts;
            if (ahead) ch_prefetch_span(ahead[r] + b * ts, ts);
            const __m256i s16 = ch_q4k_scales16(sb + 4);
            const __m128i mm = _mm_madd_epi16(_mm256_extracti128_si256(s16, 1), xb->bs32);
            const __m512i sc = _mm512_castsi256_si512(s16);
            const uint8_t * qs = sb + (q5 ? 48 : 16);
            const __m512i w0 = _mm512_loadu_si512((const void *) qs), w1 = _mm512_loadu_si512((const void *) (qs + 64));
            __m512i l0 = _mm512_and_si512(w0, m4), h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m4);
            __m512i l1 = _mm512_and_si512(w1, m4), h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m4);
            if (q5) {
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (sb + 16)));
                l0 = _mm512_or_si512(l0, _mm512_and_si512(_mm512_sllv_epi16(qh, sh0), h10));
                h0 = _mm512_or_si512(h0, _mm512_and_si512(_mm512_sllv_epi16(qh, sh1), h10));
                l1 = _mm512_or_si512(l1, _mm512_and_si512(_mm512_srlv_epi16(qh, sh2), h10));
                h1 = _mm512_or_si512(h1, _mm512_and_si512(_mm512_srlv_epi16(qh, sh3), h10));
            }
            // |level| <= 31, |x| <= 127: maddubs pairs stay within int16 (as in ch_up_rows_k)
            __m512i a0 = _mm512_madd_epi16(_mm512_maddubs_epi16(l0, xb->x[0]), _mm512_permutexvar_epi16(si0, sc));
            __m512i a1 = _mm512_madd_epi16(_mm512_maddubs_epi16(h0, xb->x[1]), _mm512_permutexvar_epi16(si1, sc));
            a0 = ch_madd_acc512(a0, _mm512_maddubs_epi16(l1, xb->x[2]), _mm512_permutexvar_epi16(si2, sc));
            a1 = ch_madd_acc512(a1, _mm512_maddubs_epi16(h1, xb->x[3]), _mm512_permutexvar_epi16(si3, sc));
            const __m512i isum = _mm512_add_epi32(a0, a1);
            const ggml_fp16_t * hp = (const ggml_fp16_t *) sb;
            acc[r]  = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(ch_h2f(hp[0]) * xb->dx), acc[r]);
            accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(mm), _mm_set1_ps(-ch_h2f(hp[1]) * xb->dx), accm[r]);
        }
    }
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        __m128 m = _mm_add_ps(accm[r], _mm_movehl_ps(accm[r], accm[r]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        sums[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(m);
    }
}

// Q6_K: per half n of the super-block, ql bytes 64n..64n+63 hold sub-blocks 4n, 4n+1 in their low
// nibbles and 4n+2, 4n+3 in their high ones, with 2 high bits each in qh[32n..32n+31] (bits 0-1,
// 2-3, 4-5, 6-7); x is already in that order. Scales per 16 elements: one vpermw per 64 levels.
CH_INLINE void ch_up_rows_q6k512(const int NR, const uint8_t * const * rows, const uint8_t * const * ahead,
                                 int64_t nsb, const uint8_t * xq, float * sums) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), h30 = _mm512_set1_epi8(0x30);
    const __m512i shl = CH_V16(4, 2), shr = CH_V16(0, 2); // qh bits (0-1 | 2-3) left, (4-5 | 6-7) right, to 0x30
    // scale index per int16 of a maddubs result: 8 pairs per 16 levels
    const __m512i sl0 = _mm512_set_epi64(0x0003000300030003LL, 0x0003000300030003LL, 0x0002000200020002LL, 0x0002000200020002LL,
                                         0x0001000100010001LL, 0x0001000100010001LL, 0x0000000000000000LL, 0x0000000000000000LL);
    __m512 acc[CH_K512_ROWS];
    __m256 accm[CH_K512_ROWS];
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm512_setzero_ps();
        accm[r] = _mm256_setzero_ps();
        if (ahead) CH_PREFETCH(ahead[r]);
    }
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t * xb = xq + b * 292;
        float dx;
        memcpy(&dx, xb, 4);
        const int8_t * x8 = (const int8_t *) (xb + 4);
        const __m256i bs = _mm256_loadu_si256((const __m256i *) (xb + 260)); // int16 bsums[16]
        CH_UNROLL
        for (int r = 0; r < NR; r++) {
            const uint8_t * sb = rows[r] + b * 210;
            if (ahead) ch_prefetch_span(ahead[r] + b * 210, 210);
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) (sb + 192)));
            const __m512i sc = _mm512_castsi256_si512(sc16);
            __m512i isl = _mm512_setzero_si512(), ish = _mm512_setzero_si512();
            for (int n = 0; n < 2; n++) {
                const __m512i ql = _mm512_loadu_si512((const void *) (sb + 64 * n));
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (sb + 128 + 32 * n)));
                const __m512i lo = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_sllv_epi16(qh, shl), h30));
                const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                                   _mm512_and_si512(_mm512_srlv_epi16(qh, shr), h30));
                // levels 0..63, |x| <= 127: pairs within int16
                const __m512i pl = _mm512_maddubs_epi16(lo, _mm512_loadu_si512((const void *) (x8 + 128 * n)));
                const __m512i ph = _mm512_maddubs_epi16(hi, _mm512_loadu_si512((const void *) (x8 + 128 * n + 64)));
                const __m512i il = _mm512_add_epi16(sl0, _mm512_set1_epi16((short) (8 * n)));
                const __m512i ih = _mm512_add_epi16(sl0, _mm512_set1_epi16((short) (8 * n + 4)));
                isl = ch_madd_acc512(isl, pl, _mm512_permutexvar_epi16(il, sc));
                ish = ch_madd_acc512(ish, ph, _mm512_permutexvar_epi16(ih, sc));
            }
            const float d = ch_h2f(*(const ggml_fp16_t *) (sb + 208)) * dx;
            acc[r]  = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(isl, ish)), _mm512_set1_ps(d), acc[r]);
            accm[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sc16, bs)), _mm256_set1_ps(-32.0f * d), accm[r]);
        }
    }
    CH_UNROLL
    for (int r = 0; r < NR; r++) {
        sums[r] = _mm512_reduce_add_ps(acc[r]) + ch_hsum8(accm[r]);
    }
}
#undef CH_V16
#define CH_UP_K512(kind) ((kind) == CH_UQ4_K || (kind) == CH_UQ5_K || (kind) == CH_UQ6_K)
#else
#define CH_UP_K512(kind) 0
#endif

// The driver: CH_UP_ROWS kept rows per pass, then the tail row by row (same per-row arithmetic, so
// grouping never changes a result); the rows CH_UP_PF_ROWS kept rows ahead are prefetched by the pass.
CH_INLINE void ch_up_drive(const int kind, const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk,
                           const void * xq, float * s) {
    const bool k = kind >= CH_UQ4_K, k512 = CH_UP_K512(kind);
    const int G = k512 ? CH_K512_ROWS : CH_UP_ROWS; // rows per pass
    const int64_t nb = n_in / (k ? 256 : 32);
    const ch_upx2 * X = kind != CH_UQ8_0 && !k ? ch_upx2_prepare(kind, (const uint8_t *) xq, nb) : NULL;
#if defined(CHESS_AVX512)
    const ch_upk512 * XK = k512 && kind != CH_UQ6_K ? ch_upk512_prepare((const uint8_t *) xq, nb) : NULL;
#endif
    const size_t ts = kind == CH_UQ8_0 ? 34 : kind == CH_UQ4_0 ? 18 : kind == CH_UQ4_1 ? 20 : kind == CH_UQ5_0 ? 22 :
                      kind == CH_UQ5_1 ? 24 : kind == CH_UQ4_K ? 144 : kind == CH_UQ5_K ? 176 : 210;
    for (int64_t q = 0; q < nk && q < CH_UP_PF_ROWS; q++) { // the first rows: nothing runs ahead of them
        ch_prefetch_bytes(w + (size_t) kept[q] * nb1, (size_t) nb * ts);
    }
    for (int64_t i = 0; i < nk; ) {
        const int nr = nk - i >= G ? G : 1;
        const uint8_t * rows[CH_UP_ROWS], * ahead[CH_UP_ROWS];
        const bool pf = i + CH_UP_PF_ROWS + nr <= nk;
        for (int r = 0; r < nr; r++) {
            rows[r] = (const uint8_t *) w + (size_t) kept[i + r] * nb1;
            ahead[r] = pf ? (const uint8_t *) w + (size_t) kept[i + CH_UP_PF_ROWS + r] * nb1 : NULL;
        }
#if defined(CHESS_AVX512)
        if (k512) {
            const uint8_t * const * a = pf ? ahead : NULL;
            if (kind == CH_UQ6_K) {
                if (nr == CH_K512_ROWS) ch_up_rows_q6k512(CH_K512_ROWS, rows, a, nb, (const uint8_t *) xq, s + i);
                else                    ch_up_rows_q6k512(1, rows, a, nb, (const uint8_t *) xq, s + i);
            } else {
                if (nr == CH_K512_ROWS) ch_up_rows_k512(kind, CH_K512_ROWS, rows, a, nb, XK, s + i);
                else                    ch_up_rows_k512(kind, 1, rows, a, nb, XK, s + i);
            }
            i += nr;
            continue;
        }
#endif
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
// route

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CH_UPNAME(t) "vnni-" t
#else
#define CH_UPNAME(t) "avx2-" t
#endif

#if defined(CHESS_AVX512)
#define CH_UPKNAME(t) "avx512-" t
#else
#define CH_UPKNAME(t) CH_UPNAME(t)
#endif

ch_up_fn ch_up_route_isa(enum ggml_type type, const char ** name) {
    switch (type) {
        case GGML_TYPE_Q8_0: *name = CH_UPNAME("q8_0"); return ch_up_q8_0;
        case GGML_TYPE_Q4_0: *name = CH_UPNAME("q4_0"); return ch_up_q4_0;
        case GGML_TYPE_Q4_1: *name = CH_UPNAME("q4_1"); return ch_up_q4_1;
        case GGML_TYPE_Q5_0: *name = CH_UPNAME("q5_0"); return ch_up_q5_0;
        case GGML_TYPE_Q5_1: *name = CH_UPNAME("q5_1"); return ch_up_q5_1;
        case GGML_TYPE_Q4_K: *name = CH_UPKNAME("q4_K"); return ch_up_q4_k;
        case GGML_TYPE_Q5_K: *name = CH_UPKNAME("q5_K"); return ch_up_q5_k;
        case GGML_TYPE_Q6_K: *name = CH_UPKNAME("q6_K"); return ch_up_q6_k;
        default: return NULL;
    }
}
#endif // CHESS_AVX2
