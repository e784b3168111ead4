// Calibration statistics in the eval callback: see chess-calib.h. Compiled with -ffp-contract=off
// (native/CMakeLists.txt) so that every float operation rounds as written, on every ISA, and with
// -fno-trapping-math so that the branch-free clamps vectorise (flags only; values are unchanged).
#include "chess-calib.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { K_GATE, K_UP, K_Q, K_O, K_HEAD, K_NONE };
#define CC_MAX_THREADS 64
#define CC_CHUNK 64 // columns whose bins are computed (vectorised) before they are counted

struct cc_layer {
    int64_t n_ff;         // width of the gate / up nodes (0 until seen)
    double * sum_abs_u;   // [n_ff]
    double * sum_sq_u;    // [n_ff]
    double * win;         // [2 n_ff] this node's sums, added to the totals after the rows (numpy's order)
    uint32_t * hist_a;    // [n_ff * hist_bins]
    int64_t * pool[3];    // |act(g)|, W_q input, W_o input [fine_bins]
};

struct chess_calib {
    int n_layer, act, hist_bins, fine_bins, n_threads, skip;
    bool fused_up, no_attn_norm;
    float log_lo, w_hist, w_fine;
    struct cc_layer * layers;
    uint32_t * scratch;   // [n_threads * fine_bins]: each thread's pooled counts of one node
    float * copy;         // a node copied out of a non-host buffer
    size_t copy_n;
    int64_t * head;       // |h| at the output head [fine_bins] (result_norm)
    char err[256];
    int64_t stops;        // graphs stopped after result_norm's statistics
};

// ---- float math with a fixed rounding sequence (no libm: the same bits everywhere) ----

static inline float cc_bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t cc_f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// natural log of x >= 1e-30 (normal floats): x = 2^e m, m in [sqrt(1/2), sqrt(2)), atanh series
static inline float cc_log(float x) {
    const uint32_t u = cc_f_bits(x) - 0x3f3504f3u;  // 0x3f3504f3 = sqrt(1/2)
    const int32_t e = (int32_t) u >> 23;
    const float m = cc_bits_f((u & 0x007fffffu) + 0x3f3504f3u);
    const float s = (m - 1.0f) / (m + 1.0f);
    const float s2 = s * s;
    const float p = 1.0f + s2 * (0.33333334f + s2 * (0.2f + s2 * (0.14285715f + s2 * 0.11111111f)));
    const float fe = (float) e;
    return fe * 0.693145752f + (2.0f * s * p + fe * 1.42860677e-6f);  // ln 2 split hi + lo
}

// e^y for y in [-87, 88] (clamped), 2^n * poly(r), |r| <= ln2/2
static inline float cc_exp(float y) {
    y = y > -87.0f ? y : -87.0f;
    y = y < 88.0f ? y : 88.0f;
    const float t = y * 1.44269504f + 12582912.0f;   // round to nearest by the 1.5*2^23 trick
    const float n = t - 12582912.0f;
    const float r = (y - n * 0.693145752f) - n * 1.42860677e-6f;
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f +
                    r * (0.0013888889f + r * 0.00019841270f))))));
    return p * cc_bits_f((uint32_t) ((int32_t) n + 127) << 23);
}

static inline float cc_act(float g, int act) {
    if (act == 0) {
        return g / (1.0f + cc_exp(-g));
    }
    // GELU (tanh form): 0.5 g (1 + tanh z) = g / (1 + e^{-2z}), without tanh's cancellation
    const float z = 0.7978846f * (g + 0.044715f * g * g * g);
    return g / (1.0f + cc_exp(-2.0f * z));
}

// clamped in float before the conversion (NaN -> 0): branch-free, so the loops below vectorise
static inline int cc_bin(float lg, float lo, float w, int bins) {
    float t = (lg - lo) / w;
    t = t > 0.0f ? t : 0.0f;
    t = t < (float) (bins - 1) ? t : (float) (bins - 1);
    return (int) t;
}

static inline float cc_lg(float v) {
    v = fabsf(v);
    v = v > 1e-30f ? v : 1e-30f;
    return cc_log(v);
}

// ---- one node, one thread's column range ----

