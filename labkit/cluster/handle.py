"""ClusterHandle: the one object a notebook holds: client, dashboard link, GPU map, scale, close."""

from __future__ import annotations

import atexit
import html
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distributed import Client

from ..config import Profile
from ..core.workers import workers_now
from . import slurmcli, upstream
from .errors import ClusterError, ClusterTimeout
from .gpu_slice import parse_ids
from .local import explain_failed_start
from .upstream import failed_to_start, signal_cause
from .session import Session, end_session
from .status import ClusterStatus, WorkerRow
from .tls import SessionCredentials

TERMINAL = slurmcli.TERMINAL_STATES  # the one set of ended-job states (kept under its old name)
_ERROR_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Exit): ")  # "ValueError: 'ib0' is not a valid ..."
_DEATH_LINE = re.compile(r"Worker process \d+ was killed by signal (\d+)")  # the nanny's line, logged at INFO


def job_log_tails(log_dir: Path, job_ids: list[str], lines: int = 15) -> str:
    """The last lines of each Slurm job's worker log (``*-<id>.err`` in ``log_dir``), led by what a reader
    needs and a tail may miss: the first error of a chained traceback, and a worker process a signal killed
    (the nanny says so only at INFO, far above the tail)."""
    out = []
    for jid in job_ids:
        for path in sorted(log_dir.glob(f"*-{jid}.err")):
            all_lines = path.read_text(errors="replace").splitlines()
            first = next((ln for ln in all_lines if _ERROR_LINE.match(ln)), None)
            head = f"first error in the log: {first.strip()}\n" if first and first not in all_lines[-lines:] else ""
            death = next((m for m in map(_DEATH_LINE.search, all_lines) if m), None)
            if death:
                head += f"a worker process was killed by {signal_cause(int(death.group(1)))}\n"
            out.append(f"--- worker log of job {jid} ({path.name}): {head}last lines:\n" + "\n".join(all_lines[-lines:]))
    return "\n".join(out)


def _visible_gpus() -> list[str]:
    """Runs on a worker: the GPU ids its CUDA_VISIBLE_DEVICES lets it use ([] for ``-1`` or unset)."""
    return parse_ids(os.environ.get("CUDA_VISIBLE_DEVICES"))


