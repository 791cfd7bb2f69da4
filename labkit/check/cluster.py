"""Checkers for notebook 01_cluster: pinning a task to a GPU worker with Dask resources.

``check("gpu_task", submit_on_a_gpu, cluster=cluster)`` returns a :class:`~labkit.check.Result`;
a wrong answer never raises, so the notebook runs on headless.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from labkit.check import Result, attempt, checker_book, correct, defined_function, mistake, solution_book
from labkit.cluster.gpu_slice import parse_ids


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


check = checker_book("cluster", {"gpu_task": _check_gpu_task})
