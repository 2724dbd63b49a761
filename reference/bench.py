"""Training throughput of the PyTorch reference on a moelab config: eager or torch.compile,
fp32 or bf16 autocast (fp32 weights, bf16 matmuls, as PyTorch's mixed precision runs on CPU).

Usage: python reference/bench.py CONFIG.toml [--threads 2] [--steps 10] [--warmup 3] [--compile] [--bf16]
Prints one JSON line: tokens_per_s and the settings used.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from model import Transformer, init_state, load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="torch.autocast(cpu, bfloat16) around the forward")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m, t = load_config(a.config)
    torch.manual_seed(t["seed"])
    model = Transformer(m)
    model.load_state_dict(init_state(model, m, t["seed"]))
    b, tt, v = t["batch_size"], t["seq_len"], m["vocab_size"]
    tokens = torch.randint(0, v, (b, tt))
    targets = torch.randint(0, v, (b, tt))
    opt = model.optimizer(t)
    fwd = torch.compile(model) if a.compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            _, total, _, _, _ = fwd(tokens, targets)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        with torch.no_grad():
            model.update_bias()
        return total.item()

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    secs = time.perf_counter() - t0
    peer = "pytorch" + ("-bf16" if a.bf16 else "") + ("-compile" if a.compile else "-eager")
    print(json.dumps(dict(peer=peer, torch=torch.__version__,
                          threads=a.threads, steps=a.steps, tokens_per_s=a.steps * b * tt / secs, loss=loss)))


if __name__ == "__main__":
    main()
