#include "chess-graph.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

chess_state::chess_state(std::vector<float> lv, float def, std::vector<chess_layer> ls, chess_head hd)
    : levels(std::move(lv)), default_level(def), layers(std::move(ls)), head(hd) {
    head_params.st = this;
    head_params.layer = -1;
    head_params.part = CHESS_PART_HEAD;
    const size_t n = layers.size() * CHESS_N_PARTS;
    kept.reset(new std::atomic<uint64_t>[n]);
    total.reset(new std::atomic<uint64_t>[n]);
    reset_stats();
    params.resize(layers.size() * (CHESS_N_PARTS + 1));
    for (size_t il = 0; il < layers.size(); ++il) {
        for (int p = 0; p <= CHESS_N_PARTS; ++p) {
            auto & op = params[il * (CHESS_N_PARTS + 1) + p];
            op.st = this;
            op.layer = (int) il;
            op.part = p < CHESS_N_PARTS ? p : -1; // the last slot is the (uncounted) FFN down op
        }
    }
    for (size_t i = 0; i < levels.size(); ++i) {
        if (levels[i] == default_level) {
            level = (int) i;
        }
    }
    int64_t n_out_max = head.wt ? chess_wt_n_out(head.wt->type, head.wt->ne[0]) : 0;
    for (const chess_layer & L : layers) {
        for (const ggml_tensor * wt : { L.wt_down, L.wt_q, L.wt_o }) {
            if (wt) {
                n_out_max = std::max(n_out_max, chess_wt_n_out(wt->type, wt->ne[0]));
            }
        }
    }
    in_part.resize((size_t) (CHESS_IN_MAX_PIECES - 1) * (size_t) n_out_max);
    in_shared.part = in_part.data();
}

void chess_state::reset_stats() {
    for (size_t i = 0; i < layers.size() * CHESS_N_PARTS; ++i) {
        kept[i] = 0;
        total[i] = 0;
    }
    n_tokens = 0;
    head_kept = 0;
    head_total = 0;
}

const char * chess_state::method_name() const {
    switch (method) {
        case CHESS_METHOD_CHESS: return "chess";
        case CHESS_METHOD_FFN:   return "chess-ffn";
        case CHESS_METHOD_CATS:  return "cats";
    }
    return "?";
}

std::string chess_state::set(const char * m, const char * lv, const char * pf) {
    // validate everything before changing anything
    chess_method new_method = method;
    int new_level = level;
    bool new_prefill = prefill_masked;
    if (m) {
        if      (!strcmp(m, "chess"))     new_method = CHESS_METHOD_CHESS;
        else if (!strcmp(m, "chess-ffn")) new_method = CHESS_METHOD_FFN;
        else if (!strcmp(m, "cats"))      new_method = CHESS_METHOD_CATS;
        else return std::string("CHESS_METHOD: unknown method '") + m + "' (expected chess, chess-ffn or cats)";
    }
    if (lv) {
        std::string stored;
        for (float l : levels) {
            stored += (stored.empty() ? "" : ", ") + std::to_string(l).substr(0, 4);
        }
        if (!strcmp(lv, "off")) {
            new_level = -1;
        } else if (!strcmp(lv, "default")) {
            new_level = -1;
            for (size_t i = 0; i < levels.size(); ++i) {
                if (levels[i] == default_level) new_level = (int) i;
            }
        } else {
            char * end = nullptr;
            const double v = strtod(lv, &end);
            new_level = -2;
            if (end != lv && *end == '\0') {
                for (size_t i = 0; i < levels.size(); ++i) {
                    if (std::fabs(levels[i] - v) < 1e-4) new_level = (int) i;
                }
            }
            if (new_level == -2) {
                return std::string("CHESS_LEVEL: '") + lv + "' is not a level stored in this model (stored: " + stored +
                       "; or off, default)";
            }
        }
    }
    if (pf) {
        if      (!strcmp(pf, "dense"))  new_prefill = false;
        else if (!strcmp(pf, "masked")) new_prefill = true;
        else return std::string("CHESS_PREFILL: unknown mode '") + pf + "' (expected dense or masked)";
    }
    method = new_method;
    level = new_level;
    prefill_masked = new_prefill;
    return "";
}

