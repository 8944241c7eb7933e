"""Tokenization, local WikiText loading through `datasets`, split mapping, caching, baselines, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT

import scaling.data as data
from scaling.config import load_phase
from scaling.data import (
    DataError,
    batch_starts,
    compute_baselines,
    decode,
    encode,
    find_split_files,
    load_corpus,
    validation_batches,
)


def test_encode_ascii_is_identity_and_non_ascii_is_unknown():
    ids = encode("Hi é\n中")
    assert ids.dtype == np.uint8
    assert ids.tolist() == [72, 105, 32, 0, 10, 0]
    assert decode(encode("plain text.\n")) == "plain text.\n"
    assert encode("".join(chr(i) for i in range(128))).tolist() == list(range(128))


def test_local_copy_with_subset_of_splits_and_explicit_mapping():
    files = find_split_files(TINY_TEXT)
    assert set(files) == {"valid", "test"}
    c = load_corpus(load_phase("2_5"), 0, TINY_TEXT, ("valid", "test"))
    assert "train on wiki.valid.tokens, validate on wiki.test.tokens" in c.source
    assert c.splits == ("valid", "test") and c.vocab_size == 128
    assert len(c.train) > 50_000 and len(c.val) > 25_000


def test_missing_split_is_a_clear_error_never_a_silent_substitute():
    with pytest.raises(DataError) as e:
        load_corpus(load_phase("2_5"), 0, TINY_TEXT, ("train", "valid"))
    msg = str(e.value)
    assert "split 'train' not found" in msg and "found: test, valid" in msg and "--splits valid:test" in msg


def test_no_data_dir_and_no_hub_says_how_to_supply(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("hub unreachable")
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_corpus(load_phase("2_5"), 0, None, ("train", "valid"))
    assert "--data-dir" in str(e.value) and "SCALING_DATA_DIR" in str(e.value)


def test_encoded_corpus_is_cached(monkeypatch):
    first = load_corpus(load_phase("2_5"), 0, TINY_TEXT, ("valid", "test"))

    def boom(path):
        raise AssertionError("re-read through datasets although cached")
    monkeypatch.setattr(data, "_read_text_with_datasets", boom)
    second = load_corpus(load_phase("2_5"), 0, TINY_TEXT, ("valid", "test"))
    assert torch.equal(first.train, second.train) and first.fingerprint == second.fingerprint
    assert first.baselines == second.baselines


def test_parquet_layout_is_read_with_datasets(tmp_path):
    import pandas as pd
    lines = (TINY_TEXT / "wiki.valid.tokens").read_text().splitlines(keepends=True)
    d = tmp_path / "wikitext-2-raw-v1"
    d.mkdir()
    pd.DataFrame({"text": lines[:200]}).to_parquet(d / "validation-00000-of-00001.parquet")
    pd.DataFrame({"text": lines[200:300]}).to_parquet(d / "test-00000-of-00001.parquet")
    c = load_corpus(load_phase("2_5"), 0, tmp_path, ("valid", "test"))
    assert decode(c.train[:200].tolist()) == "".join(lines[:200])[:200]


def test_baselines_match_hand_computation():
    train = np.array([0, 1, 0, 1, 0, 1, 1])
    val = np.array([0, 1, 1])
    b = compute_baselines(train, val, 2)
    # unigram with add-one: counts 3,4 -> (4/9, 5/9)
    assert b["baseline_unigram_loss"] == pytest.approx(-(math.log(4 / 9) + 2 * math.log(5 / 9)) / 3)
    # bigrams 0->1 x3, 1->0 x2, 1->1 x1; add-one rows: from 0: (1/5, 4/5); from 1: (3/6, 2/6... ) -> (3/5, 2/5)
    assert b["baseline_bigram_loss"] == pytest.approx(-(math.log(4 / 5) + math.log(2 / 5)) / 2)
    assert b["baseline_uniform_loss"] == pytest.approx(math.log(2))


def test_text_baselines_are_ordered():
    b = load_corpus(load_phase("2_5"), 0, TINY_TEXT, ("valid", "test")).baselines
    assert b["baseline_bigram_loss"] < b["baseline_unigram_loss"] < b["baseline_uniform_loss"] == pytest.approx(math.log(128))


def test_random_tokens_come_from_the_seed():
    p = load_phase("2")
    a, b, c = load_corpus(p, 0), load_corpus(p, 0), load_corpus(p, 1)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    assert int(a.train.max()) < 65


def test_sampling_is_a_pure_function_of_seed_and_step():
    s1, s2 = batch_starts(3, 5, 8, 10_000, 16), batch_starts(3, 5, 8, 10_000, 16)
    assert torch.equal(s1, s2) and not torch.equal(s1, batch_starts(4, 5, 8, 10_000, 16))
    assert int(s1.max()) < 10_000 - 17
    val = torch.arange(1000)
    v1, v2 = validation_batches(val, 3, 16), validation_batches(val, 3, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))
    x, y = v1[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens


def _text_corpus(root, name="mybooks"):
    """A text corpus folder in the layout of ../shared/data/pd-english: {train,valid,test}.txt."""
    d = root / name
    d.mkdir(parents=True)
    text = (TINY_TEXT / "wiki.valid.tokens").read_text()
    d.joinpath("train.txt").write_text(text)
    d.joinpath("valid.txt").write_text((TINY_TEXT / "wiki.test.tokens").read_text())
    d.joinpath("test.txt").write_text(text[: len(text) // 3])
    return d


def _text_phase(name="mybooks"):
    from scaling.config import _validated
    raw = {"name": "t", "data": {"dataset": "text", "corpus": name},
           "grid": {"batch_sizes": [4], "lrs": [1e-3]}}
    return _validated(raw)


def test_a_local_text_corpus_is_read_by_name_from_the_data_dir_or_its_own_folder(tmp_path):
    d = _text_corpus(tmp_path / "data")
    phase = _text_phase()
    by_parent = load_corpus(phase, 0, tmp_path / "data")
    by_folder = load_corpus(phase, 0, d)
    assert by_parent.name == "mybooks" and by_parent.source.endswith("train on train.txt, validate on valid.txt")
    assert torch.equal(by_parent.train, by_folder.train) and by_parent.fingerprint == by_folder.fingerprint
    assert len(by_parent.train) == len((d / "train.txt").read_text())  # lines joined with their newlines
    assert by_parent.baselines["baseline_unigram_loss"] < by_parent.baselines["baseline_uniform_loss"]
    assert load_corpus(phase, 0, d, ("train", "test")).val.shape[0] < by_parent.val.shape[0]


def test_a_text_corpus_that_is_not_there_says_where_it_was_looked_for(tmp_path):
    _text_corpus(tmp_path / "data")
    with pytest.raises(DataError, match="no local data for text corpus 'other'"):
        load_corpus(_text_phase("other"), 0, None)
    with pytest.raises(DataError, match=r"other split 'train' not found .* \(found: none\); give the folder"):
        load_corpus(_text_phase("other"), 0, tmp_path / "data")
    (tmp_path / "data" / "mybooks" / "train.txt").unlink()
    with pytest.raises(DataError, match="split 'train' not found .*found: test, valid.*--splits"):
        load_corpus(_text_phase(), 0, tmp_path / "data")


def test_text_corpus_config_is_checked():
    from scaling.config import ConfigError, _validated
    for section in ({"dataset": "text"}, {"dataset": "wikitext2", "corpus": "x"}, {"dataset": "text", "corpus": "a/b"}):
        with pytest.raises(ConfigError, match="data.corpus"):
            _validated({"name": "t", "data": section, "grid": {"batch_sizes": [4], "lrs": [1e-3]}})
    p = _text_phase()
    assert p.run_config(4, 1e-3).to_params()["corpus"] == "mybooks"
    assert "corpus" not in load_phase("2_5").run_config(32, 1e-3).to_params()  # older phases hash as before


def test_wikitext103_from_the_hub_is_asked_for_by_its_name(monkeypatch):
    asked = []

    def offline(*a, **k):
        asked.append(a)
        raise ConnectionError("hub unreachable")
    import datasets

    from scaling.config import _validated
    monkeypatch.setattr(datasets, "load_dataset", offline)
    phase = _validated({"name": "t", "data": {"dataset": "wikitext103"}, "grid": {"batch_sizes": [4], "lrs": [1e-3]}})
    with pytest.raises(DataError, match="wikitext103 could not be loaded from the Hugging Face hub"):
        load_corpus(phase, 0, None)
    assert asked == [("wikitext", "wikitext-103-raw-v1")]
