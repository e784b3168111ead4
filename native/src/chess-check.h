// Validation of everything a CHESS file adds, before the runtime uses it. GGUF files are
// untrusted input: every check returns "" or a message naming the key or tensor at fault, which
// the loader throws (llama_model_load_from_file then fails cleanly, as for any bad GGUF).
// No llama.cpp types here, so the fuzz target (native/tests/fuzz-chess-check.cpp) can drive
// these checks straight from gguf_init_from_file().
#pragma once

#include "chess-graph.h"
#include "gguf.h"

#include <string>
#include <vector>

// Model dimensions the CHESS tensors of one layer must match.
struct chess_dims {
    int64_t n_embd = 0;
    int64_t n_ff   = 0;
    int64_t n_q    = 0; // n_head * head_dim of the queries (= rows of W_q)
    int64_t n_o    = 0; // n_head * head_dim of the values (= inputs of W_o)
};

// chess.version / chess.levels / chess.default_level / chess.layout ("dual" when absent; "compact":
// ffn_down, attn_q and attn_output are stored transposed, with no other copy). A file without
// chess.version is a stock file: returns "" with `levels` empty.
std::string chess_check_meta(const gguf_context * meta, std::vector<float> & levels, float & default_level,
                             bool & compact);

// One layer's CHESS tensors (null = absent) against the model: each part (FFN: ffn_tau, ffn_cats,
// wt_down; Q: thr_q, wt_q; O: thr_o, wt_o) is complete or absent, shapes and types are right,
// the transposed copies have a type the kernels support. With `values`, also the thresholds'
// data (host memory): >= 0 and finite, except +inf in chess_ffn_tau (a channel never kept).
std::string chess_check_layer(const chess_layer & L, int il, const chess_dims & d, size_t n_levels, bool values);

// The CHESS head (output.chess_thr f32 [n_levels], output.chess_wt [n_vocab, n_embd]: row i holds
// input channel i of the head): both or neither; with `values`, thresholds finite and >= 0.
std::string chess_check_head(const chess_head & H, int64_t n_embd, int64_t n_vocab, size_t n_levels, bool values);