std::string chess_state::set_from_env() {
    return set(getenv("CHESS_METHOD"), getenv("CHESS_LEVEL"), getenv("CHESS_PREFILL"));
}

bool chess_state::active(int il, chess_part part, int64_t n_tokens) const {
    if (level < 0 || il < 0 || il >= (int) layers.size() || (n_tokens > 1 && !prefill_masked)) {
        return false;
    }
    const chess_layer & L = layers[il];
    switch (part) {
        case CHESS_PART_FFN:
            return L.wt_down && (method == CHESS_METHOD_CATS ? L.ffn_cats != nullptr : L.ffn_tau != nullptr);
        case CHESS_PART_Q:
            return method == CHESS_METHOD_CHESS && L.wt_q && L.thr_q;
        case CHESS_PART_O:
            return method == CHESS_METHOD_CHESS && L.wt_o && L.thr_o;
        default:
            return false;
    }
}

bool chess_state::head_active(int64_t n_tokens) const {
    if (level < 0 || method != CHESS_METHOD_CHESS || !head.wt || !head.thr || (n_tokens > 1 && !prefill_masked)) {
        return false;
    }
    return ((const float *) head.thr->data)[level] > 0.0f; // host memory (a plain CPU buffer)
}

static void count(const chess_op_params * p, uint64_t kept, uint64_t total) {
    if (p->part < 0) {
        return;
    }
    if (p->part == CHESS_PART_HEAD) {
        p->st->head_kept.fetch_add(kept, std::memory_order_relaxed);
        p->st->head_total.fetch_add(total, std::memory_order_relaxed);
        return;
    }
    const size_t i = (size_t) p->layer * CHESS_N_PARTS + p->part;
    p->st->kept[i].fetch_add(kept, std::memory_order_relaxed);
    if (total) {
        p->st->total[i].fetch_add(total, std::memory_order_relaxed);
    }
}

// src: 0 gate pre-activation f32 [n_ff, T], 1 x f32 [n_in, T], 2 W_up [n_in, n_ff], 3 tau f32 [n_ff] or [1]
static void chess_up_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto * p = (const chess_op_params *) ud;
    const ggml_tensor * g = dst->src[0], * x = dst->src[1], * w = dst->src[2], * tau = dst->src[3];
    const int64_t n_ff = dst->ne[0], n_tok = dst->ne[1], n_in = x->ne[0];
    int64_t i0, i1;
    chess_thread_range(n_ff, 16, ith, nth, &i0, &i1); // 16 floats = one cache line of h
    uint64_t kept = 0;
    for (int64_t t = 0; t < n_tok; ++t) {
        const float * xt = (const float *) ((const char *) x->data + t * x->nb[1]);
        const void * xq = chess_prepare_x_tls(w->type, xt, n_in);
        kept += chess_up_sparse(w->data, w->type, w->nb[1], n_in,
                                (const float *) ((const char *) g->data + t * g->nb[1]),
                                (const float *) tau->data, tau->ne[0], p->act, xq,
                                (float *) ((char *) dst->data + t * dst->nb[1]), i0, i1);
    }
    count(p, kept, ith == 0 ? (uint64_t) (n_ff * n_tok) : 0);
    if (ith == 0 && p->layer == 0) {
        p->st->n_tokens.fetch_add(n_tok, std::memory_order_relaxed);
    }
}

