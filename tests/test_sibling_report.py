"""`scaling compare` on grokking and ladder phases, from runs written into a real SQLite MLflow store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from test_grokking import PHASE as GROK

from scaling import tracking
from scaling.config import load_phase
from scaling.report import compare

GRID = (GROK.split("  schedules:")[0].replace("name: tiny_grok", "name: tiny_grid")
        .replace("  tasks: [x_plus_y, x_div_y]\n", "  tasks: [x_plus_y]\n")
        .replace("batch_sizes: [8]", "batch_sizes: [4, 8]").replace("lrs: [3.0e-3]", "lrs: [1.0e-3, 3.0e-3, 1.0e-2]"))
LADDER = """\
name: tiny_ladder
data: {dataset: random, random_train_tokens: 20000, random_val_tokens: 4000}
model: {d_model: 16, n_layers: 1, n_heads: 2, context_length: 16, vocab_size: 32}
train: {budget_kind: tokens_per_param, budget: 20}
grid:
  batch_sizes: [16]
  lrs: [1.0e-3, 3.0e-3, 1.0e-2]
  model_sizes:
    - {name: a, d_model: 32, n_layers: 2, n_heads: 2}
    - {name: b, d_model: 48, n_layers: 2, n_heads: 2}
    - {name: c, d_model: 64, n_layers: 3, n_heads: 2}
    - {name: d, d_model: 96, n_layers: 3, n_heads: 2}
    - {name: e, d_model: 128, n_layers: 4, n_heads: 2}
