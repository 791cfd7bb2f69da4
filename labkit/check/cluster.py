"""Checkers for notebook 01_cluster: which GPUs each worker of a Slurm job sees, how to lay out workers
on GPU nodes, and pinning a task to a GPU worker with Dask resources.

``check("worker_devices", fn)`` and ``check("job_layout", fn)`` try the learner's function on fresh random
job and node shapes (``seed=`` repeats a draw); ``check("gpu_task", submit_on_a_gpu, cluster=cluster)``
runs on a live cluster. Each returns a :class:`~labkit.check.Result`; a wrong answer never raises, so
the notebook runs on headless.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, Callable

from labkit.check import Result, attempt, checker_book, correct, defined_function, mistake, solution_book
from labkit.cluster.gpu_slice import parse_ids, slice_gpus


def _probe() -> str:
    """Runs on a worker: the GPU ids it may use."""
    return ",".join(parse_ids(os.environ.get("CUDA_VISIBLE_DEVICES")))


class _RecordingClient:
    """Forwards to a real Client and remembers the resources each submit/map asked for."""

    def __init__(self, client: Any):
        self._client = client
        self.asked: list[dict] = []

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(dict(kwargs.get("resources") or {}))
        return self._client.submit(*args, **kwargs)

    def map(self, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(dict(kwargs.get("resources") or {}))
        return self._client.map(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


SOLUTIONS: dict[str, str] = {
    "worker_devices": '''\
def worker_devices(job_gpus, workers_per_job, gpus_per_worker):
    """CUDA_VISIBLE_DEVICES of each worker process of one Slurm job, from the job's own list."""
    ids = [i for i in job_gpus.split(",") if i]          # Slurm's ids for this job: not always 0, 1, ...
    if workers_per_job <= 1:
        return [",".join(ids)]                            # one worker keeps the job's whole list
    g = gpus_per_worker
    return [",".join(ids[i * g:(i + 1) * g]) for i in range(workers_per_job)]  # consecutive slices
''',
    "job_layout": '''\
def job_layout(n_workers, gpus_per_node):
    """(jobs, workers_per_job) for n_workers of one GPU each: every job on one node, as few jobs as possible."""
    per_job = max(k for k in range(1, min(n_workers, gpus_per_node) + 1) if n_workers % k == 0)
    return n_workers // per_job, per_job
''',
    "gpu_task": '''\
def submit_on_a_gpu(client, fn):
    """Submit fn so that it runs on a worker that owns a GPU; return the future."""
    return client.submit(fn, resources={"GPU": 1}, pure=False)  # only workers with a GPU resource qualify
