"""The grokking loop: real tiny runs (p = 7) through the loop, the runner, `scaling train`, sweeps and searches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import run_cli
from mlflow.tracking import MlflowClient

from scaling import schedules
from scaling.config import load_phase
from scaling.data import load_corpus
from scaling.grokking import ExampleStream, answer_logits
from scaling.train import Hooks, train

PHASE = """\
name: tiny_grok
data: {dataset: modular, modulus: 7, train_fraction: 0.5}
model: {d_model: 32, n_layers: 1, n_heads: 2, context_length: 4, vocab_size: 132}
optim: {betas: [0.9, 0.98], weight_decay: 1.0, warmup: 2}
train: {budget_kind: steps, budget: 30, eval_interval: 10, log_interval: 5, checkpoint_every: 10, seeds: [0, 1],
        objective: step_val_acc_99}
grid:
  batch_sizes: [8]
  lrs: [3.0e-3]
  clips: [null]
  tasks: [x_plus_y, x_div_y]
  schedules:
    - {kind: constant}
    - {kind: linear, start: 2, end: 8}
    - {kind: step, steps: [[0, 2], [15, 8]]}
  lr_rules: [none, sqrt]
"""
QUICK = ["--device", "cpu", "--quiet"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def grok_phase(tmp_path):
    f = tmp_path / "tiny_grok.yaml"
    f.write_text(PHASE)
    return f


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models on one thread


def _train(cfg, resume_state=None):
    logs, evals, ckpts = [], [], []
    hooks = Hooks(on_log=lambda s, m: logs.append((s, m)), on_eval=lambda s, v: evals.append((s, v)),
                  on_checkpoint=lambda s, st: ckpts.append((s, copy.deepcopy(st))))
    corpus = load_corpus(cfg.phase, cfg.seed, task=cfg.task)
    return train(cfg, corpus, torch.device("cpu"), hooks, resume_state), logs, evals, ckpts


def test_every_training_example_once_per_epoch():
    s = ExampleStream(10, seed=3, device="cpu")
    first = torch.cat([s.indices(o, 4) for o in range(0, 20, 4)])  # batches that straddle epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])  # each epoch its own shuffle
    assert torch.equal(ExampleStream(10, seed=3, device="cpu").indices(7, 9), first[7:16])  # a pure function


def test_the_schedule_and_the_lr_rule_are_what_trains_and_what_is_logged(grok_phase):
    p = load_phase(phase_file=grok_phase)
    cfg = p.with_overrides(log_interval=1).run_config(8, 3e-3, task="x_plus_y", schedule="linear_2_8",
                                                      lr_rule="sqrt")
    res, logs, evals, _ = _train(cfg)
    assert res.status == "FINISHED"
    want = schedules.batch_sizes(cfg.schedule, cfg.steps, 8)
    for step, m in logs:
        b = int(want[step - 1])
        assert m["batch_size"] == b
        warm = min(1.0, step / cfg.warmup_steps)  # lr_at: (s + 1) / warmup during the warmup
        assert m["lr"] == pytest.approx(3e-3 * warm * math.sqrt(b / 8))
    assert res.summary["examples_seen"] == int(want.sum())
    assert [s for s, _ in evals] == [10, 20, 30]
    val_acc = [m["val_acc"] for s, m in logs if "val_acc" in m]
    assert len(val_acc) == 3 and res.summary["final_val_acc"] == val_acc[-1]


def test_a_tiny_run_memorises_its_training_set_and_reports_accuracy(grok_phase):
    p = load_phase(phase_file=grok_phase).with_overrides(steps=300, eval_interval=50, checkpoint_every=300)
    cfg = p.run_config(8, 3e-3, task="x_plus_y", schedule="constant", lr_rule="none")
    res, logs, _, _ = _train(cfg)
    s = res.summary
    assert s["final_train_acc"] == 1.0  # 24 examples of x + y mod 7: learnt by heart
    assert 0 <= s["final_val_acc"] <= 1 and s["max_val_acc"] >= s["final_val_acc"]
    reached = [st for st, m in logs if m.get("val_acc", 0) >= 0.99]
    assert s["step_val_acc_99"] == (reached[0] if reached else 300)
    assert s["baseline_chance_acc"] == pytest.approx(1 / 7)


def test_answer_logits_are_fp32_at_the_equals_position(grok_phase):
    from scaling.model import build_model

    cfg = load_phase(phase_file=grok_phase).run_config(8, 1e-3, task="x_div_y", schedule="constant", lr_rule="none")
    corpus = load_corpus(cfg.phase, 0, task="x_div_y")
    model = build_model(cfg.phase.model, 0).to(torch.bfloat16)
    logits = answer_logits(model, corpus.train)
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (len(corpus.train), 132)
    assert torch.equal(logits, model(corpus.train[:, :4])[:, 3].float())


def test_resume_from_checkpoint_is_identical_to_uninterrupted(grok_phase):
    p = load_phase(phase_file=grok_phase)
    cfg = p.run_config(8, 3e-3, task="x_div_y", schedule="step_2_8", lr_rule="sqrt")
    full, full_logs, full_evals, ckpts = _train(cfg)
    mid = next(st for s, st in ckpts if s == 10)
    resumed, logs, evals, _ = _train(cfg, resume_state=mid)
    assert evals == full_evals[1:]
    strip = lambda rows: [(s, {k: v for k, v in m.items() if k != "examples_per_s"}) for s, m in rows if s > 10]  # noqa: E731
    assert strip(logs) == strip(full_logs)
    assert resumed.summary == full.summary


def test_scaling_train_records_a_grokking_run_in_mlflow(tmp_path, tracking_uri, grok_phase):
    r = run_cli("train", "--phase-file", grok_phase, "--tasks", "x_div_y", "--schedules", "linear_2_8",
                "--lr-rules", "sqrt", "--batch-size", 8, "--lr", 3e-3, "--seed", 1, *QUICK,
                "--tracking-uri", tracking_uri, cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "final_val_acc=" in r.stdout and "modular x_div_y p=7" in r.stderr
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("scaling-phase-tiny_grok")
    (run,) = client.search_runs([exp.experiment_id])
    p, m = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and run.info.run_name == "B8-lr0.003-clipnone-s1-x_div_y-linear_2_8-sqrt"
    assert (p["task"], p["batch_schedule"], p["lr_rule"], p["dataset"]) == ("x_div_y", "linear:2->8", "sqrt", "modular")
    for k in ("final_train_acc", "final_val_acc", "step_val_acc_99", "final_val_loss", "examples_seen"):
        assert math.isfinite(m[k]), k
    hist = lambda k: [(x.step, x.value) for x in client.get_metric_history(run.info.run_id, k)]  # noqa: E731
    assert [s for s, _ in hist("val_acc")] == [10, 20, 30] == [s for s, _ in hist("train_acc")]
    assert [v for _, v in hist("batch_size")] == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # 2 + 6 s / 29 at s = 4, 9, ...
    assert len(hist("lr")) == 6 and len(hist("train_loss")) == 6
    assert run.inputs.dataset_inputs[0].dataset.source_type == "hugging_face"


def test_sweep_trains_grokking_configs_one_at_a_time_even_when_asked_to_batch(tmp_path, tracking_uri, grok_phase):
    r = run_cli("sweep", "--phase-file", grok_phase, "--tasks", "x_plus_y", "--schedules", "constant,step_2_8",
                "--seeds", "0", "--group-size", 4, *QUICK, "--tracking-uri", tracking_uri, cwd=tmp_path,
                env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "3 finished, 0 diverged, 0 failed, 0 pending" in r.stdout and "(step_val_acc_99 " in r.stdout
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("scaling-phase-tiny_grok")
    runs = client.search_runs([exp.experiment_id])
    children = [x for x in runs if "config_hash" in x.data.tags]
    parent = next(x for x in runs if x.data.tags.get("scaling.role") == "sweep")
    assert sorted(x.info.run_name for x in children) == [
        "B8-lr0.003-clipnone-s0-x_plus_y-constant-none", "B8-lr0.003-clipnone-s0-x_plus_y-step_2_8-none",
        "B8-lr0.003-clipnone-s0-x_plus_y-step_2_8-sqrt"]
    assert all("scaling.compile" not in x.data.tags for x in children)  # not the batched engine
    params = parent.data.params
    assert params["grid_schedules"] == "constant,step:0:2,15:8" and params["grid_tasks"] == "x_plus_y"
    assert "task" not in parent.data.params and "batch_schedule" not in parent.data.params


def test_search_minimises_the_phases_objective(tmp_path, tracking_uri, grok_phase):
    from scaling.search import default_search_id, run_search

    p = load_phase(phase_file=grok_phase).with_overrides(tasks=["x_plus_y"], schedules=["constant"],
                                                         lr_rules=["none"], seeds=[0])
    assert default_search_id(p, ("train", "valid")) != default_search_id(
        load_phase(phase_file=grok_phase).with_overrides(tasks=["x_plus_y"], schedules=["constant"],
                                                         lr_rules=["none"], seeds=[0], steps=31), ("train", "valid"))
    summary = run_search(p, [8], trials=2, batch=2, max_extensions=0, device="cpu", tracking_uri=tracking_uri,
                         seed=0, progress=False)
    (res,) = summary.results
    assert res.n_trials == 2 and "(step_val_acc_99 " in res.line()
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("scaling-phase-tiny_grok")
    trials = [x for x in client.search_runs([exp.experiment_id]) if x.data.tags.get("source") == "search"]
    best = min(x.data.metrics["step_val_acc_99"] for x in trials)
    assert res.best_loss == best
