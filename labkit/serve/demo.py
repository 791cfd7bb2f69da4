"""A tiny GPT with random weights and a byte-level tokenizer: the API can be tried in seconds."""

from __future__ import annotations

import torch

from labkit.model import GPT, GPTConfig

from .engine import ByteTokenizer, ModelGenerator


def demo_model(seed: int = 0, block_size: int = 64) -> GPT:
    """A randomly initialised tiny GPT (fixed ``seed``) over 256 byte tokens, in float32."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=256,
                           precision="float32")
        return GPT(config).eval()
    finally:
        torch.random.set_rng_state(gen_state)  # leave the caller's random stream alone


def demo_generator(seed: int = 0, device: str = "cpu") -> ModelGenerator:
    """``demo_model`` with a byte tokenizer, ready to serve."""
    return ModelGenerator(demo_model(seed), ByteTokenizer(), device=device,
                          name="demo (tiny GPT, random weights, byte tokens)")
