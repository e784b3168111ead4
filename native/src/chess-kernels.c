// CHESS sparse mat-vec kernels. See chess-kernels.h for the contract.
#include "chess-kernels.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if !defined(_WIN32)
#include <pthread.h>
#define CH_TLS_DTOR 1 // free a thread's scratch when it exits (see ch_grow)
#endif

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CHESS_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CHESS_AVX512 1
#endif
#endif
#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(CHESS_AVX2)
#include <arm_neon.h>
#define CHESS_NEON 1 // aarch64 NEON paths (SDOT for the up kernels with __ARM_FEATURE_DOTPROD)
#endif

// Fused multiply-add used by every accumulation, vector and scalar alike, so an output element
// gets the same rounding whichever code path (vector body or scalar tail) computes it.
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define CH_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define CH_FMA(a, b, c) ((a) * (b) + (c))
#endif

// ---------------------------------------------------------------------------------------------
// thread-local scratch (no work buffer in a ggml custom op): grows, never shrinks, and is freed
// when its thread exits. Threads come and go: ggml built without OpenMP starts a new threadpool
// for every graph computed (unless the caller attached one), the tests start threads per run;
// without the key destructor each exiting thread leaked its buffers (found by LeakSanitizer).

typedef struct { void * p; size_t cap; } ch_buf;

static _Thread_local ch_buf tls_list;  // active/kept indices + coefficients
static _Thread_local ch_buf tls_deq;   // dequantized weights / per-block biases
static _Thread_local ch_buf tls_x;     // chess_prepare_x_tls
static _Thread_local ch_buf tls_tile;  // chess_retranspose

#if CH_TLS_DTOR
static pthread_key_t  ch_key;
static pthread_once_t ch_key_once = PTHREAD_ONCE_INIT;
static bool           ch_key_ok;
static _Thread_local bool tls_registered;

// runs in the exiting thread (its thread-locals are still valid during key destructors)
static void ch_thread_exit(void * unused) {
    (void) unused;
    ch_buf * bufs[] = { &tls_list, &tls_deq, &tls_x, &tls_tile };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        free(bufs[i]->p);
        bufs[i]->p   = NULL;
        bufs[i]->cap = 0;
    }
    tls_registered = false; // a later ch_grow in this thread (another key's destructor) registers again
}

static void ch_key_create(void) {
    ch_key_ok = pthread_key_create(&ch_key, ch_thread_exit) == 0; // else: scratch leaks at thread exit
}

#if defined(__GNUC__)
// the library is unloaded (dlclose): no thread may call ch_thread_exit afterwards
__attribute__((destructor)) static void ch_key_delete(void) {
    if (ch_key_ok) {
        pthread_key_delete(ch_key);
        ch_key_ok = false;
    }
}
#endif
#endif

static void * ch_grow(ch_buf * b, size_t need) {
    if (need > b->cap) {
#if CH_TLS_DTOR
        if (!tls_registered) {
            pthread_once(&ch_key_once, ch_key_create);
            if (ch_key_ok) {
                pthread_setspecific(ch_key, &tls_list); // any non-NULL value: the destructor runs
            }
            tls_registered = true;
        }
#endif
        size_t cap = need + need / 2 + 256;
        cap = (cap + 63) & ~(size_t) 63;
        free(b->p);
        b->p = aligned_alloc(64, cap);
        if (!b->p) {
            b->cap = 0;
            GGML_ABORT("chess: out of memory (%zu bytes)", cap);
        }
        b->cap = cap;
    }
    return b->p;
}

// ---------------------------------------------------------------------------------------------
// small helpers

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

float chess_act_apply(enum chess_act act, float g) {
    if (act == CHESS_ACT_GELU) {
        const float k0 = 0.79788456080286535588f; // sqrt(2/pi)
        const float k1 = 0.044715f;
        return 0.5f * g * (1.0f + tanhf(k0 * g * (1.0f + k1 * g * g)));
    }
    return g / (1.0f + expf(-g));
}

bool chess_type_supported(enum ggml_type type) {
    if ((int) type < 0 || type >= GGML_TYPE_COUNT) {
        return false;
    }
    const struct ggml_type_traits * tt = ggml_get_type_traits(type);
    if (!tt || !tt->type_name || tt->blck_size <= 0) {
        return false;
    }
    const struct ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(type);
    if (!tc || !tc->vec_dot) {
        return false;
    }
    const struct ggml_type_traits_cpu * tv = ggml_get_type_traits_cpu(tc->vec_dot_type);
    if (!tv || !tv->from_float) {
        return false;
    }
    return type == GGML_TYPE_F32 || tt->to_float != NULL; // F32 needs no to_float
}

void chess_thread_range(int64_t n, int64_t align, int ith, int nth, int64_t * r0, int64_t * r1) {
    if (align < 1) {
        align = 1;
    }
    if (nth < 1) {
        nth = 1;
    }
    const int64_t nu   = (n + align - 1) / align; // units of `align` elements
    const int64_t base = nu / nth;
    const int64_t rem  = nu % nth;
    const int64_t u0   = ith * base + (ith < rem ? ith : rem);
    const int64_t u1   = u0 + base + (ith < rem ? 1 : 0);
    *r0 = u0 * align < n ? u0 * align : n;
    *r1 = u1 * align < n ? u1 * align : n;
}

// Software prefetch of active/kept rows (random jumps the hardware prefetcher cannot follow).
// The input-sparse kernels prefetch the rows CH_PF_BYTES of weights ahead of the group being
// computed (at least 8 rows): far enough to cover DRAM latency whatever slice of a row one thread
// reads. A fixed 8 rows was too close when 2 threads each read 180-byte halves of SmolLM2 rows:
// decode (llama-bench tg, 2 threads, level 0.5) 94 tok/s with 8 rows, 103 with 16, 99 with 32.
// The up kernel reads whole rows: 8 rows ahead (4 measured 10% slower at 1 thread; 16, 32 same).
// Override with -D for tuning.
#ifndef CH_PF_BYTES
#define CH_PF_BYTES 3072
#endif
static inline int64_t ch_pf_rows(size_t slice_bytes) {
    int64_t r = (int64_t) (CH_PF_BYTES / (slice_bytes ? slice_bytes : 1));
    r = r < 8 ? 8 : r > 64 ? 64 : r;
    return r & ~(int64_t) 3;
}
#ifndef CH_UP_PF_ROWS
#define CH_UP_PF_ROWS 8
#endif
#ifndef CH_PF_LOC
#define CH_PF_LOC 2
#endif
#define CH_PREFETCH(p) __builtin_prefetch((p), 0, CH_PF_LOC) // locality 2 = prefetcht1 on x86

