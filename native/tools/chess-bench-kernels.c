// chess-bench-kernels: times each CHESS sparse kernel against ggml's dense mul_mat on the same
// weights, for one token, through ggml's own graph executor and thread pool (so both sides pay the
// same per-node scheduling cost). The dense side runs as the ORIGINAL model runs it: weights that
// ggml-cpu repacks into interleaved rows (x86: Q4_0, Q4_K, IQ4_NL, ...) are repacked here too.
//
//   chess-bench-kernels MODEL.chess.gguf [--keep 0.5] [--threads 2] [--reps 15] [--layer L] [--mb 96]
//   chess-bench-kernels --synthetic TYPE --shape INxOUT[,INxOUT...] [--wt x4|requant|TYPE] [...]
//
// Model mode: the four sparse kernels of one layer (ffn_up, ffn_down, attn_q, attn_o) on the file's
// own weights. Synthetic mode: random weights of TYPE, for every shape both kernels: `up` (an
// output-sparse W_up of IN inputs and OUT rows) and `in` (an input-sparse W of IN inputs and OUT
// outputs through the transposed copy convert would write: x4 for 4-bit types, else the requant rule;
// --wt overrides it). Prints one JSON object on stdout, one entry per kernel with the route taken,
// both times, the speedup (dense time / sparse time), the weight bytes each side reads and their
// ratio (the memory-bound limit of the speedup).
//
// Why copies: a decoded token streams every layer's weights from DRAM. Timing one matrix over and
// over would measure it hot in cache, so each graph applies the kernel to enough copies of the
// weights (--mb, default 96 MB: above this machine's 32 MB L3) and the time is reported per copy.
// Dense and sparse graphs run interleaved, alternating which goes first; figures are medians.
#define _POSIX_C_SOURCE 200809L // clock_gettime under -std=c11
#include "chess-kernels.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static uint64_t rng = 0x2545F4914F6CDD1DULL;
static uint64_t rng_u64(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
static float rng_unif(void) { return (float) ((rng_u64() >> 40) * (1.0 / 16777216.0)); }
static float rng_gauss(void) {
    const float u1 = rng_unif() + 1e-7f, u2 = rng_unif();
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static double median(double * v, int n) {
    qsort(v, n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void die(const char * msg, const char * arg) {
    fprintf(stderr, "chess-bench-kernels: %s%s\n", msg, arg ? arg : "");
    exit(1);
}

// ---- the sparse ops, as the runtime's graph runs them (see native/src/chess-graph.cpp) ----------

// src: 0 gate f32 [n_ff], 1 x f32 [n_in], 2 W_up, 3 tau f32 [n_ff]
static void up_op(struct ggml_tensor * dst, int ith, int nth, void * ud) {
    (void) ud;
    const struct ggml_tensor * g = dst->src[0], * x = dst->src[1], * w = dst->src[2], * tau = dst->src[3];
    int64_t i0, i1;
    chess_thread_range(dst->ne[0], 16, ith, nth, &i0, &i1);
    const void * xq = chess_prepare_x_tls(w->type, (const float *) x->data, x->ne[0]);
    chess_up_sparse(w->data, w->type, w->nb[1], x->ne[0], (const float *) g->data, (const float *) tau->data,
                    tau->ne[0], CHESS_ACT_SILU, xq, (float *) dst->data, i0, i1);
}

// src: 0 v f32 [n_in], 1 Wt; all threads on whole rows, as the runtime decodes (chess_in_sparse_mt);
// CHESS_BENCH_IN_SPLIT=cols: each thread a slice of the output columns (how batches of a few tokens run)
static chess_in_shared g_in_shared;
static void in_op(struct ggml_tensor * dst, int ith, int nth, void * ud) {
    (void) ud;
    const struct ggml_tensor * v = dst->src[0], * wt = dst->src[1];
    static int cols = -1;
    if (cols < 0) {
        const char * e = getenv("CHESS_BENCH_IN_SPLIT");
        cols = e && !strcmp(e, "cols");
    }
    if (!cols) {
        chess_in_sparse_mt(wt->data, wt->type, wt->nb[1], v->ne[0], dst->ne[0], (const float *) v->data, NULL, 0,
                           (float *) dst->data, &g_in_shared, nth);
        return;
    }
    int64_t j0, j1;
    chess_thread_range(dst->ne[0], chess_in_align(wt->type), ith, nth, &j0, &j1);
    chess_in_sparse(wt->data, wt->type, wt->nb[1], v->ne[0], dst->ne[0], (const float *) v->data, NULL, 0,
                    (float *) dst->data, j0, j1);
}

// ---- one kernel case: a dense weight and the weight the sparse kernel reads -------------------

typedef struct {
    char name[96];
    bool up;                 // output-sparse up kernel (else input-sparse through a transposed weight)
    enum ggml_type dtype;    // dense: n_out rows of n_in, plain ggml layout
    int64_t n_in, n_out;
    void * dense;
    enum ggml_type stype;    // the sparse kernel's weight (up: the dense data itself)
    int64_t sne0, sne1;      // its tensor shape (x4: [20 * n_out, n_in / 32]; else [n_out, n_in])
    void * sparse;
} kcase;

// ggml-cpu's repack buffer type when it would hold this dense weight for a mul_mat, as llama.cpp's
// loader decides (weight_buft_supported), else NULL: the original model runs such weights repacked.
static ggml_backend_buffer_type_t repack_buft(enum ggml_type type, int64_t n_in, int64_t n_out) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) return NULL;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    void * fn = ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_dev_get_extra_bufts_t get;
    memcpy(&get, &fn, sizeof get); // object to function pointer, as dlsym users do
    if (!get) return NULL;
    for (ggml_backend_buffer_type_t * b = get(dev); b && *b; b++) {
        struct ggml_init_params ip = { 8 * ggml_tensor_overhead(), NULL, true };
        struct ggml_context * ctx = ggml_init(ip);
        struct ggml_tensor * w = ggml_new_tensor_2d(ctx, type, n_in, n_out);
        struct ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_in, 512);
        struct ggml_tensor * op = ggml_mul_mat(ctx, w, x);
        ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(*b, 0);
        w->buffer = dummy;
        const bool ok = ggml_backend_dev_supports_op(dev, op);
        ggml_backend_buffer_free(dummy);
        ggml_free(ctx);
        if (ok && strstr(ggml_backend_buft_name(*b), "REPACK")) return *b;
    }
    return NULL;
}

// bytes the sparse kernel reads at kept fraction `keep` (x4: the pairs of every group, the codes
// of the kept channels; rows otherwise); the dense kernel reads all of its weight
static double sparse_bytes(const kcase * k, double keep) {
    if (k->up) return keep * (double) ggml_row_size(k->dtype, k->n_in) * (double) k->n_out;
    if (k->stype == CHESS_X4) {
        const double groups = (double) (k->n_in / 32), all_dropped = pow(1.0 - keep, 32);
        return groups * (1.0 - all_dropped) * 4.0 * (double) k->n_out + keep * (double) k->n_in * (double) k->n_out / 2.0;
    }
    return keep * (double) ggml_row_size(k->stype, k->n_out) * (double) k->n_in;
}

static size_t sparse_nbytes(const kcase * k) {
    return k->stype == CHESS_X4 ? (size_t) k->sne0 * (size_t) k->sne1 : ggml_row_size(k->stype, k->sne0) * (size_t) k->sne1;
}

static void bench_case(const kcase * k, float keep, int nth, int reps, double budget_mb, struct ggml_threadpool * tp,
                       bool first) {
    const size_t dbytes = ggml_row_size(k->dtype, k->n_in) * (size_t) k->n_out;
    const size_t sbytes = k->up ? dbytes : sparse_nbytes(k);
    int nc = (int) ceil(budget_mb * 1e6 / (double) (dbytes < sbytes ? dbytes : sbytes));
    nc = nc < 2 ? 2 : nc > 256 ? 256 : nc;
    ggml_backend_buffer_type_t rbuft = repack_buft(k->dtype, k->n_in, k->n_out);
    if (!k->up) {
        g_in_shared.part = realloc(g_in_shared.part, (size_t) (CHESS_IN_MAX_PIECES - 1) * (size_t) k->n_out * sizeof(float));
        if (!g_in_shared.part) die("out of memory", NULL);
    }

    // dense weights: their own no-alloc context in the repack (or plain CPU) buffer; the rest of the
    // tensors (sparse weights, vectors, graph nodes) in an allocating context
    struct ggml_init_params wp = { (size_t) (nc + 4) * ggml_tensor_overhead(), NULL, true };
    struct ggml_context * wctx = ggml_init(wp);
    struct ggml_tensor ** wd = malloc(nc * sizeof(*wd));
    for (int c = 0; c < nc; c++) wd[c] = ggml_new_tensor_2d(wctx, k->dtype, k->n_in, k->n_out);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, rbuft ? rbuft : ggml_backend_cpu_buffer_type());
    if (!wbuf) die("out of memory for the dense weights", NULL);
    for (int c = 0; c < nc; c++) ggml_backend_tensor_set(wd[c], k->dense, 0, dbytes); // repacks, where repacked

    const size_t vec = (size_t) (4 * (k->n_in + k->n_out)) * 4 + 256;
    const size_t mem = (size_t) nc * (sbytes + 256) + (size_t) nc * (2 * vec) +
                       2 * ggml_graph_overhead_custom(4 * nc + 8, false) + (8 * nc + 16) * ggml_tensor_overhead() + (1 << 20);
    struct ggml_init_params ip = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    if (!ctx) die("out of memory for the sparse weights", NULL);
    struct ggml_tensor * x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, k->n_in);
    struct ggml_tensor * g = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, k->n_out);
    for (int64_t i = 0; i < k->n_in; i++) ((float *) x->data)[i] = rng_gauss();
    for (int64_t i = 0; i < k->n_out; i++) ((float *) g->data)[i] = rng_gauss();

    // the up kernel reads the plain rows (the runtime keeps W_up out of the repack buffer)
    struct ggml_cgraph * gd = ggml_new_graph_custom(ctx, 2 * nc + 8, false);
    struct ggml_cgraph * gs = ggml_new_graph_custom(ctx, 2 * nc + 8, false);
    for (int c = 0; c < nc; c++) {
        struct ggml_tensor * ws = k->up ? ggml_new_tensor_2d(ctx, k->dtype, k->n_in, k->n_out)
                                        : ggml_new_tensor_2d(ctx, k->stype, k->sne0, k->sne1);
        memcpy(ws->data, k->up ? k->dense : k->sparse, sbytes);
        if (k->up) { // a different random mask per copy, exactly round(keep * n) channels kept
            struct ggml_tensor * tau = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, k->n_out);
            float * t = (float *) tau->data;
            for (int64_t i = 0; i < k->n_out; i++) t[i] = i < (int64_t) llround(keep * k->n_out) ? 0.0f : INFINITY;
            for (int64_t i = k->n_out - 1; i > 0; i--) { // shuffle
                const int64_t j = (int64_t) (rng_u64() % (uint64_t) (i + 1));
                const float s = t[i]; t[i] = t[j]; t[j] = s;
            }
            struct ggml_tensor * args[4] = { g, x, ws, tau };
            ggml_build_forward_expand(gs, ggml_custom_4d(ctx, GGML_TYPE_F32, k->n_out, 1, 1, 1, args, 4, up_op,
                                                         GGML_N_TASKS_MAX, NULL));
            ggml_build_forward_expand(gd, ggml_mul_mat(ctx, wd[c], x));
        } else {
            struct ggml_tensor * v = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, k->n_in);
            float * vv = (float *) v->data;
            for (int64_t i = 0; i < k->n_in; i++) vv[i] = i < (int64_t) llround(keep * k->n_in) ? rng_gauss() : 0.0f;
            for (int64_t i = k->n_in - 1; i > 0; i--) {
                const int64_t j = (int64_t) (rng_u64() % (uint64_t) (i + 1));
                const float s = vv[i]; vv[i] = vv[j]; vv[j] = s;
            }
            struct ggml_tensor * args[2] = { v, ws };
            ggml_build_forward_expand(gs, ggml_custom_4d(ctx, GGML_TYPE_F32, k->n_out, 1, 1, 1, args, 2, in_op,
                                                         GGML_N_TASKS_MAX, NULL));
            ggml_build_forward_expand(gd, ggml_mul_mat(ctx, wd[c], v));
        }
    }

    struct ggml_cplan pd = ggml_graph_plan(gd, nth, tp), ps = ggml_graph_plan(gs, nth, tp);
    pd.work_data = pd.work_size ? malloc(pd.work_size) : NULL;
    ps.work_data = ps.work_size ? malloc(ps.work_size) : NULL;
    for (int w = 0; w < 2; w++) { // warm-up: thread pool, page faults, thread-local scratch
        ggml_graph_compute(gd, &pd);
        ggml_graph_compute(gs, &ps);
    }
    double * td = malloc(reps * sizeof(double)), * tsp = malloc(reps * sizeof(double));
    for (int r = 0; r < reps; r++) { // interleaved, alternating which goes first
        for (int s = 0; s < 2; s++) {
            const bool dense = (r + s) % 2 == 0;
            const double t0 = now_us();
            ggml_graph_compute(dense ? gd : gs, dense ? &pd : &ps);
            (dense ? td : tsp)[r] = now_us() - t0;
        }
    }
    double dmin = td[0], smin = tsp[0];
    for (int r = 1; r < reps; r++) {
        dmin = td[r] < dmin ? td[r] : dmin;
        smin = tsp[r] < smin ? tsp[r] : smin;
    }
    dmin /= nc;
    smin /= nc;
    const double d = median(td, reps) / nc, s = median(tsp, reps) / nc;
    const double sb = sparse_bytes(k, keep);
    printf("%s\n  {\"name\": \"%s\", \"kernel\": \"%s\", \"type\": \"%s\", \"sparse_type\": \"%s\", \"in\": %lld, "
           "\"out\": %lld, \"copies\": %d, \"dense_layout\": \"%s\", \"route\": \"%s\", \"dense_us\": %.2f, "
           "\"sparse_us\": %.2f, \"speedup\": %.3f, \"dense_mb\": %.3f, \"sparse_mb\": %.3f, \"byte_ratio\": %.3f, "
           "\"dense_gbps\": %.2f, \"sparse_gbps\": %.2f, \"dense_min_us\": %.2f, \"sparse_min_us\": %.2f}",
           first ? "" : ",", k->name, k->up ? "up" : "in", ggml_type_name(k->dtype),
           k->stype == CHESS_X4 ? "x4" : ggml_type_name(k->stype), (long long) k->n_in, (long long) k->n_out, nc,
           rbuft ? "repacked" : "plain", k->up ? chess_up_sparse_route(k->dtype) : chess_in_sparse_route(k->stype),
           d, s, d / s, dbytes / 1e6, sb / 1e6, (double) dbytes / sb, dbytes / d / 1e3, sb / s / 1e3, dmin, smin);
    fflush(stdout);
    free(td);
    free(tsp);
    free(pd.work_data);
    free(ps.work_data);
    ggml_free(ctx);
    ggml_backend_buffer_free(wbuf);
    ggml_free(wctx);
    free(wd);
}

