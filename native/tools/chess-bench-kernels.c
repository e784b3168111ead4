// chess-bench-kernels: times each CHESS sparse kernel against ggml's dense mul_mat on the same
// weights of a converted model, for one token, through ggml's own graph executor and thread pool
// (so both sides pay the same per-node scheduling cost).
//
//   chess-bench-kernels MODEL.chess.gguf [--keep 0.5] [--threads 2] [--reps 15] [--layer L]
//                       [--generic] [--mb 96]
//
// Prints one JSON object on stdout:
//   {"threads": T, "keep": k, "layer": L, "kernels": [{"name": "ffn_up", "type": "q4_1",
//    "sparse_type": "q4_1", "rows": R, "cols": C, "dense_us": x, "sparse_us": y, "speedup": x/y}, ...]}
//
// Why copies: a decoded token streams every layer's weights from DRAM (a 135M Q4_1 model is 96 MB,
// the L3 here 32 MB). Timing one small matrix over and over would measure it hot in cache. Each
// graph therefore applies the kernel to enough copies of the weights (--mb, default 96 MB) that
// they fall out of the caches between uses, and reports the time per copy. Dense and sparse graphs
// run interleaved; the figures are medians over --reps rounds.
#define _POSIX_C_SOURCE 200809L // clock_gettime under -std=c11
#include "chess-kernels.h"
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

// src: 0 v f32 [n_in], 1 Wt [n_out, n_in]; each thread a slice of the output columns (as the runtime)
static void in_op(struct ggml_tensor * dst, int ith, int nth, void * ud) {
    (void) ud;
    const struct ggml_tensor * v = dst->src[0], * wt = dst->src[1];
    int64_t j0, j1;
    chess_thread_range(dst->ne[0], chess_in_align(wt->type), ith, nth, &j0, &j1);
    chess_in_sparse(wt->data, wt->type, wt->nb[1], v->ne[0], dst->ne[0], (const float *) v->data, NULL, 0,
                    (float *) dst->data, j0, j1);
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
        fprintf(stderr, "chess-bench-kernels: %s: no tensor %s (not a CHESS file?)\n", m->path, name);
        exit(1);
    }
    return t;
}

static void read_into(model_file * m, const char * name, void * dst) {
    const int64_t id = gguf_find_tensor(m->gg, name);
    const size_t off = gguf_get_data_offset(m->gg) + gguf_get_tensor_offset(m->gg, id);
    const size_t n = gguf_get_tensor_size(m->gg, id);
    FILE * f = fopen(m->path, "rb");
    if (!f || fseek(f, (long) off, SEEK_SET) != 0 || fread(dst, 1, n, f) != n) {
        fprintf(stderr, "chess-bench-kernels: %s: cannot read tensor %s\n", m->path, name);
        exit(1);
    }
    fclose(f);
}

// ---- one kernel: dense graph vs sparse graph over the same copies ------------------------------

typedef struct {
    const char * name;
    const char * dense;  // tensor suffix of the dense weight
    const char * sparse; // tensor suffix of the weight the sparse kernel reads
    bool up;             // output-sparse up kernel (else input-sparse through a transposed weight)
} kernel_spec;

static double run_graph(struct ggml_cgraph * gf, struct ggml_cplan * plan) {
    const double t0 = now_us();
    ggml_graph_compute(gf, plan);
    return now_us() - t0;
}