// every cache line of [p, p + n): rows are not line-aligned (a Q4_1 row of 576 is 360 bytes), and
// stepping 64 bytes from p itself would miss the row's last line (one demand miss per row).
static inline void ch_prefetch_bytes(const char * p, size_t n) {
    const uintptr_t end = (uintptr_t) p + n;
    for (uintptr_t a = (uintptr_t) p & ~(uintptr_t) 63; a < end; a += 64) {
        CH_PREFETCH((const char *) a);
    }
}

// threshold lookup: per-channel array, one scalar, or none
static inline float ch_thr(const float * t, int64_t n_t, int64_t i) {
    return t ? t[n_t == 1 ? 0 : i] : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// x preparation

size_t chess_x_size(enum ggml_type type, int64_t n_in) {
    return ggml_row_size(ggml_get_type_traits_cpu(type)->vec_dot_type, n_in);
}

void chess_prepare_x(enum ggml_type type, const float * x, void * xq, int64_t n_in) {
    const enum ggml_type vt = ggml_get_type_traits_cpu(type)->vec_dot_type;
    if (vt == GGML_TYPE_F32) {
        memcpy(xq, x, n_in * sizeof(float));
    } else {
        ggml_get_type_traits_cpu(vt)->from_float(x, xq, n_in);
    }
}

const void * chess_prepare_x_tls(enum ggml_type type, const float * x, int64_t n_in) {
    void * xq = ch_grow(&tls_x, chess_x_size(type, n_in));
    chess_prepare_x(type, x, xq, n_in);
    return xq;
}

#if defined(CHESS_AVX2)
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

#endif

// ---------------------------------------------------------------------------------------------
// output-sparse up projection

static bool ch_force_generic = false;

// a fast up route: s[k] = dot(W_up[kept[k]], x) for the nk kept rows
typedef void (*ch_up_fn)(const char *, size_t, int64_t, const int32_t *, int64_t, const void *, float *);

#if defined(CHESS_AVX2)
// Multi-row integer dot products for the 32-element block types (x in Q8_0 / Q8_1, as ggml
// prepares it). ggml's vec_dot does one row per call; for scattered kept rows a fused pass over
// CH_UP_ROWS rows at a time reuses each x block from registers, keeps the rows' independent
// accumulators in flight (the loads of 4 rows overlap) and, with AVX-512 VNNI, multiplies u8 by
// s8 in one instruction. Weight levels are taken unsigned (Q4_0/Q5_0 subtract their zero point
// through sum(x) per block, exact in integers); Q8_0 uses the sign trick (|w| times x*sign(w)).
#define CH_UP_ROWS 4

enum { CH_UQ8_0, CH_UQ4_0, CH_UQ4_1, CH_UQ5_0, CH_UQ5_1 };

// 32 weight levels of one block: u8 (Q8_0: the raw s8 values)
static inline __m256i ch_up_levels(int kind, const uint8_t * b) {
    switch (kind) {
        case CH_UQ8_0: return _mm256_loadu_si256((const __m256i *) (b + 2));
        case CH_UQ4_0: return ch_nibbles(b + 2);
        case CH_UQ4_1: return ch_nibbles(b + 4);
        case CH_UQ5_0: return _mm256_or_si256(ch_nibbles(b + 6), ch_bits_0x10(b + 2));
        default:       return _mm256_or_si256(ch_nibbles(b + 8), ch_bits_0x10(b + 4));
    }
}

// 8 int32 partial sums of w (u8) * x (s8); Q8_0: w is s8 too
static inline __m256i ch_up_dot(int kind, __m256i w, __m256i x) {
    if (kind == CH_UQ8_0) {
        x = _mm256_sign_epi8(x, w);
        w = _mm256_abs_epi8(w);
    }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
    // |w| <= 127 (Q8_0) or <= 31, |x| <= 127: a pair sum fits int16 without saturation
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

static inline float ch_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// sums[r] = dot(row r, x) for NR rows. Per block: the integer dot scaled by d_w*d_x, plus a
// scalar term coef_w * xs[b] (Q4_1/Q5_1: m_w * s_x; Q4_0/Q5_0: d_w * (-zero point * d_x * sum x)).
static inline __attribute__((always_inline)) void ch_up_rows(const int kind, const int NR, const uint8_t * const * rows,
        size_t ts, const uint8_t * xq, size_t xs_bytes, const float * dx, const float * xs, int64_t nb, float * sums) {
    __m256 acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm256_setzero_ps();
        corr[r] = 0.0f;
    }
    const int xo = (kind == CH_UQ4_1 || kind == CH_UQ5_1) ? 4 : 2;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *) (xq + b * xs_bytes + xo));
        for (int r = 0; r < NR; r++) {
            const uint8_t * wb = rows[r] + b * ts;
            const ggml_fp16_t * hp = (const ggml_fp16_t *) wb;
            const __m256i p = ch_up_dot(kind, ch_up_levels(kind, wb), xv);
            const float dw = ch_h2f(hp[0]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * dx[b]), acc[r]);
            if (kind == CH_UQ4_1 || kind == CH_UQ5_1) {
                corr[r] = CH_FMA(ch_h2f(hp[1]), xs[b], corr[r]);
            } else if (kind != CH_UQ8_0) {
                corr[r] = CH_FMA(dw, xs[b], corr[r]);
            }
        }
    }
    for (int r = 0; r < NR; r++) {
        sums[r] = ch_hsum8(acc[r]) + corr[r];
    }
}

static inline __attribute__((always_inline)) void ch_up_fast_kind(const int kind, const char * w, size_t nb1,
        int64_t n_in, const int32_t * kept, int64_t nk, const void * xq_, float * s) {
    const uint8_t * xq = (const uint8_t *) xq_;
    const size_t ts = kind == CH_UQ8_0 ? 34 : kind == CH_UQ4_0 ? 18 : kind == CH_UQ4_1 ? 20 : kind == CH_UQ5_0 ? 22 : 24;
    const bool x1 = kind == CH_UQ4_1 || kind == CH_UQ5_1; // x in Q8_1 (36-byte blocks with s)
    const size_t xs_bytes = x1 ? 36 : 34;
    const int64_t nb = n_in / 32;
    // per-block x scales and offset terms, once per call
    float * dx = ch_grow(&tls_deq, 2 * (size_t) nb * sizeof(float));
    float * xs = dx + nb;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t * xb = xq + b * xs_bytes;
        const ggml_fp16_t * hp = (const ggml_fp16_t *) xb;
        dx[b] = ch_h2f(hp[0]);
        if (x1) {
            xs[b] = ch_h2f(hp[1]);
        } else if (kind == CH_UQ4_0 || kind == CH_UQ5_0) {
            const int8_t * q = (const int8_t *) (xb + 2);
            int sum = 0;
            for (int e = 0; e < 32; e++) sum += q[e];
            xs[b] = (kind == CH_UQ4_0 ? -8.0f : -16.0f) * dx[b] * (float) sum;
        } else {
            xs[b] = 0.0f;
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
        ch_up_rows(kind, CH_UP_ROWS, rows, ts, xq, xs_bytes, dx, xs, nb, s + k);
    }
    for (; k < nk; k++) { // same per-row arithmetic as in a group: identical results
        const uint8_t * rows[1] = { (const uint8_t *) w + (size_t) kept[k] * nb1 };
        ch_up_rows(kind, 1, rows, ts, xq, xs_bytes, dx, xs, nb, s + k);
    }
}