// ---- model file --------------------------------------------------------------------------------

typedef struct {
    const char * path;
    struct gguf_context * gg;
    struct ggml_context * meta; // tensor shapes/types, no data
} model_file;

static struct ggml_tensor * find(model_file * m, const char * name) {
    struct ggml_tensor * t = ggml_get_tensor(m->meta, name);
    if (!t) {
        fprintf(stderr, "chess-bench-kernels: %s: no tensor %s (not a CHESS file, or the compact layout?)\n", m->path, name);
        exit(1);
    }
    return t;
}

static void * read_tensor(model_file * m, const char * name) {
    const int64_t id = gguf_find_tensor(m->gg, name);
    const size_t off = gguf_get_data_offset(m->gg) + gguf_get_tensor_offset(m->gg, id);
    const size_t n = gguf_get_tensor_size(m->gg, id);
    void * dst = malloc(n);
    FILE * f = fopen(m->path, "rb");
    if (!dst || !f || fseek(f, (long) off, SEEK_SET) != 0 || fread(dst, 1, n, f) != n) {
        fprintf(stderr, "chess-bench-kernels: %s: cannot read tensor %s\n", m->path, name);
        exit(1);
    }
    fclose(f);
    return dst;
}

static kcase model_case(model_file * m, int layer, const char * name, const char * dense, const char * sparse, bool up) {
    char nd[128], ns[128];
    snprintf(nd, sizeof nd, "blk.%d.%s", layer, dense);
    snprintf(ns, sizeof ns, "blk.%d.%s", layer, sparse);
    const struct ggml_tensor * md = find(m, nd), * ms = find(m, ns);
    kcase k = { .up = up, .dtype = md->type, .n_in = md->ne[0], .n_out = md->ne[1], .stype = ms->type,
                .sne0 = ms->ne[0], .sne1 = ms->ne[1] };
    snprintf(k.name, sizeof k.name, "%s", name);
    k.dense = read_tensor(m, nd);
    k.sparse = up ? NULL : read_tensor(m, ns);
    return k;
}