static void bench_kernel(model_file * m, const kernel_spec * ks, int layer, float keep, int nth, int reps,
                         double budget_mb, struct ggml_threadpool * tp, bool first) {
    char nd[128], ns[128];
    snprintf(nd, sizeof nd, "blk.%d.%s", layer, ks->dense);
    snprintf(ns, sizeof ns, "blk.%d.%s", layer, ks->sparse);
    const struct ggml_tensor * md = find(m, nd), * ms = find(m, ns);
    const int64_t n_in = md->ne[0], n_out = md->ne[1]; // dense: y[n_out] = W x[n_in]
    const size_t bytes = ggml_nbytes(md) > ggml_nbytes(ms) ? ggml_nbytes(md) : ggml_nbytes(ms);
    int nc = (int) ceil(budget_mb * 1e6 / (double) bytes);
    nc = nc < 1 ? 1 : nc > 256 ? 256 : nc;

    const size_t mem = nc * (ggml_nbytes(md) + ggml_nbytes(ms) + (size_t) (4 * (n_in + n_out)) * 4 + 6 * 256) +
                       (size_t) (4 * (n_in + n_out)) * 4 + 2 * ggml_graph_overhead_custom(4 * nc + 8, false) +
                       (6 * nc + 16) * ggml_tensor_overhead() + (1 << 20);
    struct ggml_init_params ip = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        fprintf(stderr, "chess-bench-kernels: out of memory (%zu MB)\n", mem >> 20);
        exit(1);
    }
    struct ggml_tensor * x = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_in);
    struct ggml_tensor * g = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_out);
    for (int64_t i = 0; i < n_in; i++) ((float *) x->data)[i] = rng_gauss();
    for (int64_t i = 0; i < n_out; i++) ((float *) g->data)[i] = rng_gauss();

    struct ggml_cgraph * gd = ggml_new_graph_custom(ctx, 2 * nc + 8, false);
    struct ggml_cgraph * gs = ggml_new_graph_custom(ctx, 2 * nc + 8, false);
    for (int c = 0; c < nc; c++) {
        struct ggml_tensor * wd = ggml_new_tensor(ctx, md->type, 2, md->ne);
        struct ggml_tensor * ws = ks->up ? wd : ggml_new_tensor(ctx, ms->type, 2, ms->ne);
        if (c == 0) {
            read_into(m, nd, wd->data);
            if (!ks->up) read_into(m, ns, ws->data);
        } else {
            memcpy(wd->data, ggml_graph_node(gd, 0)->src[0]->data, ggml_nbytes(wd));
            if (!ks->up) memcpy(ws->data, ggml_graph_node(gs, 0)->src[1]->data, ggml_nbytes(ws));
        }
        // a different random mask per copy, exactly round(keep * n) channels kept
        if (ks->up) {
            struct ggml_tensor * tau = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_out);
            float * t = (float *) tau->data;
            for (int64_t i = 0; i < n_out; i++) t[i] = i < (int64_t) llroundf(keep * n_out) ? 0.0f : INFINITY;
            for (int64_t i = n_out - 1; i > 0; i--) { // shuffle
                const int64_t j = (int64_t) (rng_u64() % (uint64_t) (i + 1));
                const float s = t[i]; t[i] = t[j]; t[j] = s;
            }
            struct ggml_tensor * args[4] = { g, x, ws, tau };
            ggml_build_forward_expand(gs, ggml_custom_4d(ctx, GGML_TYPE_F32, n_out, 1, 1, 1, args, 4, up_op,
                                                         GGML_N_TASKS_MAX, NULL));
            ggml_build_forward_expand(gd, ggml_mul_mat(ctx, wd, x));
        } else {
            // transposed copy: ws is [n_out, n_in] (row i = input channel i)
            struct ggml_tensor * v = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_in);
            float * vv = (float *) v->data;
            for (int64_t i = 0; i < n_in; i++) vv[i] = i < (int64_t) llroundf(keep * n_in) ? rng_gauss() : 0.0f;
            for (int64_t i = n_in - 1; i > 0; i--) {
                const int64_t j = (int64_t) (rng_u64() % (uint64_t) (i + 1));
                const float s = vv[i]; vv[i] = vv[j]; vv[j] = s;
            }
            struct ggml_tensor * args[2] = { v, ws };
            ggml_build_forward_expand(gs, ggml_custom_4d(ctx, GGML_TYPE_F32, n_out, 1, 1, 1, args, 2, in_op,
                                                         GGML_N_TASKS_MAX, NULL));
            ggml_build_forward_expand(gd, ggml_mul_mat(ctx, wd, v));
        }
    }

    struct ggml_cplan pd = ggml_graph_plan(gd, nth, tp), ps = ggml_graph_plan(gs, nth, tp);
    pd.work_data = pd.work_size ? malloc(pd.work_size) : NULL;
    ps.work_data = ps.work_size ? malloc(ps.work_size) : NULL;
    for (int w = 0; w < 2; w++) { // warm-up: thread pool, page faults, thread-local scratch
        run_graph(gd, &pd);
        run_graph(gs, &ps);
    }
    double * td = malloc(reps * sizeof(double)), * tsp = malloc(reps * sizeof(double));
    for (int r = 0; r < reps; r++) { // interleaved, alternating which goes first
        if (r % 2 == 0) {
            td[r] = run_graph(gd, &pd);
            tsp[r] = run_graph(gs, &ps);
        } else {
            tsp[r] = run_graph(gs, &ps);
            td[r] = run_graph(gd, &pd);
        }
    }
    const double d = median(td, reps) / nc, s = median(tsp, reps) / nc;
    printf("%s{\"name\": \"%s\", \"type\": \"%s\", \"sparse_type\": \"%s\", \"rows\": %lld, \"cols\": %lld, "
           "\"copies\": %d, \"route\": \"%s\", \"dense_us\": %.2f, \"sparse_us\": %.2f, \"speedup\": %.3f}",
           first ? "" : ", ", ks->name, ggml_type_name(md->type), ms->type == CHESS_X4 ? "x4" : ggml_type_name(ms->type), (long long) n_out,
           (long long) n_in, nc, ks->up ? "vec_dot" : chess_in_sparse_route(ms->type), d, s, d / s);
    fflush(stdout);
    free(td);
    free(tsp);
    free(pd.work_data);
    free(ps.work_data);
    ggml_free(ctx);
}

