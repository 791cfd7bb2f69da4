"""Walltime and preemption: Slurm's warning signal makes every rank save a checkpoint and stop at the
same step; resuming on a fresh job continues bit for bit like a run that was never interrupted.

The profile key (``signal``) and the job script are checked here; the signal itself on local Dask
workers (SIGUSR1 to one worker process) and on real Slurm jobs (``scancel --signal=USR1 --batch``,
which is what ``#SBATCH --signal=B:USR1@90`` sends before the time limit) on the local Slurm.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import training_past_a_checkpoint

from labkit.checkpoint import list_checkpoints
from labkit.cluster.slurm import lifetime_args
from labkit.config import get_profile
from labkit.model import GPTConfig
from labkit.settings import ConfigError, SlurmSignal
from labkit.train import TrainConfig, train_distributed

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 400  # the same in every run here: the learning-rate schedule depends on it


def _config(ckpt: Path) -> TrainConfig:
    """A GPT small enough that 400 steps take seconds on two CPU ranks."""
    return TrainConfig(model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, precision="float32"),
                       batch_size=2, max_steps=MAX_STEPS, eval_interval=0, sample_tokens=0, num_threads=1,
                       checkpoint_dir=str(ckpt), checkpoint_interval=20)


def test_signal_key_reads_and_names_the_fix():
    """``signal: USR1@90`` is the Slurm default; a bad one says how to write it; lifetime waits for it."""
    sig = SlurmSignal("USR1@90")
    assert (sig.name, sig.lead, sig.directive) == ("USR1", 90, "--signal=B:USR1@90")
    assert SlurmSignal("B:SIGUSR2@120").directive == "--signal=B:USR2@120"
    profile = get_profile("slurm")
    assert profile.signal == "USR1@90"
    for bad, why in (("TERM@60", "USR1 or USR2"), ("USR1@5", "10 to 65535"), ("USR1", "USR1 or USR2")):
        with pytest.raises(ConfigError, match=why) as err:
            profile.replace(signal=bad)
        assert "signal" in str(err.value) and "write it like 'USR1@90'" in str(err.value)
    # workers retire a third of the lead before walltime (not 5 min): the warning comes first
    assert lifetime_args(profile) == ["--lifetime", "3570s", "--lifetime-stagger", "15s"]
    assert lifetime_args(profile.replace(signal=None))[:2] == ["--lifetime", "3300s"]


def _pids(client) -> list[int]:
    """Each worker's process id, in the order run_ranks gives ranks (sorted addresses)."""
    pids = client.run(os.getpid)
    return [pids[a] for a in sorted(pids)]


def _stopped_run(client, config: TrainConfig, shards: Path, send):
    """Train, ``send()`` the warning once a checkpoint is out, and check the clean stop; its result."""
    run = training_past_a_checkpoint(client, config, shards)
    send()
    res = run.result(timeout=60)
    stop = res.start_step + res.steps
    assert res.stopped == "walltime" and stop < MAX_STEPS, res.note
    assert res.checkpoint and Path(res.checkpoint) == list_checkpoints(config.checkpoint_dir)[-1]
    assert Path(res.checkpoint).name.startswith(f"step_{stop:08d}"), (res.checkpoint, stop)
    assert "resume with train_distributed(..., resume=True) on a fresh job" in res.note
    return res


def _resume_matches_whole_run(client, config: TrainConfig, shards: Path, res, tmp_path: Path) -> None:
    """Resume ``res`` on ``client``; every loss equals an uninterrupted run's, bit for bit."""
    stop = res.start_step + res.steps
    resumed = train_distributed(client, config, shards, resume=True, timeout=20)
    assert resumed.stopped is None and resumed.start_step == stop and resumed.steps == MAX_STEPS - stop
    whole = train_distributed(client, config.replace(checkpoint_dir=str(tmp_path / "whole")), shards, timeout=20)
    assert whole.losses[:stop] == res.losses  # identical floats, not close ones
    assert whole.losses[stop:] == resumed.losses


def test_sigusr1_to_one_local_worker_stops_all_ranks_and_resumes_bit_exact(client, shards, tmp_path):
    """SIGUSR1 to rank 1's worker process only: both ranks stop at one step with a checkpoint."""
    pids = _pids(client)
    config = _config(tmp_path / "ckpt")
    res = _stopped_run(client, config, shards, lambda: os.kill(pids[1], signal.SIGUSR1))
    assert _pids(client) == pids  # no worker died of the signal
    _resume_matches_whole_run(client, config, shards, res, tmp_path)


