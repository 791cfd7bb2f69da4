"""The scheduler's workers as of now: fetched and returned in one step.

``client.scheduler_info()["workers"]`` is not that. It fetches the scheduler's identity into the
client's cache and then returns the cache, which the client's own periodic refresh (every
``distributed.client.scheduler-info-interval``, 2 s, fetched *without* per-worker entries) may have
replaced in between: then it lists no workers at all. A rank looked lost that way (``RankLost``
after 1.8 s in a CI run, 3.6 s in a soak run, while both workers were fine), and a run could fail
with "the cluster has no workers yet". With the interval at 5 ms, 70 of 2,000 calls came back
empty here (distributed 2026.8; tests/test_ranks_events.py holds the fetch below to zero). The
periodic poll was cut down to cluster totals for scheduler scalability (distributed PR #9045,
kept so by PR #9308); no upstream issue on the shared cache was found as of 2026-12.
"""

from __future__ import annotations

from typing import Any

__all__ = ["workers_now"]


def workers_now(client: Any) -> dict[str, dict]:
    """Worker address -> the scheduler's info on it (name, nthreads, memory_limit, resources, status)."""
    if getattr(client, "asynchronous", False):
        raise TypeError("workers_now needs a synchronous Client; in async code use "
                        "`await client.scheduler.identity(n_workers=-1)`")
    info = client.sync(client.scheduler.identity, n_workers=-1)
    return dict(info.get("workers", {}))
