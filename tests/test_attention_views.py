"""Attention views (offline plotly), the explorer widget, semantic search and the cost sweep, at toy sizes."""

import re

import pytest
import torch

from labkit import attention_cost as AC
from labkit.pretrained import load_bert
from labkit.semantic_search import Doc, SearchConfig, SemanticIndex, stdlib_docstrings
from labkit.widgets import attention as W

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def bert():
    return load_bert()


def _probs(layers=2, heads=3, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(layers, heads, t, t, generator=g), -1)


def test_heatmap_has_tokens_on_axes_and_the_chosen_head():
    p, toks = _probs(), ["[CLS]", "the", "the", "[SEP]"]
    fig = W.heatmap(p, toks, layer=1, head=2)
    hm = fig.data[0]
    assert list(hm.x) == list(hm.y) == ["0:[CLS]", "1:the", "2:the", "3:[SEP]"]  # repeated tokens stay apart
    assert torch.allclose(torch.tensor(hm.z), p[1, 2])
    with pytest.raises(ValueError, match=r"\(T, T\)"):
        W.heatmap(torch.ones(5), toks)


def test_grid_and_lines_and_offline_html(tmp_path):
    p, toks = _probs(), list("abcd")
    g = W.grid(p, toks)
    assert len(g.data) == 6
    assert torch.allclose(torch.tensor(g.data[4].z), p[1, 1])
    g2 = W.grid([x[None] for x in p], toks)  # the shape transformers returns: list of (1, H, T, T)
    assert len(g2.data) == 6
    lf = W.lines(p, toks, 0, 1, threshold=0.0)
    n_lines = sum(tr.x.count(None) for tr in lf.data if tr.mode == "lines")
    assert n_lines == 16  # every pair above a zero threshold
    html = W.to_html(lf, tmp_path / "lines.html")
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js inlined, nothing from a CDN
    assert (tmp_path / "lines.html").stat().st_size > 1_000_000


def test_saturation_without_scale_is_near_one_hot():
    scores = torch.randn(12, generator=torch.Generator().manual_seed(3)) * 8  # q.k with d_k = 64
    fig = W.saturation(scores, 64, factors=(1.0, 8.0))
    scaled, unscaled = (max(tr.y) for tr in fig.data)
    assert unscaled > 3 * scaled and unscaled > 0.5  # one key takes most of the weight


def test_explorer_widget_follows_its_controls(bert):
    ex = W.AttentionExplorer(*bert, sentence="attention is all you need")
    ui = ex.widget()
    text, (layer, head), (factor, causal) = ui.children[0], ui.children[1].children, ui.children[2].children
    heat = ui.children[4].children[0]
    before = torch.tensor(heat.data[0].z)
    head.value = 5
    assert not torch.allclose(torch.tensor(heat.data[0].z), before)
    causal.value = True
    z = torch.tensor(heat.data[0].z)
    assert torch.all(z.triu(1) == 0)  # nothing above the diagonal with the causal mask
    factor.value = 8.0  # = sqrt(d_k): the unscaled formula, sharper
    assert "mean max weight" in ui.children[3].value
    text.value = "a different sentence"
    assert len(heat.data[0].x) == len(bert[1]("a different sentence")["input_ids"])
    assert "->" in ex.text(layer=1, head=2)


def test_stdlib_docstrings_and_semantic_search(bert):
    cfg = SearchConfig.for_scale("tiny")
    docs = stdlib_docstrings(max_docs=40, per_module=2)
    assert len(docs) == 40 and len({d.name.split(".")[0] for d in docs}) >= 15
    assert all(len(d.text) >= cfg.min_chars for d in docs)
    extra = [Doc("zipfile.ZipFile", "Class with methods to open, read, write, close, list zip files."),
             Doc("json.dumps", "Serialize obj to a JSON formatted str.")]
    index = SemanticIndex.build(docs + extra, *bert)
    (best_score, best), *_ = index.search("compress files into an archive", k=3)
    assert best.name == "zipfile.ZipFile" and best_score > 0.3
    assert index.search("turn a Python object into JSON text", k=1)[0][1].name == "json.dumps"


def test_cost_sweep_and_figure():
    cfg = AC.CostConfig(seq_lens=(64, 128), batch=1, heads=2, head_dim=8, block_size=32, repeat=1)
    pts = AC.measure_cost(cfg)
    assert {(p.impl, p.seq_len) for p in pts} == {(i, t) for i in AC.IMPLS for t in (64, 128)}
    by = {(p.impl, p.seq_len): p for p in pts}
    # naive builds T x T: its peak grows ~4x when T doubles, and is far above online's
    assert by["naive", 128].peak_bytes >= 3 * by["naive", 64].peak_bytes
    assert by["online", 128].peak_bytes < by["naive", 128].peak_bytes / 4
    train = AC.measure_cost(cfg.replace(backward=True, seq_lens=(128,), impls=("naive", "online")))
    assert train[1].peak_bytes < train[0].peak_bytes / 4
    assert AC.saved_tensor_bytes("naive", 128, cfg) > 10 * AC.saved_tensor_bytes("online", 128, cfg)
    fig = W.cost_figure(pts)
    assert len(fig.data) == 6 and "naive" in AC.cost_table(pts)
    with pytest.raises(ValueError, match="valid choices"):
        AC.attention_fn("flash")


def test_bench_smoke(capsys):
    from bench import attention as bench

    rc = bench.main(["--seq-len", "128", "--batch", "1", "--heads", "2", "--head-dim", "16",
                     "--block-size", "32", "--repeat", "1", "--threads", "0"])  # 0: leave threads as they are
    out = capsys.readouterr().out
    rows = re.findall(r"(\w+) =\s+([\d.]+)\s+\(target <= ([\d.]+)\)\s+(ok|MISSED)", out)
    assert {r[0] for r in rows} == {"fwd_mem_vs_naive", "fwd_time_vs_sdpa", "train_mem_vs_naive"}, out
    for name, value, target, verdict in rows:  # each verdict follows from its figure, and the exit code from all
        assert float(value) > 0 and verdict == ("ok" if float(value) <= float(target) else "MISSED"), name
    assert rc == (1 if any(r[3] == "MISSED" for r in rows) else 0)
