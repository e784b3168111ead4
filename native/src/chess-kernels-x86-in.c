// x86 input-sparse kernels (AVX2 + FMA + F16C; AVX-512 refinements where the compiler targets it):
// fused decode + FMA for transposed block rows, the integer x4 kernel, and the active-input scan.
// Dispatch is in chess-kernels.c.
#include "chess-kernels-x86.h"

#if defined(CHESS_AVX2)
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

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CH_DPBUSD(acc, a, b) _mm256_dpbusd_epi32((acc), (a), (b))
#define CH_X4_VNNI "avx512-x4"
#elif defined(__AVXVNNI__)
#define CH_DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32((acc), (a), (b))
#define CH_X4_VNNI "avxvnni-x4"
#endif

#if defined(CH_X4_VNNI)
#ifndef CH_X4V_QUADS
#define CH_X4V_QUADS 1 // quads per pass over a tile (1 / 2 / 4 / 8 measured: docs/kernels.md)
#endif
// x4 through VNNI: 4 channels (2 pairs of the plan) per vpdpbusd, int32 sums in registers. Per 64
// columns the 4 code rows are interleaved byte by byte (unpack 8 then 16: dword k = the 4 channels'
// byte k), and each dword is multiplied by (u_a0, u_b0, u_a1, u_b1): F = sum u*(lo + 16 hi) on the
// whole bytes, H = sum u*16 hi on the bytes & 0xF0, so lo = F - H and hi = H >> 4 without a nibble
// shift. No int16 segments (|sum| <= 32 * 255 * 127); one flush per group and 64 columns, written as
// ch_x4_generic writes it, so the two are bit-identical (the kernel test checks it).
CH_INLINE void ch_x4v_flush8(float * y, const ggml_fp16_t * a, const ggml_fp16_t * b, __m256i t, __m256 sv, __m256 sUv) {
    const __m256 as = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) a)), sv);
    const __m256 yb = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) b)), sUv, _mm256_loadu_ps(y));
    _mm256_storeu_ps(y, _mm256_fmadd_ps(as, _mm256_cvtepi32_ps(t), yb));
}