#define CH_DEF_UP(name, kind) \
    static void name(const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk, const void * xq, \
                     float * s) { \
        ch_up_fast_kind(kind, w, nb1, n_in, kept, nk, xq, s); \
    }
CH_DEF_UP(ch_up_q8_0, CH_UQ8_0)
CH_DEF_UP(ch_up_q4_0, CH_UQ4_0)
CH_DEF_UP(ch_up_q4_1, CH_UQ4_1)
CH_DEF_UP(ch_up_q5_0, CH_UQ5_0)
CH_DEF_UP(ch_up_q5_1, CH_UQ5_1)
#undef CH_DEF_UP

// ---- K-quants (256-element super-blocks, x in Q8_K) ----
// Each super-block is 8 sub-blocks of 32: u8 levels q, an integer scale per 16 or 32 elements,
// one fp16 super-scale d (Q4_K also a 6-bit min per sub-block times dmin). Per row and
// super-block, sum_k sc_k * dot(q_k, x_k) is accumulated in int32 (maddubs pairs, then madd by
// the scales, as the quantization allows: |q| <= 63, |x| <= 127), then scaled once by d * d_x.
// Offsets (Q4_K mins, Q6_K's -32) come from Q8_K's per-16 sums of x (bsums).
enum { CH_UQ4_K, CH_UQ6_K };

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

// 32 u8 levels of sub-block s (elements 32s..32s+31 of the super-block)
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

static inline __attribute__((always_inline)) void ch_up_rows_k(const int kind, const int NR, const uint8_t * const * rows,
        size_t ts, const uint8_t * xq, int64_t nsb, float * sums) {
    __m256 acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
    for (int r = 0; r < NR; r++) {
        acc[r] = _mm256_setzero_ps();
        corr[r] = 0.0f;
    }
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t * xb = xq + b * 292; // block_q8_K: float d, int8 qs[256], int16 bsums[16]
        float dx;
        memcpy(&dx, xb, 4);
        const int16_t * bsums = (const int16_t *) (xb + 260);
        for (int r = 0; r < NR; r++) {
            const uint8_t * sb = rows[r] + b * ts;
            __m256i isum = _mm256_setzero_si256();
            int ioff;
            float d;
            if (kind == CH_UQ4_K) {
                int sc[8], mn[8];
                ioff = 0;
                for (int j = 0; j < 8; j++) {
                    ch_q4k_scale_min(sb + 4, j, &sc[j], &mn[j]);
                    ioff += mn[j] * (bsums[2 * j] + bsums[2 * j + 1]);
                }
                for (int j = 0; j < 8; j++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *) (xb + 4 + 32 * j));
                    const __m256i p = _mm256_maddubs_epi16(ch_k_levels(kind, sb, j), xv);
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, _mm256_set1_epi16((short) sc[j])));
                }
                const ggml_fp16_t * hp = (const ggml_fp16_t *) sb;
                d = ch_h2f(hp[0]) * dx;
                corr[r] = CH_FMA(-ch_h2f(hp[1]) * dx, (float) ioff, corr[r]);
            } else {
                const int8_t * sc = (const int8_t *) (sb + 192);
                // -32 * sum_k sc_k * bsums_k (the scale of x group k is scales[k])
                const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *) sc));
                const __m256i so = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *) bsums));
                __m128i o4 = _mm_add_epi32(_mm256_castsi256_si128(so), _mm256_extracti128_si256(so, 1));
                o4 = _mm_add_epi32(o4, _mm_shuffle_epi32(o4, 0x4E));
                o4 = _mm_add_epi32(o4, _mm_shuffle_epi32(o4, 0xB1));
                ioff = -32 * _mm_cvtsi128_si32(o4);
                for (int j = 0; j < 8; j++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *) (xb + 4 + 32 * j));
                    const __m256i p = _mm256_maddubs_epi16(ch_k_levels(kind, sb, j), xv);
                    // int16 lanes 0-7 are elements 0-15 (scale 2j), lanes 8-15 elements 16-31 (scale 2j+1)
                    const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, scv));
                }
                d = ch_h2f(*(const ggml_fp16_t *) (sb + 208)) * dx;
                corr[r] = CH_FMA(d, (float) ioff, corr[r]);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) {
        sums[r] = ch_hsum8(acc[r]) + corr[r];
    }
}

static inline __attribute__((always_inline)) void ch_up_fast_k(const int kind, const char * w, size_t nb1,
        int64_t n_in, const int32_t * kept, int64_t nk, const void * xq, float * s) {
    const size_t ts = kind == CH_UQ4_K ? 144 : 210;
    const int64_t nsb = n_in / 256;
    const size_t row_bytes = (size_t) nsb * ts;
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
        ch_up_rows_k(kind, CH_UP_ROWS, rows, ts, (const uint8_t *) xq, nsb, s + k);
    }
    for (; k < nk; k++) {
        const uint8_t * rows[1] = { (const uint8_t *) w + (size_t) kept[k] * nb1 };
        ch_up_rows_k(kind, 1, rows, ts, (const uint8_t *) xq, nsb, s + k);
    }
}

static void ch_up_q4_k(const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk, const void * xq,
                       float * s) {
    ch_up_fast_k(CH_UQ4_K, w, nb1, n_in, kept, nk, xq, s);
}
static void ch_up_q6_k(const char * w, size_t nb1, int64_t n_in, const int32_t * kept, int64_t nk, const void * xq,
                       float * s) {
    ch_up_fast_k(CH_UQ6_K, w, nb1, n_in, kept, nk, xq, s);
}
#endif

#if defined(CHESS_NEON)
// ---- NEON (aarch64) multi-row integer dot: the AVX2 up kernels above, on ARM ------------------
// Same scheme: CH_UP_ROWS rows per pass share each x block (Q8_0 / Q8_1 / Q8_K as ggml prepares
// it), one float accumulator vector per row, one horizontal sum per row at the end. The weight
// levels are made signed in the bytes (Q4_0 - 8, Q5_0 - 16, Q6_K - 32; Q4_1/Q5_1/Q4_K levels are
// valid s8 as they are) and multiplied by x's s8 with SDOT when the target has it
// (armv8.2-a+dotprod), else with widening multiplies + pairwise adds: exact in int32 either way
// (the two group the products into lanes differently, so their float results may differ in the
// last bits). Q4_1/Q5_1's min goes through Q8_1's stored d*sum(x), Q4_K's mins through Q8_K's
// per-16 sums, as on x86.
#define CH_UP_ROWS 4