@dataclass
class ClusterHandle:
    """A running Dask cluster (local or Slurm) with its client; close it (or use ``with``) when done."""

    cluster: Any
    client: Client
    profile: Profile
    kind: str
    session: Session
    credentials: SessionCredentials | None = None
    gpus_per_worker: int = 0
    note: str = ""
    say: Callable[[str], None] = print
    target: int = 0
    _closed: bool = field(default=False, repr=False)
    _job_ids: set = field(default_factory=set, repr=False)
    _hosts: dict = field(default_factory=dict, repr=False)  # worker address -> hostname, asked once
    watchdog: Any = field(default=None, repr=False)  # the process that cancels our jobs if we are killed

    def __post_init__(self) -> None:
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ inspect
    @property
    def address(self) -> str:
        return self.cluster.scheduler_address

    @property
    def dashboard_port(self) -> int | None:
        server = getattr(getattr(self.cluster, "scheduler", None), "http_server", None)
        return getattr(server, "port", None)

    @property
    def dashboard_link(self) -> str:
        """The dashboard URL: through jupyter-server-proxy on JupyterHub, else on 127.0.0.1."""
        port = self.dashboard_port
        if port is None:
            return ""
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
        if prefix:
            return f"{prefix.rstrip('/')}/proxy/{port}/status"
        return f"http://127.0.0.1:{port}/status"

    def workers(self) -> dict[str, dict]:
        """Worker address -> scheduler's info (name, nthreads, memory_limit, resources, metrics)."""
        return workers_now(self.client)

    def gpu_map(self, by_node: bool = False) -> dict[str, Any]:
        """Worker name -> the GPU ids it sees (its CUDA_VISIBLE_DEVICES, as Slurm or labkit set it).

        ``by_node=True``: node (hostname) -> {worker name: GPU ids}, to see how jobs spread over nodes."""
        names = {addr: str(info.get("name", addr)) for addr, info in self.workers().items()}
        seen = self.client.run(_visible_gpus)
        flat = {names.get(addr, addr): ids for addr, ids in sorted(seen.items(), key=lambda kv: names.get(kv[0], kv[0]))}
        if not by_node:
            return flat
        hosts = self.hosts()
        out: dict[str, dict[str, list[str]]] = {}
        for name, ids in flat.items():
            out.setdefault(hosts.get(name, "?"), {})[name] = ids
        return dict(sorted(out.items()))

    def hosts(self) -> dict[str, str]:
        """Worker name -> the hostname of the node it runs on (asked once per worker, then cached)."""
        info = self.workers()
        missing = [a for a in info if a not in self._hosts]
        if missing:
            self._hosts.update(self.client.run(socket.gethostname, workers=missing))
        return {str(w.get("name", a)): self._hosts.get(a, "?") for a, w in sorted(info.items(), key=lambda kv: str(kv[1].get("name")))}

    @property
    def workers_per_job(self) -> int:
        """Dask worker processes per Slurm job (1 for local clusters)."""
        return max(1, self.profile.workers_per_job) if self.kind == "slurm" else 1

    def job_ids(self) -> list[str]:
        """Slurm job ids of this cluster's current jobs, each once (empty for local)."""
        ids = [str(getattr(w, "job_id", "") or "") for w in list(getattr(self.cluster, "workers", {}).values())]
        ids = list(dict.fromkeys(i for i in ids if i))
        self._job_ids.update(ids)
        return ids

    def jobs(self) -> list[slurmcli.JobInfo]:
        """What squeue says about this session's jobs (state and reason), e.g. ``PENDING (Resources)``."""
        if self.kind != "slurm":
            return []
        self.job_ids()
        return [j for j in slurmcli.jobs(user=slurmcli.current_user()) if j.name == self.session.job_name]

    def pending(self) -> list[slurmcli.JobInfo]:
        """Jobs not yet running, with their squeue reason."""
        return [j for j in self.jobs() if j.state in ("PENDING", "CONFIGURING", "REQUEUED")]

    def status(self, gpu_cache: dict[str, tuple[str, ...]] | None = None) -> ClusterStatus:
        """A snapshot for panels: workers with GPUs, memory and tasks, plus pending jobs and reasons."""
        if self._closed:
            return ClusterStatus(self.kind, self.profile.name, "", "", self.target, closed=True)
        info = self.workers()
        cache = {} if gpu_cache is None else gpu_cache
        missing = [a for a in info if a not in cache]
        if missing:
            cache.update({a: tuple(v) for a, v in self.client.run(_visible_gpus, workers=missing).items()})
        hosts = self.hosts()
        rows = []
        for addr, w in sorted(info.items(), key=lambda kv: str(kv[1].get("name"))):
            m = w.get("metrics", {})
            rows.append(WorkerRow(
                name=str(w.get("name", addr)), address=addr, gpus=cache.get(addr, ()),
                host=hosts.get(str(w.get("name", addr)), ""),
                threads=int(w.get("nthreads", 0)), memory_used=int(m.get("memory", 0)),
                memory_limit=int(w.get("memory_limit", 0) or 0), executing=int(m.get("executing", 0)),
                ready=int(m.get("ready", 0)), in_memory=int(m.get("in_memory", 0)),
            ))
        pending = [j.describe() for j in self.pending()]
        return ClusterStatus(self.kind, self.profile.name, self.address, self.dashboard_link, self.target, rows, pending)

    def __repr__(self) -> str:
        n = len(self.client.nthreads()) if not self._closed else 0
        return (f"ClusterHandle({self.kind}, profile={self.profile.name!r}, workers={n}/{self.target}, "
                f"address={self.address!r}, dashboard={self.dashboard_link!r})")

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(repr(self))}</pre>"

    # ------------------------------------------------------------------ change
    def scale(self, n: int, wait: bool = False, timeout: float | None = None) -> "ClusterHandle":
        """Ask for ``n`` workers (Slurm: ``n / workers_per_job`` jobs, rounded up to whole jobs);
        with ``wait`` block until they joined."""
        if n < 0:
            raise ValueError(f"scale({n}): the number of workers must be >= 0")
        per_job = self.workers_per_job
        if n % per_job:
            rounded = -(-n // per_job) * per_job
            self.say(f"labkit: {n} workers asked, {per_job} per Slurm job: {rounded // per_job} job(s), {rounded} workers")
            n = rounded
        self.target = n
        if self.kind == "slurm":
            self.forget_lost_jobs()
        self.cluster.scale(n)
        if self.kind == "slurm":
            upstream.submit_now(self.cluster)  # sbatch errors surface here, not in a log
            self.job_ids()
        if wait:
            self.wait(n, timeout)
            deadline = time.monotonic() + 30
            while len(self.client.nthreads()) > n and time.monotonic() < deadline:  # shrinking: retirements
                time.sleep(0.1)
        return self

    def forget_lost_jobs(self) -> list[str]:
        """Drop workers whose Slurm job has ended (cancelled, timed out, failed) from the cluster's
        spec and return their job ids, so that the next ``scale(n)`` submits new jobs for them.

        dask-jobqueue keeps a dead job in its spec, so without this ``scale(2)`` after a cancel
        still counts the lost job and never replaces it. Nothing is dropped when squeue does not
        answer: a silent Slurm must not look like every job lost."""
        if self.kind != "slurm":
            return []
        try:
            listed = slurmcli.run(["squeue", "-h", "-o", "%i|%T", "-u", slurmcli.current_user()])
        except ClusterError:
            return []
        live = {line.split("|")[0].strip() for line in listed.splitlines()
                if "|" in line and line.split("|")[1].strip() not in TERMINAL}
        lost = []
        for name, job in list(getattr(self.cluster, "workers", {}).items()):
            job_id = str(getattr(job, "job_id", "") or "")
            if job_id and job_id not in live:
                upstream.forget_job(self.cluster, name)
                lost.append(job_id)
        if lost:
            self.say(f"Slurm job(s) {', '.join(lost)} ended; scale() will submit new ones in their place")
        return lost

    def wait(self, n: int | None = None, timeout: float | None = None) -> "ClusterHandle":
        """Block until ``n`` workers joined, reporting pending jobs; on timeout cancel and raise ClusterTimeout."""
        n = self.target if n is None else n
        timeout = float(self.profile.start_timeout if timeout is None else timeout)
        deadline = time.monotonic() + timeout
        last = ""
        next_poll = 0.0
        while True:
            have = len(self.client.nthreads())
            if have >= n:
                return self
            now = time.monotonic()
            if self.kind == "slurm" and now >= next_poll:
                next_poll = now + 2.0
                jobs = self.jobs()
                line = ", ".join(j.describe() for j in jobs) or "submitting"
                if line != last:
                    self.say(f"labkit: {have}/{n} workers; jobs: {line}")
                    last = line
                dead = self._dead_jobs(jobs)
                if dead:
                    self._fail(f"worker job(s) {', '.join(dead)} ended before their worker joined", jobs)
            if self.kind == "local":
                failed = failed_to_start(self.cluster)
                if failed:
                    self.close()
                    raise ClusterError(explain_failed_start(failed, n))
            if now >= deadline:
                jobs = self.jobs()
                self._fail(f"only {have} of {n} workers joined within {timeout:.0f} s", jobs, timed_out=True)
            time.sleep(0.25)

    def _dead_jobs(self, jobs: list[slurmcli.JobInfo]) -> list[str]:
        live = {j.job_id for j in jobs if j.state not in TERMINAL}
        joined = {str(info.get("name")) for info in self.workers().values()}
        dead = []
        for name, w in list(getattr(self.cluster, "workers", {}).items()):
            jid = str(getattr(w, "job_id", "") or "")
            if jid and jid not in live and not joined & set(self._worker_names(name)):
                dead.append(jid)
        return dead

    def _worker_names(self, job_name: Any) -> list[str]:
        """The Dask worker names of one job: ``<job>`` alone, or ``<job>-0``... with several per job."""
        return upstream.worker_names(self.cluster, job_name)

    def _fail(self, what: str, jobs: list[slurmcli.JobInfo], timed_out: bool = False) -> None:
        if self.kind == "kubernetes":
            self.close()
            raise ClusterTimeout(f"{what}: see why the worker pods wait with `kubectl get pods -l "
                                 f"dask.org/cluster-name={self.session.job_name}` and `kubectl describe pod ...` "
                                 "(no GPU node free, an image that cannot be pulled); the cluster was deleted", jobs)
        if self.kind != "slurm":
            self.close()
            raise ClusterTimeout(f"{what}: the local worker processes are alive but have not joined the scheduler. "
                                 "Fix: a busy machine needs a longer start_cluster(timeout=...); `labkit doctor` "
                                 "checks this machine", jobs)
        states = "; ".join(j.describe() for j in jobs) or "no job left in squeue"
        ids = sorted(set(self.job_ids()) | {j.job_id for j in jobs})
        tails = self.log_tails(ids)
        msg = (f"{what}. Jobs {', '.join(ids) or '(none)'}: {states}.\n"
               + (tails or "No worker log yet (the jobs never started).")
               + "\nThe jobs were cancelled. Fix: look at the reason above (squeue), ask for fewer resources, "
               "another partition, or a longer start_cluster(timeout=...)")
        self.close()
        if timed_out:
            raise ClusterTimeout(msg, jobs)
        raise ClusterError(msg)

    def log_tails(self, job_ids: list[str], lines: int = 15) -> str:
        """The last lines of each job's worker log (stderr), for error messages."""
        return job_log_tails(Path(self.profile.log_directory or self.session.path / "logs"), job_ids, lines)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Close client and cluster, cancel every job of this session, delete its keys and logs."""
        if self._closed:
            return
        self._closed = True
        ids = self.job_ids() if self.kind == "slurm" else []
        for fn in (self.client.close, self.cluster.close):
            try:
                fn()
            except Exception:
                pass
        end_session(self.session, self.credentials, self.kind == "slurm", sorted(set(ids) | self._job_ids))
        atexit.unregister(self._atexit)
        if self.watchdog is not None:  # closed properly: the watchdog has nothing left to guard
            self.watchdog.terminate()
            try:
                self.watchdog.wait(timeout=5)
            except Exception:
                self.watchdog.kill()

    def _atexit(self) -> None:
        if self._closed:
            return
        if self.kind == "slurm":  # first the jobs, in case closing the cluster hangs at exit
            end_session(self.session, None, True, sorted(self._job_ids | set(self.job_ids())))
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