"""


def record(client, cfg, metrics: dict, history: dict | None = None, status="FINISHED", diverged=False) -> str:
    """A run of ``cfg`` as the runner records one (params, tags, summary metrics, histories)."""
    exp = tracking.get_or_create_experiment(client, tracking.experiment_name(cfg.phase.name))
    run = client.create_run(exp, tags={"phase": cfg.phase.name, "config_hash": cfg.config_hash(), "source": "sweep",
                                       "diverged": str(diverged).lower()})
    rid = run.info.run_id
    rows = [Metric(k, v, 0, cfg.steps) for k, v in metrics.items()]
    rows += [Metric(k, v, 0, s) for k, hist in (history or {}).items() for s, v in hist]
    client.log_batch(rid, metrics=rows, params=[Param(k, str(v)) for k, v in cfg.to_params().items()],
                     tags=[RunTag("x", "y")])
    if status != "RUNNING":
        client.set_terminated(rid, status)
    return rid


def _phase(tmp_path, text, name):
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    return load_phase(phase_file=f)


def test_grokking_tables_curves_and_plots(tmp_path, tracking_uri):
    client = MlflowClient(tracking.connect(tracking_uri).tracking_uri)
    p = _phase(tmp_path, GROK, "tiny_grok")
    bad = {"final_train_acc": 0.0, "final_val_acc": 0.0, "max_val_acc": 0.0, "step_val_acc_99": 30}
    record(client, p.run_configs()[0], bad)  # an older result of a configuration: its newer one counts
    want = {}
    for i, cfg in enumerate(p.run_configs()):
        acc = 0.2 + 0.02 * i
        step99 = 10 + 10 * cfg.seed + i
        record(client, cfg, {"final_train_acc": 1.0, "final_val_acc": acc, "max_val_acc": 0.995 if cfg.seed else acc,
                             "step_val_acc_99": step99, "final_val_loss": 1.0},
               {"val_acc": [(10, acc / 2), (20, acc), (30, acc)], "batch_size": [(1, 2.0), (5, 3.0), (30, 8.0)],
                "lr": [(1, 1e-4), (5, 1e-3), (30, 2e-3)]})  # warmup: 2 steps
        want.setdefault((cfg.task, cfg.schedule.label, cfg.lr_rule), []).append((acc, step99, cfg.seed))
    record(client, p.run_configs()[1], bad, status="RUNNING")  # not a result yet
    out = tmp_path / "report"
    rep = compare("tiny_grok", tracking_uri=tracking_uri, out_dir=out, bootstrap=0, log_to_mlflow=True)
    assert rep["phases"] == [] and rep["siblings"]["only"] == ["tiny_grok"]
    (sec,) = rep["siblings"]["grokking"]
    assert len(sec["rows"]) == len(want) == 10
    for row in sec["rows"]:
        got = want[(row["task"], row["batch_schedule_name"], row["lr_rule"])]
        accs, steps = [a for a, _, _ in got], [s for _, s, _ in got]
        assert row["n_seeds"] == 2 and row["n_reached_99"] == 1 and row["final_train_acc"] == 1.0
        assert row["step_val_acc_99"] == pytest.approx(np.mean(steps))
        assert row["step_val_acc_99_se"] == pytest.approx(np.std(steps, ddof=1) / math.sqrt(2))
        assert row["final_val_acc"] == pytest.approx(np.mean(accs))
        assert row["batch_size_in_force"] == [3.0, 8.0] and row["lr_in_force"] == [1e-3, 2e-3]
    curve = next(c for c in sec["curves"] if c["batch_schedule_name"] == "linear_2_8" and c["lr_rule"] == "sqrt"
                 and c["task"] == "x_div_y")
    accs = [a for a, _, _ in want[("x_div_y", "linear_2_8", "sqrt")]]
    assert curve["steps"] == [10, 20, 30] and curve["n"] == 2
    assert curve["mean"][1] == pytest.approx(np.mean(accs))
    assert curve["se"][1] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert "Grokking: phase tiny_grok" in rep["rendered"] and "task x_div_y" in rep["rendered"]
    for task in ("x_plus_y", "x_div_y"):
        assert (out / "plots" / f"grokking_val_acc_tiny_grok_{task}.png").stat().st_size > 10_000
    assert json.loads((out / "compare.json").read_text())["siblings"]["grokking"][0]["phase"] == "tiny_grok"


def test_a_one_task_constant_batch_grid_also_gets_its_lr_opt_fit_on_grokking_speed(tmp_path, tracking_uri):
    client = MlflowClient(tracking.connect(tracking_uri).tracking_uri)
    p = _phase(tmp_path, GRID, "tiny_grid")
    best = {4: 1e-3, 8: 3e-3}  # the LR that groks first at each batch size
    for cfg in p.run_configs():
        step = 10 + 10 * abs(math.log(cfg.lr / best[cfg.batch_size])) + cfg.seed
        record(client, cfg, {"final_train_acc": 1.0, "final_val_acc": 0.99, "max_val_acc": 0.99,
                             "step_val_acc_99": step, "final_val_loss": 0.1}, {"val_acc": [(10, 0.5), (30, 0.99)]})
    rep = compare("tiny_grid", tracking_uri=tracking_uri, metric="step_val_acc_99", bootstrap=0, log_to_mlflow=False,
                  plots=False)
    assert rep["siblings"]["only"] == [] and len(rep["siblings"]["grokking"]) == 1
    (ph,) = rep["phases"]
    assert {o["batch_size"]: o["argmin_lr"] for o in ph["optima"]} == best


def test_ladder_fit_recovers_the_law_and_flags_an_lr_on_the_edge(tmp_path, tracking_uri):
    client = MlflowClient(tracking.connect(tracking_uri).tracking_uri)
    p = _phase(tmp_path, LADDER, "tiny_ladder")
    alpha, nc = 0.3, 2e6
    rng = np.random.default_rng(0)
    for cfg in p.run_configs():
        m = cfg.phase.model
        n = 12 * m.n_layers * m.d_model ** 2
        best_lr = 1e-2 if cfg.model_size == "a" else 3e-3  # size a: best at the largest LR tried
        loss = (nc / n) ** alpha * (1 + 0.05 * abs(math.log(cfg.lr / best_lr))) * math.exp(rng.normal(0, 1e-3))
        record(client, cfg, {"final_val_loss": loss, "min_val_loss": loss, "final_train_loss": loss,
                             "tokens_seen": cfg.steps * cfg.tokens_per_step})
    rep = compare("tiny_ladder", tracking_uri=tracking_uri, bootstrap=0, log_to_mlflow=True, plots=False)
    (sec,) = rep["siblings"]["ladder"]
    assert [s["name"] for s in sec["sizes"]] == list("abcde")
    assert [s["best_lr"] for s in sec["sizes"]] == [1e-2] + [3e-3] * 4
    assert [s["censored"] for s in sec["sizes"]] == ["high"] + [None] * 4
    assert all(s["tokens_per_param"] == pytest.approx(20, rel=0.01) for s in sec["sizes"])
    power = sec["fits"]["power"]
    assert power["converged"] and power["params"]["alpha"]["value"] == pytest.approx(alpha, abs=0.01)
    lo, hi = power["params"]["alpha"]["ci"]
    assert lo < alpha < hi and sec["kaplan"]["consistent"] is False
    assert sec["fits"]["power_floor"]["status"] == "ok"
    assert any("edge of the LRs tried for size(s) a" in w for w in sec["warnings"])
    text = rep["rendered"]
    assert "Model-size ladder: phase tiny_ladder" in text and "profile likelihood" in text and "(edge)" in text
    run = MlflowClient(tracking_uri).get_run(rep["comparison_run_id"])
    assert run.data.metrics["tiny_ladder/alpha_power"] == pytest.approx(power["params"]["alpha"]["value"])


def test_a_plain_lr_by_batch_phase_is_not_read_whole_to_find_it_has_no_sibling_section(tmp_path, tracking_uri,
                                                                                        monkeypatch):
    """Only runs with a task or model size are sibling runs: the check asks for one such run per axis, so a
    store of 10,000 LR x B runs is not turned into MLflow objects for a section it does not have."""
    from scaling import sibling_report

    client = MlflowClient(tracking.connect(tracking_uri).tracking_uri)
    p = _phase(tmp_path, LADDER.replace("name: tiny_ladder", "name: tiny_plain").split("  model_sizes:")[0],
               "tiny_plain")
    for cfg in p.run_configs():
        record(client, cfg, {"final_val_loss": 2.0})
    asked = []
    real = tracking.search_runs
    monkeypatch.setattr(tracking, "search_runs", lambda c, ids, f="", max_results=50_000: (
        asked.append((f, max_results)), real(c, ids, f, max_results))[1])
    assert sibling_report.phase_runs(client, "tiny_plain").empty
    assert asked and all(f and n == 1 for f, n in asked), asked
    ladder = _phase(tmp_path, LADDER, "tiny_ladder")
    record(client, ladder.run_configs()[0], {"final_val_loss": 2.0})
    assert len(sibling_report.phase_runs(client, "tiny_ladder")) == 1