struct cc_job {
    struct chess_calib * c;
    struct cc_layer * L;
    int kind, tid;
    const float * x;      // first counted row
    int64_t rows, ld, c0, c1;   // ld: floats per row; columns [c0, c1) of the node's part
    int lo, hi;           // pooled bins this thread touched
};

static void cc_run(struct cc_job * j) {
    struct chess_calib * c = j->c;
    struct cc_layer * L = j->L;
    j->lo = c->fine_bins;
    j->hi = -1;
    if (j->kind == K_UP) {
        double * sa = L->win + j->c0;
        double * ss = L->win + L->n_ff + j->c0;
        const int64_t n = j->c1 - j->c0;
        memset(sa, 0, n * sizeof(double));
        memset(ss, 0, n * sizeof(double));
        for (int64_t r = 0; r < j->rows; ++r) {
            const float * xr = j->x + r * j->ld + j->c0;
            for (int64_t i = 0; i < n; ++i) {
                const double v = (double) xr[i];
                sa[i] += fabs(v);
                ss[i] += v * v;
            }
        }
        for (int64_t i = 0; i < n; ++i) {
            L->sum_abs_u[j->c0 + i] += sa[i];
            L->sum_sq_u[j->c0 + i] += ss[i];
        }
        return;
    }
    // column chunks outer, rows inner: a chunk's per-channel histograms (64 x hist_bins counts) stay in
    // L2 while its rows are counted, instead of one cache miss per value
    uint32_t * pool = c->scratch + (size_t) j->tid * c->fine_bins;
    int bf[CC_CHUNK], bh[CC_CHUNK];
    int lo = c->fine_bins, hi = -1;
    const float log_lo = c->log_lo, w_fine = c->w_fine, w_hist = c->w_hist;
    const int fine_bins = c->fine_bins, hist_bins = c->hist_bins, act = c->act;
    for (int64_t c0 = j->c0; c0 < j->c1; c0 += CC_CHUNK) {
        const int n = (int) (j->c1 - c0 < CC_CHUNK ? j->c1 - c0 : CC_CHUNK);
        uint32_t * ha = j->kind == K_GATE ? L->hist_a + c0 * hist_bins : NULL;
        for (int64_t r = 0; r < j->rows; ++r) {
            const float * xr = j->x + r * j->ld + c0;
            if (ha) {
                for (int i = 0; i < n; ++i) {
                    const float lg = cc_lg(cc_act(xr[i], act));
                    bf[i] = cc_bin(lg, log_lo, w_fine, fine_bins);
                    bh[i] = cc_bin(lg, log_lo, w_hist, hist_bins);
                }
                for (int i = 0; i < n; ++i) {
                    ha[(int64_t) i * hist_bins + bh[i]]++;
                }
            } else {
                for (int i = 0; i < n; ++i) {
                    bf[i] = cc_bin(cc_lg(xr[i]), log_lo, w_fine, fine_bins);
                }
            }
            for (int i = 0; i < n; ++i) {
                pool[bf[i]]++;
                lo = bf[i] < lo ? bf[i] : lo;
                hi = bf[i] > hi ? bf[i] : hi;
            }
        }
    }
    j->lo = lo;
    j->hi = hi;
}

#ifndef _OPENMP
static void * cc_thread(void * p) {
    cc_run((struct cc_job *) p);
    return NULL;
}
#endif

static bool cc_fail(struct chess_calib * c, const char * msg, const char * name) {
    snprintf(c->err, sizeof c->err, "chess_calib: node %s: %s", name, msg);
    return false;
}

static bool cc_alloc_ff(struct chess_calib * c, struct cc_layer * L, int64_t n_ff, const char * name) {
    if (L->n_ff == n_ff) {
        return true;
    }
    if (L->n_ff != 0) {
        return cc_fail(c, "the gate and up widths differ", name);
    }
    L->sum_abs_u = calloc(n_ff, sizeof(double));
    L->sum_sq_u  = calloc(n_ff, sizeof(double));
    L->win       = calloc(2 * n_ff, sizeof(double));
    L->hist_a    = calloc((size_t) n_ff * c->hist_bins, sizeof(uint32_t));
    if (!L->sum_abs_u || !L->sum_sq_u || !L->win || !L->hist_a) {
        return cc_fail(c, "out of memory", name);
    }
    L->n_ff = n_ff;
    return true;
}

