"""Where the time of a training step goes: ``torch.profiler`` on chosen ranks and steps.

``TrainConfig(profile_steps=(3, 5), profile_ranks=(0,))`` profiles optimizer steps 3 to 5 (counted
from 1, as the ``train`` events count them) on rank 0. ``StepProfiler`` starts ``torch.profiler``
when the first of them begins and stops it when the last ends, then:

- writes the trace as Chrome / Perfetto JSON (``prof.export_chrome_trace``), one file per rank,
  ``rank<r>-steps<a>-<b>.json`` in ``TrainConfig.profile_dir``; open it in https://ui.perfetto.dev;
- computes a **breakdown** per profiled step, in ms: ``data``, ``forward``, ``backward`` and
  ``optimizer`` from the ``record_function`` ranges ``labkit.train.train_step`` opens (``phase``),
  and ``communication`` from the collectives the profiler records (``gloo:all_reduce``,
  ``gloo:all_gather``, ``nccl:...``; gloo runs FSDP's reduce-scatter as an all-reduce). Under DDP
  the gradient all-reduce runs in the background *during* backward, so communication overlaps
  backward (``communication_in_backward`` says how much) and is not a slice of the step to add up;
- emits a ``profile`` event with the trace's path and the breakdown rows (``ProfileView`` draws it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from labkit.core.events import emit

PHASES = ("data", "forward", "backward", "optimizer")
COMMUNICATION = "communication"
PREFIX = "labkit:"
STEP = PREFIX + "step "
# the collectives themselves, as the backends' worker threads record them (not c10d's enqueue ops)
COMM_PREFIXES = ("gloo:", "nccl:", "ncclKernel", "ncclDevKernel")


def phase(name: str) -> contextlib.AbstractContextManager:
    """A profiler range ``labkit:<name>`` while a profiler runs; nothing (no cost) otherwise."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return record_function(PREFIX + name)


def check_profile(ranks: Sequence[int], steps: tuple[int, int] | None, world_size: int) -> None:
    """Raise ``ValueError`` naming the fix when a profiled rank is not in a world of ``world_size``."""
    if steps is None:
        return
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ValueError(f"profile_ranks={tuple(ranks)} names rank {bad[0]}, but this run has {world_size} "
                         f"rank(s), 0..{world_size - 1}: choose ranks in that range or run on more workers")


def trace_name(rank: int, steps: tuple[int, int]) -> str:
    """The trace file of one rank: ``rank0-steps3-5.json``."""
    return f"rank{rank}-steps{steps[0]}-{steps[1]}.json"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals in microseconds, in ms."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def _clip(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    """The parts of ``intervals`` inside ``[lo, hi]``."""
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def breakdown(events: Sequence[Any]) -> list[dict[str, float]]:
    """Per step (a ``labkit:step N`` range): ms of each phase, of communication (the union of the
    collectives' time, on whatever thread), of communication inside backward, and of the rest.
    ``events`` are ``torch.profiler`` ``FunctionEvent``s (``prof.events()``), or anything with
    ``name`` and ``time_range.start`` / ``.end`` in microseconds."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        name = e.name
        key = name if name.startswith(PREFIX) else COMMUNICATION if name.startswith(COMM_PREFIXES) else None
        if key is not None:
            spans.setdefault(key, []).append((e.time_range.start, e.time_range.end))
    rows = []
    for name in spans:
        if not name.startswith(STEP):
            continue
        lo, hi = spans[name][0]
        row: dict[str, float] = {"step": int(name[len(STEP):]), "step_ms": (hi - lo) / 1e3}
        for p in PHASES:
            row[p + "_ms"] = _union_ms(_clip(spans.get(PREFIX + p, []), lo, hi))
        comm = _clip(spans.get(COMMUNICATION, []), lo, hi)
        row["communication_ms"] = _union_ms(comm)
        row["communication_in_backward_ms"] = sum(
            _union_ms(_clip(comm, a, b)) for a, b in _clip(spans.get(PREFIX + "backward", []), lo, hi))
        row["other_ms"] = max(0.0, row["step_ms"] - sum(row[p + "_ms"] for p in PHASES))
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


class StepProfiler:
    """Profiles steps ``steps[0]..steps[1]`` (from 1) of one rank when it is in ``ranks``; wrap each
    step in ``with profiler.step(n):``. After the last, ``result`` holds the trace path and breakdown."""

    def __init__(self, ranks: Sequence[int], steps: tuple[int, int] | None, folder: str | Path, rank: int,
                 device: torch.device, sink: Callable | None = None) -> None:
        self.active = steps is not None and rank in ranks
        self.steps, self.folder, self.rank, self.device, self.sink = steps, Path(folder), rank, device, sink
        self.prof: Any = None
        self.result: dict[str, Any] | None = None

    @contextlib.contextmanager
    def step(self, n: int) -> Iterator[None]:
        """Run optimizer step ``n`` (from 1), profiled when it is one of the chosen steps."""
        if not self.active or not self.steps[0] <= n <= self.steps[1]:
            yield
            return
        if self.prof is None:
            cuda = self.device.type == "cuda"
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.start()
        with record_function(f"{STEP}{n}"):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's kernels inside its range
        if n == self.steps[1]:
            self._finish()

    def _finish(self) -> None:
        """Stop the profiler, write the trace, compute the breakdown, emit the ``profile`` event."""
        self.prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / trace_name(self.rank, self.steps)
        self.prof.export_chrome_trace(str(path))
        rows = breakdown(self.prof.events())
        self.prof = None
        self.result = {"rank": self.rank, "steps": list(self.steps), "trace": str(path), "breakdown": rows}
        emit("profile", self.sink, **self.result)
