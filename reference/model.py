"""Compact PyTorch reference of moelab's MoE transformer (same math, same parameter names).

Used only to write golden fixtures (tests/golden/) and as the peer in bench/vs-pytorch.sh.
It reads moelab's TOML configs and safetensors weights. Written as an ordinary eager
implementation (HF Llama/Mixtral style: a loop over experts with index_add_). Residual
dropout takes moelab's own masks (`dropout.py`), so training-mode fixtures match exactly.
"""
import math
import tomllib

import torch
import torch.nn.functional as F
from torch import nn

from dropout import dropout_mask


def load_config(path):
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    m = cfg["model"]
    defaults = dict(rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, n_experts=0, top_k=2,
                    expert_hidden=0, n_shared_experts=0, router_score="softmax", renormalize=True,
                    balance="aux_loss", aux_loss_coef=0.01, z_loss_coef=0.0, bias_update_rate=0.001,
                    first_dense_layers=0, dropout=0.0, init_std=0.02)
    for k, v in defaults.items():
        m.setdefault(k, v)
    t = dict(batch_size=16, seq_len=128, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
             weight_decay=0.1, grad_clip=1.0, seed=1337, grad_accum=1)
    t.update(cfg.get("train", {}))
    return m, t


class RMSNorm(nn.Module):
    def __init__(self, c, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(t, d, theta, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, heads, T, D)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def swiglu(x, w_gu, w_down):
    g, u = (x @ w_gu.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_down.T


def head_dim(m):
    """model.head_dim when set, else d_model / n_heads (as ModelConfig::head_dim)."""
    return m.get("head_dim") or m["d_model"] // m["n_heads"]


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.h, self.g, self.d = m["n_heads"], m["n_kv_heads"], head_dim(m)
        self.wqkv = nn.Linear(m["d_model"], (self.h + 2 * self.g) * self.d, bias=False)
        self.wo = nn.Linear(self.h * self.d, m["d_model"], bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([self.h * self.d, self.g * self.d, self.g * self.d], dim=-1)
        q = q.view(b, t, self.h, self.d).transpose(1, 2)
        k = k.view(b, t, self.g, self.d).transpose(1, 2)
        v = v.view(b, t, self.g, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.g != self.h)
        return self.wo(o.transpose(1, 2).reshape(b, t, self.h * self.d))


class Mlp(nn.Module):
    def __init__(self, c, f):
        super().__init__()
        self.w_gate_up = nn.Linear(c, 2 * f, bias=False)
        self.w_down = nn.Linear(f, c, bias=False)

    def forward(self, x):
        return swiglu(x, self.w_gate_up.weight, self.w_down.weight)


class Experts(nn.Module):
    def __init__(self, e, c, f):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * f, c))
        self.w_down = nn.Parameter(torch.empty(e, c, f))


class Router(nn.Module):
    def __init__(self, e, c, with_bias):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(e, c))
        if with_bias:
            self.register_buffer("bias", torch.zeros(e))
        else:
            self.bias = None