// counts the columns [off, off + width) of a node's rows as `kind` of layer il
static bool cc_node(struct chess_calib * c, int kind, int il, const float * x, int64_t rows, int64_t ld,
                    int64_t off, int64_t width, const char * name) {
    struct cc_layer * L = kind == K_HEAD ? NULL : &c->layers[il];  // the head's pool is model-wide
    if ((kind == K_GATE || kind == K_UP) && !cc_alloc_ff(c, L, width, name)) {
        return false;
    }
    int64_t ** pp = kind == K_HEAD ? &c->head : &L->pool[kind == K_GATE ? 0 : kind == K_Q ? 1 : 2];
    if (kind != K_UP && *pp == NULL && (*pp = calloc(c->fine_bins, sizeof(int64_t))) == NULL) {
        return cc_fail(c, "out of memory", name);
    }
    // threads own column ranges (multiples of 16); a thread's columns are counted in row order
    int nt = c->n_threads;
    const int64_t min_cols = 64;
    if ((int64_t) nt * min_cols > width) {
        nt = (int) (width / min_cols) > 1 ? (int) (width / min_cols) : 1;
    }
    struct cc_job jobs[CC_MAX_THREADS];
    const int64_t step = ((width + nt - 1) / nt + 15) / 16 * 16;
    int n_jobs = 0;
    for (int t = 0; t < nt && (int64_t) t * step < width; ++t) {
        const int64_t c0 = (int64_t) t * step;
        const int64_t c1 = c0 + step < width ? c0 + step : width;
        jobs[n_jobs++] = (struct cc_job) {c, L, kind, t, x + off, rows, ld, c0, c1, 0, 0};
    }
#ifdef _OPENMP
    // ggml's OpenMP workers spin between graph segments: reuse them rather than start threads that
    // would compete with them for the cores
#pragma omp parallel for num_threads(n_jobs) schedule(static, 1)
    for (int t = 0; t < n_jobs; ++t) {
        cc_run(&jobs[t]);
    }
#else
    pthread_t th[CC_MAX_THREADS];
    int started = 1;
    for (; started < n_jobs; ++started) {
        if (pthread_create(&th[started], NULL, cc_thread, &jobs[started]) != 0) {
            break;
        }
    }
    cc_run(&jobs[0]);
    for (int t = started; t < n_jobs; ++t) {  // threads that could not start: run here
        cc_run(&jobs[t]);
    }
    for (int t = 1; t < started; ++t) {
        pthread_join(th[t], NULL);
    }
#endif
    if (kind != K_UP) {
        int64_t * pool = *pp;
        for (int t = 0; t < n_jobs; ++t) {
            uint32_t * s = c->scratch + (size_t) t * c->fine_bins;
            for (int b = jobs[t].lo; b <= jobs[t].hi; ++b) {
                pool[b] += s[b];
                s[b] = 0;
            }
        }
    }
    return true;
}

// (kind, layer) of a graph node, as calibrate.node_of
static int cc_kind(const struct chess_calib * c, const char * name, int * il) {
    static const struct { const char * prefix; int kind; } nodes[] = {
        {"ffn_gate-", K_GATE}, {"ffn_up-", K_UP}, {"attn_norm-", K_Q}, {"kqv_out-", K_O}, {"l_out-", K_Q},
    };
    if (c->no_attn_norm && strcmp(name, "embd") == 0) {
        *il = 0;
        return K_Q;
    }
    if (strcmp(name, "result_norm") == 0) {
        *il = -1;
        return K_HEAD;
    }
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; ++i) {
        const size_t n = strlen(nodes[i].prefix);
        if (strncmp(name, nodes[i].prefix, n) != 0) {
            continue;
        }
        const char * d = name + n;
        if (*d < '0' || *d > '9') {
            return K_NONE;
        }
        char * end;
        const long v = strtol(d, &end, 10);
        if (*end != '\0') {
            return K_NONE;
        }
        if (nodes[i].kind == K_Q && nodes[i].prefix[0] == 'l') {  // l_out-N feeds layer N+1's W_q
            if (!c->no_attn_norm) {
                return K_NONE;
            }
            *il = (int) v + 1;
        } else {
            *il = (int) v;
        }
        return *il < c->n_layer ? nodes[i].kind : K_NONE;
    }
    return K_NONE;
}