enum { CH_NQ8_0, CH_NQ4_0, CH_NQ4_1, CH_NQ5_0, CH_NQ5_1 };
enum { CH_NQ4_K = 8, CH_NQ6_K };

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
    for (int r = 0; r < NR; r++) {
        acc[r] = vdupq_n_f32(0.0f);
        corr[r] = 0.0f;
    }
    const bool has_m = kind == CH_NQ4_1 || kind == CH_NQ5_1;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t * xb = (const int8_t *) (xq + b * xs_bytes + (has_m ? 4 : 2));
        const int8x16_t xl = vld1q_s8(xb), xh = vld1q_s8(xb + 16);
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
    if (kind == CH_NQ4_K) {
        const uint8_t * q = sb + 16 + 32 * (s / 2); // qs after d, dmin, scales[12]
        l = vld1q_u8(q);
        h = vld1q_u8(q + 16);
        if (s & 1) {
            l = vshrq_n_u8(l, 4);
            h = vshrq_n_u8(h, 4);
        } else {
            l = vandq_u8(l, m4);
            h = vandq_u8(h, m4);
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
// scaled once by d * d_x; Q4_K's mins from Q8_K's bsums.
static inline __attribute__((always_inline)) void ch_up_rows_k_neon(const int kind, const int NR,
        const uint8_t * const * rows, size_t ts, const uint8_t * xq, int64_t nsb, float * sums) {
    float32x4_t acc[CH_UP_ROWS];
    float corr[CH_UP_ROWS];
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
        for (int r = 0; r < NR; r++) {
            const uint8_t * sb = rows[r] + b * ts;
            int32x4_t isum = z;
            int8x16_t lo, hi;
            float d;
            if (kind == CH_NQ4_K) {
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
    for (int r = 0; r < NR; r++) {
        sums[r] = vaddvq_f32(acc[r]) + corr[r];
    }
}

// s[k] = dot(W_up[kept[k]], x), CH_UP_ROWS kept rows per pass, whole rows prefetched
// CH_UP_PF_ROWS kept rows ahead (as the x86 route)
static inline __attribute__((always_inline)) void ch_up_neon_kind(const int kind, const char * w, size_t nb1,
        int64_t n_in, const int32_t * kept, int64_t nk, const void * xq_, float * s) {
    const uint8_t * xq = (const uint8_t *) xq_;
    const bool kq = kind == CH_NQ4_K || kind == CH_NQ6_K;
    const size_t ts = kind == CH_NQ8_0 ? 34 : kind == CH_NQ4_0 ? 18 : kind == CH_NQ4_1 ? 20 :
                      kind == CH_NQ5_0 ? 22 : kind == CH_NQ5_1 ? 24 : kind == CH_NQ4_K ? 144 : 210;
    const bool x1 = kind == CH_NQ4_1 || kind == CH_NQ5_1; // x in Q8_1 (36-byte blocks with s)
    const size_t xs_bytes = x1 ? 36 : 34;
    const int64_t nb = n_in / (kq ? 256 : 32);
    float * dx = NULL, * xs = NULL;
    if (!kq) { // per-block x scales (and Q8_1's s), once per call
        dx = ch_grow(&tls_deq, 2 * (size_t) nb * sizeof(float));
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
CH_DEF_UP(ch_up_neon_q6_k, CH_NQ6_K)
#undef CH_DEF_UP

#if defined(__ARM_FEATURE_DOTPROD)
#define CH_NUPNAME(t) "dotprod-" t
#else
#define CH_NUPNAME(t) "neon-" t
#endif
#endif // CHESS_NEON

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CH_UPNAME(t) "vnni-" t
#else
#define CH_UPNAME(t) "avx2-" t
#endif

static ch_up_fn ch_up_fast(enum ggml_type type, const char ** name) {
#if defined(CHESS_AVX2)
    switch (ch_force_generic ? GGML_TYPE_COUNT : type) {
        case GGML_TYPE_Q8_0: *name = CH_UPNAME("q8_0"); return ch_up_q8_0;
        case GGML_TYPE_Q4_0: *name = CH_UPNAME("q4_0"); return ch_up_q4_0;
        case GGML_TYPE_Q4_1: *name = CH_UPNAME("q4_1"); return ch_up_q4_1;
        case GGML_TYPE_Q5_0: *name = CH_UPNAME("q5_0"); return ch_up_q5_0;
        case GGML_TYPE_Q5_1: *name = CH_UPNAME("q5_1"); return ch_up_q5_1;
        case GGML_TYPE_Q4_K: *name = "avx2-q4_K"; return ch_up_q4_k;
        case GGML_TYPE_Q6_K: *name = "avx2-q6_K"; return ch_up_q6_k;
        default: break;
    }
#elif defined(CHESS_NEON)
    switch (ch_force_generic ? GGML_TYPE_COUNT : type) {
        case GGML_TYPE_Q8_0: *name = CH_NUPNAME("q8_0"); return ch_up_neon_q8_0;
        case GGML_TYPE_Q4_0: *name = CH_NUPNAME("q4_0"); return ch_up_neon_q4_0;
        case GGML_TYPE_Q4_1: *name = CH_NUPNAME("q4_1"); return ch_up_neon_q4_1;
        case GGML_TYPE_Q5_0: *name = CH_NUPNAME("q5_0"); return ch_up_neon_q5_0;
        case GGML_TYPE_Q5_1: *name = CH_NUPNAME("q5_1"); return ch_up_neon_q5_1;
        case GGML_TYPE_Q4_K: *name = CH_NUPNAME("q4_K"); return ch_up_neon_q4_k;
        case GGML_TYPE_Q6_K: *name = CH_NUPNAME("q6_K"); return ch_up_neon_q6_k;
        default: break;
    }
#else
    (void) type;
#endif
    *name = "vec_dot";
    return NULL;
}

const char * chess_up_sparse_route(enum ggml_type type) {
    const char * name;
    ch_up_fast(type, &name);
    return name;
}

int64_t chess_up_sparse(const void * w_up, enum ggml_type type, size_t nb1, int64_t n_in,
                        const float * g, const float * tau, int64_t n_tau, enum chess_act act,
                        const void * xq, float * h, int64_t i0, int64_t i1) {
    if (i1 <= i0) {
        return 0;
    }
    const char * w = (const char *) w_up;

    // pass 1: decide the mask (cheap, sequential) so pass 2 can prefetch the next kept row
    int32_t * kept = ch_grow(&tls_list, (size_t) (i1 - i0) * (sizeof(int32_t) + 2 * sizeof(float)));
    float   * ka   = (float *) (kept + (i1 - i0));
    float   * ks   = ka + (i1 - i0);
    int64_t nk = 0;
    for (int64_t i = i0; i < i1; i++) {
        const float a = chess_act_apply(act, g[i]);
        if (!tau || fabsf(a) >= ch_thr(tau, n_tau, i)) {
            kept[nk] = (int32_t) i;
            ka[nk++] = a;
        }
        h[i] = 0.0f;
    }

    const char * name;
    const ch_up_fn fast = ch_up_fast(type, &name);
    if (fast) {
        fast(w, nb1, n_in, kept, nk, xq, ks);
        for (int64_t k = 0; k < nk; k++) {
            h[kept[k]] = ka[k] * ks[k];
        }
        return nk;
    }

    // generic: one ggml vec_dot per kept row. Kept rows are random jumps for the hardware
    // prefetcher: prefetch whole rows CH_UP_PF_ROWS ahead.
    const ggml_vec_dot_t vec_dot = ggml_get_type_traits_cpu(type)->vec_dot;
    const size_t row_bytes = ggml_row_size(type, n_in);
    for (int64_t k = 0; k < nk && k < CH_UP_PF_ROWS; k++) {
        ch_prefetch_bytes(w + (size_t) kept[k] * nb1, row_bytes);
    }
    for (int64_t k = 0; k < nk; k++) {
        if (k + CH_UP_PF_ROWS < nk) {
            ch_prefetch_bytes(w + (size_t) kept[k + CH_UP_PF_ROWS] * nb1, row_bytes);
        }
        float s;
        vec_dot((int) n_in, &s, 0, w + (size_t) kept[k] * nb1, 0, xq, 0, 1);
        h[kept[k]] = ka[k] * s;
    }
    return nk;
}

int64_t chess_up_sparse_ref(const void * w_up, enum ggml_type type, size_t nb1, int64_t n_in,
                            const float * g, const float * tau, int64_t n_tau, enum chess_act act,
                            const float * x, float * h, int64_t i0, int64_t i1) {
    float * row = malloc((size_t) n_in * sizeof(float));
    int64_t nk = 0;
    for (int64_t i = i0; i < i1; i++) {
        const float a = chess_act_apply(act, g[i]);
        h[i] = 0.0f;
        if (tau && !(fabsf(a) >= ch_thr(tau, n_tau, i))) {
            continue;
        }
        nk++;
        const void * src = (const char *) w_up + (size_t) i * nb1;
        if (type == GGML_TYPE_F32) {
            memcpy(row, src, (size_t) n_in * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, row, n_in);
        }
        float s = 0.0f;
        for (int64_t j = 0; j < n_in; j++) {
            s += row[j] * x[j];
        }
        h[i] = a * s;
    }
    free(row);
    return nk;
}

// ---------------------------------------------------------------------------------------------
// input-sparse mat-vec through a transposed weight

// Active inputs of [i0, i1) in increasing i: indices + coefficients, in thread-local scratch.
// Every thread of an op scans the whole input (cheap), so this is vectorized: with AVX-512 a
// register compress + full-width store (the memory form of vpcompress is microcoded on Zen 4).
static int64_t ch_active(const float * v, const float * thr, int64_t n_thr, int64_t i0, int64_t i1,
                         int32_t ** idx_out, float ** c_out) {
    const int64_t n = i1 > i0 ? i1 - i0 : 0;
    const int64_t cap = n + 16; // full-width stores may write up to 15 elements past the end
    int32_t * idx = ch_grow(&tls_list, (size_t) cap * (sizeof(int32_t) + sizeof(float)));
    float   * c   = (float *) (idx + cap);
    int64_t na = 0;
    int64_t i = i0;
#if defined(CHESS_AVX512)
    const __m512i step = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 t1 = _mm512_set1_ps(thr ? thr[0] : 0.0f);
    for (; i + 16 <= i1; i += 16) {
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
    for (; i < i1; i++) {
        const float vi = v[i];
        if (vi != 0.0f && (!thr || fabsf(vi) >= ch_thr(thr, n_thr, i))) {
            idx[na] = (int32_t) i;
            c[na++] = vi;
        }
    }
    *idx_out = idx;
    *c_out   = c;
    return na;
}

// acc[j] += c0*w0[j] + c1*w1[j] + c2*w2[j] + c3*w3[j], as a chain of 4 sequential FMAs
// (the same rounding as 4 single-row passes, so grouping rows never changes the result)
static void ch_axpy4(float * restrict acc, const float * restrict w0, const float * restrict w1,
                     const float * restrict w2, const float * restrict w3,
                     float c0, float c1, float c2, float c3, int64_t n) {
    int64_t j = 0;
#if defined(CHESS_AVX2)
    const __m256 vc0 = _mm256_set1_ps(c0), vc1 = _mm256_set1_ps(c1);
    const __m256 vc2 = _mm256_set1_ps(c2), vc3 = _mm256_set1_ps(c3);
    for (; j + 8 <= n; j += 8) {
        __m256 a = _mm256_loadu_ps(acc + j);
        a = _mm256_fmadd_ps(vc0, _mm256_loadu_ps(w0 + j), a);
        a = _mm256_fmadd_ps(vc1, _mm256_loadu_ps(w1 + j), a);
        a = _mm256_fmadd_ps(vc2, _mm256_loadu_ps(w2 + j), a);
        a = _mm256_fmadd_ps(vc3, _mm256_loadu_ps(w3 + j), a);
        _mm256_storeu_ps(acc + j, a);
    }
#elif defined(CHESS_NEON)
    for (; j + 4 <= n; j += 4) {
        float32x4_t a = vld1q_f32(acc + j);
        a = vfmaq_n_f32(a, vld1q_f32(w0 + j), c0);
        a = vfmaq_n_f32(a, vld1q_f32(w1 + j), c1);
        a = vfmaq_n_f32(a, vld1q_f32(w2 + j), c2);
        a = vfmaq_n_f32(a, vld1q_f32(w3 + j), c3);
        vst1q_f32(acc + j, a);
    }
#endif
    for (; j < n; j++) {
        float a = acc[j];
        a = CH_FMA(c0, w0[j], a);
        a = CH_FMA(c1, w1[j], a);
        a = CH_FMA(c2, w2[j], a);
        a = CH_FMA(c3, w3[j], a);
        acc[j] = a;
    }
}

static void ch_axpy1(float * restrict acc, const float * restrict w0, float c0, int64_t n) {
    int64_t j = 0;
#if defined(CHESS_AVX2)
    const __m256 vc0 = _mm256_set1_ps(c0);
    for (; j + 8 <= n; j += 8) {
        _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(vc0, _mm256_loadu_ps(w0 + j), _mm256_loadu_ps(acc + j)));
    }
#elif defined(CHESS_NEON)
    for (; j + 4 <= n; j += 4) {
        vst1q_f32(acc + j, vfmaq_n_f32(vld1q_f32(acc + j), vld1q_f32(w0 + j), c0));
    }
#endif
    for (; j < n; j++) {
        acc[j] = CH_FMA(c0, w0[j], acc[j]);
    }
}

#define CH_TILE_COLS 2048 // accumulator tile per pass over the active rows (8 KB of y: stays in L1)
#define CH_SUB_COLS   256 // columns dequantized per row at a time (4 rows x 1 KB of scratch)

// Generic route: any type with to_float. Per tile of y, per group of 4 active rows,
// dequantize the rows' block-aligned sub-range into scratch and FMA it into y.
static void ch_in_generic(const char * w, enum ggml_type type, size_t nb1, const int32_t * idx,
                          const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const int64_t bs  = ggml_blck_size(type);
    const size_t  ts  = ggml_type_size(type);
    const int64_t sub = ((CH_SUB_COLS + bs - 1) / bs) * bs;
    const int64_t tile = sub * (CH_TILE_COLS / CH_SUB_COLS);
    const ggml_to_float_t to_float = ggml_get_type_traits(type)->to_float;
    const bool is_f32 = type == GGML_TYPE_F32;
    float * tmp = is_f32 ? NULL : ch_grow(&tls_deq, 4 * (size_t) sub * sizeof(float));

    // row r, columns from col (block-aligned), as floats: F32 rows are read in place
#define CH_ROW(r, col, q) \
    (is_f32 ? (const float *) (w + (size_t) idx[r] * nb1) + (col) \
            : (to_float(w + (size_t) idx[r] * nb1 + (size_t) ((col) / bs) * ts, tmp + (q) * sub, ns), tmp + (q) * sub))

    for (int64_t jt = j0; jt < j1; jt += tile) {
        const int64_t nt = j1 - jt < tile ? j1 - jt : tile;
        float * acc = y + jt;
        memset(acc, 0, (size_t) nt * sizeof(float));
        const int64_t pfr = ch_pf_rows(is_f32 ? (size_t) nt * 4 : (size_t) ((nt + bs - 1) / bs) * ts);
        int64_t k = 0;
        for (; k + 4 <= na; k += 4) {
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : k; // see ch_in_avx2_kind
            for (int64_t js = 0; js < nt; js += sub) {
                const int64_t ns = nt - js < sub ? nt - js : sub;
                const int64_t col = jt + js;
                for (int q = 0; q < 4; q++) { // F32: bs 1, ts 4
                    ch_prefetch_bytes(w + (size_t) idx[kn + q] * nb1 + (size_t) (col / bs) * ts, (size_t) (ns / bs) * ts);
                }
                const float * r0 = CH_ROW(k + 0, col, 0);
                const float * r1 = CH_ROW(k + 1, col, 1);
                const float * r2 = CH_ROW(k + 2, col, 2);
                const float * r3 = CH_ROW(k + 3, col, 3);
                ch_axpy4(acc + js, r0, r1, r2, r3, c[k], c[k + 1], c[k + 2], c[k + 3], ns);
            }
        }
        for (; k < na; k++) {
            for (int64_t js = 0; js < nt; js += sub) {
                const int64_t ns = nt - js < sub ? nt - js : sub;
                ch_axpy1(acc + js, CH_ROW(k, jt + js, 0), c[k], ns);
            }
        }
    }
#undef CH_ROW
}

#if defined(CHESS_AVX2)
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
    float * bias = has_m ? ch_grow(&tls_deq, (tile / 32) * sizeof(float)) : NULL;
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
    float * bias = ch_grow(&tls_deq, (tile / 32) * sizeof(float));
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
#endif // CHESS_AVX2

#if defined(CHESS_NEON)
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
    float * bias = has_m ? ch_grow(&tls_deq, (tile / 32) * sizeof(float)) : NULL;
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
    float * bias = ch_grow(&tls_deq, (tile / 32) * sizeof(float));
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
#endif // CHESS_NEON

typedef void (*ch_in_fn)(const char *, size_t, size_t, const int32_t *, const float *, int64_t,
                         float *, int64_t, int64_t);

void chess_kernels_force_generic(bool on) {
    ch_force_generic = on;
}

#if defined(CHESS_AVX512)
#define CH_QNAME(t) "avx512-" t
#else
#define CH_QNAME(t) "avx2-" t
#endif

static ch_in_fn ch_in_fast(enum ggml_type type, const char ** name) {
#if defined(CHESS_AVX2)
    switch (ch_force_generic ? GGML_TYPE_COUNT : type) {
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
        default: break;
    }
#elif defined(CHESS_NEON)
    switch (ch_force_generic ? GGML_TYPE_COUNT : type) {
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
        default: break;
    }
#else
    (void) type;
#endif
    *name = "generic";
    return NULL;
}

// ---------------------------------------------------------------------------------------------
// x4: exact transposed 4-bit weights (chess_gguf/x4.py, docs/format.md). One I8 row per group g of
// 32 input channels: a f16[n_out] | b f16[n_out] | 32 x n_out/2 bytes of codes (per 32 outputs 16
// bytes, byte k = q[k] | q[k+16] << 4), w[j][32g+c] = a[j]*q + b[j]: the original's codes and
// block pairs, reordered, not requantized. Per group with active inputs:
//   t_j = sum over its active c of v_c * q_cj;   y_j += a_j * t_j + b_j * sum(v_c)
// so a weight costs one FMA per active input, plus two per output per group.

size_t chess_x4_row_bytes(int64_t n_out) {
    return (size_t) CHESS_X4_BYTES_PER_32 * (size_t) n_out;
}

bool chess_x4_ok(int64_t n_in, int64_t n_out) {
    return n_in > 0 && n_out > 0 && n_in % 32 == 0 && n_out % 32 == 0;
}

// t[0 .. 32*nb) += sum over the n inputs k of c[k] * codes of channel ch[k]; rows start at column j0
static void ch_x4_codes(const uint8_t * codes, size_t cs, const int32_t * ch, const float * c, int64_t n,
                        float * t, int64_t nb) {
    int64_t k = 0;
#if defined(CHESS_AVX2)
    if (!ch_force_generic) {
        for (; k + 4 <= n; k += 4) {
            const uint8_t * r[4] = { codes + ch[k] * cs, codes + ch[k + 1] * cs, codes + ch[k + 2] * cs, codes + ch[k + 3] * cs };
            const __m256 vc[4] = { _mm256_set1_ps(c[k]), _mm256_set1_ps(c[k + 1]), _mm256_set1_ps(c[k + 2]), _mm256_set1_ps(c[k + 3]) };
            for (int64_t b = 0; b < nb; b++) {
                __m256 a[4] = { _mm256_loadu_ps(t + 32*b), _mm256_loadu_ps(t + 32*b + 8),
                                _mm256_loadu_ps(t + 32*b + 16), _mm256_loadu_ps(t + 32*b + 24) };
                for (int q = 0; q < 4; q++) {
                    __m256 f[4];
                    ch_i8x32_to_ps(ch_nibbles(r[q] + 16*b), f);
                    for (int e = 0; e < 4; e++) {
                        a[e] = _mm256_fmadd_ps(vc[q], f[e], a[e]);
                    }
                }
                for (int e = 0; e < 4; e++) {
                    _mm256_storeu_ps(t + 32*b + 8*e, a[e]);
                }
            }
        }
    }
#elif defined(CHESS_NEON)
    if (!ch_force_generic) {
        for (; k + 4 <= n; k += 4) {
            const uint8_t * r[4] = { codes + ch[k] * cs, codes + ch[k + 1] * cs, codes + ch[k + 2] * cs, codes + ch[k + 3] * cs };
            for (int64_t b = 0; b < nb; b++) {
                ch_nacc32 a = ch_nacc_load(t + 32*b);
                for (int q = 0; q < 4; q++) {
                    const uint8x16_t v = vld1q_u8(r[q] + 16*b);
                    ch_neon_fma16(a.v,     vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), c[k + q]);
                    ch_neon_fma16(a.v + 4, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), c[k + q]);
                }
                ch_nacc_store(t + 32*b, a);
            }
        }
    }
#endif
    for (; k < n; k++) { // the same FMA per element and order as the vector bodies
        const uint8_t * r = codes + ch[k] * cs;
        for (int64_t b = 0; b < nb; b++) {
            for (int e = 0; e < 16; e++) {
                t[32*b + e]      = CH_FMA(c[k], (float) (r[16*b + e] & 15), t[32*b + e]);
                t[32*b + e + 16] = CH_FMA(c[k], (float) (r[16*b + e] >> 4), t[32*b + e + 16]);
            }
        }
    }
}

// y[j] += a[j] * t[j] + b[j] * s for j < n (n a multiple of 32)
static void ch_x4_affine(float * y, const float * t, const ggml_fp16_t * a, const ggml_fp16_t * b, float s, int64_t n) {
    int64_t j = 0;
#if defined(CHESS_AVX2)
    if (!ch_force_generic) {
        const __m256 vs = _mm256_set1_ps(s);
        for (; j < n; j += 8) {
            const __m256 va = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + j)));
            const __m256 vb = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (b + j)));
            const __m256 yj = _mm256_fmadd_ps(vb, vs, _mm256_loadu_ps(y + j));
            _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(t + j), yj));
        }
    }