class Moe(nn.Module):
    def __init__(self, m):
        super().__init__()
        c, e = m["d_model"], m["n_experts"]
        self.m = m
        self.router = Router(e, c, m["balance"] == "bias")
        self.experts = Experts(e, c, m["expert_hidden"])
        self.shared = Mlp(c, m["n_shared_experts"] * m["expert_hidden"]) if m["n_shared_experts"] else None

    def forward(self, x):
        m = self.m
        b, t, c = x.shape
        h = x.reshape(-1, c)
        n, e, k = h.shape[0], m["n_experts"], m["top_k"]
        logits = h @ self.router.weight.T
        scores = logits.softmax(-1) if m["router_score"] == "softmax" else logits.sigmoid()
        sel = scores.detach() + (self.router.bias if self.router.bias is not None else 0)
        idx = sel.topk(k, dim=-1).indices  # (N, K)
        w = scores.gather(-1, idx)
        if m["renormalize"]:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for j in range(e):
            tok, slot = torch.where(idx == j)
            if tok.numel() == 0:
                continue
            y = swiglu(h[tok], self.experts.w_gate_up[j], self.experts.w_down[j])
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(out.dtype))  # bf16 under autocast, as HF Mixtral casts
        if self.shared is not None:
            out = out + self.shared(h)
        counts = torch.bincount(idx.flatten(), minlength=e)
        # smallest gap between a chosen and an unchosen selection score: a float32 router can
        # only disagree with this float64 one on a token whose gap is near float32 rounding
        top = sel.detach().topk(min(k + 1, e), dim=-1).values
        margin = (top[:, k - 1] - top[:, k]).min().item() if k < e else math.inf
        self.last = dict(idx=idx, counts=counts, margin=margin)
        p = scores if m["router_score"] == "softmax" else scores / scores.sum(-1, keepdim=True)
        aux = e * ((counts.to(h.dtype) / (n * k)) * p.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        return out.view(b, t, c), aux, z


class Block(nn.Module):
    def __init__(self, m, layer):
        super().__init__()
        self.attn_norm = RMSNorm(m["d_model"], m["norm_eps"])
        self.attn = Attention(m)
        self.ffn_norm = RMSNorm(m["d_model"], m["norm_eps"])
        if m["n_experts"] > 0 and layer >= m["first_dense_layers"]:
            self.moe = Moe(m)
        else:
            self.mlp = Mlp(m["d_model"], m["ffn_hidden"])

    def forward(self, x, cos, sin, masks=None):
        """`masks`: this block's residual dropout masks (attention, FFN), each (B, T, C)."""
        m_attn, m_ffn = masks if masks is not None else (1.0, 1.0)
        x = x + m_attn * self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if hasattr(self, "moe"):
            y, aux, z = self.moe(h)
            return x + m_ffn * y, aux, z
        return x + m_ffn * self.mlp(h), None, None


class Transformer(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.embed = nn.Embedding(m["vocab_size"], m["d_model"])
        self.layers = nn.ModuleList([Block(m, l) for l in range(m["n_layers"])])
        self.norm = RMSNorm(m["d_model"], m["norm_eps"])
        if not m["tie_embeddings"]:
            self.lm_head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)

    def forward(self, tokens, targets, masks=None):
        """`masks`: per block, a pair of residual dropout masks (see `dropout_masks`)."""
        m = self.m
        b, t = tokens.shape
        x = self.embed(tokens)
        cos, sin = rope_tables(t, head_dim(m), m["rope_theta"], x.dtype)
        aux_sum = x.new_zeros(())
        z_sum = x.new_zeros(())
        for l, blk in enumerate(self.layers):
            x, aux, z = blk(x, cos, sin, None if masks is None else masks[l])
            if aux is not None:
                aux_sum = aux_sum + aux
                z_sum = z_sum + z
        x = self.norm(x)
        w = self.embed.weight if m["tie_embeddings"] else self.lm_head.weight
        logits = x @ w.T
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)
        total = ce
        if m["n_experts"] > 0 and m["balance"] == "aux_loss":
            total = total + m["aux_loss_coef"] * aux_sum
        if m["n_experts"] > 0 and m["z_loss_coef"] > 0:
            total = total + m["z_loss_coef"] * z_sum
        return logits, total, ce, aux_sum, z_sum

    def moe_blocks(self):
        return [(l, blk.moe) for l, blk in enumerate(self.layers) if hasattr(blk, "moe")]

    def dropout_masks(self, b, t, key):
        """moelab's residual dropout masks for a (b, t) batch under `Model::dropout_key` = key:
        block l's attention branch uses stream 2l, its FFN branch 2l + 1."""
        n, c, p = b * t, self.m["d_model"], self.m["dropout"]
        mask = lambda s: torch.from_numpy(dropout_mask(n * c, p, key, s)).view(b, t, c)
        return [(mask(2 * l), mask(2 * l + 1)) for l in range(len(self.layers))]

    def update_bias(self, loads=None):
        """DeepSeek-V3 bias balancing from the step's loads: `loads` maps an MoE block to its
        expert counts summed over the step's micro-batches (default: the last forward's)."""
        if self.m["balance"] != "bias":
            return
        for l, moe in self.moe_blocks():
            counts = (moe.last["counts"] if loads is None else loads[l]).to(torch.float64)
            mean = counts.mean()
            moe.router.bias += self.m["bias_update_rate"] * torch.sign(mean - counts).to(moe.router.bias.dtype)

    def optimizer(self, t):
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        return torch.optim.AdamW([dict(params=decay, weight_decay=t["weight_decay"]),
                                  dict(params=no_decay, weight_decay=0.0)],
                                 lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"])


def init_state(model, m, seed):
    """Seeded reference initialisation with moelab's rules (normal(init_std); residual
    projections scaled by 1/sqrt(2L); norms one; balancing bias zero)."""
    g = torch.Generator().manual_seed(seed)
    std = m["init_std"]
    resid = std / math.sqrt(2 * m["n_layers"])
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            sd[name] = torch.ones_like(p)
        elif name.endswith("router.bias"):
            sd[name] = torch.zeros_like(p)
        else:
            s = resid if ("wo." in name or "w_down" in name) else std
            sd[name] = torch.randn(p.shape, generator=g) * s
    return sd
