"""The sparsity sweep runs its points on real Dask workers and streams them as events."""

import pytest
import torch

from labkit.core.events import Recorder
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


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_sweep_payload_leaves_the_callers_model_alone(device):
    import io

    from labkit.prune.sweep import _model_bytes

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, precision="float32"))
    model = model.to(device).train()
    before = {n: (p, p.device, p.data_ptr(), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    # how a real device move behaves: Module._apply puts new Parameter objects in place (a move from
    # a GPU to the CPU always makes new tensors; here the flag makes a CPU-to-CPU .cpu() do so too)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        blob = _model_bytes(model)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and model.training
    for name, (obj, dev, ptr, value, grad) in before.items():
        p = after[name]
        assert p is obj and p.device == dev and p.data_ptr() == ptr and p.requires_grad == grad, name
        assert torch.equal(p.detach(), value), name
    copy = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    assert all(t.device.type == "cpu" for t in copy.state_dict().values())
    for name, t in copy.state_dict().items():
        assert torch.equal(t, model.state_dict()[name].cpu()), name