// ---- synthetic weights -------------------------------------------------------------------------

// n_rows rows of n_cols random Gaussian weights (rows of different scales) quantized to `type`
static void * random_weights(enum ggml_type type, int64_t n_rows, int64_t n_cols) {
    const size_t rb = ggml_row_size(type, n_cols);
    char * w = malloc(rb * (size_t) n_rows);
    float * f = malloc((size_t) n_cols * sizeof(float));
    if (!w || !f) die("out of memory", NULL);
    for (int64_t r = 0; r < n_rows; r++) {
        const float sc = 0.25f + rng_unif();
        for (int64_t j = 0; j < n_cols; j++) f[j] = sc * rng_gauss();
        if (type == GGML_TYPE_F32) memcpy(w + r * rb, f, rb);
        else ggml_quantize_chunk(type, f, w + r * rb, 0, 1, n_cols, NULL);
    }
    free(f);
    return w;
}

// random x4 copy of n_in inputs x n_out outputs: random codes, valid f16 pairs
static void * random_x4(int64_t n_in, int64_t n_out) {
    const size_t rb = chess_x4_row_bytes(n_out);
    uint8_t * w = malloc(rb * (size_t) (n_in / 32));
    if (!w) die("out of memory", NULL);
    for (int64_t g = 0; g < n_in / 32; g++) {
        ggml_fp16_t * ab = (ggml_fp16_t *) (w + g * rb);
        for (int64_t j = 0; j < n_out; j++) {
            const float a = 0.02f * (0.25f + rng_unif());
            ab[j] = ggml_fp32_to_fp16(a);
            ab[n_out + j] = ggml_fp32_to_fp16(-a * (float) (rng_u64() % 16));
        }
        for (size_t e = 4 * (size_t) n_out; e < rb; e++) w[g * rb + e] = (uint8_t) rng_u64();
    }
    return w;
}

