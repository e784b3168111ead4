// Tests the CHESS sparse kernels against their scalar references for every usable ggml type:
// odd shapes, several masks, 1..4 real threads (one range each), bit-identity across thread counts and splits.
//   test-chess-kernels            run the tests, last line "N passed, M failed"
//   test-chess-kernels all        also the types whose quantizer init takes seconds (IQ2_S, IQ1_M)
//   test-chess-kernels bench      also time the kernels against dense vec_dot (1 thread)
//   test-chess-kernels fast       only the types with a fast route (and their generic routes): the
//                                 second ARM build (make test-arm), whose other routes are the same code
#define _POSIX_C_SOURCE 200809L // clock_gettime under -std=c11
#include "chess-kernels.h"
#include "ggml-cpu.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// Bounds. up is checked twice:
// - against the reference run on the x the kernel really uses (xq converted back to float): only
//   the summation order differs, so 1e-9; but Q8_1 (vec_dot_type of Q4_1/Q5_1) stores d*sum(q) in
//   fp16 and vec_dot uses it for the min term (an absolute error ~1e-2 per dot in these tests),
//   hence 1e-4 there (seen: up to 2e-5 when a few rows with small dots and large |a_i| dominate);
// - against the reference on float x, only as a sanity check and only when >= 32 channels are
//   kept (an NMSE over a handful of values is noise): rounding x to Q8_0/Q8_1/Q8_K costs
//   ~3e-5..2e-4 NMSE on Gaussian data, up to ~7e-4 seen with 3-block rows (IQ1_M), so 2e-3;
//   F16/BF16 x ~1e-7..5e-6; F32 x is exact (1e-10).
// in: both sides use the same dequantized values; only FMA contraction, per-block offset sums
// and c*d rounding differ: 1e-10. x4 takes 8-bit activations (chess_in_sparse_input): 1e-10
// against the reference run on that input, and, as a sanity check, 1e-3 against the reference on
// the float input (8-bit rounding of Gaussian inputs: ~3e-5 NMSE).
#define NMSE_UP_TIGHT  1e-9
#define NMSE_UP_TIGHT1 1e-4
#define NMSE_UP_QUANT  2e-3
#define NMSE_UP_F32    1e-10
#define NMSE_IN        1e-10
#define NMSE_IN_Q8     1e-3

static int n_pass = 0, n_fail = 0;
static char g_shape[64]; // printed with failures