static void usage(void) {
    fprintf(stderr,
            "usage: chess-bench-kernels MODEL.chess.gguf [--keep F] [--threads T] [--reps N] [--layer L]\n"
            "                           [--generic] [--mb MB]\n"
            "  Times the CHESS sparse kernels (ffn_up, ffn_down, attn_q, attn_o) of one layer against\n"
            "  ggml's dense mul_mat on the same weights, one token, F of the channels kept (default 0.5),\n"
            "  T threads (default 2), medians of N interleaved rounds (default 15), layer L (default the\n"
            "  middle one). --generic: force the generic (to_float) route of the input-sparse kernel.\n"
            "  --mb: weight bytes streamed per graph (default 96) so weights come from DRAM, not cache.\n"
            "  Prints one JSON object.\n");
}

int main(int argc, char ** argv) {
    const char * path = NULL;
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
        else if (!strcmp(a, "--generic")) chess_kernels_force_generic(true);
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        else if (a[0] != '-' && !path) path = a;
        else { usage(); return 2; }
    }
    if (!path || !(keep > 0.0f && keep <= 1.0f) || nth < 1 || reps < 1 || budget_mb <= 0) {
        usage();
        return 2;
    }
    model_file m = { path, NULL, NULL };
    struct gguf_init_params gp = { true, &m.meta };
    m.gg = gguf_init_from_file(path, gp);
    if (!m.gg) {
        fprintf(stderr, "chess-bench-kernels: %s: not a readable GGUF file\n", path);
        return 1;
    }
    const int64_t kv = gguf_find_key(m.gg, "chess.version");
    if (kv < 0) {
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
    ggml_cpu_init();
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(nth);
    struct ggml_threadpool * tp = ggml_threadpool_new(&tpp);

    static const kernel_spec specs[] = {
        { "ffn_up",   "ffn_up.weight",      "ffn_up.weight",  true  },
        { "ffn_down", "ffn_down.weight",    "chess_wt_down",  false },
        { "attn_q",   "attn_q.weight",      "chess_wt_q",     false },
        { "attn_o",   "attn_output.weight", "chess_wt_o",     false },
    };
    printf("{\"threads\": %d, \"keep\": %.4f, \"layer\": %d, \"reps\": %d, \"kernels\": [", nth, (double) keep, layer, reps);
    for (size_t k = 0; k < sizeof specs / sizeof specs[0]; k++) {
        fprintf(stderr, "chess-bench-kernels: %s ...\n", specs[k].name);
        bench_kernel(&m, &specs[k], layer, keep, nth, reps, budget_mb, tp, k == 0);
    }
    printf("]}\n");
    ggml_threadpool_free(tp);
    gguf_free(m.gg);
    ggml_free(m.meta);
    return 0;
}
