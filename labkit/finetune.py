"""Fine-tune the packaged BERT (all-MiniLM-L6-v2) to classify text, with DDP ranks on the Dask workers.

The task is real and offline: the docstrings of the Python standard library, labelled by the
family of the module they come from (networking, text, concurrency, files, data formats).
Whole modules are held out for the test split (``topic_dataset``), so a good score means the model
learned the topic, not the module.

The classifier is the few lines the notebook shows (``TopicClassifier``): the encoder, a mean over
the token vectors that skips padding, a linear head, cross-entropy. The word-embedding table (half of
MiniLM's parameters) stays frozen, which saves its gradients and AdamW moments; the rest learns. ``finetune(client, config)`` runs
it as one rank per Dask worker through ``labkit.core.ranks.run_ranks`` (gloo on CPU, nccl with a GPU
per rank) and ``labkit.strategy`` (DDP over 2+ ranks): every rank takes its slice of each global batch,
DDP all-reduces the gradients in backward. Like ``labkit.train``, the rows of step ``s`` are drawn by a
generator seeded with ``(seed, s)``, so 2 ranks of batch b see exactly the rows of 1 rank of batch 2b.
In the same run it trains a baseline: the encoder frozen, only the head learns (same steps, same rows),
and it reports the majority-class accuracy. Rank 0 emits ``finetune`` events (``loss``,
``accuracy`` of the batch, ``test_accuracy`` at evaluations) for a live plot.

``compare_bert_base`` sets ``bert-base-uncased``'s shapes (``transformers.BertConfig()`` defaults,
nothing downloaded) next to MiniLM's: parameters, training memory and time per step.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import gc
import hashlib
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Sequence

import torch
from pydantic import Field

from labkit.config import ScaleSettings
from labkit.core.events import emit
from labkit.core.ranks import run_ranks
from labkit.data.sources import stdlib_root
from labkit.pretrained import load_bert, mean_pool, packaged_model_path
from labkit.strategy import make_strategy

# Module families of the standard library: the labels. Every module's docstrings belong to its family.
FAMILIES: dict[str, tuple[str, ...]] = {
    "networking": ("http", "urllib", "email", "socket", "smtplib", "ftplib", "poplib", "imaplib", "ssl",
                   "socketserver", "mailbox", "ipaddress", "nntplib", "xmlrpc", "wsgiref"),
    "text": ("re", "string", "textwrap", "difflib", "codecs", "locale", "tokenize", "html", "fnmatch", "shlex",
             "gettext", "pprint", "reprlib", "encodings", "stringprep"),
    "concurrency": ("asyncio", "threading", "multiprocessing", "concurrent", "queue", "sched", "subprocess",
                    "selectors"),
    "files": ("os", "pathlib", "shutil", "tempfile", "glob", "filecmp", "fileinput", "stat", "genericpath",
              "posixpath", "ntpath", "_pyio"),
    "formats": ("json", "csv", "xml", "pickle", "configparser", "plistlib", "tomllib", "base64", "zipfile",
                "tarfile", "gzip", "bz2", "lzma", "pickletools", "quopri"),
}
LABELS: tuple[str, ...] = tuple(FAMILIES)
MODES = ("frozen", "finetuned")


# --------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    """One docstring, its label (an index into ``LABELS``) and the module it came from."""

    text: str
    label: int
    module: str


@dataclass(frozen=True)
class TopicData:
    """The train and test examples; no module has examples in both."""

    train: list[Example]
    test: list[Example]
    labels: tuple[str, ...] = LABELS

    def counts(self, split: str) -> dict[str, int]:
        """Examples per label in ``split`` ("train" or "test")."""
        rows = getattr(self, split)
        return {name: sum(e.label == i for e in rows) for i, name in enumerate(self.labels)}

    def modules(self, split: str) -> list[str]:
        """The modules whose docstrings are in ``split``."""
        return sorted({e.module for e in getattr(self, split)})

    def majority(self) -> tuple[int, float]:
        """The most frequent label of the train split and the test accuracy of always answering it."""
        counts = [sum(e.label == i for e in self.train) for i in range(len(self.labels))]
        label = max(range(len(counts)), key=counts.__getitem__)
        return label, sum(e.label == label for e in self.test) / max(len(self.test), 1)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _clean(doc: str, max_words: int) -> str:
    """The docstring's first paragraphs as one line, cut to ``max_words`` words."""
    words = re.sub(r"\s+", " ", doc).strip().split(" ")
    return " ".join(words[:max_words])