#elif defined(CHESS_NEON)
    if (!ch_force_generic) {
        for (; j < n; j += 4) {
            const float32x4_t va = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (a + j))));
            const float32x4_t vb = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (b + j))));
            vst1q_f32(y + j, vfmaq_f32(vfmaq_n_f32(vld1q_f32(y + j), vb, s), va, vld1q_f32(t + j)));
        }
    }
#endif
    for (; j < n; j++) {
        y[j] = CH_FMA(ch_h2f(a[j]), t[j], CH_FMA(ch_h2f(b[j]), s, y[j]));
    }
}

// columns [j0, j1) (multiples of 32) from the active list (increasing input index)
static void ch_in_x4(const char * w, size_t nb1, int64_t n_out, const int32_t * idx, const float * c, int64_t na,
                     float * y, int64_t j0, int64_t j1) {
    const int64_t tile = CH_TILE_COLS;
    const size_t cs = (size_t) n_out / 2;
    float   * t  = ch_grow(&tls_deq, (size_t) tile * sizeof(float) + 32 * sizeof(int32_t));
    int32_t * ch = (int32_t *) (t + tile);
    for (int64_t jt = j0; jt < j1; jt += tile) {
        const int64_t nt = j1 - jt < tile ? j1 - jt : tile;
        memset(y + jt, 0, (size_t) nt * sizeof(float));
        for (int64_t k = 0; k < na; ) {
            const int32_t g = idx[k] >> 5;
            int64_t ke = k;
            float s = 0.0f;
            for (; ke < na && (idx[ke] >> 5) == g; ke++) {
                ch[ke - k] = idx[ke] & 31;
                s += c[ke];
            }
            const char * row = w + (size_t) g * nb1;
            const ggml_fp16_t * a = (const ggml_fp16_t *) row;
            // the next group's codes: its channels are known, the hardware prefetcher cannot guess them
            if (ke < na) {
                const char * nrow = w + (size_t) (idx[ke] >> 5) * nb1 + 4 * n_out + jt / 2;
                for (int64_t q = ke; q < na && (idx[q] >> 5) == (idx[ke] >> 5); q++) {
                    ch_prefetch_bytes(nrow + (size_t) (idx[q] & 31) * cs, (size_t) nt / 2);
                }
                ch_prefetch_bytes(w + (size_t) (idx[ke] >> 5) * nb1 + 2 * jt, 2 * (size_t) nt);
                ch_prefetch_bytes(w + (size_t) (idx[ke] >> 5) * nb1 + 2 * (n_out + jt), 2 * (size_t) nt);
            }
            memset(t, 0, (size_t) nt * sizeof(float));
            ch_x4_codes((const uint8_t *) row + 4 * n_out + jt / 2, cs, ch, c + k, ke - k, t, nt / 32);
            ch_x4_affine(y + jt, t, a + jt, a + n_out + jt, s, nt);
            k = ke;
        }
    }
}

