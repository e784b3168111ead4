#include "chess-check.h"

#include <cmath>
#include <cstdio>
#include <string>

static std::string shape_str(const ggml_tensor * t) {
    char buf[96];
    snprintf(buf, sizeof(buf), "[%lld, %lld, %lld, %lld]", (long long) t->ne[0], (long long) t->ne[1],
             (long long) t->ne[2], (long long) t->ne[3]);
    return buf;
}

std::string chess_check_meta(const gguf_context * meta, std::vector<float> & levels, float & def, bool & compact) {
    levels.clear();
    compact = false;
    const int64_t kv = gguf_find_key(meta, "chess.version");
    if (kv < 0) {
        return "";
    }
    if (gguf_get_kv_type(meta, kv) != GGUF_TYPE_UINT32 || gguf_get_val_u32(meta, kv) != 1) {
        return "chess.version: unsupported CHESS format version (expected uint32 1)";
    }
    const int64_t kl = gguf_find_key(meta, "chess.levels");
    if (kl < 0 || gguf_get_kv_type(meta, kl) != GGUF_TYPE_ARRAY || gguf_get_arr_type(meta, kl) != GGUF_TYPE_FLOAT32) {
        return "chess.levels: missing or not an array of float32";
    }
    const size_t n = gguf_get_arr_n(meta, kl);
    if (n == 0 || n > 64) {
        return "chess.levels: " + std::to_string(n) + " levels (expected 1..64)";
    }
    const float * lv = (const float *) gguf_get_arr_data(meta, kl);
    for (size_t i = 0; i < n; ++i) {
        if (!(lv[i] > 0.0f && lv[i] < 1.0f) || (i > 0 && !(lv[i] > lv[i - 1]))) {
            levels.clear();
            return "chess.levels: levels must be strictly increasing and inside (0, 1)";
        }
        levels.push_back(lv[i]);
    }
    const int64_t kd = gguf_find_key(meta, "chess.default_level");
    if (kd < 0 || gguf_get_kv_type(meta, kd) != GGUF_TYPE_FLOAT32) {
        levels.clear();
        return "chess.default_level: missing or not float32";
    }
    def = gguf_get_val_f32(meta, kd);
    bool found = false;
    for (float l : levels) {
        found = found || l == def;
    }
    if (!found) {
        levels.clear();
        return "chess.default_level: not one of chess.levels";
    }
    const int64_t ko = gguf_find_key(meta, "chess.layout");
    if (ko >= 0) {
        const char * lay = gguf_get_kv_type(meta, ko) == GGUF_TYPE_STRING ? gguf_get_val_str(meta, ko) : "";
        compact = std::string(lay) == "compact";
        if (!compact && std::string(lay) != "dual") {
            levels.clear();
            return "chess.layout: expected the string dual or compact";
        }
    }
    return "";
}

// expected shape {ne0, ne1} (ne1 = 1 for a vector); nothing in dims 2, 3
static std::string check_shape(const ggml_tensor * t, int64_t ne0, int64_t ne1) {
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        return std::string(t->name) + ": wrong shape " + shape_str(t) + ", expected [" + std::to_string(ne0) + ", " +
               std::to_string(ne1) + "]";
    }
    return "";
}

// per-channel thresholds [n_ch, n_levels] (n_ch = 0: one per level, shape [n_levels])
static std::string check_thresholds(const ggml_tensor * t, int64_t n_ch, size_t n_levels, bool values) {
    if (t->type != GGML_TYPE_F32) {
        return std::string(t->name) + ": CHESS thresholds must be f32, not " + ggml_type_name(t->type);
    }
    const int64_t n_lv = (int64_t) n_levels;
    std::string err = n_ch ? check_shape(t, n_ch, n_lv) : check_shape(t, n_lv, 1);
    if (!err.empty() || !values || !t->data) {
        return err;
    }
    const float * v = (const float *) t->data;
    const int64_t per = n_ch ? n_ch : 1;
    for (int64_t i = 0; i < per * n_lv; ++i) {
        // +inf is legal per channel only (a channel that is never kept); `!(v >= 0)` catches NaN
        if (!(v[i] >= 0.0f) || (!n_ch && std::isinf(v[i]))) {
            return std::string(t->name) + ": threshold " + (n_ch ? "of channel " + std::to_string(i % per) + ", " : "") +
                   "level " + std::to_string(i / per) + " is " + std::to_string(v[i]) +
                   (n_ch ? " (must be >= 0 and not NaN)" : " (must be finite and >= 0)");
        }
    }
    return "";
}

static std::string check_weight(const ggml_tensor * t, int64_t ne0, int64_t ne1) {
    if (t->type == CHESS_X4) { // [n_out, n_in] stored as rows of 20*n_out bytes per 32 inputs
        if (!chess_x4_ok(ne1, ne0)) {
            return std::string(t->name) + ": the x4 layout needs dimensions that are multiples of 32, not " +
                   std::to_string(ne0) + " x " + std::to_string(ne1);
        }
        return check_shape(t, ne0 * CHESS_X4_BYTES_PER_32, ne1 / 32);
    }
    if (!chess_type_supported(t->type)) {
        return std::string(t->name) + ": type " + ggml_type_name(t->type) + " is not supported by the CHESS kernels";
    }
    return check_shape(t, ne0, ne1);
}

// a part of a layer: all of its tensors present, or none
static std::string check_complete(int il, const char * part, std::initializer_list<const ggml_tensor *> ts) {
    int n = 0;
    for (const ggml_tensor * t : ts) {
        n += t != nullptr;
    }
    if (n != 0 && n != (int) ts.size()) {
        return (il < 0 ? std::string("output") : "blk." + std::to_string(il)) + ": incomplete CHESS " + part + " tensors (" + std::to_string(n) + " of " +
               std::to_string(ts.size()) + " present)";
    }
    return "";
}

std::string chess_check_layer(const chess_layer & L, int il, const chess_dims & d, size_t n_levels, bool values) {
    std::string err;
    const auto first = [&](std::string e) { if (err.empty()) err = std::move(e); };
    first(check_complete(il, "FFN (chess_ffn_tau, chess_ffn_cats, chess_wt_down)", {L.ffn_tau, L.ffn_cats, L.wt_down}));
    first(check_complete(il, "W_q (chess_thr_q, chess_wt_q)", {L.thr_q, L.wt_q}));
    first(check_complete(il, "W_o (chess_thr_o, chess_wt_o)", {L.thr_o, L.wt_o}));
    if (L.ffn_tau)  first(check_thresholds(L.ffn_tau, d.n_ff, n_levels, values));
    if (L.ffn_cats) first(check_thresholds(L.ffn_cats, 0, n_levels, values));
    if (L.thr_q)    first(check_thresholds(L.thr_q, 0, n_levels, values));
    if (L.thr_o)    first(check_thresholds(L.thr_o, 0, n_levels, values));
    if (L.wt_down)  first(check_weight(L.wt_down, d.n_embd, d.n_ff));
    if (L.wt_q)     first(check_weight(L.wt_q, d.n_q, d.n_embd));
    if (L.wt_o)     first(check_weight(L.wt_o, d.n_embd, d.n_o));
    return err;
}

std::string chess_check_head(const chess_head & H, int64_t n_embd, int64_t n_vocab, size_t n_levels, bool values) {
    std::string err = check_complete(-1, "head (output.chess_thr, output.chess_wt)", {H.thr, H.wt});
    if (err.empty() && H.thr) err = check_thresholds(H.thr, 0, n_levels, values);
    if (err.empty() && H.wt)  err = check_weight(H.wt, n_vocab, n_embd);
    return err;
}
