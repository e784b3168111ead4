"""Thin cffi (ABI mode) bindings to the patched libllama built by `make`.

Only what the package needs is declared: model/context lifetime, tokenizer, batched decode,
logits, llama's sampler chain, the eval callback (for calibration), ggml's quantizer (for the
transposed weights) and the CHESS controls the patch adds. Struct layouts mirror llama.h of the
pinned llama.cpp exactly; tests/test_runtime.py checks them against the C compiler.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from cffi import FFI

from .errors import RuntimeError_

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIB_DIR = REPO / "build" / "cmake" / "bin"

CDEF = r"""
typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
struct llama_model; struct llama_context; struct llama_vocab; struct llama_sampler;
struct llama_memory_i; typedef struct llama_memory_i * llama_memory_t;
struct ggml_backend_buffer;

struct ggml_tensor {
    int type;
    struct ggml_backend_buffer * buffer;
    int64_t ne[4];
    size_t  nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct ggml_tensor * src[10];
    struct ggml_tensor * view_src;
    size_t view_offs;
    void * data;
    char name[64];
    void * extra;
    char padding[8];
};

typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
typedef bool (*ggml_abort_callback)(void * data);
typedef bool (*llama_progress_callback)(float progress, void * user_data);
typedef void (*ggml_log_callback)(int level, const char * text, void * user_data);

struct llama_model_params {
    void * devices;
    const void * tensor_buft_overrides;
    int32_t n_gpu_layers;
    int split_mode;
    int load_mode;
    int lazy_mode;
    int32_t main_gpu;
    const float * tensor_split;
    llama_progress_callback progress_callback;
    void * progress_callback_user_data;
    const void * kv_overrides;
    bool vocab_only;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
    bool load_mtp;
};

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_outputs_max;
    uint32_t n_outputs_max_per_seq;
    int32_t  n_threads;
    int32_t  n_threads_batch;
    int ctx_type;
    int rope_scaling_type;
    int pooling_type;
    int attention_type;
    int flash_attn_type;
    float rope_freq_base;
    float rope_freq_scale;
    float yarn_ext_factor;
    float yarn_attn_factor;
    float yarn_beta_fast;
    float yarn_beta_slow;
    uint32_t yarn_orig_ctx;
    float defrag_thold;
    ggml_backend_sched_eval_callback cb_eval;
    void * cb_eval_user_data;
    int type_k;
    int type_v;
    ggml_abort_callback abort_callback;
    void * abort_callback_data;
    bool embeddings;
    bool offload_kqv;
    bool no_perf;
    bool op_offload;
    bool swa_full;
    bool kv_unified;
    void * samplers;
    size_t n_samplers;
    struct llama_context * ctx_other;
};

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token * token;
    float * embd;
    llama_pos * pos;
    int32_t * n_seq_id;
    llama_seq_id ** seq_id;
    int8_t * logits;
} llama_batch;

typedef struct llama_sampler_chain_params { bool no_perf; } llama_sampler_chain_params;

void llama_backend_init(void);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);
struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);
uint32_t llama_n_ctx(const struct llama_context * ctx);
const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_model_n_embd(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
uint64_t llama_model_size(const struct llama_model * model);
llama_memory_t llama_get_memory(const struct llama_context * ctx);
void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, llama_batch batch);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
llama_token llama_vocab_bos(const struct llama_vocab * vocab);
bool llama_vocab_get_add_bos(const struct llama_vocab * vocab);
int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                             int32_t length, int32_t lstrip, bool special);
int32_t llama_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                         char * text, int32_t text_len_max, bool remove_special, bool unparse_special);
struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * smpl);
struct llama_sampler * llama_sampler_init_greedy(void);
struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
struct llama_sampler * llama_sampler_init_top_k(int32_t k);
struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_temp(float t);
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_free(struct llama_sampler * smpl);
int32_t llama_chess_n_levels(const struct llama_model * model);
float llama_chess_level(const struct llama_model * model, int32_t i);
float llama_chess_default_level(const struct llama_model * model);
int32_t llama_chess_set(struct llama_context * ctx, const char * method, const char * level, const char * prefill);
const char * llama_chess_method(const struct llama_context * ctx);
float llama_chess_current_level(const struct llama_context * ctx);
int32_t llama_chess_prefill_masked(const struct llama_context * ctx);
int32_t llama_chess_stats(const struct llama_context * ctx, uint64_t * n_tokens, uint64_t * kept, uint64_t * total, int32_t n);
int32_t llama_chess_head_stats(const struct llama_context * ctx, uint64_t * kept, uint64_t * total);
void llama_chess_stats_reset(struct llama_context * ctx);

