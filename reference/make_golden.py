"""Writes the golden fixtures in tests/golden/<name>/ that the Rust tests compare against.

For each config: init.safetensors (float32 initial weights, loaded by both sides) and
expected.safetensors with the inputs, logits, losses, router choices, every parameter
gradient, and the total losses of 10 AdamW steps on the same batch. The reference math runs
in float64 from the float32 weights, so the fixtures are the exact answer to within float64
rounding; moelab's float32 result is compared against them with stated tolerances.

A step has `train.grad_accum` = A micro-batches of (B, T), folded as moelab's trainer folds
them: each micro-batch's gradient of total / A, summed in micro-batch order; the step's loss is
the mean of the micro-batch totals; bias balancing uses the loads summed over the step.
`tokens`/`targets` are (A*B, T) (micro-batch j is rows jB..(j+1)B), `logits` and
`router_idx.<l>` concatenate the micro-batches, `loss` is [total, ce, aux, z] per micro-batch
((4,) when A = 1, else (A, 4)) and `grad.<name>` is the step's folded gradient. With
model.dropout > 0 every forward trains with moelab's residual dropout masks keyed by the global
micro-batch index (`reference/dropout.py`): step s, micro-batch j has key s*A + j.

Usage (needs PyTorch: `python3 -m venv ENV && ENV/bin/pip install torch numpy safetensors`;
the PyPI wheel imports only with its nvidia-* dependencies installed, even on CPU):

    python reference/make_golden.py [FIXTURE...]      (default: every dir in tests/golden/)

Regenerating is deterministic on one machine (any thread count), but another CPU may change
the last float64 bits of logits, losses and gradients (the BLAS kernels' summation order;
seen for dense and moe_softmax: at most 6.4e-16 of a tensor's largest magnitude, inputs and
router choices identical). That is 1e10 below the Rust tolerances: such a diff need not be
committed.
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
            # non-zero selection bias so the first forward already exercises it, small beside
            # the spread of the router's scores so that they, not the bias, pick the experts
            # (at 0.05 two of six experts were never chosen: issue 11)
            sd[key] = torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(7)) * 0.01
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    save_file(sd, os.path.join(d, "init.safetensors"))

    model.load_state_dict(sd)
    model.double()
    g = torch.Generator().manual_seed(t["seed"] + 1)
    b, tt, v, acc = t["batch_size"], t["seq_len"], m["vocab_size"], t["grad_accum"]
    tokens = torch.randint(0, v, (acc * b, tt), generator=g)
    targets = torch.randint(0, v, (acc * b, tt), generator=g)
    targets[0, :3] = -1  # masked positions (moelab's IGNORE_INDEX)

    def micro_step(j, key):
        """Forward of micro-batch j (dropout key `key`) and backward of its total / A;
        returns the forward's outputs and the expert loads of each MoE block."""
        rows = slice(j * b, (j + 1) * b)
        masks = model.dropout_masks(b, tt, key) if m["dropout"] > 0 else None
        res = model(tokens[rows], targets[rows], masks)
        (res[1] / acc).backward()
        return res, {l: moe.last["counts"] for l, moe in model.moe_blocks()}

    out = {"tokens": tokens.to(torch.int32), "targets": targets.to(torch.int32)}
    logits, loss, idx = [], [], {l: [] for l, _ in model.moe_blocks()}
    margin = float("inf")
    for j in range(acc):
        (lg, total, ce, aux, z), _ = micro_step(j, j)
        logits.append(lg.detach().reshape(b * tt, v))
        loss.append(torch.stack([total, ce, aux, z]).detach())
        for l, moe in model.moe_blocks():
            idx[l].append(moe.last["idx"].to(torch.int32))
            margin = min(margin, moe.last["margin"])
    out["logits"] = torch.cat(logits)
    out["loss"] = loss[0] if acc == 1 else torch.stack(loss)
    for l, chosen in idx.items():
        out[f"router_idx.{l}"] = torch.cat(chosen)
    for n, p in model.named_parameters():
        out[f"grad.{n}"] = p.grad.detach().clone()

    opt = model.optimizer(t)
    model.zero_grad()
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        totals, loads = [], {}
        for j in range(acc):
            (_, total, _, _, _), counts = micro_step(j, step * acc + j)
            totals.append(total.detach())
            loads = {l: loads.get(l, 0) + c for l, c in counts.items()}
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        with torch.no_grad():
            model.update_bias(loads)
        losses.append(torch.stack(totals).mean())
    out["train_losses"] = torch.stack(losses)
    out = {k: (v.double() if v.is_floating_point() else v).contiguous() for k, v in out.items()}
    save_file(out, os.path.join(d, "expected.safetensors"), metadata={"torch": torch.__version__})
    routing = f"; smallest router top-k margin {margin:.1e}" if model.moe_blocks() else ""
    print(f"{name}: loss {losses[-1].item():.6f} after {STEPS} steps; first {losses[0].item():.6f}"
          + routing)


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(
        x for x in os.listdir(ROOT)
        if os.path.isdir(os.path.join(ROOT, x)) and not x.startswith("hf_")  # make_hf_golden.py
    )
    for n in names:
        make(n)