@functools.lru_cache(maxsize=256)
def module_docstrings(module: str, min_words: int = 8, max_words: int = 80,
                      limit: int | None = None) -> tuple[str, ...]:
    """The docstrings (module, classes, functions) of a stdlib module or package, read with ``ast``
    from its source files (nothing is imported), deduplicated, at least ``min_words`` words each;
    ``limit``: stop reading files once that many are found (files in name order)."""
    root = stdlib_root()
    path = root / f"{module}.py"
    files = [path] if path.is_file() else sorted(p for p in (root / module).rglob("*.py") if "test" not in p.parts
                                                 and "tests" not in p.parts) if (root / module).is_dir() else []
    seen: set[str] = set()
    out = []
    for f in files:
        if limit is not None and len(out) >= limit:
            break
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                text = _clean(doc, max_words)
                if len(text.split(" ")) >= min_words and text not in seen:
                    seen.add(text)
                    out.append(text)
    return tuple(out)


def held_out(family: str, test_fraction: float = 1 / 3) -> list[str]:
    """The modules of ``family`` whose docstrings form the test split (the same on every machine:
    chosen by a hash of the name; at least one, never all)."""
    mods = sorted(FAMILIES[family], key=_digest)
    n = min(max(1, round(test_fraction * len(mods))), len(mods) - 1)
    return sorted(mods[:n])


def topic_dataset(per_module: int = 20, test_fraction: float = 1 / 3, max_words: int = 80) -> TopicData:
    """Docstrings labelled by module family, at most ``per_module`` from each module (so big packages
    such as asyncio do not drown the rest), split by whole modules: ``held_out`` ones go to test."""
    train, test = [], []
    for label, family in enumerate(LABELS):
        test_mods = set(held_out(family, test_fraction))
        for module in FAMILIES[family]:
            found = module_docstrings(module, max_words=max_words, limit=4 * per_module)
            docs = sorted(found, key=_digest)[:per_module]
            (test if module in test_mods else train).extend(Example(d, label, module) for d in docs)
    return TopicData(train, test)


# -------------------------------------------------------------------------------------- model
class TopicClassifier(torch.nn.Module):
    """BERT encoder, mean of the token vectors (padding skipped), a linear head."""

    def __init__(self, encoder: torch.nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) for token ids and mask (B, T)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        pooled = mean_pool(hidden, attention_mask)                                                     # (B, C)
        return self.head(pooled)                                                                       # (B, K)


def load_encoder(dropout: float | None = None) -> torch.nn.Module:
    """The packaged MiniLM without its pooler; ``dropout`` replaces its own (0.1) when given."""
    encoder, _ = load_bert(attn_implementation="sdpa")
    encoder.pooler = None  # BERT's [CLS] pooler: unused here (DDP would wait for its gradients)
    if dropout is not None:
        for m in encoder.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
    return encoder


def build_classifier(n_classes: int = len(LABELS), *, freeze_encoder: bool = False, dropout: float | None = None,
                     seed: int = 0, encoder: torch.nn.Module | None = None) -> TopicClassifier:
    """The packaged MiniLM (or ``encoder``) with a fresh head (seeded, so every rank starts alike) and its
    word embeddings frozen (``freeze``); ``freeze_encoder``: only the head learns."""
    encoder = encoder if encoder is not None else load_encoder(dropout)
    torch.manual_seed(seed)
    model = TopicClassifier(encoder, n_classes)
    freeze(model, encoder=freeze_encoder)
    return model


