"""Simulated sweeps for testing scaling.analysis against a known truth (seeded, vectorised).

A sweep of ``replicates`` independent phases ("sim0", "sim1", ...), each a full grid of batch sizes
× LRs × seeds whose final loss is a curve in ln LR around a known optimum:

    loss = 2 + κ·linex(ln LR − ln LR_opt(B)) + o(B, seed) + ε,   ln LR_opt(B) = law(ln B) + u_B

``linex(d) = 2(e^{ρd} − 1 − ρd)/ρ²`` (≈ d² near the optimum, steeper towards high LRs, as losses
are), ``o`` a seed's shared loss offset at a batch size (init and data order), ``ε`` run noise,
``u_B ~ N(0, τ²)`` the scatter of the optima around the law. The law's level is drawn per replicate
(uniform over ``offset_range``), so the optima fall anywhere within the grid's cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from scaling import analysis as A


@dataclass
class Sweep:
    batch_sizes: tuple = (16, 32, 64, 128, 256, 512, 1024)
    lrs: tuple = tuple(3e-5 * 2.0 ** k for k in range(8))
    seeds: int = 3
    law: str = "power"
    theta: tuple = (0.0, 0.8)  # the law's parameters (logs for C / eps_max / B_noise); the level is re-drawn
    tau: float = 0.1  # scatter of ln LR_opt around the law
    kappa: float = 0.06  # curvature of the loss in ln LR (nats per (ln LR)^2)
    rho: float = 0.5  # asymmetry of the loss curve
    noise: float = 0.008  # run noise (nats)
    noise_factors: tuple | None = None  # per batch size, times ``noise`` (e.g. runs near unstable LRs); None: 1
    seed_sd: float = 0.02  # a seed's shared offset at a batch size (nats)
    offset_range: tuple = (-0.35, 0.35)  # law level around the grid's centre (ln LR)


def truth_log_lr(sweep: Sweep, level: np.ndarray) -> np.ndarray:
    """ln LR_opt per replicate and batch size on the law (before the scatter u), its middle batch
    size's optimum placed at the grid's centre + ``level``."""
    x = np.log(np.asarray(sweep.batch_sizes, float))
    fn = A.LAWS[sweep.law][0]
    base = fn(x, *sweep.theta)
    centre = 0.5 * (np.log(sweep.lrs[0]) + np.log(sweep.lrs[-1]))
    return base[None, :] - base[len(x) // 2] + centre + level[:, None]


def simulate(sweep: Sweep, replicates: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """(runs table of ``replicates`` phases, true ln LR_opt on the law per replicate × batch size)."""
    rng = np.random.default_rng(seed)
    nb, nl, ns = len(sweep.batch_sizes), len(sweep.lrs), sweep.seeds
    level = rng.uniform(*sweep.offset_range, replicates)
    law = truth_log_lr(sweep, level)
    opt = law + rng.normal(0, sweep.tau, (replicates, nb))
    d = np.log(np.asarray(sweep.lrs))[None, None, :, None] - opt[:, :, None, None]
    r = sweep.rho
    curve = 2 * (np.exp(r * d) - 1 - r * d) / r ** 2 if r else d * d
    loss = (2.0 + sweep.kappa * curve + rng.normal(0, sweep.seed_sd, (replicates, nb, 1, ns))
            + rng.normal(0, sweep.noise, (replicates, nb, nl, ns))
            * np.asarray(sweep.noise_factors or (1.0,) * nb, float)[None, :, None, None])
    rep, bi, li, si = np.meshgrid(np.arange(replicates), np.arange(nb), np.arange(nl), np.arange(ns), indexing="ij")
    runs = pd.DataFrame({
        "phase": np.char.add("sim", rep.ravel().astype(str)), "batch_size": np.asarray(sweep.batch_sizes)[bi.ravel()],
        "lr": np.asarray(sweep.lrs)[li.ravel()], "seed": si.ravel(), "final_val_loss": loss.ravel(),
        "status": "FINISHED", "diverged": False, "learned": True, "grad_clip": 1.0,
        "budget_kind": "steps", "budget": 1000.0})
    runs["run_id"] = np.arange(len(runs)).astype(str)
    return runs, law


def fitted(runs: pd.DataFrame, estimator: str = "vertex", loo: bool = False) -> list[dict]:
    """The real pipeline on every simulated phase: optima (one call for all), then each phase's fits."""
    norm = A.normalize_runs(runs)
    optima = A.optimum_table(norm)
    out = []
    for phase, g in optima.groupby("phase", sort=False):
        pts = A.estimate_points(g, estimator)
        out.append({"phase": phase, "points": pts, **A.fit_series(pts, estimator, loo=loo)})
    out.sort(key=lambda d: int(d["phase"][3:]))
    return out
