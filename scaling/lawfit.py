"""Loss against model size: fits of L(N) = (N_c / N)^α and L(N) = E + (N_c / N)^α (pure numpy / scipy).

Both are fitted by least squares on ln L (the error of a loss is multiplicative: its spread grows with
it), parameters θ = (α, c = ln N_c) and (E, α, c). What guards the fit against the known failures of
scaling-law fits (Besiroglu et al. 2024 found a published fit that had stopped before converging and
intervals too narrow to be right):

* **several starts**: the fit is repeated from a grid of starting points; the result is the best, and
  the report says how many starts reached it (``n_agree`` of ``n_starts``: within 1e-6 relative RSS
  and 1e-3 relative in every parameter) and whether the optimizer said it converged there;
* **bounds**: α in [1e-3, 5], E in [0, min L) (the law needs L > E), c in [−500, 500]; a parameter
  that ends on a bound is listed in ``at_bound`` (e.g. E = 0: the data show no floor);
* **intervals from the profile likelihood, F-calibrated**: for each parameter, the values v where the
  residual sum of squares minimised over the others stays within ``RSS_min (1 + F(1, n−k) / (n−k))`` —
  exact for the pure power law (linear in ln N: it equals the t interval of the slope), approximate
  for the form with a floor. An interval that reaches a bound before crossing is open on that side
  (``ci_open``): the data do not bound the parameter there. Nothing here assumes a symmetric interval.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

FORMS = {"power": ("alpha", "log_nc"), "power_floor": ("E", "alpha", "log_nc")}
ALPHA_BOUNDS = (1e-3, 5.0)
LOG_NC_BOUNDS = (-500.0, 500.0)
AGREE_RSS, AGREE_PARAM = 1e-6, 1e-3


def predict(form: str, theta, log_n: np.ndarray) -> np.ndarray:
    """ln L at ln N."""
    log_n = np.asarray(log_n, float)
    if form == "power":
        alpha, c = theta
        return alpha * (c - log_n)
    e, alpha, c = theta
    return np.log(e + np.exp(alpha * (c - log_n)))


def _bounds(form: str, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [ALPHA_BOUNDS[0], LOG_NC_BOUNDS[0]], [ALPHA_BOUNDS[1], LOG_NC_BOUNDS[1]]
    if form == "power_floor":
        lo, hi = [0.0, *lo], [float(np.exp(y.min())) * (1 - 1e-9), *hi]
    return np.array(lo), np.array(hi)


def _starts(form: str, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """A grid of starting points: α spread over two decades, E over [0, 0.9 min L), c through the data."""
    lmin, xm = float(np.exp(y.min())), float(x.mean())
    lmid = float(np.exp(y.mean()))
    out = []
    floors = [0.0] if form == "power" else [0.0, 0.25 * lmin, 0.5 * lmin, 0.75 * lmin, 0.9 * lmin]
    for e, alpha in itertools.product(floors, (0.03, 0.1, 0.3, 1.0)):
        c = xm + math.log(max(lmid - e, 1e-12)) / alpha
        c = min(max(c, LOG_NC_BOUNDS[0] + 1), LOG_NC_BOUNDS[1] - 1)
        out.append(np.array([alpha, c] if form == "power" else [e, alpha, c]))
    return out


@dataclass
class _Problem:
    form: str
    x: np.ndarray  # ln N
    y: np.ndarray  # ln L
    lo: np.ndarray
    hi: np.ndarray
    max_nfev: int | None = None

    def rss(self, theta) -> float:
        return float(np.sum((self.y - predict(self.form, theta, self.x)) ** 2))

    def solve(self, start, fixed: int | None = None, value: float | None = None, tol: float = 1e-12):
        """Least squares from ``start``; with ``fixed``, parameter ``fixed`` held at ``value`` (a profile)."""
        free = [j for j in range(len(start)) if j != fixed]

        def full(z):
            th = np.empty(len(start))
            th[free] = z
            if fixed is not None:
                th[fixed] = value
            return th

        if self.form == "power" and self.max_nfev is None:
            exact = self._power_exact(fixed, value)
            if exact is not None:
                return exact, _Exact()
        z0 = np.clip(np.asarray(start, float)[free], self.lo[free], self.hi[free])
        res = optimize.least_squares(lambda z: self.y - predict(self.form, full(z), self.x), z0,
                                     bounds=(self.lo[free], self.hi[free]), method="trf", x_scale="jac",
                                     max_nfev=self.max_nfev, xtol=tol, ftol=tol, gtol=tol)
        return full(res.x), res


    def _power_exact(self, fixed: int | None, value: float | None) -> np.ndarray | None:
        """The power law is linear in ln N: ln L = α c − α ln N. Its least squares in closed form (the
        fit, and each profile), or None when that lands outside the bounds (least squares then)."""
        x, y = self.x, self.y
        if fixed is None:
            slope, intercept = np.polyfit(x, y, 1)
            alpha = -slope
            theta = np.array([alpha, intercept / alpha]) if alpha > 0 else None
        elif fixed == 0:  # α given: c = mean(ln N + ln L / α)
            theta = np.array([value, float(np.mean(x + y / value))])
        else:  # c given: α = Σ y (c − x) / Σ (c − x)²
            d = value - x
            theta = np.array([float(d @ y / (d @ d)), value])
        if theta is None or np.any(theta < self.lo) or np.any(theta > self.hi):
            return None
        return theta


class _Exact:
    """What least_squares reports, for a closed-form solution."""

    status = 1


def _agree(a: np.ndarray, b: np.ndarray, rss_a: float, rss_b: float) -> bool:
    close_rss = abs(rss_a - rss_b) <= AGREE_RSS * max(rss_b, 1e-300) + 1e-300
    return close_rss and bool(np.all(np.abs(a - b) <= AGREE_PARAM * np.maximum(np.abs(b), 1e-3)))


def fit(n_params, losses, form: str = "power", confidence: float = 0.95, max_nfev: int | None = None,
        intervals: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Fit ``form`` (:data:`FORMS`) to (N, L) points; JSON-ready dict (see the module docstring).
    ``intervals``: the parameters to profile (default all); ``max_nfev``: the optimizer's evaluation limit
    per start (default none; the power law is then solved in closed form)."""
    names = FORMS[form]
    x, y = np.log(np.asarray(n_params, float)), np.log(np.asarray(losses, float))
    n, k = len(x), len(names)
    out: dict[str, Any] = {"form": form, "n_points": n, "k": k, "method": "least squares on ln L",
                           "interval": "profile likelihood, F-calibrated", "confidence": confidence}
    if n < k + 1:
        return {**out, "status": "not enough points", "reason": f"{n} sizes for {k} parameters (needs {k + 1})"}
    if not np.all(np.isfinite(y)):
        return {**out, "status": "not enough points", "reason": "a loss is not finite and positive"}
    lo, hi = _bounds(form, y)
    prob = _Problem(form, x, y, lo, hi, max_nfev)
    tries = []
    for s in _starts(form, x, y):
        theta, res = prob.solve(s)
        tries.append((prob.rss(theta), theta, res))
    rss, theta, res = min(tries, key=lambda t: t[0])
    n_agree = sum(_agree(t, theta, r, rss) for r, t, _ in tries)
    at_bound = [_public(names[j]) for j in range(k) if min(theta[j] - lo[j], hi[j] - theta[j])
                <= 1e-6 * max(1.0, abs(theta[j]))]
    dof = n - k
    out.update(status="ok", n_starts=len(tries), n_agree=n_agree, optimizer_converged=bool(res.status > 0),
               converged=bool(res.status > 0 and n_agree >= 2), at_bound=at_bound, dof=dof, rss=rss,
               rmse_log=math.sqrt(rss / n), aicc=_aicc(rss, n, k), theta=[float(v) for v in theta])
    out["params"] = _params(prob, theta, rss, dof, confidence, names, intervals)
    return out


