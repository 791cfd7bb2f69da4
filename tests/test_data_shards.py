"""Shard format: writer, reader, checks on open, deterministic per-rank batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labkit.data.shards import (
    ShardError, ShardReader, ShardWriter, dtype_for_vocab, finish, make_tiny_shards, rank_frequency, sha256_file,
    token_counts,
)
from labkit.data.tokenizer import train_bpe

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(200))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shards")
    make_tiny_shards(out, TEXT, vocab_size=300, shard_tokens=1000)
    return out


def test_folder_layout_and_meta(tiny):
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["tokenizer"] == "tokenizer.json"
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert len(meta["splits"]["train"]) > 1  # several shards, so reads cross boundaries
    for split, entries in meta["splits"].items():
        for e in entries:
            p = tiny / e["file"]
            assert p.stat().st_size == e["bytes"] == 2 * e["tokens"]
            assert sha256_file(p) == e["sha256"]
        assert meta["counts"][split]["tokens"] == sum(e["tokens"] for e in entries)
    # every document ends with EOT: docs count == EOT count
    r = ShardReader(tiny, "train")
    stream = r.read(0, r.num_tokens)
    assert int((stream == r.eot_id).sum()) == meta["counts"]["train"]["docs"] == 180
    assert stream[-1] == r.eot_id


def test_reader_roundtrip_decodes_the_text(tiny):
    r = ShardReader(tiny, "val")
    tok = r.tokenizer()
    stream = r.read(0, r.num_tokens)
    docs = tok.decode(stream.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    assert docs[0] == "Paragraph 9: the quick brown fox 63 jumps over the lazy dog."
    assert r.vocab_size == tok.get_vocab_size() and r.meta["eot_id"] == r.eot_id == 0


def test_cross_shard_read_equals_concatenation(tiny):
    r = ShardReader(tiny, "train")
    whole = np.concatenate([np.fromfile(p, dtype="<u2") for p in r.files]).astype(np.int64)
    assert len(whole) == r.num_tokens
    assert np.array_equal(r.read(990, 25), whole[990:1015])


def test_get_batch_shapes_shift_and_determinism(tiny):
    r = ShardReader(tiny, "train")
    x, y = r.get_batch(8, 32, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = r.get_batch(8, 32, torch.Generator().manual_seed(1))
    x3, _ = r.get_batch(8, 32, torch.Generator().manual_seed(2))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_ranks_draw_from_disjoint_parts(tiny):
    r = ShardReader(tiny, "train")
    stream = torch.from_numpy(r.read(0, r.num_tokens))
    T, seen = 16, []
    for rank in range(2):
        lo, hi = r.rank_range(rank, 2)
        seen.append((lo, hi))
        x, y = r.get_batch(64, T, torch.Generator().manual_seed(0), rank=rank, world_size=2)
        # locate each row in the rank's part of the stream
        for row in x[:4]:
            hits = [s for s in range(lo, hi - T) if torch.equal(stream[s:s + T], row)]
            assert hits, "a block came from outside the rank's part"
    assert seen[0][1] == seen[1][0] and seen[0][0] == 0 and seen[1][1] == r.num_tokens
    with pytest.raises(ValueError, match="rank"):
        r.get_batch(1, 4, rank=2, world_size=2)


def test_block_larger_than_data_is_a_clear_error(tiny):
    r = ShardReader(tiny, "val")
    with pytest.raises(ShardError, match="smaller block_size"):
        r.get_batch(1, r.num_tokens + 5)


def test_same_input_gives_byte_identical_shards(tmp_path, tiny):
    make_tiny_shards(tmp_path, TEXT, vocab_size=300, shard_tokens=1000)
    a = json.loads((tiny / "meta.json").read_text())["splits"]
    b = json.loads((tmp_path / "meta.json").read_text())["splits"]
    assert a == b


def test_truncated_and_corrupt_shards_are_detected(tmp_path):
    make_tiny_shards(tmp_path, TEXT, vocab_size=300, shard_tokens=1000)
    shard = tmp_path / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    ShardReader(tmp_path, verify=False)  # size is right, checksum not checked
    with pytest.raises(ShardError, match=r"train_00001\.bin is corrupt.*rebuild"):
        ShardReader(tmp_path)
    shard.write_bytes(bytes(data[:-3]))
    with pytest.raises(ShardError, match=r"train_00001\.bin is truncated"):
        ShardReader(tmp_path, verify=False)
    shard.unlink()
    with pytest.raises(ShardError, match="missing"):
        ShardReader(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ShardError, match="not a finished shard folder"):
        ShardReader(tmp_path)


def test_unknown_split_lists_valid_ones(tiny):
    with pytest.raises(ShardError, match="valid splits: train, val"):
        ShardReader(tiny, "test")


def test_uint32_for_large_vocab(tmp_path):
    assert dtype_for_vocab(65535) == np.dtype("<u2") and dtype_for_vocab(65536) == np.dtype("<u4")
    tok = train_bpe(["hello world"] * 3, 260)
    w = ShardWriter(tmp_path, 70_000, shard_tokens=4)
    w.write("train", [69_999, 1, 2, 0, 5, 6])
    with pytest.raises(ValueError, match=r"\[0, 70000\)"):
        w.write("train", [70_000])
    tok.save(str(tmp_path / "tokenizer.json"))
    finish(tmp_path, w, vocab_size=70_000, eot_id=0)
    r = ShardReader(tmp_path)
    assert r.meta["dtype"] == "uint32" and r.num_tokens == 6 and len(r.files) == 2
    assert r.read(0, 6).tolist() == [69_999, 1, 2, 0, 5, 6]
    assert (tmp_path / "train_00000.bin").stat().st_size == 16


def test_tiny_default_uses_stdlib_text(tmp_path):
    r = make_tiny_shards(tmp_path)
    assert r.num_tokens > 20_000 and r.meta["sources"][0]["source"] == "stdlib-tiny"
    assert "def " in r.tokenizer().decode(r.read(0, r.num_tokens).tolist())


def test_import_labkit_data_stays_light():
    import subprocess
    import sys

    code = ("import sys, labkit.data as d; d.ShardError; "
            "print(sorted(m for m in ('torch', 'distributed', 'dask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rewrite_removes_only_its_own_stale_shards(tmp_path):
    make_tiny_shards(tmp_path, TEXT, vocab_size=300, shard_tokens=500)
    n_before = len(list(tmp_path.glob("train_*.bin")))
    (tmp_path / "mine_00001.bin").write_bytes(b"user data")
    make_tiny_shards(tmp_path, TEXT, vocab_size=300, shard_tokens=100_000)
    assert n_before > 1 and sorted(p.name for p in tmp_path.glob("train_*.bin")) == ["train_00000.bin"]
    assert (tmp_path / "mine_00001.bin").read_bytes() == b"user data"
    ShardReader(tmp_path)


def test_token_counts_and_rank_frequency(tiny):
    counts = token_counts([3, 1, 3, 3, 0, 1], 6)
    assert counts.tolist() == [1, 2, 0, 3, 0, 0] and counts.dtype == np.int64
    rank, freq = rank_frequency(counts)
    assert rank.tolist() == [1, 2, 3] and freq.tolist() == [3, 2, 1]  # zero counts left out
    assert token_counts([], 4).tolist() == [0, 0, 0, 0]
    for bad in ([0, 6], [-1, 2]):
        with pytest.raises(ValueError, match=r"\[0, 6\).*vocab_size"):
            token_counts(bad, 6)
    r = ShardReader(tiny)
    ids = r.read(0, r.num_tokens)
    counts = token_counts(ids, r.vocab_size)
    assert counts.size == r.vocab_size and counts.sum() == ids.size
    assert counts[int(ids[0])] == int((ids == ids[0]).sum())


def test_write_shard_is_atomic_and_a_failed_write_leaves_nothing(tmp_path):
    from labkit.data.shards import write_shard

    entry = write_shard(tmp_path, "train_00000.bin", [np.arange(5), np.arange(3)], 300)
    assert entry == {"file": "train_00000.bin", "tokens": 8, "bytes": 16,
                     "sha256": sha256_file(tmp_path / "train_00000.bin")}
    with pytest.raises(ValueError, match="token ids must lie in"):  # dies after the first piece was written
        write_shard(tmp_path, "train_00001.bin", [np.arange(5), np.array([1, 999])], 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_00000.bin"]
    with pytest.raises(ShardError, match="does not exist on this worker.*share"):
        write_shard(tmp_path / "nowhere", "train_00000.bin", [np.arange(3)], 300)


def test_writer_keeps_an_open_shard_under_a_temporary_name(tmp_path):
    w = ShardWriter(tmp_path, 300, shard_tokens=4)
    w.write("train", np.arange(6))
    assert (tmp_path / "train_00000.bin").is_file() and not (tmp_path / "train_00001.bin").exists()
    assert len(list(tmp_path.glob(".train_00001.bin.*.tmp"))) == 1
    w.close()
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "train_00001.bin").stat().st_size == 4


def test_verify_shards_hashes_each_file_once_and_names_a_corrupt_one(tmp_path, monkeypatch):
    import labkit.data.shards as S

    make_tiny_shards(tmp_path, TEXT, vocab_size=300, shard_tokens=1000)
    meta = json.loads((tmp_path / "meta.json").read_text())
    files = sorted(str(tmp_path / e["file"]) for es in meta["splits"].values() for e in es)
    hashed = []
    orig = S.sha256_file
    monkeypatch.setattr(S, "sha256_file", lambda p, *a: hashed.append(str(p)) or orig(p, *a))
    assert S.verify_shards(tmp_path) == len(files) and sorted(hashed) == files
    hashed.clear()
    ShardReader(tmp_path, "train", verify=False)
    ShardReader(tmp_path, "val", verify=False)
    assert hashed == []  # a rank of a verified run reads no shard twice
    shard = tmp_path / "val_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"val_00000\.bin is corrupt.*rebuild the folder"):
        S.verify_shards(tmp_path)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match=r"val_00000\.bin is truncated"):
        S.verify_shards(tmp_path)
