"""scaling.analysis: optimum per batch size, censoring, power fits (all/uncensored/censored), checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from scaling import analysis as A
from scaling.config import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"


def study_runs(phase="2_5") -> pd.DataFrame:
    df = pd.read_csv(FIXTURES / "study_phase_2_5.csv")
    return df.assign(phase=phase, grad_clip=1.0, status="FINISHED", diverged=False, budget_kind="steps",
                     budget=10000, run_id=[f"r{i}" for i in range(len(df))])


def grid_runs(opt_lr: dict[int, float], lrs, seeds=(0,), curv=0.1, noise=0.0, phase="p", seed=0, **extra):
    """Losses quadratic in ln LR around opt_lr[B] (+ Gaussian noise), one run per (B, lr, seed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for b, lo in opt_lr.items():
        for lr in lrs:
            for s in seeds:
                y = 2.5 + curv * (math.log(lr) - math.log(lo)) ** 2 + rng.normal(0, noise)
                rows.append(dict(run_id=f"{b}-{lr}-{s}", phase=phase, batch_size=b, lr=lr, grad_clip=1.0, seed=s,
                                 status="FINISHED", diverged=False, learned=True, source="sweep",
                                 budget_kind="steps", budget=300, final_val_loss=y, **extra))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------


def test_study_table_reproduces_beta_and_reports_its_uncertainty():
    res = A.analyze(study_runs(), bootstrap=1000, seed=0)
    ph = res["phases"][0]
    opt = {o["batch_size"]: o for o in ph["optima"]}
    assert [opt[b]["argmin_lr"] for b in (32, 64, 128, 256)] == [0.001, 0.003, 0.01, 0.01]
    assert [opt[b]["censored"] for b in (32, 64, 128, 256)] == [None, None, "high", "high"]
    fa = ph["fits"]["all"]
    assert fa["status"] == "ok" and not fa["weighted"]
    assert round(fa["beta"], 3) == 1.170 and round(fa["r2"], 3) == 0.895
    assert fa["beta_ci_t"] == pytest.approx([-0.05, 2.39], abs=0.01)
    assert 2 * fa["beta_se"] == pytest.approx(0.57, abs=0.005)  # the study's "± 0.57" is 2 SE
    assert fa["dof"] == 2 and fa["rests_on_censored"] and fa["n_censored"] == 2
    assert ph["fits"]["uncensored"]["status"] == "not enough points"
    assert ph["fits"]["uncensored"]["n_points"] == 2
    assert {d["batch_size"] for d in ph["needs_search_past_edge"]} == {128, 256}
    assert any("censored" in w for w in ph["warnings"])
    assert any("local to the batch sizes" in w for w in ph["warnings"])
    # theory: a 2-dof t interval this wide excludes none of them
    assert all(t["excluded"] is False for t in fa["theory"])
    assert ph["laws"]["status"] == "not enough points"


def test_power_fit_matches_scipy_linregress():
    rng = np.random.default_rng(3)
    b = np.array([16, 32, 64, 128, 256, 512])
    y = math.log(2e-4) + 0.6 * np.log(b) + rng.normal(0, 0.1, len(b))
    pts = pd.DataFrame({"batch_size": b, "x": np.log(b), "y": y, "se": np.nan, "res_se": 0.0, "censored": None,
                        "edge_y": y, "from": "argmin", "learned": None})
    f = A.fit_power(pts, "all", bootstrap=0)
    ref = stats.linregress(np.log(b), y)
    assert f["beta"] == pytest.approx(ref.slope, rel=1e-9)
    assert f["log_C"] == pytest.approx(ref.intercept, rel=1e-9)
    assert f["beta_se"] == pytest.approx(ref.stderr, rel=1e-6)
    assert f["r2"] == pytest.approx(ref.rvalue ** 2, rel=1e-9)
    t = stats.t.ppf(0.975, len(b) - 2)
    assert f["beta_ci_t"] == pytest.approx([ref.slope - t * ref.stderr, ref.slope + t * ref.stderr], rel=1e-6)


def test_weighted_fit_uses_inverse_variance_weights():
    b = np.array([16, 32, 64, 128, 256])
    se = np.array([0.05, 0.1, 0.2, 0.1, 0.4])
    y = np.array([-9.0, -8.5, -8.2, -7.6, -7.5])
    pts = pd.DataFrame({"batch_size": b, "x": np.log(b), "y": y, "se": se, "res_se": 0.0, "censored": None,
                        "edge_y": y, "from": "vertex", "learned": None})
    f = A.fit_power(pts, "all", bootstrap=0)
    assert f["weighted"] and f["method"] == "weighted least squares"
    slope, icpt = np.polyfit(np.log(b), y, 1, w=1 / se)  # polyfit weights multiply residuals: 1/sigma
    assert f["beta"] == pytest.approx(slope, rel=1e-7) and f["log_C"] == pytest.approx(icpt, rel=1e-7)
    # one missing SE: unweighted, and it says so
    pts.loc[2, "se"] = np.nan
    assert A.fit_power(pts, "all", bootstrap=0)["weighted"] is False


def test_bootstrap_is_reproducible_with_a_seed():
    pts = A.estimate_points(A.optimum_table(A.normalize_runs(study_runs())))
    a = A.fit_power(pts, "all", bootstrap=500, seed=7)
    b = A.fit_power(pts, "all", bootstrap=500, seed=7)
    c = A.fit_power(pts, "all", bootstrap=500, seed=8)
    assert a["beta_ci_bootstrap"] == b["beta_ci_bootstrap"] and a["bootstrap_resamples"] == 500
    assert a["bootstrap_valid"] <= 500 and a["bootstrap_valid"] > 400
    assert a["beta_ci_bootstrap"] != c["beta_ci_bootstrap"] or a["bootstrap_valid"] != c["bootstrap_valid"]


def test_quadratic_vertex_recovers_the_optimum_and_its_se_from_replicates():
    lrs = [1e-3 * 2 ** k for k in range(6)]
    runs = A.normalize_runs(grid_runs({64: 5.3e-3}, lrs, seeds=(0, 1, 2), curv=0.2, noise=0.002))
    opt = A.optimum_table(runs).iloc[0]
    assert opt["censored"] is None and opt["vertex_status"] == "ok"
    assert opt["argmin_n"] == 3 and opt["argmin_loss_std"] > 0  # replicates averaged, spread kept
    assert opt["vertex_log_se"] > 0
    assert abs(math.log(opt["vertex_lr"]) - math.log(5.3e-3)) < 4 * opt["vertex_log_se"] + 0.05
    # no replicates: exact parabola through 3 points -> exact vertex, no SE
    one = A.optimum_table(A.normalize_runs(grid_runs({64: 5.3e-3}, lrs, curv=0.2))).iloc[0]
    assert one["vertex_lr"] == pytest.approx(5.3e-3, rel=1e-6) and math.isnan(one["vertex_log_se"])


def test_vertex_rejected_when_opening_downward_or_outside_range():
    x = np.log([1e-3, 2e-3, 4e-3])
    assert A.quadratic_vertex(x, np.array([1.0, 0.5, 1.0]), (x[0], x[-1]))["status"] == "ok"
    assert A.quadratic_vertex(x, np.array([1.0, 1.5, 1.0]), (x[0], x[-1]))["status"] == "opens downward"
    x4 = np.log([1e-3, 2e-3, 4e-3, 8e-3])
    far = A.quadratic_vertex(x4, (x4 - x4[0] + 1.0) ** 2, (x4[1], x4[-1]))
    assert far["status"] == "outside sampled range"


def test_censored_low_and_diverged_runs_count_as_worse_than_any_loss():
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    df = grid_runs({32: 1e-4, 64: 5e-3, 128: 2e-2}, lrs)
    # B=128: its best LR diverged -> the argmin moves inside, bounded by the diverged run
    i = df.index[(df.batch_size == 128) & (df.lr == 3e-2)][0]
    df.loc[i, ["status", "diverged", "final_val_loss"]] = ["FAILED", True, np.nan]
    opt = A.optimum_table(A.normalize_runs(df)).set_index("batch_size")
    assert opt.loc[32, "censored"] == "low"
    assert opt.loc[64, "censored"] is None
    assert opt.loc[128, "argmin_lr"] == 1e-2 and opt.loc[128, "censored"] is None
    assert opt.loc[128, "n_diverged"] == 1
    assert opt.loc[128, "vertex_status"] == "a neighbour diverged"
    # every run of a batch size diverged: no optimum
    df2 = grid_runs({32: 1e-2}, lrs).assign(status="FAILED", diverged=True)
    o2 = A.optimum_table(A.normalize_runs(df2)).iloc[0]
    assert o2["status"] == "all diverged"


def test_censored_fit_uses_bounds_and_matches_ols_without_censoring():
    b = np.array([16, 32, 64, 128, 256, 512, 1024])
    rng = np.random.default_rng(0)
    y = math.log(1e-4) + 0.7 * np.log(b) + rng.normal(0, 0.1, len(b))
    base = pd.DataFrame({"batch_size": b, "x": np.log(b), "y": y, "se": np.nan, "res_se": 0.0,
                         "censored": None, "edge_y": y, "from": "argmin", "learned": None})
    fc = A.fit_censored(base)
    ols = stats.linregress(np.log(b), y)
    assert fc["status"] == "ok" and fc["beta"] == pytest.approx(ols.slope, abs=1e-4)
    assert fc["beta_ci"][0] < ols.slope < fc["beta_ci"][1]
    # the two largest batch sizes only known to lie above an edge below their true optimum
    cens = base.copy()
    cens.loc[5:, "censored"] = "high"
    cens.loc[5:, "edge_y"] = cens.loc[5:, "y"] - 0.8
    cens.loc[5:, "y"] = cens.loc[5:, "edge_y"]
    fcc = A.fit_censored(cens)
    dropped = A.fit_power(cens, "uncensored", bootstrap=0)
    allfit = A.fit_power(cens, "all", bootstrap=0)
    assert fcc["status"] == "ok" and fcc["n_censored"] == 2
    assert fcc["beta_ci"][0] < 0.7 < fcc["beta_ci"][1]
    # using the edges as values biases beta down; the censored fit does not
    assert allfit["beta"] < fcc["beta"]
    assert abs(fcc["beta"] - 0.7) < abs(allfit["beta"] - 0.7)
    assert dropped["n_points"] == 5


def test_censored_fit_reports_not_enough_and_not_identifiable():
    b = np.array([32, 64, 128])
    y = np.log([1e-3, 2e-3, 3e-3])
    pts = pd.DataFrame({"batch_size": b, "x": np.log(b), "y": y, "se": np.nan, "res_se": 0.0,
                        "censored": [None, "high", "high"], "edge_y": y, "from": "argmin", "learned": None})
    assert A.fit_censored(pts)["status"] == "not enough points"
    pts.loc[1, "censored"] = None  # a line through the two uncensored points clears the bound at B=128
    assert A.fit_censored(pts)["status"] == "not identifiable"


def test_theory_comparison_with_a_measured_tail_index():
    out = {t["name"]: t for t in A.theory_comparison([0.6, 0.9], alpha=3.0)}
    assert out["gaussian"]["excluded"] and not out["laplace_alpha3"]["excluded"]
    assert out["linear"]["excluded"] and out["saturation"]["excluded"]
    assert out["tail_index"]["beta"] == pytest.approx(2 / 3) and out["tail_index"]["excluded"] is False
    assert all(t["excluded"] is None for t in A.theory_comparison([None, None]))


@given(st.floats(min_value=-1, max_value=2, allow_nan=False))
def test_regime_thresholds(f):
    name = A.regime(f)
    assert name == ("pre-saturation" if f < 0.5 else "transition" if f < 0.99 else "saturation")


def test_regime_and_clip_flags_on_the_3a_like_table():
    df = pd.read_csv(FIXTURES / "phase_3a_like_clip_defect.csv").rename(columns={"gradient_clip": "grad_clip"})
    df = df.assign(phase="3a", status="FINISHED", diverged=False, budget_kind="steps", budget=5000)
    res = A.analyze(df, bootstrap=0)["phases"][0]
    assert res["regime"]["name"] == "saturation" and res["regime"]["clip_metrics_consistent"] is False
    assert len(res["clip_flags"]) == len(df)
    assert all("equals pre-clip" in f["problem"] for f in res["clip_flags"])
    assert res["fits"]["all"]["status"] == "not enough points"  # two batch sizes
    # a consistent run is not flagged
    ok = pd.DataFrame([dict(run_id="a", phase="x", batch_size=32, lr=1e-3, grad_clip=1.0, avg_grad_norm_before=2.0,
                            avg_grad_norm_after=0.9, avg_clip_frequency=0.7)])
    assert A.clip_flags(A.normalize_runs(ok)) == []


def test_budgets_are_not_pooled_unless_asked():
    df = pd.concat([grid_runs({32: 1e-3, 64: 2e-3, 128: 4e-3}, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
                    grid_runs({32: 1e-3}, [5e-4, 1e-3, 2e-3]).assign(budget_kind="tokens", budget=1e6,
                                                                     run_id=lambda d: "t" + d.run_id)])
    with pytest.raises(ConfigError, match="mixes runs of different budgets.*--pool-budgets"):
        A.analyze(df, bootstrap=0)
    res = A.analyze(df, bootstrap=0, pool_budgets=True)["phases"][0]
    assert res["budget"]["pooled"] and set(res["budget"]["kinds"]) == {"steps", "tokens"}
    assert any("pooled" in w for w in res["warnings"])


def test_learned_counts_exclusion_and_overfitting():
    df = grid_runs({32: 1e-3, 64: 2e-3, 128: 4e-3}, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3],
                   val_loss_rise=0.2, baseline_unigram_loss=3.19)
    df["learned"] = None  # derived from the baseline: every loss here is below 3.19 ...
    df.loc[df.batch_size == 128, "final_val_loss"] += 1.0  # ... except B=128's
    res = A.analyze(df, bootstrap=0)["phases"][0]
    assert res["learned"]["true"] == 10 and res["learned"]["false"] == 5
    assert res["learned"]["optima_unlearned"] == 1
    assert any("did not learn" in w for w in res["warnings"])
    assert all(o["overfitting"] for o in res["optima"])
    assert any("overfitting" in w for w in res["warnings"])
    ex = A.analyze(df, bootstrap=0, exclude_unlearned=True)["phases"][0]
    assert ex["n_excluded_unlearned"] == 5 and [o["batch_size"] for o in ex["optima"]] == [32, 64]


def test_several_clip_thresholds_are_separate_series():
    a = grid_runs({32: 1e-3, 64: 2e-3, 128: 4e-3}, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    b = a.assign(grad_clip="none", run_id=lambda d: "n" + d.run_id)
    res = A.analyze(pd.concat([a, b]), bootstrap=0)
    assert [p["phase"] for p in res["phases"]] == ["p[clip=1]", "p[clip=none]"]
    assert res["phases"][1]["grad_clip"] is None


def test_bad_metric_and_estimator_are_config_errors():
    with pytest.raises(ConfigError, match="metric"):
        A.analyze(study_runs(), metric="accuracy")
    with pytest.raises(ConfigError, match="estimator"):
        A.analyze(study_runs(), estimator="mean")
    with pytest.raises(ConfigError, match="lacks column 'lr'"):
        A.normalize_runs(pd.DataFrame({"phase": ["x"], "batch_size": [1]}))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([16, 32, 64, 128]), st.sampled_from([1e-4, 1e-3, 1e-2, 1e-1]),
                          st.one_of(st.floats(0.5, 10), st.just(float("nan")), st.just(float("inf")))),
                min_size=1, max_size=16))