// ---- deterministic random numbers -----------------------------------------------------------
static uint64_t rng_state = 0x1234567887654321ULL;
static uint64_t rng_u64(void) { // splitmix64
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double rng_unif(void) { return (rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static float rng_gauss(void) {
    const double u1 = rng_unif() + 1e-300, u2 = rng_unif();
    return (float) (sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ---- helpers ---------------------------------------------------------------------------------
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static double nmse(const float * a, const float * ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        const double d = (double) a[i] - (double) ref[i];
        num += d * d;
        den += (double) ref[i] * (double) ref[i];
    }
    if (den == 0) {
        return num == 0 ? 0 : INFINITY;
    }
    return num / den;
}

static int cmp_float(const void * a, const void * b) {
    const float x = *(const float *) a, y = *(const float *) b;
    return (x > y) - (x < y);
}

// value below which a fraction q of |vals| lies (so thresholding at it drops about q)
static float quantile_abs(const float * vals, int64_t n, double q) {
    float * t = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        t[i] = fabsf(vals[i]);
    }
    qsort(t, n, sizeof(float), cmp_float);
    int64_t k = (int64_t) (q * n);
    if (k >= n) {
        k = n - 1;
    }
    const float r = t[k];
    free(t);
    return r;
}

static void * quantize_rows(enum ggml_type type, const float * src, int64_t nrows, int64_t ncols, size_t * nb1) {
    *nb1 = ggml_row_size(type, ncols);
    void * dst = malloc(*nb1 * nrows);
    ggml_quantize_chunk(type, src, dst, 0, nrows, ncols, NULL);
    return dst;
}

// Random weights of `type`. Block types: rows assembled from random blocks of a small quantized
// pool (ggml blocks are self-contained), because some IQ quantizers take ~20 us per element.
#define POOL_BLOCKS 64
static void * make_weights(enum ggml_type type, int64_t nrows, int64_t ncols, size_t * nb1) {
    const int64_t bs = ggml_blck_size(type);
    if (type == CHESS_X4) { // rows = input channels (a multiple of 32), ncols = outputs: random codes and pairs
        *nb1 = chess_x4_row_bytes(ncols);
        uint8_t * w = malloc(*nb1 * (nrows / 32));
        for (int64_t g = 0; g < nrows / 32; g++) {
            ggml_fp16_t * ab = (ggml_fp16_t *) (w + g * *nb1);
            for (int64_t j = 0; j < ncols; j++) {
                const float a = 0.02f * (0.25f + (float) rng_unif());
                ab[j] = ggml_fp32_to_fp16(a);
                ab[ncols + j] = ggml_fp32_to_fp16(-a * (float) (rng_u64() % 16));
            }
            for (size_t e = 4 * ncols; e < *nb1; e++) w[g * *nb1 + e] = (uint8_t) rng_u64();
        }
        return w;
    }
    if (bs == 1) {
        float * wf = malloc(nrows * ncols * sizeof(float));
        for (int64_t i = 0; i < nrows; i++) {
            const float sc = 0.25f + (float) rng_unif(); // rows of different scales
            for (int64_t j = 0; j < ncols; j++) wf[i * ncols + j] = sc * rng_gauss();
        }
        void * w = quantize_rows(type, wf, nrows, ncols, nb1);
        free(wf);
        return w;
    }
    const int64_t pool_n = POOL_BLOCKS * bs;
    const int64_t pool_row = bs >= 256 ? pool_n : ((256 + bs - 1) / bs) * bs; // K-quants want 256-multiples
    float * pf = malloc(pool_n * sizeof(float));
    for (int64_t b = 0; b < POOL_BLOCKS; b++) {
        const float sc = 0.25f + (float) rng_unif();
        for (int64_t e = 0; e < bs; e++) pf[b * bs + e] = sc * rng_gauss();
    }
    size_t pnb1;
    void * pool = quantize_rows(type, pf, pool_n / pool_row, pool_row, &pnb1);
    const size_t ts = ggml_type_size(type);
    *nb1 = ggml_row_size(type, ncols);
    char * w = malloc(*nb1 * nrows);
    for (int64_t i = 0; i < nrows; i++) {
        for (int64_t b = 0; b < ncols / bs; b++) {
            memcpy(w + i * *nb1 + b * ts, (const char *) pool + (rng_u64() % POOL_BLOCKS) * ts, ts);
        }
    }
    free(pf);
    free(pool);
    return w;
}

// xq (vec_dot_type) back to float: the x the up kernel really multiplies with
static void dequant_x(enum ggml_type vt, const void * xq, float * x, int64_t n) {
    switch (vt) {
        case GGML_TYPE_F32: memcpy(x, xq, n * sizeof(float)); break;
        case GGML_TYPE_F16: ggml_fp16_to_fp32_row(xq, x, n); break;
        case GGML_TYPE_BF16: ggml_bf16_to_fp32_row(xq, x, n); break;
        case GGML_TYPE_Q8_0:   // { fp16 d; int8 qs[32] }
        case GGML_TYPE_Q8_1: { // { fp16 d, s; int8 qs[32] }
            const size_t ts = ggml_type_size(vt), qo = vt == GGML_TYPE_Q8_0 ? 2 : 4;
            for (int64_t b = 0; b < n / 32; b++) {
                const uint8_t * blk = (const uint8_t *) xq + b * ts;
                const float d = ggml_fp16_to_fp32(*(const ggml_fp16_t *) blk);
                for (int e = 0; e < 32; e++) x[b * 32 + e] = d * ((const int8_t *) (blk + qo))[e];
            }
        } break;
        case GGML_TYPE_Q8_K: { // { float d; int8 qs[256]; int16 bsums[16] }
            const size_t ts = ggml_type_size(vt);
            for (int64_t b = 0; b < n / 256; b++) {
                const uint8_t * blk = (const uint8_t *) xq + b * ts;
                float d;
                memcpy(&d, blk, sizeof(float));
                for (int e = 0; e < 256; e++) x[b * 256 + e] = d * ((const int8_t *) (blk + 4))[e];
            }
        } break;
        default:
            fprintf(stderr, "dequant_x: unexpected vec_dot_type %s\n", ggml_type_name(vt));
            exit(2);
    }
}

static void fill_nan(float * p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        p[i] = NAN;
    }
}

// ---- masks -----------------------------------------------------------------------------------
// Thresholds for a vector `a` (the activations or the inputs): none, scalar, or per channel
// (CHESS-style tau_i = T / m_i with a random channel statistic m_i).
typedef struct {
    const char * name;
    int kind;      // 0 none (NULL), 1 scalar, 2 per-channel
    double drop;   // target dropped fraction (kinds 1, 2); drop >= 1 means threshold = +inf
} mask_def;

static const mask_def MASKS[] = {
    { "none",       0, 0.0 },
    { "scalar0",    1, 0.0 },
    { "scalar50",   1, 0.5 },
    { "scalar90",   1, 0.9 },
    { "chan50",     2, 0.5 },
    { "chan90",     2, 0.9 },
    { "all-drop",   1, 1.0 },
};
#define N_MASKS ((int) (sizeof(MASKS) / sizeof(MASKS[0])))

// returns the threshold array (NULL for kind 0) and its length in *n_t
static float * make_thresholds(const mask_def * m, const float * a, int64_t n, int64_t * n_t) {
    if (m->kind == 0) {
        *n_t = 0;
        return NULL;
    }
    if (m->kind == 1) {
        float * t = malloc(sizeof(float));
        t[0] = m->drop >= 1.0 ? INFINITY : m->drop == 0.0 ? 0.0f : quantile_abs(a, n, m->drop);
        *n_t = 1;
        return t;
    }
    float * t  = malloc(n * sizeof(float));
    float * s  = malloc(n * sizeof(float));
    float * am = calloc(n, sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        s[i] = 0.2f + 1.8f * (float) rng_unif();
        am[i] = fabsf(a[i]) * s[i];
    }
    const float T = quantile_abs(am, n, m->drop);
    for (int64_t i = 0; i < n; i++) {
        t[i] = T / s[i];
    }
    free(s);
    free(am);
    *n_t = n;
    return t;
}

// ---- threads ---------------------------------------------------------------------------------
typedef struct {
    int is_up;
    const void * w; enum ggml_type type; size_t nb1; int64_t n_in, n_rows_or_out;
    const float * gv; const float * t; int64_t n_t; enum chess_act act;
    const void * xq; float * out;
    int ith, nth;
    int64_t ret;
    chess_in_shared * sh; // is_up == 2: chess_in_sparse_mt on all threads
} job;

static void * job_run(void * p) {
    job * j = p;
    int64_t r0, r1;
    if (j->is_up == 1) {
        chess_thread_range(j->n_rows_or_out, 1, j->ith, j->nth, &r0, &r1);
        j->ret = chess_up_sparse(j->w, j->type, j->nb1, j->n_in, j->gv, j->t, j->n_t, j->act, j->xq, j->out, r0, r1);
    } else if (j->is_up == 2) {
        j->ret = chess_in_sparse_mt(j->w, j->type, j->nb1, j->n_in, j->n_rows_or_out, j->gv, j->t, j->n_t, j->out, j->sh, j->nth);
    } else {
        chess_thread_range(j->n_rows_or_out, chess_in_align(j->type), j->ith, j->nth, &r0, &r1);
        j->ret = chess_in_sparse(j->w, j->type, j->nb1, j->n_in, j->n_rows_or_out, j->gv, j->t, j->n_t, j->out, r0, r1);
    }
    return NULL;
}

// runs nth real threads; returns the sum (up) or the common value (in, -1 if they disagree)
static int64_t run_threads(job proto, int nth) {
    pthread_t th[8];
    job jobs[8];
    for (int i = 0; i < nth; i++) {
        jobs[i] = proto;
        jobs[i].ith = i;
        jobs[i].nth = nth;
        pthread_create(&th[i], NULL, job_run, &jobs[i]);
    }
    int64_t r = 0;
    for (int i = 0; i < nth; i++) {
        pthread_join(th[i], NULL);
        if (proto.is_up == 1) {
            r += jobs[i].ret;
        } else if (i == 0) {
            r = jobs[i].ret;
        } else if (jobs[i].ret != r) {
            r = -1;
        }
    }
    return r;
}

// ---- test groups -----------------------------------------------------------------------------
static int check(int ok, const char * what, const char * tname, const char * mname, int nth, double e) {
    if (ok) {
        n_pass++;
    } else {
        n_fail++;
        printf("  FAIL %-5s %-8s %s mask=%-8s nth=%d (nmse=%.3g)\n", what, tname, g_shape, mname, nth, e);
    }
    return ok;
}

static void test_up(enum ggml_type type) {
    const char * tname = ggml_type_name(type);
    const enum ggml_type vt = ggml_get_type_traits_cpu(type)->vec_dot_type;
    int64_t unit = ggml_blck_size(type) > ggml_blck_size(vt) ? ggml_blck_size(type) : ggml_blck_size(vt);
    const double bound = vt == GGML_TYPE_F32 ? NMSE_UP_F32 : NMSE_UP_QUANT;
    const double tight = vt == GGML_TYPE_Q8_1 ? NMSE_UP_TIGHT1 : NMSE_UP_TIGHT;
    const int64_t big = ((2300 / unit) | 1) * unit; // odd number of blocks, beyond one tile
    // 3, 5, 7, 10 blocks: every remainder of the routes that take 2 or 4 blocks per step
    const int64_t shapes[5][2] = { { 3 * unit, 37 }, { 7 * unit, 37 }, { big, 101 }, { 5 * unit, 19 }, { 10 * unit, 19 } };
    const int p0 = n_pass, f0 = n_fail;
    const double t0 = now_s();
    double worst = 0, worst_t = 0;
    for (int s = 0; s < 5; s++) {
        const int64_t n_in = shapes[s][0], n_ff = shapes[s][1];
        const enum chess_act act = s == 1 ? CHESS_ACT_GELU : CHESS_ACT_SILU;
        snprintf(g_shape, sizeof(g_shape), "%lldx%lld", (long long) n_ff, (long long) n_in);
        size_t nb1;
        void * w = make_weights(type, n_ff, n_in, &nb1);
        float * x = malloc(n_in * sizeof(float));
        float * g = malloc(n_ff * sizeof(float));
        float * a = malloc(n_ff * sizeof(float));
        for (int64_t i = 0; i < n_in; i++) x[i] = rng_gauss();
        for (int64_t i = 0; i < n_ff; i++) { g[i] = 2.0f * rng_gauss(); a[i] = chess_act_apply(act, g[i]); }
        void * xq = malloc(chess_x_size(type, n_in));
        chess_prepare_x(type, x, xq, n_in);
        check(memcmp(chess_prepare_x_tls(type, x, n_in), xq, chess_x_size(type, n_in)) == 0, "x_tls", tname, "-", 1, 0);
        float * xd = malloc(n_in * sizeof(float));
        dequant_x(vt, xq, xd, n_in);
        float * htgt = malloc(n_ff * sizeof(float)); // reference on the kernel's own x
        float * href = malloc(n_ff * sizeof(float));
        float * h1   = malloc(n_ff * sizeof(float));
        float * h    = malloc(n_ff * sizeof(float));

        for (int m = 0; m < N_MASKS; m++) {
            int64_t n_t;
            float * t = make_thresholds(&MASKS[m], a, n_ff, &n_t);
            fill_nan(href, n_ff);
            const int64_t kref = chess_up_sparse_ref(w, type, nb1, n_in, g, t, n_t, act, x, href, 0, n_ff);
            chess_up_sparse_ref(w, type, nb1, n_in, g, t, n_t, act, xd, htgt, 0, n_ff);
            for (int nth = 1; nth <= 4; nth++) {
                float * out = nth == 1 ? h1 : h;
                fill_nan(out, n_ff);
                job jb = { 1, w, type, nb1, n_in, n_ff, g, t, n_t, act, xq, out, 0, 0, 0, NULL };
                const int64_t k = run_threads(jb, nth);
                int ok = k == kref;
                // dropped channels exactly zero, no element left unwritten
                for (int64_t i = 0; i < n_ff; i++) {
                    const bool keep = !t || fabsf(a[i]) >= t[n_t == 1 ? 0 : i];
                    if (isnan(out[i]) || (!keep && out[i] != 0.0f)) ok = 0;
                }
                const double et = nmse(out, htgt, n_ff);
                const double e  = kref >= 32 ? nmse(out, href, n_ff) : 0.0;
                if (et > worst_t) worst_t = et;
                if (e > worst) worst = e;
                ok = ok && et < tight && e < bound;
                if (kref == 0) {
                    for (int64_t i = 0; i < n_ff; i++) ok = ok && out[i] == 0.0f;
                }
                if (nth > 1) ok = ok && memcmp(out, h1, n_ff * sizeof(float)) == 0;
                if (!ok && nth == 1) printf("  (kept %lld/%lld, nmse own-x %.3g, float-x %.3g)\n", (long long) kref, (long long) n_ff, et, e);
                check(ok, "up", tname, MASKS[m].name, nth, et > e ? et : e);
            }
            free(t);
        }
        free(w); free(x); free(g); free(a); free(xq); free(xd); free(htgt); free(href); free(h1); free(h);
    }
    printf("up  %-8s %-10s x as %-5s n_in %lld/%lld/%lld/%lld/%lld: %3d ok, %d failed, max nmse %.2g vs own-x ref, %.2g vs float-x ref (%.1f s)\n",
           tname, chess_up_sparse_route(type), ggml_type_name(vt), (long long) (3 * unit), (long long) (5 * unit),
           (long long) (7 * unit), (long long) (10 * unit), (long long) big,
           n_pass - p0, n_fail - f0, worst_t, worst, now_s() - t0);
}

static void test_in(enum ggml_type type) {
    const bool x4 = type == CHESS_X4; // inputs in groups of 32
    const char * tname = x4 ? "x4" : ggml_type_name(type);
    const int64_t bs = chess_in_align(type);
    const int64_t big = ((2300 / bs) | 1) * bs;
    // the last shape: many inputs into few outputs, so chess_in_sparse_mt cuts it into many pieces
    const int64_t shapes[5][2] = { { x4 ? 32 : 37, 3 * bs }, { x4 ? 96 : 37, 7 * bs }, { x4 ? 352 : 301, big }, { x4 ? 32 : 5, bs },
                                   { x4 ? 2080 : 2301, 3 * bs } };
    float * part = malloc((size_t) (CHESS_IN_MAX_PIECES - 1) * (size_t) big * sizeof(float));
    chess_in_shared sh = { 0, 0, part };
    // the x4 routes with int32 sums (VNNI, SDOT) compute what the generic route computes, in the
    // same order: their outputs must be bit-identical to it (avx2-x4 sums in int16 segments: not)
    const char * route = chess_in_sparse_route(type);
    const bool same_as_generic = x4 && (strstr(route, "vnni") || strstr(route, "avx512") || strstr(route, "sdot"));
    const int p0 = n_pass, f0 = n_fail;
    const double t0 = now_s();
    double worst = 0, worst_f = 0;
    int ok_sh = 1;
    for (int s = 0; s < 5; s++) {
        const int64_t n_in = shapes[s][0], n_out = shapes[s][1];
        snprintf(g_shape, sizeof(g_shape), "%lldx%lld", (long long) n_in, (long long) n_out);
        size_t nb1;
        void * w = make_weights(type, n_in, n_out, &nb1);
        float * v = malloc(n_in * sizeof(float));
        for (int64_t i = 0; i < n_in; i++) {
            v[i] = rng_unif() < 0.1 ? 0.0f : rng_gauss(); // exact zeros, as up_sparse leaves them
            if (x4 && s == 2) { // flat magnitudes: sum |u| of a group exceeds one int16 segment (2-3 segments)
                v[i] = v[i] == 0.0f ? 0.0f : 0.9f + 0.1f * (float) rng_unif(); // one sign: int16 sums would overflow
            }
        }
        float * yref = malloc(n_out * sizeof(float));
        float * y1   = malloc(n_out * sizeof(float));
        float * y    = malloc(n_out * sizeof(float));
        float * vz   = calloc(n_in, sizeof(float));
        float * veff = malloc(n_in * sizeof(float));
        float * yq   = malloc(n_out * sizeof(float));

        for (int m = 0; m <= N_MASKS; m++) {
            // last pass: all-zero input with no threshold
            const mask_def zero_def = { "v=0", 0, 0.0 };
            const mask_def * md = m < N_MASKS ? &MASKS[m] : &zero_def;
            const float * vv = m < N_MASKS ? v : vz;
            int64_t n_t;
            float * t = make_thresholds(md, vv, n_in, &n_t);
            fill_nan(yref, n_out);
            const int64_t kref = chess_in_sparse_ref(w, type, nb1, n_in, n_out, vv, t, n_t, yref, 0, n_out);
            // the input the kernel really multiplies with: active inputs, 8-bit for x4 (within half a step)
            chess_in_sparse_input(type, vv, t, n_t, n_in, veff);
            int ok_in = 1;
            for (int64_t g = 0; g < n_in; g += 32) {
                const int64_t ge = g + 32 < n_in ? g + 32 : n_in;
                float mx = 0;
                for (int64_t i = g; i < ge; i++) {
                    if (vv[i] != 0.0f && (!t || fabsf(vv[i]) >= t[n_t == 1 ? 0 : i])) mx = fmaxf(mx, fabsf(vv[i]));
                }
                for (int64_t i = g; i < ge; i++) {
                    const bool act = vv[i] != 0.0f && (!t || fabsf(vv[i]) >= t[n_t == 1 ? 0 : i]);
                    if (!act) ok_in = ok_in && veff[i] == 0.0f;
                    else if (x4) ok_in = ok_in && fabsf(veff[i] - vv[i]) <= mx / 254.0f * 1.0001f;
                    else ok_in = ok_in && veff[i] == vv[i];
                }
            }
            check(ok_in, "input", tname, md->name, 1, 0);
            fill_nan(yq, n_out);
            chess_in_sparse_ref(w, type, nb1, n_in, n_out, veff, NULL, 0, yq, 0, n_out);
            for (int it = 0; it < 8; it++) { // column ranges, then whole rows in pieces (_mt)
                const int nth = 1 + it % 4, mt = it >= 4;
                float * out = it == 0 ? y1 : y;
                fill_nan(out, n_out);
                job jb = { mt ? 2 : 0, w, type, nb1, n_in, n_out, vv, t, n_t, 0, NULL, out, 0, 0, 0, &sh };
                const int64_t k = run_threads(jb, nth);
                ok_sh = ok_sh && sh.next == 0 && sh.done == 0;
                int ok = k == kref;
                for (int64_t j = 0; j < n_out; j++) ok = ok && !isnan(out[j]);
                const double e = nmse(out, yq, n_out), ef = x4 ? nmse(out, yref, n_out) : 0.0;
                if (e > worst) worst = e;
                if (ef > worst_f) worst_f = ef;
                ok = ok && e < NMSE_IN && ef < NMSE_IN_Q8;
                if (kref == 0) {
                    for (int64_t j = 0; j < n_out; j++) ok = ok && out[j] == 0.0f;
                }
                if (it > 0) ok = ok && memcmp(out, y1, n_out * sizeof(float)) == 0; // any split, any threads
                check(ok, mt ? "in_mt" : "in", tname, md->name, nth, e);
            }
            if (same_as_generic) {
                chess_kernels_force_generic(true);
                job jb = { 0, w, type, nb1, n_in, n_out, vv, t, n_t, 0, NULL, y, 0, 0, 0, &sh };
                fill_nan(y, n_out);
                run_threads(jb, 1);
                chess_kernels_force_generic(false);
                check(memcmp(y, y1, n_out * sizeof(float)) == 0, "in == generic bit for bit", tname, md->name, 1, 0);
            }
            free(t);
        }
        free(w); free(v); free(yref); free(y1); free(y); free(vz); free(veff); free(yq);
    }
    check(ok_sh, "in_mt shared block zeroed after each product", tname, "-", 0, 0);
    free(part);
    printf("in  %-8s %-10s n_out %lld/%lld/%lld: %3d ok, %d failed, max nmse %.2g vs the ref on the kernel's input",
           tname, chess_in_sparse_route(type), (long long) (3 * bs), (long long) (7 * bs), (long long) big,
           n_pass - p0, n_fail - f0, worst);
    if (x4) printf(", %.2g vs the ref on float input", worst_f);
    printf(" (%.1f s)\n", now_s() - t0);
}

// ---- re-transpose (compact layout) -----------------------------------------------------------
typedef struct {
    const void * wt; enum ggml_type type, dtype; size_t nb1; int64_t n_in, n_out; void * w;
    int ith, nth;
} rt_job;

static void * rt_run(void * arg) {
    const rt_job * j = arg;
    int64_t r0, r1;
    chess_thread_range(j->n_out, chess_in_align(j->type), j->ith, j->nth, &r0, &r1);
    chess_retranspose(j->wt, j->type, j->nb1, j->n_in, j->n_out, j->w, j->dtype, r0, r1);
    return NULL;
}

// Each output row must be bit-identical to the output type's own quantizer run on the reference
// row (Wt dequantized and transposed): the kernel only moves values, so there is no tolerance.
static void test_retranspose(enum ggml_type type) {
    const bool x4 = type == CHESS_X4; // inputs in groups of 32
    const char * tname = x4 ? "x4" : ggml_type_name(type);
    const int64_t bs = chess_in_align(type);
    const int p0 = n_pass, f0 = n_fail;
    const enum ggml_type dtypes[2] = { GGML_TYPE_Q8_0, GGML_TYPE_F32 };
    for (int d = 0; d < 2; d++) {
        const enum ggml_type dt = dtypes[d];
        // n_in: multiples of the output block (odd for F32); n_out: whole blocks of the Wt type
        const bool odd = dt == GGML_TYPE_F32 && !x4;
        const int64_t shapes[3][2] = { { odd ? 37 : 32, 3 * bs }, { odd ? 301 : 96, 7 * bs },
                                       { odd ? 2333 : 2336, ((700 / bs) | 1) * bs } };
        for (int s = 0; s < 3; s++) {
            const int64_t n_in = shapes[s][0], n_out = shapes[s][1];
            snprintf(g_shape, sizeof(g_shape), "%lldx%lld->%s", (long long) n_in, (long long) n_out, ggml_type_name(dt));
            size_t nb1;
            void * wt = make_weights(type, n_in, n_out, &nb1);
            float * ref = malloc(n_in * n_out * sizeof(float));
            chess_retranspose_ref(wt, type, nb1, n_in, n_out, ref);
            const size_t drow = ggml_row_size(dt, n_in);
            char * want = malloc(drow * n_out), * got = malloc(drow * n_out);
            for (int64_t j = 0; j < n_out; j++) {
                if (dt == GGML_TYPE_F32) memcpy(want + j * drow, ref + j * n_in, drow);
                else ggml_get_type_traits_cpu(dt)->from_float(ref + j * n_in, want + j * drow, n_in);
            }
            for (int nth = 1; nth <= 4; nth++) {
                memset(got, 0xA5, drow * n_out);
                pthread_t th[4];
                rt_job jobs[4];
                for (int i = 0; i < nth; i++) {
                    jobs[i] = (rt_job) { wt, type, dt, nb1, n_in, n_out, got, i, nth };
                    pthread_create(&th[i], NULL, rt_run, &jobs[i]);
                }
                for (int i = 0; i < nth; i++) pthread_join(th[i], NULL);
                check(chess_retranspose_ok(dt, n_in) && memcmp(got, want, drow * n_out) == 0, "retr", tname, "-", nth, 0);
            }
            free(wt); free(ref); free(want); free(got);
        }
    }
    printf("retranspose %-8s to q8_0/f32: %d ok, %d failed\n", tname, n_pass - p0, n_fail - f0);
}

static void test_thread_range(void) {
    const int p0 = n_pass, f0 = n_fail;
    const int64_t ns[] = { 0, 1, 31, 32, 33, 96, 1000, 4096 };
    const int64_t aligns[] = { 1, 32, 256 };
    for (size_t a = 0; a < 3; a++) {
        for (size_t k = 0; k < sizeof(ns) / sizeof(ns[0]); k++) {
            for (int nth = 1; nth <= 8; nth++) {
                int64_t prev = 0;
                int ok = 1;
                for (int ith = 0; ith < nth; ith++) {
                    int64_t r0, r1;
                    chess_thread_range(ns[k], aligns[a], ith, nth, &r0, &r1);
                    ok = ok && r0 == prev && r1 >= r0 && (r0 % aligns[a] == 0 || r0 == ns[k]) && (r1 % aligns[a] == 0 || r1 == ns[k]);
                    prev = r1;
                }
                ok = ok && prev == ns[k];
                check(ok, "range", "-", "-", nth, 0);
            }
        }
    }
    printf("chess_thread_range: %d ok, %d failed\n", n_pass - p0, n_fail - f0);
}

// ---- optional benchmark ----------------------------------------------------------------------
// Decode-like timing, 1 thread, weights streamed from DRAM: enough copies of each matrix to
// overflow the L3, rotated per call. Each sparse call is paired with a dense call right before it
// and the median of the per-round time ratios is reported (robust on a shared machine).
// up: W_up (n_ff rows of n_embd) vs dense vec_dot over it. in: a transposed W_down (n_ff rows of
// n_embd) vs dense vec_dot over W_down (n_embd rows of n_ff).
typedef struct {
    enum ggml_type type;
    int64_t n_embd, n_ff;
    int nc;
    void ** up, ** dn, ** wt;
    size_t nb_up, nb_dn, nb_t;
    void * xe, * xf;
    float * g, * v, * out;
} bench_ctx;

static void ** make_copies(enum ggml_type type, int64_t nrows, int64_t ncols, size_t * nb1, int nc) {
    void ** ws = malloc(nc * sizeof(void *));
    ws[0] = make_weights(type, nrows, ncols, nb1);
    for (int i = 1; i < nc; i++) {
        ws[i] = malloc(*nb1 * nrows);
        memcpy(ws[i], ws[0], *nb1 * nrows);
    }
    return ws;
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// what: 1 = up (tau), 2 = in (v); returns the median sparse/dense time ratio
static double bench_ratio(const bench_ctx * b, int what, float tau) {
    const ggml_vec_dot_t vd = ggml_get_type_traits_cpu(b->type)->vec_dot;
    enum { ROUNDS = 9 };
    double r[ROUNDS];
    for (int round = 0; round < ROUNDS; round++) {
        double td = 0, ts = 0;
        for (int c = 0; c < b->nc; c++) {
            const double t0 = now_s();
            if (what == 1) {
                const char * w = b->up[c];
                for (int64_t i = 0; i < b->n_ff; i++) vd((int) b->n_embd, &b->out[i], 0, w + i * b->nb_up, 0, b->xe, 0, 1);
            } else {
                const char * w = b->dn[c];
                for (int64_t i = 0; i < b->n_embd; i++) vd((int) b->n_ff, &b->out[i], 0, w + i * b->nb_dn, 0, b->xf, 0, 1);
            }
            const double t1 = now_s();
            const int c2 = (c + b->nc / 2) % b->nc; // not the copy the dense call just touched
            if (what == 1) {
                chess_up_sparse(b->up[c2], b->type, b->nb_up, b->n_embd, b->g, &tau, 1, CHESS_ACT_SILU, b->xe, b->out, 0, b->n_ff);
            } else {
                chess_in_sparse(b->wt[c2], b->type, b->nb_t, b->n_ff, b->n_embd, b->v, NULL, 0, b->out, 0, b->n_embd);
            }
            ts += now_s() - t1;
            td += t1 - t0;
        }
        r[round] = ts / td;
    }
    qsort(r, ROUNDS, sizeof(double), cmp_double);
    return r[ROUNDS / 2];
}

static void bench_type(enum ggml_type type, int64_t n_embd, int64_t n_ff) {
    bench_ctx b = { .type = type, .n_embd = n_embd, .n_ff = n_ff };
    b.nc = (int) ((96u << 20) / ggml_row_size(type, n_embd * n_ff)) + 2;
    b.up = make_copies(type, n_ff, n_embd, &b.nb_up, b.nc);
    b.dn = make_copies(type, n_embd, n_ff, &b.nb_dn, b.nc);
    b.wt = make_copies(type, n_ff, n_embd, &b.nb_t, b.nc);
    float * x = malloc(n_ff * sizeof(float)), * a = malloc(n_ff * sizeof(float));
    b.g = malloc(n_ff * sizeof(float));
    b.v = malloc(n_ff * sizeof(float));
    b.out = malloc(n_ff * sizeof(float));
    for (int64_t i = 0; i < n_ff; i++) { x[i] = rng_gauss(); b.g[i] = rng_gauss(); a[i] = chess_act_apply(CHESS_ACT_SILU, b.g[i]); }
    b.xe = malloc(chess_x_size(type, n_embd));
    b.xf = malloc(chess_x_size(type, n_ff));
    chess_prepare_x(type, x, b.xe, n_embd);
    chess_prepare_x(type, x, b.xf, n_ff);
    printf("bench %-6s %lldx%lld, sparse/dense time:", ggml_type_name(type), (long long) n_embd, (long long) n_ff);
    const double drops[] = { 0.0, 0.5, 0.7, 0.9 };
    for (int d = 0; d < 4; d++) {
        const float tau = drops[d] == 0 ? 0.0f : quantile_abs(a, n_ff, drops[d]);
        for (int64_t i = 0; i < n_ff; i++) b.v[i] = rng_unif() < drops[d] ? 0.0f : rng_gauss();
        const double ru = bench_ratio(&b, 1, tau), ri = bench_ratio(&b, 2, 0);
        printf(" %2.0f%%: up %.2f in %.2f |", 100 * drops[d], ru, ri);
    }
    printf(" in route %s\n", chess_in_sparse_route(type));
    for (int i = 0; i < b.nc; i++) { free(b.up[i]); free(b.dn[i]); free(b.wt[i]); }
    free(b.up); free(b.dn); free(b.wt); free(x); free(a); free(b.g); free(b.v); free(b.out); free(b.xe); free(b.xf);
}

int main(int argc, char ** argv) {
    // all: also the types whose quantizer init takes seconds; fast: only the types with a fast
    // route (and their generic routes), for a second build whose other routes are the same code
    bool all = false, bench = false, fast_only = false;
    for (int i = 1; i < argc; i++) {
        all       = all       || strcmp(argv[i], "all") == 0;
        bench     = bench     || strcmp(argv[i], "bench") == 0;
        fast_only = fast_only || strcmp(argv[i], "fast") == 0;
    }
    ggml_cpu_init();
    const double t0 = now_s();
    test_thread_range();
    for (int ti = 0; ti < GGML_TYPE_COUNT; ti++) {
        const enum ggml_type type = (enum ggml_type) ti;
        const struct ggml_type_traits * tt = ggml_get_type_traits(type);
        if (!tt || !tt->type_name || tt->blck_size <= 0) {
            continue; // removed type ids
        }
        if (!chess_type_supported(type)) {
            printf("skip %-8s: not supported (no to_float or no CPU vec_dot)\n", tt->type_name);
            continue;
        }
        if (ggml_quantize_requires_imatrix(type)) {
            printf("skip %-8s: quantization requires an imatrix\n", tt->type_name);
            continue;
        }
        if (!all && (type == GGML_TYPE_IQ2_S || type == GGML_TYPE_IQ1_M)) {
            // same generic routes as the other IQ types; their grid init alone takes 6-13 s
            printf("skip %-8s: quantizer init takes seconds (run with 'all')\n", tt->type_name);
            continue;
        }
        const bool fast_up = strcmp(chess_up_sparse_route(type), "vec_dot") != 0;
        const bool fast_in = strcmp(chess_in_sparse_route(type), "generic") != 0;
        if (fast_only && !fast_up && !fast_in) {
            printf("skip %-8s: no fast route ('fast')\n", tt->type_name);
            continue;
        }
        test_up(type);
        test_in(type);
        test_retranspose(type);
        // the generic routes must stay correct too
        if (fast_up || fast_in) {
            chess_kernels_force_generic(true);
            if (fast_up) test_up(type);
            if (fast_in) test_in(type);
            chess_kernels_force_generic(false);
        }
    }
    test_in(CHESS_X4);
    test_retranspose(CHESS_X4);
    chess_kernels_force_generic(true);
    test_in(CHESS_X4);
    chess_kernels_force_generic(false);
    printf("nmse bounds: up %.0e (x as q8_1: %.0e) vs own-x ref, %.0e (f32: %.0e) vs float-x ref; in %.0e. took %.1f s\n",
           NMSE_UP_TIGHT, NMSE_UP_TIGHT1, NMSE_UP_QUANT, NMSE_UP_F32, NMSE_IN, now_s() - t0);
    if (bench) {
        // Qwen2.5-0.5B FFN shape (n_embd 896, n_ff 4864)
        const enum ggml_type bt[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                                      GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_IQ4_NL, GGML_TYPE_Q4_K,
                                      GGML_TYPE_Q6_K };
        for (size_t i = 0; i < sizeof(bt) / sizeof(bt[0]); i++) {
            bench_type(bt[i], bt[i] == GGML_TYPE_Q4_K || bt[i] == GGML_TYPE_Q6_K ? 1024 : 896, 4864);
        }
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
