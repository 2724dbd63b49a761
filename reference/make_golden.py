"""Writes the golden fixtures in tests/golden/<name>/ that the Rust tests compare against.

For each config: init.safetensors (float32 initial weights, loaded by both sides) and
expected.safetensors with the inputs, logits, losses, router choices, every parameter
gradient, and the total losses of 10 AdamW steps on the same batch. The reference math runs
in float64 from the float32 weights, so the fixtures are the exact answer to within float64
rounding; moelab's float32 result is compared against them with stated tolerances.

Usage (needs PyTorch): python reference/make_golden.py
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from model import Transformer, init_state, load_config  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "golden")
STEPS = 10


def make(name):
    d = os.path.join(ROOT, name)
    m, t = load_config(os.path.join(d, "config.toml"))
    torch.manual_seed(t["seed"])
    model = Transformer(m)
    sd = init_state(model, m, t["seed"])
    for key in sd:
        if key.endswith("router.bias"):
            # non-zero selection bias so the first forward already exercises it
            sd[key] = torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(7)) * 0.05
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    save_file(sd, os.path.join(d, "init.safetensors"))

    model.load_state_dict(sd)
    model.double()
    g = torch.Generator().manual_seed(t["seed"] + 1)
    b, tt, v = t["batch_size"], t["seq_len"], m["vocab_size"]
    tokens = torch.randint(0, v, (b, tt), generator=g)
    targets = torch.randint(0, v, (b, tt), generator=g)
    targets[0, :3] = -1  # masked positions (moelab's IGNORE_INDEX)

    out = {"tokens": tokens.to(torch.int32), "targets": targets.to(torch.int32)}
    logits, total, ce, aux, z = model(tokens, targets)
    total.backward()
    out["logits"] = logits.detach().reshape(b * tt, v)
    out["loss"] = torch.stack([total, ce, aux, z]).detach()
    for l, moe in model.moe_blocks():
        out[f"router_idx.{l}"] = moe.last["idx"].to(torch.int32)
    for n, p in model.named_parameters():
        out[f"grad.{n}"] = p.grad.detach().clone()

    opt = model.optimizer(t)
    model.zero_grad()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        _, total, _, _, _ = model(tokens, targets)
        total.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        with torch.no_grad():
            model.update_bias()
        losses.append(total.detach())
    out["train_losses"] = torch.stack(losses)
    out = {k: (v.double() if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    save_file(out, os.path.join(d, "expected.safetensors"), metadata={"torch": torch.__version__})
    print(f"{name}: loss {total.item():.6f} after {STEPS} steps; first {losses[0].item():.6f}")


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(x for x in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, x)))
    for n in names:
        make(n)