def _public(name: str) -> str:
    """A parameter's name in the report (N_c, not the ln N_c the optimizer moves)."""
    return "N_c" if name == "log_nc" else name


def _aicc(rss: float, n: int, k: int) -> float | None:
    K = k + 1  # σ counted
    if n - K - 1 <= 0:
        return None
    return n * math.log(max(rss, 1e-300) / n) + 2 * K + 2 * K * (K + 1) / (n - K - 1)


def _params(prob: _Problem, theta: np.ndarray, rss: float, dof: int, confidence: float, names,
            intervals: tuple[str, ...] | None = None) -> dict:
    """Each parameter's value and profile interval, on its natural scale (N_c, not ln N_c). ``ci_open``
    marks an end where the profile reached the parameter's bound first: the interval goes on to the
    bound given there (the data do not bound it)."""
    out = {}
    for j, name in enumerate(names):
        wanted = dof > 0 and (intervals is None or name in intervals or name == "log_nc" and "N_c" in intervals)
        (lo, open_lo), (hi, open_hi) = profile_interval(prob, theta, rss, dof, j, confidence) if wanted else \
            ((None, True), (None, True))
        entry = {"value": float(theta[j]), "ci": [lo, hi], "ci_open": [open_lo, open_hi]}
        if name == "log_nc":
            entry = {"value": _exp(theta[j]), "ci": [None if v is None else _exp(v) for v in (lo, hi)],
                     "ci_open": [open_lo, open_hi], "log_value": float(theta[j]), "log_ci": [lo, hi]}
        out[_public(name)] = entry
    return out


