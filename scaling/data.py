"""Data: character-level text (WikiText-2/103 or a local corpus, through ``datasets``) or seeded random tokens,
on device, sampled by index.

Tokenization is character level with a fixed vocabulary of 128: a character with code point < 128
(ASCII) is its own id; every other character (accented letters, CJK, typographic dashes: about
0.07% of the characters of WikiText-2's validation split) maps to id 0, "unknown" — NUL never occurs in the text, so id 0
means exactly "a non-ASCII character". Lines are joined with their newlines.

Where the text comes from: ``--data-dir``/``SCALING_DATA_DIR``, read with ``datasets``' own ``text``/``parquet``
loaders — for WikiText (``wikitext2``, ``wikitext103``) the files ``wiki.{train,valid,test}.raw`` or ``.tokens`` or the
hub's parquet files, in the folder or one of its subfolders; for a text corpus (``dataset: text``, ``corpus: NAME``)
``NAME/{train,valid,test}.txt`` in the folder, or those files in the folder itself. Without a local copy WikiText
comes from the hub (``wikitext``, ``wikitext-2-raw-v1`` / ``wikitext-103-raw-v1``). Which split trains and which
validates is explicit (``--splits valid:test``), recorded in the run and printed.

The encoded splits are cached as ``.npy`` under ``SCALING_CACHE_DIR`` (default ``~/.cache/scaling``),
keyed by the source files' content hash, with the loss baselines beside them: a second run neither
re-reads through ``datasets`` nor re-encodes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scaling.config import ConfigError, DataConfig, ModelConfig, Phase, cache_dir, first_line

ENCODING_VERSION = "char128-v1"
UNKNOWN_ID = 0
VAL_SEED = 1234  # the validation windows are the same for every run of a phase
VAL_BATCH = 64  # sequences per validation batch, whatever the training batch size
SAMPLER_CHUNK = 256  # steps of batch indices drawn at a time

HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
HUB_CONFIG = {"wikitext2": "wikitext-2-raw-v1", "wikitext103": "wikitext-103-raw-v1"}
SPLITS_HINT = "choose which split trains and which validates with --splits, e.g. --splits valid:test"


def how_to_supply(dataset: str, corpus: str = "") -> str:
    """What a user can do when a dataset's files are not found: one clause of a one-line error."""
    if dataset == "text":
        return (f"give the folder holding {corpus}/{{train,valid,test}}.txt (or those files themselves) with "
                f"--data-dir DIR or SCALING_DATA_DIR=DIR")
    return (f"give a local {dataset} copy with --data-dir DIR or SCALING_DATA_DIR=DIR (files "
            "wiki.{train,valid,test}.raw or .tokens, or the hub's *.parquet files, in DIR or a folder of it); "
            f"if it lacks the train split, {SPLITS_HINT}")


class DataError(ConfigError):
    """The data cannot be had as asked: one line, exit 2."""


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # uint8 token ids (wikitext) or int16 (random), 1-D
    val: torch.Tensor
    vocab_size: int
    fingerprint: str
    source: str  # human-readable: where the text came from and the split mapping
    splits: tuple[str, str]
    baselines: dict[str, float] = field(default_factory=dict)

    def to(self, device) -> "Corpus":
        self.train, self.val = self.train.to(device), self.val.to(device)
        return self


# ---------------------------------------------------------------------------------------------
# Tokenization


def encode(text: str) -> np.ndarray:
    """Characters → ids in [0, 128): ASCII is its code point, everything else UNKNOWN_ID (0)."""
    arr = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(arr < 128, arr, UNKNOWN_ID).astype(np.uint8)


def decode(ids) -> str:
    return "".join(chr(int(i)) if int(i) != UNKNOWN_ID else "\ufffd" for i in ids)


# ---------------------------------------------------------------------------------------------
# Finding and reading WikiText-2


def find_split_files(data_dir: str | Path) -> dict[str, Path]:
    """Map split name (train/valid/test) → file, for the layouts we accept, raw preferred over tokens."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {str(root)!r}; {how_to_supply('wikitext2')}")
    dirs = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    found: dict[str, Path] = {}
    for d in dirs:
        for split in ("train", "valid", "test"):
            if split in found:
                continue
            for name in (f"wiki.{split}.raw", f"wiki.{split}.tokens"):
                if (d / name).is_file():
                    found[split] = d / name
                    break
            else:
                parquet = sorted(d.glob(f"{HUB_SPLIT[split]}-*.parquet"))
                if parquet:
                    found[split] = parquet[0]
    return found


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_text_with_datasets(path: Path) -> str:
    """Read one split file through ``datasets``' local loaders (``text`` or ``parquet``)."""
    import datasets

    datasets.disable_progress_bars()
    if path.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files={"split": str(path)}, split="split")
        return "".join(ds["text"])
    ds = datasets.load_dataset("text", data_files={"split": str(path)}, split="split", keep_linebreaks=True)
    return "".join(ds["text"])


