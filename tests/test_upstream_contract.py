"""What labkit/cluster/upstream.py relies on in dask-jobqueue and distributed still exists, with the same shape.

When this fails after an upgrade, the message names the package, its version, what labkit relies on and
what to do: pin the package below that version in pyproject.toml and environment.yml, or update
labkit/cluster/upstream.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from labkit.cluster import upstream
from labkit.cluster.upstream import Reliance, problem

REPO = Path(__file__).resolve().parent.parent


def test_classes_and_config_keep_their_shape():
    problems = upstream.contract_problems()
    assert not problems, "\n".join(problems)


def test_a_running_cluster_keeps_its_private_attributes():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        problems = upstream.contract_problems({"SpecCluster()": cluster})
        assert cluster.status.name == "running"
    assert not problems, "\n".join(problems)


def test_a_slurm_cluster_of_several_workers_per_job_groups_them(tmp_path):
    # worker_names and LabkitSLURMCluster._job_of read these "group" suffixes; no sbatch is run
    from dask_jobqueue.slurm import SLURMJob

    cluster = upstream.LabkitSLURMCluster(cores=2, processes=2, memory="1GiB", log_directory=str(tmp_path),
                                          scheduler_options={"dashboard_address": None}, python="python")
    try:
        problems = upstream.contract_problems({"SpecCluster()": cluster})
        assert cluster.new_spec["group"] == ["-0", "-1"], f"dask-jobqueue changed grouped workers: {cluster.new_spec}"
        assert upstream.worker_names(cluster, "job") == ["job"]  # not in worker_spec yet
        cluster.worker_spec["job"] = cluster.new_spec
        assert upstream.worker_names(cluster, "job") == ["job-0", "job-1"]
        upstream.forget_job(cluster, "job")
        assert "job" not in cluster.worker_spec
        job = SLURMJob(scheduler="tcp://127.0.0.1:1", name="x", cores=1, memory="1GiB", python="python")
        assert job.job_id is None and re.fullmatch(job.job_id_regexp, "4711"), "Job.job_id / job_id_regexp changed"
    finally:
        cluster.close()
    assert not problems, "\n".join(problems)


class _Lacking:
    """A stand-in for an upgraded class: _submit_job gone, _call no longer async, _update_worker_status reshaped."""

    def _call(self, cmd, **kwargs):
        return ""

    def _update_worker_status(self, event):
        return None

    async def instantiate(self, retries):
        return None


@pytest.mark.parametrize("reliance, found", [
    (Reliance("dask-jobqueue", "SLURMJob", "_submit_job", "coroutine", ("script_filename",), why="w"), "it is missing"),
    (Reliance("dask-jobqueue", "SLURMJob", "_call", "coroutine", ("cmd", "**"), why="w"), "not an async def"),
    (Reliance("distributed", "SpecCluster", "_update_worker_status", "method", ("op", "msg"), why="w"),
     "expected parameters (op, msg)"),
    (Reliance("distributed", "Nanny", "instantiate", "coroutine", (), why="w"), "it requires retries"),
    (Reliance("distributed", "SpecCluster()", "_call", "attribute", of_type=set, why="w"), "it is a function"),
])
def test_checker_fails_loudly_with_what_to_do(reliance, found):
    msg = problem(reliance, _Lacking)
    assert msg is not None and found in msg, msg
    version = upstream.version_of(reliance.package)
    assert msg.startswith(f"{reliance.package} {version}: labkit relies on {reliance.owner}.{reliance.name}"), msg
    assert f"pin {reliance.package}<{version} in pyproject.toml" in msg and "labkit/cluster/upstream.py" in msg


def test_contract_fails_when_an_upgrade_drops_what_labkit_overrides(monkeypatch):
    from dask_jobqueue.core import Job

    monkeypatch.delattr(Job, "_submit_job")  # as if dask-jobqueue renamed it
    problems = upstream.contract_problems()
    assert len(problems) == 1 and "SLURMJob._submit_job" in problems[0] and "it is missing" in problems[0]
    assert f"pin dask-jobqueue<{upstream.version_of('dask-jobqueue')}" in problems[0]


def test_checker_reports_a_missing_config_key():
    msg = problem(Reliance("distributed", "distributed", "distributed.worker.no-such-key", "config", why="w"))
    assert msg and "dask config key 'distributed.worker.no-such-key'" in msg and "the key is missing" in msg


def test_checker_passes_a_matching_class():
    class Fine:
        async def _submit_job(self, script_filename):
            return ""

    assert problem(Reliance("dask-jobqueue", "SLURMJob", "_submit_job", "coroutine", ("script_filename",)), Fine) is None


def _bounds(spec: str) -> tuple[str, str]:
    lower = re.search(r">=\s*([\w.]+)", spec)
    upper = re.search(r"<\s*([\w.]+)", spec)
    assert lower and upper, f"{spec!r} needs a floor and an upper bound (the versions CI ran)"
    return lower.group(1), upper.group(1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("package, requirement", [("dask", "dask"), ("distributed", "dask"),
                                                  ("dask-jobqueue", "dask-jobqueue")])
def test_upper_bounds_hold_the_installed_versions(package, requirement):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{requirement}(\[|[<>=!~ ]|$)", d)]
    lower, upper = _bounds(spec)
    installed = _version(upstream.version_of(package))
    assert _version(lower) <= installed < _version(upper), (
        f"{package} {upstream.version_of(package)} is outside {spec!r} in pyproject.toml: CI runs the installed "
        "version, so move the bound to it once tests/test_upstream_contract.py passes")