// src: 0 v f32 [n_in, T], 1 Wt [n_out, n_in], 2 (optional) thr f32 [1] or [n_in]
static void chess_in_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto * p = (const chess_op_params *) ud;
    const ggml_tensor * v = dst->src[0], * wt = dst->src[1], * thr = dst->src[2];
    const int64_t n_in = v->ne[0], n_out = dst->ne[0], n_tok = dst->ne[1];
    const float * th = thr ? (const float *) thr->data : nullptr;
    uint64_t active = 0;
    if (n_tok == 1) { // decode: every thread reads whole rows
        active = chess_in_sparse_mt(wt->data, wt->type, wt->nb[1], n_in, n_out, (const float *) v->data, th,
                                    thr ? thr->ne[0] : 0, (float *) dst->data, &p->st->in_shared, nth);
        if (ith == 0) {
            count(p, active, (uint64_t) n_in);
        }
        return;
    }
    // a few tokens (compact layout, masked prefill): each thread its columns of every token
    int64_t j0, j1;
    chess_thread_range(n_out, chess_in_align(wt->type), ith, nth, &j0, &j1);
    for (int64_t t = 0; t < n_tok; ++t) {
        active += chess_in_sparse(wt->data, wt->type, wt->nb[1], n_in, n_out,
                                  (const float *) ((const char *) v->data + t * v->nb[1]),
                                  th, thr ? thr->ne[0] : 0, (float *) ((char *) dst->data + t * dst->nb[1]), j0, j1);
    }
    if (ith == 0) { // every thread sees the same active count
        count(p, active, (uint64_t) (n_in * n_tok));
    }
}

// Masked multi-token batches (CHESS_PREFILL=masked) take ggml's matmuls on the dense weights with
// the masks applied between them: the same mathematics as the sparse kernels (the zeros skipped
// there are multiplied here), at GEMM speed instead of one weight pass per token.

// src: 0 activation a = act(g) f32 [n_ff, T], 1 up product f32 [n_ff, T], 2 tau f32 [n_ff] or [1]
// dst: h = keep ? a * u : 0 with keep = |a| >= tau (chess_up_sparse's rule)
static void chess_mask_ffn_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto * p = (const chess_op_params *) ud;
    const ggml_tensor * a = dst->src[0], * u = dst->src[1], * tau = dst->src[2];
    const int64_t n_ff = dst->ne[0], n_tok = dst->ne[1], n_tau = tau->ne[0];
    const float * th = (const float *) tau->data;
    int64_t t0, t1;
    chess_thread_range(n_tok, 1, ith, nth, &t0, &t1);
    uint64_t kept = 0;
    for (int64_t t = t0; t < t1; ++t) {
        const float * at = (const float *) ((const char *) a->data + t * a->nb[1]);
        const float * ut = (const float *) ((const char *) u->data + t * u->nb[1]);
        float * ht = (float *) ((char *) dst->data + t * dst->nb[1]);
        for (int64_t i = 0; i < n_ff; ++i) { // branch-free: vectorises
            const float th_i = th[n_tau == 1 ? 0 : i];
            const bool keep = std::fabs(at[i]) >= th_i;
            ht[i] = keep ? at[i] * ut[i] : 0.0f;
            kept += keep;
        }
    }
    count(p, kept, (uint64_t) (n_ff * (t1 - t0)));
    if (ith == 0 && p->layer == 0) {
        p->st->n_tokens.fetch_add(n_tok, std::memory_order_relaxed);
    }
}

// src: 0 v f32 [n_in, T], 1 thr f32 [1]; dst: v where v != 0 and |v| >= thr, else 0 (chess_in_sparse's rule)
static void chess_mask_in_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto * p = (const chess_op_params *) ud;
    const ggml_tensor * v = dst->src[0];
    const float thr = *(const float *) dst->src[1]->data;
    const int64_t n_in = dst->ne[0], n_tok = dst->ne[1];
    int64_t t0, t1;
    chess_thread_range(n_tok, 1, ith, nth, &t0, &t1);
    uint64_t active = 0;
    for (int64_t t = t0; t < t1; ++t) {
        const float * vt = (const float *) ((const char *) v->data + t * v->nb[1]);
        float * ot = (float *) ((char *) dst->data + t * dst->nb[1]);
        for (int64_t i = 0; i < n_in; ++i) {
            const bool on = vt[i] != 0.0f && std::fabs(vt[i]) >= thr;
            ot[i] = on ? vt[i] : 0.0f;
            active += on;
        }
    }
    count(p, active, (uint64_t) (n_in * (t1 - t0)));
}

