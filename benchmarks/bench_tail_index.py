"""Simulation: the bias of the tail-index pipeline against the number K of micro-batches.

K micro-batch "gradients" of C coordinates, each coordinate with its own scale (log-normal) and mean,
drawn Gaussian (α = 2) or symmetric α-stable (scipy's ``levy_stable``). Three ways to estimate α from
them, all with blocks of √N samples after a permutation:

- ``scaling``: :func:`scaling.noise.layer_tail_index` (pair differences, leave-one-out geometric-mean
  scale per coordinate, the scale-noise correction);
- ``centred``: noise = g_k − mean_k g_k, standardised per coordinate the same way, no correction;
- ``pooled``: noise = g_k − mean_k g_k, all coordinates pooled unstandardised (the study's offline way).

Prints the mean ± SD of α̂ over ``--reps`` draws per cell.

  python benchmarks/bench_tail_index.py                 # K = 8..256, α = 2, 1.8, 1.5, 1.2 (~1 min on CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from scipy.stats import levy_stable

from scaling import noise


def centred(g: np.ndarray, rng) -> float:
    x = g - g.mean(0)
    logs = np.log(np.abs(x))
    k = x.shape[0]
    z = x / np.exp((logs.sum(0) - logs) / (k - 1))
    return noise.tail_index(z, rng=rng)


def pooled(g: np.ndarray, rng) -> float:
    return noise.tail_index(g - g.mean(0), rng=rng)


def draw(alpha: float, k: int, c: int, rng) -> np.ndarray:
    scales, means = np.exp(rng.normal(size=c)), rng.normal(0, 3, size=c)
    z = rng.standard_normal((k, c)) if alpha == 2 else levy_stable.rvs(alpha, 0.0, size=(k, c), random_state=rng)
    return z * scales + means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="8,16,32,64,256")
    ap.add_argument("--alphas", default="2,1.8,1.5,1.2")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    methods = {"scaling": noise.layer_tail_index, "centred": centred, "pooled": pooled}
    print(f"{'K':>4} {'alpha':>5} " + " ".join(f"{m:>13}" for m in methods))
    for k in (int(v) for v in args.ks.split(",")):
        c = noise.TAIL_SAMPLES // (k // 2)
        for alpha in (float(v) for v in args.alphas.split(",")):
            est = {m: [] for m in methods}
            for _ in range(args.reps):
                g = draw(alpha, k, c, rng)
                for m, f in methods.items():
                    est[m].append(f(g, rng))
            print(f"{k:>4} {alpha:>5} " + " ".join(f"{np.mean(v):6.3f}±{np.std(v):5.3f}" for v in est.values()))


if __name__ == "__main__":
    main()
