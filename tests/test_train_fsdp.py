"""FSDP (fully_shard) ranks on real Dask workers, sharded checkpoints (DCP), safetensors export.

Tolerances: FSDP averages the same per-rank gradients DDP does (reduce-scatter instead of
all-reduce) and AdamW is elementwise, so a shard's update is the slice of the full update; what may
differ is only the order of float32 sums (the reduction, the gradient norm summed shard by shard),
rounding of ~1e-7 relative per operation. 1e-5 relative on the losses over a short run is
thousands of roundings of room and still far below any real difference (a wrong gradient scale
or a skipped shard moves the loss by > 1e-3 within a step or two). Resharding at resume changes the
grouping of the sums too (4 per-rank means vs 2 vs one over all rows): the same bound holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from labkit.checkpoint import (CheckpointError, ShardedCheckpointer, export_safetensors, list_sharded, load,
                               read_manifest)
from labkit.core.ranks import RankError
from labkit.train import TrainConfig, train, train_distributed

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


def cfg(**kw) -> TrainConfig:
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=12, warmup_steps=3,
                lr=1e-2, eval_interval=6, eval_iters=1, sample_tokens=8, precision="float32", seed=5,
                num_threads=1)
    base.update(kw)
    return TrainConfig().replace(**base)


@pytest.fixture(scope="module")
def client4():
    """A real local Dask cluster of 4 worker processes; runs on 2 ranks take ``workers=2``."""
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = Client(cluster)
    c.wait_for_workers(4, timeout=120)
    yield c
    c.close()
    cluster.close()


def _close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp_matches_ddp_and_gathers_the_same_model(client4, shards, ranks):
    ddp = train_distributed(client4, cfg(strategy="ddp"), shards, workers=ranks)
    fsdp = train_distributed(client4, cfg(strategy="fsdp"), shards, workers=ranks)
    assert fsdp.world_size == ddp.world_size == ranks
    assert _close(fsdp.losses, ddp.losses) <= TOL
    assert [v["loss"] for v in fsdp.val] == pytest.approx([v["loss"] for v in ddp.val], rel=TOL)
    assert fsdp.losses[-1] < fsdp.losses[0]
    # the result is the whole model, gathered from the shards on rank 0 (and rank 0 sampled from it)
    worst = max((a - b).abs().max().item() for a, b in zip(fsdp.model.parameters(), ddp.model.parameters()))
    assert worst < 1e-4
    assert set(fsdp.samples) == {"before", "step 6", "after"} and fsdp.samples["after"]


def test_a_model_ddp_cannot_fit_under_the_cap_trains_under_fsdp(client4, shards):
    """7.3 M parameters: DDP's float32 model states are 16 bytes each (~117 MiB a rank) and do not fit
    80 MiB; FSDP over 4 ranks holds a quarter of them (~29 MiB), plus one block gathered at a time."""
    big = cfg(n_layer=4, n_head=4, n_embd=384, block_size=16, batch_size=1, max_steps=2, warmup_steps=1,
              eval_interval=0, sample_tokens=0, memory_cap_mb=80)
    with pytest.raises(RankError, match=r"ran out of memory under memory_cap_mb=80 \(strategy 'ddp'\).*fsdp"):
        train_distributed(client4, big.replace(strategy="ddp"), shards, workers=4)
    res = train_distributed(client4, big.replace(strategy="fsdp"), shards, workers=4)
    assert res.steps == 2 and all(l == l for l in res.losses)  # trained, finite
    # the cap was the limit, not a broken model: without it DDP trains the same model to the same losses
    free = train_distributed(client4, big.replace(strategy="ddp", memory_cap_mb=None), shards, workers=4)
    assert _close(res.losses, free.losses) <= TOL


def test_saved_on_4_ranks_resumes_on_2_and_on_1(client4, shards, tmp_path):
    whole = train_distributed(client4, cfg(strategy="fsdp", checkpoint_dir=str(tmp_path / "a"), checkpoint_interval=6,
                                           keep_last=5), shards, workers=4)
    saved = tmp_path / "a" / "step_00000006.dcp"
    distcp = sorted(p.name for p in saved.glob("*.distcp"))
    assert len(distcp) == 4, distcp  # every rank wrote its own shard
    manifest = read_manifest(saved)
    assert manifest["world_size"] == 4 and manifest["strategy"] == "fsdp" and manifest["step"] == 6
    for name, ranks in (("two", 2), ("one", 1)):
        folder = tmp_path / name
        shutil.copytree(saved, folder / saved.name)
        config = cfg(strategy="fsdp" if ranks > 1 else "auto", checkpoint_dir=str(folder))
        res = (train_distributed(client4, config, shards, workers=ranks, resume=True) if ranks > 1
               else train(config, shards, resume=True))
        assert res.start_step == 6 and res.world_size == ranks
        assert res.effective_batch == whole.effective_batch  # grad_accum took up the missing ranks
        assert _close(res.losses, whole.losses[6:]) <= TOL, (name, res.losses, whole.losses[6:])


def test_resume_in_one_process_is_bit_exact(shards, tmp_path):
    config = cfg(checkpoint_dir=str(tmp_path / "c"), checkpoint_format="sharded", checkpoint_interval=4)
    whole = train(config.replace(checkpoint_dir=str(tmp_path / "w")), shards)
    train(config.replace(max_steps=4), shards)
    assert [p.name for p in list_sharded(tmp_path / "c")] == ["step_00000004.dcp"]
    rest = train(config, shards, resume=True)
    assert rest.start_step == 4 and rest.losses == whole.losses[4:]


def test_half_written_or_corrupt_checkpoints_are_never_the_newest(shards, tmp_path):
    d = tmp_path / "c"
    train(cfg(checkpoint_dir=str(d), checkpoint_format="sharded", checkpoint_interval=4, max_steps=8, keep_last=3),
          shards)
    good, newest = list_sharded(d)[-2:]
    # a save killed before the rename leaves only a hidden partial folder: not a checkpoint
    shutil.copytree(newest, d / ".step_00000012.dcp.partial")
    # a folder whose shard was damaged after the fact is skipped, and says what is wrong
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_manifest(newest)
    found = ShardedCheckpointer(str(d)).load_latest()
    assert found is not None and found.where == str(good) and found.step == 4
    # no manifest (rank 0 died between the shards and the manifest): never taken either
    (good / "labkit.json").unlink()
    assert ShardedCheckpointer(str(d)).load_latest() is None
    assert train(cfg(checkpoint_dir=str(d), checkpoint_format="sharded", max_steps=2), shards,
                 resume=True).start_step == 0


def test_fsdp_run_exports_safetensors_that_labkit_serve_answers_from(client4, shards, tmp_path):
    from labkit.data.shards import ShardReader
    from labkit.serve.checkpoints import load_generator
    from labkit.serve.engine import GenRequest, ModelGenerator
    from labkit.serve.checkpoints import HFTokenizer

    res = train_distributed(client4, cfg(strategy="fsdp", checkpoint_dir=str(tmp_path / "ck")), shards, workers=2)
    tok = ShardReader(shards, "train").tokenizer()
    out = export_safetensors(res.model, tmp_path / "model.safetensors", tokenizer=tok)
    assert b"step" not in out.read_bytes()[:8]  # a plain safetensors file: 8-byte header length first
    back = load(out)
    for (name, a), b in zip(res.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the sharded checkpoint folder of the same run loads into one whole model too
    from_dcp = load(tmp_path / "ck" / "step_00000012.dcp")
    assert all(torch.equal(a, b) for a, b in zip(res.model.parameters(), from_dcp.model.parameters()))
    req = GenRequest("def ", 6, 0.9, 20, 7)
    want = ModelGenerator(res.model, HFTokenizer(tok)).generate([req])
    assert load_generator(out).generate([req]) == want
    # and the server itself: `labkit serve model.safetensors`
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "LABKIT_SERVE_TOKEN": "t0k", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", str(out), "--port", "0", "--no-embed",
                             "--url-file", str(tmp_path / "url")], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while not (tmp_path / "url").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "url").exists(), (tmp_path / "serve.log").read_text()
        url = (tmp_path / "url").read_text().strip()
        r = httpx.post(url + "/generate", json={"prompt": "def ", "max_new_tokens": 6, "temperature": 0.9,
                                                "top_k": 20, "seed": 7}, headers={"Authorization": "Bearer t0k"})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # a damaged export is refused with the file's name
    blob = out.read_bytes()
    out.write_bytes(blob[:-4] + bytes(4))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load(out)
    assert json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["format"] == "labkit.gpt"


def test_fsdp_computes_in_the_precision_the_run_asks_for():
    """A float32 run stays float32 under FSDP also where bf16 is fast (an AMX CPU, a GPU): FSDP's mixed
    precision comes from the model's precision, and only "auto" follows the device."""
    import torch

    from labkit.model import bf16_is_fast
    from labkit.strategy import make_strategy

    cpu = torch.device("cpu")
    assert make_strategy("fsdp", 2, "float32").param_dtype(cpu) is None
    assert make_strategy("fsdp", 2, "bfloat16").param_dtype(cpu) is torch.bfloat16
    auto = make_strategy("fsdp", 2).param_dtype(cpu)
    assert auto is (torch.bfloat16 if bf16_is_fast(cpu) else None)
    assert make_strategy("fsdp", 2, "float32").mixed_precision == "float32"
