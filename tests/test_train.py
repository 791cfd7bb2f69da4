"""labkit.train in one process: schedule, optimizer groups, determinism, accumulation, checkpoints, resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from labkit import checkpoint as C
from labkit import model as M
from labkit.checkpoint import latest_checkpoint, list_checkpoints
from labkit.train import TrainConfig, lr_at, make_optimizer, train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def cfg(**kw) -> TrainConfig:
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=8, warmup_steps=2,
                eval_interval=4, eval_iters=1, sample_tokens=0, precision="float32", seed=3)
    base.update(kw)
    return TrainConfig().replace(**base)  # model keys (n_layer, ...) go into TrainConfig.model


def test_presets_and_overrides(tmp_path, monkeypatch):
    tiny = TrainConfig.for_scale("tiny")
    assert tiny.max_steps <= 50 and tiny.model.n_embd <= 64
    assert TrainConfig.for_scale("full").model.n_embd > TrainConfig.for_scale("binder").model.n_embd
    user = tmp_path / "user.yaml"
    user.write_text("scales:\n  tiny:\n    train:\n      max_steps: 7\n")
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(user))
    assert TrainConfig.for_scale("tiny").max_steps == 7
    assert TrainConfig.for_scale("tiny", max_steps=3).max_steps == 3
    with pytest.raises(ValueError, match="valid"):
        TrainConfig.for_scale("tiny", max_stepz=3)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_lr_schedule_warms_up_then_decays_to_min():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, c) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))
    assert lrs[60] == pytest.approx(0.55)  # half-way through the cosine
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_weight_decay_groups():
    m = M.GPT(cfg().gpt_config(50))
    opt = make_optimizer(m, cfg(weight_decay=0.2))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters()}  # every parameter once (the tied one too)
    assert m.transformer.wte.weight in decay["params"]


def test_training_learns_emits_events_and_is_deterministic(shards):
    events = []
    a = train(cfg(max_steps=20, sample_tokens=8, lr=1e-2), shards, sink=events.append)
    b = train(cfg(max_steps=20, sample_tokens=8, lr=1e-2), shards)
    assert a.losses == b.losses  # bit-identical under the seed on CPU
    assert a.losses[-1] < a.losses[0] - 0.3
    assert [v["step"] for v in a.val] == [4, 8, 12, 16, 20]
    assert a.val[-1]["ppl"] == pytest.approx(math.exp(a.val[-1]["loss"]))
    assert list(a.samples) == ["before", "step 4", "step 8", "step 12", "step 16", "after"]
    assert a.samples == b.samples and all(t.startswith("def") for t in a.samples.values())
    periodic = [e for e in events if e["kind"] == "sample" and e["when"] == "step"]
    assert [e["step"] for e in periodic] == [4, 8, 12, 16]  # with each validation; step 20's is "after"
    assert [e["text"] for e in periodic] == [a.samples[f"step {s}"] for s in (4, 8, 12, 16)]
    assert [e["when"] for e in events if e["kind"] == "sample"] == ["before"] + ["step"] * 4 + ["after"]
    steps = [e for e in events if e["kind"] == "train"]
    assert [e["step"] for e in steps] == list(range(1, 21))
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "mem_mb", "rank"):
        assert key in steps[0]
    assert steps[0]["lr"] == pytest.approx(lr_at(0, cfg(lr=1e-2)))
    assert {e["kind"] for e in events} >= {"train", "val", "sample"}
    c = train(cfg(max_steps=20, seed=4, lr=1e-2), shards)
    assert c.losses != a.losses


def test_periodic_samples_leave_training_untouched(shards):
    from labkit.train import _sample, open_data

    with_samples = train(cfg(dropout=0.1, sample_tokens=6, eval_interval=2), shards)
    without = train(cfg(dropout=0.1, sample_tokens=0, eval_interval=2), shards)
    assert [k for k in with_samples.samples if k.startswith("step")] == ["step 2", "step 4", "step 6"]
    assert with_samples.losses == without.losses
    for (k, a), (_, b) in zip(with_samples.model.state_dict().items(), without.model.state_dict().items()):
        assert torch.equal(a, b), k
    # the sampler draws from a generator of its own, never from the global RNG training uses
    model = with_samples.model.train()
    tokenizer = open_data(shards)[0].tokenizer()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    texts = {_sample(model, tokenizer, cfg(sample_tokens=12), torch.device("cpu"), seed=s) for s in (1, 2, 1)}
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert len(texts) == 2  # same seed, same text; another seed, another text


def test_grad_accumulation_matches_the_bigger_batch(shards):
    big = train(cfg(batch_size=4), shards)
    acc = train(cfg(batch_size=2, grad_accum=2), shards)
    assert big.effective_batch == acc.effective_batch == 4
    for x, y in zip(big.losses, acc.losses):
        assert abs(x - y) / x < 1e-5


def test_checkpoints_keep_last_k_and_load_as_models(shards, tmp_path):
    res = train(cfg(checkpoint_dir=str(tmp_path), checkpoint_interval=2, keep_last=2), shards)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000006.pt", "step_00000008.pt"]
    model, extra = C.load(tmp_path / names[-1])
    assert extra["step"] == 8 and "optimizer" in extra
    assert C.load(tmp_path / names[-1]).tokenizer().get_vocab_size() == model.config.vocab_size
    for (k, a), (_, b) in zip(res.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_is_bit_exact(shards, tmp_path):
    full = train(cfg(dropout=0.1, sample_tokens=6, eval_interval=2), shards)  # samples at steps 2, 4, 6 too
    part = cfg(dropout=0.1, sample_tokens=6, eval_interval=2, checkpoint_dir=str(tmp_path), checkpoint_interval=3)

    def crash_at_step_7(event):
        if event["kind"] == "train" and event["step"] == 7:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):  # interrupted after step 7; the last checkpoint is step 6
        train(part, shards, sink=crash_at_step_7)
    # a later, half-written checkpoint must be skipped, not loaded
    (tmp_path / "step_00000009.pt").write_bytes(b"LABKIT-CKPT 1 sha256=00 length=10\nxx")
    assert latest_checkpoint(tmp_path)[0].name == "step_00000006.pt"
    (tmp_path / "step_00000009.pt").unlink()
    resumed = train(part, shards, resume=True)
    assert resumed.start_step == 6 and resumed.steps == 2
    assert resumed.losses == full.losses[6:]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_without_data_dir_it_trains_on_the_scale_shards_else_builds_tiny_ones(shards, tmp_path, monkeypatch,
                                                                           capsys):
    import shutil

    from labkit.data.config import default_shard_dir
    from labkit.train import default_shards

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LABKIT_SCALE", "tiny")
    assert TrainConfig.for_scale("binder").scale == "binder" and TrainConfig.for_scale().scale == "tiny"
    tiny = tmp_path / "runs" / "tiny-shards"
    # no shards for the scale: tiny ones are built under runs_dir(), and it says so
    first = train(cfg(max_steps=3, scale="binder"))
    assert (tiny / "meta.json").is_file()
    said = capsys.readouterr().out
    assert str(default_shard_dir("binder")) in said and str(tiny) in said and "built now" in said
    assert first.steps == 3
    again, note = default_shards("binder")
    assert again == tiny and "built earlier" in note
    # the scale's own shards (what 03_preprocessing writes) win once they exist; scale None = active
    shutil.copytree(shards, default_shard_dir("tiny"))
    shutil.rmtree(tiny)
    assert default_shards(None) == (default_shard_dir("tiny"), None)
    mine = train(cfg(max_steps=3))
    assert not tiny.exists() and capsys.readouterr().out == ""
    assert mine.losses == train(cfg(max_steps=3), shards).losses  # old call sites: positional data_dir
    with pytest.raises(Exception, match="no-such"):  # a named folder is used as is, never replaced
        train(cfg(max_steps=3), tmp_path / "no-such")


def test_resume_needs_a_checkpoint_dir(shards):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(cfg(), shards, resume=True)


SAVER = textwrap.dedent("""
    import sys, torch
    from labkit import checkpoint as C, model as M
    torch.set_num_threads(1)
    path = sys.argv[1]
    cfg = M.GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64, vocab_size=4000, precision="float32")
    i = 0
    while True:
        torch.manual_seed(i)
        C.save(M.GPT(cfg), path, version=i)
        print(i, flush=True)
        i += 1
""")


def test_a_process_killed_mid_save_never_leaves_a_bad_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env, text=True)
        first = proc.stdout.readline()  # one full save done
        assert first.strip().isdigit(), first
        time.sleep(delay)  # then kill it somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model, extra = C.load(path)  # loads, and is one complete version
        torch.manual_seed(extra["version"])
        expect = M.GPT(model.config)
        assert torch.equal(expect.transformer.h[3].mlp.c_fc.weight, model.transformer.h[3].mlp.c_fc.weight)
