"""Encryption at rest (labkit.core.crypto): shards, checkpoints and exports written AES-256-GCM.

Real files, real ``cryptography``, the real pipeline (on Dask workers), training, resume, export and
``labkit serve``. "No plaintext on disk" is shown by scanning every file under the folder for bytes
known to be in the plaintext (token ids of a shard, a parameter tensor, format strings); each scan
is first shown to find them in a plaintext copy, so a scan that finds nothing is not a broken scan.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from labkit import checkpoint as C
from labkit.core import crypto
from labkit.core.crypto import Encryption, EncryptionKeyError, IntegrityError
from labkit.data import DataConfig, preprocess
from labkit.data.shards import ShardError, ShardReader, make_tiny_shards, verify_shards
from labkit.lab.cli import main as labkit_main
from labkit.train import TrainConfig, train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def cfg(**kw) -> TrainConfig:
    base = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=8, warmup_steps=2,
                eval_interval=4, eval_iters=1, sample_tokens=0, precision="float32", seed=3, checkpoint_interval=4)
    return TrainConfig().replace(**{**base, **kw})


def interrupt_at_step_5(event: dict) -> None:
    """A sink that stops a run after step 5 (its last checkpoint is step 4), as a crash would."""
    if event["kind"] == "train" and event["step"] == 5:
        raise KeyboardInterrupt("interrupted")


def found_in(folder: Path, needles: dict[str, bytes]) -> list[str]:
    """``"file: what"`` for every needle found in any file under ``folder`` (hidden ones too)."""
    hits = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(folder)}: {what}" for what, b in needles.items() if b in data]
    return hits


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files a writer left behind."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Encryption:
    return crypto.new_key_file(tmp_path_factory.mktemp("key") / "data.key")


@pytest.fixture(scope="module")
def other_key(tmp_path_factory) -> Encryption:
    return crypto.new_key_file(tmp_path_factory.mktemp("key2") / "other.key")


# ----------------------------------------------------------------------------- keys and the file format


def test_key_files_are_0600_and_a_readable_one_is_refused(tmp_path, capsys):
    assert labkit_main(["key", "new", str(tmp_path / "k")]) == 0
    made = capsys.readouterr().out
    enc = Encryption.from_file(tmp_path / "k")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert enc.key_id in made and len(enc.key_id) == 16 and enc.key_id not in (tmp_path / "k").read_text()
    in_memory = Encryption.from_key(enc.secret())
    assert in_memory.key_id == enc.key_id and in_memory.key not in repr(in_memory)  # a repr never shows the key
    assert labkit_main(["key", "new", str(tmp_path / "k")]) == 2  # an existing key is never overwritten
    assert "exists already" in capsys.readouterr().out
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(EncryptionKeyError, match=rf"mode 0644.*chmod 600 {tmp_path / 'k'}"):
        Encryption.from_file(tmp_path / "k")
    (tmp_path / "junk").write_text("not a key\n")
    os.chmod(tmp_path / "junk", 0o600)
    with pytest.raises(EncryptionKeyError, match="labkit key new"):
        Encryption.from_file(tmp_path / "junk")
    with pytest.raises(EncryptionKeyError, match="cannot be read"):
        Encryption.from_file(tmp_path / "nowhere")


def test_keys_from_the_environment(monkeypatch, key):
    raw = key.secret()
    monkeypatch.setenv("LABKIT_DATA_KEY", __import__("base64").b64encode(raw).decode())
    assert Encryption.from_env().key_id == key.key_id
    monkeypatch.setenv("LABKIT_KEY_FILE", key.key_file)
    assert Encryption.from_environment().key_file == key.key_file  # a key file wins over the key
    assert Encryption.from_environment({}) is None
    env_key = Encryption.from_env()
    monkeypatch.delenv("LABKIT_DATA_KEY")
    with pytest.raises(EncryptionKeyError, match=r"\$LABKIT_DATA_KEY is not set"):
        env_key.secret()


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 * 5, 1000])
def test_round_trip_and_random_access_across_chunks(tmp_path, key, size):
    small = Encryption(key_file=key.key_file, chunk=64)  # many chunks from a few bytes
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    with crypto.open_write(path, small) as f:
        for i in range(0, size, 37):
            f.write(data[i:i + 37])
    assert crypto.read_bytes(path, small) == data and crypto.plaintext_size(path) == size
    assert crypto.header_key_id(path) == key.key_id and path.read_bytes().startswith(b"LABKITENC1" + key.key_id.encode())
    with crypto.open_read(path, key) as f:  # the chunk size is in the header: any Encryption of the key reads it
        for start in (0, size // 3, max(size - 5, 0)):
            f.seek(start)
            assert f.read(70) == data[start:start + 70]
    (tmp_path / "plain").write_bytes(data)  # plaintext reads as before, with a key or without
    assert crypto.read_bytes(tmp_path / "plain", key) == crypto.read_bytes(tmp_path / "plain") == data


def test_changed_cut_or_reordered_chunks_and_wrong_or_missing_keys_fail(tmp_path, key, other_key):
    small = Encryption(key_file=key.key_file, chunk=64)
    path = tmp_path / "f"
    with crypto.open_write(path, small) as f:
        f.write(bytes(range(256)) * 2)
    blob = path.read_bytes()
    head, unit = crypto.HEADER.size, 64 + crypto.TAG
    chunks = [blob[head + i * unit: head + (i + 1) * unit] for i in range(9)]
    bad = {
        "a flipped byte": blob[:head + 10] + bytes([blob[head + 10] ^ 1]) + blob[head + 11:],
        "cut at a chunk boundary": blob[:head + 8 * unit],
        "cut inside a chunk": blob[:-5],
        "two chunks swapped": blob[:head] + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "a changed header (chunk size)": blob[:26] + (32).to_bytes(4, "little") + blob[30:],
    }
    for what, data in bad.items():
        path.write_bytes(data)
        with pytest.raises(IntegrityError, match=str(path)):
            crypto.read_bytes(path, key)
            pytest.fail(what)
    path.write_bytes(blob)
    with pytest.raises(EncryptionKeyError, match=rf"{path} is encrypted .*key id {key.key_id}.*--key-file"):
        crypto.read_bytes(path)
    with pytest.raises(EncryptionKeyError, match=rf"{path} was encrypted with key {key.key_id}.*is {other_key.key_id}"):
        crypto.read_bytes(path, other_key)


# ----------------------------------------------------------------------------- shards


def test_encrypted_shards_hold_no_plaintext_and_read_like_plain_ones(tmp_path, key, other_key):
    plain = make_tiny_shards(tmp_path / "plain")
    sealed = make_tiny_shards(tmp_path / "sealed", encryption=key)
    assert sealed.num_tokens == plain.num_tokens and sealed.vocab_size == plain.vocab_size
    for start in (0, 1234, plain.num_tokens - 40):
        assert np.array_equal(sealed.read(start, 40), plain.read(start, 40))
    torch.manual_seed(0)
    x1, _ = sealed.get_batch(4, 16)
    torch.manual_seed(0)
    x2, _ = plain.get_batch(4, 16)
    assert torch.equal(x1, x2)
    assert sealed.tokenizer().to_str() == plain.tokenizer().to_str()
    assert sealed.meta["encryption"] == {"cipher": "AES-256-GCM", "key_id": key.key_id, "chunk_bytes": crypto.CHUNK}
    ids = plain.read(100, 24).astype(plain.dtype).tobytes()
    needles = {"token ids": ids, "tokenizer merges": b'"merges"', "tokenizer model": b'"BPE"'}
    assert len(found_in(tmp_path / "plain", needles)) == 3  # the scan finds them where they are
    assert found_in(tmp_path / "sealed", needles) == [] and leftovers(tmp_path / "sealed") == []
    n_files = sum(len(es) for es in sealed.meta["splits"].values())
    assert verify_shards(tmp_path / "sealed") == n_files  # hashes of the stored files: no key needed
    # no key, another key: an error within seconds, naming the shard and what to do
    t0 = time.perf_counter()
    with pytest.raises(EncryptionKeyError, match=rf"shard .*train_00000\.bin is encrypted .*{key.key_id}.*key-file"):
        ShardReader(tmp_path / "sealed")
    with pytest.raises(EncryptionKeyError, match=rf"train_00000\.bin was encrypted with key {key.key_id}"):
        ShardReader(tmp_path / "sealed", encryption=other_key)
    assert time.perf_counter() - t0 < 5
    # a changed byte: the hash check says so, and so does the GCM tag when the hash is not checked
    shard = sealed.files[0]
    blob = shard.read_bytes()
    shard.write_bytes(blob[:500] + bytes([blob[500] ^ 0x40]) + blob[501:])
    with pytest.raises(ShardError, match=rf"{shard} is corrupt"):
        ShardReader(tmp_path / "sealed", encryption=key)
    unchecked = ShardReader(tmp_path / "sealed", verify=False, encryption=key)
    with pytest.raises(ShardError, match=rf"{shard} is corrupt or was altered.*rebuild"):
        unchecked.read(0, 100)
    shard.write_bytes(blob[:-7])
    with pytest.raises(ShardError, match=rf"{shard} is truncated"):
        ShardReader(tmp_path / "sealed", verify=False, encryption=key)


def test_the_commands_take_a_key_file(tmp_path, key, capsys):
    """`labkit preprocess --key-file` writes encrypted shards; `labkit serve --slurm --key-file` hands the
    job the key file's path (on shared storage), never the key."""
    from labkit.lab.cli import build_parser
    from labkit.serve.cli import job_serve_args

    assert labkit_main(["preprocess", "stdlib", "--scale", "tiny", "--out", str(tmp_path / "s"),
                        "--key-file", key.key_file]) == 0
    assert ShardReader(tmp_path / "s", encryption=key).meta["encryption"]["key_id"] == key.key_id
    assert crypto.is_encrypted(tmp_path / "s" / "train_00000.bin")
    args = build_parser().parse_args(["serve", "m.pt", "--slurm", "--key-file", key.key_file])
    got = job_serve_args(args, Path("m.pt"))
    assert got[got.index("--key-file") + 1] == key.key_file and key.secret().hex() not in " ".join(got)


