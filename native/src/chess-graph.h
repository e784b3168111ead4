// CHESS in the llama.cpp graph: per-context state, and the graph builders that replace the dense
// FFN / W_q / W_o matmuls by the sparse kernels (chess-kernels.h) through ggml custom ops.
// The patch to llama.cpp only calls into this file (loading, graph building and the C API);
// everything CHESS-specific lives here.
#pragma once

#include "chess-kernels.h"
#include "ggml.h"

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

enum chess_method { CHESS_METHOD_CHESS = 0, CHESS_METHOD_FFN = 1, CHESS_METHOD_CATS = 2 };
enum chess_part   { CHESS_PART_FFN = 0, CHESS_PART_Q = 1, CHESS_PART_O = 2, CHESS_N_PARTS = 3,
                    CHESS_PART_HEAD = 3 }; // the output head: one per model, counted apart from the layers

// The model's CHESS tensors of one layer (any may be null: that part of the layer runs dense).
struct chess_layer {
    ggml_tensor * ffn_tau  = nullptr; // f32 [n_ff, n_levels]
    ggml_tensor * ffn_cats = nullptr; // f32 [n_levels]
    ggml_tensor * thr_q    = nullptr; // f32 [n_levels]
    ggml_tensor * thr_o    = nullptr; // f32 [n_levels]
    ggml_tensor * wt_down  = nullptr; // [n_embd, n_ff]
    ggml_tensor * wt_q     = nullptr; // [n_q, n_embd]
    ggml_tensor * wt_o     = nullptr; // [n_embd, n_o]
    const ggml_tensor * wq = nullptr; // the original W_q / W_o: chess_build_proj finds a layer by them
    const ggml_tensor * wo = nullptr;
};

// The model's CHESS output head (absent: the head runs dense): an input-sparse product by a
// transposed copy of the head (output.weight, or the tied token embedding), one threshold on |h| per
// level; a level whose threshold is 0 runs the head dense.
struct chess_head {
    ggml_tensor * thr = nullptr;     // f32 [n_levels]
    ggml_tensor * wt  = nullptr;     // [n_vocab, n_embd]
    const ggml_tensor * w = nullptr; // the model's head (model.output) when wt exists: chess_build_proj matches it
};

struct chess_state;

// userdata of one custom op: stable address for the context's lifetime
struct chess_op_params {
    chess_state * st = nullptr;
    int layer = 0;
    int part  = -1;             // chess_part counted by this op, -1 = not counted
    enum chess_act act = CHESS_ACT_SILU;
};

// Per-context CHESS state: the selected method/level and the sparsity counters.
struct chess_state {
    std::vector<float>       levels;
    float                    default_level = 0.0f;
    std::vector<chess_layer> layers;
    chess_head               head;

    int          level   = -1;               // index into levels; -1 = off (dense)
    chess_method method  = CHESS_METHOD_CHESS;
    bool         prefill_masked = false;      // also sparsify multi-token batches (the paper's evaluation)
    bool         compact = false;             // compact layout: W_down/W_q/W_o exist only transposed (wt_*)

    std::unique_ptr<std::atomic<uint64_t>[]> kept;   // [n_layer * CHESS_N_PARTS]
    std::unique_ptr<std::atomic<uint64_t>[]> total;  // [n_layer * CHESS_N_PARTS]
    std::atomic<uint64_t> n_tokens{0};               // tokens that went through a sparse FFN
    std::atomic<uint64_t> head_kept{0}, head_total{0}; // inputs of the sparse head
    chess_op_params       head_params;
    std::vector<chess_op_params> params;             // [n_layer * (CHESS_N_PARTS + 1)]
    // single-token input-sparse products on all threads (chess_in_sparse_mt): the ops of a graph run
    // one after another, so one shared block serves them all
    chess_in_shared    in_shared{};
    std::vector<float> in_part;                      // (CHESS_IN_MAX_PIECES - 1) * the widest n_out

    chess_state(std::vector<float> levels, float default_level, std::vector<chess_layer> layers, chess_head head = {});

    // Parse the user's choices (nullptr = leave unchanged). Returns "" or an error message.
    // method: chess | chess-ffn | cats; level: off | default | one of the stored levels; prefill: dense | masked
    std::string set(const char * method, const char * level, const char * prefill);
    // The environment (CHESS_METHOD, CHESS_LEVEL, CHESS_PREFILL) applied on top of the defaults.
    std::string set_from_env();

    const char * method_name() const;
    float current_level() const { return level < 0 ? -1.0f : levels[level]; }
    void reset_stats();

    // whether a batch of n_tokens goes through the sparse path for this layer/part
    bool active(int il, chess_part part, int64_t n_tokens) const;
    // whether the head's product of this batch is sparse (method chess, a threshold > 0 at the level)
    bool head_active(int64_t n_tokens) const;
};

using chess_name_cb = std::function<void(ggml_tensor *, const char *, int)>; // (tensor, name, layer)

// Sparse FFN for a parallel-gated SiLU/GELU FFN with no biases, scales or adapters:
// dense gate -> act -> per-channel (or CATS) mask -> output-sparse up -> input-sparse down.
// A masked batch of >= 64 rows (CHESS_PREFILL=masked; CHESS_MASKED_GEMM_MIN_ROWS): dense up -> mask -> dense down with
// ggml's matmuls (`down`: the original W_down, or in the compact layout the transposed one).
// gate = nullptr: `up` is a fused [n_embd, 2 n_ff] gate+up tensor (SwiGLU; the gate's rows first).
// n_batch: tokens in the batch (ubatch), which decides decode vs prompt; x may hold fewer rows
// (the last layer only computes the rows whose outputs are wanted).
// Returns nullptr when this layer/batch should take the dense path.
ggml_tensor * chess_build_ffn(ggml_context * ctx, chess_state * st, int il, int64_t n_batch, ggml_tensor * x,
                              ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down, enum chess_act act,
                              const chess_name_cb & cb);

// The matmul of `w` by `v` when CHESS handles it: input-sparse through the transposed copy when
// `w` is some layer's W_q (input = attn_norm output) or W_o (input = kqv_out) and the level is on;
// with the compact layout also every dense product by a transposed-only W_down/W_q/W_o (the
// dense in kernel for a few tokens, else a re-transposed Q8_0 copy and ggml's matmul). K and V
// never match; the model's output head does when the file has a CHESS head (head_active). A masked
// batch of >= 64 rows: the masked input times the dense weight (ggml's matmul). n_batch as for
// chess_build_ffn. Returns nullptr for ggml's own matmul.
ggml_tensor * chess_build_proj(ggml_context * ctx, chess_state * st, int64_t n_batch, ggml_tensor * w, ggml_tensor * v,
                               const chess_name_cb & cb);
