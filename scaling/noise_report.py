"""The "gradient noise" section of ``scaling compare``: the slope of LR_opt(B) that the gradient noise
measured in a phase's own runs predicts (:mod:`scaling.theory`), set beside the β fitted to its optima.

:class:`NoiseSection` is the per-phase analysis :func:`scaling.analysis.analyze` calls (its
``sections`` slot): a phase whose runs carry ``b_noise`` gets the section, one without gets none.
It reads B_noise over training from the metric histories of the runs near the optima only
(:class:`HistoryReader`, one query on a SQL store). :func:`render_lines` writes the section as text,
with a sentence per prediction saying whether it agrees with the measurement. The JSON fields are in
docs/compare-schema.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scaling import analysis, runs_table, theory

SECTION = "gradient_noise"
#: Run summary metrics the section reads (docs/run-schema.md); ``tail_index_alpha`` is read by the analysis.
NOISE_METRICS = ("b_noise", "b_noise_median", "b_noise_adam")
#: The logged metric whose history gives B_noise over training.
HISTORY_METRIC = "gns_b_simple"
#: Each law of :data:`scaling.theory.LAWS` as :func:`scaling.analysis.fit_laws` fits it to the optima.
FITTED_LAW = {"sgd": "saturating_a1", "adam_sqrt": "saturating_a1_2", "surge": "surge"}

#: (run ids, metric) → DataFrame with columns run_id, step, value.
HistoryFn = Callable[[list[str], str], pd.DataFrame]


@dataclass
class HistoryReader:
    """Metric histories from an MLflow store (``client``), as :data:`HistoryFn`."""
    client: Any

    def __call__(self, run_ids: list[str], key: str) -> pd.DataFrame:
        pts = runs_table.fetch_metric_history(self.client, run_ids, key)
        return pd.DataFrame([(p.run_id, p.step, p.value) for p in pts], columns=["run_id", "step", "value"])


def has_noise(runs: pd.DataFrame) -> bool:
    """Whether any run measured its gradient noise (a positive ``b_noise``)."""
    if "b_noise" not in runs:
        return False
    v = pd.to_numeric(runs["b_noise"], errors="coerce")
    return bool((np.isfinite(v) & (v > 0)).any())


@dataclass
class NoiseSection:
    """The section for one phase (or clip series): ``section(runs, result)`` → dict or None.

    ``histories``: reads metric histories (None: no B_noise over training); ``window``: the runs within
    this many LR grid steps of each optimum count as "near" it; ``bins``: the fractions of training
    B_noise over training is reported at."""
    histories: HistoryFn | None = None
    window: int = 1
    bins: int = 10

    def __call__(self, runs: pd.DataFrame, res: dict[str, Any]) -> dict[str, Any] | None:
        if not has_noise(runs):
            return None
        optima = pd.DataFrame(res["optima"]).assign(phase=res["phase"])
        measured = measured_beta(res)
        rep = theory.theory_report(runs, optima, measured["beta"], measured["beta_ci"], self.window,
                                   batch_sizes=measured["batch_sizes"] or None)
        for row in rep["predictions"]:
            row["fitted_law"] = fitted_b_noise(res, row["name"], rep["b_noise"].get("median"))
        rep.update(unit="sequences", measured=measured, over_training=self.over_training(runs, optima))
        rep["statements"] = statements(rep)
        return rep

    def over_training(self, runs: pd.DataFrame, optima: pd.DataFrame) -> dict[str, Any] | None:
        """B_noise at each fraction of training: median and quartiles over the finished runs near the optima."""
        if self.histories is None:
            return None
        near = theory.runs_near_optima(runs, optima, self.window)
        near = near[near["status"].eq("FINISHED") & ~near["diverged"].astype(bool)]
        if not len(near):
            return None
        hist = self.histories(near["run_id"].astype(str).tolist(), HISTORY_METRIC)
        binned = theory.by_fraction_of_training(hist, self.bins)
        if not len(binned):
            return None
        b_of = dict(zip(near["run_id"].astype(str), near["batch_size"].astype(int)))
        binned["batch_size"] = binned["run_id"].map(b_of)
        return {"metric": HISTORY_METRIC, "x": "fraction of each run's steps", "bins": self.bins,
                "n_runs": int(binned["run_id"].nunique()),
                "points": _records(theory.b_noise_over_training(binned, x="fraction")),
                "by_batch": [{"batch_size": int(b), "points": _records(theory.b_noise_over_training(g, x="fraction"))}
                             for b, g in binned.groupby("batch_size")]}


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"fraction": float(r["fraction"]), "median": float(r["median"]), "q25": float(r["q25"]),
             "q75": float(r["q75"]), "n": int(r["n"])} for _, r in df.iterrows()]


def measured_beta(res: dict[str, Any]) -> dict[str, Any]:
    """The phase's β to compare with: its headline fit (:func:`scaling.analysis.headline_fit`)."""
    head = analysis.headline_fit(res)
    if head is None:
        statuses = {k: f["status"] for k, f in res["fits"].items()}
        return {"fit": None, "beta": None, "beta_ci": None, "batch_sizes": [], "status": statuses}
    kind, f = head
    return {"fit": kind, "beta": f["beta"], "beta_ci": list(f["beta_ci"]), "batch_sizes": list(f["batch_sizes"]),
            "status": "ok", "confidence": f.get("confidence")}


