// memrow: what this machine's memory allows one core for an output-sparse W_up, without any
// kernel: read a random `keep` fraction of the rows (row_bytes each) of 96 MB of matrices of 8960
// rows, every cache line of a kept row, with whole-row software prefetch `ahead` kept rows ahead,
// and optionally `work` rounds of integer dot products per 64 bytes (a stand-in for a kernel's
// compute). Prints ns per kept row and GB/s of kept bytes: compare with keep 1 (streaming) and
// with the same run in L2 (--mb 0.3). docs/benchmarks.md ("What the memory allows").
//
//   gcc -O2 -march=native scripts/memrow.c -o build/memrow
//   build/memrow ROW_BYTES KEEP AHEAD HINT WORK MB HUGE
//     HINT: t0 | t1 | t2 | nta | none (prefetcht0/1/2/nta or no prefetch); HUGE 1: madvise(MADV_HUGEPAGE)
//   e.g. build/memrow 864 0.5 8 t1 4 96 0     (a Qwen2.5-1.5B Q4_K W_up row: 1536 inputs)
//   MEMROW_PAIR=1: each kept index is read from two matrices (a neuron's W_up row and its W_down
//   row stored apart): compare with one matrix of 2 x ROW_BYTES rows (the two stored side by side).
//   Times are per kept index.
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// bytes [j, j + 64) of a row of R bytes, zero past its end
static inline __m512i load64(const uint8_t * r, size_t R, size_t j) {
    return j + 64 <= R ? _mm512_loadu_si512(r + j) : _mm512_maskz_loadu_epi8((1ull << (R - j)) - 1, r + j);
}

int main(int argc, char ** argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s ROW_BYTES KEEP AHEAD t0|t1|none WORK MB HUGE\n", argv[0]);
        return 2;
    }
    const size_t R = (size_t) atol(argv[1]);
    const double keep = atof(argv[2]), mb = atof(argv[6]);
    const int ahead = atoi(argv[3]), work = atoi(argv[5]), huge = atoi(argv[7]);
    const char * h = argv[4];
    const int hint = !strcmp(h, "t0") ? _MM_HINT_T0 : !strcmp(h, "t1") ? _MM_HINT_T1 : !strcmp(h, "t2") ? _MM_HINT_T2
                   : !strcmp(h, "nta") ? _MM_HINT_NTA : -1;
    const int pair = getenv("MEMROW_PAIR") != NULL;
    const size_t rows = mb < 1 ? 512 : 8960, mat = R * rows, nmat = (size_t) (mb * 1e6) / mat + 1 + pair;
    const size_t total = (nmat * mat + 64 + (2u << 20) - 1) & ~(size_t) ((2u << 20) - 1);
    uint8_t * buf = aligned_alloc(2u << 20, total);
    if (!buf) return 1;
    if (huge) madvise(buf, total, MADV_HUGEPAGE);
    memset(buf, 1, total);
    int * idx = malloc(rows * sizeof(int));
    srand(1);
    __m512i acc = _mm512_setzero_si512(), a1 = acc, a2 = acc, a3 = acc, a4 = acc;
    const __m512i c0 = _mm512_set1_epi8(3);
    double best = 1e9;
    int nk = 0;
    for (int rep = 0; rep < 15; rep++) {
        nk = 0;
        for (size_t i = 0; i < rows; i++) {
            if (rand() < keep * RAND_MAX) idx[nk++] = (int) i;
        }
        const double t0 = now();
        size_t nrun = 0;
        for (size_t m = 0; m + pair < nmat; m += 1 + pair, nrun++) {
            const uint8_t * W = buf + m * mat; // pair: the second matrix is the next one
            for (int k = 0; k < nk; k++) {
                const uint8_t * r = W + (size_t) idx[k] * R;
                if (hint >= 0 && k + ahead < nk) {
                    for (int s = 0; s <= pair; s++) {
                        const uint8_t * p = W + s * mat + (size_t) idx[k + ahead] * R;
                        for (uintptr_t a = (uintptr_t) p & ~(uintptr_t) 63; a < (uintptr_t) (p + R); a += 64) {
                            switch (hint) { // the hint must be a constant
                                case _MM_HINT_T0: _mm_prefetch((const char *) a, _MM_HINT_T0); break;
                                case _MM_HINT_T1: _mm_prefetch((const char *) a, _MM_HINT_T1); break;
                                case _MM_HINT_T2: _mm_prefetch((const char *) a, _MM_HINT_T2); break;
                                default:          _mm_prefetch((const char *) a, _MM_HINT_NTA); break;
                            }
                        }
                    }
                }
                for (size_t j = 0; j < R; j += 64) {
                    const __m512i v = load64(r, R, j);
                    acc = _mm512_add_epi64(acc, v);
                    if (pair) acc = _mm512_add_epi64(acc, load64(r + mat, R, j));
                    for (int c = 0; c < work; c++) { // 4 independent chains
                        a1 = _mm512_dpbusd_epi32(a1, v, c0);
                        a2 = _mm512_dpbusd_epi32(a2, v, c0);
                        a3 = _mm512_dpbusd_epi32(a3, v, c0);
                        a4 = _mm512_dpbusd_epi32(a4, v, c0);
                    }
                }
            }
        }
        const double t = (now() - t0) / (double) nrun;
        if (t < best) best = t;
    }
    const __m512i all = _mm512_add_epi32(_mm512_add_epi32(a1, a2), _mm512_add_epi32(a3, a4));
    printf("rows of %zu B%s, keep %.2f, prefetch %s %d rows ahead, work %d, %.1f MB, huge %d: %.1f ns per kept row, "
           "%.2f GB/s (best of 15; check %lld)\n", R, pair ? " x 2 matrices" : "", keep, argv[4], ahead, work, mb, huge,
           best * 1e9 / nk, nk * R * (1 + pair) / best / 1e9, (long long) _mm512_reduce_add_epi64(_mm512_add_epi64(acc, all)));
    return 0;
}