def test_dask_workers_write_encrypted_shards_with_a_key_file(client, tmp_path, key):
    """The pipeline on 2 worker processes: they read the key file themselves (only its path travels)."""
    c = DataConfig.for_scale("tiny", min_chars=20, corpus_bytes=120_000, partition_bytes=30_000)
    ref = preprocess("stdlib", tmp_path / "plain", config=c, progress=False)
    rep = preprocess("stdlib", tmp_path / "sealed", client=client, config=c, progress=False, encryption=key)
    assert rep.counts == ref.counts and rep.meta["encryption"]["key_id"] == key.key_id
    a, b = ShardReader(tmp_path / "plain"), ShardReader(tmp_path / "sealed", encryption=key)
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    needles = {"token ids": a.read(50, 24).astype(a.dtype).tobytes(), "tokenizer": b'"merges"'}
    assert found_in(tmp_path / "plain", needles) and found_in(tmp_path / "sealed", needles) == []
    assert verify_shards(tmp_path / "sealed", client=client) == sum(len(es) for es in b.meta["splits"].values())


# ----------------------------------------------------------------------------- checkpoints, resume, export, serve


def _model_needles(model) -> dict[str, bytes]:
    weight = next(p for p in model.parameters() if p.numel() >= 64)
    return {"a parameter's bytes": weight.detach().reshape(-1)[:16].numpy().tobytes(), "format": b"labkit.gpt",
            "checkpoint header": b"LABKIT-CKPT", "safetensors header": b"__metadata__", "tokenizer": b'"merges"'}


