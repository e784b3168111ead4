// chess-greedy: greedy decoding that prints, per step, the token taken and how far it was from
// the best one, so that two builds (x86 and aarch64 under qemu, `make test-arm`) can be compared
// up to near-ties: one build generates, the other replays those tokens (--force) and reports
// the logit gap between its own best token and the forced one at every step.
//
//   chess-greedy MODEL N_TOKENS PROMPT [--force ID,ID,...]    (CHESS_LEVEL etc. from the environment)
//
// Output, one line per step: `step I token T best B gap G margin M` where G = logit[B] - logit[T]
// (0 when T is this build's own choice) and M = logit[B] minus the runner-up's logit.
#include "llama.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static bool no_progress(float progress, void * user) { (void) progress; (void) user; return true; }

int main(int argc, char ** argv) {
    if (argc != 4 && !(argc == 6 && strcmp(argv[4], "--force") == 0)) {
        fprintf(stderr, "usage: %s MODEL N_TOKENS PROMPT [--force ID,ID,...]\n", argv[0]);
        return 2;
    }
    const int n_gen = atoi(argv[2]);
    int forced[4096], n_forced = 0;
    if (argc == 6) {
        for (char * s = argv[5]; *s && n_forced < 4096; ) {
            forced[n_forced++] = (int) strtol(s, &s, 10);
            if (*s == ',') s++;
        }
        if (n_forced < n_gen) { fprintf(stderr, "error: --force gives %d tokens, %d needed\n", n_forced, n_gen); return 2; }
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.progress_callback = no_progress;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "error: %s: cannot load the model\n", argv[1]); return 1; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_token prompt[512];
    const int n_prompt = llama_tokenize(vocab, argv[3], (int) strlen(argv[3]), prompt, 512, true, false);
    if (n_prompt <= 0) { fprintf(stderr, "error: cannot tokenize the prompt\n"); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_gen + 1;
    cp.n_batch = n_prompt;
    cp.n_threads = cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "error: cannot create a context\n"); return 1; }

    struct llama_batch batch = llama_batch_get_one(prompt, n_prompt);
    llama_token tok = 0;
    for (int i = 0; i < n_gen; i++) {
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "error: llama_decode failed at step %d\n", i); return 1; }
        const float * lg = llama_get_logits_ith(ctx, -1);
        int best = 0, second = -1;
        for (int v = 1; v < n_vocab; v++) {
            if (lg[v] > lg[best]) { second = best; best = v; }
            else if (second < 0 || lg[v] > lg[second]) second = v;
        }
        tok = n_forced ? forced[i] : best;
        if (tok < 0 || tok >= n_vocab) { fprintf(stderr, "error: forced token %d out of range\n", tok); return 1; }
        printf("step %d token %d best %d gap %.6f margin %.6f\n", i, tok, best, (double) (lg[best] - lg[tok]), (double) (lg[best] - lg[second]));
        batch = llama_batch_get_one(&tok, 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
