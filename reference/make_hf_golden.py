"""Writes golden fixtures from Hugging Face `transformers` itself, in tests/golden/hf_<family>/,
for the Rust test `crates/model/tests/hf_golden.rs` (issue 12): proof that moelab computes
what the open-weight families compute, through the tensor mapping `model::hf` that import
reuses.

For each family, a tiny model is built offline from a config (nothing from a hub), its
weights drawn with the family's own initialisation (routers re-drawn wide, std 0.5, so no
top-k choice is a near-tie; biases re-drawn from zero to std 0.1), rounded to float32 and loaded back into a float64 model. Files:

- config.json: the model's Hugging Face config (what `moelab import` reads);
- init.safetensors: the float32 weights under their Hugging Face names;
- expected.safetensors: `tokens`, `targets` (int32 (B, T); -1 = ignored), `logits` (float64
  (B*T, V)), `loss` (float64 (1,): mean cross-entropy over counted targets, as moelab's),
  `router_idx.<l>` (int32 (B*T, K), by descending score, per MoE layer l) and
  `grad.<hf name>` (float64) for every parameter.

Precision: transformers computes RMSNorm and the MoE router softmax in float32 even in a
float64 model (`hidden_states.to(torch.float32)`, `router_logits.float()`), so the fixtures
carry float32 rounding at those points (about 1e-7 relative): far below the Rust tolerances.

Usage (PyTorch and transformers 5.x: `python3 -m venv ENV && ENV/bin/pip install torch numpy
safetensors 'transformers>=5,<6'`; fixtures were written with transformers 5.24.0, torch
2.15.0):

    ENV/bin/python reference/make_hf_golden.py [FAMILY...]     (default: all)
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden")
B, T = 2, 24

COMMON = dict(
    vocab_size=48,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    attn_implementation="eager",
    experts_implementation="eager",  # the per-expert loop (grouped_mm has no float64)
)

FAMILIES = {
    # dense Llama with grouped-query attention and tied embeddings
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(intermediate_size=48, tie_word_embeddings=True, rope_theta=10000.0),
    ),
    # softmax top-2 of 4 experts, renormalised (Mixtral's router)
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    ),
    # q/k/v biases, one shared expert (width 40) behind a sigmoid gate, top-2 not
    # renormalised; 3 blocks, the middle one dense (mlp_only_layers)
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            mlp_only_layers=[1],
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    ),
    # per-head q/k RMSNorm, head_dim 12 != 32 / 4, softmax top-2 renormalised; every second
    # block MoE (decoder_sparse_step 2: block 0 dense)
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            decoder_sparse_step=2,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=12,
            norm_topk_prob=True,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    ),
    # q/k RMSNorm over the whole projections, top-2 not renormalised
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            eos_token_id=None,
            pad_token_id=None,
            bos_token_id=None,
        ),
    ),
}


def router_layers(model):
    """(layer index, router weight) of every MoE layer."""
    out = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "weight") and gate.weight.dim() == 2:
            out.append((i, gate))
    return out


def write(family):
    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(1234)
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    model = getattr(transformers, model_name)(cfg).double()
    with torch.no_grad():
        for _, gate in router_layers(model):
            gate.weight.normal_(0.0, 0.5)
        # biases start at zero; random ones show whether they are mapped and added
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
        # float32 weights, exactly representable in the float64 model
        for p in model.parameters():
            p.copy_(p.float().double())
    model.train()  # no dropout in these families; keeps autograd on
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.randint(0, cfg.vocab_size, (B, 1), generator=g)], 1)
    targets[0, 3] = -1  # an ignored position
    targets[1, 10] = -1

    router_logits = {}
    hooks = [
        gate.register_forward_hook(
            lambda mod, inp, out, i=i: router_logits.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, gate in router_layers(model)
    ]
    out = model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    v = cfg.vocab_size
    logits = out.logits.reshape(B * T, v)
    loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=-1)
    loss.backward()

    expected = {
        "tokens": tokens.to(torch.int32),
        "targets": targets.to(torch.int32),
        "logits": logits.detach(),
        "loss": loss.detach().reshape(1),
    }
    k = getattr(cfg, "num_experts_per_tok", 0)
    for i, rl in sorted(router_logits.items()):
        probs = torch.softmax(rl.detach().float(), dim=-1)
        idx = torch.topk(probs, k, dim=-1).indices.to(torch.int32)
        counts = torch.bincount(idx.reshape(-1).long(), minlength=rl.shape[-1])
        assert (counts > 0).all(), f"{family} layer {i}: an expert is never chosen ({counts.tolist()})"
        expected[f"router_idx.{i}"] = idx
    init = {}
    for name, p in model.named_parameters():
        init[name] = p.detach().float().contiguous()
        expected[f"grad.{name}"] = p.grad.detach().contiguous()

    d = os.path.join(ROOT, f"hf_{family}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(json.loads(cfg.to_json_string()), f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(init, os.path.join(d, "init.safetensors"))
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(d, "expected.safetensors"))
    print(f"{d}: loss {loss.item():.6f}, {len(init)} tensors, router layers {sorted(router_logits)}")


if __name__ == "__main__":
    for fam in sys.argv[1:] or FAMILIES:
        write(fam)
