"""Run a function as torch.distributed ranks, one per Dask worker.

``run_ranks(client, fn)`` pins rank r to worker r, picks rank 0's host as the master with a free
port chosen *there* (never a fixed port, so two runs at once don't collide), chooses nccl when
every rank has its own real GPU and gloo otherwise, and always destroys the process group.

Failures come back as exceptions that name the rank: ``RankError`` (with that rank's traceback)
when a rank raised, ``RankLost`` when its worker disappeared (process killed, Slurm job
cancelled). The other ranks are ended too, so the cluster stays usable for the next run.
"""

from __future__ import annotations

import datetime
import socket
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from distributed import Event, wait
from distributed.comm import get_address_host

from labkit.core.workers import workers_now


@dataclass(frozen=True)
class RankContext:
    """What a rank knows about itself, handed to the function as its first argument."""

    rank: int
    world_size: int
    backend: str
    device: str
    local_rank: int
    worker: str
    master: str
    run_id: str

    def aborted(self) -> bool:
        """True when another rank failed or was lost; check it between steps to stop early."""
        try:
            return Event(f"labkit-abort-{self.run_id}").is_set()
        except Exception:
            return False


class RankError(RuntimeError):
    """A rank raised; ``.rank``, ``.worker`` and ``.remote_traceback`` say where and what, and
    ``.still_waiting`` which ranks were left waiting for it in a collective (until their timeout)."""

    def __init__(self, rank: int, worker: str, remote_traceback: str, still_waiting: Sequence[int] = (),
                 timeout: float = 0.0) -> None:
        last = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else "unknown error"
        waiting = (f"Rank(s) {', '.join(map(str, still_waiting))} still wait in a collective for rank {rank} and "
                   f"give up within the run's timeout ({timeout:g} s); a new run on their workers starts after "
                   "that (or restart the workers: client.restart()).\n" if still_waiting else "")
        super().__init__(
            f"rank {rank} on worker {worker} failed: {last}\n{waiting}"
            f"--- traceback of rank {rank} ---\n{remote_traceback}"
        )
        self.rank, self.worker, self.remote_traceback = rank, worker, remote_traceback
        self.still_waiting = list(still_waiting)


class RankLost(RuntimeError):
    """A rank's worker disappeared mid-run (killed process, cancelled job, node failure)."""

    def __init__(self, rank: int, worker: str, seconds: float, host: str = "") -> None:
        on = f" on node {host}" if host else ""
        super().__init__(
            f"rank {rank} was lost: its worker {worker}{on} left the cluster after {seconds:.1f} s "
            f"(process killed, Slurm job ended or node down). Scale the cluster back up and resume from the "
            f"last checkpoint (e.g. train_distributed(..., resume=True))."
        )
        self.rank, self.worker, self.host = rank, worker, host


class _RankFailed(Exception):
    """Raised inside a rank task; carries the rank, worker, time and formatted traceback."""

    def __init__(self, rank: int, worker: str, when: float, tb: str) -> None:
        super().__init__(rank, worker, when, tb)
        self.rank, self.worker, self.when, self.tb = rank, worker, when, tb


@dataclass(frozen=True)
class RankProbe:
    """What a worker can offer a rank: its host and GPUs."""

    worker: str
    host: str
    cuda: bool
    gpu_ids: tuple[str, ...]


def _probe_worker(dask_worker=None) -> dict[str, Any]:
    """Runs on a worker: host, whether CUDA works, and identities of the visible GPUs."""
    host = socket.gethostname()
    gpu_ids: list[str] = []
    cuda = False
    try:
        import torch  # lazy: torch (~2 s import) on the worker only; run_ranks, the client side, needs none

        cuda = torch.cuda.is_available()
        if cuda:
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpu_ids.append(str(getattr(props, "uuid", f"{host}:{i}")))
    except Exception:
        cuda = False
    # a rank's task destroys its process group as it ends: one still up is a rank of an earlier run,
    # left waiting in a collective for a rank that failed (until its timeout)
    group_up = False
    try:
        import torch.distributed as dist  # lazy: as torch above, on the worker only

        group_up = dist.is_available() and dist.is_initialized()
    except Exception:
        pass
    return {"host": host, "cuda": cuda, "gpu_ids": gpu_ids, "group_up": group_up}


