// libFuzzer target for the CHESS part of the loader: the input is a whole GGUF file, parsed by
// ggml's own gguf reader and mapped as llama.cpp does it, then checked by chess-check.h exactly as
// the patched loader checks it: metadata, then every layer's tensors including the threshold values, then the head's.
// Built by `make test-fuzz` (clang, -fsanitize=fuzzer,address,undefined); seeds from
// scripts/fuzz-seeds.py. A crash, sanitizer report, leak or timeout is a finding.
#include "chess-check.h"
#include "ggml-cpu.h"

#include <cstdint>
#include <cstdio>
#include <string>

extern "C" int LLVMFuzzerInitialize(int * argc, char *** argv);
extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);

// u32 hyper-parameter `<arch>.<key>` (scalar, or per layer as an array of u32/i32); -1 if absent
static int64_t hparam(const gguf_context * g, const std::string & arch, const char * key, int il) {
    const int64_t k = gguf_find_key(g, (arch + "." + key).c_str());
    if (k < 0) {
        return -1;
    }
    switch (gguf_get_kv_type(g, k)) {
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, k);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(g, k);
        case GGUF_TYPE_ARRAY: {
            const gguf_type t = gguf_get_arr_type(g, k);
            if ((t != GGUF_TYPE_UINT32 && t != GGUF_TYPE_INT32) || il >= (int64_t) gguf_get_arr_n(g, k)) {
                return -1;
            }
            return ((const int32_t *) gguf_get_arr_data(g, k))[il];
        }
        default: return -1;
    }
}

static ggml_tensor * find(ggml_context * ctx, int il, const char * kind) {
    char name[64];
    snprintf(name, sizeof(name), "blk.%d.%s", il, kind);
    return ggml_get_tensor(ctx, name);
}

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    ggml_cpu_init(); // CPU type traits, for chess_type_supported()
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    // as llama_model_loader: metadata only, then each tensor's data is the file's bytes at its
    // offset (the loader mmaps the file), refused when it does not lie inside the file
    ggml_context * ctx = nullptr;
    gguf_init_params ip = { /*no_alloc =*/ true, /*ctx =*/ &ctx };
    gguf_context * g = gguf_init_from_buffer(data, size, ip);
    if (!g) {
        return 0;
    }
    const size_t base = gguf_get_data_offset(g);
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        const int64_t it = gguf_find_tensor(g, ggml_get_name(t));
        const size_t off = base + gguf_get_tensor_offset(g, it);
        if (it < 0 || off < base || off > size || ggml_nbytes(t) > size - off) {
            gguf_free(g);
            ggml_free(ctx);
            return 0; // "tensor data is not within the file bounds"
        }
        t->data = (void *) (data + off);
    }
    std::vector<float> levels;
    float def = 0.0f;
    bool compact = false;
    const int64_t ka = gguf_find_key(g, "general.architecture");
    if (chess_check_meta(g, levels, def, compact).empty() && !levels.empty() && ka >= 0 &&
            gguf_get_kv_type(g, ka) == GGUF_TYPE_STRING) {
        const std::string arch = gguf_get_val_str(g, ka);
        const int64_t n_layer = hparam(g, arch, "block_count", 0);
        for (int il = 0; il < n_layer && il < 4096; ++il) {
            const int64_t n_embd = hparam(g, arch, "embedding_length", il);
            const int64_t n_head = hparam(g, arch, "attention.head_count", il);
            if (n_embd <= 0 || n_head <= 0) {
                break; // the loader refuses such a model before it looks at CHESS tensors
            }
            const int64_t hk = hparam(g, arch, "attention.key_length", il);
            const int64_t hv = hparam(g, arch, "attention.value_length", il);
            chess_dims d;
            d.n_embd = n_embd;
            d.n_ff   = hparam(g, arch, "feed_forward_length", il);
            d.n_q    = (hk > 0 ? hk : n_embd / n_head) * n_head;
            d.n_o    = (hv > 0 ? hv : n_embd / n_head) * n_head;
            chess_layer L;
            L.ffn_tau  = find(ctx, il, "chess_ffn_tau");
            L.ffn_cats = find(ctx, il, "chess_ffn_cats");
            L.thr_q    = find(ctx, il, "chess_thr_q");
            L.thr_o    = find(ctx, il, "chess_thr_o");
            L.wt_down  = find(ctx, il, "chess_wt_down");
            L.wt_q     = find(ctx, il, "chess_wt_q");
            L.wt_o     = find(ctx, il, "chess_wt_o");
            if (!chess_check_layer(L, il, d, levels.size(), true).empty()) {
                break; // the loader throws at the first bad layer
            }
        }
        // the head, against the head's shape (output.weight, else the tied token embedding)
        const ggml_tensor * w = ggml_get_tensor(ctx, "output.weight");
        w = w ? w : ggml_get_tensor(ctx, "token_embd.weight");
        chess_head H;
        H.thr = ggml_get_tensor(ctx, "output.chess_thr");
        H.wt  = ggml_get_tensor(ctx, "output.chess_wt");
        if (w) {
            (void) chess_check_head(H, w->ne[0], w->ne[1], levels.size(), true);
        }
    }
    gguf_free(g);
    ggml_free(ctx);
    return 0;
}