struct chess_calib;
struct chess_calib * chess_calib_new(int n_layer, int act, bool fused_up, bool no_attn_norm, int hist_bins,
                                     int fine_bins, float log_lo, float width_hist, float width_fine, int n_threads);
void chess_calib_free(struct chess_calib * c);
void chess_calib_set_skip(struct chess_calib * c, int rows);
bool chess_calib_eval(struct ggml_tensor * t, bool ask, void * user_data);
int64_t chess_calib_size(const struct chess_calib * c, int il, int what);
int chess_calib_read(const struct chess_calib * c, int il, int what, void * out, int64_t n);
int chess_calib_write(struct chess_calib * c, int il, int what, const void * in, int64_t n);
void chess_calib_release(struct chess_calib * c, int il);
int64_t chess_calib_stops(const struct chess_calib * c);
const char * chess_calib_error(const struct chess_calib * c);
"""

# ggml (libggml-base): tensor reads for the eval callback, and the quantizer for convert.
CDEF_GGML = r"""
const char * ggml_get_name(const struct ggml_tensor * tensor);
size_t ggml_nbytes(const struct ggml_tensor * tensor);
bool ggml_is_contiguous(const struct ggml_tensor * tensor);
void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start, int64_t nrows,
                           int64_t n_per_row, const float * imatrix);
bool ggml_quantize_requires_imatrix(int type);
void ggml_quantize_init(int type);
size_t ggml_row_size(int type, int64_t ne);
int64_t ggml_blck_size(int type);
const char * ggml_type_name(int type);
"""

GGML_TYPE_F32 = 0


class LibraryNotFound(RuntimeError_):
    pass


class _Lib:
    """The loaded libraries, created once per process."""

    def __init__(self) -> None:
        self.ffi = FFI()
        self.ffi.cdef(CDEF)
        self.ffi.cdef(CDEF_GGML)
        path = find_library()
        # RTLD_GLOBAL so ggml symbols resolve once across libllama and libggml-base.
        self.llama = self.ffi.dlopen(str(path), self.ffi.RTLD_GLOBAL | self.ffi.RTLD_NOW)
        self.ggml = self.ffi.dlopen(str(path.parent / "libggml-base.so"),
                                    self.ffi.RTLD_GLOBAL | self.ffi.RTLD_NOW)
        self.path = path
        self.log_lines: list[str] = []
        self.verbose = bool(os.environ.get("CHESS_GGUF_VERBOSE"))
        self._log_cb = self.ffi.callback("void(int, const char *, void *)", self._on_log)
        self.llama.llama_log_set(self._log_cb, self.ffi.NULL)
        self.llama.llama_backend_init()

    def _on_log(self, level: int, text, _user) -> None:
        s = self.ffi.string(text).decode("utf-8", "replace")
        # Keep a short tail of the log: loader errors are reported inside our exceptions.
        self.log_lines.append(s)
        del self.log_lines[:-64]
        if self.verbose:
            sys.stderr.write(s)

    def last_error(self) -> str:
        errs = [line.strip() for line in self.log_lines if "error" in line.lower() or "failed" in line.lower()]
        why = [e for e in errs if "error loading model:" in e]  # the loader's reason, before its summary
        return (why or errs)[-1] if errs else ""


_lib: Optional[_Lib] = None
_lib_lock = threading.Lock()


def lib_dir() -> Path:
    """The folder of the patched build (libllama and the native programs): $CHESS_GGUF_LIB (a file
    or a folder), else the build folder. Not checked: see find_library."""
    env = os.environ.get("CHESS_GGUF_LIB")
    if env:
        p = Path(env)
        return p.parent if p.is_file() else p
    return DEFAULT_LIB_DIR


def find_library() -> Path:
    """libllama from $CHESS_GGUF_LIB (a file or a folder), else the build folder."""
    env = os.environ.get("CHESS_GGUF_LIB")
    c = Path(env) if env and Path(env).is_file() else lib_dir() / "libllama.so"
    if c.is_file():
        return c.absolute()
    where = f"CHESS_GGUF_LIB={env}" if env else str(c)
    raise LibraryNotFound(f"patched libllama not found at {where}: run `make` in {REPO}")


def lib() -> _Lib:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Fail early, with the file named, on a missing, non-GGUF or truncated file."""
    from .gguf_io import read  # local import: gguf pulls in more than the bindings need
    read(path)
    return Path(path)