// input channel i of an x4 weight as n_out floats, a*q + b: the layout's definition (references)
static void ch_x4_row(const char * wt, size_t nb1, int64_t n_out, int64_t i, float * row) {
    const char * r = wt + (size_t) (i / 32) * nb1;
    const uint8_t * q = (const uint8_t *) r + 4 * n_out + (size_t) (i % 32) * (n_out / 2);
    for (int64_t j = 0; j < n_out; j++) {
        const int code = j % 32 < 16 ? q[j / 32 * 16 + j % 32] & 15 : q[j / 32 * 16 + j % 32 - 16] >> 4;
        row[j] = ggml_fp16_to_fp32(((const ggml_fp16_t *) r)[j]) * (float) code +
                 ggml_fp16_to_fp32(((const ggml_fp16_t *) r)[n_out + j]);
    }
}

const char * chess_in_sparse_route(enum ggml_type type) {
    const char * name;
    if (type == CHESS_X4) {
#if defined(CHESS_AVX2)
        return ch_force_generic ? "generic-x4" : "avx2-x4";
#elif defined(CHESS_NEON)
        return ch_force_generic ? "generic-x4" : "neon-x4";
#else
        return "generic-x4";
#endif
    }
    ch_in_fast(type, &name);
    return name;
}

static void ch_in_run(const void * wt, enum ggml_type type, size_t nb1, const int32_t * idx, const float * c,
                      int64_t na, float * y, int64_t j0, int64_t j1) {
    const char * name;
    const ch_in_fn fast = ch_in_fast(type, &name);
    if (fast) {
        fast((const char *) wt, nb1, ggml_type_size(type), idx, c, na, y, j0, j1);
    } else {
        ch_in_generic((const char *) wt, type, nb1, idx, c, na, y, j0, j1);
    }
}