// the transposed copy's type convert writes by default (chess_gguf/convert.py: x4, then the requant
// rule: Q8_0 for Q5_K/Q6_K, else the original type when its block divides the row length, a
// fallback, Q8_0, F16, F32)
static enum ggml_type copy_type(enum ggml_type t, int64_t n_in, int64_t n_out, const char * wt) {
    const bool x4ok = (t == GGML_TYPE_Q4_0 || t == GGML_TYPE_Q4_1 || t == GGML_TYPE_Q4_K) && chess_x4_ok(n_in, n_out);
    if (!wt || !strcmp(wt, "x4")) {
        if (x4ok) return CHESS_X4;
    } else if (strcmp(wt, "requant") != 0) {
        for (int i = 0; i < GGML_TYPE_COUNT; i++) {
            const struct ggml_type_traits * tt = ggml_get_type_traits((enum ggml_type) i);
            if (tt && tt->type_name && !strcmp(tt->type_name, wt)) {
                if (n_out % ggml_blck_size((enum ggml_type) i) != 0) die("--wt: the type's block does not divide OUT: ", wt);
                return (enum ggml_type) i;
            }
        }
        die("--wt: unknown type ", wt);
    }
    if (t == GGML_TYPE_Q5_K || t == GGML_TYPE_Q6_K) t = GGML_TYPE_Q8_0; // convert.DUAL_FIRST
    enum ggml_type fb = GGML_TYPE_Q8_0;
    switch (t) {
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: fb = GGML_TYPE_Q4_0; break;
        case GGML_TYPE_Q4_K: fb = GGML_TYPE_Q4_1; break;
        case GGML_TYPE_IQ4_XS: fb = GGML_TYPE_IQ4_NL; break;
        default: break;
    }
    const enum ggml_type cand[4] = { t, fb, GGML_TYPE_Q8_0, GGML_TYPE_F16 };
    for (int i = 0; i < 4; i++) {
        if (n_out % ggml_blck_size(cand[i]) == 0) return cand[i];
    }
    return GGML_TYPE_F32;
}