class Model:
    """A loaded GGUF model (weights mmapped by llama.cpp)."""

    def __init__(self, path: str | os.PathLike, *, use_extra_bufts: bool = True) -> None:
        self.path = check_gguf_file(path)
        L = lib()
        self._L = L
        ffi = L.ffi
        params = L.llama.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = use_extra_bufts
        self.ptr = L.llama.llama_model_load_from_file(str(self.path).encode(), params)
        if self.ptr == ffi.NULL:
            why = L.last_error() or "llama.cpp could not load it"
            raise RuntimeError_(f"{self.path}: failed to load model: {why}")
        self.vocab = L.llama.llama_model_get_vocab(self.ptr)
        self.n_embd = L.llama.llama_model_n_embd(self.ptr)
        self.n_layer = L.llama.llama_model_n_layer(self.ptr)
        self.n_vocab = L.llama.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if getattr(self, "ptr", None) is not None and self.ptr != self._L.ffi.NULL:
            self._L.llama.llama_model_free(self.ptr)
        self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def meta(self, key: str) -> Optional[str]:
        ffi = self._L.ffi
        buf = ffi.new("char[]", 4096)
        n = self._L.llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, 4096)
        return None if n < 0 else ffi.string(buf).decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        return bool(self._L.llama.llama_vocab_get_add_bos(self.vocab))

    @property
    def bos(self) -> int:
        """The vocabulary's BOS token (whether or not tokenize adds it)."""
        return int(self._L.llama.llama_vocab_bos(self.vocab))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        ffi, llama = self._L.ffi, self._L.llama
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = ffi.new("llama_token[]", cap)
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the needed size
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[0:n])

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        ffi = self._L.ffi
        buf = ffi.new("char[]", 64)
        n = self._L.llama.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = self._L.llama.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return ffi.buffer(buf, n)[:]

    def detokenize(self, tokens: Sequence[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        ffi = self._L.ffi
        toks = ffi.new("llama_token[]", list(tokens))
        cap = max(16, 8 * len(tokens))
        buf = ffi.new("char[]", cap)
        n = self._L.llama.llama_detokenize(self.vocab, toks, len(tokens), buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            buf = ffi.new("char[]", cap)
            n = self._L.llama.llama_detokenize(self.vocab, toks, len(tokens), buf, cap, remove_special, unparse_special)
        return ffi.buffer(buf, n)[:].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._L.llama.llama_vocab_is_eog(self.vocab, token))

    @property
    def chess_levels(self) -> list[float]:
        """CHESS levels stored in the file ([] for a stock GGUF)."""
        n = self._L.llama.llama_chess_n_levels(self.ptr)
        return [round(float(self._L.llama.llama_chess_level(self.ptr, i)), 6) for i in range(n)]

    @property
    def chess_default_level(self) -> Optional[float]:
        v = float(self._L.llama.llama_chess_default_level(self.ptr))
        return None if v < 0 else round(v, 6)


# An eval callback receives (name, array) for every graph node it asked for; `wants(name)`
# decides which nodes to copy out. Arrays are float32 with shape [n_tokens, width].
EvalFn = Callable[[str, np.ndarray], None]


class NativeStats:
    """Calibration statistics gathered in C inside the eval callback (native/src/chess-calib.h);
    calibrate.py turns them into its CalibStats. Pass it to Context(native_stats=...)."""
    SUM_ABS_U, SUM_SQ_U, HIST_A, HIST_CATS, HIST_Q, HIST_O, HIST_HEAD = range(7)  # HIST_HEAD: layer -1

    def __init__(self, model: "Model", *, act: int, fused_up: bool, no_attn_norm: bool, hist_bins: int,
                 fine_bins: int, log_lo: float, width_hist: float, width_fine: float, threads: int) -> None:
        L = self._L = model._L
        self.ptr = None
        if not hasattr(L.llama, "chess_calib_new"):
            raise RuntimeError_(f"{L.path}: this libllama has no native calibration statistics (rebuild it: make)")
        self.ptr = L.llama.chess_calib_new(model.n_layer, act, fused_up, no_attn_norm, hist_bins, fine_bins,
                                           log_lo, width_hist, width_fine, threads)
        if self.ptr == L.ffi.NULL:
            raise RuntimeError_("chess_calib_new: bad arguments or out of memory")

    @classmethod
    def dtype(cls, what: int) -> type:
        """float64 sums, uint32 per-channel counts, int64 pooled counts."""
        return {cls.SUM_ABS_U: np.float64, cls.SUM_SQ_U: np.float64, cls.HIST_A: np.uint32}.get(what, np.int64)

    def set_skip(self, rows: int) -> None:
        self._L.llama.chess_calib_set_skip(self.ptr, rows)

    def error(self) -> str:
        return self._L.ffi.string(self._L.llama.chess_calib_error(self.ptr)).decode()

    def stops(self) -> int:
        """Decodes whose graph stopped after the head input's statistics (skipping the output head)."""
        return int(self._L.llama.chess_calib_stops(self.ptr))

    def read(self, il: int, what: int) -> Optional[np.ndarray]:
        """Layer il's totals of `what` (float64 sums, uint32 per-channel counts, int64 pooled counts),
        None if never seen. The per-channel counts stay uint32: half the memory of the largest array."""
        n = self._L.llama.chess_calib_size(self.ptr, il, what)
        if n == 0:
            return None
        dtype = self.dtype(what)
        out = np.empty(n, dtype=dtype)
        if self._L.llama.chess_calib_read(self.ptr, il, what, self._L.ffi.cast("void *", out.ctypes.data), n) != 0:
            raise RuntimeError_(f"chess_calib_read: bad request (layer {il}, what {what})")
        return out

    def write(self, il: int, what: int, arr: np.ndarray) -> None:
        """Set layer il's totals of `what` (a checkpoint; the dtype read() gives; sums before HIST_A)."""
        dtype = self.dtype(what)
        a = np.ascontiguousarray(arr, dtype=dtype).ravel()
        if self._L.llama.chess_calib_write(self.ptr, il, what, self._L.ffi.cast("void *", a.ctypes.data), a.size) != 0:
            raise RuntimeError_(f"chess_calib_write: bad request (layer {il}, what {what}, {a.size} values)")

    def release(self, il: int) -> None:
        """Free layer il's totals (read them first)."""
        self._L.llama.chess_calib_release(self.ptr, il)

    def close(self) -> None:
        if self.ptr is not None:
            self._L.llama.chess_calib_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Context:
    """An inference context: KV cache, batched decode and logits."""

    def __init__(self, model: Model, *, n_ctx: int = 2048, n_batch: int = 512, n_threads: Optional[int] = None,
                 n_seq_max: int = 1, eval_callback: Optional[tuple[Callable[[str], bool], EvalFn]] = None,
                 native_stats: Optional[NativeStats] = None) -> None:
        L = self._L = model._L
        ffi = L.ffi
        self.model = model
        p = L.llama.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = n_seq_max
        threads = n_threads or os.cpu_count() or 1
        p.n_threads = threads
        p.n_threads_batch = threads
        p.no_perf = False
        self._cb = None
        if eval_callback is not None:
            wants, fn = eval_callback
            self._cb = ffi.callback("bool(struct ggml_tensor *, bool, void *)",
                                    self._make_eval(wants, fn), error=False)
            p.cb_eval = self._cb
        self._native = native_stats  # kept alive as long as the context
        if native_stats is not None:
            if eval_callback is not None:
                raise ValueError("Context: eval_callback and native_stats are exclusive")
            p.cb_eval = L.llama.chess_calib_eval
            p.cb_eval_user_data = native_stats.ptr
        self.ptr = L.llama.llama_init_from_model(model.ptr, p)
        if self.ptr == ffi.NULL:
            raise RuntimeError_(f"{model.path}: failed to create context: {L.last_error()}")
        self.n_ctx = L.llama.llama_n_ctx(self.ptr)
        self.n_batch = n_batch
        self.n_threads = threads
        self.mem = L.llama.llama_get_memory(self.ptr)
        self._batch = L.llama.llama_batch_init(n_batch, 0, n_seq_max)
        self.n_past = 0
        self.cb_error: Optional[BaseException] = None

    def _make_eval(self, wants: Callable[[str], bool], fn: EvalFn):
        ffi, ggml = self._L.ffi, self._L.ggml

        def cb(t, ask, _user):
            name = ffi.string(t.name).decode()
            if ask:
                return bool(wants(name))
            try:
                if t.type != GGML_TYPE_F32 or not ggml.ggml_is_contiguous(t):
                    raise RuntimeError_(f"eval callback: node {name} is not a contiguous f32 tensor")
                arr = np.empty((int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3]), int(t.ne[0])), dtype=np.float32)
                ggml.ggml_backend_tensor_get(t, ffi.cast("void *", arr.ctypes.data), 0, arr.nbytes)
                fn(name, arr)
            except BaseException as e:  # never let an exception unwind through C
                self.cb_error = e
                return False  # aborts the graph computation
            return True

        return cb

    def close(self) -> None:
        if getattr(self, "ptr", None) is not None:
            self._L.llama.llama_batch_free(self._batch)
            self._L.llama.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- CHESS controls (the patched runtime; a stock model has none) ---------------------------
    def chess_set(self, method: Optional[str] = None, level: Optional[str | float] = None,
                  prefill: Optional[str] = None) -> None:
        """method: chess | chess-ffn | cats; level: "off", "default" or a stored level; prefill: dense | masked."""
        L, ffi = self._L, self._L.ffi
        enc = lambda v: ffi.NULL if v is None else str(v).encode()  # noqa: E731
        L.log_lines.clear()
        rc = L.llama.llama_chess_set(self.ptr, enc(method), enc(level), enc(prefill))
        if rc == -2:
            raise RuntimeError_(f"{self.model.path}: not a CHESS model (convert it first)")
        if rc != 0:  # the runtime logged the reason
            why = L.log_lines[-1].strip().split(": ", 1)[-1] if L.log_lines else "bad CHESS setting"
            raise ValueError(why)

    @property
    def chess_method(self) -> str:
        return self._L.ffi.string(self._L.llama.llama_chess_method(self.ptr)).decode()

    @property
    def chess_level(self) -> Optional[float]:
        v = float(self._L.llama.llama_chess_current_level(self.ptr))
        return None if v < 0 else round(v, 6)

    @property
    def chess_prefill_masked(self) -> bool:
        return bool(self._L.llama.llama_chess_prefill_masked(self.ptr))

    def chess_stats(self) -> dict:
        """Counters since the last reset: sparse tokens, and kept/total per layer for ffn, attn_q, attn_o,
        and for the output head ("head", one entry in per_layer; sparsity None when it ran dense)."""
        L, ffi = self._L, self._L.ffi
        n = 3 * self.model.n_layer
        tok = ffi.new("uint64_t *")
        kept, total = ffi.new("uint64_t[]", n), ffi.new("uint64_t[]", n)
        L.llama.llama_chess_stats(self.ptr, tok, kept, total, n)
        k = np.array(list(kept), dtype=np.float64).reshape(-1, 3)
        t = np.array(list(total), dtype=np.float64).reshape(-1, 3)
        out = {"tokens": int(tok[0])}
        for j, part in enumerate(("ffn", "attn_q", "attn_o")):
            with np.errstate(invalid="ignore", divide="ignore"):
                per_layer = np.where(t[:, j] > 0, 1.0 - k[:, j] / np.maximum(t[:, j], 1), np.nan)
            out[part] = {"sparsity": float(1.0 - k[:, j].sum() / t[:, j].sum()) if t[:, j].sum() else None,
                         "per_layer": per_layer.tolist()}
        hk, ht = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        L.llama.llama_chess_head_stats(self.ptr, hk, ht)
        s = 1.0 - hk[0] / ht[0] if ht[0] else None
        out["head"] = {"sparsity": s, "per_layer": [float("nan") if s is None else s]}
        return out

    def chess_stats_reset(self) -> None:
        self._L.llama.llama_chess_stats_reset(self.ptr)

    def clear(self) -> None:
        self._L.llama.llama_memory_clear(self.mem, True)
        self.n_past = 0

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> None:
        self._L.llama.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def decode(self, tokens: Sequence[int], *, pos0: Optional[int] = None, seq: int = 0,
               logits: str = "last") -> Optional[np.ndarray]:
        """Decode tokens (split into n_batch chunks). logits: "last", "all", "none" or "compute"
        (outputs for every token, nothing copied back: the last layer then processes all rows).
        Returns float32 logits [n, vocab] for "all", [vocab] for "last", else None."""
        if not tokens:
            raise ValueError("decode: empty token list")
        L, ffi = self._L, self._L.ffi
        pos = self.n_past if pos0 is None else pos0
        if pos + len(tokens) > self.n_ctx:
            raise RuntimeError_(f"decode: {pos + len(tokens)} tokens exceed the context size {self.n_ctx}")
        out = [] if logits == "all" else None
        last = None
        for s in range(0, len(tokens), self.n_batch):
            chunk = tokens[s:s + self.n_batch]
            b = self._batch
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = 1 if logits in ("all", "compute") else 0
            is_last_chunk = s + self.n_batch >= len(tokens)
            if logits == "last" and is_last_chunk:
                b.logits[len(chunk) - 1] = 1
            self.cb_error = None
            rc = L.llama.llama_decode(self.ptr, b)
            if self.cb_error is not None:
                raise self.cb_error
            if rc != 0 and self._native is not None and self._native.error():
                raise RuntimeError_(f"{self.model.path}: {self._native.error()}")
            if rc != 0:
                raise RuntimeError_(f"llama_decode failed (code {rc}): {L.last_error()}")
            pos += len(chunk)
            if logits == "all":
                out.append(self._logits_rows(len(chunk)))
            elif logits == "last" and is_last_chunk:
                last = self._logits_row(len(chunk) - 1)
        if pos0 is None or pos0 == self.n_past:
            self.n_past = pos
        if logits == "all":
            return np.concatenate(out, axis=0)
        return last

    def _logits_row(self, i: int) -> np.ndarray:
        ffi = self._L.ffi
        ptr = self._L.llama.llama_get_logits_ith(self.ptr, i)
        return np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_vocab), dtype=np.float32).copy()

    def _logits_rows(self, n: int) -> np.ndarray:
        ffi = self._L.ffi
        ptr = self._L.llama.llama_get_logits_ith(self.ptr, 0)  # rows are contiguous from output 0
        return np.frombuffer(ffi.buffer(ptr, 4 * self.model.n_vocab * n), dtype=np.float32).reshape(n, -1).copy()



