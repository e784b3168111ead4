// CHESS sparse mat-vec kernels for ggml weights on the CPU.
//
// Conventions shared by all functions:
// - One token per call. Output vectors (h, y) are full-length; a call writes only its own range,
//   every element of that range, and nothing else. Ranges from chess_thread_range() can run
//   concurrently (one per thread) with no barrier: there is no shared state between calls.
// - Scratch memory is thread-local, grows on demand with the model's width (~20 KB per thread for
//   SmolLM2, a few hundred KB for n_ff ~ 30k) and is freed when the thread exits (POSIX).
// - The CPU type traits need ggml_cpu_init() once per process. Inside llama.cpp the CPU backend
//   has already done it; stand-alone programs (tests, benchmarks) must call it themselves.
// - Weights must be plain row-major ggml data (NOT the CPU backend's repacked layouts).
// - Results are deterministic: each output element is computed by one thread with a fixed
//   summation order, so they are bit-identical for any thread count / range split.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum chess_act {
    CHESS_ACT_SILU = 0,
    CHESS_ACT_GELU = 1, // tanh approximation, as ggml_gelu
};

// true if `type` has to_float (ggml-base; F32 needs none), a CPU vec_dot and a from_float for its
// vec_dot_type (ggml-cpu): then every kernel below works for it.
bool chess_type_supported(enum ggml_type type);

// Split [0, n) into nth chunks whose boundaries are multiples of `align` (the last chunk ends at
// n); chunk for thread ith in [r0, r1), possibly empty. Use align = ggml_blck_size(type) for the
// output columns of chess_in_sparse and align = 1 (or more, for locality) for chess_up_sparse rows.
void chess_thread_range(int64_t n, int64_t align, int ith, int nth, int64_t * r0, int64_t * r1);

// x converted to the type's vec_dot_type, as the up kernel wants it.
// n_in must be a multiple of the block sizes of `type` and of its vec_dot_type.
size_t chess_x_size   (enum ggml_type type, int64_t n_in);
void   chess_prepare_x(enum ggml_type type, const float * x, void * xq, int64_t n_in);
// Same, into a thread-local buffer (valid until this thread's next call of this function): lets
// every thread of a custom op convert x itself instead of needing a separate graph node.
const void * chess_prepare_x_tls(enum ggml_type type, const float * x, int64_t n_in);

// Output-sparse up projection fused with the gate activation, one token, channel range [i0, i1):
//   a_i = act(g_i); keep_i = |a_i| >= tau_i    (tau_i = tau[n_tau == 1 ? 0 : i]; tau NULL = keep all)
//   h_i = keep_i ? a_i * dot(W_up[i,:], x) : 0
// w_up: n_ff rows of n_in elements of `type`, row stride nb1 bytes. xq: from chess_prepare_x.
// Returns the number of kept channels in [i0, i1).
int64_t chess_up_sparse(const void * w_up, enum ggml_type type, size_t nb1, int64_t n_in,
                        const float * g, const float * tau, int64_t n_tau, enum chess_act act,
                        const void * xq, float * h, int64_t i0, int64_t i1);

// x4: exact transposed layout of 4-bit weights (Q4_0, Q4_1, Q4_K; chess_gguf/x4.py). Stored as an
// I8 tensor [20 * n_out, n_in / 32]: row g = the input channels 32g .. 32g+31, as
//   a f16[n_out] | b f16[n_out] | 32 x n_out/2 bytes of 4-bit codes q  (w[j][i] = a[j]*q + b[j]),
// the original's codes and per-block pairs reordered, NOT requantized. chess_in_sparse and its
// reference take type CHESS_X4 with nb1 = chess_x4_row_bytes(n_out); column ranges are multiples
// of 32 (chess_in_align). No other kernel reads it.
#define CHESS_X4 GGML_TYPE_I8
#define CHESS_X4_BYTES_PER_32 20
size_t chess_x4_row_bytes(int64_t n_out);
bool   chess_x4_ok(int64_t n_in, int64_t n_out); // both multiples of 32
// the output length of a transposed weight whose tensor rows hold ne0 elements of `type`
static inline int64_t chess_wt_n_out(enum ggml_type type, int64_t ne0) {
    return type == CHESS_X4 ? ne0 / CHESS_X4_BYTES_PER_32 : ne0;
}
// the input length of a transposed weight whose tensor has ne1 rows
static inline int64_t chess_wt_n_in(enum ggml_type type, int64_t ne1) {
    return type == CHESS_X4 ? ne1 * 32 : ne1;
}
// a type chess_in_sparse reads (the x4 layout, or chess_type_supported)
static inline bool chess_wt_supported(enum ggml_type type) {
    return type == CHESS_X4 || chess_type_supported(type);
}
// the alignment of chess_in_sparse's column ranges (chess_thread_range's align)
static inline int64_t chess_in_align(enum ggml_type type) {
    return type == CHESS_X4 ? 32 : ggml_blck_size(type);
}

