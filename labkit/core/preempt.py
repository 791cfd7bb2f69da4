"""Slurm's warning before walltime (or preemption), caught in the worker process as a flag.

A Slurm profile's ``signal: "USR1@90"`` makes each worker job ask ``#SBATCH --signal=B:USR1@90``:
Slurm sends SIGUSR1 to the job's batch shell 90 s before the time limit. The job script runs
the Dask worker command in the background and traps the signal, passing it on to that process (the
one that runs the nannies); this module, given as ``--preload-nanny``, forwards it from there to
each nanny's worker process (one still starting gets it once its handler is in place), and, given as
``--preload`` (or installed by ``install`` through ``client.run``), sets a flag in the worker. The
handlers do no other work: the training loop reads the flag (``requested``) at its sync points,
the ranks agree, save a checkpoint and stop (``labkit.train``).

``signal.signal`` works only in a process's main thread: ``dask_setup`` and ``client.run`` run in
the worker's event loop, which is that thread in a worker process; elsewhere ``install`` does nothing.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
_flag = threading.Event()
_received: list[int] = []      # the signal numbers caught, newest last
_nannies: list[Any] = []       # this process's nannies (when preloaded into them)
_pending: queue.SimpleQueue = queue.SimpleQueue()  # (nanny, signum): warnings for workers not up yet


def _on_signal(signum: int, frame: Any) -> None:
    """In a worker: remember that the warning came (nothing else in a handler)."""
    _received.append(signum)
    _flag.set()


def _worker_state(nanny: Any) -> tuple[str, int | None]:
    """A nanny's worker process: its status name (``running`` once its preloads ran) and pid."""
    process = getattr(nanny, "process", None)
    status = getattr(getattr(process, "status", None), "name", "")
    return status, getattr(getattr(process, "process", None), "pid", None)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass  # it ended meanwhile


def _pass_on(nanny: Any, signum: int, patience: float = 600.0) -> None:
    """Send ``signum`` to the nanny's worker once it is up (its handler installed), waiting while it starts.

    A worker process still starting has no handler yet: SIGUSR1's default action would end it, and
    the nanny would report "failed to start worker process" (seen on a loaded CI machine, where a
    one-minute walltime's warning came while a worker was being spawned)."""
    deadline = time.monotonic() + patience
    while True:
        status, pid = _worker_state(nanny)
        if status == "running" and pid:
            _kill(pid, signum)
            return
        nanny_status = getattr(getattr(nanny, "status", None), "name", "")
        if (status not in ("init", "starting", "") or nanny_status in ("closing", "closed", "failed")
                or time.monotonic() > deadline):
            return  # stopped, failed or closing: no worker to warn (a restarted one reads the job's marker)
        time.sleep(0.05)


def _hold_until_up(pending: queue.SimpleQueue) -> None:
    """The nannies' process's thread that delivers warnings to worker processes that were still starting."""
    while True:
        _pass_on(*pending.get())


def _forward(signum: int, frame: Any) -> None:
    """In the nannies' process: pass the warning on to each nanny's worker process, now if it is up,
    else through ``_pending`` as soon as it is (a handler must neither wait nor start a thread;
    ``SimpleQueue.put`` is reentrant, so safe here)."""
    for nanny in list(_nannies):
        status, pid = _worker_state(nanny)
        if status == "running" and pid:
            _kill(pid, signum)
        else:
            _pending.put((nanny, signum))


def install(signals: tuple[int, ...] = SIGNALS) -> int | None:
    """Catch ``signals`` in this (worker) process as the stop flag; its pid, or None off the main thread.

    Python lets only the main thread set handlers; a worker running in a thread (``LocalCluster(processes=False)``)
    is left as it is: the flag can still be set there with ``request()``, but no signal sets it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    for s in signals:
        signal.signal(s, _on_signal)
    if warned_before():  # the warning came before this process could catch it
        _on_signal(signals[0], None)
    return os.getpid()


def warned_before(env: dict[str, str] | None = None) -> bool:
    """Whether this Slurm job's batch shell already got the warning: its trap leaves a marker file
    (``labkit.cluster.upstream.FORWARD_SIGNALS``), since a worker still starting up cannot catch it."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    return bool(job) and os.path.exists(os.path.join(env.get("TMPDIR") or "/tmp", f"labkit-warned-{job}"))


def requested() -> bool:
    """Whether the warning signal arrived since the last ``clear``."""
    return _flag.is_set()


def request() -> None:
    """Set the flag as the signal would (tests, or a scheduler hook of a site's own)."""
    _flag.set()


def clear() -> None:
    """Forget the warning (once a run stopped on it)."""
    _flag.clear()
    _received.clear()


def _signal_self(signum: int) -> int:
    """On a worker: send ``signum`` to this process (as its job script would); its pid."""
    os.kill(os.getpid(), signum)
    return os.getpid()


def warn(client: Any, worker: str | None = None, signum: int = signal.SIGUSR1) -> str:
    """Send Slurm's warning by hand to one worker process (``worker``'s address; by default the last):
    the signal its job script passes on when ``--signal`` fires. Lessons and tests use it where no
    walltime runs out. The handler is installed on every worker first, so the signal sets the stop flag
    instead of ending the process (SIGUSR1's default). Returns the address signalled."""
    pids = client.run(install)
    if not pids:
        raise RuntimeError("no Dask workers to warn: start_cluster(...) first")
    target = worker or sorted(pids)[-1]
    if target not in pids:
        raise ValueError(f"no worker {target!r}; workers: {', '.join(sorted(pids))}")
    if pids[target] is None:
        raise RuntimeError(f"worker {target} runs in a thread of this process, so a signal cannot reach it alone; "
                           "set its flag with client.run(labkit.core.preempt.request) instead")
    client.run(_signal_self, signum, workers=[target])
    return target


def dask_setup(server: Any) -> None:
    """Dask preload hook: in a nanny, forward the warning to its worker; in a worker, catch it."""
    if type(server).__name__.endswith("Nanny"):
        if not _nannies:  # the first nanny of this process starts the thread that holds early warnings
            threading.Thread(target=_hold_until_up, args=(_pending,), daemon=True,
                             name="labkit-preempt-forward").start()
        _nannies.append(server)
        for s in SIGNALS:
            signal.signal(s, _forward)
    else:
        install()
