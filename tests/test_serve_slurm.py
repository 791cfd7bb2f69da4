"""The server as a Slurm job on the local GPU partition, through the slurm profile."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from labkit.config import ConfigError, load_config
from labkit.serve.slurm import job_script, submit
from conftest import skip_unless_ci


def test_job_script_follows_the_profile(tmp_path):
    profile = load_config().profile("slurm").replace(
        account="proj1", gpus_per_worker=2, memory="4GiB", memory_mode="mem-per-gpu",
        prologue=["module load cuda/12.4", "source ~/venv/bin/activate"], job_extra=["--qos=normal"])
    script = job_script(profile, ["python", "-m", "labkit", "serve", "--demo"], job_name="x", directory=tmp_path)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj1", "#SBATCH --gres=gpu:2",
                 "#SBATCH --mem-per-gpu=2048M", "#SBATCH --qos=normal", "module load cuda/12.4",
                 "exec python -m labkit serve --demo"):
        assert line in script, line
    assert script.index("module load") < script.index("exec python")
    with pytest.raises(ConfigError, match="account"):
        job_script(profile.replace(account=None, require_account=True), ["true"], job_name="x", directory=tmp_path)


@pytest.mark.parametrize("state", ["NODE_FAIL", "PREEMPTED", "DEADLINE", "BOOT_FAIL", "OUT_OF_MEMORY"])
def test_wait_url_stops_at_once_when_the_job_ended(tmp_path, monkeypatch, state):
    # states the local Slurm cannot produce on demand: squeue is stood in for
    from labkit.cluster import slurmcli
    from labkit.serve.slurm import ServeJob

    monkeypatch.setattr(slurmcli, "jobs", lambda ids, **kw: [slurmcli.JobInfo(ids[0], "labkit-serve", state, "None")])
    (tmp_path / "job.log").write_text("slurmstepd: error: *** JOB 42 ON vm CANCELLED: node went away ***\n")
    job = ServeJob("42", "labkit-serve", tmp_path, "token", tls=False)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        job.wait_url(timeout=20)
    assert time.monotonic() - t0 < 1, f"waited for the timeout instead of stopping at {state}"
    msg = str(err.value)
    assert f"ended ({state})" in msg and "node went away" in msg and "sacct -j 42" in msg


def test_submit_goes_through_slurmcli_submit(tmp_path, monkeypatch):
    import labkit.serve.slurm as serve_slurm
    from labkit.cluster import slurmcli
    from labkit.serve.server import TOKEN_ENV

    monkeypatch.setattr(serve_slurm, "check_slurm_profile", lambda *a, **k: None)  # no sinfo here
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("raw subprocess, not slurmcli.submit"))
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # as if this notebook ran inside a job
    seen = {}

    def fake_submit(script_path, env=None, timeout=60.0, args=()):
        seen.update(script=Path(script_path), env=dict(env or {}), timeout=timeout)
        return "4242"

    monkeypatch.setattr(slurmcli, "submit", fake_submit)
    profile = load_config().profile("slurm")
    job = submit(profile, directory=tmp_path, token="tok-secret-123")
    assert job.job_id == "4242" and seen["script"] == job.directory / "job.sh"
    assert seen["env"][TOKEN_ENV] == "tok-secret-123" and "SLURM_JOB_ID" not in seen["env"]
    assert "tok-secret-123" not in seen["script"].read_text()


def test_job_script_shares_the_cluster_layers_directives(tmp_path):
    from labkit.cluster.jobscript import job_directives

    profile = load_config().profile("slurm").replace(account="proj1", gpus_per_worker=2, memory="4GiB",
                                                     walltime="00:10:00", job_extra=["--qos=normal"])
    script = job_script(profile, ["true"], job_name="x", directory=tmp_path)
    for directive in job_directives(profile, 2, 4 * 2**30):
        assert f"#SBATCH {directive}\n" in script, directive
    assert "#SBATCH --mem=4096M" in script and "#SBATCH --time=00:10:00" in script


def _job_cli(argv, tmp_path, monkeypatch):
    """Run ``labkit serve ... --slurm`` up to the submission, which is captured instead of made; returns
    (exit code, the job's command line parsed by the same CLI, the job folder)."""
    import labkit.serve.slurm as slurm
    from labkit.lab.cli import build_parser, main
    from labkit.serve.slurm import job_command

    def no_sbatch(*a, **k):
        raise AssertionError("the test ran a Slurm command (sinfo, sbatch)")

    monkeypatch.setattr(subprocess, "run", no_sbatch)
    seen = {}

    def capture(profile, serve_args, **kw):
        seen.update(profile=profile, serve_args=serve_args, **kw)
        raise RuntimeError("captured instead of submitted")

    monkeypatch.setattr(slurm, "submit", capture)
    rc = main(["serve", *argv, "--slurm"])
    if not seen:
        return rc, None, None
    kw = {k: seen[k] for k in ("port", "certfile", "keyfile")}
    command = job_command(seen["serve_args"], tmp_path / "job", python="python", tls=True, **kw)
    assert command[:4] == ["python", "-m", "labkit", "serve"]
    return rc, build_parser().parse_args(command[3:]), tmp_path / "job"


def test_slurm_job_gets_port_device_and_tls_files(tmp_path, monkeypatch, capsys):
    ckpt, cert, key = tmp_path / "model.pt", tmp_path / "cert.pem", tmp_path / "key.pem"
    for f in (ckpt, cert, key):
        f.write_text("x")
    monkeypatch.chdir(tmp_path)  # relative paths on the command line: the job gets absolute ones
    rc, job, jobdir = _job_cli(["model.pt", "--port", "8123", "--device", "cuda:1", "--cert", "cert.pem",
                                "--key", "key.pem", "--max-batch-size", "4", "--no-embed"], tmp_path, monkeypatch)
    assert rc == 1 and "captured instead of submitted" in capsys.readouterr().err
    assert (job.checkpoint, job.port, job.device, job.cert, job.key) == (str(ckpt), 8123, "cuda:1", str(cert), str(key))
    assert job.self_signed is None and job.host == "0.0.0.0" and job.url_file == str(jobdir / "url")
    assert job.max_batch_size == 4 and job.no_embed and not job.slurm and not job.demo


def test_slurm_job_defaults(tmp_path, monkeypatch, capsys):
    rc, job, jobdir = _job_cli(["--demo"], tmp_path, monkeypatch)
    assert rc == 1 and job.demo and job.checkpoint is None
    assert job.port == 0 and job.device == "auto"  # any free port on a shared node; the GPU Slurm gave it
    assert job.self_signed == str(jobdir / "tls") and job.cert is None and not job.no_embed


@pytest.mark.parametrize("argv,says", [
    (["--host", "10.1.2.3"], "--host 10.1.2.3 does not apply with --slurm"),
    (["--self-signed", "tlsdir"], "--self-signed does not apply with --slurm"),
    (["--cert", "cert.pem"], "needs both a certificate and its key"),
    (["--cert", "nope.pem", "--key", "nope.pem"], "TLS file nope.pem does not exist"),
    (["--port", "70000"], "port 70000 is out of range"),
])
def test_slurm_options_it_cannot_honour_are_refused(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text("x")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the test ran a Slurm command (sinfo, sbatch)"))
    from labkit.lab.cli import main

    rc = main(["serve", "--demo", "--slurm", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and says in err, err
    assert not list((tmp_path).glob("**/job.sh"))


@pytest.mark.slurm
def test_serve_as_slurm_job_on_a_gpu_node(slurm, tmp_path):
    profile = load_config().profile("slurm").replace(walltime="00:05:00", memory="1GiB", cores=1)
    job = submit(profile, ["--demo", "--no-embed"], job_name="labkit-serve-test", directory=tmp_path)
    try:
        try:
            url = job.wait_url(timeout=150)
        except TimeoutError:
            if job.state() == "PENDING":
                skip_unless_ci(f"the local GPU partition is busy; job {job.job_id} never started")
            raise
        assert url.startswith("https://")  # the slurm profile asks for TLS
        verify = ssl.create_default_context(cafile=str(job.certfile))
        with httpx.Client(base_url=url, verify=verify, timeout=60) as c:
            health = c.get("/health").json()
            # Slurm gave the job one of the node's GPUs (fake here: torch still runs on the CPU)
            assert health["cuda_visible_devices"] not in (None, "")
            assert c.post("/generate", json={"prompt": "slurm"}).status_code == 401
            r = c.post("/generate", json={"prompt": "slurm", "max_new_tokens": 4, "seed": 5},
                       headers={"Authorization": f"Bearer {job.token}"})
            assert r.status_code == 200 and r.json()["new_tokens"] == 4
        assert job.token not in (tmp_path / job.directory.name / "job.sh").read_text()
    finally:
        job.cancel()
    deadline = time.time() + 30
    while job.state() != "GONE" and time.time() < deadline:
        time.sleep(0.5)
    assert job.state() == "GONE"


@pytest.mark.slurm
def test_cli_slurm_prints_url_and_token(slurm, tmp_path, monkeypatch):
    import os
    import re
    import sys
    from pathlib import Path

    user = tmp_path / "user.yaml"
    user.write_text(f"profiles:\n  slurm:\n    log_directory: {tmp_path / 'jobs'}\n    walltime: '00:05:00'\n"
                    "    memory: 1GiB\n    tls: false\n")
    env = {**os.environ, "LABKIT_USER_CONFIG": str(user), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("LABKIT_SERVE_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "labkit", "serve", "--slurm", "--demo", "--no-embed"], env=env,
                       capture_output=True, text=True, timeout=240)
    job_id = re.search(r"submitted Slurm job (\d+)", r.stdout)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        url = re.search(r"serving at (\S+)", r.stdout).group(1)
        token = re.search(r"token \(shown once\): (\S+)", r.stdout).group(1)
        assert url.startswith("http://") and f"scancel {job_id.group(1)}" in r.stdout
        ok = httpx.post(url + "/generate", json={"prompt": "cli", "max_new_tokens": 2},
                        headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    finally:
        if job_id:
            subprocess.run(["scancel", job_id.group(1)], capture_output=True)


@pytest.mark.slurm
def test_submit_fails_fast_on_a_wrong_profile(slurm, tmp_path):
    profile = load_config().profile("slurm")
    with pytest.raises(ConfigError, match="unknown partition 'nope'"):
        submit(profile.replace(partition="nope"), directory=tmp_path)
    with pytest.raises(ConfigError, match="at most 2"):
        submit(profile.replace(gpus_per_worker=3), directory=tmp_path)
    with pytest.raises(ConfigError, match="slurm profile"):
        submit(load_config().profile("local"), directory=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was submitted or written
