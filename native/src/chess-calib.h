// Calibration statistics gathered in C inside llama.cpp's eval callback (python -m chess_gguf convert).
//
// chess_calib_eval is a ggml_backend_sched_eval_callback: hand it to llama_context_params.cb_eval with
// a chess_calib as user data, and every decode adds its graph nodes' statistics to the totals, the
// same ones chess_gguf/calibrate.py gathers in numpy (its fallback and reference):
//   ffn_up-N    per-channel sums of |u| and u^2 (double, rows in order: bit-identical to numpy's sums)
//   ffn_gate-N  per-channel log-histograms of |act(g)| (hist_bins) and one pooled histogram (fine_bins)
//   attn_norm-N, kqv_out-N  pooled log-histograms of |x| (the W_q and W_o inputs)
//   result_norm  pooled log-histogram of |h| (the output head's input; one per model, layer -1)
// Once it has counted result_norm it returns false, which stops the graph before the output
// head: the logits of such a decode are not computed (calibration needs none).
// bin = clip(trunc((log(max(|v|, 1e-30)) - log_lo) / width), 0, bins - 1), as thresholds.hist_index.
// log and exp are our own polynomials (no libm, no FMA), so the counts are the same on every machine
// and for every thread count (threads own column ranges; counts are integers).
#pragma once

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define CHESS_CALIB_API __declspec(dllexport)
#else
#define CHESS_CALIB_API __attribute__((visibility("default")))
#endif

struct ggml_tensor;
struct chess_calib;

enum chess_calib_what {
    CHESS_CALIB_SUM_ABS_U = 0, // double [n_ff]
    CHESS_CALIB_SUM_SQ_U  = 1, // double [n_ff]
    CHESS_CALIB_HIST_A    = 2, // uint32 [n_ff * hist_bins], channel-major (a count <= the tokens seen)
    CHESS_CALIB_HIST_CATS = 3, // int64 [fine_bins]: |act(g)| pooled over channels
    CHESS_CALIB_HIST_Q    = 4, // int64 [fine_bins]
    CHESS_CALIB_HIST_O    = 5, // int64 [fine_bins]
    CHESS_CALIB_HIST_HEAD = 6, // int64 [fine_bins]: the head's input, il = -1 (a model-wide statistic)
};

// act: 0 = SiLU, 1 = GELU (tanh form). fused_up: ffn_up holds gate then up (phi3, glm4).
// no_attn_norm: W_q reads embd (layer 0) and l_out-(N-1) (olmo2). log_lo and the widths are the
// float32 values numpy uses. Returns NULL on bad arguments or out of memory.
CHESS_CALIB_API struct chess_calib * chess_calib_new(int n_layer, int act, bool fused_up, bool no_attn_norm,
                                                     int hist_bins, int fine_bins, float log_lo,
                                                     float width_hist, float width_fine, int n_threads);
CHESS_CALIB_API void chess_calib_free(struct chess_calib * c);
// rows at the start of every node that are not counted (the window's BOS tokens)
CHESS_CALIB_API void chess_calib_set_skip(struct chess_calib * c, int rows);
CHESS_CALIB_API bool chess_calib_eval(struct ggml_tensor * t, bool ask, void * user_data);
// Elements of `what` for layer il (0 if the layer's node was never seen).
CHESS_CALIB_API int64_t chess_calib_size(const struct chess_calib * c, int il, int what);
// Copies them to out (n must equal chess_calib_size). Returns 0, or -1 for a bad request.
CHESS_CALIB_API int chess_calib_read(const struct chess_calib * c, int il, int what, void * out, int64_t n);
// Sets layer il's totals of `what` from in (a checkpoint: chess_calib_read's layout; the sums before
// HIST_A, which needs the width). Returns 0, or -1 for a bad request.
CHESS_CALIB_API int chess_calib_write(struct chess_calib * c, int il, int what, const void * in, int64_t n);
// Frees layer il's totals (its sizes become 0): a caller that has read them frees the largest
// arrays one layer at a time instead of holding two copies of all of them.
CHESS_CALIB_API void chess_calib_release(struct chess_calib * c, int il);
// Graphs stopped early (after result_norm's statistics, before the output head): one per decode
// when the early stop works; tests check it, since a lost stop costs time but no statistic.
CHESS_CALIB_API int64_t chess_calib_stops(const struct chess_calib * c);
// Why the last eval failed ("" if none did; the stop after the last layer is not a failure).
CHESS_CALIB_API const char * chess_calib_error(const struct chess_calib * c);

#ifdef __cplusplus
}
#endif
