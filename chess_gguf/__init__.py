"""chess_gguf: CHESS activation sparsity (He et al., EMNLP 2024) for llama.cpp/GGUF models on CPU.

convert = calibrate (runtime statistics) -> thresholds (numpy) -> GGUF writing;
runtime = cffi bindings to the patched libllama; cli = argparse over these.
"""
__version__ = "0.1.0"
