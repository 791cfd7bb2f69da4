"""Every use labkit makes of dask-jobqueue's and distributed's private API, in one place.

Each override says which upstream issue it works around. ``RELIED_ON`` lists what these overrides
need from upstream (names, signatures, config keys); ``tests/test_upstream_contract.py`` checks each
against the installed versions, so an upgrade that changes them fails there, with what to do, instead
of in a workshop. pyproject.toml bounds dask, distributed and dask-jobqueue to the versions CI ran.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shlex
import signal
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

import dask
import distributed
from dask.utils import parse_timedelta
from dask_jobqueue.slurm import SLURMCluster, SLURMJob
from distributed import LocalCluster, Nanny
from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from tornado.ioloop import PeriodicCallback

from . import slurmcli
from .gpu_slice import parse_ids

FIX = ("pin {package}<{version} in pyproject.toml and environment.yml (the last version labkit was tested with "
       "is below that), or update labkit/cluster/upstream.py to the new shape")


# ---------------------------------------------------------------------------------------- Slurm jobs
# The worker command in the background, Slurm's warning (USR1/USR2 to the batch shell) passed on to it;
# the script ends with the worker's exit status (a trapped signal only interrupts ``wait``). The command
# starts with both signals ignored (kept so across exec) until labkit.core.preempt installs its handlers:
# Slurm may send the warning up to 60 s early, so it can come before the worker is up, and SIGUSR1's
# default action would end the job. The trap also leaves a marker that preempt.install reads then.
FORWARD_SIGNALS = """trap 'touch "${{TMPDIR:-/tmp}}/labkit-warned-${{SLURM_JOB_ID:-0}}"; kill -USR1 "$labkit_worker" 2>/dev/null' USR1
trap 'touch "${{TMPDIR:-/tmp}}/labkit-warned-${{SLURM_JOB_ID:-0}}"; kill -USR2 "$labkit_worker" 2>/dev/null' USR2
( trap '' USR1 USR2; exec {command} ) &
labkit_worker=$!
while :; do wait "$labkit_worker"; rc=$?; kill -0 "$labkit_worker" 2>/dev/null || exit "$rc"; done"""
class LabkitSLURMJob(SLURMJob):
    """A SLURMJob submitted through :func:`slurmcli.submit`: an enclosing job's environment stripped, a time limit."""

    # Overrides the private ``Job._submit_job(script_filename)``. dask-jobqueue runs sbatch with this
    # process's whole environment, so a notebook inside a Slurm job (batchspawner) leaks its SLURM_*
    # variables into the worker jobs, and its ``_call`` waits for ever on a hung slurmctld. No upstream
    # issue found as of 2026-12 (dask-jobqueue #15 is an sbatch-from-where question, closed); behaviour
    # relied on: ``Job.start`` awaits ``_submit_job(filename)`` and parses the returned text with
    # ``job_id_regexp`` (a bare job id matches).
    async def _submit_job(self, script_filename: str) -> str:
        args = shlex.split(self.submit_command)[1:]  # site extras (submit_command_extra) after "sbatch"
        return await asyncio.to_thread(slurmcli.submit, script_filename, args=args)

    # Extends the public ``Job.job_script()``: its last line, the worker command, runs in the background
    # while the batch shell waits, so the shell's traps can pass Slurm's ``--signal=B:...`` warning on to
    # the process that runs the nannies (labkit.core.preempt forwards it to the workers). Not ``exec``:
    # the dask-worker command then closes gracefully on scancel's SIGTERM and SpecCluster keeps the
    # cancelled job. No upstream issue found as of 2026-12; behaviour relied on: the script ends with
    # the worker command on one line.
    def job_script(self) -> str:
        head, _, command = super().job_script().rstrip("\n").rpartition("\n")
        return f"{head}\n{FORWARD_SIGNALS.format(command=command)}\n"


