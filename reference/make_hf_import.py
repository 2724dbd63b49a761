"""Writes Hugging Face model dirs as `save_pretrained` writes them, with reference numbers
from `transformers`, in tests/golden/import/<name>/, for the import tests (issue 13):
`moelab import` of each must serve the same next-token log-probabilities.

Each family of make_hf_golden.py gets a tiny model (weights as the family initialises them,
routers re-drawn wide so no top-k choice is a near-tie), a byte-level BPE tokenizer trained
here (320 ids, ChatML's control tokens) and the ChatML chat template. Variants cover what
import must read: float32 and bfloat16 files, one file and shards
(`model.safetensors.index.json`), per-expert ("legacy") expert names as `save_pretrained`
writes them and fused expert tensors (`mlp.experts.gate_up_proj`) as the model holds them.

expected.json: for each prompt, the token ids transformers gives (`apply_chat_template` for
a conversation, the tokenizer for a text), and the top-5 next-token (id, log-probability)
at the last position of a float32 forward of the model loaded back from the dir.

Usage (the venv of make_hf_golden.py; written with transformers 5.24.0, torch 2.15.0):

    ENV/bin/python reference/make_hf_import.py
"""
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(__file__))
from make_hf_golden import COMMON, FAMILIES, router_layers  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "import")
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 34 = 46.",
    "Mixture of experts routes each token to a few experts.",
    "héllo wörld, ça va? 日本語のテキスト ✓",
    "    indented code:\n\tfor i in range(10): print(i)\n",
] * 20
# (name, family, dtype, shard size or None, fused expert names)
VARIANTS = [
    ("llama", "llama", torch.float32, None, False),
    ("llama-bf16-sharded", "llama", torch.bfloat16, "40KB", False),
    ("mixtral-sharded", "mixtral", torch.float32, "40KB", False),
    ("mixtral-fused", "mixtral", torch.float32, None, True),
    ("qwen2_moe-bf16", "qwen2_moe", torch.bfloat16, None, False),
    ("qwen3_moe", "qwen3_moe", torch.float32, None, False),
    ("olmoe", "olmoe", torch.float32, None, False),
]
# RoPE scaling (issue 15): a Llama per rope_type, its frequencies stretched for a context 4x
# the original; the short prompts already see every frequency changed
ROPE = {
    "llama-rope-linear": {"rope_type": "linear", "factor": 4.0},
    "llama-rope-yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama-rope-yarn-af": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                           "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3,
                           "truncate": False},
    "llama-rope-llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}
# Sliding windows (issue 15): shorter than the chat prompt, so the cache wraps around; the
# Qwen2-MoE window applies to the blocks transformers derives from max_window_layers
# (layer_types: sliding, full, sliding), Mixtral's to every block
WINDOW = {
    "mixtral-window": ("mixtral", {"sliding_window": 4}),
    "qwen2_moe-window": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 5,
                                       "max_window_layers": 3}),
}
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is 12 + 34?"},
]
TEXT = "The quick brown fox"


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def top5(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    v, i = lp.topk(5)
    return [[int(a), float(b)] for a, b in zip(i, v)]


def write(name, family, dtype, shard, fused, rope=None, more=None):
    cfg_name, model_name, extra = FAMILIES[family]
    extra = {**extra, **(more or {})}
    if rope is not None:
        extra = {**extra, "rope_parameters": {"rope_theta": 10000.0, **rope}}
    tok = tokenizer()
    torch.manual_seed(4321)
    common = {k: v for k, v in COMMON.items() if k != "experts_implementation"}
    cfg = getattr(transformers, cfg_name)(**{**common, **extra, "vocab_size": len(tok)})
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = tok.bos_token_id
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for _, gate in router_layers(model):
            gate.weight.normal_(0.0, 0.5)
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model = model.to(dtype)
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    if fused:
        os.makedirs(out)
        cfg.save_pretrained(out)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(out, **kw)
    tok.save_pretrained(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    back.eval()
    chat_ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "input_ids"):
        chat_ids = chat_ids["input_ids"]
    text_ids = tok(TEXT)["input_ids"]
    expected = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "chat": {"messages": CONVERSATION, "ids": chat_ids, "top5": top5(back, chat_ids)},
        "text": {"text": TEXT, "ids": text_ids, "top5": top5(back, text_ids)},
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    files = sorted(os.listdir(out))
    print(name, files)


if __name__ == "__main__":
    only = sys.argv[1:]
    for v in VARIANTS:
        if not only or v[0] in only:
            write(*v)
    for name, rope in ROPE.items():
        if not only or name in only:
            write(name, "llama", torch.float32, None, False, rope)
    for name, (family, more) in WINDOW.items():
        if not only or name in only:
            write(name, family, torch.float32, None, False, None, more)