bool chess_calib_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    struct chess_calib * c = user_data;
    int il = 0;
    const int kind = cc_kind(c, t->name, &il);
    if (ask) {
        return kind != K_NONE;
    }
    if (kind == K_NONE) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        return cc_fail(c, "not a contiguous f32 tensor", t->name);
    }
    const int64_t width = t->ne[0];
    const int64_t rows = ggml_nrows(t);
    const float * x = t->data;
    if (t->data == NULL) {
        return cc_fail(c, "no data", t->name);
    }
    if (t->buffer != NULL && !ggml_backend_buffer_is_host(t->buffer)) {  // no buffer: a plain ggml context
        const size_t n = (size_t) ggml_nelements(t);
        if (n > c->copy_n) {
            float * p = realloc(c->copy, n * sizeof(float));
            if (p == NULL) {
                return cc_fail(c, "out of memory", t->name);
            }
            c->copy = p;
            c->copy_n = n;
        }
        ggml_backend_tensor_get(t, c->copy, 0, n * sizeof(float));
        x = c->copy;
    }
    if (rows <= c->skip) {
        return true;
    }
    x += c->skip * width;
    const int64_t n = rows - c->skip;
    bool ok;
    if (kind == K_UP && c->fused_up) {
        if (width % 2 != 0) {
            return cc_fail(c, "a fused gate+up node of odd width", t->name);
        }
        ok = cc_node(c, K_GATE, il, x, n, width, 0, width / 2, t->name) &&
             cc_node(c, K_UP, il, x, n, width, width / 2, width / 2, t->name);
    } else {
        ok = cc_node(c, kind, il, x, n, width, 0, width, t->name);
    }
    // Once the head's input is counted, nothing after it is a statistic: stop the graph (ggml's
    // scheduler stops when the callback returns false), which skips the output head, 20-30% of a
    // small model's compute. The logits are then garbage; calibration never reads them.
    if (ok && kind == K_HEAD) {
        c->stops++;
        return false;
    }
    return ok;
}

struct chess_calib * chess_calib_new(int n_layer, int act, bool fused_up, bool no_attn_norm, int hist_bins,
                                     int fine_bins, float log_lo, float width_hist, float width_fine, int n_threads) {
    if (n_layer <= 0 || (act != 0 && act != 1) || hist_bins < 2 || fine_bins < 2 || !(width_hist > 0.0f) ||
        !(width_fine > 0.0f) || n_threads < 1) {
        return NULL;
    }
    struct chess_calib * c = calloc(1, sizeof *c);
    if (c == NULL) {
        return NULL;
    }
    *c = (struct chess_calib) {n_layer, act, hist_bins, fine_bins, n_threads < CC_MAX_THREADS ? n_threads : CC_MAX_THREADS, 0,
                               fused_up, no_attn_norm, log_lo, width_hist, width_fine, NULL, NULL, NULL, 0, NULL, "", 0};
    c->layers = calloc(n_layer, sizeof *c->layers);
    c->scratch = calloc((size_t) c->n_threads * fine_bins, sizeof(uint32_t));
    if (c->layers == NULL || c->scratch == NULL) {
        chess_calib_free(c);
        return NULL;
    }
    return c;
}

void chess_calib_release(struct chess_calib * c, int il) {
    if (c == NULL || c->layers == NULL || il < 0 || il >= c->n_layer) {
        return;
    }
    struct cc_layer * L = &c->layers[il];
    free(L->sum_abs_u);
    free(L->sum_sq_u);
    free(L->win);
    free(L->hist_a);
    for (int p = 0; p < 3; ++p) {
        free(L->pool[p]);
    }
    *L = (struct cc_layer) {0};
}

