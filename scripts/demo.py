#!/usr/bin/env python3
"""`make demo`: convert the default model (cached after the first run), then generate with it."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHESS = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.chess.gguf"
PROMPT = "The three most important inventions of the industrial revolution were"


def run(*args: str) -> None:
    print("$ python -m chess_gguf " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "chess_gguf", *args], check=True, cwd=REPO)


def main() -> None:
    if not CHESS.exists() or CHESS.stat().st_mtime < MODEL.stat().st_mtime:
        run("convert", str(MODEL), "-o", str(CHESS), "--force")
    else:
        print(f"{CHESS.name}: already converted (delete it to convert again)")
    run("inspect", str(CHESS))
    run("generate", str(CHESS), "-p", PROMPT, "-n", "64")


if __name__ == "__main__":
    main()
