"""An out-of-memory error predicted, then seen: one AdamW step of a model under a memory cap.

``adamw_step_under_cap(n_params, cap_mb)`` builds a stack of linear layers holding ``n_params`` fp32
parameters and runs one training step while the process may allocate at most ``cap_mb`` MiB more
(:func:`labkit.core.memcap.memory_cap`). fp32 AdamW keeps 16 bytes per parameter (4 weights, 4 gradients,
4 + 4 Adam moments): the same total as the 2 + 2 + 12 of mixed precision that ``training_memory`` counts.
Run it on a Dask worker (``client.submit``): the cap then limits that worker process, not the notebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from labkit.core.memcap import is_out_of_memory, memory_cap

WIDTH = 512  # features of each linear layer: n_params / (WIDTH² + WIDTH) layers


@dataclass(frozen=True)
class CappedStep:
    """What one capped AdamW step did: ``ok``, or the allocator's refusal in ``error``."""

    n_params: int
    cap_mb: float
    ok: bool
    error: str = ""

    def __str__(self) -> str:
        what = "the step ran" if self.ok else f"out of memory: {self.error}"
        return f"{self.n_params / 1e6:.1f} M params under a {self.cap_mb:.0f} MiB cap: {what}"


def _warm_up(device: str) -> None:
    """One step of a small model outside the cap: torch imports the optimizer's helpers on the first
    step, and a matmul this size starts the intra-op thread pool (a thread's stack is a mapping too,
    and a thread that cannot start under the cap aborts the process instead of raising)."""
    small = torch.nn.Linear(WIDTH, WIDTH).to(device)
    opt = torch.optim.AdamW(small.parameters(), lr=1e-3)
    small(torch.randn(64, WIDTH, device=device)).sum().backward()
    opt.step()


def adamw_step_under_cap(n_params: float, cap_mb: float, device: str = "cpu") -> CappedStep:
    """One forward, backward and AdamW step of ~``n_params`` fp32 parameters with at most ``cap_mb`` MiB more memory."""
    layers = max(1, round(n_params / (WIDTH * WIDTH + WIDTH)))
    _warm_up(device)  # imports and allocator set-up outside the cap: only the model's own memory counts
    with memory_cap(cap_mb, device):
        try:
            model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).to(device)
            count = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            model(torch.randn(8, WIDTH, device=device)).square().mean().backward()
            opt.step()  # the moments m and v are allocated here: the last 8 bytes/param
            return CappedStep(count, cap_mb, True)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            return CappedStep(layers * (WIDTH * WIDTH + WIDTH), cap_mb, False, str(exc).splitlines()[0][:160])