''',
}


solution = solution_book("cluster", SOLUTIONS)
show_solution = solution  # the older name, kept for notebooks that call it


def solved(name: str) -> Callable[..., Any]:
    """The reference solution as a function (what ``solution(name)`` defines)."""
    return defined_function(solution(name))


def _check_gpu_task(submit_on_a_gpu: Callable[[Any, Callable[[], Any]], Any], cluster: Any,
                    timeout: float = 60) -> Result:
    """Call ``submit_on_a_gpu(client, fn)`` with a probe on ``cluster`` (a labkit cluster handle) and check
    the task was pinned to a GPU worker."""
    client = _RecordingClient(cluster.client)
    fut = attempt(submit_on_a_gpu, client, _probe)
    if not hasattr(fut, "key") or not hasattr(fut, "result"):
        return mistake("not_a_future", f"submit_on_a_gpu returned {type(fut).__name__}, not a Future: "
                                       "return client.submit(...)")
    wanted = client.asked[-1] if client.asked else {}
    if wanted.get("GPU", 0) < 1:
        return mistake("no_resources", f"the task asked for resources {wanted or 'none'}, so Dask may run it on "
                                       "any worker, GPU or not; pass resources={'GPU': 1} to client.submit")
    offered = [dict(info.get("resources") or {}) for info in cluster.workers().values()]
    if not any(all(res.get(k, 0) >= v for k, v in wanted.items()) for res in offered):
        fut.cancel()
        most = {k: max((res.get(k, 0) for res in offered), default=0) for k in wanted}
        return mistake("too_much", f"the task asked for resources {wanted}, but no worker offers that much (the "
                                   f"most any worker has: {most}); Dask would keep it waiting for ever. Ask for what "
                                   "one worker has: resources={'GPU': 1}")
    try:
        seen = fut.result(timeout=timeout)
    except TimeoutError:
        fut.cancel()
        return mistake("timeout", f"the task (resources {wanted}) did not finish within {timeout:.0f} s although "
                                  "a worker offers those resources: the GPU workers may be busy with other tasks "
                                  "(see the dashboard) or gone; check cluster.gpu_map() and run the cell again")
    gpu_ids = {",".join(v) for v in cluster.gpu_map().values() if v}
    if seen not in gpu_ids:
        return mistake("not_on_a_gpu", f"the task saw CUDA_VISIBLE_DEVICES={seen!r}, not one of the GPU "
                                       f"workers' {sorted(gpu_ids)}; did your function call fn on the worker "
                                       "(client.submit(fn, ...), not fn())?")
    return correct(f"the task ran on a worker that owns GPU {seen} (resources={wanted})")


def _rng(seed: int | None) -> tuple[random.Random, int]:
    """A fresh generator (a new seed when None) and its seed, which messages quote so a run can be repeated."""
    seed = random.randrange(2**31) if seed is None else int(seed)
    return random.Random(seed), seed


def _as_ids(item: Any) -> str:
    """One worker's answer as a CUDA_VISIBLE_DEVICES string: ``"3,5"``, ``["3", "5"]`` or ``[3, 5]``."""
    return ",".join(parse_ids(item if isinstance(item, str) else [str(i) for i in item]))


def _check_worker_devices(fn: Callable[[str, int, int], Any], trials: int = 5, seed: int | None = None) -> Result:
    """``fn(job_gpus, workers_per_job, gpus_per_worker)`` returns each worker process's CUDA_VISIBLE_DEVICES,
    as labkit's GPU slice sets them (labkit.cluster.gpu_slice), on random jobs of a shared 8-GPU node."""
    rng, seed = _rng(seed)
    # first a job of several multi-GPU workers (where every mistake shows), then fresh shapes of all kinds
    shapes = [rng.choice([(2, 2), (3, 2), (2, 3)])]
    shapes += [rng.choice([(1, 1), (1, 2), (1, 4), (2, 1), (4, 1), (2, 2), (8, 1), (2, 4), (4, 2)])
               for _ in range(trials - 1)]
    for workers, per in shapes:
        need = workers * per
        ids = sorted(rng.sample(range(8), need))
        if ids == list(range(need)):  # a list that does not start at 0: other jobs hold the first GPUs
            ids = sorted(rng.sample(range(8 - need, 8), need)) if need < 8 else ids
        job = ",".join(map(str, ids))
        got = attempt(fn, job, workers, per, on=f"job_gpus={job!r}, workers_per_job={workers}, gpus_per_worker={per}")
        want = [",".join(slice_gpus(job, i, per, workers)) for i in range(workers)]
        where = f"job_gpus={job!r}, workers_per_job={workers}, gpus_per_worker={per}"
        if isinstance(got, (str, bytes)) or not hasattr(got, "__len__"):
            return mistake("not_a_list", f"{where}: you returned {got!r}; return a list with one "
                                         f"CUDA_VISIBLE_DEVICES string per worker process (seed {seed})", seed=seed)
        if len(got) != workers:
            return mistake("wrong_count", f"{where}: you returned {len(got)} entries for {workers} worker process(es): "
                                          f"one entry per worker of the job (seed {seed})", seed=seed)
        try:
            mine = [_as_ids(item) for item in got]
        except TypeError:
            return mistake("not_a_list", f"{where}: the entries of {got!r} are not GPU id lists (seed {seed})", seed=seed)
        if mine == want:
            continue
        local = [",".join(str(k) for k in range(per))] * workers
        from_zero = [",".join(str(i * per + k) for k in range(per)) for i in range(workers)]
        if workers > 1 and mine == [job] * workers:
            problem, hint = "whole_list", ("every worker got the job's whole list, so they would all share (and fight "
                                           "over) the same GPUs: each process keeps its own part")
        elif mine == from_zero:
            problem, hint = "from_zero", ("you counted from GPU 0, but Slurm gave this job other GPUs of the node "
                                          "(the others may belong to other jobs): slice the job's own list")
        elif mine == local and local != want:
            problem, hint = "local_ids", ("those are the ids torch uses inside a worker (cuda:0, cuda:1 ...); "
                                          "CUDA_VISIBLE_DEVICES holds the node's ids from Slurm's list")
        elif workers > 1 and mine == [",".join(map(str, ids[i::workers])) for i in range(workers)]:
            problem, hint = "interleaved", ("you dealt the ids out like cards; labkit gives process i a run of "
                                            "consecutive entries of the list")
        else:
            problem, hint = "wrong_value", "process i keeps gpus_per_worker consecutive entries of the job's list"
        return mistake(problem, f"{where}: you returned {mine}, but the workers see {want}: {hint} (seed {seed})",
                       seed=seed)
    return correct(f"right for {trials} random jobs on a shared 8-GPU node (seed {seed})", seed=seed)


def _job_counts(n_workers: int, gpus_per_node: int) -> tuple[int, int]:
    per_job = max(k for k in range(1, min(n_workers, gpus_per_node) + 1) if n_workers % k == 0)
    return n_workers // per_job, per_job


def _check_job_layout(fn: Callable[[int, int], Any], trials: int = 6, seed: int | None = None) -> Result:
    """``fn(n_workers, gpus_per_node)`` returns ``(jobs, workers_per_job)`` for workers of one GPU each:
    each job (``--gres=gpu:workers_per_job``) fits one node, all jobs alike, as few jobs as possible."""
    rng, seed = _rng(seed)
    shapes = []
    for _ in range(trials):
        g = rng.choice([2, 4, 8])
        shapes.append((rng.choice([rng.randint(1, g), g * rng.randint(2, 4)]), g))
    forced = [(rng.choice([4, 8]) * rng.randint(2, 3), rng.choice([4, 8])),  # several full nodes
              (rng.choice([2, 3]), rng.choice([4, 8])),                      # less than one node
              rng.choice([(6, 4), (9, 4), (10, 8), (12, 8)])]                # no whole number of full nodes
    for i, shape in zip(rng.sample(range(trials), len(forced)), forced):
        shapes[i] = shape
    for n, g in shapes:
        where = f"{n} workers of 1 GPU on nodes of {g} GPUs"
        got = attempt(fn, n, g, on=f"n_workers={n}, gpus_per_node={g}")
        try:
            jobs, per_job = (int(x) for x in got)
        except (TypeError, ValueError):
            return mistake("not_a_pair", f"{where}: you returned {got!r}; return (jobs, workers_per_job) "
                                         f"(seed {seed})", seed=seed)
        want = _job_counts(n, g)
        if (jobs, per_job) == want:
            continue
        if per_job < 1 or jobs < 1:
            problem, hint = "wrong_value", "both numbers are at least 1"
        elif jobs * per_job != n:
            problem, hint = "wrong_total", (f"{jobs} jobs x {per_job} workers make {jobs * per_job} workers, not {n}: "
                                            "all jobs run the same number of workers")
        elif per_job > g:
            problem, hint = "too_big_for_a_node", (
                f"one job of {per_job} workers asks --gres=gpu:{per_job}, and --gres counts GPUs per node: no node "
                f"has {per_job}, so labkit's preflight refuses it (Slurm would refuse or keep it pending)")
        else:
            problem, hint = "not_packed", (f"{jobs} jobs work, but fewer do: a job can carry up to {g} workers on one "
                                           "node, where they talk over NVLink instead of the network")
        return mistake(problem, f"{where}: you returned (jobs={jobs}, workers_per_job={per_job}); {hint} "
                                f"(seed {seed})", seed=seed)
    n, g = shapes[-1]
    jobs, per_job = _job_counts(n, g)
    return correct(f"right for {trials} random shapes (seed {seed}); e.g. {n} workers on {g}-GPU nodes: "
                   f"{jobs} job(s) of --gres=gpu:{per_job}", seed=seed)


check = checker_book("cluster", {"worker_devices": _check_worker_devices, "job_layout": _check_job_layout,
                                 "gpu_task": _check_gpu_task})
