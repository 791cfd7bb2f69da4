"""The sparsity sweep on Dask: every (method, amount) point pruned and evaluated on a worker.

Each finished point is emitted as a ``prune`` event (to the Dask topic on the worker, so a
``LivePlot`` attached to the client draws it as it lands) and gathered back in order.
"""

from __future__ import annotations

import copy
import io
from typing import Any, Callable, Sequence

import torch
from distributed import as_completed
from torch import nn

from labkit.core.events import emit

from .evaluate import METHODS, CurvePoint, evaluate_point


def _model_bytes(model: nn.Module) -> bytes:
    """A CPU copy of the whole model, serialised once on the client; the caller's model stays where
    it is (``model.cpu()`` would move a GPU model, and the caller's training or timing with it)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().cpu(), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    memo.update({id(b): b.detach().cpu() for b in model.buffers()})
    cpu_copy = copy.deepcopy(model, memo)  # parameters and buffers come from memo: never copied on the GPU
    buf = io.BytesIO()
    torch.save(cpu_copy, buf)
    return buf.getvalue()


def _point_task(blob: bytes, val: torch.Tensor, method: str, amount: float, importance: str,
                threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    # every task rebuilds its own model: tasks sharing one object on a worker (threads, or one
    # after another) must never see each other's pruning
    model = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    point = evaluate_point(model, method, amount, val, importance)
    emit("prune", **point.as_dict())
    return point.as_dict()


def sweep(client: Any, model: nn.Module, val: torch.Tensor, amounts: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
          methods: Sequence[str] = ("unstructured", "structured"), importance: str = "magnitude",
          sink: Callable[[dict], None] | None = None, threads: int | None = None) -> list[CurvePoint]:
    """Evaluate every (method, amount) in parallel on the client's workers; results in input order.

    ``sink`` (e.g. a ``LivePlot``) also gets each point here as it completes, for front ends that
    do not follow the Dask topic. ``threads`` sets torch's thread count on each worker process
    (leave it None for in-process thread workers: it is a per-process setting).
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method={m!r}: choose from {', '.join(METHODS)}")
    if not amounts:
        raise ValueError("give at least one amount, e.g. amounts=(0.0, 0.5)")
    model_f, val_f = client.scatter([_model_bytes(model), val], broadcast=True)
    jobs = [(m, float(a)) for m in methods for a in amounts]
    futures = [client.submit(_point_task, model_f, val_f, m, a, importance, threads, pure=False) for m, a in jobs]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[dict | None] = [None] * len(futures)
    for fut in as_completed(futures):
        row = fut.result()
        results[index[fut.key]] = row
        if sink is not None:
            emit("prune", sink, **row)
    return [CurvePoint(**r) for r in results if r is not None]
