"""Which law does LR_opt(B) follow? Tables generated from each law with known parameters and noise."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scaling import analysis as A

B7 = np.array([16, 32, 64, 128, 256, 512, 1024])

# generating law -> (parameters in the law's own order: logs for eps_max / B_noise / C; noise SD in ln LR)
TRUTH = {
    "power": ((math.log(1e-4), 0.8), 0.03),
    "saturating_a1": ((math.log(1e-2), math.log(128)), 0.03),
    "saturating_a1_2": ((math.log(1e-2), math.log(128)), 0.03),
    "surge": ((math.log(1e-2), math.log(128)), 0.03),
    # the 3-parameter law must beat the fixed-a ones by > 2 AICc after its penalty: less noise
    "saturating_free": ((math.log(1e-2), math.log(100), 0.75), 0.01),
}


def points(law, theta, sd, b=B7, seed=0, se=None):
    rng = np.random.default_rng(seed)
    x = np.log(b)
    y = A.LAWS[law][0](x, *theta) + rng.normal(0, sd, len(b))
    se = np.full(len(b), np.nan) if se is None else se
    return pd.DataFrame({"batch_size": b, "x": x, "y": y, "se": se, "censored": pd.array([None] * len(b), dtype=object),
                         "edge_y": y, "bound_y": y, "from": "vertex", "vertex_y": y, "vertex_se": se,
                         "learned": pd.array([None] * len(b), dtype=object)})


def natural(law, name, value):
    """The true parameter on the scale the fit reports it."""
    pnames = A.LAWS[law][1]
    return math.exp(value) if pnames[[p.removeprefix("log_") for p in pnames].index(name)].startswith("log_") else value


@pytest.mark.parametrize("law", list(TRUTH))
def test_parameters_come_back_within_their_intervals_and_the_law_is_selected(law):
    theta, sd = TRUTH[law]
    res = A.fit_laws(points(law, theta, sd))
    assert res["status"] == "ok" and res["n_points"] == 7
    m = res["models"][law]
    assert m["status"] == "ok" and not m["at_bound"]
    for (name, p), true in zip(m["params"].items(), theta):
        lo, hi = p["ci"]
        assert lo <= natural(law, name, true) <= hi, (name, p, true)
    assert res["selected"] == law, res["verdict"]
    assert m["loo_rmse"] is not None and m["loo_rmse"] < 5 * sd
    assert m["aicc"] == min(v["aicc"] for v in res["models"].values() if v["k"] == m["k"])


def test_laws_within_two_aicc_cannot_choose_and_no_law_is_a_default():
    def model(k, aicc):
        return {"status": "ok", "k": k, "aicc": aicc}
    close = {"power": model(2, 10.0), "surge": model(2, 9.0), "saturating_a1": model(2, 20.0)}
    sel = A.select_law(close, 7)
    assert sel["selected"] is None and sel["candidates"] == ["surge", "power"] and "cannot choose" in sel["verdict"]
    clear = {"power": model(2, 12.5), "surge": model(2, 10.0)}
    assert A.select_law(clear, 7)["selected"] == "surge"
    assert A.select_law({"power": model(2, 10.0), "surge": model(2, 12.5)}, 7)["selected"] == "power"


def test_a_lead_that_chance_explains_is_not_a_choice():
    """The best law by more than 2 AICc is still not chosen when the runner-up, had it generated the
    data, would often lose by as much (parametric bootstrap)."""
    b = np.array([16, 32, 64, 128, 256])
    pts = points("power", (math.log(1e-4), 0.8), 0.15, b=b, seed=11)
    res = A.fit_laws(pts, loo=False, seed=0)
    two = sorted((m["aicc"], k) for k, m in res["models"].items() if m["k"] == 2)
    lead = two[1][0] - two[0][0]
    if lead <= A.LAW_MARGIN:
        assert res["selected"] is None
    else:
        assert res["p_values"] and (res["selected"] is None) == any(p >= 0.05 for p in res["p_values"].values())


def test_four_batch_sizes_cannot_choose_and_never_pick_three_parameters():
    theta, sd = TRUTH["saturating_free"]
    res = A.fit_laws(points("saturating_free", theta, sd, b=np.array([32, 64, 128, 256])))
    assert res["selected"] is None
    assert "cannot choose" in res["verdict"]
    assert res["models"]["saturating_free"]["aicc"] is None  # n <= K + 1: no AICc at all
    # five batch sizes: the 2-parameter laws compete, the 3-parameter one is not considered
    res5 = A.fit_laws(points("saturating_free", theta, sd, b=np.array([16, 32, 64, 128, 256])))
    assert res5["selected"] != "saturating_free"
    assert "need at least 6" in res5["verdict"] or res5["selected"] is None


def test_power_law_fit_equals_linear_regression_and_its_local_beta_is_beta():
    theta, sd = TRUTH["power"]
    pts = points("power", theta, sd, seed=4)
    m = A.fit_law("power", pts["x"].to_numpy(), pts["y"].to_numpy())
    assert m["weighted"] is False
    ref = stats.linregress(pts["x"], pts["y"])
    assert m["params"]["beta"]["value"] == pytest.approx(ref.slope, rel=1e-6)
    assert m["params"]["beta"]["se"] == pytest.approx(ref.stderr, rel=1e-4)
    assert m["local_beta"]["beta"] == pytest.approx([ref.slope] * 3, rel=1e-5)


def test_local_slopes_of_saturating_and_surge_laws():
    # saturating a=1 at B = B_noise has local beta 1/2; surge peaks (beta 0) at B = B_noise
    x = np.log([16.0, 128.0, 1024.0])
    sat = A.law_saturating(x, 0.0, math.log(128), 1.0)
    surge = A.law_surge(x, 0.0, math.log(128))
    h = 1e-5
    d = lambda f, xx: (f(xx + h) - f(xx - h)) / (2 * h)
    assert d(lambda v: A.law_saturating(v, 0.0, math.log(128), 1.0), x[1]) == pytest.approx(0.5, abs=1e-6)
    assert d(lambda v: A.law_surge(v, 0.0, math.log(128)), x[1]) == pytest.approx(0.0, abs=1e-6)
    assert surge[1] == pytest.approx(0.0) and surge[0] < 0 and surge[2] < 0  # rises, peaks, falls
    assert sat[0] < sat[1] < sat[2] < 0


def test_weighted_law_fit_and_weights_from_vertex_ses():
    theta, sd = TRUTH["surge"]
    se = np.full(7, sd)
    res = A.fit_laws(points("surge", theta, sd, se=se))
    assert res["weighted"] and res["models"]["surge"]["weighted"]
    assert res["selected"] == "surge"


def test_three_laws_need_three_points():
    res = A.fit_laws(points("power", *TRUTH["power"], b=np.array([32, 64])))
    assert res["status"] == "not enough points" and res["selected"] is None


def test_the_pipeline_picks_surge_from_a_loss_grid_with_seeds():
    """Loss grids (quadratic in ln LR, 2 seeds) around a surge-law optimum → vertex estimates with SEs →
    weighted fits → surge selected; censored nothing; the argmin estimator's law comparison uses the
    vertices too."""
    rng = np.random.default_rng(1)
    theta = (math.log(1e-2), math.log(128))
    rows = []
    for b in B7:
        lo = float(A.law_surge(math.log(b), *theta))
        for k in range(-3, 4):
            x = lo + 0.5 * k + 0.2
            for s in (0, 1):
                rows.append(dict(run_id=f"{b}-{k}-{s}", phase="syn", batch_size=int(b), lr=math.exp(x), grad_clip=1.0,
                                 seed=s, status="FINISHED", diverged=False, learned=True, budget_kind="steps",
                                 budget=300, final_val_loss=2.0 + 0.2 * (x - lo) ** 2 + rng.normal(0, 0.002)))
    res = A.analyze(pd.DataFrame(rows), estimator="vertex")["phases"][0]
    assert all(o["vertex_status"] == "ok" and o["vertex_log_se"] > 0 for o in res["optima"])
    assert res["fits"]["all"]["weighted"] and res["laws"]["weighted"]
    assert res["laws"]["selected"] == "surge", res["laws"]["verdict"]
    bn = res["laws"]["models"]["surge"]["params"]["B_noise"]
    assert bn["ci"][0] <= 128 <= bn["ci"][1]
    by_argmin = A.analyze(pd.DataFrame(rows), estimator="argmin")["phases"][0]
    assert by_argmin["laws"]["uses"] == "vertex estimates" and by_argmin["laws"]["selected"] == "surge"