int64_t chess_in_sparse(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                        const float * v, const float * thr, int64_t n_thr, float * y, int64_t j0, int64_t j1) {
    int32_t * idx;
    float   * c;
    const int64_t na = ch_active(v, thr, n_thr, 0, n_in, &idx, &c);
    if (j1 > j0 && type == CHESS_X4) {
        ch_in_x4((const char *) wt, nb1, n_out, idx, c, na, y, j0, j1);
    } else if (j1 > j0) {
        ch_in_run(wt, type, nb1, idx, c, na, y, j0, j1);
    }
    return na;
}

int64_t chess_in_sparse_ref(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                            const float * v, const float * thr, int64_t n_thr, float * y, int64_t j0, int64_t j1) {
    float * row = malloc((size_t) n_out * sizeof(float));
    for (int64_t j = j0; j < j1; j++) {
        y[j] = 0.0f;
    }
    int64_t na = 0;
    for (int64_t i = 0; i < n_in; i++) {
        const float vi = v[i];
        if (!(vi != 0.0f && (!thr || fabsf(vi) >= ch_thr(thr, n_thr, i)))) {
            continue;
        }
        na++;
        const void * src = (const char *) wt + (size_t) (type == CHESS_X4 ? 0 : i) * nb1; // x4: rows of 32 inputs
        if (type == CHESS_X4) {
            ch_x4_row((const char *) wt, nb1, n_out, i, row);
        } else if (type == GGML_TYPE_F32) {
            memcpy(row, src, (size_t) n_out * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, row, n_out); // whole row: simplest, it's a reference
        }
        for (int64_t j = j0; j < j1; j++) {
            y[j] += vi * row[j];
        }
    }
    free(row);
    return na;
}

