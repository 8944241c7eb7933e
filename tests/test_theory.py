"""Predictions of β from B_noise and α on synthetic phases whose answers are known in closed form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from scaling import analysis, noise_report, report, theory
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


# ---------------------------------------------------------------------------------------------
# The gradient noise section of `scaling compare` (scaling.noise_report)

B_NOISE = 200.0


def _seeded_runs(b_noise=B_NOISE, alpha=2.0, noise=0.01, seeds=(0, 1, 2), with_noise=True):
    """A raw runs table (as report.load_runs builds it): loss a parabola in ln LR with its minimum at
    LR* = 3e-3·(B/16)^0.5 plus seed noise; runs within one LR step of each batch size's best grid LR carry
    ``b_noise`` (the runs farther away carry 100×, so a section that took them would show it)."""
    rng = np.random.default_rng(7)
    lrs = 1e-4 * 2.0 ** np.arange(9)
    rows = []
    for b in GRID:
        best = 3e-3 * (b / 16) ** 0.5
        near = np.abs(np.log2(lrs / lrs[np.argmin(np.abs(np.log(lrs / best)))])) < 1.01
        for lr, is_near in zip(lrs, near):
            for s in seeds:
                row = {"run_id": f"B{b}-{lr:.2e}-s{s}", "phase": "p", "batch_size": b, "lr": lr, "seed": s,
                       "status": "FINISHED", "final_val_loss": 2 + 0.3 * math.log(lr / best) ** 2 + rng.normal(0, noise)}
                if with_noise:
                    row.update(b_noise=b_noise if is_near else 100 * b_noise, b_noise_median=b_noise / 2,
                               b_noise_adam=3 * b_noise, tail_index_alpha=alpha)
                rows.append(row)
    return pd.DataFrame(rows)


def _far_run_ids(runs):
    return runs.loc[runs["b_noise"] > B_NOISE, "run_id"].tolist()


@dataclass
class FakeHistories:
    """Each run's gns_b_simple history: B measurements ending at step 10·B, growing linearly to B_NOISE
    (runs of different B train for different numbers of steps, as at equal tokens)."""
    asked: list = field(default_factory=list)

    def __call__(self, run_ids, key):
        self.asked += list(run_ids)
        rows = [(rid, step, B_NOISE * step / (10 * b)) for rid in run_ids
                for b in [int(rid.split("-")[0][1:])] for step in range(b, 10 * b + 1, b)]
        return pd.DataFrame(rows, columns=["run_id", "step", "value"])


def _section(runs, **kw):
    res = analysis.analyze(runs, sections={noise_report.SECTION: noise_report.NoiseSection(**kw)})
    return res, res["phases"][0]["sections"].get(noise_report.SECTION)


def test_section_of_a_phase_with_known_b_noise():
    hist = FakeHistories()
    res, sec = _section(_seeded_runs(), histories=hist)
    ph = res["phases"][0]
    kind, fit = analysis.headline_fit(ph)
    assert sec["measured"]["fit"] == kind and sec["measured"]["beta_ci"] == fit["beta_ci"]
    assert sec["measured"]["batch_sizes"] == GRID and sec["batch_sizes"] == GRID
    assert fit["beta_ci"][0] < 0.5 < fit["beta_ci"][1]
    # B_noise from the 3 LRs x 3 seeds near each of the 5 optima only
    assert sec["b_noise"]["median"] == B_NOISE and sec["b_noise"]["n"] == 45
    assert sec["b_noise_median"]["median"] == B_NOISE / 2 and sec["b_noise_adam"]["median"] == 3 * B_NOISE
    assert [r["n"] for r in sec["b_noise"]["by_batch"]] == [9] * 5
    by = {r["name"]: r for r in sec["predictions"]}
    for law in theory.LAWS:
        expected = [float(theory.local_slope(law, b, B_NOISE)) for b in GRID]
        assert by[law]["per_batch"] == pytest.approx(dict(zip(map(str, GRID), expected)))
        assert by[law]["beta"] == pytest.approx(np.mean(expected))
        assert by[law]["beta_grid"] == pytest.approx(theory.grid_slope(law, GRID, B_NOISE))
        lo, hi = fit["beta_ci"]
        assert by[law]["consistent"] is bool(lo <= np.mean(expected) <= hi)
    # at B_noise = 200 over B = 16..256: SGD's mean slope 0.72 lies above an interval round 0.5, the others below
    assert (by["sgd"]["consistent"], by["adam_sqrt"]["consistent"], by["surge"]["consistent"]) == (False,) * 3
    assert by["tail_index"]["beta"] == pytest.approx(0.5) and by["tail_index"]["consistent"] is True
    # over training: only the finished runs near the optima were read; fractions pool runs of every length
    assert len(hist.asked) == 45 and not set(hist.asked) & set(_far_run_ids(_seeded_runs()))
    ot = sec["over_training"]
    assert [p["fraction"] for p in ot["points"]] == pytest.approx([k / 10 for k in range(1, 11)])
    assert [p["median"] for p in ot["points"]] == pytest.approx([B_NOISE * k / 10 for k in range(1, 11)])
    assert {p["n"] for p in ot["points"]} == {45} and len(ot["by_batch"]) == 5


def test_section_sentences_say_where_prediction_and_measurement_agree():
    res, sec = _section(_seeded_runs(), histories=FakeHistories())
    rep = {"settings": {"phases": ["p"], "metric": "final_val_loss", "estimator": "vertex", "exclude_unlearned": False,
                        "pool_budgets": False, "bootstrap": 0, "seed": 0}, **res}
    text = report.render_table(rep)
    assert "gradient noise (B_simple in sequences" in text and "B_noise over training (45 runs" in text
    lines = [ln.strip() for ln in text.splitlines()]
    said = {name: next(ln for ln in lines if ln.startswith(f"{name}: ")) for name in (*theory.LAWS, "tail_index")}
    assert "above the measured" in said["sgd"] and "disagree" in said["sgd"]
    assert "below the measured" in said["adam_sqrt"] and "below the measured" in said["surge"]
    assert "inside the measured" in said["tail_index"] and "agree." in said["tail_index"]
    assert sec["statements"] == [s for s in lines if s in sec["statements"]]


def test_fitted_law_b_noise_is_set_beside_the_measured_one():
    ph = {"laws": {"models": {"saturating_a1": {"status": "ok", "params": {"B_noise": {"value": 12.0, "ci": [6.0, 24.0]}}},
                              "surge": {"status": "not enough points"}}}}
    assert noise_report.fitted_b_noise(ph, "sgd", 20.0)["measured_inside"] is True
    assert noise_report.fitted_b_noise(ph, "sgd", 374.0)["measured_inside"] is False
    assert noise_report.fitted_b_noise(ph, "surge", 20.0) is None
    assert noise_report.fitted_b_noise(ph, "tail_index", 20.0) is None


def test_no_section_without_noise_metrics():
    hist = FakeHistories()
    _, sec = _section(_seeded_runs(with_noise=False), histories=hist)
    assert sec is None and hist.asked == []
    _, sec = _section(_seeded_runs(b_noise=math.nan), histories=hist)  # columns there, nothing measured
    assert sec is None


def test_by_fraction_of_training_keeps_each_bins_last_value():
    h = pd.DataFrame({"run_id": ["a"] * 4 + ["b"] * 2, "step": [25, 50, 75, 100, 5, 10],
                      "value": [1.0, 2.0, 3.0, 4.0, 10.0, 20.0]})
    out = theory.by_fraction_of_training(h, bins=2)
    assert out.values.tolist() == [["a", 0.5, 2.0], ["a", 1.0, 4.0], ["b", 0.5, 10.0], ["b", 1.0, 20.0]]