def test_analyze_never_crashes_on_odd_tables(rows):
    df = pd.DataFrame(rows, columns=["batch_size", "lr", "final_val_loss"]).assign(phase="h", status="FINISHED")
    df["diverged"] = ~np.isfinite(df["final_val_loss"].fillna(0))
    if df.loc[~df["diverged"], "final_val_loss"].isna().all() and (~df["diverged"]).any():
        with pytest.raises(ConfigError, match="records 'final_val_loss'"):  # the one designed refusal
            A.analyze(df, bootstrap=20)
        return
    res = A.analyze(df, bootstrap=20)
    ph = res["phases"][0]
    assert {o["batch_size"] for o in ph["optima"]} <= set(df["batch_size"])
    for kind in ("all", "uncensored", "censored"):
        assert ph["fits"][kind]["status"] in ("ok", "not enough points", "not identifiable")


def test_a_metric_no_run_records_is_a_config_error():
    with pytest.raises(ConfigError, match="none of its 20 finished runs records 'min_val_loss'"):
        A.analyze(study_runs(), metric="min_val_loss")


def test_an_infrastructure_failure_does_not_hide_the_rerun_of_the_same_config():
    runs = pd.DataFrame({"phase": ["p"] * 3, "batch_size": [32, 32, 32], "lr": [1e-3, 1e-3, 3e-3],
                         "seed": [0, 0, 0], "status": ["FAILED", "FINISHED", "FAILED"],
                         "diverged": [False, False, False], "final_val_loss": [np.nan, 2.0, np.nan]})
    df = A.normalize_runs(runs)
    assert list(df["status"]) == ["FINISHED", "FAILED"]  # the lone failure of lr 3e-3 still counts (as inf)
    assert list(A.objective_values(df, "final_val_loss")) == [2.0, math.inf]