static enum ggml_type parse_type(const char * s) {
    for (int i = 0; i < GGML_TYPE_COUNT; i++) {
        const struct ggml_type_traits * tt = ggml_get_type_traits((enum ggml_type) i);
        if (tt && tt->type_name && tt->blck_size > 0 && !strcmp(tt->type_name, s)) {
            if (!chess_type_supported((enum ggml_type) i)) die("--synthetic: type not supported by the CHESS kernels: ", s);
            return (enum ggml_type) i;
        }
    }
    die("--synthetic: unknown ggml type ", s);
    return GGML_TYPE_COUNT;
}

static kcase synthetic_case(enum ggml_type t, int64_t n_in, int64_t n_out, bool up, const char * wt) {
    kcase k = { .up = up, .dtype = t, .n_in = n_in, .n_out = n_out };
    snprintf(k.name, sizeof k.name, "%s %lldx%lld", up ? "up" : "in", (long long) n_in, (long long) n_out);
    k.dense = random_weights(t, n_out, n_in);
    if (up) {
        k.stype = t;
        k.sne0 = n_in;
        k.sne1 = n_out;
    } else {
        k.stype = copy_type(t, n_in, n_out, wt);
        k.sne0 = k.stype == CHESS_X4 ? CHESS_X4_BYTES_PER_32 * n_out : n_out;
        k.sne1 = k.stype == CHESS_X4 ? n_in / 32 : n_in;
        k.sparse = k.stype == CHESS_X4 ? random_x4(n_in, n_out) : random_weights(k.stype, n_in, n_out);
    }
    return k;
}

