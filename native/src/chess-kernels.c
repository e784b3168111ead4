// CHESS sparse mat-vec kernels: the public entry points (chess-kernels.h), dispatch to the fast
// routes of chess-kernels-x86-{up,in}.c / chess-kernels-arm.c, the generic routes that run any type (and
// every type in a portable build), the x4 plan, and the re-transposition of the compact layout.
// The scalar references are in chess-kernels-ref.c.
#include "chess-kernels-impl.h"

#if !defined(_WIN32)
#include <pthread.h>
#define CH_TLS_DTOR 1 // free a thread's scratch when it exits (see ch_scratch)
#endif

// ---------------------------------------------------------------------------------------------
// thread-local scratch: grows, never shrinks, and is freed when its thread exits. Threads come and
// go: ggml built without OpenMP starts a new threadpool for every graph computed (unless the caller
// attached one), the tests start threads per run; without the key destructor each exiting thread
// leaked its buffers (found by LeakSanitizer).

static _Thread_local ch_buf tls_bufs[CH_N_BUFS];

#if CH_TLS_DTOR
static pthread_key_t  ch_key;
static pthread_once_t ch_key_once = PTHREAD_ONCE_INIT;
static bool           ch_key_ok;
static _Thread_local bool tls_registered;

// runs in the exiting thread (its thread-locals are still valid during key destructors)
static void ch_thread_exit(void * unused) {
    (void) unused;
    for (int i = 0; i < CH_N_BUFS; i++) {
        free(tls_bufs[i].p);
        tls_bufs[i].p   = NULL;
        tls_bufs[i].cap = 0;
    }
    tls_registered = false; // a later ch_scratch in this thread (another key's destructor) registers again
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

void * ch_scratch(int which, size_t need) {
    ch_buf * b = &tls_bufs[which];
    if (need > b->cap) {
#if CH_TLS_DTOR
        if (!tls_registered) {
            pthread_once(&ch_key_once, ch_key_create);
            if (ch_key_ok) {
                pthread_setspecific(ch_key, tls_bufs); // any non-NULL value: the destructor runs
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

bool ch_force_generic = false;

void chess_kernels_force_generic(bool on) {
    ch_force_generic = on;
}

// ---------------------------------------------------------------------------------------------
// small public helpers

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
    void * xq = ch_scratch(CH_BUF_X, chess_x_size(type, n_in));
    chess_prepare_x(type, x, xq, n_in);
    return xq;
}

// ---------------------------------------------------------------------------------------------
// portable build: no fast routes

#if !defined(CHESS_AVX2) && !defined(CHESS_NEON)
ch_up_fn ch_up_route_isa(enum ggml_type type, const char ** name) { (void) type; (void) name; return NULL; }
ch_in_fn ch_in_route_isa(enum ggml_type type, const char ** name) { (void) type; (void) name; return NULL; }
ch_x4_fn ch_x4_route_isa(const char ** name) { (void) name; return NULL; }
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
#endif

// ---------------------------------------------------------------------------------------------
// output-sparse up projection

static ch_up_fn ch_up_route(enum ggml_type type, const char ** name) {
    const ch_up_fn f = ch_force_generic ? NULL : ch_up_route_isa(type, name);
    if (!f) {
        *name = "vec_dot";
    }
    return f;
}

const char * chess_up_sparse_route(enum ggml_type type) {
    const char * name;
    ch_up_route(type, &name);
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
    int32_t * kept = ch_scratch(CH_BUF_LIST, (size_t) (i1 - i0) * (sizeof(int32_t) + 2 * sizeof(float)));
    float   * ka   = (float *) (kept + (i1 - i0));
    float   * ks   = ka + (i1 - i0);
    // branch-free: a kept/dropped branch mispredicts on every other channel of a mask at level 0.5
    // (measured: a third of the kernel's time at 1536x8960); slot nk is written always, kept or not
    int64_t nk = 0;
    for (int64_t i = i0; i < i1; i++) {
        const float a = chess_act_apply(act, g[i]);
        kept[nk] = (int32_t) i;
        ka[nk] = a;
        nk += !tau || fabsf(a) >= ch_thr(tau, n_tau, i);
        h[i] = 0.0f;
    }

    const char * name;
    const ch_up_fn fast = ch_up_route(type, &name);
    if (fast) {
        fast(w, nb1, n_in, kept, nk, xq, ks);
        for (int64_t k = 0; k < nk; k++) {
            h[kept[k]] = ka[k] * ks[k];
        }
        return nk;
    }

    // generic: one ggml vec_dot per kept row, whole rows prefetched CH_UP_PF_ROWS ahead
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

// ---------------------------------------------------------------------------------------------
// input-sparse mat-vec through a transposed weight

// active inputs in increasing i, in thread-local scratch; every thread of an op scans the whole
// input (cheap, vectorized by the ISA files)
static int64_t ch_active(const float * v, const float * thr, int64_t n_thr, int64_t n, int32_t ** idx_out, float ** c_out) {
    const int64_t cap = n + 16; // vector stores may write up to 15 elements past the end
    int32_t * idx = ch_scratch(CH_BUF_LIST, (size_t) cap * (sizeof(int32_t) + sizeof(float)));
    float   * c   = (float *) (idx + cap);
    *idx_out = idx;
    *c_out   = c;
    return ch_active_isa(v, thr, n_thr, n, idx, c);
}

// acc[j] += c0*w0[j] + c1*w1[j] + c2*w2[j] + c3*w3[j], as a chain of 4 sequential FMAs (the same
// rounding as 4 single-row passes, so grouping rows never changes the result). The compiler
// vectorizes it; the generic route is not the fast one for any common type.
static void ch_axpy4(float * restrict acc, const float * restrict w0, const float * restrict w1,
                     const float * restrict w2, const float * restrict w3,
                     float c0, float c1, float c2, float c3, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float a = acc[j];
        a = CH_FMA(c0, w0[j], a);
        a = CH_FMA(c1, w1[j], a);
        a = CH_FMA(c2, w2[j], a);
        a = CH_FMA(c3, w3[j], a);
        acc[j] = a;
    }
}

static void ch_axpy1(float * restrict acc, const float * restrict w0, float c0, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        acc[j] = CH_FMA(c0, w0[j], acc[j]);
    }
}

#define CH_SUB_COLS 256 // columns dequantized per row at a time (4 rows x 1 KB of scratch)

// Generic route: any type with to_float. Per tile of y, per group of 4 active rows, dequantize the
// rows' block-aligned sub-range into scratch and FMA it into y.
static void ch_in_generic(const char * w, enum ggml_type type, size_t nb1, const int32_t * idx,
                          const float * c, int64_t na, float * y, int64_t j0, int64_t j1) {
    const int64_t bs  = ggml_blck_size(type);
    const size_t  ts  = ggml_type_size(type);
    const int64_t sub = ((CH_SUB_COLS + bs - 1) / bs) * bs;
    const int64_t tile = sub * (CH_TILE_COLS / CH_SUB_COLS);
    const ggml_to_float_t to_float = ggml_get_type_traits(type)->to_float;
    const bool is_f32 = type == GGML_TYPE_F32;
    float * tmp = is_f32 ? NULL : ch_scratch(CH_BUF_DEQ, 4 * (size_t) sub * sizeof(float));

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
            const int64_t kn = k + pfr + 4 <= na ? k + pfr : k; // near the end: our own rows
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

static ch_in_fn ch_in_route(enum ggml_type type, const char ** name) {
    const ch_in_fn f = ch_force_generic ? NULL : ch_in_route_isa(type, name);
    if (!f) {
        *name = "generic";
    }
    return f;
}

static ch_x4_fn ch_x4_route(const char ** name) {
    const ch_x4_fn f = ch_force_generic ? NULL : ch_x4_route_isa(name);
    if (!f) {
        *name = "generic-x4";
        return ch_x4_generic;
    }
    return f;
}

const char * chess_in_sparse_route(enum ggml_type type) {
    const char * name;
    if (type == CHESS_X4) {
        ch_x4_route(&name);
    } else {
        ch_in_route(type, &name);
    }
    return name;
}

// ---- pieces of the input, partial products, ordered sum -----------------------------------------
// A product is cut into pieces of its active inputs (groups for x4) by the input alone; piece k's
// product goes to its own partial vector and y = ((p0 + p1) + p2) + ..., per column. A column's
// value does not depend on the column range or the thread that computes it, so the decode path
// (chess_in_sparse_mt: whole rows, threads take pieces) and the batch path (chess_in_sparse: column
// ranges, all pieces) give bit-identical results. Each piece reads >= 32x the bytes of its partial
// row of n_out floats, so writing and summing the partials stays a small cost next to the weights.

static inline int32_t ch_atomic_add(int32_t * p, int32_t v) { // returns the new value
#if defined(_MSC_VER) && !defined(__clang__)
    return _InterlockedExchangeAdd((volatile long *) p, v) + v;
#else
    return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL);
#endif
}

static inline void ch_atomic_store0(int32_t * p) {
#if defined(_MSC_VER) && !defined(__clang__)
    _InterlockedExchange((volatile long *) p, 0);
#else
    __atomic_store_n(p, 0, __ATOMIC_RELEASE);
#endif
}

typedef struct {
    const char * wt;
    enum ggml_type type;
    size_t nb1;
    int64_t n_out, na, units, np;
    ch_x4_plan pl;      // x4
    const int32_t * idx; // block types: active inputs
    const float * c;
    ch_in_fn fast;
} ch_in_job;

static ch_in_job ch_in_setup(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                             const float * v, const float * thr, int64_t n_thr) {
    ch_in_job J = { (const char *) wt, type, nb1, n_out, 0, 0, 1, { 0 }, NULL, NULL, NULL };
    int64_t min_units;
    if (type == CHESS_X4) {
        J.pl = ch_x4_prepare(v, thr, n_thr, n_in);
        J.na = J.pl.na;
        J.units = J.pl.ng;
        min_units = 8; // a group reads 20 bytes per column
    } else {
        int32_t * idx;
        float   * c;
        J.na = ch_active(v, thr, n_thr, n_in, &idx, &c);
        J.idx = idx;
        J.c = c;
        J.units = J.na;
        min_units = (int64_t) ceil(128.0 * (double) n_out / (double) ggml_row_size(type, n_out));
        const char * name;
        J.fast = ch_in_route(type, &name);
    }
    const int64_t n = J.units / (min_units > 0 ? min_units : 1);
    J.np = n < 1 ? 1 : n > CHESS_IN_MAX_PIECES ? CHESS_IN_MAX_PIECES : n;
    return J;
}

// start of piece k (block types: a multiple of 4 rows, the routes' groups); the last ends at units
static int64_t ch_piece_start(const ch_in_job * J, int64_t k) {
    if (k >= J->np) {
        return J->units;
    }
    const int64_t align = J->type == CHESS_X4 ? 1 : 4;
    const int64_t u = (k * J->units / J->np + align - 1) / align * align;
    return u < J->units ? u : J->units;
}

static void ch_in_piece(const ch_in_job * J, int64_t k, float * out, int64_t j0, int64_t j1) {
    const int64_t u0 = ch_piece_start(J, k), u1 = ch_piece_start(J, k + 1);
    if (J->type == CHESS_X4) {
        const char * name;
        const ch_x4_plan sub = { J->pl.grp + u0, J->pl.pair, u1 - u0, J->na };
        ch_x4_route(&name)(J->wt, J->nb1, J->n_out, &sub, out, j0, j1);
    } else if (J->fast) {
        J->fast(J->wt, J->nb1, ggml_type_size(J->type), J->idx + u0, J->c + u0, u1 - u0, out, j0, j1);
    } else {
        ch_in_generic(J->wt, J->type, J->nb1, J->idx + u0, J->c + u0, u1 - u0, out, j0, j1);
    }
}

// y[j0, j1) += the partials of pieces 1 .. np-1 (stride n_out), in order
static void ch_in_sum(float * y, const float * part, int64_t np, int64_t n_out, int64_t j0, int64_t j1) {
    for (int64_t k = 1; k < np; k++) {
        const float * p = part + (size_t) (k - 1) * (size_t) n_out;
        for (int64_t j = j0; j < j1; j++) {
            y[j] += p[j];
        }
    }
}

int64_t chess_in_sparse(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                        const float * v, const float * thr, int64_t n_thr, float * y, int64_t j0, int64_t j1) {
    const ch_in_job J = ch_in_setup(wt, type, nb1, n_in, n_out, v, thr, n_thr);
    if (j1 > j0) {
        float * part = J.np > 1 ? ch_scratch(CH_BUF_PART, (size_t) (J.np - 1) * (size_t) n_out * sizeof(float)) : NULL;
        for (int64_t k = 0; k < J.np; k++) {
            ch_in_piece(&J, k, k == 0 ? y : part + (size_t) (k - 1) * (size_t) n_out, j0, j1);
        }
        ch_in_sum(y, part, J.np, n_out, j0, j1);
    }
    return J.na;
}

int64_t chess_in_sparse_mt(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                           const float * v, const float * thr, int64_t n_thr, float * y, chess_in_shared * sh, int nth) {
    const ch_in_job J = ch_in_setup(wt, type, nb1, n_in, n_out, v, thr, n_thr);
    for (;;) {
        const int64_t k = ch_atomic_add(&sh->next, 1) - 1;
        if (k >= J.np) {
            break;
        }
        ch_in_piece(&J, k, k == 0 ? y : sh->part + (size_t) (k - 1) * (size_t) n_out, 0, n_out);
    }
    if (ch_atomic_add(&sh->done, 1) == nth) { // the last thread: every piece is written
        ch_in_sum(y, sh->part, J.np, n_out, 0, n_out);
        ch_atomic_store0(&sh->next);
        ch_atomic_store0(&sh->done);
    }
    return J.na;
}

// ---------------------------------------------------------------------------------------------
// x4: exact transposed 4-bit weights (chess_gguf/x4.py, docs/format.md). One I8 row per group g of
// 32 input channels: a f16[n_out] | b f16[n_out] | 32 x n_out/2 bytes of codes (per 32 outputs 16
// bytes, byte k = q[k] | q[k+16] << 4), w[j][32g+c] = a[j]*q + b[j]: the original's codes and
// block pairs, reordered, not requantized. The kernels multiply 8-bit activations (the plan below)
// by the 4-bit codes in integers, as ggml's dense kernels multiply Q8 activations.

size_t chess_x4_row_bytes(int64_t n_out) {
    return (size_t) CHESS_X4_BYTES_PER_32 * (size_t) n_out;
}

bool chess_x4_ok(int64_t n_in, int64_t n_out) {
    return n_in > 0 && n_out > 0 && n_in % 32 == 0 && n_out % 32 == 0;
}

static inline int8_t ch_q8(float x) {
    const float r = nearbyintf(x); // ties to even, as the vector conversions
    return (int8_t) (r > 127.0f ? 127 : r < -127.0f ? -127 : r == r ? r : 0);
}

ch_x4_plan ch_x4_prepare(const float * v, const float * thr, int64_t n_thr, int64_t n_in) {
    int32_t * idx;
    float   * c;
    const int64_t na = ch_active(v, thr, n_thr, n_in, &idx, &c);
    const int64_t ng_max = n_in / 32 < na ? n_in / 32 : na;
    ch_x4_group * grp = ch_scratch(CH_BUF_GROUPS, (size_t) ng_max * sizeof(ch_x4_group) +
                                                  (size_t) (na / 2 + ng_max + 1) * sizeof(ch_x4_pair));
    ch_x4_pair * pair = (ch_x4_pair *) (grp + ng_max);
    int64_t ng = 0, np = 0;
    for (int64_t k = 0; k < na; ) {
        const int32_t g = idx[k] >> 5;
        int64_t ke = k;
        float m = 0.0f;
        for (; ke < na && (idx[ke] >> 5) == g; ke++) {
            const float a = fabsf(c[ke]);
            m = a > m ? a : m; // as fmaxf (m is never NaN), which gcc calls through the PLT
        }
        const float inv = 127.0f / m;
        ch_x4_group * G = &grp[ng++];
        G->g = g;
        G->p0 = (int32_t) np;
        G->s = m / 127.0f;
        G->nseg = 0;
        int32_t U = 0, sum = 0;
        for (int64_t q = k; q < ke; q += 2) {
            const int8_t ua = ch_q8(c[q] * inv), ub = q + 1 < ke ? ch_q8(c[q + 1] * inv) : 0;
            ch_x4_pair * P = &pair[np];
            P->ca = (uint8_t) (idx[q] & 31);
            P->cb = (uint8_t) (q + 1 < ke ? idx[q + 1] & 31 : idx[q] & 31);
            P->ua = ua;
            P->ub = ub;
            P->pb = (int16_t) (uint16_t) ((uint8_t) ua | (uint16_t) ((uint8_t) ub) << 8);
            const int32_t w = abs(ua) + abs(ub);
            if (sum + w > CH_X4_SEG_SUM) { // close the segment before this pair
                G->seg[G->nseg++] = (int32_t) (np - G->p0);
                sum = 0;
            }
            sum += w;
            U += ua + ub;
            np++;
        }
        G->seg[G->nseg++] = (int32_t) (np - G->p0);
        G->np = (int32_t) (np - G->p0);
        G->U = U;
        k = ke;
    }
    const ch_x4_plan pl = { grp, pair, ng, na };
    return pl;
}

// Portable route: the same integers in int32 (no int16 segments needed), per tile of columns.
void ch_x4_generic(const char * w, size_t nb1, int64_t n_out, const ch_x4_plan * pl, float * y, int64_t j0, int64_t j1) {
    const size_t cs = (size_t) n_out / 2;
    int32_t * T = ch_scratch(CH_BUF_DEQ, CH_TILE_COLS * sizeof(int32_t));
    for (int64_t jt = j0; jt < j1; jt += CH_TILE_COLS) {
        const int64_t nt = j1 - jt < CH_TILE_COLS ? j1 - jt : CH_TILE_COLS;
        memset(y + jt, 0, (size_t) nt * sizeof(float));
        for (int64_t e = 0; e < pl->ng; e++) {
            const ch_x4_group * G = &pl->grp[e];
            const char * row = w + (size_t) G->g * nb1;
            const uint8_t * codes = (const uint8_t *) row + 4 * n_out + jt / 2;
            memset(T, 0, (size_t) nt * sizeof(int32_t));
            for (int32_t p = 0; p < G->np; p++) {
                const ch_x4_pair * P = &pl->pair[G->p0 + p];
                const uint8_t * ra = codes + P->ca * cs, * rb = codes + P->cb * cs;
                for (int64_t b = 0; b < nt / 32; b++) {
                    for (int e2 = 0; e2 < 16; e2++) {
                        const uint8_t xa = ra[16 * b + e2], xb = rb[16 * b + e2];
                        T[32 * b + e2]      += P->ua * (xa & 15) + P->ub * (xb & 15);
                        T[32 * b + e2 + 16] += P->ua * (xa >> 4) + P->ub * (xb >> 4);
                    }
                }
            }
            const ggml_fp16_t * a = (const ggml_fp16_t *) row + jt, * bb = (const ggml_fp16_t *) row + n_out + jt;
            const float sU = G->s * (float) G->U;
            for (int64_t j = 0; j < nt; j++) {
                y[jt + j] = CH_FMA(ch_h2f(a[j]) * G->s, (float) T[j], CH_FMA(ch_h2f(bb[j]), sU, y[jt + j]));
            }
        }
    }
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
    float * row = ch_scratch(CH_BUF_TILE, (size_t) n_in * sizeof(float));
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
    float * tile = ch_scratch(CH_BUF_TILE, (size_t) (tw * ic + tw) * sizeof(float));
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
