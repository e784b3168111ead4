// Scalar references of the CHESS kernels (chess-kernels.h): rows dequantized with to_float, float
// inputs, plain float accumulation in increasing index order. Slow; for the tests.
#include "chess-kernels-impl.h"

// input channel i of an x4 weight as n_out floats, a*q + b: the layout's definition (references)
static void ch_x4_row(const char * wt, size_t nb1, int64_t n_out, int64_t i, float * row) {
    const char * r = wt + (size_t) (i / 32) * nb1;
    const uint8_t * q = (const uint8_t *) r + 4 * n_out + (size_t) (i % 32) * (n_out / 2);
    for (int64_t j = 0; j < n_out; j++) {
        const int code = j % 32 < 16 ? q[j / 32 * 16 + j % 32] & 15 : q[j / 32 * 16 + j % 32 - 16] >> 4;
        row[j] = ggml_fp16_to_fp32(((const ggml_fp16_t *) r)[j]) * (float) code +
                 ggml_fp16_to_fp32(((const ggml_fp16_t *) r)[n_out + j]);
    }
}

int64_t chess_up_sparse_ref(const void * w_up, enum ggml_type type, size_t nb1, int64_t n_in,
                            const float * g, const float * tau, int64_t n_tau, enum chess_act act,
                            const float * x, float * h, int64_t i0, int64_t i1) {
    float * row = malloc((size_t) n_in * sizeof(float));
    int64_t nk = 0;
    for (int64_t i = i0; i < i1; i++) {
        const float a = chess_act_apply(act, g[i]);
        h[i] = 0.0f;
        if (tau && !(fabsf(a) >= ch_thr(tau, n_tau, i))) {
            continue;
        }
        nk++;
        const void * src = (const char *) w_up + (size_t) i * nb1;
        if (type == GGML_TYPE_F32) {
            memcpy(row, src, (size_t) n_in * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, row, n_in);
        }
        float s = 0.0f;
        for (int64_t j = 0; j < n_in; j++) {
            s += row[j] * x[j];
        }
        h[i] = a * s;
    }
    free(row);
    return nk;
}

int64_t chess_in_sparse_ref(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                            const float * v, const float * thr, int64_t n_thr, float * y, int64_t j0, int64_t j1) {
    float * row = malloc((size_t) n_out * sizeof(float));
    for (int64_t j = j0; j < j1; j++) {
        y[j] = 0.0f;
    }
    int64_t na = 0;
    for (int64_t i = 0; i < n_in; i++) {
        const float vi = v[i];
        if (!(vi != 0.0f && (!thr || fabsf(vi) >= ch_thr(thr, n_thr, i)))) {
            continue;
        }
        na++;
        const void * src = (const char *) wt + (size_t) (type == CHESS_X4 ? 0 : i) * nb1; // x4: rows of 32 inputs
        if (type == CHESS_X4) {
            ch_x4_row((const char *) wt, nb1, n_out, i, row);
        } else if (type == GGML_TYPE_F32) {
            memcpy(row, src, (size_t) n_out * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, row, n_out); // whole row: simplest, it's a reference
        }
        for (int64_t j = j0; j < j1; j++) {
            y[j] += vi * row[j];
        }
    }
    free(row);
    return na;
}

void chess_in_sparse_input(enum ggml_type type, const float * v, const float * thr, int64_t n_thr, int64_t n_in,
                           float * v_eff) {
    for (int64_t i = 0; i < n_in; i++) {
        const float vi = v[i];
        v_eff[i] = vi != 0.0f && (!thr || fabsf(vi) >= ch_thr(thr, n_thr, i)) ? vi : 0.0f;
    }
    if (type != CHESS_X4) {
        return;
    }
    const ch_x4_plan pl = ch_x4_prepare(v, thr, n_thr, n_in);
    for (int64_t e = 0; e < pl.ng; e++) {
        const ch_x4_group * G = &pl.grp[e];
        for (int32_t p = 0; p < G->np; p++) {
            const ch_x4_pair * P = &pl.pair[G->p0 + p];
            v_eff[32 * G->g + P->ca] = G->s * (float) P->ua;
            if (P->cb != P->ca) {
                v_eff[32 * G->g + P->cb] = G->s * (float) P->ub;
            }
        }
    }
}

void chess_retranspose_ref(const void * wt, enum ggml_type type, size_t nb1, int64_t n_in, int64_t n_out,
                           float * w) {
    float * row = malloc((size_t) n_out * sizeof(float));
    for (int64_t i = 0; i < n_in; i++) {
        const void * src = (const char *) wt + (size_t) (type == CHESS_X4 ? 0 : i) * nb1; // x4: rows of 32 inputs
        if (type == CHESS_X4) {
            ch_x4_row((const char *) wt, nb1, n_out, i, row);
        } else if (type == GGML_TYPE_F32) {
            memcpy(row, src, (size_t) n_out * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, row, n_out);
        }
        for (int64_t j = 0; j < n_out; j++) {
            w[j * n_in + i] = row[j];
        }
    }
    free(row);
}
