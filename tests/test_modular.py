"""The grokking datasets: every example right, the division's inverses, disjoint seeded splits, the vocabulary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling import modular


@pytest.mark.parametrize("p", [7, 11])
def test_arithmetic_tasks_hold_every_pair_once_with_the_right_answer(p):
    eq = modular.equals_id(p)
    for task, n, op in (("x_plus_y", p * p, lambda x, y: (x + y) % p), ("x_minus_y", p * p, lambda x, y: (x - y) % p)):
        rows = modular.examples(task, p)
        assert rows.shape == (n, 5)
        assert {(int(x), int(y)) for x, _, y, _, _ in rows} == set(itertools.product(range(p), repeat=2))
        assert (rows[:, 1] == modular.operator_id(p, task)).all() and (rows[:, 3] == eq).all()
        assert all(int(a) == op(int(x), int(y)) for x, _, y, _, a in rows)


@pytest.mark.parametrize("p", [7, 11, 97])
def test_division_uses_the_modular_inverse(p):
    rows = modular.examples("x_div_y", p)
    assert len(rows) == p * (p - 1)
    assert {(int(x), int(y)) for x, _, y, _, _ in rows} == set(itertools.product(range(p), range(1, p)))
    x, y, a = rows[:, 0], rows[:, 2], rows[:, 4]
    assert ((a * y) % p == x).all()  # a = x · y⁻¹  ⇔  a · y = x (mod p)
    for v in range(1, p):  # the inverse itself, by brute force
        inv = [w for w in range(1, p) if v * w % p == 1]
        assert inv == [pow(v, p - 2, p)]


def test_permutation_composition_in_s5():
    p = 7
    perms = modular.permutations()
    assert len(perms) == 120 == len(set(perms)) and perms[0] == (0, 1, 2, 3, 4)
    rows = modular.examples("permutation", p)
    assert rows.shape == (120 * 120, 5)
    assert rows[:, [0, 2, 4]].min() == p and rows[:, [0, 2, 4]].max() == p + 119
    for a_id, _, b_id, _, c_id in rows[::97]:
        a, b, c = perms[a_id - p], perms[b_id - p], perms[c_id - p]
        assert all(c[i] == a[b[i]] for i in range(5))  # (a ∘ b)(i) = a(b(i))
    assert modular.compose((1, 0, 2, 3, 4), (1, 0, 2, 3, 4)) == (0, 1, 2, 3, 4)
    assert modular.compose((1, 2, 0, 3, 4), (1, 0, 2, 3, 4)) != modular.compose((1, 0, 2, 3, 4), (1, 2, 0, 3, 4))


def test_vocabulary_holds_every_token():
    p = 11
    ids = np.concatenate([modular.examples(t, p).ravel() for t in modular.TASKS])
    assert ids.min() == 0 and ids.max() == modular.vocab_size(p) - 1
    specials = [modular.operator_id(p, t) for t in modular.TASKS] + [modular.equals_id(p)]
    assert len(set(specials)) == 5 and min(specials) == p + 120
    assert modular.vocab_size(97) == 222


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from(modular.TASKS), p=st.sampled_from([5, 7, 11]), fraction=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31))
def test_splits_are_disjoint_complete_seeded_and_sized(task, p, fraction, seed):
    train, val = modular.split(task, p, fraction, seed)
    key = lambda rows: {tuple(r[:3]) for r in rows.tolist()}  # noqa: E731
    assert key(train).isdisjoint(key(val))
    assert len(key(train)) == len(train) and len(key(val)) == len(val)
    assert len(train) + len(val) == modular.n_examples(task, p)
    assert len(train) == modular.train_size(task, p, fraction) == min(len(train) + len(val) - 1,
                                                                    max(1, round(fraction * (len(train) + len(val)))))
    again, _ = modular.split(task, p, fraction, seed)
    assert (again == train).all()


def test_another_seed_another_split():
    a, _ = modular.split("x_plus_y", 11, 0.5, 0)
    b, _ = modular.split("x_plus_y", 11, 0.5, 1)
    assert not np.array_equal(a, b)


def test_corpus_and_baselines():
    from scaling.config import DataConfig

    c = modular.load_corpus(DataConfig(dataset="modular", modulus=7, train_fraction=0.5), "x_plus_y", 3)
    assert c.name == "modular" and tuple(c.train.shape) == (24, 5) and tuple(c.val.shape) == (25, 5)
    assert c.baselines["baseline_uniform_loss"] == pytest.approx(np.log(7))
    assert c.baselines["baseline_chance_acc"] == pytest.approx(1 / 7)
    assert c.baselines["baseline_unigram_loss"] >= np.log(7) - 0.2
    assert c.fingerprint != modular.load_corpus(DataConfig(dataset="modular", modulus=7), "x_plus_y", 4).fingerprint


@given(n=st.integers(2, 400))
def test_is_prime(n):
    assert modular.is_prime(n) == all(n % k for k in range(2, n))