// Masked batches of at least this many rows take ggml's matmuls; smaller ones run the sparse
// kernels token by token. Below 64 rows llama.cpp's own dense CPU ops give rows bit-identical to
// one-token decoding (tests/test_soak.py), so a masked batch that small (server slots, the soak's
// reference) reproduces sparse decoding exactly; from 64 rows they do not, and the matmuls run at
// the file's dense prompt speed, where the per-token kernels reach 0.7-0.8x of it on Qwen2.5-0.5B
// Q4_K_M (but 1.2x on SmolLM2's Q4_1, which ggml has no batched kernel for: docs/measurements.md).
// The environment variable of the same name overrides it.
static int64_t chess_masked_gemm_min_rows() {
    static const int64_t n = [] {
        const char * e = getenv("CHESS_MASKED_GEMM_MIN_ROWS");
        return e && *e ? (int64_t) atoll(e) : (int64_t) 64;
    }();
    return n;
}

static chess_op_params * op_params(chess_state * st, int il, int slot) {
    return &st->params[(size_t) il * (CHESS_N_PARTS + 1) + slot];
}

ggml_tensor * chess_build_ffn(ggml_context * ctx, chess_state * st, int il, int64_t n_batch, ggml_tensor * x,
                              ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down, enum chess_act act,
                              const chess_name_cb & cb) {
    const int64_t n_tok = x->ne[1];
    if (!st || !st->active(il, CHESS_PART_FFN, n_batch) || !up || x->type != GGML_TYPE_F32 ||
        !chess_type_supported(up->type) || !chess_wt_supported(st->layers[il].wt_down->type)) {
        return nullptr;
    }
    const chess_layer & L = st->layers[il];
    if (!gate) { // fused (phi3, glm4): the gate's rows first, then up's; row views need no copy
        const int64_t n = chess_wt_n_in(L.wt_down->type, L.wt_down->ne[1]); // n_ff
        if (up->ne[1] != 2 * n) {
            return nullptr;
        }
        gate = ggml_view_2d(ctx, up, up->ne[0], n, up->nb[1], 0);
        up   = ggml_view_2d(ctx, up, up->ne[0], n, up->nb[1], n * up->nb[1]);
    }
    const int64_t n_ff = up->ne[1];
    ggml_tensor * thr = st->method == CHESS_METHOD_CATS
        ? ggml_view_1d(ctx, L.ffn_cats, 1, st->level * sizeof(float))
        : ggml_view_1d(ctx, L.ffn_tau, n_ff, st->level * L.ffn_tau->nb[1]);
    if (!ggml_is_contiguous(x)) {
        x = ggml_cont(ctx, x);
    }
    ggml_tensor * g = ggml_mul_mat(ctx, gate, x);
    cb(g, "ffn_gate", il);
    chess_op_params * pu = op_params(st, il, CHESS_PART_FFN);
    pu->act = act;
    if (n_tok > 1 && n_tok >= chess_masked_gemm_min_rows()) { // masked batch: dense up, the mask, dense down
                                                               // (compact: through chess_build_proj)
        ggml_tensor * u = ggml_mul_mat(ctx, up, x);
        cb(u, "ffn_up", il);
        // ggml's vectorised activation (the dense path's), not chess_act_apply's scalar one: masks
        // of channels at their threshold may differ from a decoded token's (the tests measure it)
        ggml_tensor * a = act == CHESS_ACT_GELU ? ggml_gelu(ctx, g) : ggml_silu(ctx, g);
        cb(a, "ffn_act", il);
        ggml_tensor * args[3] = { a, u, thr };
        ggml_tensor * h = ggml_custom_4d(ctx, GGML_TYPE_F32, n_ff, n_tok, 1, 1, args, 3, chess_mask_ffn_op,
                                         GGML_N_TASKS_MAX, pu);
        cb(h, "ffn_chess_h", il);
        ggml_tensor * y = st->compact ? chess_build_proj(ctx, st, n_batch, down, h, cb) : ggml_mul_mat(ctx, down, h);
        cb(y, "ffn_chess_down", il);
        return y;
    }
    ggml_tensor * args_up[4] = { g, x, up, thr };
    ggml_tensor * h = ggml_custom_4d(ctx, GGML_TYPE_F32, n_ff, n_tok, 1, 1, args_up, 4, chess_up_op,
                                     GGML_N_TASKS_MAX, pu);
    cb(h, "ffn_chess_h", il);
    ggml_tensor * args_down[2] = { h, L.wt_down };
    ggml_tensor * y = ggml_custom_4d(ctx, GGML_TYPE_F32, chess_wt_n_out(L.wt_down->type, L.wt_down->ne[0]), n_tok, 1, 1,
                                     args_down, 2, chess_in_op,
                                     GGML_N_TASKS_MAX, op_params(st, il, CHESS_N_PARTS));
    cb(y, "ffn_chess_down", il);
    return y;
}