class LabkitSLURMCluster(SLURMCluster):
    """SLURMCluster whose jobs use :class:`LabkitSLURMJob` and whose retired workers are replaced.

    A worker that reached its ``--lifetime`` leaves, its job ends, and SpecCluster forgets it (a job
    of several workers once all of them left); every 2 s this cluster submits a new job for each job
    it should have but does not.
    ``on_close`` (if set) runs after the cluster closed: it cancels leftovers and deletes keys.
    """

    job_cls = LabkitSLURMJob
    on_close: Callable[[], None] | None = None

    # Overrides the private ``Cluster._start`` to add a periodic callback (``periodic_callbacks`` are
    # started by ``Cluster._start``). Works around dask-jobqueue #691 (open: jobs are not resubmitted
    # after a graceful ``--lifetime`` exit under ``scale``/``adapt``; see also #122 and PR #481, which
    # only documented ``--lifetime``).
    async def _start(self) -> None:
        self.periodic_callbacks["labkit-replace-retired"] = PeriodicCallback(self._replace_retired, 2000)
        await super()._start()

    # Calls the private ``SpecCluster._correct_state()`` (it starts the missing workers of
    # ``worker_spec``) for dask-jobqueue #691, as above.
    def _replace_retired(self) -> None:
        if self.status.name == "running" and set(self.worker_spec) - set(self.workers):
            self.loop.add_callback(self._correct_state)

    # Overrides the private ``SpecCluster._update_worker_status(op, msg)``. Works around
    # distributed #9102 (open: SpecCluster never removes grouped workers, i.e. jobs of several
    # processes, when they die; the fix, PR #9104, was closed unmerged) and dask-jobqueue #498.
    # SpecCluster forgets a job only when a worker *named like the job* left; with several workers per
    # job they are named <job>-0, <job>-1..., so this forgets the job once none of them is left.
    def _update_worker_status(self, op: str, msg: Any) -> None:
        info = self.scheduler_info.get("workers", {})
        if op == "remove" and msg in info:
            job = self._job_of(str(info[msg].get("name")))
            if job is not None:
                delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
                asyncio.get_running_loop().call_later(delay, self._forget_if_empty, job)
        super()._update_worker_status(op, msg)

    def _job_of(self, worker_name: str) -> str | None:
        """The job of a worker named ``<job><suffix>`` in a multi-worker job; None for one-worker jobs."""
        for suffix in self.new_spec.get("group") or ():
            job = worker_name[: -len(suffix)]
            if worker_name.endswith(suffix) and job in self.workers:
                return job
        return None

    # Uses the private ``SpecCluster._futures`` (closings awaited by ``_close``) the way
    # ``SpecCluster._update_worker_status`` does itself, for distributed #9102 as above.
    def _forget_if_empty(self, job: str) -> None:
        names = {f"{job}{suffix}" for suffix in self.new_spec.get("group") or ()}
        alive = {str(d.get("name")) for d in self.scheduler_info.get("workers", {}).values()}
        if job in self.workers and not names & alive:
            self._futures.add(asyncio.ensure_future(self.workers.pop(job).close()))

    # Overrides the private ``SpecCluster._close`` to run a hook once the cluster is closed. No upstream
    # issue found as of 2026-12 (Cluster has no close hook); behaviour relied on: ``close()`` awaits
    # ``_close()`` once, on the cluster's loop, also from ``__exit__`` and at interpreter exit.
    async def _close(self) -> None:
        await super()._close()
        if self.on_close is not None:
            self.on_close()


def submit_now(cluster: Any) -> None:
    """Start the jobs ``cluster.scale`` asked for and wait for their submission, so sbatch errors raise here.

    ``scale()`` only schedules the private ``SpecCluster._correct_state()``; its errors end in a log
    ("Task exception was never retrieved", as in dask-jobqueue #619). No upstream issue asks for
    ``scale`` to raise, as of 2026-12; behaviour relied on: ``_correct_state()`` returns an awaitable
    that ``cluster.sync`` runs on the cluster's loop.
    """
    cluster.sync(cluster._correct_state)


def forget_job(cluster: Any, name: str) -> None:
    """Drop a job whose Slurm job ended from the cluster's spec, so that the next ``scale(n)`` replaces it.

    Edits ``SpecCluster.worker_spec`` (the wanted state) and ``workers``. Works around the behaviour
    noted in dask-jobqueue PR #307 and distributed PR #2990: a killed job leaves ``workers`` but stays
    in ``worker_spec``, and then counts towards ``scale(n)`` for ever (distributed #9102 for jobs of
    several workers).
    """
    cluster.worker_spec.pop(name, None)
    cluster.workers.pop(name, None)


