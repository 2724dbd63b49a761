"""llama.cpp's greedy continuation of a prompt for a GGUF file, through llama-cpp-python
(0.3.36 built as in make_gguf_export.py), with an f32 KV cache: the check behind the
README's GGUF export transcripts.

Usage: ENV/bin/python reference/llama_greedy.py FILE.gguf PROMPT N
"""
import sys

import numpy as np
from llama_cpp import Llama

path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=128, n_threads=2, logits_all=True, verbose=False,
            type_k=0, type_v=0)  # GGML_TYPE_F32
ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
llm.eval(ids)
out = []
for _ in range(n):
    t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(t)
    llm.eval([t])
print("prompt ids", ids)
print("greedy ids", out)
print(repr(llm.detokenize(out).decode(errors="replace")))
