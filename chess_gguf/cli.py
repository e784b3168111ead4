"""Command line: `python -m chess_gguf {generate,convert,inspect,eval,bench} ...`."""
from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .data import TASKS


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime import Context, Model, Sampler

    model = Model(args.model)
    ctx = Context(model, n_ctx=args.ctx, n_threads=args.threads)
    chess = model.chess_levels
    if args.level is not None or args.method is not None or args.prefill is not None:
        if not chess:
            raise ValueError(f"{args.model}: --level/--method/--prefill need a CHESS model "
                             f"(convert it with `python -m chess_gguf convert`)")
        ctx.chess_set(args.method, args.level, args.prefill)
    prompt = model.tokenize(args.prompt, add_special=True)
    ctx.chess_stats_reset() if chess else None
    sampler = Sampler(temp=args.temp, seed=args.seed)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    t0 = time.perf_counter()
    ctx.decode(prompt, logits="last")
    t1 = time.perf_counter()
    n_gen = 0
    pending = b""  # a UTF-8 character can span tokens: print only whole characters
    for _ in range(args.n):
        tok = sampler.sample(ctx, -1)
        if model.is_eog(tok):
            break
        n_gen += 1
        pending += model.token_to_piece(tok)
        try:
            out.write(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            pass
        out.flush()
        ctx.decode([tok], logits="last")
    t2 = time.perf_counter()
    out.write(pending.decode("utf-8", "replace") + "\n")
    pp = len(prompt) / (t1 - t0)
    tg = n_gen / (t2 - t1) if n_gen else 0.0
    mode = "dense (stock model)"
    if chess:
        lv = ctx.chess_level
        mode = "CHESS off" if lv is None else f"{ctx.chess_method} level {lv:g}"
        st = ctx.chess_stats()
        if lv is not None and st["tokens"]:
            parts = [f"{k} {st[k]['sparsity']:.2f}" for k in ("ffn", "attn_q", "attn_o") if st[k]["sparsity"] is not None]
            mode += " (realised sparsity " + ", ".join(parts) + ")"
    print(f"\n[{mode} | prompt: {len(prompt)} tokens, {pp:.1f} tok/s | generation: {n_gen} tokens, {tg:.1f} tok/s | "
          f"threads: {ctx.n_threads}]", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import Options, convert, print_summary

    if args.calib_tokens < args.ctx:
        print(f"python -m chess_gguf convert: error: --calib-tokens {args.calib_tokens} is shorter than one "
              f"--ctx {args.ctx} window", file=sys.stderr)
        return 2

    opt = Options(levels=args.levels, default_level=args.default_level, calib_files=args.calib or (),
                  calib_tokens=args.calib_tokens, ctx=args.ctx, threads=args.threads, stat=args.stat,
                  rule=args.rule, budget=args.budget == "ffn-layer", attention=not args.no_attention, force=args.force, wt_type=args.wt_type, layout=args.layout, head=args.head,
                  progress=not args.quiet, checkpoint_every=args.checkpoint_every)
    print_summary(convert(args.model, args.output, opt))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json
    from .inspect import inspect, print_report

    res = inspect(args.model, args.text, threads=args.threads)
    if args.json:
        res.pop("thresholds")
        print(json.dumps(res))
    else:
        print_report(res)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import command
    return command(args)


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from .evaluate import Options, evaluate, kld_table, markdown_table, summary_lines, write_outputs

    ppl = None if args.ppl.strip().lower() == "none" else args.ppl
    opt = Options(levels=args.levels, methods=args.methods, ppl=ppl, ppl_tokens=args.ppl_tokens, tasks=args.tasks,
                  limit=args.limit, ctx=args.ctx, threads=args.threads, progress=not args.quiet, kld=args.kld)
    res = evaluate(args.model, opt, log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr)))
    if args.out:
        for p in write_outputs(res, args.out):
            print(f"wrote {p}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        print(markdown_table(res))
        print()
        if args.kld:
            print(kld_table(res))
            print()
        for line in summary_lines(res):
            print(line)
    return 0


# Floors of convert's calibration arguments. A per-channel threshold is an empirical quantile of
# |act(g_i)|: with N calibration tokens its realised sparsity has a standard error of about
# sqrt(l(1-l)/N), 0.014 at N = 1024 for level 0.5 (the architecture tests accept 0.05). A window
# shorter than 64 tokens gives activations of almost no context. The token-count study
# (docs/measurements.md, "Calibration tokens") found no measurable perplexity effect from 4096 up, and
# eval --kld no difference between the default 16384 and 65536 tokens.
MIN_CALIB_TOKENS = 1024
MIN_CTX = 64


def cmd_libdir(args: argparse.Namespace) -> int:
    from .interop import lib_dir
    print(lib_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_arguments as bench_arguments  # standard library only at import
    from .options import LAYOUTS, METHODS, PREFILLS, arg, at_least, parse_floats, parse_head, parse_levels, parse_seconds, parse_methods, parse_tasks, \
        positive_int

    ap = argparse.ArgumentParser(prog="python -m chess_gguf",
                                 description="CHESS activation sparsity for llama.cpp GGUF models on CPU.")
    ap.add_argument("--version", action="version", version=f"chess_gguf {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text with the patched runtime, streaming, with speeds",
                       description="Generate text from a prompt through the patched llama.cpp; prints the text "
                                   "as it is produced, then prompt and generation speed (tokens/s).")
    g.add_argument("model", help="GGUF model file (stock or CHESS-converted)")
    g.add_argument("-p", "--prompt", required=True, help="prompt text")
    g.add_argument("-n", type=int, default=64, help="number of tokens to generate (default 64)")
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--ctx", type=int, default=2048, help="context size (default 2048)")
    g.add_argument("--level", default=None,
                   help="CHESS level: off, default or a level stored in the file (default: $CHESS_LEVEL or the file's)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="CHESS method (default: $CHESS_METHOD or chess)")
    g.add_argument("--prefill", choices=PREFILLS, default=None,
                   help="prompt processing: dense (default) or masked like decoding")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="calibrate a GGUF model and write a CHESS GGUF beside it",
                       description="Run calibration text through the model, compute CHESS per-channel FFN "
                                   "thresholds, CATS and attention thresholds for every level, and write them with "
                                   "transposed copies of W_down, W_q, W_o into a new GGUF (IN.chess.gguf). "
                                   "All original tensors and metadata are kept byte for byte.")
    c.add_argument("model", help="input GGUF model")
    c.add_argument("-o", "--output", help="output file (default: IN.chess.gguf beside the input)")
    c.add_argument("--levels", type=arg(parse_floats), default=[0.3, 0.4, 0.5, 0.6, 0.7],
                   help="sparsity levels to calibrate, each in (0,1) (default 0.3,0.4,0.5,0.6,0.7)")
    c.add_argument("--default-level", type=float, default=None,
                   help="level used when none is chosen (default 0.4 with the head part, 0.5 with --head off, when "
                        "stored; docs/results.md)")
    c.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text files (default: the built-in Wikipedia calibration split)")
    c.add_argument("--calib-tokens", type=at_least(MIN_CALIB_TOKENS), default=16384,
                   help=f"calibration tokens (default 16384, at least {MIN_CALIB_TOKENS} and --ctx)")
    c.add_argument("--ctx", type=at_least(MIN_CTX), default=512,
                   help=f"calibration window in tokens (default 512, at least {MIN_CTX})")
    c.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    c.add_argument("--stat", choices=["mean-abs", "rms"], default="mean-abs",
                   help="per-channel statistic m_i of |u_i| (default mean-abs, as in the paper)")
    c.add_argument("--rule", choices=["auto", "chess", "wchess", "cats"], default="auto",
                   help="per-channel FFN threshold rule (docs/results.md, 'Beyond the paper'): chess = "
                        "|act(g_i)| * m_i, the paper; wchess = |act(g_i)| * m_i * ||W_down[:, i]||; cats = one "
                        "threshold per layer stored per channel; auto (default) = whichever of chess and wchess "
                        "gives the lower perplexity on 2048 calibration tokens held out from the statistics "
                        "(through the runtime, at levels 0.5 and 0.7: 8192 tokens of decoding)")
    c.add_argument("--budget", choices=["uniform", "ffn-layer"], default="uniform",
                   help="FFN sparsity per layer: uniform = every layer at the level (default); ffn-layer = a "
                        "per-layer budget with the same mean, chosen on the calibration text to minimise the FFN "
                        "output error relative to the residual stream (layer level within +-0.2)")
    c.add_argument("--no-attention", action="store_true", help="omit the attention thresholds and W_q/W_o copies")
    c.add_argument("--wt-type", default=None,
                   help="transposed copies: x4 (default) stores 4-bit originals (Q4_0, Q4_1, Q4_K) exactly, their "
                        "codes regrouped by input channel (no second rounding; the size of Q4_1) and requantizes "
                        "the others by the rule of docs/format.md; requant: that rule for every copy (the "
                        "format before x4); a ggml type (q8_0, f16, ...): every copy requantized to it")
    c.add_argument("--layout", choices=LAYOUTS, default="dual",
                   help="dual (default): add transposed copies of W_down, W_q, W_o beside the originals "
                        "(fastest prompt processing, +~25%% file size); compact: replace the originals by "
                        "the transposed copies (file and memory about the input's size; prompts run through "
                        "a re-transposed Q8_0 copy per layer)")
    c.add_argument("--head", type=arg(parse_head), default=None, metavar="off|S[,S...]",
                   help="input sparsity of the output head, one for every level or one per --levels entry (0 = "
                        "dense at that level): adds a Q8_0 transposed copy of the head (output.weight or the "
                        "tied embedding) and a threshold on |h| per level; used by method chess "
                        "(default 0.3 at every level in the dual layout, off in the compact one; off: the head "
                        "stays dense; docs/results.md)")
    c.add_argument("--checkpoint-every", type=arg(parse_seconds), default=300.0, metavar="SECONDS",
                   help="save the calibration statistics to OUT.calib-partial this often (default 300; 0 = after "
                        "every window) and when calibration ends; the same command run again resumes from it; "
                        "removed once the output is written")
    c.add_argument("--force", action="store_true", help="overwrite the output; reconvert a CHESS file")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(fn=cmd_convert)

    i = sub.add_parser("inspect", help="show a CHESS file's metadata, thresholds and realised sparsity",
                       description="Print the CHESS metadata and per-layer threshold statistics of a converted "
                                   "GGUF; with --text, measure the realised sparsity per layer and overall (FFN, "
                                   "W_q input, W_o input) on that text for every stored level.")
    i.add_argument("model", help="CHESS GGUF file")
    i.add_argument("--text", help="text file to measure realised sparsity on")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    i.set_defaults(fn=cmd_inspect)

    b = sub.add_parser("bench", help="decode and prompt speed per CHESS level against off",
                       description="Decode (128 tokens) and prompt (256 tokens) speed of a CHESS file for each "
                                   "method and level, interleaved with dense (off) runs in one context: medians, "
                                   "ratios against off, realised sparsity and the ideal (weight bytes) speedup. "
                                   "Several files (layouts of one model) and --original are measured in the same "
                                   "rounds, each against the original (--memory: size and peak memory too). "
                                   "--kernels runs the native kernel benchmark instead.")
    bench_arguments(b)
    b.set_defaults(fn=cmd_bench)

    e = sub.add_parser("eval", help="perplexity and the 8 zero-shot tasks, dense and per method x level",
                       description="Evaluate a CHESS GGUF dense and at each method x level (masks on every "
                                   "token, the paper's protocol): perplexity on a text and the 8 zero-shot tasks "
                                   "of the paper, with the realised sparsity of each row. Perplexity follows "
                                   "llama-perplexity: non-overlapping windows of --ctx tokens, BOS first in each "
                                   "window if the model adds BOS, only the second half of each window scored, "
                                   "exp(mean NLL). Tasks follow lm-evaluation-harness (0-shot log-likelihood of "
                                   "each choice's continuation given the context; acc = argmax of the sum, "
                                   "acc_norm = argmax of the sum / the choice's length in characters; winogrande "
                                   "by partial scoring). Prints a Markdown table (accuracy in percent with its "
                                   "95% interval) or, with --json, one JSON object.")
    e.add_argument("model", help="CHESS GGUF file (a stock GGUF allows --levels off only)")
    e.add_argument("--levels", type=arg(parse_levels, allow_default=False), default="off,0.5,0.7",
                   help="off (the dense row) and/or stored levels (default off,0.5,0.7)")
    e.add_argument("--methods", type=arg(parse_methods), default="cats,chess-ffn,chess",
                   help="sparse methods, from cats, chess-ffn, chess (default: all three)")
    e.add_argument("--ppl", default="", metavar="TEXT[,TEXT...]|none",
                   help="perplexity texts: files or domain names (wiki, books, news, science: data/*_eval.txt), "
                        "comma-separated, each scored and reported with its own realised sparsity (default: wiki, "
                        "the Wikipedia evaluation split); none skips perplexity")
    e.add_argument("--ppl-tokens", type=positive_int, default=16384,
                   help="use at most this many tokens of the text: floor(N / ctx) windows (default 16384)")
    e.add_argument("--tasks", type=arg(parse_tasks), default=",".join(TASKS),
                   help=f"comma-separated tasks, all, or none (default: all: {','.join(TASKS)})")
    e.add_argument("--limit", type=positive_int, default=None,
                   help="a fixed subsample (seed 1234) of N items per task (default: every item)")
    e.add_argument("--ctx", type=positive_int, default=512, help="perplexity window in tokens (default 512)")
    e.add_argument("--kld", action="store_true",
                   help="also the KL divergence of each sparse row's next-token distributions from the dense "
                        "row's on the perplexity texts (mean with a 95%% interval, median, 99th percentile, share "
                        "of tokens with the same top token; paired intervals between methods at each level), as "
                        "llama-perplexity --kl-divergence reports for quantization. Resolves differences that "
                        "perplexity and the tasks cannot. Needs off in --levels")
    e.add_argument("--out", metavar="DIR", help="also write results.json, results.md and PNG plots into DIR")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the Markdown table")
    e.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-row timing on stderr")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("libdir", help="print the folder of the patched libllama (for LLAMA_CPP_LIB_PATH)")
    d.set_defaults(fn=cmd_libdir)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime import RuntimeError_
    try:
        return args.fn(args)
    except (FileNotFoundError, RuntimeError_, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
