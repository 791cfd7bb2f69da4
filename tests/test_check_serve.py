"""The serving notebook's checkers accept right answers and name the mistake in wrong ones."""

import math

from labkit.check.serve import check, solved


def test_reference_solution_passes():
    assert check("percentile", solved("percentile"))


def test_common_mistakes_are_named():
    def unsorted(values, q):
        pos = (len(values) - 1) * q / 100
        lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    def fraction(values, q):
        return solved("percentile")(values, q / 100)

    def nearest(values, q):
        s = sorted(values)
        return s[max(0, math.ceil(q / 100 * len(s)) - 1)]

    assert "sort" in check("percentile", unsorted).message
    assert "percent" in check("percentile", fraction).message
    assert "nearest-rank" in check("percentile", nearest).message or "neighbours" in check("percentile", nearest).message
    assert check("percentile", lambda v, q: sorted(v)[round((len(v) - 1) * q / 100)]).problem == "neighbour"
    assert "raised" in check("percentile", lambda v, q: 1 / 0).message
    assert "None" in check("percentile", lambda v, q: None).message
    assert not check("percentile", lambda v, q: 0.0)


def test_reproducible():
    def answers(texts, seeds):
        return [{"text": t, "seed": s} for t, s in zip(texts, seeds)]

    assert check("reproducible", answers(["ab", "ab"], [3, 3]))
    assert "seeds differ" in check("reproducible", answers(["ab", "ab"], [3, 4])).message
    assert "different text" in check("reproducible", answers(["ab", "ac"], [3, 3])).message
    assert "both answers" in check("reproducible", answers(["ab"], [3])).message
    assert "JSON bodies" in check("reproducible", ["ab", "ab"]).message


# ---------------------------------------------------------------- batched: concurrent requests, same text

import random  # noqa: E402
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: E402

import pytest  # noqa: E402

from labkit.serve import ServeConfig, demo_generator, start  # noqa: E402
from labkit.serve.load import post_together  # noqa: E402


@pytest.fixture(scope="module")
def client():
    import torch

    torch.set_num_threads(1)
    with start(demo_generator(), config=ServeConfig.for_scale("tiny")) as srv, srv.client() as c:
        yield c


def sequential(client, bodies):  # the notebook's starter: one request after another
    return [client.post("/generate", json=b).json() for b in bodies]


def test_batched_reference_and_labkit_sender_pass(client):
    r = check("batched", solved("batched"), client=client)
    assert r.passed, r.message
    assert r.details["alone"] == r.details["batched"] and "requests each" in r.message
    assert f"seed {r.details['seed']}" in r.message
    assert check("batched", post_together, client=client)


def test_batched_starter_fails_as_not_concurrent(client):
    r = check("batched", sequential, client=client, tries=1)
    assert r.passed is False and r.problem == "not_concurrent", r.message


def test_batched_mistakes_are_named(client):
    def arrival_order(client, bodies):  # concurrent, but answers in the order they finished
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(client.post, "/generate", json=b) for b in bodies]
            return [f.result().json() for f in as_completed(futures)]

    def shuffled(client, bodies):
        answers = post_together(client, bodies)
        random.Random(0).shuffle(answers)
        return answers

    def responses(client, bodies):
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda b: client.post("/generate", json=b), bodies))

    def no_seed(client, bodies):
        return post_together(client, [{k: v for k, v in b.items() if k != "seed"} for b in bodies])

    r = check("batched", shuffled, client=client)
    assert r.problem == "order", r.message
    assert check("batched", arrival_order, client=client).problem in ("order", None)  # may finish in order
    assert check("batched", responses, client=client).problem == "not_json"
    assert check("batched", no_seed, client=client).problem == "bodies_changed"
    assert check("batched", lambda c, b: post_together(c, b)[:-1], client=client).problem == "count"


def test_batched_catches_a_server_whose_batches_change_answers():
    """If batching did change the sampled text, the check must say so (a fake client that lies)."""
    class Lying:
        def __init__(self):
            self.batches = 0

        def post(self, path, json):
            text = "alone" if self.batches == 0 else "batched"
            return _Answer({"text": text, "seed": json["seed"]})

        def get(self, path):
            return _Answer({"batches": self.batches})

    lying = Lying()

    def together(client, bodies):
        client.batches += 1  # all bodies in one batch
        return [client.post("/generate", b).json() for b in bodies]

    r = check("batched", together, client=lying)
    assert r.passed is False and r.problem == "text_differs", r.message


class _Answer:
    def __init__(self, body):
        self.body = body

    def json(self):
        return self.body


def test_percentile_seed_is_named_and_reproducible():
    r = check("percentile", solved("percentile"))
    assert f"seed {r.details['seed']}" in r.message
    wrong = lambda v, q: sorted(v)[0]  # noqa: E731
    assert check("percentile", wrong, seed=9).message == check("percentile", wrong, seed=9).message