// src: 0 Wt [n_out, n_in]; dst [n_in, n_out] in Q8_0 (or F32): W = Wt^T for ggml's dense matmul
static void chess_retranspose_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    (void) ud;
    const ggml_tensor * wt = dst->src[0];
    int64_t j0, j1;
    const int64_t n_in = chess_wt_n_in(wt->type, wt->ne[1]), n_out = chess_wt_n_out(wt->type, wt->ne[0]);
    chess_thread_range(n_out, chess_in_align(wt->type), ith, nth, &j0, &j1);
    chess_retranspose(wt->data, wt->type, wt->nb[1], n_in, n_out, dst->data, dst->type, j0, j1);
}

// Batches up to this many tokens multiply a compact (transposed-only) weight with the in kernel
// (one pass over the weight per token), larger ones re-transpose it once and use ggml's matmul.
// Measured (llama-bench -p N -n 0 -t 2, dense, kernel vs re-transposition, tok/s): Qwen2.5-0.5B
// N=8 55-63 vs 23-38, N=16 79-91 vs 53-67, N=32 96-97 vs 83-96, N=128 112-123 vs 154-188;
// SmolLM2 N=16 159-188 vs 121-123, N=32 162-163 vs 165, N=64 mixed. The environment variable of
// the same name overrides it (for measuring the crossover on other models and machines).
static int64_t chess_compact_in_max_tokens() {
    static const int64_t n = [] {
        const char * e = getenv("CHESS_COMPACT_IN_MAX_TOKENS");
        return e && *e ? (int64_t) atoll(e) : (int64_t) 32;
    }();
    return n;
}