def test_file_checkpoints_resume_and_serve_from_encrypted_files(tmp_path, key, other_key):
    base = tmp_path / "sealed"  # everything the encrypted run writes
    data = base / "shards"
    make_tiny_shards(data, encryption=key)
    whole = train(cfg(checkpoint_dir=str(base / "w")), data, encryption=key)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(checkpoint_dir=str(base / "c")), data, encryption=key, sink=interrupt_at_step_5)
    rest = train(cfg(checkpoint_dir=str(base / "c")), data, resume=True, encryption=key)
    assert rest.start_step == 4 and rest.losses == whole.losses[4:]  # bit-exact, as without encryption
    tok = ShardReader(data, encryption=key).tokenizer()
    out = C.export_safetensors(whole.model, base / "export" / "model.safetensors", tokenizer=tok, encryption=key)
    plain = C.save(whole.model, tmp_path / "plain" / "model.pt", tokenizer=tok)
    C.export_safetensors(whole.model, tmp_path / "plain" / "model.safetensors", tokenizer=tok)
    needles = _model_needles(whole.model)
    assert {hit.split(": ")[1] for hit in found_in(tmp_path / "plain", needles)} == set(needles)  # found in clear
    assert found_in(base, needles) == [] and leftovers(base) == []
    back = C.load(out, encryption=key)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), back.model.parameters()))
    assert C.load(plain, encryption=key).model is not None  # plaintext files read as before with a key
    # no key: an error that names the file, not a silent fresh start (latest does not skip it as broken)
    with pytest.raises(EncryptionKeyError, match=r"step_00000008\.pt is encrypted"):
        C.FileCheckpointer(str(base / "c")).load_latest()
    with pytest.raises(EncryptionKeyError, match=r"train_00000\.bin is encrypted"):
        train(cfg(checkpoint_dir=str(base / "c")), data, resume=True)
    with pytest.raises(EncryptionKeyError, match=rf"model\.safetensors was encrypted with key {key.key_id}"):
        C.load(out, encryption=other_key)
    # a changed byte in the newest checkpoint: corrupt, so the one before it is taken
    newest = C.list_checkpoints(base / "c")[-1]
    blob = newest.read_bytes()
    newest.write_bytes(blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:])
    with pytest.raises(C.CheckpointError, match=rf"{newest} is corrupt or was altered"):
        C.load(newest, encryption=key)
    assert C.FileCheckpointer(str(base / "c"), encryption=key).load_latest().step == 4

    # `labkit serve --key-file`: decrypts in memory and answers; without the key it says what to do
    env = {**os.environ, "LABKIT_SERVE_TOKEN": "t0k", "PYTHONPATH": str(REPO)}
    env.pop("LABKIT_KEY_FILE", None)
    env.pop("LABKIT_DATA_KEY", None)
    refused = subprocess.run([sys.executable, "-m", "labkit", "serve", str(out), "--port", "0", "--no-embed"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"{out} is encrypted" in refused.stderr and "--key-file" in refused.stderr
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "serve", str(out), "--key-file", key.key_file,
                             "--port", "0", "--no-embed", "--url-file", str(tmp_path / "url")], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while not (tmp_path / "url").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "url").exists(), (tmp_path / "serve.log").read_text()
        r = httpx.post((tmp_path / "url").read_text().strip() + "/generate", timeout=60,
                       json={"prompt": "def ", "max_new_tokens": 4, "seed": 1}, headers={"Authorization": "Bearer t0k"})
        assert r.status_code == 200 and isinstance(r.json()["text"], str), r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_sharded_checkpoints_are_sealed_as_dcp_writes_them(tmp_path, key):
    data = tmp_path / "shards"
    make_tiny_shards(data, encryption=key)
    sharded = dict(checkpoint_format="sharded")
    whole = train(cfg(checkpoint_dir=str(tmp_path / "w"), **sharded), data, encryption=key)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(checkpoint_dir=str(tmp_path / "c"), **sharded), data, encryption=key, sink=interrupt_at_step_5)
    rest = train(cfg(checkpoint_dir=str(tmp_path / "c"), **sharded), data, resume=True, encryption=key)
    assert rest.start_step == 4 and rest.losses == whole.losses[4:]
    folder = C.list_sharded(tmp_path / "w")[-1]
    assert {p.name for p in folder.iterdir()} >= {"labkit.json", ".metadata", "__0_0.distcp"}
    assert all(crypto.is_encrypted(p) for p in folder.iterdir())
    assert found_in(tmp_path, _model_needles(whole.model)) == [] and leftovers(tmp_path) == []
    back = C.load(folder, encryption=key)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), back.model.parameters()))
    with pytest.raises(EncryptionKeyError, match=r"labkit\.json is encrypted"):
        C.load(folder)
    shard = folder / "__0_0.distcp"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:300] + bytes([blob[300] ^ 1]) + blob[301:])
    with pytest.raises(C.CheckpointError, match=r"__0_0\.distcp is corrupt \(checksum"):
        C.load(folder, encryption=key)  # the manifest's hash of the stored file sees it first
    # restoring skips that hash (load_latest checked it); the chunk's GCM tag catches it inside DCP
    resume = C.Resume(step=8, world_size=1, grad_accum=1, model_config={}, where=str(folder))
    run = type("Run", (), {"wrapped": back.model, "optimizer": torch.optim.AdamW(back.model.parameters())})()
    with pytest.raises(C.CheckpointError, match=r"__0_0\.distcp is corrupt or was altered"):
        C.ShardedCheckpointer(str(tmp_path / "w"), encryption=key).restore(run, resume)


