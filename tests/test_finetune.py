"""labkit.finetune: the stdlib topic data, DDP fine-tuning of MiniLM on Dask workers, bert-base next to it."""

from __future__ import annotations

import time

import pytest
import torch

from labkit.core.events import Recorder, subscribe
from labkit.finetune import (LABELS, FinetuneConfig, bert_base_config, count_params, ddp_lines, finetune, held_out,
                             lr_factor, measure, minilm_config, topic_dataset)

torch.set_num_threads(1)


def test_the_split_holds_whole_modules_out_and_is_the_same_every_time():
    data = topic_dataset(per_module=3)
    assert set(data.modules("train")).isdisjoint(data.modules("test"))
    assert all(n > 0 for n in data.counts("train").values()) and all(n > 0 for n in data.counts("test").values())
    assert data == topic_dataset(per_module=3)
    for family in LABELS:
        assert set(held_out(family)) == {e.module for e in data.test if LABELS[e.label] == family}
    label, acc = data.majority()
    assert 0 < acc < 0.5 and data.labels[label] in LABELS
    assert all(len(e.text.split()) >= 8 for e in data.train + data.test)


def test_the_schedule_warms_up_then_decays_to_zero():
    c = FinetuneConfig(steps=10, warmup_steps=2)
    assert [lr_factor(s, c) for s in (0, 1, 2)] == [0.5, 1.0, 1.0] and lr_factor(9, c) == pytest.approx(0.125)


def test_two_ranks_of_b_train_like_one_rank_of_2b(client):
    """Every rank ends with bit-identical weights (DDP), and 2 ranks of batch b follow 1 rank of batch 2b:
    the same rows each step, gradients averaged instead of one mean. Only the order of float32 sums
    differs, so losses agree to ~1e-6 and the head's weights, after 3 AdamW steps, to 1e-5
    (measured: ~4e-7; a rank reading the wrong rows is off by more than 1e-2)."""
    data = topic_dataset(per_module=2)
    base = FinetuneConfig.for_scale("tiny", dropout=0.0, steps=3, max_length=16)
    two = finetune(client, base.replace(batch_size=4), workers=2, modes=("finetuned",), data=data)
    one = finetune(client, base.replace(batch_size=8), workers=1, modes=("finetuned",), data=data)
    assert two.world_size == 2 and one.world_size == 1
    assert two.ranks_agree and two.digests[0]["finetuned"] == two.digests[1]["finetuned"]
    a, b = two.runs["finetuned"], one.runs["finetuned"]
    assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)
    assert torch.allclose(a.head, b.head, atol=1e-5), (a.head - b.head).abs().max()
    assert a.losses[0] != a.losses[1]  # it trained


def test_finetuned_minilm_beats_the_majority_class_on_held_out_modules(client):
    """At tiny scale, on 2 DDP ranks: 12 steps lift held-out accuracy well above always answering the
    most frequent family (~23%), and events for the live plot arrive from rank 0."""
    rec = Recorder()
    with subscribe(client, rec, kinds=["finetune"]):
        result = finetune(client, FinetuneConfig.for_scale("tiny"))
        deadline = time.time() + 10
        while len([e for e in rec.events if "test_accuracy" in e]) < 4 and time.time() < deadline:
            time.sleep(0.1)
    tuned, frozen = result.runs["finetuned"], result.runs["frozen"]
    assert result.world_size == 2 and result.ranks_agree
    assert tuned.test_accuracy > result.majority + 0.15, result.table()
    assert frozen.test_accuracy > result.majority, result.table()
    assert tuned.evals[0]["step"] == 0 and tuned.evals[-1]["step"] == 12
    assert {e["mode"] for e in rec.events} == {"frozen", "finetuned"} and {e["rank"] for e in rec.events} == {0}
    assert any("loss" in e and "accuracy" in e for e in rec.events)
    assert "majority class" in result.table()


def test_the_ddp_lines_are_the_ones_that_run():
    lines = ddp_lines()
    assert "strategy.wrap(model, device)" in lines and "loss.backward()" in lines and "rank *" in lines


def test_bert_base_shapes_and_parameters_without_a_download():
    base, mini = bert_base_config(), minilm_config()
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (
        12, 768, 12, 3072)
    assert (mini.num_hidden_layers, mini.hidden_size, mini.num_attention_heads) == (6, 384, 12)
    head = lambda c: (c.hidden_size + 1) * len(LABELS)  # noqa: E731
    # bert-base-uncased: 109,482,240 with its pooler (768*768 + 768); all-MiniLM-L6-v2: 22,713,216 likewise
    assert count_params(base) == 109_482_240 - 590_592 + head(base)
    assert count_params(mini) == 22_713_216 - 147_840 + head(mini)


def test_activations_extended_from_one_and_two_layers_equal_the_whole_model():
    m = measure("MiniLM-L6", minilm_config(), batch=2, seq=8, repeats=1, direct=True)
    assert m.activation_bytes == m.direct["activation_bytes"] > 0
    assert m.trainable == m.params - 30_522 * 384  # the word embeddings stay frozen
    assert m.states_bytes == 4 * m.params + 12 * m.trainable and m.training_bytes > m.states_bytes
    assert m.step_seconds > 0


def test_a_frozen_run_leaves_the_shared_encoder_as_it_was_and_a_finetune_changes_it():
    """_rank_main reuses one MiniLM for both modes: that is right only if the frozen run changes no encoder
    weight and the fine-tune then trains all of it but the word embeddings."""
    from labkit.finetune import load_encoder, tensors, train_mode

    config = FinetuneConfig.for_scale("tiny", steps=1, max_length=8, batch_size=4)
    data = tensors(topic_dataset(per_module=1), config.max_length)
    encoder = load_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train_mode("frozen", config, data, encoder=encoder)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    train_mode("finetuned", config, data, encoder=encoder)
    after = encoder.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(before[k], v)}
    assert "embeddings.word_embeddings.weight" not in changed
    assert "encoder.layer.0.attention.self.query.weight" in changed and "encoder.layer.5.output.dense.weight" in changed