// ggml's own warnings and errors only (the repack buffer logs every tensor it repacks)
static void log_quiet(enum ggml_log_level level, const char * text, void * ud) {
    (void) ud;
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static void usage(void) {
    fprintf(stderr,
            "usage: chess-bench-kernels MODEL.chess.gguf [options]\n"
            "       chess-bench-kernels --synthetic TYPE --shape INxOUT[,INxOUT...] [--wt x4|requant|TYPE] [options]\n"
            "  Times the CHESS sparse kernels against ggml's dense mul_mat on the same weights (repacked\n"
            "  where ggml-cpu repacks them, as the original model runs), one token.\n"
            "  Model mode: ffn_up, ffn_down, attn_q, attn_o of one layer of a converted (dual layout) file.\n"
            "  Synthetic mode: random TYPE weights; per shape the up kernel (IN inputs, OUT rows) and the in\n"
            "  kernel (IN inputs, OUT outputs, through the transposed copy convert writes by default, or --wt).\n"
            "options:\n"
            "  --keep F      fraction of channels kept (default 0.5)\n"
            "  --threads T   threads (default 2)\n"
            "  --reps N      interleaved rounds, medians reported (default 15)\n"
            "  --layer L     model mode: the layer (default the middle one)\n"
            "  --only up|in  run one kernel kind only\n"
            "  --generic     force the generic (portable) kernel routes\n"
            "  --mb MB       weight bytes streamed per graph (default 96) so weights come from DRAM\n"
            "  Prints one JSON object.\n");
}

int main(int argc, char ** argv) {
    const char * path = NULL, * synth = NULL, * shapes = NULL, * wt = NULL, * only = NULL;
    float keep = 0.5f;
    int nth = 2, reps = 15, layer = -1;
    double budget_mb = 96;
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        const bool has = i + 1 < argc;
        if (!strcmp(a, "--keep") && has) keep = (float) atof(argv[++i]);
        else if (!strcmp(a, "--threads") && has) nth = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && has) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--layer") && has) layer = atoi(argv[++i]);
        else if (!strcmp(a, "--mb") && has) budget_mb = atof(argv[++i]);
        else if (!strcmp(a, "--synthetic") && has) synth = argv[++i];
        else if (!strcmp(a, "--shape") && has) shapes = argv[++i];
        else if (!strcmp(a, "--wt") && has) wt = argv[++i];
        else if (!strcmp(a, "--only") && has) only = argv[++i];
        else if (!strcmp(a, "--generic")) chess_kernels_force_generic(true);
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        else if (a[0] != '-' && !path) path = a;
        else { usage(); return 2; }
    }
    if ((!path == !synth) || (synth && !shapes) || !(keep > 0.0f && keep <= 1.0f) || nth < 1 || reps < 1 ||
        budget_mb <= 0 || (only && strcmp(only, "up") && strcmp(only, "in"))) {
        usage();
        return 2;
    }
    ggml_log_set(log_quiet, NULL);
    ggml_cpu_init();
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(nth);
    struct ggml_threadpool * tp = ggml_threadpool_new(&tpp);
    kcase cases[64];
    int n_cases = 0;

    if (path) {
        model_file m = { path, NULL, NULL };
        struct gguf_init_params gp = { true, &m.meta };
        m.gg = gguf_init_from_file(path, gp);
        if (!m.gg) die("not a readable GGUF file: ", path);
        if (gguf_find_key(m.gg, "chess.version") < 0) {
            fprintf(stderr, "chess-bench-kernels: %s: no CHESS tensors (convert it with python -m chess_gguf convert)\n", path);
            return 1;
        }
        int n_layer = 0;
        for (;;) { // count layers by their ffn_up
            char nm[64];
            snprintf(nm, sizeof nm, "blk.%d.ffn_up.weight", n_layer);
            if (!ggml_get_tensor(m.meta, nm)) break;
            n_layer++;
        }
        if (layer < 0) layer = n_layer / 2;
        if (layer >= n_layer) {
            fprintf(stderr, "chess-bench-kernels: %s: layer %d out of range (0..%d)\n", path, layer, n_layer - 1);
            return 1;
        }
        if (!only || !strcmp(only, "up")) cases[n_cases++] = model_case(&m, layer, "ffn_up", "ffn_up.weight", "ffn_up.weight", true);
        if (!only || !strcmp(only, "in")) {
            cases[n_cases++] = model_case(&m, layer, "ffn_down", "ffn_down.weight", "chess_wt_down", false);
            cases[n_cases++] = model_case(&m, layer, "attn_q", "attn_q.weight", "chess_wt_q", false);
            cases[n_cases++] = model_case(&m, layer, "attn_o", "attn_output.weight", "chess_wt_o", false);
        }
        gguf_free(m.gg);
        ggml_free(m.meta);
    } else {
        const enum ggml_type t = parse_type(synth);
        const char * s = shapes;
        while (*s && n_cases + 2 <= 64) {
            char * end;
            const long long n_in = strtoll(s, &end, 10);
            if (*end != 'x') die("--shape: expected INxOUT[,INxOUT...], got ", shapes);
            const long long n_out = strtoll(end + 1, &end, 10);
            if (n_in <= 0 || n_out <= 0 || (*end && *end != ',')) die("--shape: expected INxOUT[,INxOUT...], got ", shapes);
            const int64_t bs = ggml_blck_size(t);
            if (!only || !strcmp(only, "up")) {
                if (n_in % bs) die("--shape: IN must be a multiple of the type's block size: ", shapes);
                cases[n_cases++] = synthetic_case(t, n_in, n_out, true, wt);
            }
            if (!only || !strcmp(only, "in")) {
                if (n_in % bs) die("--shape: IN must be a multiple of the type's block size: ", shapes);
                cases[n_cases++] = synthetic_case(t, n_in, n_out, false, wt);
            }
            s = *end ? end + 1 : end;
        }
    }

    printf("{\"threads\": %d, \"keep\": %.4f, \"layer\": %d, \"reps\": %d, \"kernels\": [", nth, (double) keep,
           path ? layer : -1, reps);
    for (int c = 0; c < n_cases; c++) {
        fprintf(stderr, "chess-bench-kernels: %s (%s) ...\n", cases[c].name, ggml_type_name(cases[c].dtype));
        bench_case(&cases[c], keep, nth, reps, budget_mb, tp, c == 0);
        free(cases[c].dense);
        free(cases[c].sparse);
    }
    printf("\n]}\n");
    ggml_threadpool_free(tp);
    return 0;
}
