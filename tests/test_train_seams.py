"""The seams of labkit.train: the nested model config, a strategy and a checkpointer that replace
DDP and the checkpoint files without editing the loop, host syncs only at sync points, and the run
handle as a real concurrent.futures.Future."""

from __future__ import annotations

import concurrent.futures
import copy
import sys
import threading
from collections import Counter

import pytest
import torch

from labkit import checkpoint as C
from labkit.model import GPTConfig
from labkit.strategy import SingleProcess
from labkit.train import TrainConfig, TrainingRun, open_data, train

torch.set_num_threads(1)


def cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, max_steps=8, warmup_steps=2, eval_interval=4, eval_iters=1, sample_tokens=0, seed=3)
    base.update(kw)
    return TrainConfig(model=GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, precision="float32"), **base)


def test_model_config_is_nested_and_can_be_any_gpt_shape(shards, tmp_path):
    c = cfg()
    assert c.replace(n_layer=3).model.n_layer == 3 and c.model.n_layer == 1  # flat model keys, a copy
    assert c.replace(model={"n_head": 4}).model.n_head == 4
    assert TrainConfig(**c.to_dict()) == c  # plain types (a checkpoint's train_config) round-trip
    with pytest.raises(ValueError, match="n_layr.*valid.*n_layer"):
        c.replace(n_layr=2)
    tiny = TrainConfig.for_scale("tiny", n_layer=3, model={"n_head": 4, "n_embd": 64})
    assert (tiny.model.n_layer, tiny.model.n_head, tiny.model.n_embd) == (3, 4, 64)
    # per-layer heads and a head_dim of its own: shapes the flat fields could not say
    shaped = cfg(max_steps=3, checkpoint_dir=str(tmp_path)).replace(
        n_layer=2, head_dim=4, layer_heads=(2, 1), layer_ffn=(32, 16), vocab_size=7)
    res = train(shaped, shards)
    got = res.model.config
    assert (got.head_dim, got.layer_heads, got.layer_ffn) == (4, (2, 1), (32, 16))
    assert got.vocab_size == open_data(shards)[0].vocab_size != 7  # the vocabulary comes from the data
    model, extra = C.load(res.checkpoint)
    assert model.config == got and TrainConfig(**extra["train_config"]) == shaped


class _Reads:
    """Counts the values labkit code reads back from tensors (item, tolist, float)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("item", "tolist", "__float__"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(real))

    def _counting(self, real):
        def read(t, *a, **kw):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("labkit"):
                self.n += 1
            return real(t, *a, **kw)
        return read


def test_the_host_syncs_only_at_the_first_step_and_every_log_interval(shards, monkeypatch):
    every_step = train(cfg(max_steps=20, eval_interval=0), shards)
    events = []
    reads = _Reads(monkeypatch)
    res = train(cfg(max_steps=20, eval_interval=0, log_interval=5), shards, sink=events.append)
    monkeypatch.undo()
    assert res.host_syncs == reads.n == 1 + 20 // 5  # the first step (its time), then steps 5, 10, 15, 20
    assert every_step.host_syncs == 20
    assert res.losses == every_step.losses and len(res.losses) == 20  # every step's loss, read in batches
    train_events = [e for e in events if e["kind"] == "train"]
    assert [e["step"] for e in train_events] == [1, 5, 10, 15, 20]
    assert [e["global_loss"] for e in train_events] == [res.losses[s - 1] for s in (1, 5, 10, 15, 20)]
    assert all(e["tokens_per_s"] > 0 for e in train_events)
    # validations are sync points of their own; no train events at all with log_interval=0
    quiet = train(cfg(max_steps=20, eval_interval=10, log_interval=0), shards)
    assert quiet.host_syncs == 1 + 2 * 2  # the first step; steps 10 and 20: the losses, then the val loss


def test_tokens_per_s_counts_the_training_steps_between_sync_points(shards, monkeypatch):
    """On a fake clock where a step takes 1 s and nothing else takes time, the run's tokens/s is one
    step's tokens whatever the log interval (the first step left out)."""
    import types

    import labkit.train as T

    now = [0.0]
    real_step = T.train_step

    def one_second_step(run, step):
        now[0] += 1.0
        return real_step(run, step)

    monkeypatch.setattr(T, "train_step", one_second_step)
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: now[0], time=lambda: now[0]))
    per_step = 2 * 16  # batch_size * block_size
    for every in (1, 3, 10):
        events = []
        res = train(cfg(max_steps=12, log_interval=every), shards, sink=events.append)
        assert res.tokens_per_s == per_step, every
        assert all(e["tokens_per_s"] == per_step for e in events if e["kind"] == "train"), every


