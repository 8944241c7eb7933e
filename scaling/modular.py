"""Algorithmic datasets of the grokking experiments (Power et al. 2022): binary operations on a finite set.

Each example is the sequence ``[x, op, y, =]`` and its answer ``x op y``; a model predicts the answer from
the output at the ``=`` position (loss and accuracy on that token only). Tasks:

* ``x_plus_y``: (x + y) mod p, all p² pairs;
* ``x_minus_y``: (x − y) mod p, all p² pairs;
* ``x_div_y``: x · y⁻¹ mod p for y ≠ 0 (y⁻¹ = y^(p−2) mod p, Fermat), p(p − 1) pairs;
* ``permutation``: composition a ∘ b of the permutations of S5, (a ∘ b)(i) = a(b(i)), all 120² pairs.

Vocabulary (one for every task, so one model config serves a phase of several tasks): ids ``0..p-1`` the
residues, ``p..p+119`` the permutations of S5 in lexicographic order, then one operator per task and ``=``.

The split is a pure function of (task, p, train fraction, seed): a seeded shuffle of all examples, the
first ``round(fraction · n)`` train, the rest validate; every example is in exactly one of them.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np

TASKS = ("x_plus_y", "x_minus_y", "x_div_y", "permutation")
OPERATORS = ("+", "-", "/", "o")  # one token per task, in TASKS order
N_PERMUTATIONS = 120  # |S5|
CONTEXT = 4  # [x, op, y, =]


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def vocab_size(p: int) -> int:
    """Residues, permutations, one operator per task and ``=``."""
    return p + N_PERMUTATIONS + len(OPERATORS) + 1


def operator_id(p: int, task: str) -> int:
    return p + N_PERMUTATIONS + TASKS.index(task)


def equals_id(p: int) -> int:
    return p + N_PERMUTATIONS + len(OPERATORS)


def n_examples(task: str, p: int) -> int:
    return {"x_div_y": p * (p - 1), "permutation": N_PERMUTATIONS ** 2}.get(task, p * p)


def train_size(task: str, p: int, fraction: float) -> int:
    """Training examples of a split: round(fraction · n), at least one of each side."""
    n = n_examples(task, p)
    return min(n - 1, max(1, int(round(fraction * n))))


def n_answers(task: str, p: int) -> int:
    """How many different answers the task has (its chance accuracy is one over this)."""
    return N_PERMUTATIONS if task == "permutation" else p


def permutations() -> list[tuple[int, ...]]:
    """The 120 permutations of (0..4), lexicographic: permutation id ``i`` is token ``p + i``."""
    return list(itertools.permutations(range(5)))


def compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """a ∘ b: first b, then a."""
    return tuple(a[b[i]] for i in range(len(b)))


def examples(task: str, p: int) -> np.ndarray:
    """Every example of the task, one row ``[x, op, y, =, answer]`` of token ids, in a fixed order."""
    op, eq = operator_id(p, task), equals_id(p)
    if task == "permutation":
        perms = permutations()
        index = {q: i for i, q in enumerate(perms)}
        rows = [(p + i, op, p + j, eq, p + index[compose(a, b)])
                for (i, a), (j, b) in itertools.product(enumerate(perms), repeat=2)]
        return np.array(rows, dtype=np.int64)
    x, y = (a.ravel() for a in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    if task == "x_div_y":
        x, y = x[y != 0], y[y != 0]
        answer = x * np.array([pow(int(v), p - 2, p) for v in y]) % p
    elif task == "x_plus_y":
        answer = (x + y) % p
    elif task == "x_minus_y":
        answer = (x - y) % p
    else:
        raise ValueError(f"unknown task {task!r}")
    return np.stack([x, np.full_like(x, op), y, np.full_like(x, eq), answer], axis=1).astype(np.int64)


def split(task: str, p: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a shuffle seeded by (seed, task, p), cut at the train size."""
    rows = examples(task, p)
    rng = np.random.default_rng([seed, TASKS.index(task), p])
    order = rng.permutation(len(rows))
    n_train = train_size(task, p, fraction)
    return rows[order[:n_train]], rows[order[n_train:]]


def baselines(train: np.ndarray, val: np.ndarray, task: str, p: int) -> dict[str, float]:
    """What a model must beat on the answer token: uniform over the task's answers, and the answers'
    frequencies counted on the training split (add-one) scored on the validation answers."""
    k = n_answers(task, p)
    offset = p if task == "permutation" else 0
    counts = np.bincount(train[:, -1] - offset, minlength=k).astype(np.float64) + 1.0
    probs = counts / counts.sum()
    return {"baseline_uniform_loss": math.log(k),
            "baseline_unigram_loss": float(-np.log(probs[val[:, -1] - offset]).mean()),
            "baseline_chance_acc": 1.0 / k}


def load_corpus(data, task: str, seed: int):
    """The split of ``task`` for a modular phase's ``data`` (DataConfig) and seed, as a
    :class:`scaling.data.Corpus` whose train / val are (n, 5) rows ``[x, op, y, =, answer]``."""
    import torch

    from scaling.data import Corpus

    p, f = data.modulus, data.train_fraction
    train, val = split(task, p, f, seed)
    digest = hashlib.sha256(train.tobytes() + b"|" + val.tobytes()).hexdigest()[:16]
    corpus = Corpus(name="modular", train=torch.from_numpy(train), val=torch.from_numpy(val),
                    vocab_size=vocab_size(p), fingerprint=digest,
                    source=f"modular {task} p={p}: {len(train)} train / {len(val)} validation examples "
                           f"(train fraction {f:g}, split seed {seed})", splits=("train", "valid"))
    corpus.baselines = baselines(train, val, task, p)
    return corpus