def freeze(model: TopicClassifier, encoder: bool = False) -> TopicClassifier:
    """Keep the word-embedding table fixed (half of MiniLM's parameters, most of its rows tokens these
    docstrings never use: its gradients and AdamW moments would cost memory for little), or, with
    ``encoder``, the whole encoder (only the head learns)."""
    model.requires_grad_(True)  # a shared encoder may come from a frozen run
    (model.encoder if encoder else model.encoder.embeddings.word_embeddings).requires_grad_(False)
    return model


def encode(texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (N, max_length) with the packaged tokenizer, padded to ``max_length``
    (fixed shapes: every rank and step does the same work)."""
    from transformers import BertTokenizer  # lazy: transformers (~1 s import) only when text is encoded

    tok = BertTokenizer.from_pretrained(packaged_model_path(), local_files_only=True)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------------- config
Positive = Annotated[int, Field(ge=1)]
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(per_module=6, max_length=32, batch_size=8, steps=12, head_lr=2e-2, lr=1.5e-4, num_threads=1,
                 compare_batch=2, compare_seq=16, compare_repeats=1),
    "binder": dict(per_module=16, max_length=48, batch_size=8, steps=50, num_threads=1,
                   compare_batch=8, compare_seq=48, compare_repeats=2),
    "workshop": dict(per_module=40, max_length=128, batch_size=32, steps=300, eval_interval=50, compare_batch=32,
                     compare_seq=128, compare_direct=True),
    "full": dict(per_module=200, max_length=256, batch_size=32, steps=2000, eval_interval=200, compare_batch=32,
                 compare_seq=256, compare_direct=True),
}


class FinetuneConfig(ScaleSettings):
    """One fine-tuning run: data size, sequence length, per-rank batch, steps and learning rates.
    The global batch is ``batch_size * world_size`` docstrings per step."""

    section = noun = "finetune"
    presets = {name: {**preset, "scale": name} for name, preset in _PRESETS.items()}

    per_module: Positive = 6            # docstrings per module at most
    max_length: Positive = 32           # tokens per docstring (padded / cut)
    batch_size: Positive = 8            # per rank and step
    steps: Positive = 12
    lr: Annotated[float, Field(gt=0)] = 1e-4          # the encoder's (when it learns): small, it is pretrained
    head_lr: Annotated[float, Field(gt=0)] = 1e-2     # the new head's: it starts from random
    warmup_steps: Annotated[int, Field(ge=0)] = 2
    weight_decay: float = 0.01
    dropout: float | None = None        # None keeps MiniLM's own (0.1)
    eval_interval: Annotated[int, Field(ge=0)] = 0    # test accuracy also every this many steps (always at 0, end)
    eval_batch: Positive = 16
    seed: int = 0
    num_threads: int | None = None      # torch threads per rank on CPU; None leaves torch's choice
    # bert-base next to MiniLM (compare_bert_base): batch, tokens, timing repeats, and whether the
    # whole models are measured too (bert-base's states alone are ~1.7 GB: not on Binder)
    compare_batch: Positive = 2
    compare_seq: Positive = 16
    compare_repeats: Positive = 1
    compare_direct: bool = False
    scale: str | None = None


def lr_factor(step: int, config: FinetuneConfig) -> float:
    """Linear warmup over ``warmup_steps``, then linear decay to 0 at ``steps`` (BERT's schedule)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


def global_rows(step: int, n: int, size: int, seed: int) -> torch.Tensor:
    """The indices of step ``step``'s global batch of ``size`` rows out of ``n`` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    reps = -(-size // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:size]


# ----------------------------------------------------------------------------------- training
@dataclass
class RunHistory:
    """One mode's training on one rank: global losses and batch accuracies per step, test accuracy
    at evaluations, and a digest of the final weights."""

    mode: str
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)   # {"step", "test_accuracy"}
    seconds: float = 0.0
    digest: str = ""
    head: torch.Tensor | None = None

    @property
    def test_accuracy(self) -> float:
        """The test accuracy after the last step."""
        return self.evals[-1]["test_accuracy"] if self.evals else float("nan")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all the weights, in parameter order (equal on ranks that hold the same model)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
              rank: int, world: int, batch: int, strategy: Any, device: torch.device) -> float:
    """Test accuracy: each rank classifies its share of the rows, the counts are summed over the ranks."""
    model.eval()
    mine = torch.arange(rank, len(labels), world)
    right = torch.zeros(2, device=device)
    for i in range(0, len(mine), batch):
        rows = mine[i:i + batch]
        pred = model(ids[rows].to(device), mask[rows].to(device)).argmax(-1)
        hits = (pred == labels[rows].to(device)).sum().float()
        right += torch.stack([hits, torch.tensor(float(len(rows)), device=device)])
    strategy.all_mean(right)  # the mean of the counts: the ratio is that of the sums
    model.train()
    return float(right[0] / right[1].clamp(min=1))


def train_mode(mode: str, config: FinetuneConfig, data: dict[str, torch.Tensor], *, rank: int = 0, world: int = 1,
               device: torch.device | str = "cpu", sink: Callable | None = None,
               encoder: torch.nn.Module | None = None) -> RunHistory:
    """Train one classifier (``mode`` "finetuned": all but the word embeddings learn; "frozen": only the
    head) for ``config.steps`` steps as rank ``rank`` of ``world`` (the process group is up when world > 1).
    ``encoder``: a pristine MiniLM to use (a "finetuned" run changes it), else one is loaded."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(MODES)}")
    device = torch.device(device)
    t0 = time.perf_counter()
    strategy = make_strategy("auto", world)                  # DDP: over 2+ ranks (else one process)
    model = build_classifier(freeze_encoder=mode == "frozen", dropout=config.dropout, seed=config.seed,
                             encoder=encoder).to(device)
    wrapped = strategy.wrap(model, device)                     # DDP: copies rank 0's weights to all ranks
    groups = [{"params": list(model.head.parameters()), "lr": config.head_lr}]
    if mode == "finetuned":
        groups.append({"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base = [g["lr"] for g in optimizer.param_groups]
    ids, mask, labels = data["train_ids"], data["train_mask"], data["train_labels"]
    hist = RunHistory(mode)
    model.train()

    def evaluate(step: int) -> None:
        acc = _accuracy(model, data["test_ids"], data["test_mask"], data["test_labels"], rank, world,
                        config.eval_batch, strategy, device)
        hist.evals.append({"step": step, "test_accuracy": acc})
        if rank == 0:
            emit("finetune", sink, rank=rank, step=step, mode=mode, test_accuracy=acc)

    evaluate(0)
    for step in range(config.steps):
        rows = global_rows(step, len(labels), config.batch_size * world, config.seed)
        rows = rows[rank * config.batch_size:(rank + 1) * config.batch_size]  # DDP: this rank's rows
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * lr_factor(step, config)
        logits = wrapped(ids[rows].to(device), mask[rows].to(device))
        y = labels[rows].to(device)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()                                        # DDP: all-reduces the gradients, bucket by bucket
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hits = (logits.argmax(-1) == y).float().mean()
        stats = strategy.all_mean(torch.stack([loss.detach(), hits]))  # DDP: the ranks' mean, for the plot
        hist.losses.append(float(stats[0]))
        hist.accuracies.append(float(stats[1]))
        done = step + 1
        if rank == 0:
            emit("finetune", sink, rank=rank, step=done, mode=mode, loss=hist.losses[-1],
                 accuracy=hist.accuracies[-1])
        if done == config.steps or (config.eval_interval and done % config.eval_interval == 0):
            evaluate(done)
    hist.seconds = time.perf_counter() - t0
    hist.digest = weights_digest(model)
    hist.head = model.head.weight.detach().cpu().clone()
    return hist


def ddp_lines() -> str:
    """The lines of ``train_mode`` that make it a DDP rank (marked ``# DDP:`` in its source)."""
    return "\n".join(line for line in inspect.getsource(train_mode).splitlines() if "# DDP:" in line)


def tensors(data: TopicData, max_length: int) -> dict[str, torch.Tensor]:
    """The dataset as token ids, masks and labels, ready to ship to the ranks."""
    out = {}
    for split in ("train", "test"):
        rows = getattr(data, split)
        out[f"{split}_ids"], out[f"{split}_mask"] = encode([e.text for e in rows], max_length)
        out[f"{split}_labels"] = torch.tensor([e.label for e in rows])
    return out


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: rank 0's history per mode, the majority baseline, every rank's digests."""

    runs: dict[str, RunHistory]
    majority: float
    majority_label: str
    world_size: int
    n_train: int
    n_test: int
    digests: list[dict[str, str]]          # per rank: mode -> weights digest
    seconds: float

    @property
    def ranks_agree(self) -> bool:
        """True when every rank ended each mode with bit-identical weights."""
        return all(d == self.digests[0] for d in self.digests)

    def table(self) -> str:
        """Held-out accuracy of each model next to the majority class."""
        lines = [f"{'model':<34} {'test accuracy':>13}", "-" * 48,
                 f"{'majority class (' + self.majority_label + ')':<34} {self.majority:>13.1%}"]
        names = {"frozen": "frozen MiniLM + trained head", "finetuned": "fine-tuned MiniLM + head"}
        for mode, run in self.runs.items():
            lines.append(f"{names[mode]:<34} {run.test_accuracy:>13.1%}")
        return "\n".join(lines)


def _rank_main(ctx: Any, config: FinetuneConfig, data: dict[str, torch.Tensor], modes: Sequence[str]) -> dict:
    """One rank on a Dask worker (called by ``run_ranks``): each mode in turn."""
    from transformers.utils import logging  # lazy: as in encode

    logging.disable_progress_bar()  # no "Loading weights" bars in the worker's log
    if config.num_threads and ctx.device == "cpu":
        torch.set_num_threads(config.num_threads)
    # one MiniLM for both: a frozen run leaves the encoder as it was, so the fine-tune (last) starts
    # from the same pretrained weights without a second copy in memory
    encoder = load_encoder(config.dropout)
    runs = {}
    for m in sorted(modes, key=MODES.index):
        runs[m] = train_mode(m, config, data, rank=ctx.rank, world=ctx.world_size, device=ctx.device,
                             encoder=encoder)
        _release_memory()  # freed optimizer states and activations back to the OS
    return {"runs": runs, "digests": {m: r.digest for m, r in runs.items()}}


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and the
    worker's memory monitor counts them)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def finetune(client: Any, config: FinetuneConfig, *, workers: int | Sequence[str] | None = None,
             modes: Sequence[str] = MODES, data: TopicData | None = None, timeout: float = 120.0) -> FinetuneResult:
    """Fine-tune MiniLM on the stdlib topics with one DDP rank per Dask worker (all, or ``workers``);
    ``modes`` also trains the frozen-encoder baseline the same steps on the same rows. Rank 0's
    ``finetune`` events go to the Dask topic (``LivePlot(..., kinds=["finetune"]).attach(client)``)."""
    t0 = time.perf_counter()
    data = data if data is not None else topic_dataset(config.per_module)
    label, majority = data.majority()
    results = run_ranks(client, _rank_main, config, tensors(data, config.max_length), tuple(modes),
                        workers=workers, timeout=timeout)
    return FinetuneResult(runs=results[0]["runs"], majority=majority, majority_label=data.labels[label],
                          world_size=len(results), n_train=len(data.train), n_test=len(data.test),
                          digests=[r["digests"] for r in results], seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------- bert-base next to MiniLM
def minilm_config() -> Any:
    """The packaged MiniLM's ``BertConfig`` (its config.json)."""
    from transformers import BertConfig  # lazy: as in encode

    return BertConfig.from_pretrained(packaged_model_path(), local_files_only=True)


def bert_base_config() -> Any:
    """``transformers.BertConfig()``: its defaults are bert-base-uncased's shapes (nothing is downloaded)."""
    from transformers import BertConfig  # lazy: as in encode

    return BertConfig()


def count_params(bert_config: Any, n_classes: int = len(LABELS)) -> int:
    """Parameters of the classifier (encoder without pooler, plus the head), counted on the meta device
    (no memory is allocated)."""
    from transformers import BertModel  # lazy: as in encode

    with torch.device("meta"):
        encoder = BertModel(bert_config, add_pooling_layer=False)
    return sum(p.numel() for p in encoder.parameters()) + (bert_config.hidden_size + 1) * n_classes


def _random_classifier(bert_config: Any, layers: int, n_classes: int) -> TopicClassifier:
    from transformers import BertModel  # lazy: as in encode

    cfg = bert_config.__class__(**{**bert_config.to_dict(), "num_hidden_layers": layers})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return freeze(TopicClassifier(BertModel(cfg, add_pooling_layer=False), n_classes))  # as the fine-tune trains it


def activation_bytes(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after a forward of ``model`` (the activations): the storages of
    the saved tensors, each counted once, the weights themselves left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and t.device.type != "meta":
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, mask)
    del logits
    return sum(kept.values())


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 repeats: int = 3) -> float:
    """Seconds of one training step (forward, backward, AdamW), the fastest of ``repeats`` after a warm-up."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=False)
    best = math.inf
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(ids, mask), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first is warm-up (allocations, AdamW's state)
            best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class Measured:
    """One architecture's shapes, parameters and training cost for the fine-tune at one batch."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    params: int
    trainable: int                # all but the frozen word embeddings
    activation_bytes: float       # from 1- and 2-layer models, extended to all layers
    step_seconds: float           # a 1-layer model's step plus one layer's time per further layer
    direct: dict[str, float] = field(default_factory=dict)   # measured on the whole model, when it was

    @property
    def states_bytes(self) -> int:
        """Float32 weights (4 bytes per parameter), and gradients and AdamW's two moments (4 + 8 bytes per
        trained parameter)."""
        return 4 * self.params + 12 * self.trainable

    @property
    def training_bytes(self) -> float:
        """Model states plus activations: what a rank needs for this fine-tune (allocator overhead aside)."""
        return self.states_bytes + self.activation_bytes


@dataclass
class Comparison:
    """MiniLM next to bert-base-uncased, at ``batch`` docstrings of ``seq`` tokens."""

    minilm: Measured
    bert_base: Measured
    batch: int
    seq: int

    def rows(self) -> list[tuple[str, float, float]]:
        """(quantity, MiniLM, bert-base) for the table."""
        a, b = self.minilm, self.bert_base
        mib = 1024 ** 2
        return [("layers", a.layers, b.layers), ("hidden size", a.hidden, b.hidden), ("heads", a.heads, b.heads),
                ("FFN size", a.ffn, b.ffn), ("parameters (M)", a.params / 1e6, b.params / 1e6),
                ("trained (M; word emb. frozen)", a.trainable / 1e6, b.trainable / 1e6),
                ("weights+grads+AdamW (MiB)", a.states_bytes / mib, b.states_bytes / mib),
                ("activations (MiB)", a.activation_bytes / mib, b.activation_bytes / mib),
                ("training memory (MiB)", a.training_bytes / mib, b.training_bytes / mib),
                ("time per step (s)", a.step_seconds, b.step_seconds)]

    def table(self) -> str:
        """The comparison as text, with the ratio bert-base / MiniLM."""
        lines = [f"batch {self.batch} x {self.seq} tokens, float32 on {torch.get_num_threads()} CPU thread(s)",
                 f"{'':<30} {'MiniLM-L6':>10} {'bert-base':>10} {'ratio':>7}", "-" * 60]
        for name, a, b in self.rows():
            fmt = "{:>10,.0f}" if float(a).is_integer() and float(b).is_integer() else "{:>10,.2f}"
            lines.append(f"{name:<30} {fmt.format(a)} {fmt.format(b)} {b / a:>6.1f}x")
        return "\n".join(lines)


def layer_seconds(model: TopicClassifier, ids: torch.Tensor, mask: torch.Tensor, repeats: int = 3) -> float:
    """Seconds of one encoder layer's share of a training step (its forward, backward and AdamW update),
    the fastest of ``repeats``: the layer is called again with the inputs it got in a forward of ``model``."""
    layer = model.encoder.encoder.layer[0]
    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.setdefault("call", (args, kwargs))

    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids, mask)
    hook.remove()
    args, kwargs = seen["call"]
    x = args[0] if args else kwargs.pop("hidden_states")
    args = args[1:]
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-5, foreach=False)
    best = math.inf
    for i in range(repeats + 1):
        h = x.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = layer(h, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def measure(name: str, bert_config: Any, batch: int, seq: int, *, repeats: int = 3, direct: bool = False,
            n_classes: int = len(LABELS)) -> Measured:
    """Shapes, parameters, activations and step time of ``bert_config``'s classifier, randomly
    initialised (the numbers depend on shapes only). Every layer is the same, so the model is measured
    with one layer and each further layer adds the same: activations (exactly, from a 2-layer model)
    and time (one layer timed alone); ``direct`` also measures the whole model (which needs its model
    states in memory: ``Measured.states_bytes``)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, bert_config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq // 2:] = 0   # half the rows padded, as real batches are
    labels = torch.randint(0, n_classes, (batch,), generator=g)
    one = _random_classifier(bert_config, 1, n_classes)
    act1, sec1, per_layer_sec = activation_bytes(one, ids, mask), step_seconds(one, ids, mask, labels, repeats), \
        layer_seconds(one, ids, mask, repeats)
    del one
    act2 = activation_bytes(_random_classifier(bert_config, 2, n_classes), ids, mask)
    n = bert_config.num_hidden_layers
    out = Measured(name, n, bert_config.hidden_size, bert_config.num_attention_heads, bert_config.intermediate_size,
                   bert_config.vocab_size, (total := count_params(bert_config, n_classes)),
                   total - bert_config.vocab_size * bert_config.hidden_size,
                   act1 + (n - 1) * (act2 - act1), sec1 + (n - 1) * per_layer_sec)
    if direct:
        model = _random_classifier(bert_config, n, n_classes)
        out.direct = {"activation_bytes": activation_bytes(model, ids, mask),
                      "step_seconds": step_seconds(model, ids, mask, labels, repeats)}
    return out


def compare_bert_base(batch: int = 8, seq: int = 32, *, repeats: int = 3, direct_minilm: bool = False,
                      direct_bert_base: bool = False) -> Comparison:
    """What bert-base-uncased (``BertConfig()``) changes next to the packaged MiniLM for this fine-tune:
    shapes, parameters, training memory and time per step at ``batch`` x ``seq`` tokens. ``direct_*``
    also measure the whole model (bert-base's needs ~2 GB: leave it off on Binder)."""
    return Comparison(measure("MiniLM-L6", minilm_config(), batch, seq, repeats=repeats, direct=direct_minilm),
                      measure("bert-base", bert_base_config(), batch, seq, repeats=repeats, direct=direct_bert_base),
                      batch, seq)


def compare_for(config: FinetuneConfig) -> Comparison:
    """``compare_bert_base`` at the config's ``compare_*`` sizes."""
    return compare_bert_base(config.compare_batch, config.compare_seq, repeats=config.compare_repeats,
                             direct_minilm=config.compare_direct, direct_bert_base=config.compare_direct)