class Spy(SingleProcess):
    """A strategy that records what the loop asks of it (and otherwise is a world of one)."""

    def __init__(self) -> None:
        super().__init__(name="spy")
        self.calls: Counter = Counter()

    def wrap(self, model, device):
        self.calls["wrap"] += 1
        return super().wrap(model, device)

    def no_sync(self, wrapped):
        self.calls["no_sync"] += 1
        return super().no_sync(wrapped)

    def all_mean(self, tensor):
        self.calls["all_mean"] += 1
        return super().all_mean(tensor)

    def clip_grad_norm(self, wrapped, max_norm):
        self.calls["clip"] += 1
        return super().clip_grad_norm(wrapped, max_norm)

    def model_state(self, wrapped):
        self.calls["model_state"] += 1
        return super().model_state(wrapped)


def test_a_strategy_of_ones_own_is_used_without_editing_the_loop(shards, tmp_path):
    spy = Spy()
    config = cfg(grad_accum=2, log_interval=4, checkpoint_dir=str(tmp_path), checkpoint_interval=4)
    res = train(config, shards, strategy=spy)
    assert res.losses == train(config.replace(checkpoint_dir=None), shards).losses
    assert spy.calls["wrap"] == 1
    assert spy.calls["no_sync"] == 8  # the first of the 2 micro-batches of each of the 8 steps
    assert spy.calls["clip"] == 8
    assert spy.calls["all_mean"] == 3 + 2  # losses at steps 1, 4, 8; val losses at steps 4, 8
    assert spy.calls["model_state"] == 2  # checkpoints at steps 4 and 8


class MemoryCheckpointer:
    """Checkpoints kept in memory: another format, plugged in beside the files."""

    def __init__(self) -> None:
        self.saved: dict[int, dict] = {}

    def save(self, run, step):
        self.saved[step] = copy.deepcopy({"model": run.strategy.model_state(run.wrapped),
                                          "opt": run.strategy.optimizer_state(run.wrapped, run.optimizer),
                                          "config": run.model_config.to_dict()})
        return f"memory:{step}"

    def load_latest(self):
        if not self.saved:
            return None
        step = max(self.saved)
        return C.Resume(step=step, world_size=1, grad_accum=1, model_config=self.saved[step]["config"],
                        payload=self.saved[step], where=f"memory:{step}")

    def restore(self, run, resume):
        run.strategy.load_model_state(run.wrapped, resume.payload["model"])
        run.strategy.load_optimizer_state(run.wrapped, run.optimizer, resume.payload["opt"])


def test_a_checkpoint_format_of_ones_own_saves_and_resumes_bit_exact(shards, tmp_path):
    full = train(cfg().replace(dropout=0.1), shards)
    part = cfg(checkpoint_interval=3).replace(dropout=0.1)
    mem = MemoryCheckpointer()
    events = []

    def crash_at_step_7(event):
        events.append(event)
        if event["kind"] == "train" and event["step"] == 7:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        train(part, shards, sink=crash_at_step_7, checkpointer=mem)
    assert sorted(mem.saved) == [3, 6] and not list(tmp_path.iterdir())  # no files: the format is its own
    assert [e["path"] for e in events if e["kind"] == "checkpoint"] == ["memory:3", "memory:6"]
    resumed = train(part, shards, resume=True, checkpointer=mem)
    assert resumed.start_step == 6 and resumed.losses == full.losses[6:]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_training_run_is_a_concurrent_futures_future():
    gate = threading.Event()
    run = TrainingRun(lambda: gate.wait(10) and "trained")
    assert isinstance(run, concurrent.futures.Future) and not run.done() and run.running()
    with pytest.raises(TimeoutError, match="still running"):
        run.result(timeout=0.05)
    called = []
    run.add_done_callback(called.append)
    gate.set()
    done, _ = concurrent.futures.wait([run], timeout=10)
    assert done == {run} and run.result() == "trained" and run.exception() is None and called == [run]
    assert not run.cancel() and "done" in repr(run)

    def fail():
        raise OSError("node went away")

    failed = TrainingRun(fail)
    assert isinstance(next(concurrent.futures.as_completed([failed], timeout=10)).exception(), OSError)
    with pytest.raises(OSError, match="node went away"):
        failed.result()
    assert "failed" in repr(failed)