def worker_names(cluster: Any, job_name: Any) -> list[str]:
    """The Dask worker names of one job: ``<job>`` alone, or ``<job>-0``... with several per job.

    Reads the ``group`` suffixes dask-jobqueue puts in ``worker_spec[job]`` when ``processes > 1``
    (SpecCluster's grouped workers, distributed PR #3013); no upstream issue, this is its documented
    spec shape.
    """
    group = (getattr(cluster, "worker_spec", {}).get(job_name) or {}).get("group")
    return [f"{job_name}{suffix}" for suffix in group] if group else [str(job_name)]


# ---------------------------------------------------------------------------------------- local workers
class NonDaemonNanny(Nanny):
    """A Nanny whose worker process is not a daemon, so tasks may start DataLoader workers."""

    # Overrides ``Nanny.instantiate`` (public, undocumented) to set ``distributed.worker.daemon`` only
    # while this nanny starts its process. Works around distributed #2142 / #2718 ("daemonic processes
    # are not allowed to have children"; #2718 added the config key, which LocalCluster has no argument for).
    async def instantiate(self):  # type: ignore[override]
        with dask.config.set({"distributed.worker.daemon": False}):
            status = await super().instantiate()
        self.worker_pid = self.process.pid if self.process else None  # gone from .process once it dies
        return status

    # Overrides the private ``Nanny._on_worker_exit``: distributed logs a worker process's death at
    # INFO, which LocalCluster's default silence_logs hides, so a rank lost to a crash or an OOM kill
    # showed no cause at all. Said here, as a warning, before the nanny goes on as before.
    async def _on_worker_exit(self, exitcode):  # type: ignore[override]
        if exitcode and self.status == Status.running:
            _log.warning("labkit: %s", death_note(getattr(self, "worker_pid", None), self.worker_address, exitcode))
        return await super()._on_worker_exit(exitcode)


_log = logging.getLogger("labkit.cluster")


def signal_cause(signum: int) -> str:
    """A signal's name and what it most often means for a worker process: ``SIGKILL (killed from outside ...)``."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum} (stopped by a signal)"
    why = {
        "SIGKILL": "killed from outside, most often by the kernel's out-of-memory killer: lower the batch or "
                   "the workers, or raise memory_limit",
        "SIGSEGV": "crashed in native code (a segfault): see its traceback above, if any",
        "SIGABRT": "aborted by native code: see its message above",
        "SIGBUS": "crashed on a bad memory access (a full /dev/shm can cause it)",
        "SIGUSR1": "Slurm's walltime warning reached a process with no handler for it: a worker started without "
                   "labkit's preload (labkit.core.preempt), or a labkit older than this one",
    }.get(name, "stopped by a signal")
    return f"{name} ({why})"


def death_note(pid: int | None, address: str | None, exitcode: int) -> str:
    """What a local worker process's exit code says, and what to do about it."""
    who = f"local worker process {pid or '?'} ({address or 'not yet connected'})"
    if exitcode < 0:
        return f"{who} was killed by {signal_cause(-exitcode)}; the Nanny restarts it, and a rank on it is lost"
    return f"{who} exited with status {exitcode}; see its error above; the Nanny restarts it, and a rank on it is lost"


class LabkitLocalCluster(LocalCluster):
    """LocalCluster whose new workers each take a free GPU slot (CUDA_VISIBLE_DEVICES + resource GPU)."""

    on_close: Callable[[], None] | None = None

    def __init__(self, *args: Any, gpu_slots: list[str] | None = None, gpus_per_worker: int = 0, **kwargs: Any):
        self._gpu_slots = list(gpu_slots or [])
        self._gpus_per_worker = gpus_per_worker
        super().__init__(*args, **kwargs)

    # Overrides the private ``SpecCluster._close``: a close hook, as for LabkitSLURMCluster above.
    async def _close(self) -> None:
        await super()._close()
        if self.on_close is not None:
            self.on_close()

    # Overrides ``SpecCluster.new_worker_spec`` and reads ``worker_spec`` (``{name: {"cls", "options"}}``).
    # No upstream issue in distributed: one GPU per local worker is dask-cuda's LocalCUDACluster
    # (moved out of distributed in PR #2432), which labkit does not depend on; behaviour relied on:
    # ``scale`` calls ``new_worker_spec()`` once per new worker and passes ``options`` to the Nanny.
    def new_worker_spec(self) -> dict[str, Any]:
        spec = super().new_worker_spec()
        if self._gpus_per_worker <= 0:
            return spec
        used = {g for s in self.worker_spec.values()
                for g in parse_ids(s.get("options", {}).get("env", {}).get("CUDA_VISIBLE_DEVICES", ""))}
        free = [g for g in self._gpu_slots if g not in used][: self._gpus_per_worker]
        if len(free) < self._gpus_per_worker:
            return spec  # no GPU left: a CPU-only worker (no GPU resource, so GPU tasks avoid it)
        ((name, body),) = spec.items()
        opts = dict(body["options"])
        opts["env"] = {**opts.get("env", {}), "CUDA_VISIBLE_DEVICES": ",".join(free)}
        opts["resources"] = {**(opts.get("resources") or {}), "GPU": self._gpus_per_worker}
        return {name: {**body, "options": opts}}