void chess_calib_free(struct chess_calib * c) {
    if (c == NULL) {
        return;
    }
    for (int il = 0; c->layers && il < c->n_layer; ++il) {
        chess_calib_release(c, il);
    }
    free(c->layers);
    free(c->head);
    free(c->scratch);
    free(c->copy);
    free(c);
}

void chess_calib_set_skip(struct chess_calib * c, int rows) {
    c->skip = rows > 0 ? rows : 0;
}

int64_t chess_calib_size(const struct chess_calib * c, int il, int what) {
    if (what == CHESS_CALIB_HIST_HEAD) {
        return il == -1 && c->head ? c->fine_bins : 0;
    }
    if (il < 0 || il >= c->n_layer) {
        return 0;
    }
    const struct cc_layer * L = &c->layers[il];
    switch (what) {
        case CHESS_CALIB_SUM_ABS_U:
        case CHESS_CALIB_SUM_SQ_U: return L->n_ff;
        case CHESS_CALIB_HIST_A: return L->n_ff * c->hist_bins;
        case CHESS_CALIB_HIST_CATS:
        case CHESS_CALIB_HIST_Q:
        case CHESS_CALIB_HIST_O: return L->pool[what - CHESS_CALIB_HIST_CATS] ? c->fine_bins : 0;
        default: return 0;
    }
}

int chess_calib_read(const struct chess_calib * c, int il, int what, void * out, int64_t n) {
    const int64_t size = chess_calib_size(c, il, what);
    if (size == 0 || n != size) {
        return -1;
    }
    if (what == CHESS_CALIB_HIST_HEAD) {
        memcpy(out, c->head, n * sizeof(int64_t));
        return 0;
    }
    const struct cc_layer * L = &c->layers[il];
    if (what == CHESS_CALIB_SUM_ABS_U || what == CHESS_CALIB_SUM_SQ_U) {
        memcpy(out, what == CHESS_CALIB_SUM_ABS_U ? L->sum_abs_u : L->sum_sq_u, n * sizeof(double));
    } else if (what == CHESS_CALIB_HIST_A) {
        memcpy(out, L->hist_a, n * sizeof(uint32_t));
    } else {
        memcpy(out, L->pool[what - CHESS_CALIB_HIST_CATS], n * sizeof(int64_t));
    }
    return 0;
}

int64_t chess_calib_stops(const struct chess_calib * c) {
    return c->stops;
}

const char * chess_calib_error(const struct chess_calib * c) {
    return c->err;
}

int chess_calib_write(struct chess_calib * c, int il, int what, const void * in, int64_t n) {
    if (what == CHESS_CALIB_HIST_HEAD) {
        if (il != -1 || n != c->fine_bins || (c->head == NULL && (c->head = calloc(c->fine_bins, sizeof(int64_t))) == NULL)) {
            return -1;
        }
        memcpy(c->head, in, n * sizeof(int64_t));
        return 0;
    }
    if (il < 0 || il >= c->n_layer || n <= 0) {
        return -1;
    }
    struct cc_layer * L = &c->layers[il];
    switch (what) {
        case CHESS_CALIB_SUM_ABS_U:
        case CHESS_CALIB_SUM_SQ_U:
            if (!cc_alloc_ff(c, L, n, "(restored)")) {
                return -1;
            }
            memcpy(what == CHESS_CALIB_SUM_ABS_U ? L->sum_abs_u : L->sum_sq_u, in, n * sizeof(double));
            return 0;
        case CHESS_CALIB_HIST_A:
            if (L->n_ff == 0 || n != L->n_ff * c->hist_bins) {
                return -1;
            }
            memcpy(L->hist_a, in, n * sizeof(uint32_t));
            return 0;
        case CHESS_CALIB_HIST_CATS:
        case CHESS_CALIB_HIST_Q:
        case CHESS_CALIB_HIST_O: {
            int64_t ** pool = &L->pool[what - CHESS_CALIB_HIST_CATS];
            if (n != c->fine_bins || (*pool == NULL && (*pool = calloc(c->fine_bins, sizeof(int64_t))) == NULL)) {
                return -1;
            }
            memcpy(*pool, in, n * sizeof(int64_t));
            return 0;
        }
        default: return -1;
    }
}
