"""Checkers of notebook 01_cluster that need no cluster: the reference passes on fresh random shapes, the
starter is not attempted, and each plausible wrong answer fails with its own problem tag. (``gpu_task``
runs on a live cluster: tests/test_cluster_local.py::test_gpu_task_checker covers it.)"""

import pytest

from labkit.check.cluster import check, solution, solved

OFFLINE = ["worker_devices", "job_layout"]


def _stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("name", OFFLINE)
def test_reference_passes_and_starter_is_not_attempted(name):
    seeds = set()
    for _ in range(5):  # fresh shapes every time
        r = check(name, solved(name))
        assert r.passed, r.message
        seeds.add(r.details["seed"])
    assert len(seeds) > 1 and f"seed {r.details['seed']}" in r.message
    r = check(name, _stub)
    assert r.passed is None and r.problem == "not_implemented"
    assert name in solution.names and f"def {name}(" in solution(name)


def test_a_seed_repeats_the_draw():
    wrong = lambda job, w, g: [job] * w  # noqa: E731
    assert check("worker_devices", wrong, seed=77) == check("worker_devices", wrong, seed=77)


def _ids(job):
    return [i for i in job.split(",") if i]


@pytest.mark.parametrize("wrong, problem", [
    (lambda job, w, g: [job] * w, "whole_list"),                                   # no slicing at all
    (lambda job, w, g: [",".join(str(i * g + k) for k in range(g)) for i in range(w)], "from_zero"),
    (lambda job, w, g: [",".join(str(k) for k in range(g))] * w, "local_ids"),     # torch's cuda:0.. numbering
    (lambda job, w, g: [",".join(_ids(job)[i::w]) for i in range(w)], "interleaved"),
    (lambda job, w, g: [",".join(_ids(job)[i * g:(i + 1) * g]) for i in range(w)][:1], "wrong_count"),
    (lambda job, w, g: job, "not_a_list"),
])
def test_worker_devices_mistakes(wrong, problem):
    for _ in range(5):
        r = check("worker_devices", wrong)
        assert r.passed is False and r.problem == problem, r


def test_worker_devices_accepts_lists_of_ids():
    as_lists = lambda job, w, g: [_ids(job)[i * g:(i + 1) * g] for i in range(w)] if w > 1 else [_ids(job)]  # noqa: E731
    assert check("worker_devices", as_lists).passed


@pytest.mark.parametrize("wrong, problem", [
    (lambda n, g: (1, n), "too_big_for_a_node"),            # --gres counts GPUs per node, not per job
    (lambda n, g: (n, 1), "not_packed"),                    # one job per worker: right count, but spread out
    (lambda n, g: (-(-n // g), min(n, g)), "wrong_total"),  # ceil(n/g) jobs of g: too many workers when g does not divide n
    (lambda n, g: n, "not_a_pair"),
])
def test_job_layout_mistakes(wrong, problem):
    for _ in range(5):
        r = check("job_layout", wrong)
        assert r.passed is False and r.problem == problem, r
