"""Writes tests/golden/export-gguf/<name>.json for each <name>.gguf there (files moelab's
exporter wrote: `MOELAB_BLESS=1 cargo test -p interop --test export_gguf`): llama.cpp's
tokenization of a prompt and its 20 greedy tokens after it (argmax of the logits, step by
step), through llama-cpp-python, with an f32 KV cache (llama.cpp's default f16 cache
rounds keys and values: on these tiny random models that moves logits by ~2e-4, enough to
flip a near tie a few tokens in).

Usage (a venv with llama-cpp-python==0.3.36 built from the sdist with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
-DGGML_AMX_BF16=OFF", as for make_smollm2_reference.py; the committed numbers come from a
host without AVX-512, built with -DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON and the AMX options off):

    ENV/bin/python reference/make_gguf_export.py [NAME ...]   (default: every <name>.gguf)
"""
import glob
import json
import os

import llama_cpp
import numpy as np
from llama_cpp import Llama

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "export-gguf")
PROMPT = "What is 12 + 34? It is"

import sys

names = sys.argv[1:]
for path in sorted(glob.glob(os.path.join(ROOT, "*.gguf"))):
    if names and os.path.basename(path)[: -len(".gguf")] not in names:
        continue
    llm = Llama(model_path=path, n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                type_k=0, type_v=0)  # GGML_TYPE_F32
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.eval(ids)
    # the next-token log-probabilities after the prompt (a stronger check than greedy
    # tokens, which a degenerate tiny model repeats)
    z = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    logprobs = z - z.max() - np.log(np.exp(z - z.max()).sum())
    out = []
    for _ in range(20):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    res = {"llama_cpp_python": llama_cpp.__version__, "kv_cache": "f32", "prompt": PROMPT,
           "prompt_ids": ids, "greedy": out,
           "logprobs": [round(float(x), 6) for x in logprobs]}
    with open(path[: -len(".gguf")] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(os.path.basename(path), ids, out)