@pytest.mark.slurm
def test_slurm_warning_signal_checkpoints_and_a_fresh_job_resumes(slurm, shards, tmp_path):
    """The job script asks ``--signal=B:USR1@90`` and traps it for the worker; the signal to one job's batch
    shell stops both ranks with a checkpoint; fresh jobs resume it bit for bit."""
    from labkit import start_cluster

    def cluster():
        return start_cluster("slurm", workers=2, gpus_per_worker=1, cores=1, memory="1GiB", timeout=120,
                             say=lambda line: None,
                             prologue=[f"export PYTHONPATH={REPO}", "export OMP_NUM_THREADS=1"])

    handle = cluster()
    try:
        script = handle.cluster.job_script()
        assert "#SBATCH --signal=B:USR1@90" in script
        assert "kill -USR1 \"$labkit_worker\" 2>/dev/null' USR1" in script and "( trap '' USR1 USR2; exec " in script
        assert "--preload-nanny labkit.core.preempt" in script and "--preload labkit.core.preempt" in script
        client = handle.client
        workers = client.scheduler_info()["workers"]
        rank1 = sorted(workers)[1]
        job_id = handle.cluster.workers[workers[rank1]["name"]].job_id

        def send():
            subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

        config = _config(tmp_path / "ckpt")
        res = _stopped_run(client, config, shards, send)
        assert len(client.scheduler_info()["workers"]) == 2  # the signalled job's worker lives on
    finally:
        handle.close()
    fresh = cluster()  # new jobs, as after a walltime
    try:
        _resume_matches_whole_run(fresh.client, config, shards, res, tmp_path)
    finally:
        fresh.close()


@pytest.mark.slurm
def test_batch_shell_signal_reaches_every_worker_of_a_two_worker_job(slurm):
    """One job of two workers: USR1 to its batch shell is passed to the nannies' process and on to
    both worker processes, which set the flag and live on."""
    from labkit import start_cluster

    def flagged() -> bool:  # on a worker (defined here: workers cannot import this test module)
        import time

        from labkit.core import preempt

        deadline = time.monotonic() + 5
        while not preempt.requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        found = preempt.requested()
        preempt.clear()
        return found

    handle = start_cluster("slurm", workers=2, gpus_per_worker=1, workers_per_job=2, cores=1, memory="1GiB",
                           timeout=120, say=lambda line: None, prologue=[f"export PYTHONPATH={REPO}"])
    try:
        (job,) = handle.job_ids()
        pids = handle.client.run(os.getpid)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        assert all(handle.client.run(flagged).values())
        assert handle.client.run(os.getpid) == pids
    finally:
        handle.close()


def test_warn_by_hand_sets_the_flag_of_one_worker_only(client):
    """``preempt.warn`` sends the real SIGUSR1 to one worker process, which lives on with its flag set."""
    from labkit.core import preempt

    pids = client.run(os.getpid)
    target = preempt.warn(client)
    assert target == sorted(pids)[-1]
    flags = client.run(preempt.requested)
    assert flags == {a: a == target for a in pids}
    client.run(preempt.clear)
    assert not any(client.run(preempt.requested).values()) and client.run(os.getpid) == pids
    with pytest.raises(ValueError, match="no worker 'tcp://nowhere:1'; workers: "):
        preempt.warn(client, "tcp://nowhere:1")


def test_warn_refuses_a_worker_in_a_thread_of_this_process():
    """A threads-only LocalCluster shares this process: the signal would end it, so warn refuses."""
    from distributed import Client, LocalCluster

    from labkit.core import preempt

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc, Client(lc) as c:
        with pytest.raises(RuntimeError, match=r"runs in a thread.*client.run\(labkit.core.preempt.request\)"):
            preempt.warn(c)


def test_a_lifetime_that_retires_workers_before_the_warning_is_warned_about():
    """lifetime - stagger before walltime - lead: the training would lose a rank, so preflight says so."""
    import warnings

    from labkit.cluster.preflight import _check_lifetime

    profile = get_profile("slurm")  # walltime 1 h, signal USR1@90
    with pytest.warns(UserWarning, match=r"retire 3240 s .* before Slurm's warning at 3510 s.*Leave lifetime null"):
        _check_lifetime(profile.replace(lifetime="55m", lifetime_stagger="1m"), "profile 'slurm'")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_lifetime(profile, "profile 'slurm'")                          # lifetime null: labkit's own
        _check_lifetime(profile.replace(lifetime="59m", lifetime_stagger="10s"), "profile 'slurm'")
        _check_lifetime(profile.replace(lifetime="50m", signal=None), "profile 'slurm'")