def _load_split_cached(path: Path) -> tuple[np.ndarray, str]:
    digest = _file_digest(path)
    cached = cache_dir() / f"{digest[:32]}-{ENCODING_VERSION}.npy"
    if cached.is_file():
        return np.load(cached), digest
    ids = encode(_read_text_with_datasets(path))
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, cached)
    return ids, digest


def _load_from_hub(dataset: str, splits: tuple[str, str]) -> tuple[dict[str, np.ndarray], str]:
    import datasets

    datasets.logging.set_verbosity_error()  # a failed download is reported once, by us, in one line
    try:
        import huggingface_hub.utils

        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    try:
        ds = datasets.load_dataset("wikitext", HUB_CONFIG[dataset])
    except Exception as e:  # offline, hub down, ...
        raise DataError(f"{dataset} could not be loaded from the Hugging Face hub ({first_line(e, 160)}); "
                        f"{how_to_supply(dataset)}") from None
    out = {}
    for s in splits:
        out[s] = encode("".join(ds[HUB_SPLIT[s]]["text"]))
    return out, f"hub:wikitext/{HUB_CONFIG[dataset]}"


def find_text_files(data_dir: str | Path, corpus: str) -> dict[str, Path]:
    """Map split name → ``{train,valid,test}.txt`` of a text corpus: in ``data_dir/corpus`` or, for a
    ``data_dir`` that is the corpus's own folder, in ``data_dir`` itself."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {str(root)!r}; {how_to_supply('text', corpus)}")
    for d in (root / corpus, root):
        found = {s: d / f"{s}.txt" for s in ("train", "valid", "test") if (d / f"{s}.txt").is_file()}
        if found:
            return found
    return {}


def _local_split_files(data: DataConfig, data_dir: str | Path, splits: tuple[str, str]) -> dict[str, Path]:
    files = (find_text_files(data_dir, data.corpus) if data.dataset == "text" else find_split_files(data_dir))
    missing = [s for s in splits if s not in files]
    if missing:
        have = ", ".join(sorted(files)) or "none"
        hint = f"; {SPLITS_HINT}" if len(files) >= 2 else f"; {how_to_supply(data.dataset, data.corpus)}"
        raise DataError(f"{data.corpus or data.dataset} split {missing[0]!r} not found in {str(data_dir)!r} "
                        f"(found: {have}){hint}")
    return files


def load_text_corpus(data: DataConfig, data_dir: str | Path | None, splits: tuple[str, str]) -> Corpus:
    """A character-level corpus (WikiText-2/103 or a local text corpus), its two splits encoded and cached."""
    train_split, val_split = splits
    name = data.corpus or data.dataset
    if data_dir:
        files = _local_split_files(data, data_dir, splits)
        (train, d1), (val, d2) = _load_split_cached(files[train_split]), _load_split_cached(files[val_split])
        source = f"{files[train_split].parent}: train on {files[train_split].name}, validate on {files[val_split].name}"
        fingerprint = hashlib.sha256(f"{d1}:{d2}:{ENCODING_VERSION}".encode()).hexdigest()[:16]
        key = f"{d1[:32]}-{d2[:32]}"
    elif data.dataset == "text":
        raise DataError(f"no local data for text corpus {name!r}; {how_to_supply('text', name)}")
    else:
        arrays, where = _load_from_hub(data.dataset, splits)
        train, val = arrays[train_split], arrays[val_split]
        source = f"{where}: train on {train_split}, validate on {val_split}"
        fingerprint = hashlib.sha256(train.tobytes() + b"|" + val.tobytes()).hexdigest()[:16]
        key = fingerprint
    corpus = Corpus(name=name, train=torch.from_numpy(train), val=torch.from_numpy(val), vocab_size=128,
                    fingerprint=fingerprint, source=source, splits=splits)
    corpus.baselines = _cached_baselines(key, train, val, 128)
    return corpus


def load_wikitext2(data_dir: str | Path | None, splits: tuple[str, str]) -> Corpus:
    """WikiText-2's characters (:func:`load_text_corpus` of the ``wikitext2`` dataset)."""
    return load_text_corpus(DataConfig(dataset="wikitext2"), data_dir, splits)


def random_corpus(data: DataConfig, model: ModelConfig, seed: int) -> Corpus:
    """Uniform random tokens (phase 2), generated from the seed: nothing to learn beyond ln V."""
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    v = model.vocab_size
    train = torch.randint(v, (data.random_train_tokens,), generator=g, dtype=torch.int64).to(torch.int16)
    val = torch.randint(v, (data.random_val_tokens,), generator=g, dtype=torch.int64).to(torch.int16)
    corpus = Corpus(name="random", train=train, val=val, vocab_size=v,
                    fingerprint=f"random-v{v}-n{data.random_train_tokens}-s{seed}", source=f"random tokens, seed {seed}",
                    splits=("train", "valid"))
    corpus.baselines = compute_baselines(train.numpy(), val.numpy(), v)
    return corpus