def failed_to_start(cluster: Any) -> list[str]:
    """Names of the local workers whose process ended while starting (their Nanny failed or closed).

    SpecCluster keeps a Nanny that failed to start in ``cluster.workers`` (with status failed or
    closed) and only logs the error from its background task, so a waiter sees no exception; no
    upstream issue found as of 2026-12 (relied on: distributed.deploy.spec._correct_state_internal).
    """
    gone = {Status.failed, Status.closed, Status.closing, Status.closing_gracefully}
    return sorted(str(name) for name, w in list(getattr(cluster, "workers", {}).items())
                  if getattr(w, "status", None) in gone)


# ---------------------------------------------------------------------------------------- the contract
@dataclass(frozen=True)
class Reliance:
    """One thing labkit needs from an upstream package: an attribute of a class (or instance), or a config key.

    ``kind``: ``coroutine`` (an ``async def``), ``method`` (a plain function), ``attribute`` (any value,
    of ``of_type`` when given), or ``config`` (a dask config key). ``params``: the parameters labkit
    passes, in order, after ``self`` (no other may be required); ``**`` means it must take any keyword.
    """

    package: str
    owner: str
    name: str
    kind: str
    params: tuple[str, ...] = ()
    of_type: type | tuple[type, ...] | None = None
    why: str = ""