@pytest.mark.slurm
def test_a_real_walltime_ends_the_run_with_a_checkpoint_not_a_killed_rank(slurm, shards, tmp_path):
    """One-minute jobs with ``signal: USR1@50``: nobody sends a signal here, Slurm itself warns the jobs
    before their time limit. Training (planned far longer than a minute) stops with a checkpoint, both
    workers alive, and fresh jobs resume from that step."""
    import time

    from labkit import start_cluster

    def cluster(**extra):
        return start_cluster("slurm", workers=2, gpus_per_worker=1, cores=1, memory="1GiB", timeout=120,
                             say=lambda line: None, **extra,
                             prologue=[f"export PYTHONPATH={REPO}", "export OMP_NUM_THREADS=1"])

    config = _config(tmp_path / "ckpt").replace(max_steps=10**7, checkpoint_interval=0)  # only the warning saves
    handle = cluster(walltime="00:01:00", signal="USR1@50")
    try:
        script = handle.cluster.job_script()
        assert "#SBATCH -t 00:01:00" in script and "#SBATCH --signal=B:USR1@50" in script, script
        t0 = time.monotonic()
        res = train_distributed(handle.client, config, shards, timeout=20)
        took = time.monotonic() - t0
        stop = res.start_step + res.steps
        assert res.stopped == "walltime" and 0 < stop < config.max_steps, res.note
        assert took < 60, f"the warning came after {took:.0f} s, not before the one-minute limit"
        assert res.checkpoint and Path(res.checkpoint).name.startswith(f"step_{stop:08d}")
        assert len(handle.client.scheduler_info()["workers"]) == 2  # no rank was killed
    finally:
        handle.close()
    fresh = cluster()  # new jobs, a full walltime
    try:
        more = train_distributed(fresh.client, config.replace(max_steps=stop + 3), shards, resume=True, timeout=20)
        assert (more.start_step, more.steps, more.stopped) == (stop, 3, None)
    finally:
        fresh.close()


def test_a_warning_before_the_worker_is_up_neither_kills_it_nor_is_lost(tmp_path):
    """Slurm may send the warning up to 60 s early, before the worker installed its handler: the job
    script starts the worker with the signal ignored, and preempt.install reads the trap's marker."""
    import sys
    import time

    from labkit.cluster.upstream import FORWARD_SIGNALS

    child = tmp_path / "worker.py"
    child.write_text(f"import sys, time\nsys.path.insert(0, {str(REPO)!r})\ntime.sleep(2)\n"
                     "from labkit.core import preempt\npreempt.install()\nprint('requested', preempt.requested())\n")
    script = FORWARD_SIGNALS.format(command=f"{sys.executable} {child}")
    env = dict(os.environ, SLURM_JOB_ID="4242", TMPDIR=str(tmp_path))
    job = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # the worker is still starting: no handler yet
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0, f"the early warning ended the job (exit {job.returncode})"
    assert "requested True" in out and (tmp_path / "labkit-warned-4242").exists()


def test_a_warning_while_the_nanny_spawns_its_worker_waits_for_the_worker_handler(tmp_path):
    """The nannies' process forwards the warning to its worker process; one still starting (its
    preloads not yet run) has SIGUSR1's default action, so the nanny holds the signal until the worker
    is up. Here a real ``dask worker`` whose worker process takes 3 s in a preload gets USR1 at its
    nanny meanwhile: the worker joins and has the flag set (it died, before the fix)."""
    import sys
    import time

    import psutil
    from distributed import Client, LocalCluster

    (tmp_path / "slow_preload.py").write_text("import time\n\ndef dask_setup(worker):\n    time.sleep(3)\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=":0") as cluster, Client(cluster) as client:
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nworkers", "1",
             "--nthreads", "1", "--no-dashboard", "--preload-nanny", "labkit.core.preempt",
             "--preload", "slow_preload", "--preload", "labkit.core.preempt"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            nannies = psutil.Process(worker.pid)
            deadline = time.monotonic() + 60
            while not nannies.children(recursive=True) and time.monotonic() < deadline:
                time.sleep(0.05)  # until the nanny spawned its worker process
            assert nannies.children(recursive=True), "the nanny never spawned its worker process"
            time.sleep(0.5)
            worker.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 60
            while not client.scheduler_info()["workers"] and worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert worker.poll() is None, "the warning ended the worker before it was up"
            assert client.scheduler_info()["workers"], "the worker did not join within 60 s"

            def flagged() -> bool:  # on the worker
                from labkit.core import preempt

                deadline = time.monotonic() + 10
                while not preempt.requested() and time.monotonic() < deadline:
                    time.sleep(0.05)
                return preempt.requested()

            assert list(client.run(flagged).values()) == [True]
            assert worker.poll() is None
        finally:
            worker.terminate()
            _, err = worker.communicate(timeout=60)
        assert "failed to start" not in err, err[-2000:]


def test_a_worker_killed_by_the_warning_is_named_in_the_job_log_summary(tmp_path):
    """A worker process without labkit's handler dies of SIGUSR1 and the nanny logs it only at INFO:
    the summary that start_cluster's errors quote names the signal and its likely cause."""
    import sys

    from distributed import LocalCluster

    from labkit.cluster.handle import job_log_tails

    (tmp_path / "warned_early.py").write_text(
        "import os, signal\n\ndef dask_setup(worker):\n    os.kill(os.getpid(), signal.SIGUSR1)\n")
    log = tmp_path / "labkit-x-77.err"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=":0") as cluster:
        with open(log, "w") as err:
            subprocess.run([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                            "--nworkers", "1", "--no-dashboard", "--preload", "warned_early"],
                           env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=120)
    summary = job_log_tails(tmp_path, ["77"])
    assert "was killed by signal 10" in log.read_text()
    assert "a worker process was killed by SIGUSR1 (Slurm's walltime warning" in summary, summary
