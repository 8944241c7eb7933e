"""Predictions of β from B_noise and α on synthetic phases whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from scaling import analysis, theory
from scaling.theory_plots import is_censored, plot_noise_prediction

GRID = [16, 32, 64, 128, 256]


@pytest.mark.parametrize("law", list(theory.LAWS))
@pytest.mark.parametrize("b_noise", [10.0, 100.0, 3000.0])
def test_local_slope_is_the_derivative_of_the_law(law, b_noise):
    b = np.array([8.0, 50.0, 256.0, 4000.0])
    h = 1e-5
    numeric = (theory.law_curve(law, b * math.exp(h), b_noise) - theory.law_curve(law, b * math.exp(-h), b_noise)) / (2 * h)
    assert np.allclose(theory.local_slope(law, b, b_noise), numeric, atol=1e-7)


def test_slopes_at_and_far_from_b_noise():
    assert theory.local_slope("sgd", 100, 100) == pytest.approx(0.5)
    assert theory.local_slope("adam_sqrt", 100, 100) == pytest.approx(0.25)
    assert theory.local_slope("surge", 100, 100) == pytest.approx(0.0)
    assert theory.local_slope("sgd", 1, 1e6) == pytest.approx(1.0, abs=1e-5)  # B << B_noise: linear scaling
    assert theory.local_slope("surge", 1e6, 1) == pytest.approx(-0.5, abs=1e-5)  # past the surge


@pytest.mark.parametrize("law, analysis_law", [("sgd", "saturating_a1"), ("adam_sqrt", "saturating_a1_2"),
                                               ("surge", "surge")])
def test_predicted_curves_are_the_fitted_laws_of_analysis(law, analysis_law):
    """The shape predicted from B_noise is the law `scaling compare` fits, at that B_noise."""
    x = np.log(np.array(GRID, float))
    fitted = analysis.LAWS[analysis_law][0](x, 0.0, math.log(90.0))
    assert np.allclose(theory.law_curve(law, np.exp(x), 90.0), fitted, atol=1e-12)


def test_grid_slope_is_what_a_power_fit_of_exact_optima_measures():
    """Optima that follow the SGD law exactly: the fitted power-law β is the predicted grid slope."""
    b_noise = 80.0
    lr = 0.01 * np.exp(theory.law_curve("sgd", np.array(GRID, float), b_noise))
    pts = pd.DataFrame({"batch_size": GRID, "x": np.log(GRID), "y": np.log(lr), "se": np.nan,
                        "censored": [None] * 5})
    fit = {"b": np.polyfit(pts["x"], pts["y"], 1)[0]}  # the least-squares slope a power fit of these optima gives
    pred = theory.predicted_beta(GRID, b_noise)["sgd"]
    assert fit["b"] == pytest.approx(pred["grid_slope"], rel=1e-9)
    assert pred["mean"] == pytest.approx(np.mean([b_noise / (b + b_noise) for b in GRID]))
    assert set(pred["per_batch"]) == set(GRID)
    rows = theory.compare_with_measured({"median": b_noise}, GRID, fit["b"], [fit["b"] - 0.01, fit["b"] + 0.01])
    by = {r["name"]: r for r in rows}
    assert by["sgd"]["beta_grid"] == pytest.approx(fit["b"]) and by["adam_sqrt"]["consistent"] is False


def _phase_runs(b_noise_of, alpha=1.7, seed=0):
    """A phase whose loss is a parabola in ln LR with its minimum at LR* = 3e-3·(B/16)^0.5 on a grid of
    factor-2 LRs; every run carries a b_noise and tail index."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in GRID:
        best = 3e-3 * (b / 16) ** 0.5
        for lr in 1e-4 * 2.0 ** np.arange(9):
            rows.append({"run_id": f"B{b}-{lr:.2e}", "phase": "p", "batch_size": b, "lr": lr, "status": "FINISHED",
                         "final_val_loss": 2 + (math.log(lr) - math.log(best)) ** 2,
                         "b_noise": b_noise_of(b, lr, rng), "tail_index_alpha": alpha + rng.normal(0, 0.05)})
    runs = analysis.normalize_runs(pd.DataFrame(rows))
    return runs, analysis.optimum_table(runs)