def local_ranks(probes: Sequence[RankProbe]) -> list[int]:
    """Each rank's index among the ranks on its host, in rank order (rank r runs on ``probes[r]``)."""
    counts: dict[str, int] = {}
    out = []
    for p in probes:
        out.append(counts.get(p.host, 0))
        counts[p.host] = out[-1] + 1
    return out


def rank_gpu(probe: RankProbe, local_rank: int) -> str | None:
    """The GPU a rank will use: ``cuda:{local_rank % visible GPUs}`` of its worker, as ``_rank_task``
    sets it; None without CUDA."""
    if not (probe.cuda and probe.gpu_ids):
        return None
    return probe.gpu_ids[local_rank % len(probe.gpu_ids)]


def choose_backend(probes: Sequence[RankProbe], requested: str = "auto") -> str:
    """nccl when every rank has a GPU and no two ranks use the same one, else gloo; or what was asked for.

    Compares the GPU each rank will actually use (see ``rank_gpu``), so workers that each see several
    GPUs count as distinct only when their ranks land on different ones."""
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', not {requested!r}")
    used = [rank_gpu(p, lr) for p, lr in zip(probes, local_ranks(probes))]
    distinct = all(u is not None for u in used) and len(set(used)) == len(used)
    if requested == "nccl" and not distinct:
        raise ValueError("backend='nccl' needs one distinct GPU per rank; these workers have none or share one. "
                         "Use backend='auto' (gloo) or start workers with one GPU each.")
    if requested != "auto":
        return requested
    return "nccl" if distinct else "gloo"


