"""Writes tests/golden/quant/blocks.safetensors for crates/interop/tests/gguf_quant.rs:
random blocks of every ggml type moelab dequantizes, and their values as the `gguf` Python
package (llama.cpp's gguf-py) dequantizes them. The formats are bit layouts, so random
bytes are valid blocks; the float16 scale fields are set to finite random values.

Tensors: `<TYPE>.bytes` (uint8, 4 blocks or 64 elements for F16/BF16) and `<TYPE>.values`
(float32); `quantize.<TYPE>.input` (float32, 8 blocks) and `quantize.<TYPE>.bytes` (what
gguf-py's quantize makes of them) for Q8_0, Q4_0, Q4_1 and Q5_0.

Usage (a venv with numpy, safetensors and gguf; written with gguf 0.x as recorded in the
file's metadata):

    ENV/bin/python reference/make_quant_golden.py
"""
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "quant")
# type: (block bytes, offsets of float16 scale fields)
TYPES = {
    T.Q4_0: (18, [0]),
    T.Q4_1: (20, [0, 2]),
    T.Q5_0: (22, [0]),
    T.Q8_0: (34, [0]),
    T.Q4_K: (144, [0, 2]),
    T.Q6_K: (210, [208]),
}


def main():
    rng = np.random.default_rng(7)
    tensors = {}
    for t, (size, scales) in TYPES.items():
        blocks = rng.integers(0, 256, size=(4, size), dtype=np.uint8)
        for b in blocks:
            for off in scales:
                b[off : off + 2] = np.frombuffer(
                    np.float16(rng.uniform(-0.5, 0.5)).tobytes(), dtype=np.uint8
                )
        flat = blocks.reshape(-1)
        tensors[f"{t.name}.bytes"] = flat.copy()
        tensors[f"{t.name}.values"] = dequantize(flat, t).astype(np.float32).reshape(-1)
    x = rng.standard_normal(64).astype(np.float32)
    f16 = x.astype(np.float16)
    tensors["F16.bytes"] = np.frombuffer(f16.tobytes(), dtype=np.uint8).copy()
    tensors["F16.values"] = dequantize(np.frombuffer(f16.tobytes(), dtype=np.uint8), T.F16).astype(np.float32).reshape(-1)
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    tensors["BF16.bytes"] = np.frombuffer(bf.tobytes(), dtype=np.uint8).copy()
    tensors["BF16.values"] = dequantize(np.frombuffer(bf.tobytes(), dtype=np.uint8), T.BF16).astype(np.float32).reshape(-1)
    # quantization: gguf-py's bytes for the same values (Q8_0, Q4_0, Q4_1, Q5_0), ties included
    from gguf.quants import quantize
    q_in = rng.standard_normal((8, 32)).astype(np.float32)
    q_in[1] = np.round(q_in[1] * 4) / 4  # exact halves for the rounding rules
    q_in[2, :] = 0.0  # an all-zero block
    for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0):
        tensors[f"quantize.{t.name}.input"] = q_in.reshape(-1).copy()
        tensors[f"quantize.{t.name}.bytes"] = quantize(q_in, t).reshape(-1).copy()
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "blocks.safetensors"), metadata={"gguf_py": gguf.__version__ if hasattr(gguf, "__version__") else "unknown"})
    print({k: v.shape for k, v in tensors.items()})


if __name__ == "__main__":
    main()
