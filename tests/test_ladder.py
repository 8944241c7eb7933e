"""A model-size ladder end to end on CPU (sweep → MLflow → compare), and the training options it needs:
gradient accumulation, label smoothing, dropout."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import TINY_TEXT, run_cli
from mlflow.tracking import MlflowClient

from scaling.config import load_phase
from scaling.data import load_corpus
from scaling.train import Hooks, train

LADDER = """\
name: tiny_ladder
data: {dataset: wikitext2}
model: {d_model: 16, n_layers: 1, n_heads: 2, context_length: 32, vocab_size: 128}
optim: {warmup: 0.1, schedule: cosine}
train: {budget_kind: tokens_per_param, budget: 2, eval_interval: 40, eval_batches: 2, log_interval: 10,
        checkpoint_every: 400}
grid:
  batch_sizes: [4]
  lrs: [3.0e-3, 1.0e-2]
  clips: [1.0]
  model_sizes:
    - {name: a, d_model: 16, n_layers: 1, n_heads: 2}
    - {name: b, d_model: 24, n_layers: 1, n_heads: 2}
    - {name: c, d_model: 32, n_layers: 1, n_heads: 2}
"""
DATA = ["--data-dir", str(TINY_TEXT), "--splits", "valid:test", "--device", "cpu", "--quiet"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models on one thread


def test_quick_ladder_sweep_and_compare_end_to_end(tmp_path, tracking_uri):
    phase = tmp_path / "tiny_ladder.yaml"
    phase.write_text(LADDER)
    # asked to batch the whole grid: the batched engine gets one size at a time
    r = run_cli("sweep", "--phase-file", phase, "--group-size", 6, "--no-compile", *DATA, "--tracking-uri",
                tracking_uri, cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "6 finished, 0 diverged, 0 failed, 0 pending" in r.stdout
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("scaling-phase-tiny_ladder")
    children = [x for x in client.search_runs([exp.experiment_id]) if "config_hash" in x.data.tags]
    assert len(children) == 6
    by_size = {}
    for x in children:
        p = x.data.params
        by_size.setdefault(p["model_size"], set()).add((p["d_model"], p["n_layers"], x.data.metrics["group_configs"]))
        assert x.data.tags["scaling.compile"] == "off"
        n = 12 * int(p["n_layers"]) * int(p["d_model"]) ** 2
        assert int(p["steps"]) * int(p["tokens_per_step"]) == pytest.approx(2 * n, rel=0.02)
    assert by_size == {"a": {("16", "1", 2.0)}, "b": {("24", "1", 2.0)}, "c": {("32", "1", 2.0)}}

    out = tmp_path / "report"
    r = run_cli("compare", "--phases", "tiny_ladder", "--tracking-uri", tracking_uri, "--out", out, "--no-mlflow",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Model-size ladder: phase tiny_ladder" in r.stdout and "power: alpha = " in r.stdout
    assert "Optimum per batch size" not in r.stdout  # sizes are not seeds of one LR grid
    report = json.loads((out / "compare.json").read_text())
    (sec,) = report["siblings"]["ladder"]
    assert [s["name"] for s in sec["sizes"]] == ["a", "b", "c"] and report["phases"] == []
    assert sec["fits"]["power"]["status"] == "ok" and sec["fits"]["power_floor"]["status"] == "not enough points"
    for s in sec["sizes"]:
        assert s["best_lr"] in (3e-3, 1e-2) and s["loss"] == min(v for v in s["losses"] if v is not None)
    assert (out / "plots" / "ladder_loss_vs_params_tiny_ladder.png").stat().st_size > 10_000


def _run(phase, steps=12, resume_state=None, **train_over):
    p = phase.with_overrides(steps=steps, log_interval=1, eval_interval=4, checkpoint_every=4)
    section = {k: v for k, v in train_over.items() if k != "dropout"}
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, **section))
    if "dropout" in train_over:
        p = dataclasses.replace(p, model=dataclasses.replace(p.model, dropout=train_over["dropout"]))
    cfg = p.run_config(8, 3e-3, splits=("valid", "test"), model_size="b")
    logs, evals, ckpts = [], [], []
    hooks = Hooks(on_log=lambda s, m: logs.append((s, m["train_loss"])), on_eval=lambda s, v: evals.append((s, v)),
                  on_checkpoint=lambda s, st: ckpts.append((s, copy.deepcopy(st))))
    res = train(cfg, load_corpus(cfg.phase, 0, TINY_TEXT, ("valid", "test")), torch.device("cpu"), hooks, resume_state)
    return res, logs, evals, ckpts


@pytest.fixture
def ladder(tmp_path):
    f = tmp_path / "tiny_ladder.yaml"
    f.write_text(LADDER)
    return load_phase(phase_file=f)


def test_gradient_accumulation_trains_what_the_whole_batch_trains(ladder):
    _, whole, whole_evals, _ = _run(ladder)
    _, accum, accum_evals, _ = _run(ladder, grad_accum=4)  # micro-batches of 2
    assert [s for s, _ in accum] == [s for s, _ in whole]
    for (_, a), (_, b) in zip(accum, whole):
        assert a == pytest.approx(b, rel=2e-5)
    for (_, a), (_, b) in zip(accum_evals, whole_evals):
        assert a == pytest.approx(b, rel=2e-5)


def test_label_smoothing_trains_differently_but_reports_the_plain_loss(ladder):
    _, plain, _, _ = _run(ladder)
    _, smooth, _, _ = _run(ladder, label_smoothing=0.2)
    assert smooth[0][1] == pytest.approx(plain[0][1], rel=1e-6)  # the same model and batch before any update
    assert smooth[-1][1] != plain[-1][1]  # the updates differ (each run is deterministic: equal if they did not)


def test_dropout_changes_training_and_resumes_exactly(ladder):
    _, plain, _, _ = _run(ladder)
    full, drop, drop_evals, ckpts = _run(ladder, dropout=0.2)
    assert drop[0][1] != pytest.approx(plain[0][1], rel=1e-4)
    mid = next(st for s, st in ckpts if s == 4)
    resumed, logs, evals, _ = _run(ladder, dropout=0.2, resume_state=mid)
    assert logs == [x for x in drop if x[0] > 4] and evals == drop_evals[1:]
    assert resumed.summary == full.summary