class Sampler:
    """llama.cpp's sampler chain: greedy when temp <= 0, else top-k/top-p/temperature/dist."""

    def __init__(self, temp: float = 0.0, seed: int = 0, top_k: int = 40, top_p: float = 0.95) -> None:
        L = self._L = lib()
        self.ptr = L.llama.llama_sampler_chain_init(L.llama.llama_sampler_chain_default_params())
        add = lambda s: L.llama.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if temp <= 0:
            add(L.llama.llama_sampler_init_greedy())
        else:
            add(L.llama.llama_sampler_init_top_k(top_k))
            add(L.llama.llama_sampler_init_top_p(top_p, 1))
            add(L.llama.llama_sampler_init_temp(temp))
            add(L.llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: Context, idx: int = -1) -> int:
        return int(self._L.llama.llama_sampler_sample(self.ptr, ctx.ptr, idx))

    def close(self) -> None:
        if getattr(self, "ptr", None) is not None:
            self._L.llama.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def generate(ctx: Context, prompt: Sequence[int], n: int, sampler: Sampler) -> Iterator[int]:
    """Decode the prompt, then yield up to n sampled tokens (stops at end-of-generation)."""
    ctx.decode(list(prompt), logits="last")
    for _ in range(n):
        tok = sampler.sample(ctx, -1)
        if ctx.model.is_eog(tok):
            return
        yield tok
        ctx.decode([tok], logits="last")


def quantize_rows(data: np.ndarray, ggml_type: int) -> bytes:
    """Quantize a 2-D float32 array row by row with ggml's own quantizer (every type)."""
    L = lib()
    ffi, ggml = L.ffi, L.ggml
    a = np.ascontiguousarray(data, dtype=np.float32)
    nrows, n_per_row = a.shape
    if n_per_row % ggml.ggml_blck_size(ggml_type):
        raise ValueError(f"row length {n_per_row} is not a multiple of the {ffi.string(ggml.ggml_type_name(ggml_type)).decode()} block")
    if ggml.ggml_quantize_requires_imatrix(ggml_type):
        raise ValueError("this type needs an importance matrix")
    out = np.empty(nrows * ggml.ggml_row_size(ggml_type, n_per_row), dtype=np.uint8)
    ggml.ggml_quantize_init(ggml_type)
    n = ggml.ggml_quantize_chunk(ggml_type, ffi.cast("float *", a.ctypes.data), ffi.cast("void *", out.ctypes.data),
                                 0, nrows, n_per_row, ffi.NULL)
    assert n == out.nbytes, (n, out.nbytes)
    return out.tobytes()