ggml_tensor * chess_build_proj(ggml_context * ctx, chess_state * st, int64_t n_batch, ggml_tensor * w, ggml_tensor * v,
                               const chess_name_cb & cb) {
    if (!st || v->type != GGML_TYPE_F32) {
        return nullptr;
    }
    const bool head = st->head.w == w; // set only when the file has a CHESS head; its original always exists
    int il = -1;
    chess_part part = head ? CHESS_PART_HEAD : CHESS_PART_FFN; // FFN: W_down, only ever matched in the compact layout
    for (size_t i = 0; i < st->layers.size() && il < 0 && !head; ++i) {
        const chess_layer & L = st->layers[i];
        if (L.wq == w) { il = (int) i; part = CHESS_PART_Q; }
        if (L.wo == w) { il = (int) i; part = CHESS_PART_O; }
        if (st->compact && L.wt_down == w) { il = (int) i; part = CHESS_PART_FFN; }
    }
    if (il < 0 && !head) {
        return nullptr;
    }
    const chess_layer * L = head ? nullptr : &st->layers[il];
    ggml_tensor * wt  = head ? st->head.wt  : part == CHESS_PART_Q ? L->wt_q  : part == CHESS_PART_O ? L->wt_o : L->wt_down;
    ggml_tensor * thr = head ? st->head.thr : part == CHESS_PART_Q ? L->thr_q : part == CHESS_PART_O ? L->thr_o : nullptr;
    bool sparse = head ? st->head_active(n_batch) : part != CHESS_PART_FFN && st->active(il, part, n_batch);
    const bool compact = st->compact && !head;
    if (!sparse && !compact) {
        return nullptr;
    }
    if (!wt || !chess_wt_supported(wt->type)) {
        GGML_ASSERT(!compact && "the loader refuses compact files with unsupported types");
        return nullptr;
    }
    chess_op_params * params = head ? &st->head_params : op_params(st, il, part); // counts the sparse product
    if (!ggml_is_contiguous(v)) {
        v = ggml_cont(ctx, v);
    }
    if (ggml_n_dims(v) > 2) {
        v = ggml_reshape_2d(ctx, v, v->ne[0], ggml_nrows(v));
    }
    const int64_t n_in = chess_wt_n_in(wt->type, wt->ne[1]), n_out = chess_wt_n_out(wt->type, wt->ne[0]);
    GGML_ASSERT(v->ne[0] == n_in);
    const char * name = head ? "output_chess" : part == CHESS_PART_Q ? "attn_q_chess" : part == CHESS_PART_O ? "attn_o_chess"
                                                                                                 : "ffn_down_chess";
    ggml_tensor * y;
    if (sparse && v->ne[1] > 1 && v->ne[1] >= chess_masked_gemm_min_rows()) { // masked batch: the masked input,
                                                                               // then the dense product
        ggml_tensor * args[2] = { v, ggml_view_1d(ctx, thr, 1, st->level * sizeof(float)) };
        v = ggml_custom_4d(ctx, GGML_TYPE_F32, n_in, v->ne[1], 1, 1, args, 2, chess_mask_in_op,
                           GGML_N_TASKS_MAX, params);
        cb(v, head ? "output_chess_in" : part == CHESS_PART_Q ? "attn_q_chess_in" : "attn_o_chess_in", il);
        if (!compact) {
            y = ggml_mul_mat(ctx, w, v);
            cb(y, name, il);
            return y;
        }
        sparse = false; // compact: the dense routes below
    }
    if (sparse || v->ne[1] <= chess_compact_in_max_tokens()) {
        ggml_tensor * args[3] = { v, wt, sparse ? ggml_view_1d(ctx, thr, 1, st->level * sizeof(float)) : nullptr };
        y = ggml_custom_4d(ctx, GGML_TYPE_F32, n_out, v->ne[1], 1, 1, args, sparse ? 3 : 2, chess_in_op,
                           GGML_N_TASKS_MAX, sparse ? params : op_params(st, il, CHESS_N_PARTS)); // dense: uncounted
    } else {
        const ggml_type dt = chess_retranspose_ok(GGML_TYPE_Q8_0, n_in) ? GGML_TYPE_Q8_0 : GGML_TYPE_F32;
        ggml_tensor * args[1] = { wt };
        ggml_tensor * wd = ggml_custom_4d(ctx, dt, n_in, n_out, 1, 1, args, 1, chess_retranspose_op,
                                          GGML_N_TASKS_MAX, nullptr);
        cb(wd, "chess_retransposed", il);
        y = ggml_mul_mat(ctx, wd, v);
    }
    cb(y, name, il);
    return y;
}