def load_corpus(phase: Phase, seed: int, data_dir: str | Path | None = None,
                splits: tuple[str, str] = ("train", "valid"), task: str | None = None) -> Corpus:
    """The corpus of a phase's configuration (``task``: a modular configuration's, see scaling.modular)."""
    if phase.data.dataset == "random":
        return random_corpus(phase.data, phase.model, seed)
    if phase.data.dataset == "modular":
        from scaling import modular

        return modular.load_corpus(phase.data, task, seed)
    return load_text_corpus(phase.data, data_dir, splits)


# ---------------------------------------------------------------------------------------------
# Baselines: what a model must beat to have learned anything


def compute_baselines(train: np.ndarray, val: np.ndarray, vocab: int) -> dict[str, float]:
    """Cross-entropy (nats) on ``val`` of uniform, unigram and bigram models counted on ``train`` (add-one)."""
    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    uni = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    uni /= uni.sum()
    big = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab) + 1.0
    big /= big.sum(axis=1, keepdims=True)
    return {
        "baseline_uniform_loss": math.log(vocab),
        "baseline_unigram_loss": float(-np.log(uni[val]).mean()),
        "baseline_bigram_loss": float(-np.log(big[val[:-1], val[1:]]).mean()),
    }


def _cached_baselines(key: str, train: np.ndarray, val: np.ndarray, vocab: int) -> dict[str, float]:
    path = cache_dir() / f"baselines-{key}-{ENCODING_VERSION}.json"
    if path.is_file():
        return json.loads(path.read_text())
    b = compute_baselines(train, val, vocab)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(b))
    os.replace(tmp, path)
    return b


def baselines_for_phase(phase: str | Phase, data_dir: str | Path | None = None,
                        splits: tuple[str, str] | None = None) -> dict[str, float]:
    """The three baselines for a phase's dataset; DataError when its data is not available locally."""
    from scaling.config import load_phase

    p = load_phase(phase) if isinstance(phase, str) else phase
    data_dir = data_dir or os.environ.get("SCALING_DATA_DIR")
    if splits is None:
        env = os.environ.get("SCALING_SPLITS")
        splits = tuple(env.split(":")) if env else ("train", "valid")
    if p.data.dataset != "random" and not data_dir:
        raise DataError(f"no local data for phase {p.name!r}; {how_to_supply(p.data.dataset, p.data.corpus)}")
    return load_corpus(p, p.train.seeds[0], data_dir, splits).baselines


# ---------------------------------------------------------------------------------------------
# Sampling (identical for the single-run loop and the batched multi-config engine)


def batch_starts(seed: int, chunk: int, batch_size: int, n_tokens: int, context: int) -> torch.Tensor:
    """Window starts for steps ``[chunk*SAMPLER_CHUNK, (chunk+1)*SAMPLER_CHUNK)``: shape (SAMPLER_CHUNK, B).

    A pure function of (seed, chunk): a resumed run draws exactly the batches it would have drawn,
    on any device, and a run trained inside a batched group draws the same batches as alone.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + chunk * 7_919 + 1) % (2**63 - 1))
    return torch.randint(0, n_tokens - context - 1, (SAMPLER_CHUNK, batch_size), generator=g)


class BatchSampler:
    """Training batches of one run: (x, y) of shape (B, T), gathered on the data's device."""

    def __init__(self, tokens: torch.Tensor, seed: int, batch_size: int, context: int):
        self.tokens, self.seed, self.batch_size, self.context = tokens, seed, batch_size, context
        self._chunk, self._starts = None, None
        self._offsets = torch.arange(context + 1, device=tokens.device)

    def starts(self, step: int) -> torch.Tensor:
        chunk = step // SAMPLER_CHUNK
        if chunk != self._chunk:
            self._starts = batch_starts(self.seed, chunk, self.batch_size, len(self.tokens),
                                        self.context).to(self.tokens.device)
            self._chunk = chunk
        return self._starts[step % SAMPLER_CHUNK]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.tokens, self.starts(step), self._offsets)


def windows(tokens: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = tokens[starts.unsqueeze(-1) + offsets].long()
    return w[..., :-1], w[..., 1:]


def validation_batches(val: torch.Tensor, n_batches: int, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed, seeded validation set: ``n_batches`` batches of VAL_BATCH windows (same for every run)."""
    g = torch.Generator().manual_seed(VAL_SEED)
    starts = torch.randint(0, len(val) - context - 1, (n_batches, VAL_BATCH), generator=g).to(val.device)
    offsets = torch.arange(context + 1, device=val.device)
    return [windows(val, s, offsets) for s in starts]
