"""nanoGPT's CPU recipe for Shakespeare, re-implemented here as the peer of `bench/vs-nanogpt.sh`.

The recipe is the one nanoGPT's README gives for a CPU (`config/train_shakespeare_char.py`
with `--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --dropout=0.0`): a character-level GPT-2 (learned positions, pre-LayerNorm
without biases, GELU MLP of 4x width, tied embedding and head, init N(0, 0.02) with the
residual projections scaled by 1/sqrt(2 * n_layer)), AdamW (betas 0.9/0.99, weight decay 0.1
on 2-D tensors only), lr 1e-3 with 100 linear warmup iterations and a cosine to 1e-4 at
`lr_decay_iters = max_iters`, gradient clipping at 1.0, batches of random windows drawn with
torch.randint. Written from the description and checked against nanoGPT's train.py/model.py;
no code is copied.

What differs, and why:
- max_iters is fitted to a wall-clock budget counted from process start: iterations
  10..50 are timed (the warmup's learning rates do not depend on max_iters, so nothing is
  replayed), the whole-split evaluation is timed on a few batches, and the iterations that fit
  in what is left, minus a 3% reserve, become max_iters = lr_decay_iters. The fit is redone
  every 500 iterations from the last 500's speed (the cosine's horizon moves a little each
  time), as `moelab train --time-budget` refits its own: fitted once, the peer's later
  iterations ran 14-21% slower than its iterations 10..50 and its runs overran a 600 s budget
  by 67-102 s.
- No periodic evaluation or checkpointing during training (the recipe evaluates 2 x 20
  batches every 250 iterations): that time goes to training instead, in the peer's favour.
- The corpus is split as `moelab prepare` splits it (files in sorted order, the last 10% of
  the bytes cut at a line break), so both models are scored on the same validation text; the
  number of validation bytes is checked against moelab's meta.json by the caller.
- The final score is over every validation character (non-overlapping windows of
  block_size), not an estimate from 20 random batches.

Usage:
  python reference/nanogpt.py train --corpus DIR --budget 600 --seed 1 [--threads 2]
  python reference/nanogpt.py dev-plays --corpus DIR      # plays wholly inside the train split
Prints one JSON line (train): iterations, validation nats/char, bits per byte, wall seconds.
"""
import argparse
import json
import math
import os
import sys
import time


