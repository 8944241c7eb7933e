"""scaling compare: the study's table end to end through the CLI, native runs, formats, errors."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_TEXT, run_cli

from scaling import tracking
from scaling.cli import main
from scaling.config import ConfigError, load_phase
from scaling.report import FORMATS, compare

FIXTURES = Path(__file__).parent / "fixtures"
STUDY = FIXTURES / "study_phase_2_5.csv"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALING_DATA_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.seed_sqlite_store(tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def cli(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("SCALING_DATA_DIR", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "scaling.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def n_runs(uri, experiment):
    client = tracking.connect(uri)
    exp = client.get_experiment_by_name(experiment)
    return 0 if exp is None else len(tracking.search_runs(client, [exp.experiment_id]))


def test_study_table_end_to_end_through_the_cli(store, tmp_path):
    out = tmp_path / "reports"
    r = cli("import", str(STUDY), "--phase", "2_5", "--tracking-uri", store)
    assert r.returncode == 0, r.stderr
    assert "imported 20 run(s)" in r.stdout
    # (the next two through the same CLI in-process: a subprocess costs seconds of MLflow start-up)
    r = CliRunner().invoke(main, ["import", str(STUDY), "--phase", "2_5", "--tracking-uri", store])
    assert r.exit_code == 0 and "imported 0 run(s)" in r.output and "20 already there" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text(STUDY.read_text().replace("128,0.003,4.4366", "128,0.003,abc"))
    r = CliRunner().invoke(main, ["import", str(bad), "--phase", "2_5", "--tracking-uri", store])
    assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit)
    assert r.output == "error: bad.csv line 15: final_train_loss must be a number, got 'abc'\n"
    assert n_runs(store, "scaling-phase-2_5") == 20

    r = cli("compare", "--phases", "2_5", "--tracking-uri", store, "--format", "json", "--out", str(out),
            "--estimator", "argmin", "--bootstrap", "1000")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["schema_version"] == 2
    ph = report["phases"][0]
    fa, fu = ph["fits"]["all"], ph["fits"]["uncensored"]
    assert round(fa["beta"], 3) == 1.170 and round(fa["r2"], 3) == 0.895
    assert fa["beta_ci_t"][0] == pytest.approx(-0.05, abs=0.01) and fa["beta_ci_t"][1] == pytest.approx(2.39, abs=0.01)
    assert fa["interval_calibrated"] is False and fa["bootstrap_resamples"] == 1000 and fa["bootstrap_seed"] == 0
    assert fu["status"] == "not enough points" and ph["fits"]["censored"]["status"] == "not identifiable"
    cens = {o["batch_size"]: o["censored"] for o in ph["optima"]}
    assert cens == {32: None, 64: None, 128: "high", 256: "high"}
    assert ph["sources"] == {"import": 20} and ph["learned"]["unknown"] == 20
    assert ph["budget"]["kinds"] == ["steps"]
    # every format, and plots, on disk
    for name in ("compare.json", "compare.txt", "compare.md", "compare_phases.csv", "compare_optima.csv"):
        assert (out / name).stat().st_size > 100, name
    assert json.loads((out / "compare.json").read_text())["comparison_run_id"] == report["comparison_run_id"]
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["beta_by_phase.png", "loss_heatmap_2_5.png", "lr_opt_vs_batch_2_5.png"]
    for p in (out / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".compare-")]  # temp dir cleaned
    # the comparison run holds the table, the JSON and the plots
    client = tracking.connect(store)
    run = client.get_run(report["comparison_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["2_5/beta_all"] == pytest.approx(fa["beta"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"compare.json", "compare.txt", "plots"} <= arts
    assert len(client.list_artifacts(run.info.run_id, "plots")) == 3


def test_every_format(store, tmp_path):
    from scaling.importing import import_table

    import_table(STUDY, "2_5", tracking_uri=store)
    import_table(FIXTURES / "phase_3a_like_clip_defect.csv", "3a", tracking_uri=store)
    out = tmp_path / "out"
    rep = compare("2_5,3a", tracking_uri=store, fmt="table", out_dir=out, log_to_mlflow=False, estimator="argmin")
    assert rep["comparison_run_id"] is None and n_runs(store, "scaling-compare") == 0
    table = rep["rendered"]
    assert "1.170 [-0.052, 2.392] (not calibrated)" in table and "not enough points" in table
    assert "not identifiable" in table and "compared with no theory value" in table
    assert "inconsistent clip metrics" in table and "saturation" in table
    assert (out / "plots" / "clip_frequency_3a.png").stat().st_size > 10_000
    assert not (out / "plots" / "clip_frequency_2_5.png").exists()  # no clip metrics in that table
    for fmt in FORMATS:
        text = compare(["2_5", "3a"], tracking_uri=store, fmt=fmt, log_to_mlflow=False, estimator="argmin",
                       plots=False)["rendered"]
        if fmt == "json":
            d = json.loads(text)
            assert [p["phase"] for p in d["phases"]] == ["2_5", "3a"]
            assert d["comparison"][1]["regime"] == "saturation"
        elif fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            assert [r["phase"] for r in rows] == ["2_5", "3a"]
            assert float(rows[0]["beta_all_ci_t_lo"]) == pytest.approx(-0.0516, abs=1e-3)
        elif fmt == "markdown":
            assert "| phase |" in text and text.startswith("# scaling compare")
        else:
            assert text == table.replace(table.splitlines()[0], text.splitlines()[0])
    optima = list(csv.DictReader(io.StringIO((out / "compare_optima.csv").read_text())))
    assert len(optima) == 6 and optima[0]["phase"] == "2_5"


def make_native_runs(uri, phase_name="2_5_tokens", seeds=(0, 1), diverge=(32, 0.0128), optimum=None):
    """Runs shaped like `scaling train` records them (docs/run-schema.md): LR_opt = 1e-3 (B/32)^0.5
    (or ``optimum(B)``), losses quadratic in ln LR with seed noise, clip metrics, baselines, epochs
    (256 / B: the largest batch size repeats its data 8 times), one diverged run."""
    from mlflow.entities import Metric, Param

    phase = load_phase(phase_name)
    client = tracking.connect(uri)
    exp = tracking.get_or_create_experiment(client, tracking.experiment_name(phase_name))
    rng = np.random.default_rng(0)
    lrs = [2e-4 * 2 ** k for k in range(7)]
    now = int(time.time() * 1000)
    for b in (32, 64, 128, 256):
        lo = math.log(optimum(b) if optimum else 1e-3 * (b / 32) ** 0.5)
        for lr in lrs:
            for s in seeds:
                cfg = phase.run_config(b, lr, 1.0, s)
                diverged = (b, lr) == diverge and s == 0
                loss = 2.0 + 0.08 * (math.log(lr) - lo) ** 2 + rng.normal(0, 0.003)
                metrics = {"baseline_uniform_loss": 4.852, "baseline_unigram_loss": 3.187,
                           "baseline_bigram_loss": 2.337, "tokens_seen": cfg.steps * cfg.tokens_per_step,
                           "epochs": b / 32}
                if not diverged:
                    g = 0.5 + 300 * lr
                    metrics.update({"final_val_loss": loss, "final_train_loss": loss - 0.02, "min_val_loss": loss - 0.01,
                                    "val_loss_rise": 0.01, "avg_grad_norm_before": g, "avg_grad_norm_after": min(g, 1.0) - 0.05,
                                    "avg_clip_frequency": min(1.0, max(0.0, (g - 0.8) / 2))})
                tags = {"phase": phase_name, "config_hash": cfg.config_hash(), "source": "sweep",
                        "diverged": str(diverged).lower(), "converged": str(not diverged).lower(),
                        "learned": "false" if diverged else "true"}
                run = client.create_run(exp, tags=tags)
                client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, cfg.steps) for k, v in metrics.items()],
                                 params=[Param(k, str(v)) for k, v in cfg.to_params().items()])
                client.set_terminated(run.info.run_id, "FAILED" if diverged else "FINISHED")
    return client


def test_native_runs_with_seeds(store, tmp_path):
    make_native_runs(store)
    rep = compare(["2_5_tokens"], tracking_uri=store, log_to_mlflow=False, out_dir=tmp_path / "out")
    ph = rep["phases"][0]
    assert rep["settings"]["estimator"] == "vertex" and ph["estimator"] == "vertex"  # the default
    assert ph["budget"]["kinds"] == ["tokens"] and ph["sources"] == {"sweep": 56}
    assert ph["n_diverged_or_failed"] == 1 and ph["statuses"] == {"FINISHED": 55, "FAILED": 1}
    assert ph["learned"]["true"] == 55 and ph["baselines"]["unigram"] == pytest.approx(3.187)
    opt = {o["batch_size"]: o for o in ph["optima"]}
    assert all(o["censored"] is None and o["vertex_status"] == "ok" for o in opt.values())
    assert opt[64]["argmin_n"] == 2 and opt[64]["argmin_loss_std"] is not None  # replicates averaged
    assert all(o["vertex_log_se"] > 0 and o["vertex_dof"] == 8 for o in opt.values())  # 4 x (6 obs - 4 params)
    assert ph["loss_noise"]["dof"] == 8 and ph["loss_noise"]["sd"] == pytest.approx(0.003, rel=0.9)
    grid = {(g["batch_size"], g["lr"]): g for g in ph["grid"]}
    # one of two seeds diverged: the configuration is the finished seed's loss, the divergence counted
    assert grid[(32, 0.0128)]["loss"] is not None and grid[(32, 0.0128)]["n_diverged"] == 1
    fa = ph["fits"]["all"]
    assert fa["weighted"] and fa["estimator"] == "vertex" and fa["interval_calibrated"]
    assert abs(fa["beta"] - 0.5) < 0.05 and fa["n_points"] == 4
    assert {t["name"]: t["excluded"] for t in fa["theory"]}["linear"] is True
    # epochs: 256 / 32 = 8 passes at B=256, 4 at B=128 (not more than 4)
    assert opt[256]["repeated_data"] is True and opt[128]["repeated_data"] is False
    assert ph["epochs"]["repeated_data_batch_sizes"] == [256]
    table = rep["rendered"]
    assert "8 (repeated)" in table and "repeated data" in table
    argmin = compare(["2_5_tokens"], tracking_uri=store, log_to_mlflow=False, plots=False, estimator="argmin")
    assert argmin["phases"][0]["fits"]["all"]["beta"] != fa["beta"]
    assert ph["regime"]["name"] in ("pre-saturation", "transition") and ph["regime"]["clip_metrics_consistent"]
    assert ph["fits"]["censored"]["status"] == "ok"
    assert ph["laws"]["status"] == "ok" and ph["laws"]["selected"] is None  # 4 batch sizes: cannot choose
    assert "cannot choose" in ph["laws"]["verdict"]
    for p in (tmp_path / "out" / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == PNG


def test_every_best_lr_on_the_grid_edge_is_reported_not_a_traceback(store):
    """A small sweep whose every batch size does best at its largest LR: the report says the fits
    could not be made (no beta printed), through the real CLI."""
    make_native_runs(store, seeds=(0,), diverge=None, optimum=lambda b: 1.0)
    r = CliRunner().invoke(main, ["compare", "--phases", "2_5_tokens", "--tracking-uri", store, "--no-mlflow"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "all: degenerate (every one of the 4 optima is censored" in r.output
    assert "censored: not identifiable" in r.output and "e-15" not in r.output


def test_errors_are_one_line_and_write_nothing(store, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"^unknown phase 'nope': no experiment 'scaling-phase-nope'"):
        compare("nope", tracking_uri=store, out_dir=out)
    with pytest.raises(ConfigError, match=r"^phase '3b' has no runs in .*scaling import FILE --phase 3b"):
        compare("3b", tracking_uri=store, out_dir=out)
    with pytest.raises(tracking.TrackingError, match="cannot reach the MLflow tracking store"):
        compare("2_5", tracking_uri="http://127.0.0.1:9", out_dir=out)
    with pytest.raises(ConfigError, match="format must be one of"):
        compare("2_5", tracking_uri=store, fmt="xml", out_dir=out)
    with pytest.raises(ConfigError, match="at least one phase"):
        compare(" , ", tracking_uri=store, out_dir=out)
    assert not out.exists() and n_runs(store, "scaling-compare") == 0
    r = CliRunner().invoke(main, ["compare", "--phases", "nope", "--tracking-uri", store, "--out", str(out)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: unknown phase 'nope'")
    r = CliRunner().invoke(main, ["import", str(tmp_path), "--phase", "2_5", "--tracking-uri", store])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_batch_sizes_restrict_the_fit_and_a_missing_one_is_one_line(store, tmp_path):
    """--batch-sizes fits beta on those batch sizes only (e.g. below the one where LR_opt stops growing)."""
    r = CliRunner().invoke(main, ["import", str(STUDY), "--phase", "2_5", "--tracking-uri", store])
    assert r.exit_code == 0, r.output
    every = compare("2_5", tracking_uri=store, fmt="json", log_to_mlflow=False, plots=False)
    some = compare("2_5", tracking_uri=store, fmt="json", log_to_mlflow=False, plots=False, batch_sizes=[64, 32, 128])
    assert [o["batch_size"] for o in every["optima"]] == [32, 64, 128, 256]
    assert [o["batch_size"] for o in some["optima"]] == [32, 64, 128]
    assert some["settings"]["batch_sizes"] == [32, 64, 128] and every["settings"]["batch_sizes"] is None
    out = tmp_path / "never"
    r = CliRunner().invoke(main, ["compare", "--phases", "2_5", "--tracking-uri", store, "--batch-sizes", "512",
                                  "--out", str(out), "--no-mlflow"])
    assert r.exit_code == 2 and r.output == "error: no run has batch size 512 (the runs have 32, 64, 128, 256)\n"
    for bad in ("0", "x", "16,,32"):
        r = CliRunner().invoke(main, ["compare", "--phases", "2_5", "--tracking-uri", store, "--batch-sizes", bad])
        assert r.exit_code == 2 and r.output.count("\n") == 1, (bad, r.output)
    assert not out.exists()


def test_different_budgets_are_refused_unless_chosen_or_pooled(store):
    make_native_runs(store, seeds=(0,))
    from scaling.importing import import_table

    f = Path(store[len("sqlite:///"):]).parent / "steps.csv"
    f.write_text("batch_size,lr,final_val_loss,num_steps\n32,0.0002,2.1,300\n")
    import_table(f, "2_5_tokens", tracking_uri=store)  # a fixed-steps run in the tokens phase
    with pytest.raises(ConfigError, match="mixes runs of different budgets.*--budget.*--pool-budgets"):
        compare("2_5_tokens", tracking_uri=store, log_to_mlflow=False)
    rep = compare("2_5_tokens", tracking_uri=store, pool_budgets=True, log_to_mlflow=False, plots=False)
    ph = rep["phases"][0]
    assert ph["budget"]["pooled"] and len(ph["budget"]["budgets"]) == 2
    cells = [g for g in ph["grid"] if (g["batch_size"], g["lr"]) == (32, 0.0002)]
    assert len(cells) == 2 and 2.1 in [g["loss"] for g in cells]  # kept apart, not averaged
    r = CliRunner().invoke(main, ["compare", "--phases", "2_5_tokens", "--tracking-uri", store, "--no-mlflow",
                                  "--format", "json", "--budget", "steps=300"])
    assert r.exit_code == 0, r.output
    one = json.loads(r.output)["phases"][0]
    assert one["budget"]["budgets"] == ["steps=300"] and one["n_runs"] == 1
    assert json.loads(r.output)["settings"]["budget"] == "steps=300"
    r = CliRunner().invoke(main, ["compare", "--phases", "2_5_tokens", "--tracking-uri", store, "--no-mlflow",
                                  "--budget", "steps=5"])
    assert r.exit_code == 2 and r.output.startswith("error: phase '2_5_tokens' has no runs of budget 'steps=5'")


def test_extra_sections_render_in_the_report(monkeypatch):
    import pandas as pd

    from scaling import analysis, report

    rows = [dict(phase="p", batch_size=b, lr=lr, seed=0, status="FINISHED", final_val_loss=2 + (math.log(lr / (1e-3 * b / 32))) ** 2)
            for b in (32, 64, 128) for lr in (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)]
    res = analysis.analyze(pd.DataFrame(rows), sections={"extra": lambda runs, r: {"predicted_beta": 0.41}})
    rep = {"settings": {"phases": ["p"], "metric": "final_val_loss", "estimator": "vertex", "exclude_unlearned": False,
                        "pool_budgets": False, "bootstrap": 0, "seed": 0}, **res}
    assert "extra: predicted_beta = 0.41" in report.render_table(rep)  # no renderer: key = value
    monkeypatch.setitem(report.PHASE_SECTIONS, "extra",
                        lambda sec, ph: [f"gradient noise scale predicts beta = {sec['predicted_beta']:.2f}"])
    assert "gradient noise scale predicts beta = 0.41" in report.render_table(rep)


NOISY_PHASE = """\
name: tiny_noisy
data: {dataset: wikitext2}
model: {d_model: 16, n_layers: 1, n_heads: 2, context_length: 16, vocab_size: 128}
optim: {warmup: 2}
train: {budget_kind: steps, budget: 10, eval_interval: 10, eval_batches: 2, log_interval: 5, checkpoint_every: 10,
        noise_interval: 5, noise_microbatch: 1, tail_index: true}