def fitted_b_noise(res: dict[str, Any], law: str, measured: float | None) -> dict[str, Any] | None:
    """The B_noise of the same law fitted to the optima (its Wald interval), and whether the measured
    B_noise lies inside it; None when that law was not fitted."""
    name = FITTED_LAW.get(law)
    m = (res["laws"].get("models") or {}).get(name) if name else None
    if not m or m.get("status") != "ok" or "B_noise" not in m.get("params", {}):
        return None
    p = m["params"]["B_noise"]
    ci = p.get("ci")
    inside = None
    if measured is not None and ci and all(v is not None and math.isfinite(v) for v in ci):
        inside = bool(ci[0] <= measured <= ci[1])
    return {"name": name, "b_noise": p["value"], "b_noise_ci": ci, "at_bound": bool(m.get("at_bound")),
            "measured_inside": inside}


# ---------------------------------------------------------------------------------------------
# Words


def _g(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _ci(ci, fmt=_f) -> str:
    return "-" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _spread(q: dict[str, Any]) -> str:
    return f"{_g(q.get('median'))} [{_g(q.get('q25'))}, {_g(q.get('q75'))}]"


def _prediction_sentence(row: dict[str, Any], measured: dict[str, Any], measured_b_noise: float | None) -> str:
    name = "1 - 1/alpha" if row["name"] == "tail_index" else f"the {row['name']} law"
    s = f"{row['name']}: {name} predicts beta = {_f(row['beta'])}"
    if row.get("beta_grid") is not None:
        s += f" (grid slope {_f(row['beta_grid'])})"
    if row["consistent"] is None:
        fits = ", ".join(f"{k} {v}" for k, v in measured["status"].items()) if measured["fit"] is None else ""
        s += (f"; no measured beta to set it beside (fits: {fits})." if measured["fit"] is None
              else "; the measured interval is unbounded, so nothing is tested.")
    else:
        where = "inside" if row["consistent"] else ("below" if row["beta"] < row["beta_ci"][0] else "above")
        verdict = f"the predicted and measured beta {'agree' if row['consistent'] else 'disagree'}"
        s += (f", {where} the measured {measured['fit']} fit's interval {_ci(row['beta_ci'])} "
              f"(beta = {_f(measured['beta'])}): {verdict}.")
    fl = row.get("fitted_law")
    if fl:
        inside = fl["measured_inside"]
        s += (f" Fitted to the optima, {fl['name']} puts B_noise at {_g(fl['b_noise'])} "
              f"{_ci(fl['b_noise_ci'], _g)}{' (at a bound)' if fl['at_bound'] else ''}"
              + ("." if inside is None else f"; the measured {_g(measured_b_noise)} lies "
                 f"{'inside' if inside else 'outside'} it: on B_noise they {'agree' if inside else 'disagree'}."))
    return s


def statements(rep: dict[str, Any]) -> list[str]:
    """A sentence per prediction (agrees with the measured β or not), and one when the interval holds all."""
    rows = [r for r in rep["predictions"] if r["beta"] is not None]
    out = [_prediction_sentence(r, rep["measured"], rep["b_noise"].get("median")) for r in rows]
    tested = [r for r in rows if r["consistent"] is not None]
    if len(tested) > 1 and all(r["consistent"] for r in tested):
        out.append("The measured interval holds every prediction: this measurement cannot tell the laws apart.")
    elif tested and not any(r["consistent"] for r in tested):
        out.append("No prediction from the measured gradient noise falls inside the measured interval.")
    return out


def _over_training_line(ot: dict[str, Any] | None) -> str:
    if not ot:
        return "B_noise over training: no metric history read"
    pts = "; ".join(f"{p['fraction']:.2g}: {_spread(p)}" for p in ot["points"])
    return f"B_noise over training ({ot['n_runs']} runs, fraction of each run's steps: median [IQR]): {pts}"


def _law_line(row: dict[str, Any]) -> str:
    per = ", ".join(f"{b}: {_f(v)}" for b, v in (row["per_batch"] or {}).items())
    return (f"{row['name']} ({theory.LAWS[row['name']][2]}): local slope at B = {per}; mean {_f(row['beta'])} "
            f"({_f((row['beta_range'] or [None])[0])}..{_f((row['beta_range'] or [None, None])[1])} at B_noise's "
            f"quartiles), grid slope {_f(row['beta_grid'])}")


def render_lines(section: dict[str, Any], ph: dict[str, Any]) -> list[str]:
    """The section as text lines (:data:`scaling.report.PHASE_SECTIONS`)."""
    bn, m, tail = section["b_noise"], section["measured"], section.get("tail_index")
    lines = [(f"gradient noise (B_simple in sequences; median [IQR] over the {bn['n']} runs within "
              f"{bn['window']} LR step(s) of each optimum): B_noise at the end {_spread(bn)}; median over the "
              f"second half {_spread(section['b_noise_median'])}; Adam-preconditioned at the end "
              f"{_spread(section['b_noise_adam'])}"),
             ("B_noise at the end by batch size: " + "; ".join(f"B={r['batch_size']} {_spread(r)} (n {r['n']})"
                                                              for r in bn["by_batch"])),
             _over_training_line(section.get("over_training")),
             (f"measured: beta = {_f(m['beta'])} {_ci(m['beta_ci'])} ({m['fit'] or 'no'} fit, B = "
              f"{', '.join(map(str, m['batch_sizes'])) or '-'}); predicted from B_noise = {_g(bn['median'])} alone:")]
    lines += [_law_line(r) for r in section["predictions"] if r["name"] in theory.LAWS and r["beta"] is not None]
    if tail and tail.get("alpha") is not None:
        lines.append(f"tail index: alpha {_g(tail['alpha'])} [{_g(tail['alpha_q25'])}, {_g(tail['alpha_q75'])}] "
                     f"(median [IQR] over {tail['n']} runs) -> 1 - 1/alpha = {_f(tail['beta'])} "
                     f"{_ci(tail['beta_range'])}")
    return lines + section["statements"]


__all__ = ["FITTED_LAW", "HISTORY_METRIC", "NOISE_METRICS", "SECTION", "HistoryFn", "HistoryReader",
           "NoiseSection", "fitted_b_noise", "has_noise", "measured_beta", "render_lines", "statements"]