// Input-sparse mat-vec through a TRANSPOSED weight, output column range [j0, j1):
//   active_i = v_i != 0 && |v_i| >= thr_i   (thr_i = thr[n_thr == 1 ? 0 : i]; thr NULL = no threshold)
//   y_j = sum over active i of v_i * Wt[i, j]   (x4: v quantized to 8 bits, see chess_in_sparse_input)
// wt: n_in rows of n_out elements of `type` (row i = input channel i), row stride nb1 bytes.
// j0, j1: multiples of ggml_blck_size(type), except j1 == n_out.
// Returns the number of active inputs over all of [0, n_in) (the same for every range).
int64_t chess_in_sparse(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                        const float * v, const float * thr, int64_t n_thr, float * y, int64_t j0, int64_t j1);

// One token on all nth threads of an op, each reading whole rows of Wt (splitting the columns
// gives each thread short pieces of every row: slow on narrow outputs). The active inputs are cut
// into at most CHESS_IN_MAX_PIECES pieces by the input alone; threads take pieces from sh->next,
// piece 0 goes to y and piece k to sh->part + (k-1) * n_out, and the last thread to finish adds the
// pieces to y in order (chess_in_sparse sums the same pieces per column range): y is bit-identical
// for any thread count and to chess_in_sparse's.
// Every one of the nth threads must call it once with the same arguments; *sh starts zeroed and is
// zeroed again when the product is complete (reuse it for the next product after a barrier).
#define CHESS_IN_MAX_PIECES 16
typedef struct {
    int32_t next, done; // updated atomically
    float * part;       // (CHESS_IN_MAX_PIECES - 1) * n_out floats
} chess_in_shared;
int64_t chess_in_sparse_mt(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                           const float * v, const float * thr, int64_t n_thr, float * y, chess_in_shared * sh, int nth);

// The input vector chess_in_sparse really multiplies with for `type`: the active inputs of v (0
// elsewhere); for CHESS_X4, whose kernels take 8-bit activations, each group of 32 inputs quantized
// to int8 with one scale (max |v_i| / 127, rounding to nearest even). For tests: chess_in_sparse_ref
// on it matches the kernels to float rounding.
void chess_in_sparse_input(enum ggml_type type, const float * v, const float * thr, int64_t n_thr, int64_t n_in,
                           float * v_eff);

// Compact layout (the file holds only Wt): rows [j0, j1) of the original-orientation W = Wt^T,
// written in `dtype` (n_in elements per row, row stride ggml_row_size(dtype, n_in)), so ggml's dense
// matmul can run a multi-token batch. j0, j1: multiples of ggml_blck_size(type), except j1 == n_out.
// chess_retranspose_ok: dtype has a CPU from_float (or is F32) and its block divides n_in.
bool chess_retranspose_ok(enum ggml_type dtype, int64_t n_in);
void chess_retranspose(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                       void * w, enum ggml_type dtype, int64_t j0, int64_t j1);

// Scalar references: rows dequantized with to_float, float x, plain float accumulation in
// increasing index order. Slow; for tests.
int64_t chess_up_sparse_ref(const void * w_up, enum ggml_type type, size_t nb1, int64_t n_in,
                            const float * g, const float * tau, int64_t n_tau, enum chess_act act,
                            const float * x, float * h, int64_t i0, int64_t i1);
int64_t chess_in_sparse_ref(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                            const float * v, const float * thr, int64_t n_thr, float * y, int64_t j0, int64_t j1);

// W = Wt^T in float, [n_out rows][n_in] (the reference chess_retranspose is quantized from).
void chess_retranspose_ref(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out, float * w);

// The gate activation exactly as the kernels compute it (for calibration / statistics code).
float chess_act_apply(enum chess_act act, float g);

// Name of the chess_in_sparse route taken for `type` ("avx2-q4_0", "generic", ...), for logs.
const char * chess_in_sparse_route(enum ggml_type type);

// Name of the chess_up_sparse route ("vnni-q4_1", "avx2-q8_0", or "vec_dot": ggml's per-row dot).
const char * chess_up_sparse_route(enum ggml_type type);

// Test/benchmark hook: route chess_up_sparse and chess_in_sparse through their generic paths
// (ggml vec_dot per row; to_float) for every type.
// Process-wide; set it only while no kernel runs.
void chess_kernels_force_generic(bool on);

#ifdef __cplusplus
}
#endif
