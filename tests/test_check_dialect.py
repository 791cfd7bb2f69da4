"""One checker dialect: every topic's ``check(exercise, answer, **options)`` returns a Result, for a right
answer, a wrong one and one not attempted yet, and never raises for the learner's mistake."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

import labkit.check
from labkit.check import Result, UnknownExercise, checker_book


def _topics() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(labkit.check.__path__) if not m.name.startswith("_"))


class _Future:
    """Enough of a dask Future for the cluster checker: the task already ran here."""

    def __init__(self, value: object):
        self.key, self._value = "probe", value

    def result(self, timeout: float | None = None) -> object:
        return self._value

    def cancel(self) -> None:
        pass


class _FakeCluster:
    """One worker that owns GPU 0; submit runs the task in this process."""

    class client:  # noqa: N801 - stands in for the handle's .client attribute
        @staticmethod
        def submit(fn, *args, resources=None, **kwargs):
            return _Future(fn(*args))

    @staticmethod
    def workers() -> dict:
        return {"tcp://w0": {"resources": {"GPU": 1}}}

    @staticmethod
    def gpu_map() -> dict:
        return {"tcp://w0": ["0"]}


def _todo(*args, **kwargs):
    raise NotImplementedError


def _right(topic: str, name: str):
    mod = importlib.import_module(f"labkit.check.{topic}")
    if (topic, name) == ("serve", "reproducible"):
        return [{"text": "once", "seed": 1}, {"text": "once", "seed": 1}]
    source = mod.solution(name)  # the shown solution, run with the module's imports at hand
    space = dict(vars(mod))
    exec(source, space)
    return space[next(n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef))]


# a wrong answer per exercise, and the options its checker needs; a new exercise must add a row here
WRONG = {
    ("attention", "attention"): lambda q, k, v, mask=None: q,
    ("attention", "causal_mask"): lambda t_q, t_k: "mask",
    ("attention", "online_softmax"): lambda m, l, acc, s, v: (m, l, acc),
    ("attention", "split_heads"): lambda x, h: x,
    ("attention", "merge_heads"): lambda y: y,
    ("bert", "head_attention"): lambda model, hidden, mask, layer, head: hidden[layer],
    ("cluster", "gpu_task"): lambda client, fn: fn(),
    ("cluster", "worker_devices"): lambda job_gpus, workers, gpus: [job_gpus] * workers,
    ("cluster", "job_layout"): lambda n_workers, gpus_per_node: (1, n_workers),
    ("data", "normaliser"): lambda text: text,
    ("data", "dedup_key"): lambda text: text,
    ("data", "bpe_step"): lambda word_counts: (("a", "b"), word_counts),
    ("finetune", "mean_pool"): lambda hidden, mask: hidden.mean(1),
    ("hardware", "param_count"): lambda *a: 1,
    ("hardware", "training_memory"): lambda *a: 1.0,
    ("hardware", "training_days"): lambda *a: 1.0,
    ("hardware", "allreduce_seconds"): lambda *a: 1.0,
    ("prune", "magnitude_mask"): lambda w, amount: w,
    ("prune", "global_masks"): lambda weights, amount: [w.abs() > 0 for w in weights],
    ("prune", "head_mask"): lambda scores, k: scores > scores.min(),
    ("prune", "zero_heads"): lambda model, keep: None,
    ("serve", "batched"): lambda client, bodies: [client.post("/generate", json=b).json() for b in bodies],
    ("serve", "percentile"): lambda values, q: 0.0,
    ("serve", "reproducible"): [{"text": "once", "seed": 1}, {"text": "twice", "seed": 2}],
    ("train", "lr_schedule"): lambda *a: 1.0,
    ("train", "ring_allreduce"): lambda grads, ring: grads,
}
OPTIONS = {("cluster", "gpu_task"): {"cluster": _FakeCluster()}}  # what a checker needs besides the answer
CASES = [(t, n) for t in _topics() for n in importlib.import_module(f"labkit.check.{t}").check.names]


@pytest.mark.parametrize("topic", _topics())
def test_every_topic_has_one_check_and_no_other_checker(topic):
    mod = importlib.import_module(f"labkit.check.{topic}")
    assert callable(mod.check) and mod.check.names, f"labkit.check.{topic} has no check(exercise, answer)"
    others = [n for n, v in vars(mod).items()
              if n.startswith("check") and n != "check" and callable(v) and v.__module__ == mod.__name__]
    assert not others, f"labkit.check.{topic} has other public checkers {others}: make them exercises of check()"
    params = list(inspect.signature(mod.check).parameters)
    assert params[:2] == ["exercise", "answer"]
    with pytest.raises(UnknownExercise, match="valid names: " + ", ".join(mod.check.names)):
        mod.check("no-such-exercise", _todo)


def test_every_exercise_has_a_wrong_answer_here():
    assert sorted(CASES) == sorted(WRONG), "add a wrong answer for each new exercise to WRONG"


@pytest.fixture(scope="module")
def serve_client():
    """A real labkit serve (the demo model) for the serving checker that sends requests."""
    from labkit.serve import ServeConfig, demo_generator, start

    with start(demo_generator(), config=ServeConfig.for_scale("tiny")) as srv, srv.client() as c:
        yield c


@pytest.mark.parametrize("topic,name", CASES)
def test_right_wrong_and_unattempted_answers_get_one_result_type(topic, name, monkeypatch, request):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what the fake cluster's GPU worker would see
    check = importlib.import_module(f"labkit.check.{topic}").check
    opts = OPTIONS.get((topic, name), {})
    if (topic, name) == ("serve", "batched"):
        opts = {"client": request.getfixturevalue("serve_client"), "tries": 1}
    wrong = WRONG[topic, name]
    unattempted = [None] + ([_todo] if callable(wrong) else [])  # a function still raising, or no answer
    for answer, want in [(_right(topic, name), True), (wrong, False)] + [(u, None) for u in unattempted]:
        r = check(name, answer, **opts)
        assert type(r) is Result, f"{topic}.check({name!r}) returned {type(r).__name__}, not labkit.check.Result"
        assert r.passed is want, f"{topic}.check({name!r}, {answer!r}): passed={r.passed}: {r.message}"
        assert r.name == name and r.message and bool(r) is (want is True)
        assert (r.problem is None) is (want is True)
        assert r.icon in str(r) and name in r._repr_html_()


def test_a_result_renders_and_escapes():
    r = Result(False, "use <b>dim=-1</b>", "wrong_axis", name="softmax")
    page = r._repr_html_()
    assert "&lt;b&gt;" in page and "<b>dim" not in page and "not right yet" in page
    assert str(r) == "❌ softmax: use <b>dim=-1</b>"
    assert str(Result(None, "not yet: fill it in")).startswith("⏳")


def test_a_checker_tripped_by_an_odd_answer_reports_it():
    from labkit.check.attention import check

    r = check("merge_heads", lambda y: object())
    assert type(r) is Result and r.passed is False
    with pytest.raises(TypeError, match="the checker takes"):
        check("merge_heads", lambda y: y, sede=1)  # a typo in the notebook's call is the author's, named


def test_a_checker_of_another_dialect_is_refused():
    for other in (True, "correct: well done"):
        check = checker_book("demo", {"x": lambda answer, other=other: other})
        with pytest.raises(TypeError, match="not a Result: return correct"):
            check("x", 1)
