"""Pruning widgets compute without a browser and draw what they are given."""

import pytest
import torch

from labkit.model import GPT, GPTConfig
from labkit.widgets.prune import SparsitySlider, curve_figure, head_heatmap, heatmap_text

torch.set_num_threads(1)


def test_slider_update_measures_the_pruned_copy():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, precision="float32")).eval()
    val = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    s = SparsitySlider(m, val, repeats=1)
    row = s.update(0.5)
    assert row["sparsity"] == pytest.approx(0.5, abs=1e-3) and row["ms"] > 0 and row["perplexity"] > 1
    row2 = s.update(0.5, method="structured")
    assert row2["method"] == "structured" and len(s.history) == 2
    assert row["perplexity_dense"] == row2["perplexity_dense"] == s.base_ppl > 1      # measured once, shown on every row
    assert all((p != 0).all() for n, p in m.named_parameters() if n.endswith("c_fc.weight"))  # original untouched
    assert "perplexity" in s.text(row) and "x)" in s.text(row)
    box = s.widget()
    assert box is not None and "amount" in repr(box.children[0].children[0].description)
    with pytest.raises(ValueError, match="choose from"):
        SparsitySlider(m, val, method="random")


def test_heatmap_pads_ragged_layers_and_marks_pruned():
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5])]
    fig = head_heatmap(scores, pruned=[[0], []])
    assert list(fig.data[0].z[1]) == [0.5, None, None] and list(fig.data[1].x) == [0]
    assert "h2" in heatmap_text(scores)


def test_curve_figure_groups_rows():
    rows = [{"method": "a", "sparsity": 0.5, "perplexity": 2.0}, {"method": "a", "sparsity": 0.0, "perplexity": 1.0},
            {"method": "b", "sparsity": 0.5, "perplexity": 3.0}]
    fig = curve_figure(rows)
    assert [t.name for t in fig.data] == ["a", "b"] and list(fig.data[0].x) == [0.0, 0.5]
