"""Head pruning on the real packaged MiniLM: surgery, importance, the quality curve."""

import pytest
import torch

from labkit.prune import prune_heads
from labkit.prune.bert import (
    SENTENCES, bert_head_importance, calibration_sentences, embed, head_curve, heads_per_layer, heads_that_can_go,
    load_minilm, prune_bert_heads, tokenize,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_calibration_text_is_real_and_disjoint():
    cal = calibration_sentences()
    assert len(cal) >= 20 and not set(cal) & set(SENTENCES)


def test_removing_heads_equals_zeroing_their_output(minilm):
    model, tok = minilm
    batch = tokenize(tok, SENTENCES[:4])
    keep = [torch.arange(12)] * 6
    keep = list(keep)
    keep[2] = torch.tensor([0, 1, 5, 11])
    import copy

    small = prune_bert_heads(copy.deepcopy(model), keep)
    assert heads_per_layer(small) == [12, 12, 4, 12, 12, 12]
    ref = copy.deepcopy(model)
    gone = [h for h in range(12) if h not in (0, 1, 5, 11)]
    with torch.no_grad():
        dense = ref.encoder.layer[2].attention.output.dense
        for h in gone:
            dense.weight[:, h * 32:(h + 1) * 32] = 0
        assert torch.allclose(embed(small, batch), embed(ref, batch), atol=1e-4)
    with pytest.raises(ValueError, match="keep at least one head"):
        prune_bert_heads(copy.deepcopy(model), [torch.tensor([], dtype=torch.long)] * 6)


def test_prune_heads_dispatches_to_bert_and_leaves_original(minilm):
    model, tok = minilm
    small = prune_heads(model, 0.25)  # magnitude: no data needed
    assert sum(heads_per_layer(small)) == 72 - 18 and sum(heads_per_layer(model)) == 72
    imp = bert_head_importance(model, "gradient", tokenize(tok, calibration_sentences()[:8]), draws=2)
    assert [len(i) for i in imp] == [12] * 6 and all((i > 0).all() for i in imp)


def test_head_curve_starts_at_one_and_degrades(minilm):
    model, tok = minilm
    pts = head_curve(model, tok, amounts=(0.0, 0.3, 0.7), importance="gradient",
                     sentences=SENTENCES[:6], calibration=calibration_sentences()[:6], draws=2)
    assert pts[0].cosine_mean == pytest.approx(1.0, abs=1e-5) and pts[0].heads_pruned == 0
    assert pts[1].heads_pruned == round(0.3 * 72) and pts[2].heads_left == 72 - round(0.7 * 72)
    assert pts[2].cosine_mean < pts[1].cosine_mean < 1.0
    assert pts[2].params < pts[1].params < pts[0].params
    assert heads_that_can_go(pts, 0.0) == pts[2].heads_pruned and heads_that_can_go(pts, 1.01) == 0