grid: {batch_sizes: [16, 32], lrs: [3.0e-3, 3.0e-2], clips: [1.0]}
"""


def test_a_sweep_that_measures_gradient_noise_gets_the_noise_section(store, tmp_path):
    """A real tiny sweep with noise measurement on (16 micro-batches of one sequence at B = 16: the tail index
    too) beside the study's table (no noise metrics): only the first gets the section and its plot."""
    phase_file = tmp_path / "tiny_noisy.yaml"
    phase_file.write_text(NOISY_PHASE)
    r = run_cli("sweep", "--phase-file", phase_file, "--data-dir", TINY_TEXT, "--splits", "valid:test", "--device",
                "cpu", "--quiet", "--tracking-uri", store, "--storage", f"sqlite:///{tmp_path}/sweeps.db", cwd=tmp_path,
                env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # one thread: tiny models, shared cores
    assert r.returncode == 0, r.stderr
    from scaling.importing import import_table

    import_table(STUDY, "2_5", tracking_uri=store)
    out = tmp_path / "reports"
    r = CliRunner().invoke(main, ["compare", "--phases", "tiny_noisy,2_5", "--tracking-uri", store, "--no-mlflow",
                                  "--format", "json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    noisy, study = json.loads(r.output)["phases"]
    assert study["sections"] == {}
    sec = noisy["sections"]["gradient_noise"]
    assert sec["b_noise"]["n"] == 4 and sec["b_noise"]["median"] > 0  # every run is near an optimum of 2 LRs
    assert {p["name"] for p in sec["predictions"]} == {"sgd", "adam_sqrt", "surge", "tail_index"}
    assert sec["measured"]["fit"] is None  # two batch sizes fit no beta: nothing is said to agree
    assert all(p["consistent"] is None for p in sec["predictions"])
    assert sec["over_training"]["n_runs"] == 4 and sec["over_training"]["points"][-1]["fraction"] == 1.0
    assert sec["over_training"]["points"][-1]["median"] == pytest.approx(sec["b_noise"]["median"])
    text = (out / "compare.txt").read_text()
    assert text.count("gradient noise (B_simple in sequences") == 1
    assert "sgd: the sgd law predicts beta = " in text and "no measured beta to set it beside" in text
    assert (out / "plots" / "noise_prediction_tiny_noisy.png").read_bytes()[:8] == PNG
    assert not (out / "plots" / "noise_prediction_2_5.png").exists()
