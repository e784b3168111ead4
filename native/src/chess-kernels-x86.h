// x86 helpers shared by chess-kernels-x86-up.c and chess-kernels-x86-in.c (internal).
#ifndef CHESS_KERNELS_X86_H
#define CHESS_KERNELS_X86_H
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

// kinds of the block types in the x86 routes
enum { CH_UQ8_0, CH_UQ4_0, CH_UQ4_1, CH_UQ5_0, CH_UQ5_1, CH_UQ4_K, CH_UQ5_K, CH_UQ6_K };

// 6-bit scale and min of sub-block j of a Q4_K super-block (ggml's packing)
static inline void ch_q4k_scale_min(const uint8_t * q, int j, int * sc, int * m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m  = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m  = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

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

#endif // CHESS_AVX2
#endif // CHESS_KERNELS_X86_H
