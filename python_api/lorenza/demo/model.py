"""A small Llama-style causal language model over bytes, sized to the machine.

The architecture of LLaMA (Touvron et al., 2023, https://arxiv.org/abs/2302.13971): pre-norm
blocks with RMSNorm (Zhang & Sennrich, 2019, https://arxiv.org/abs/1910.07467), rotary position
embeddings (Su et al., 2021, https://arxiv.org/abs/2104.09864; the "rotate half" layout of the
Hugging Face Llama code), causal multi-head attention, a SwiGLU feed-forward (Shazeer, 2020,
https://arxiv.org/abs/2002.05202), no biases, tied or untied input/output embeddings.

No dropout: zeroth-order probes must evaluate the same function at theta + mu z and theta - mu z.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 0  # 0: 8/3 dim rounded up to a multiple of 32 (LLaMA's SwiGLU width)
    max_seq_len: int = 128
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into n_heads={self.n_heads} heads of even size")
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", (8 * self.dim // 3 + 31) // 32 * 32)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        d, f, v = self.dim, self.ffn_dim, self.vocab_size
        per_layer = 4 * d * d + 3 * d * f + 2 * d
        return self.n_layers * per_layer + v * d * (1 if self.tie_embeddings else 2) + d


# Named sizes. tiny: the --quick run and the tests; small: the CPU default; base: the GPU default.
SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=64),
    "small": ModelConfig(dim=128, n_layers=4, n_heads=4, max_seq_len=128),
    "base": ModelConfig(dim=512, n_layers=8, n_heads=8, max_seq_len=256),
}

_KEYS = {
    "dim": "dim",
    "d": "dim",
    "layers": "n_layers",
    "l": "n_layers",
    "heads": "n_heads",
    "h": "n_heads",
    "ffn": "ffn_dim",
    "seq": "max_seq_len",
    "vocab": "vocab_size",
    "tie": "tie_embeddings",
}


def parse_size(spec: str) -> ModelConfig:
    """A named size (``tiny``, ``small``, ``base``) or dims: ``dim=256,layers=4,heads=4[,ffn=..,seq=..,tie=0]``.

    A named size may be modified: ``small,seq=256``.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    cfg = ModelConfig()
    if parts and "=" not in parts[0]:
        if parts[0] not in SIZES:
            raise ValueError(f"--model-size: unknown size {parts[0]!r}; choose {sorted(SIZES)} or give dims")
        cfg = SIZES[parts.pop(0)]
    changes: dict = {}
    for part in parts:
        key, _, value = part.partition("=")
        field = _KEYS.get(key.strip().lower())
        if field is None or not value:
            raise ValueError(f"--model-size: cannot read {part!r}; keys: {sorted(set(_KEYS))}")
        changes[field] = value.strip() not in ("0", "false", "no") if field == "tie_embeddings" else int(value)
    if "dim" in changes and "ffn_dim" not in changes:
        changes["ffn_dim"] = 0
    return replace(cfg, **changes)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim): angle t * theta^(-2i/head_dim), each frequency twice."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + h/2}) of x (..., seq, head_dim) by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    """``forward(tokens (B, T) int64) -> logits (B, T, vocab)``; position t sees tokens 0..t only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2's initialisation: N(0, 0.02), the projections into the residual stream scaled by
        # 1/sqrt(2 n_layers) (https://github.com/openai/gpt-2/blob/master/src/model.py).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    # The Hugging Face accessors, so that code written for HF models (low-rank grouping) works here.
    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(tokens)
        cos, sin = rotary_cos_sin(t, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (B, T + 1); works for this model and HF causal LMs."""
    out = model(batch[:, :-1])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