def version_of(package: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _signature_problem(fn: Any, params: tuple[str, ...]) -> str | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "no readable signature"
    have = [p for p in sig.parameters.values() if p.name != "self"]
    named = [p for p in have if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    wanted = [p for p in params if p != "**"]
    if [p.name for p in named[: len(wanted)]] != wanted:
        return f"signature is {sig}, expected parameters ({', '.join(params)})"
    if "**" in params and not any(p.kind == p.VAR_KEYWORD for p in have):
        return f"signature is {sig}, which takes no **kwargs"
    extra = [p.name for p in named[len(wanted):] if p.default is p.empty]
    if extra:
        return f"signature is {sig}: it requires {', '.join(extra)}, which labkit does not pass"
    return None


def problem(reliance: Reliance, obj: Any = None) -> str | None:
    """What is wrong with one reliance on ``obj`` (a class or instance; config keys need none), or None.

    The message names the package and its installed version, what labkit relies on, and the fix.
    """
    r = reliance
    found: str | None
    if r.kind == "config":
        sentinel = object()
        found = "the key is missing" if dask.config.get(r.name, default=sentinel) is sentinel else None
    elif not hasattr(obj, r.name):
        found = "it is missing"
    else:
        value = inspect.getattr_static(obj, r.name) if inspect.isclass(obj) else getattr(obj, r.name)
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if r.kind == "coroutine" and not inspect.iscoroutinefunction(fn):
            found = f"it is {type(value).__name__}, not an async def"
        elif r.kind == "method" and not callable(fn):
            found = f"it is {type(value).__name__}, not a method"
        elif r.kind in ("coroutine", "method"):
            found = _signature_problem(fn, r.params)
        elif r.kind == "attribute" and r.of_type is not None and not isinstance(value, r.of_type):
            found = f"it is a {type(value).__name__}"
        else:
            found = None
    if found is None:
        return None
    version = version_of(r.package)
    what = f"{r.owner}.{r.name}" if r.kind != "config" else f"dask config key {r.name!r}"
    return (f"{r.package} {version}: labkit relies on {what} ({r.kind}"
            f"{'(' + ', '.join(r.params) + ')' if r.params else ''}"
            f"{' of type ' + getattr(r.of_type, '__name__', str(r.of_type)) if r.of_type else ''}; {r.why}) but {found}. "
            f"Fix: {FIX.format(package=r.package, version=version)}")


RELIED_ON: tuple[Reliance, ...] = (
    # dask-jobqueue: LabkitSLURMJob
    Reliance("dask-jobqueue", "SLURMJob", "_submit_job", "coroutine", ("script_filename",),
             why="LabkitSLURMJob overrides it to submit through slurmcli.submit"),
    Reliance("dask-jobqueue", "SLURMJob", "_call", "coroutine", ("cmd", "**"),
             why="dask-jobqueue's own sbatch/scancel calls, which _submit_job replaces"),
    Reliance("dask-jobqueue", "SLURMJob", "submit_command", "attribute", of_type=str,
             why="'sbatch' plus site extras, split by LabkitSLURMJob._submit_job"),
    Reliance("dask-jobqueue", "SLURMJob", "job_script", "method", (),
             why="LabkitSLURMJob.job_script runs its last line, the worker command, under signal traps"),
    Reliance("dask-jobqueue", "SLURMJob", "job_id_regexp", "attribute", of_type=str,
             why="parses the bare job id LabkitSLURMJob._submit_job returns"),
    Reliance("dask-jobqueue", "SLURMCluster", "job_cls", "attribute",
             why="LabkitSLURMCluster sets it to LabkitSLURMJob"),
    # distributed: SpecCluster, as LabkitSLURMCluster / LabkitLocalCluster / handle use it
    Reliance("distributed", "SpecCluster", "_start", "coroutine", (),
             why="LabkitSLURMCluster adds its periodic callback there"),
    Reliance("distributed", "SpecCluster", "_close", "coroutine", (), why="the on_close hook"),
    Reliance("distributed", "SpecCluster", "_correct_state", "method", (),
             why="submit_now and the retired-worker replacement call it"),
    Reliance("distributed", "SpecCluster", "_update_worker_status", "method", ("op", "msg"),
             why="LabkitSLURMCluster forgets jobs of several workers there"),
    Reliance("distributed", "SpecCluster", "new_worker_spec", "method", (),
             why="LabkitLocalCluster gives each new worker its GPUs"),
    Reliance("distributed", "Nanny", "instantiate", "coroutine", (),
             why="NonDaemonNanny sets distributed.worker.daemon around it"),
    Reliance("distributed", "Nanny", "_on_worker_exit", "coroutine", ("exitcode",),
             why="NonDaemonNanny warns of a worker process's death there"),
    Reliance("distributed", "distributed", "distributed.worker.daemon", "config",
             why="read by the nanny when it starts its worker process"),
    Reliance("distributed", "distributed", "distributed.deploy.lost-worker-timeout", "config",
             why="how long LabkitSLURMCluster waits before it forgets a job"),
)

# Attributes of a running cluster (set in __init__, so checked on an instance by the contract test).
RELIED_ON_INSTANCE: tuple[Reliance, ...] = tuple(
    Reliance("distributed", "SpecCluster()", name, "attribute", of_type=of_type, why=why)
    for name, of_type, why in (
        ("worker_spec", dict, "the wanted jobs: forget_job pops from it, worker_names reads 'group'"),
        ("workers", dict, "the started jobs"),
        ("new_spec", dict, "its 'group' suffixes name the workers of a job"),
        ("_futures", set, "closings that _close awaits; _forget_if_empty adds to it"),
        ("periodic_callbacks", dict, "started by Cluster._start"),
        ("scheduler_info", None, "worker names, read by _update_worker_status"),
        ("status", None, "its .name 'running'"),
    )
)


def contract_problems(instances: dict[str, Any] | None = None) -> list[str]:
    """Every broken reliance against the installed packages (``instances``: owner name -> object to check)."""
    owners: dict[str, Any] = {"SLURMJob": SLURMJob, "SLURMCluster": SLURMCluster, "SpecCluster": SpecCluster,
                              "Nanny": Nanny, "distributed": distributed, **(instances or {})}
    checks = list(RELIED_ON) + [r for r in RELIED_ON_INSTANCE if r.owner in owners]
    return [p for r in checks if (p := problem(r, owners.get(r.owner))) is not None]
