"""labkit.check.finetune: the mean-pooling checker passes the reference and names plausible mistakes."""

import pytest
import torch

from labkit.check.finetune import check, solution, solved


def test_the_solution_passes_on_fresh_inputs_and_names_its_seed():
    for _ in range(3):
        r = check("mean_pool", solved("mean_pool"))
        assert r.passed is True and "seed " in r.message
    assert "def my_mean_pool" in solution("mean_pool")


def test_the_starter_is_not_attempted():
    def my_mean_pool(hidden, attention_mask):
        raise NotImplementedError

    r = check("mean_pool", my_mean_pool)
    assert r.passed is None and "NotImplementedError" in r.message


def _masked_sum(h, m):
    return (h * m[..., None]).sum(1)


WRONG = {
    "padding": lambda h, m: h.mean(1),                                     # padding averaged in
    "length": lambda h, m: _masked_sum(h, m) / h.shape[1],                 # divided by the padded length
    "sum": _masked_sum,                                                    # no division at all
    "cls": lambda h, m: h[:, 0],                                           # [CLS] only
    "axis": lambda h, m: (h * m[..., None]).sum(-1) / m.sum(-1, keepdim=True),  # over the hidden axis
    "values": lambda h, m: _masked_sum(h, m) / (m.sum(1, keepdim=True) + 1),   # off by one in the count
    "none": lambda h, m: None,
    "error": lambda h, m: h @ m,                                           # a shape error
}


@pytest.mark.parametrize("problem", WRONG)
def test_plausible_mistakes_fail_with_their_tag(problem):
    r = check("mean_pool", WRONG[problem])
    assert r.passed is False and r.problem == problem, r.message
    assert "seed " in r.message or problem == "error"


def test_a_seed_replays_the_same_case():
    seen = []
    check("mean_pool", lambda h, m: seen.append((h.clone(), m.clone())) or solved("mean_pool")(h, m), seed=7)
    check("mean_pool", lambda h, m: seen.append((h.clone(), m.clone())) or solved("mean_pool")(h, m), seed=7)
    assert torch.equal(seen[0][0], seen[3][0]) and torch.equal(seen[0][1], seen[3][1])
    other = []
    check("mean_pool", lambda h, m: other.append(h.clone()) or solved("mean_pool")(h, m), seed=8)
    assert not (other[0].shape == seen[0][0].shape and torch.equal(other[0], seen[0][0]))