static void ch_x4_vnni(const char * w, size_t nb1, int64_t n_out, const ch_x4_plan * pl, float * y,
                       int64_t j0, int64_t j1) {
    const size_t cs = (size_t) n_out / 2;
    const __m256i mhi = _mm256_set1_epi8((char) 0xF0);
    const uint8_t * rp[4 * 8];
    int32_t uq[8];
    __m256i * T = ch_scratch(CH_BUF_DEQ, (CH_TILE_COLS / 64 + 1) * 8 * sizeof(__m256i));
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
        const int nq = (G->np + 1) / 2; // an odd last pair is multiplied twice, the second time by 0
        for (int q = 0; q < nq; q++) {
            const ch_x4_pair * P1 = 2 * q + 1 < G->np ? &P[2 * q + 1] : &P[2 * q];
            uq[q] = (int32_t) ((uint32_t) (uint16_t) P[2 * q].pb | (uint32_t) (2 * q + 1 < G->np ? (uint16_t) P1->pb : 0) << 16);
        }
        for (int64_t jt = j0; jt < j1; jt += CH_TILE_COLS) {
            const int64_t nt = j1 - jt < CH_TILE_COLS ? j1 - jt : CH_TILE_COLS, nch = (nt + 63) / 64;
            const uint8_t * codes = (const uint8_t *) row + 4 * n_out + jt / 2;
            const ggml_fp16_t * a = (const ggml_fp16_t *) row + jt, * b = a + n_out;
            // the next unit's lines, spread over this unit's chunks
            pf.n = pf.i = 0;
            if (jt + CH_TILE_COLS < j1) {
                const int64_t jn = jt + CH_TILE_COLS;
                ch_x4_pf_group(&pf, w, nb1, n_out, G, P, jn, j1 - jn < CH_TILE_COLS ? j1 - jn : CH_TILE_COLS);
            } else if (e + 1 < pl->ng) {
                ch_x4_pf_group(&pf, w, nb1, n_out, &pl->grp[e + 1], &pl->pair[pl->grp[e + 1].p0], j0,
                               j1 - j0 < CH_TILE_COLS ? j1 - j0 : CH_TILE_COLS);
            }
            const int nb = (nq + CH_X4V_QUADS - 1) / CH_X4V_QUADS;
            const int64_t pfk = (pf.n + nb * nch - 1) / (nb * nch);
            for (int q = 0; q < nq; q++) {
                const ch_x4_pair * P1 = 2 * q + 1 < G->np ? &P[2 * q + 1] : &P[2 * q];
                rp[4 * q]     = codes + P[2 * q].ca * cs;
                rp[4 * q + 1] = codes + P[2 * q].cb * cs;
                rp[4 * q + 2] = codes + P1->ca * cs;
                rp[4 * q + 3] = codes + P1->cb * cs;
            }
            for (int q0 = 0; q0 < nq; q0 += CH_X4V_QUADS) {
                const int qe = q0 + CH_X4V_QUADS < nq ? q0 + CH_X4V_QUADS : nq;
                for (int64_t jc = 0; jc < nt; jc += 64) {
                    const bool half = nt - jc < 64;
                    ch_pf_step(&pf, pfk);
                    __m256i * tc = T + jc / 8; // 8 vectors per 64 columns
                    __m256i F0, F1, F2, F3, H0, H1, H2, H3;
                    if (q0 == 0) {
                        F0 = F1 = F2 = F3 = H0 = H1 = H2 = H3 = _mm256_setzero_si256();
                    } else {
                        F0 = tc[0]; F1 = tc[1]; F2 = tc[2]; F3 = tc[3]; H0 = tc[4]; H1 = tc[5]; H2 = tc[6]; H3 = tc[7];
                    }
                    for (int q = q0; q < qe; q++) {
                        const uint8_t * p0 = rp[4 * q] + jc / 2, * p1 = rp[4 * q + 1] + jc / 2;
                        const uint8_t * p2 = rp[4 * q + 2] + jc / 2, * p3 = rp[4 * q + 3] + jc / 2;
                        const __m256i r0 = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *) p0)) : _mm256_loadu_si256((const __m256i *) p0);
                        const __m256i r1 = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *) p1)) : _mm256_loadu_si256((const __m256i *) p1);
                        const __m256i r2 = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *) p2)) : _mm256_loadu_si256((const __m256i *) p2);
                        const __m256i r3 = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *) p3)) : _mm256_loadu_si256((const __m256i *) p3);
                        const __m256i u = _mm256_set1_epi32(uq[q]);
                        const __m256i l01 = _mm256_unpacklo_epi8(r0, r1), h01 = _mm256_unpackhi_epi8(r0, r1);
                        const __m256i l23 = _mm256_unpacklo_epi8(r2, r3), h23 = _mm256_unpackhi_epi8(r2, r3);
                        const __m256i q0v = _mm256_unpacklo_epi16(l01, l23), q1v = _mm256_unpackhi_epi16(l01, l23);
                        const __m256i q2v = _mm256_unpacklo_epi16(h01, h23), q3v = _mm256_unpackhi_epi16(h01, h23);
                        F0 = CH_DPBUSD(F0, q0v, u); H0 = CH_DPBUSD(H0, _mm256_and_si256(q0v, mhi), u);
                        F1 = CH_DPBUSD(F1, q1v, u); H1 = CH_DPBUSD(H1, _mm256_and_si256(q1v, mhi), u);
                        F2 = CH_DPBUSD(F2, q2v, u); H2 = CH_DPBUSD(H2, _mm256_and_si256(q2v, mhi), u);
                        F3 = CH_DPBUSD(F3, q3v, u); H3 = CH_DPBUSD(H3, _mm256_and_si256(q3v, mhi), u);
                    }
                    if (qe < nq) { // more passes over this tile: park the sums in L1
                        tc[0] = F0; tc[1] = F1; tc[2] = F2; tc[3] = F3; tc[4] = H0; tc[5] = H1; tc[6] = H2; tc[7] = H3;
                        continue;
                    }
                    // Fk holds columns {4k..4k+3 | 32+4k..} (lo nibbles) and {16+4k.. | 48+4k..} (hi)
                    const __m256i l0 = _mm256_sub_epi32(F0, H0), l1 = _mm256_sub_epi32(F1, H1);
                    const __m256i l2 = _mm256_sub_epi32(F2, H2), l3 = _mm256_sub_epi32(F3, H3);
                    const __m256i g0 = _mm256_srai_epi32(H0, 4), g1 = _mm256_srai_epi32(H1, 4);
                    const __m256i g2 = _mm256_srai_epi32(H2, 4), g3 = _mm256_srai_epi32(H3, 4);
                    float * yc = y + jt + jc;
                    const ggml_fp16_t * ac = a + jc, * bc = b + jc;
                    ch_x4v_flush8(yc,      ac,      bc,      _mm256_permute2x128_si256(l0, l1, 0x20), sv, sUv);
                    ch_x4v_flush8(yc + 8,  ac + 8,  bc + 8,  _mm256_permute2x128_si256(l2, l3, 0x20), sv, sUv);
                    ch_x4v_flush8(yc + 16, ac + 16, bc + 16, _mm256_permute2x128_si256(g0, g1, 0x20), sv, sUv);
                    ch_x4v_flush8(yc + 24, ac + 24, bc + 24, _mm256_permute2x128_si256(g2, g3, 0x20), sv, sUv);
                    if (!half) {
                        ch_x4v_flush8(yc + 32, ac + 32, bc + 32, _mm256_permute2x128_si256(l0, l1, 0x31), sv, sUv);
                        ch_x4v_flush8(yc + 40, ac + 40, bc + 40, _mm256_permute2x128_si256(l2, l3, 0x31), sv, sUv);
                        ch_x4v_flush8(yc + 48, ac + 48, bc + 48, _mm256_permute2x128_si256(g0, g1, 0x31), sv, sUv);
                        ch_x4v_flush8(yc + 56, ac + 56, bc + 56, _mm256_permute2x128_si256(g2, g3, 0x31), sv, sUv);
                    }
                }
            }
            ch_pf_step(&pf, pf.n); // what is left of the next unit
        }
    }
}
#endif // CH_X4_VNNI

// ---------------------------------------------------------------------------------------------
// active inputs and routes

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
#if defined(CH_X4_VNNI)
    static int avx2 = -1; // CHESS_X4_AVX2=1: the AVX2 route, for A/B runs of the benchmarks (docs/kernels.md)
    if (avx2 < 0) avx2 = getenv("CHESS_X4_AVX2") != NULL;
    if (avx2) {
        *name = "avx2-x4";
        return ch_x4_avx2;
    }
    *name = CH_X4_VNNI;
    return ch_x4_vnni;
#else
    *name = "avx2-x4";
    return ch_x4_avx2;
#endif
}
#endif // CHESS_AVX2