def _free_port(dask_worker=None) -> int:
    """Runs on rank 0's worker: a TCP port free on that host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rank_task(fn: Callable, ctx_fields: dict[str, Any], init_method: str, timeout: float,
               args: tuple, kwargs: dict) -> Any:
    """Runs on the worker: set up the process group, call fn, always tear down."""
    import torch  # lazy: torch (~2 s import) on the worker only; run_ranks, the client side, needs none
    import torch.distributed as dist  # lazy: as torch above

    ctx_fields = dict(ctx_fields)
    backend = ctx_fields["backend"]
    if backend == "nccl" or (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        # the same GPU that rank_gpu() assumed when choose_backend() compared the ranks' GPUs
        local = ctx_fields["local_rank"] % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(local)
        ctx_fields["device"] = f"cuda:{local}"
    else:
        ctx_fields["device"] = "cpu"
    ctx = RankContext(**ctx_fields)
    group = None
    failed = None
    try:
        if dist.is_initialized():  # left over from a run that could not end: clear it
            dist.destroy_process_group()
        dist.init_process_group(
            backend, init_method=init_method, rank=ctx.rank, world_size=ctx.world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        group = dist.group.WORLD
        return fn(ctx, *args, **kwargs)
    except BaseException:
        # its text only: the exception's frames would keep this rank's process group alive (below)
        failed = _RankFailed(ctx.rank, ctx.worker, time.time(), traceback.format_exc())
    finally:
        try:
            # only our own group: a rank given up on (after a lost peer) may end while the next
            # run on this worker already has its group up
            if group is not None and dist.is_initialized() and dist.group.WORLD is group:
                dist.destroy_process_group()
        except Exception:
            pass
        # the last reference: the group is freed and its connections close, so a peer waiting in a
        # collective for this rank fails at once instead of after the timeout (a DDP or FSDP module
        # keeps the group alive elsewhere, so a failure inside training still waits for it)
        group = None
    raise failed


def select_workers(client, workers: int | Sequence[str] | None) -> list[str]:
    """The worker addresses to use, in rank order (sorted, so runs are repeatable)."""
    available = sorted(workers_now(client))
    if not available:
        raise RuntimeError("the cluster has no workers yet: start or scale it first (e.g. handle.scale(2))")
    if workers is None:
        return available
    if isinstance(workers, int):
        if workers < 1 or workers > len(available):
            raise ValueError(f"asked for {workers} ranks but the cluster has {len(available)} workers; "
                             f"scale the cluster or ask for fewer")
        return available[:workers]
    missing = [w for w in workers if w not in available]
    if missing:
        raise ValueError(f"workers not in the cluster: {missing}; available: {available}")
    return list(workers)


def run_ranks(
    client,
    fn: Callable[..., Any],
    *args: Any,
    workers: int | Sequence[str] | None = None,
    backend: str = "auto",
    timeout: float = 120.0,
    poll: float = 0.5,
    lost_grace: float = 3.0,
    survivor_grace: float = 10.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(ctx, *args, **kwargs)`` as one torch.distributed rank per worker; results in rank order.

    ``timeout`` bounds each collective. After a rank raised, the others get ``lost_grace`` seconds to
    show whether a worker was lost, and as long again to end, before ``RankError`` (naming any still
    waiting in a collective) is raised; once a worker is known lost, they get at most
    ``min(timeout, survivor_grace)`` seconds before ``RankLost``. Either comes promptly whatever ``timeout`` is.
    """
    addrs = select_workers(client, workers)
    probed = client.run(_probe_worker, workers=addrs)
    probes = [RankProbe(a, probed[a]["host"], probed[a]["cuda"], tuple(probed[a]["gpu_ids"])) for a in addrs]
    held = [a for a in addrs if probed[a].get("group_up")]
    if held:
        warnings.warn(f"worker(s) {', '.join(held)} still run a rank of an earlier run, waiting in a collective for "
                      "a rank that failed; this run's ranks start there when it gives up (within that run's "
                      "timeout). Fix: wait, or restart those workers (client.restart())", RuntimeWarning,
                      stacklevel=2)
    chosen = choose_backend(probes, backend)
    port = client.run(_free_port, workers=[addrs[0]])[addrs[0]]
    master_host = get_address_host(addrs[0])
    init_method = f"tcp://{master_host}:{port}"
    run_id = uuid.uuid4().hex[:12]
    abort = Event(f"labkit-abort-{run_id}", client=client)
    futures = []
    for rank, (addr, local_rank) in enumerate(zip(addrs, local_ranks(probes))):
        fields = dict(rank=rank, world_size=len(addrs), backend=chosen, device="cpu", local_rank=local_rank,
                      worker=addr, master=f"{master_host}:{port}", run_id=run_id)
        futures.append(client.submit(
            _rank_task, fn, fields, init_method, timeout, args, kwargs,
            workers=[addr], allow_other_workers=False, pure=False, retries=0,
            key=f"labkit-rank-{rank}-{run_id}",
        ))
    start = time.monotonic()
    try:
        while True:
            done = [f for f in futures if f.done()]
            if any(f.status == "error" for f in done) or len(done) == len(futures):
                break
            alive = set(workers_now(client))
            lost = [r for r, a in enumerate(addrs) if a not in alive and not futures[r].done()]
            if lost:
                abort.set()
                _drain([f for r, f in enumerate(futures) if r not in lost], min(timeout, survivor_grace))
                raise RankLost(lost[0], addrs[lost[0]], time.monotonic() - start, probes[lost[0]].host)
            try:
                wait(futures, timeout=poll, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
        failures = []
        if any(f.status == "error" for f in futures):
            abort.set()
            # a peer's death shows first as a connection error on the survivors: give the
            # scheduler a moment to notice the lost worker, and report the cause, not the symptom
            lost = _lost_ranks(client, addrs, grace=lost_grace)
            if lost:
                _drain([f for r, f in enumerate(futures) if r not in lost], min(timeout, survivor_grace))
                raise RankLost(lost[0], addrs[lost[0]], time.monotonic() - start, probes[lost[0]].host)
            # the others end when their collectives fail (at once where the failed rank's group
            # closed) or time out: report after a moment for their errors, not after the whole timeout
            _drain(futures, min(timeout, lost_grace))
            for f in futures:
                if f.status == "error":
                    exc = f.exception()
                    if isinstance(exc, _RankFailed):
                        failures.append((exc.when, exc.rank, exc.worker, exc.tb))
                    else:
                        failures.append((float("inf"), futures.index(f), addrs[futures.index(f)], repr(exc)))
        if failures:
            _, rank, worker, tb = min(failures)
            raise RankError(rank, worker, tb, [r for r, f in enumerate(futures) if not f.done()], timeout)
        return [f.result() for f in futures]
    finally:
        for f in futures:
            if not f.done():
                f.cancel()
        try:
            abort.clear()
        except Exception:
            pass


def _lost_ranks(client, addrs: Sequence[str], grace: float) -> list[int]:
    """Ranks whose worker left the cluster, watching for up to ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = set(workers_now(client))
        lost = [r for r, a in enumerate(addrs) if a not in alive]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.2)


def _drain(futures, timeout: float) -> None:
    """Give the other ranks up to ``timeout`` seconds to end (their collectives fail or time out)."""
    try:
        wait(futures, timeout=timeout)
    except Exception:
        pass
