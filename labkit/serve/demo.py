"""A tiny model with random weights and a byte-level tokenizer: the API can be tried in seconds."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .engine import ByteTokenizer, ModelGenerator


class _TinyCausalLM(nn.Module):
    """Stand-in decoder (one attention block) used until ``labkit.model.GPT`` is available."""

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_embd: int = 32, n_head: int = 2):
        super().__init__()
        self.config = type("Cfg", (), {"block_size": block_size, "vocab_size": vocab_size})()
        self.n_head = n_head
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(y)
        x = x + self.mlp(self.ln2(x))
        return self.head(x), None


def demo_generator(seed: int = 0, device: str = "cpu") -> ModelGenerator:
    """A randomly initialised tiny model (fixed ``seed``) with a byte tokenizer, ready to serve."""
    torch.manual_seed(seed)
    model = _TinyCausalLM()
    return ModelGenerator(model, ByteTokenizer(), device=device, name="demo (random weights, byte tokens)")
