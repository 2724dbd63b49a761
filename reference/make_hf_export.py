"""Writes expected.json in each tests/golden/export/<name>/ (dirs that moelab's exporter
wrote: `MOELAB_BLESS=1 cargo test -p interop --test export_hf`): the ids transformers'
`apply_chat_template` gives for a conversation with the exported chat template, and the
float32 log-probabilities (log-softmax of the last position's logits, every vocabulary
entry) of transformers' `AutoModelForCausalLM.from_pretrained(dir)` after those ids.

Usage (the venv of make_hf_golden.py; written with transformers 5.24.0, torch 2.15.0):

    ENV/bin/python reference/make_hf_export.py
"""
import json
import os

import torch
import transformers

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "export")
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 34?"},
    {"role": "assistant", "content": "46"},
    {"role": "user", "content": "The quick brown fox?"},
]

for name in sorted(os.listdir(ROOT)):
    d = os.path.join(ROOT, name)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    out = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "family": model.config.model_type,
        "chat": {"messages": MESSAGES, "ids": ids},
        "logprobs": [float(x) for x in lp],
    }
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(out, f)
    print(name, model.config.model_type, len(ids), "ids")