def test_writer_tell_counts_plaintext_and_buffers_one_chunk(tmp_path, key):
    buf = io.BytesIO()
    w = crypto.EncryptedWriter(buf, key, close_raw=False)
    w.write(b"x" * 100)
    assert w.tell() == 100 and len(buf.getvalue()) == crypto.HEADER.size  # less than a chunk: still buffered
    w.write(memoryview(b"y" * (2 * crypto.CHUNK)))
    assert len(buf.getvalue()) == crypto.HEADER.size + 2 * (crypto.CHUNK + crypto.TAG)
    w.close()
    assert len(buf.getvalue()) == crypto.HEADER.size + 3 * crypto.TAG + 2 * crypto.CHUNK + 100


def test_an_encrypted_reader_pickles_as_its_files_and_reads_from_many_threads(tmp_path, key):
    """A reader travels to a Dask task as folder, split and key source (the encrypted shard's open file
    cannot, and a plaintext one's tokens need not); threads sharing one reader each get their own
    blocks (a seek and its read held together)."""
    import pickle
    import sys
    from concurrent.futures import ThreadPoolExecutor

    plain = make_tiny_shards(tmp_path / "plain")
    sealed = make_tiny_shards(tmp_path / "sealed", encryption=key)
    for reader in (plain, sealed):
        blob = pickle.dumps(reader)
        assert len(blob) < 2_000, f"{len(blob)} bytes: the tokens travelled"
        back = pickle.loads(blob)
        assert (back.num_tokens, back.split, back.encryption) == (reader.num_tokens, reader.split, reader.encryption)
        assert np.array_equal(back.read(0, back.num_tokens), plain.read(0, plain.num_tokens))
    starts = np.random.default_rng(0).integers(0, plain.num_tokens - 300, size=2000)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as on a busy worker
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda s: sealed.read(int(s), 300), starts))
    finally:
        sys.setswitchinterval(interval)
    bad = [int(s) for s, g in zip(starts, got) if not np.array_equal(g, plain.read(int(s), 300))]
    assert bad == [], f"{len(bad)} of {len(starts)} blocks read wrong from threads sharing the reader"