def process_age():
    """Seconds since this process started (from /proc), so imports count toward the budget."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def read_corpus(path):
    """The documents of a folder of .txt files in sorted order, as `moelab prepare` reads a flat
    folder such as the Shakespeare one (nested folders may sort differently)."""
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, n) for n in names if n.endswith(".txt")]
    files.sort()
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            d = fh.read()
        if d.decode("utf-8").strip():
            docs.append((f, d))
    return docs


def split(docs, frac=0.1):
    """moelab prepare's split: the last `frac` of the bytes are validation, cut at a line break.
    Returns (train bytes, val bytes, index of the first document that reaches validation)."""
    total = sum(len(d) for _, d in docs)
    budget = int((1.0 - frac) * total)
    train, val, first_val = [], [], None
    for i, (_, d) in enumerate(docs):
        if budget == 0:
            if first_val is None:  # the training bytes ended exactly at a document's end
                first_val = i
            val.append(d)
        elif len(d) <= budget:
            budget -= len(d)
            train.append(d)
        else:
            b = budget
            while b > 0 and (d[b] & 0xC0) == 0x80:
                b -= 1
            nl = d.rfind(b"\n", 0, b)
            if nl >= 0:
                cut = nl + 1
            else:
                nxt = d.find(b"\n", b)
                cut = len(d) if nxt < 0 else nxt + 1
            train.append(d[:cut])
            if d[cut:].decode("utf-8").strip():
                val.append(d[cut:])
            budget = 0
            first_val = i
    return b"".join(train), b"".join(val), first_val


def dev_plays(a):
    docs = read_corpus(a.corpus)
    _, _, first_val = split(docs)
    for f, _ in docs[:first_val]:
        print(f)


REFIT = 500  # iterations between fits of max_iters to the time left


def train(a):
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    if a.warmup_iters <= 50:
        sys.exit("--warmup-iters must exceed 50: iterations 10..50 are timed inside the warm-up")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    train_b, val_b, _ = split(read_corpus(a.corpus))
    train_s, val_s = train_b.decode("utf-8"), val_b.decode("utf-8")
    chars = sorted(set(train_s + val_s))  # nanoGPT's prepare.py: the vocabulary of the whole text
    stoi = {c: i for i, c in enumerate(chars)}
    enc = lambda s: torch.from_numpy(np.array([stoi[c] for c in s], dtype=np.int64))  # noqa: E731
    train_ids, val_ids = enc(train_s), enc(val_s)
    V, T, B = len(chars), a.block_size, a.batch_size
    C, L, H = a.n_embd, a.n_layer, a.n_head

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C, bias=False)
            self.c_proj = nn.Linear(C, C, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, C))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C, bias=False)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, bias=False)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(C, bias=False)
            self.mlp = Mlp()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class Gpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C, bias=False)
            self.lm_head = nn.Linear(C, V, bias=False)
            self.wte.weight = self.lm_head.weight  # tied
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
            for n, p in self.named_parameters():
                if n.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * L))

        def forward(self, idx, targets, reduction="mean"):
            t = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(t))
            for blk in self.h:
                x = blk(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), reduction=reduction)

    model = Gpt()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": a.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, a.beta2),
    )

    def get_batch():
        ix = torch.randint(len(train_ids) - T, (B,))
        x = torch.stack([train_ids[i : i + T] for i in ix])
        y = torch.stack([train_ids[i + 1 : i + 1 + T] for i in ix])
        return x, y

    # every validation character after the first is predicted once, in windows of T
    n_pred = len(val_ids) - 1
    starts = list(range(0, n_pred, T))

    @torch.no_grad()
    def evaluate(limit=None):
        model.eval()
        total, count, eb = 0.0, 0, 64
        todo = starts if limit is None else starts[: limit * eb]
        for j in range(0, len(todo), eb):
            xs, ys = [], []
            for s in todo[j : j + eb]:
                n = min(T, n_pred - s)
                xs.append(val_ids[s : s + n])
                ys.append(val_ids[s + 1 : s + 1 + n])
            if len(xs[-1]) != T:  # the last, shorter window on its own
                last = (xs.pop(), ys.pop())
                total += model(last[0][None], last[1][None], reduction="sum").item()
                count += last[1].numel()
            if xs:
                total += model(torch.stack(xs), torch.stack(ys), reduction="sum").item()
                count += sum(y.numel() for y in ys)
        model.train()
        return total, count

    def get_lr(it, max_iters):
        if it < a.warmup_iters:
            return a.lr * (it + 1) / (a.warmup_iters + 1)
        if it > max_iters:
            return a.min_lr
        ratio = (it - a.warmup_iters) / (max_iters - a.warmup_iters)
        return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)

    # the whole-split evaluation's cost, from 3 of its batches (after one to warm up)
    evaluate(limit=1)
    t0 = time.perf_counter()
    evaluate(limit=3)
    eval_cost = (time.perf_counter() - t0) / (3 * 64) * len(starts)

    max_iters, it, t_timed, fit_from = None, 0, None, 10
    while max_iters is None or it <= max_iters:
        if it == 10:
            t_timed = time.perf_counter()
        # fit at iteration 50, then refit every REFIT iterations until the last REFIT
        if it == 50 or (it > 50 and it - fit_from == REFIT and max_iters - it > REFIT):
            per_iter = (time.perf_counter() - t_timed) / (it - fit_from)
            left = a.budget * (1 - 0.03) - process_age() - eval_cost
            # at least one iteration past the warm-up, or the cosine would divide by zero
            max_iters = max(a.warmup_iters + 1, it + 1, it + int(left / per_iter))
            print(f"fitted at {it}: {per_iter * 1e3:.1f} ms/iter, eval {eval_cost:.1f} s -> max_iters {max_iters}", file=sys.stderr)
            t_timed, fit_from = time.perf_counter(), it
        lr = get_lr(it, max_iters if max_iters is not None else 10**9)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        if it % 500 == 0:
            print(f"iter {it} loss {loss.item():.4f} lr {lr:.2e} {process_age():.0f} s", file=sys.stderr)
        it += 1
    total, count = evaluate()
    nats = total / count
    val_bytes = len(val_b)
    print(
        json.dumps(
            {
                "peer": "nanogpt",
                "seed": a.seed,
                "iters": it,
                "val_nats_per_char": nats,
                "val_chars": count,
                "val_bytes": val_bytes,
                "bits_per_byte": nats / math.log(2) / (val_bytes / len(val_s)),
                "wall_s": process_age(),
                "params": sum(p.numel() for p in model.parameters()),
                "vocab": V,
                "torch": torch.__version__,
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--corpus", required=True)
    t.add_argument("--budget", type=float, required=True, help="seconds of wall clock from process start")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--threads", type=int, default=2)
    # the recipe (nanoGPT's README, CPU)
    t.add_argument("--block-size", type=int, default=64)
    t.add_argument("--batch-size", type=int, default=12)
    t.add_argument("--n-layer", type=int, default=4)
    t.add_argument("--n-head", type=int, default=4)
    t.add_argument("--n-embd", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, default=1e-4)
    t.add_argument("--warmup-iters", type=int, default=100)
    t.add_argument("--beta2", type=float, default=0.99)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    d = sub.add_parser("dev-plays")
    d.add_argument("--corpus", required=True)
    a = ap.parse_args()
    train(a) if a.cmd == "train" else dev_plays(a)


if __name__ == "__main__":
    main()