// ---------------------------------------------------------------------------------------------
// Re-transpose (compact layout): rows [j0, j1) of W = Wt^T in `dtype`, for ggml's dense matmul.
// Per tile of whole Wt blocks (>= 32 outputs) by ~8K/width inputs: dequantize each Wt row's part
// into a float tile (transposing on the fly), then quantize each tile row into its place.

bool chess_retranspose_ok(enum ggml_type dtype, int64_t n_in) {
    const struct ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(dtype);
    return (dtype == GGML_TYPE_F32 || (tc && tc->from_float)) && n_in % ggml_blck_size(dtype) == 0;
}

// x4 (j0, j1 multiples of 32): output row by output row, straight from the codes and pairs
static void ch_retranspose_x4(const char * wt, size_t nb1, int64_t n_in, int64_t n_out, void * w,
                              enum ggml_type dtype, int64_t j0, int64_t j1) {
    float * row = ch_grow(&tls_tile, (size_t) n_in * sizeof(float));
    const size_t cs = (size_t) n_out / 2, drow = ggml_row_size(dtype, n_in);
    const ggml_from_float_t from_float = dtype == GGML_TYPE_F32 ? NULL : ggml_get_type_traits_cpu(dtype)->from_float;
    for (int64_t j = j0; j < j1; j++) {
        const int shift = j % 32 < 16 ? 0 : 4;
        for (int64_t g = 0; g < n_in / 32; g++) {
            const char * r = wt + (size_t) g * nb1;
            const float a = ch_h2f(((const ggml_fp16_t *) r)[j]), b = ch_h2f(((const ggml_fp16_t *) r)[n_out + j]);
            const uint8_t * q = (const uint8_t *) r + 4 * n_out + j / 32 * 16 + j % 16;
            for (int c = 0; c < 32; c++) {
                row[32 * g + c] = a * (float) ((q[(size_t) c * cs] >> shift) & 15) + b;
            }
        }
        char * dst = (char *) w + (size_t) j * drow;
        if (from_float) {
            from_float(row, dst, n_in);
        } else {
            memcpy(dst, row, (size_t) n_in * sizeof(float));
        }
    }
}

void chess_retranspose(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                       void * w, enum ggml_type dtype, int64_t j0, int64_t j1) {
    if (type == CHESS_X4) {
        ch_retranspose_x4((const char *) wt, nb1, n_in, n_out, w, dtype, j0, j1);
        return;
    }
    const int64_t bs  = ggml_blck_size(type);
    const size_t  ts  = ggml_type_size(type);
    const int64_t tw  = bs >= 32 ? bs : 32;              // tile width: whole blocks, >= 32 outputs
    const int64_t dbs = ggml_blck_size(dtype);
    const size_t  drow = ggml_row_size(dtype, n_in);
    int64_t ic = (8192 / tw) / dbs * dbs;                // tile height: ~32 KB of floats
    if (ic < dbs) {
        ic = dbs;
    }
    float * tile = ch_grow(&tls_tile, (size_t) (tw * ic + tw) * sizeof(float));
    float * tmp  = tile + tw * ic;
    const ggml_to_float_t to_float = type == GGML_TYPE_F32 ? NULL : ggml_get_type_traits(type)->to_float;
    const ggml_from_float_t from_float = dtype == GGML_TYPE_F32 ? NULL : ggml_get_type_traits_cpu(dtype)->from_float;
    for (int64_t jt = j0; jt < j1; jt += tw) {
        const int64_t nj = j1 - jt < tw ? j1 - jt : tw;  // whole blocks (quantized rows are whole blocks)
        const size_t off = (size_t) (jt / bs) * ts;
        for (int64_t i0 = 0; i0 < n_in; i0 += ic) {
            const int64_t ni = n_in - i0 < ic ? n_in - i0 : ic;
            for (int64_t i = 0; i < ni; i++) {
                const char * src = (const char *) wt + (size_t) (i0 + i) * nb1 + off;
                if (to_float) {
                    to_float(src, tmp, nj);
                } else {
                    memcpy(tmp, src, (size_t) nj * sizeof(float));
                }
                for (int64_t jj = 0; jj < nj; jj++) {
                    tile[jj * ic + i] = tmp[jj];
                }
            }
            for (int64_t jj = 0; jj < nj; jj++) {
                char * dst = (char *) w + (size_t) (jt + jj) * drow + ggml_row_size(dtype, i0);
                if (from_float) {
                    from_float(tile + jj * ic, dst, ni);
                } else {
                    memcpy(dst, tile + jj * ic, (size_t) ni * sizeof(float));
                }
            }
        }
    }
}

void chess_retranspose_ref(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                           float * w) {
    float * row = malloc((size_t) n_out * sizeof(float));
    for (int64_t i = 0; i < n_in; i++) {
        const void * src = (const char *) wt + (size_t) (type == CHESS_X4 ? 0 : i) * nb1; // x4: rows of 32 inputs
        if (type == CHESS_X4) {
            ch_x4_row((const char *) wt, nb1, n_out, i, row);
        } else if (type == GGML_TYPE_F32) {
            memcpy(row, src, (size_t) n_out * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, row, n_out);
        }
        for (int64_t j = 0; j < n_out; j++) {
            w[j * n_in + i] = row[j];
        }
    }
    free(row);
}
