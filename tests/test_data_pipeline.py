"""preprocess(): bad input never crashes nor vanishes; output identical on 0, 1 and 2 Dask workers."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest

from labkit.data import DataConfig, ShardReader, SourceError, default_shard_dir, preprocess
from labkit.data.pipeline import split_by_document
from labkit.data.sources import FileItem, read_file
from labkit.core.events import Recorder

WORDS = ("byte level pair encoding merges frequent pairs of symbols until the vocabulary is full while "
         "documents flow through normalisation filters and deduplication before packing into shards").split()


def para(seed: int, n: int = 40) -> str:
    """Distinct text per seed (so near-duplicate removal leaves these documents alone)."""
    rng = np.random.default_rng(seed)
    return " ".join(f"{w}{k}" for w, k in zip(rng.choice(WORDS, n), rng.integers(0, 99, n))) + "."


def cfg(**kw):
    return DataConfig.for_scale("tiny", **{"min_chars": 20, **kw})


@pytest.fixture
def messy(tmp_path):
    """A folder with every kind of bad input next to good files."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        (d / f"good{i}.txt").write_text(f"Document {i}. " + para(i))
    (d / "bad_utf8.txt").write_bytes(b"caf\xe9 au lait, " + para(10).encode() + b" \xff\xfe end")
    (d / "nul.txt").write_bytes(para(11).encode() + b"\x00\x00 with two NULs inside the text.")
    (d / "binary.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (d / "empty.txt").write_bytes(b"")
    (d / "oneline.txt").write_bytes(b"x" * 50_000_000)  # a single 50 MB line
    os.mkfifo(d / "pipe.fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    (d / "dangling.txt").symlink_to(d / "nowhere.txt")
    (d / "loop.txt").symlink_to(d / "loop.txt")
    (d / "sub" / "up").symlink_to(d)  # a directory loop
    (d / "sub" / "inner.md").write_text("# Inner\n\n" + para(12))
    (d / "docs.jsonl").write_text(
        json.dumps({"text": "From JSONL: " + para(13)}) + "\n{not json\n" + json.dumps({"body": "x"}) + "\n"
        + json.dumps({"text": "Second JSONL record. " + para(14)}) + "\n")
    (d / ".hidden").write_text(para(15))
    yield d
    sock.close()


def test_bad_input_is_skipped_or_repaired_and_listed(messy, tmp_path):
    t0 = time.perf_counter()
    rep = preprocess([messy], tmp_path / "out", config=cfg(), progress=False)
    took = time.perf_counter() - t0
    skipped = {os.path.basename(p.split(".jsonl:")[0] + (".jsonl" if ".jsonl:" in p else "")) + (
        ":" + p.rsplit(":", 1)[1] if ".jsonl:" in p else ""): r for p, r in rep.skipped}
    repaired = {os.path.basename(p): r for p, r in rep.repaired}
    assert "binary" in skipped["binary.bin"]
    assert skipped["empty.txt"] == "empty file"
    assert "max_line_bytes" in skipped["oneline.txt"] and "50,000,000" in skipped["oneline.txt"]
    assert "FIFO" in skipped["pipe.fifo"] and "socket" in skipped["sock"]
    assert "dangling symlink" in skipped["dangling.txt"]
    assert "symlink loop" in skipped["loop.txt"] and "symlink loop" in skipped["up"]
    assert "invalid JSON" in skipped["docs.jsonl:2"] and "'text'" in skipped["docs.jsonl:3"]
    assert "hidden" in skipped[".hidden"]
    assert "invalid UTF-8" in repaired["bad_utf8.txt"] and "2 NUL" in repaired["nul.txt"]
    # every good document made it into the shards, repaired ones included
    c = rep.counts
    assert c["train"]["docs"] + c["val"]["docs"] == 6 + 2 + 1 + 2
    assert all(s.removed == 0 for s in rep.steps[1:]) and rep.removed == []  # nothing else was filtered out
    tok = ShardReader(rep.out_dir).tokenizer()
    text = "".join(tok.decode(ShardReader(rep.out_dir, s).read(0, ShardReader(rep.out_dir, s).num_tokens).tolist(),
                              skip_special_tokens=False) for s in ("train", "val"))
    assert "café au lait" not in text and "caf\ufffd au lait" in text  # repaired, not dropped
    assert "with two NULs inside" in text and "Second JSONL record" in text and "# Inner" in text
    assert took < 60


def test_unreadable_files_become_issues(tmp_path):
    """As root chmod 000 does not stop reads; a directory or a vanished file where a file is expected does."""
    kw = dict(max_file_bytes=10**6, max_line_bytes=10**5)
    docs, issues, _ = read_file(FileItem(str(tmp_path), "text", "x", 0), **kw)
    assert not docs and "no longer a regular file" in issues[0].reason
    docs, issues, _ = read_file(FileItem(str(tmp_path / "gone.txt"), "text", "x", 0), **kw)
    assert not docs and "unreadable" in issues[0].reason
    big = tmp_path / "big.txt"
    big.write_text("a\n" * 600_000)
    docs, issues, _ = read_file(FileItem(str(big), "text", "x", 0), **kw)
    assert not docs and "max_file_bytes" in issues[0].reason


def test_clear_errors_for_unusable_sources(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="does not exist; valid sources"):
        preprocess([tmp_path / "typo"], tmp_path / "out", config=cfg(), progress=False)
    with pytest.raises(SourceError, match="(?s)not installed.*login node.*jsonl"):
        preprocess(["hf:wikitext:train"], tmp_path / "out", config=cfg(), progress=False)
    with pytest.raises(ValueError, match="unknown data key vocab; valid keys"):
        preprocess(["stdlib"], tmp_path / "out", config=cfg(), progress=False, vocab=5)
    assert time.perf_counter() - t0 < 10


def test_steps_chain_and_duplicates_removed(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [" ".join(rng.choice(vocab, 200)) for _ in range(8)]
    for i, t in enumerate(base):
        (d / f"doc{i}.txt").write_text(t)
    (d / "x_copy_of_1.txt").write_text(base[1])
    (d / "x_copy_of_1_nfkc.txt").write_text(base[1].replace("w1 ", "ｗ1 "))  # equal after NFKC
    words = base[3].split()
    (d / "x_near_3.txt").write_text(" ".join(words[:-10] + ["new"] * 10))
    rec = Recorder()
    rep = preprocess([d], tmp_path / "out", config=cfg(), progress=False, on_event=rec)
    names = [s.name for s in rep.steps]
    assert names == ["read", "nfkc", "control_chars", "whitespace", "length_filter", "quality_filter",
                     "exact_dedup", "near_dedup"]
    for a, b in zip(rep.steps[1:], rep.steps[2:]):
        assert a.docs_out == b.docs_in and a.bytes_out == b.bytes_in
    assert rep.step("exact_dedup").removed == 2 and rep.step("near_dedup").removed == 1
    kinds = {(x["kind"], os.path.basename(x["id"]), os.path.basename(x["duplicate_of"])) for x in rep.duplicates}
    assert kinds == {("exact_dedup", "x_copy_of_1.txt", "doc1.txt"), ("exact_dedup", "x_copy_of_1_nfkc.txt", "doc1.txt"),
                     ("near_dedup", "x_near_3.txt", "doc3.txt")}
    assert rep.step("nfkc").changed == 1
    assert {os.path.basename(i) for i, _ in rep.removed} == {"x_copy_of_1.txt", "x_copy_of_1_nfkc.txt", "x_near_3.txt"}
    assert all(why.startswith(("exact_dedup: duplicate of", "near_dedup: duplicate of")) for _, why in rep.removed)
    ev = rec.of("data")
    assert {e["stage"] for e in ev} == {"clean", "tokenize"} and ev[-1]["tokens"] > 0
    assert all(e["docs_per_s"] >= 0 and "tokens_per_s" in e for e in ev)
    # a lower threshold... would not find more here; a higher one finds none
    rep2 = preprocess([d], tmp_path / "out2", config=cfg(near_dup_threshold=0.99), progress=False)
    assert rep2.step("near_dedup").removed == 0


def test_split_is_by_document_and_stable():
    hs = [f"{i:064x}" for i in (5, 1, 9, 3, 7)]
    nb = [100] * 5
    v = split_by_document(hs, nb, 0.3)
    assert v == [False, True, False, True, False]  # smallest hashes first, until 30% of bytes
    perm = [4, 2, 0, 3, 1]
    assert [split_by_document([hs[i] for i in perm], nb, 0.3)[perm.index(k)] for k in range(5)] == v
    assert split_by_document(hs[:1], nb[:1], 0.5) == [False]


def _shard_hashes(out):
    meta = json.loads((out / "meta.json").read_text())
    return {s: [e["sha256"] for e in es] for s, es in meta["splits"].items()}, (out / "meta.json").read_bytes()


def test_same_bytes_on_zero_one_and_two_workers(tmp_path):
    from distributed import Client, LocalCluster

    c = cfg(partition_bytes=40_000)
    ref = preprocess("stdlib", tmp_path / "w0", config=c, progress=False)
    assert ref.partitions >= 4
    results = {}
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                Client(cl) as client:
            rec = Recorder()
            rep = preprocess("stdlib", tmp_path / f"w{n}", client=client, config=c, progress=False, on_event=rec)
            results[n] = _shard_hashes(rep.out_dir)
            assert len(rec.of("data")) == 2 * rep.partitions
    assert results[1] == results[2] == _shard_hashes(ref.out_dir)
    r = ShardReader(tmp_path / "w2")
    assert r.num_tokens == ref.counts["train"]["tokens"] and r.vocab_size == 512


def test_default_shard_dir_is_under_runs():
    p = default_shard_dir("tiny")
    assert p.parts[-2:] == ("runs", "shards-tiny")
    assert default_shard_dir(root="/x").as_posix() == "/x/runs/shards-tiny"  # active scale is tiny in tests


def test_docstrings_source_and_source_hashes(tmp_path):
    (tmp_path / "bad.py").write_text("def f(:\n    pass\n")
    docs, issues, _ = read_file(FileItem(str(tmp_path / "bad.py"), "pydoc", "x", 0), max_file_bytes=10**6,
                                max_line_bytes=10**5)
    assert not docs and "not parseable as Python" in issues[0].reason
    good = tmp_path / "good.py"
    good.write_text('"""Module doc."""\n\ndef f():\n    """Function doc."""\n    return 1\n')
    docs, issues, _ = read_file(FileItem(str(good), "pydoc", "x", 0), max_file_bytes=10**6, max_line_bytes=10**5)
    assert docs[0].text == "Module doc.\n\nFunction doc." and not issues
    d = tmp_path / "c"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.txt").write_text(f"text number {i} " + para(100 + i))
    size = sum(p.stat().st_size for p in d.iterdir())
    a = preprocess([d], tmp_path / "a", config=cfg(), progress=False).meta["sources"]
    (d / "0.txt").write_text("changed " + para(200))
    b = preprocess([d], tmp_path / "b", config=cfg(), progress=False).meta["sources"]
    assert a[0]["files"] == b[0]["files"] == 4 and a[0]["sha256"] != b[0]["sha256"]
    assert a[0]["bytes"] == size and a[0]["source"] == str(d)


class _FakeHFDataset:
    """Stands in for a ``datasets.Dataset`` (no network here); refuses a rename onto an existing
    column, as the real library does."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    @property
    def column_names(self) -> list[str]:
        return list(self.rows[0])

    def select_columns(self, cols):
        return _FakeHFDataset([{c: r[c] for c in cols} for r in self.rows])

    def rename_column(self, old, new):
        if new in self.column_names:
            raise ValueError(f"New column name {new} already in the dataset")
        return _FakeHFDataset([{new if k == old else k: v for k, v in r.items()} for r in self.rows])

    def to_json(self, path):
        with open(path, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("field", ["text", "content"])
def test_hf_source_is_staged_as_jsonl_with_a_text_field(field, tmp_path, monkeypatch):
    import sys
    import types

    from labkit.data.sources import HFSource, stage_hf

    rows = [{field: f"document number {i} " * 10, "meta": i} for i in range(3)]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config=None, split="train": _FakeHFDataset(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out = stage_hf(HFSource("someone/corpus", text_field=field), tmp_path)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [{"text": r[field]} for r in rows]
    with pytest.raises(SourceError, match="has no column 'body'"):
        stage_hf(HFSource("someone/corpus", text_field="body"), tmp_path)


class _SpyClient:
    """A Dask client that records what the pipeline sends: every submit's arguments, every scatter."""

    def __init__(self, client):
        self.client, self.submitted, self.scattered = client, [], []

    def submit(self, fn, *args, **kwargs):
        self.submitted.append((fn.__name__, args))
        return self.client.submit(fn, *args, **kwargs)

    def scatter(self, data, **kwargs):
        self.scattered.append((data, kwargs))
        return self.client.scatter(data, **kwargs)

    def run(self, fn, *args, **kwargs):  # the shared-folder check before the work (labkit.core.shared)
        return self.client.run(fn, *args, **kwargs)


def test_workers_write_the_shards_and_the_driver_gets_names_sizes_hashes(tmp_path, monkeypatch):
    import distributed
    from distributed import Client, LocalCluster

    from labkit.data.pipeline import TokenCounts

    c = cfg(partition_bytes=40_000, shard_tokens=7_000)  # shards that span partitions, and partitions shards
    ref = preprocess("stdlib", tmp_path / "w0", config=c, progress=False)
    received = []
    result = distributed.Future.result

    def spy_result(self, *args, **kwargs):  # what reaches the driver from tasks
        r = result(self, *args, **kwargs)
        received.append(r)
        return r

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            Client(cl) as client:
        spy = _SpyClient(client)
        monkeypatch.setattr(distributed.Future, "result", spy_result)
        rep = preprocess("stdlib", tmp_path / "w2", client=spy, config=c, progress=False)
        monkeypatch.undo()
    assert _shard_hashes(rep.out_dir) == _shard_hashes(ref.out_dir)
    assert len(rep.meta["splits"]["train"]) >= 3
    # the tokenizer went to every worker once, and no task carries it
    tok_json = (rep.out_dir / "tokenizer.json").read_text()
    assert [kw.get("broadcast") for data, kw in spy.scattered if isinstance(data, str) and len(data) > 1000] == [True]
    assert not [name for name, args in spy.submitted for a in args if isinstance(a, str) and len(a) > 1000]
    assert json.loads(spy.scattered[0][0]) == json.loads(tok_json)
    # stage 2 hands the driver counts and shard entries only: no token ids ever
    assert not [r for r in received if isinstance(r, np.ndarray) or hasattr(r, "train") and not isinstance(r, TokenCounts)]
    entries = [r for r in received if isinstance(r, dict)]
    key = lambda e: e["file"]  # noqa: E731  (in the order they were written)
    assert sorted(entries, key=key) == sorted(rep.meta["splits"]["train"] + rep.meta["splits"]["val"], key=key)
    assert all(set(e) == {"file", "tokens", "bytes", "sha256"} for e in entries)
    assert sum(isinstance(r, TokenCounts) for r in received) == rep.partitions
    assert not list(rep.out_dir.glob(".*.tmp"))


def test_shard_plan_cuts_like_one_writer():
    from labkit.data.pipeline import ShardPlan

    rng = np.random.default_rng(1)
    for size in (1, 5, 64):
        counts = [int(n) for n in rng.integers(0, 3 * size, 12)] + [0, size, 2 * size]
        plan = ShardPlan("train", size)
        cuts = [c for p, n in enumerate(counts) for c in plan.add(p, n)] + plan.close()
        stream = np.concatenate([np.full(n, p) for p, n in enumerate(counts)])
        want = [stream[i:i + size] for i in range(0, stream.size, size)]
        got = [np.concatenate([np.full(hi - lo, p) for p, lo, hi in pieces]) for _, pieces in cuts]
        assert [c[0] for c in cuts] == [f"train_{k:05d}.bin" for k in range(len(want))]
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
        for _, pieces in cuts:  # each piece lies inside its partition
            assert all(0 <= lo < hi <= counts[p] for p, lo, hi in pieces)
