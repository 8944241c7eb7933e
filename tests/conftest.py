"""Shared fixtures: tiny phases (seconds to train), a temp SQLite MLflow store, the tiny WikiText fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_TEXT = FIXTURES / "wikitext-tiny"  # wiki.valid.tokens + wiki.test.tokens (no train split)
# The real WikiText-2 copy beside the checkout (../shared/data), when there is one.
LOCAL_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-v1"

TINY_TEXT_PHASE = """\
name: tiny_text
description: tiny char-level model for tests
data: {dataset: wikitext2}
model: {d_model: 32, n_layers: 2, n_heads: 2, context_length: 32, vocab_size: 128}
optim: {betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, warmup: 5, schedule: constant}
train: {budget_kind: steps, budget: 40, eval_interval: 10, eval_batches: 2, log_interval: 5, checkpoint_every: 10, seeds: [0]}
grid:
  batch_sizes: [4, 8]
  lrs: [1.0e-3, 3.0e-3]
  clips: [1.0]
"""

TINY_RANDOM_PHASE = """\
name: tiny_random
data: {dataset: random, random_train_tokens: 20000, random_val_tokens: 4000}
model: {d_model: 16, n_layers: 1, n_heads: 2, context_length: 16, vocab_size: 32}
optim: {warmup: 2}
train: {budget_kind: steps, budget: 20, eval_interval: 10, eval_batches: 2, log_interval: 5, checkpoint_every: 10}
grid: {batch_sizes: [4, 8], lrs: [1.0e-3, 1.0e-2], clips: [1.0]}
"""


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory) -> Path:
    """The empty migrated MLflow store new stores start from (tracking.store_template), made once."""
    from scaling import tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALING_CACHE_DIR", str(tmp_path_factory.mktemp("template-cache")))
        return tracking.store_template()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, _store_template):
    """No test touches the user's ~/.cache or ./mlruns, or inherits a tracking URI / data dir. Each test's
    cache holds the store template already (MLflow's migrations take seconds on a small machine)."""
    monkeypatch.setenv("SCALING_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    shutil.copyfile(_store_template, tmp_path / "cache" / _store_template.name)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    # subprocesses (the CLI) train tiny models: one OpenMP thread each, since a 2-core machine running several
    # of them, or one beside its own logging threads, slows to a crawl under spinning OpenMP threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "SCALING_DATA_DIR", "SCALING_SPLITS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def postgres():
    """The PostgreSQL cluster of ``SCALING_TEST_POSTGRES`` (``scripts/ci_postgres.sh start``). Without it
    the test is skipped, saying so; in CI (``CI=true``) a missing or unreachable cluster fails it."""
    from live_stores import POSTGRES_ENV, postgres_cluster

    in_ci = os.environ.get("CI", "").lower() == "true"
    cluster = postgres_cluster()
    if cluster is None:
        why = f"needs PostgreSQL: {POSTGRES_ENV}=postgresql://... is not set (scripts/ci_postgres.sh start)"
        pytest.fail(f"CI: {why}") if in_ci else pytest.skip(why)
    try:
        cluster.check()
    except Exception as e:
        why = f"PostgreSQL at {POSTGRES_ENV} cannot be reached: {str(e).splitlines()[0][:160]}"
        pytest.fail(f"CI: {why}") if in_ci else pytest.skip(why)
    return cluster


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def tiny_text_phase(tmp_path) -> Path:
    p = tmp_path / "tiny_text.yaml"
    p.write_text(TINY_TEXT_PHASE)
    return p


@pytest.fixture
def tiny_random_phase(tmp_path) -> Path:
    p = tmp_path / "tiny_random.yaml"
    p.write_text(TINY_RANDOM_PHASE)
    return p


def run_cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the real `scaling` CLI in a subprocess (as a user would)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "scaling.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def dedent(s: str) -> str:
    return textwrap.dedent(s)


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores torch's default threads make tiny models ~40x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def stores(tmp_path):
    """(tracking URI, sweep storage URL) in a fresh temp dir."""
    from scaling import tracking

    d = tmp_path / "mlruns"
    d.mkdir()
    tracking.seed_sqlite_store(d / "mlflow.db")
    return f"sqlite:///{d / 'mlflow.db'}", f"sqlite:///{d / 'sweeps.db'}"