def _exp(v: float) -> float:
    return math.exp(v) if v < 709 else math.inf


def profile_interval(prob: _Problem, theta: np.ndarray, rss: float, dof: int, j: int,
                     confidence: float) -> list[tuple[float, bool]]:
    """The two ends (value, open) where the profile RSS of parameter ``j`` crosses ``rss (1 + F / dof)``;
    an end is open, at the parameter's bound, when the bound comes first."""
    threshold = rss * (1 + stats.f.ppf(confidence, 1, dof) / dof) + 1e-300
    warm = {"start": theta}

    def excess(v: float) -> float:
        th, _ = prob.solve(warm["start"], fixed=j, value=v, tol=1e-10)
        if not np.isclose(warm["start"][j], theta[j]):  # from the optimum too: the better of the two
            th = min((th, prob.solve(theta, fixed=j, value=v, tol=1e-10)[0]), key=prob.rss)
        warm["start"] = th
        return prob.rss(th) - threshold

    ends = []
    for direction in (-1, 1):
        warm["start"] = theta
        ends.append(_crossing(excess, float(theta[j]), direction, float(prob.lo[j]), float(prob.hi[j])))
    return ends


def _crossing(excess, v0: float, direction: int, lo: float, hi: float) -> tuple[float, bool]:
    """(v, False): the first v from v0 towards ``direction`` with excess(v) = 0 (steps that double); or
    (bound, True) when the bound is reached first."""
    bound = lo if direction < 0 else hi
    step = max(abs(v0) * 0.01, 1e-4)
    prev = v0
    for _ in range(80):
        v = v0 + direction * step
        if (v - bound) * direction >= 0:
            v = bound
        e = excess(v)
        if e > 0:
            a, b = sorted((prev, v))
            return float(optimize.brentq(excess, a, b, xtol=1e-7 * max(1e-3, abs(v0)), rtol=1e-7)), False
        if v == bound:
            return bound, True
        prev, step = v, step * 2
    return prev, True


def kaplan_reference(alpha: float = 0.076) -> dict[str, Any]:
    """What the plan expected: Kaplan et al. (2020)'s α_N ≈ 0.076, i.e. L(2N)/L(N) = 2^−α."""
    return {"alpha": alpha, "loss_ratio_per_doubling": 2 ** -alpha, "source": "Kaplan et al. 2020, L(N)"}
