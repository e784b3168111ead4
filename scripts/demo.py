#!/usr/bin/env python3
"""`make demo`: convert the default model (cached after the first run), then generate the same
prompt with CHESS off and at level 0.5, and show speeds and realised sparsity side by side."""
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from chess_gguf.runtime import Context, Model, Sampler  # noqa: E402

MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHESS = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.chess.gguf"
PROMPT = "The three most important inventions of the industrial revolution were"
N = 64


def main() -> None:
    if not CHESS.exists() or CHESS.stat().st_mtime < MODEL.stat().st_mtime:
        print(f"$ python -m chess_gguf convert {MODEL.name} -o {CHESS.name}", flush=True)
        subprocess.run([sys.executable, "-m", "chess_gguf", "convert", str(MODEL), "-o", str(CHESS), "--force"],
                       check=True, cwd=REPO)
    else:
        print(f"{CHESS.name}: already converted (delete it to convert again)")
    model = Model(CHESS)
    rows = []
    for level in ("off", "0.5"):
        with Context(model, n_ctx=512, n_threads=2) as ctx:
            ctx.chess_set(level=level)
            prompt = model.tokenize(PROMPT)
            ctx.decode(prompt, logits="last")
            ctx.chess_stats_reset()
            sampler, out, t0 = Sampler(temp=0), [], time.perf_counter()
            for _ in range(N):
                tok = sampler.sample(ctx)
                if model.is_eog(tok):
                    break
                out.append(tok)
                ctx.decode([tok], logits="last")
            dt = time.perf_counter() - t0
            st = ctx.chess_stats()
            rows.append((level, len(out) / dt, st))
            print(f"\n--- CHESS {level} ---\n{PROMPT}{model.detokenize(out)}")
    print(f"\n{'level':>6} {'decode tok/s':>13} {'ffn':>6} {'attn_q':>7} {'attn_o':>7}   (2 threads; noisy on a shared machine)")
    for level, tps, st in rows:
        sp = [f"{st[p]['sparsity']:.2f}" if st[p]["sparsity"] is not None else "-" for p in ("ffn", "attn_q", "attn_o")]
        print(f"{level:>6} {tps:>13.1f} {sp[0]:>6} {sp[1]:>7} {sp[2]:>7}")
    print(f"speed ratio 0.5/off: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
