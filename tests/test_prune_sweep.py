"""The sparsity sweep runs its points on real Dask workers and streams them as events."""

import pytest
import torch

from labkit.events import Recorder
from labkit.model import GPT, GPTConfig
from labkit.prune.evaluate import evaluate_point
from labkit.prune.sweep import sweep


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def test_sweep_matches_local_evaluation_and_emits(client):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, precision="float32")).eval()
    val = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    pts = sweep(client, model, val, amounts=(0.0, 0.5), methods=("unstructured", "structured"), sink=rec)
    assert [(p.method, p.amount) for p in pts] == [("unstructured", 0.0), ("unstructured", 0.5),
                                                  ("structured", 0.0), ("structured", 0.5)]
    local = evaluate_point(model, "structured", 0.5, val)
    assert pts[3].perplexity == pytest.approx(local.perplexity, rel=1e-5)
    assert sorted((e["method"], e["amount"]) for e in rec.of("prune")) == sorted((p.method, p.amount) for p in pts)
    # the workers logged the same points on the Dask topic
    logged = client.get_events("labkit")
    assert sum(1 for _, e in logged if e.get("kind") == "prune") >= 4


def test_sweep_rejects_bad_method(client):
    with pytest.raises(ValueError, match="choose from"):
        sweep(client, torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), methods=("random",))