def test_b_noise_is_taken_from_the_runs_near_each_optimum():
    runs, optima = _phase_runs(lambda b, lr, rng: 1000.0 * lr)  # B_noise grows with LR: the selection shows
    near = theory.runs_near_optima(runs, optima, window=1)
    assert len(near) == 3 * len(GRID)
    for _, o in optima.iterrows():
        lrs = sorted(near.loc[near["batch_size"] == o["batch_size"], "lr"])
        assert lrs[1] == pytest.approx(o["argmin_lr"]) and lrs[0] == pytest.approx(lrs[1] / 2)
    s = theory.b_noise_summary(runs, optima, window=0)
    expected = np.array([1000.0 * lr for lr in optima["argmin_lr"]])
    assert s["median"] == pytest.approx(np.median(expected)) and s["n"] == len(GRID)
    assert s["q25"] == pytest.approx(np.quantile(expected, 0.25)) and len(s["by_batch"]) == len(GRID)


def test_theory_report_recovers_b_noise_and_alpha():
    runs, optima = _phase_runs(lambda b, lr, rng: 200.0 * math.exp(rng.normal(0, 0.1)))
    rep = theory.theory_report(runs, optima, beta=0.5, beta_ci=[0.4, 0.6])
    assert rep["batch_sizes"] == GRID
    assert rep["b_noise"]["median"] == pytest.approx(200.0, rel=0.1)
    assert rep["b_noise"]["q25"] < rep["b_noise"]["median"] < rep["b_noise"]["q75"]
    assert rep["tail_index"]["alpha"] == pytest.approx(1.7, abs=0.05)
    assert rep["tail_index"]["beta"] == pytest.approx(1 - 1 / rep["tail_index"]["alpha"])
    by = {r["name"]: r for r in rep["predictions"]}
    assert set(by) == {"sgd", "adam_sqrt", "surge", "tail_index"}
    lo, hi = by["sgd"]["beta_range"]
    assert lo < by["sgd"]["beta"] < hi  # the slopes grow with B_noise
    assert by["sgd"]["beta_measured"] == 0.5 and by["sgd"]["beta_ci"] == [0.4, 0.6]
    assert rep["b_noise_median"]["n"] == 0  # not measured in these runs


def test_without_noise_metrics_nothing_is_predicted():
    runs, optima = _phase_runs(lambda b, lr, rng: math.nan)
    rep = theory.theory_report(runs.drop(columns=["tail_index_alpha"]), optima, beta=None, beta_ci=None)
    assert rep["b_noise"]["median"] is None and rep["tail_index"] is None
    assert all(r["beta"] is None and r["consistent"] is None for r in rep["predictions"])


def test_tail_index_beta_and_its_range():
    t = theory.tail_index_beta(1.5, 1.4, 1.6)
    assert t["beta"] == pytest.approx(1 / 3) and t["beta_range"] == pytest.approx([1 - 1 / 1.4, 1 - 1 / 1.6])
    assert theory.tail_index_beta(None)["beta"] is None and theory.tail_index_beta(math.nan)["beta"] is None


def test_b_noise_over_training_per_step():
    h = pd.DataFrame({"run_id": ["a", "b", "c"] * 2, "step": [50] * 3 + [100] * 3,
                      "value": [10.0, 20.0, 30.0, 40.0, np.nan, 60.0]})
    out = theory.b_noise_over_training(h)
    assert out["step"].tolist() == [50, 100] and out["median"].tolist() == [20.0, 50.0]
    assert out["n"].tolist() == [3, 2]


def test_plot_writes_a_png(tmp_path):
    pts = pd.DataFrame({"batch_size": GRID, "lr": [1e-3, 1.5e-3, 2e-3, 2.4e-3, 2.6e-3],
                        "lr_lo": [8e-4] * 5, "lr_hi": [3e-3] * 5, "censored": [None, None, None, None, "high"]})
    fitted = {"power": {"status": "ok", "theta": [math.log(3e-4), 0.4]},
              "saturating_a1": {"status": "ok", "theta": [math.log(3e-3), math.log(50.0)]}}
    p = plot_noise_prediction(pts, {"median": 60.0, "q25": 40.0, "q75": 90.0}, tmp_path / "pred.png", fitted)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_censored_entries_as_the_optimum_table_writes_them():
    col = pd.DataFrame({"c": [None, "high", "low", None, False, ""]})["c"]  # pandas may hold None as NaN
    assert [is_censored(v) for v in col] == [False, True, True, False, False, False]
    assert is_censored(math.nan) is False and is_censored(True) is True
