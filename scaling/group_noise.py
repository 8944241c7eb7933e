"""Gradient noise of the models of a batched group (:mod:`scaling.batched`), as :mod:`scaling.noise` measures it
for one model.

A measurement takes, for models that share a micro-batch count k (same batch size B, same micro-batch b),
the gradients of their k micro-batches each, chunk by chunk — a chunk is some models × some of their
micro-batches, per-slot gradients of shape (models · micro-batches, *param_shape) — and folds each chunk into
the per-model sums the estimators need before the next chunk is made:

- Σ_k Σ_params w·g_k² per weighting w (plain, Adam's P, P²: :data:`scaling.noise.WEIGHTINGS`), float64;
- Σ_k g_k per parameter (float64), for |ḡ|² and its weighted forms at the end;
- with the tail index, the micro-batch gradients of each tensor's :func:`~scaling.noise.tail_columns`.

So the memory a measurement holds is one chunk of gradients plus (models × parameters) sums, whatever B.
The estimates are :func:`scaling.noise.gns_from_moments` of those sums, the tail index
:func:`scaling.noise.tail_alphas` with the keys :func:`scaling.noise.tail_keys` draws from each model's
seed and step: the numbers a model's :class:`~scaling.noise.NoiseTracker` gets are those of
:func:`scaling.noise.microbatch_stats` for it alone, up to summation order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from scaling.noise import WEIGHTINGS, adam_preconditioner, gns_from_moments, tail_alphas, tail_columns, tail_keys

#: Cap on one chunk's per-micro-batch gradients (bytes); the gathered weights of the chunk take as much again.
CHUNK_BYTES = 2 ** 31
#: The seed of a measurement's tail-index keys: ``seed * SEED_STRIDE + step`` (as train.py's measurement).
SEED_STRIDE = 1_000_003


def chunk_plan(n_models: int, k: int, slots: int) -> list[tuple[int, int, int, int]]:
    """Chunks ``(m0, m1, lo, hi)`` — models [m0, m1) × micro-batches [lo, hi) — of at most ``slots`` micro-batch
    gradients (at least 2), covering n_models × k: whole models where k fits, else each model in near-equal
    pieces (a compiled pass gets few distinct sizes and no size-1 dimension)."""
    slots = max(2, slots)
    if k <= slots:
        per = slots // k
        return [(m, min(m + per, n_models), 0, k) for m in range(0, n_models, per)]
    pieces = math.ceil(k / slots)
    cuts = [round(i * k / pieces) for i in range(pieces + 1)]
    return [(m, m + 1, lo, hi) for m in range(n_models) for lo, hi in itertools.pairwise(cuts)]


@dataclass
class GroupSums:
    """The running sums of one measurement of ``n`` models with ``k`` micro-batches of ``microbatch``
    sequences each, one row per model: ``micro`` (n, weightings) Σ_k Σ_params w·g_k², ``total`` per tensor
    (n, numel) Σ_k g_k, ``weights`` per Adam weighting per tensor (n, numel) (none before Adam's first step:
    ``adam_rows`` says which models have taken one), ``cols`` / ``samples`` per tensor the tail columns and
    their gradients (n, k, |cols|), or None."""

    k: int
    microbatch: int
    micro: torch.Tensor
    total: list[torch.Tensor]
    weights: dict[str, list[torch.Tensor]]
    adam_rows: list[bool]
    cols: list[torch.Tensor] | None
    samples: list[torch.Tensor] | None

    @classmethod
    def start(cls, v_views: list[torch.Tensor], steps: list[int], beta2: float, eps: float, k: int,
              microbatch: int, tail: bool) -> GroupSums:
        """``v_views``: per tensor the models' AdamW second moments (n, *shape); ``steps``: the optimizer
        steps each model has taken."""
        n, dev = len(steps), v_views[0].device
        weights: dict[str, list[torch.Tensor]] = {}
        if any(steps):
            t = torch.tensor([max(s, 1) for s in steps], dtype=torch.float64, device=dev)
            p = [adam_preconditioner(v.flatten(1), t[:, None], beta2, eps).to(v.dtype) for v in v_views]
            weights = {"adam": p, "adam_update": [q * q for q in p]}
        cols = [tail_columns(v[0].numel(), k).to(dev) for v in v_views] if tail else None
        return cls(k=k, microbatch=microbatch,
                   micro=torch.zeros(n, 1 + len(weights), dtype=torch.float64, device=dev),
                   total=[torch.zeros(n, v[0].numel(), dtype=torch.float64, device=dev) for v in v_views],
                   weights=weights, adam_rows=[s > 0 for s in steps], cols=cols,
                   samples=None if cols is None else
                   [torch.zeros(n, k, len(c), dtype=torch.float64, device=dev) for c in cols])

    def add(self, m0: int, m1: int, lo: int, grads: list[torch.Tensor]) -> None:
        """Fold in the gradients of micro-batches [lo, lo + kc) of models [m0, m1): ``grads[i]`` is tensor
        i's, ((m1 - m0) · kc, *shape), model-major."""
        ws = list(self.weights.values())
        for i, g in enumerate(grads):
            g = g.reshape(m1 - m0, -1, self.total[i].shape[1])
            sq = g.square()
            self.micro[m0:m1, 0] += sq.sum((1, 2), dtype=torch.float64)
            for j, w in enumerate(ws):
                self.micro[m0:m1, 1 + j] += (sq * w[i][m0:m1, None, :]).sum((1, 2), dtype=torch.float64)
            self.total[i][m0:m1] += g.sum(1, dtype=torch.float64)
            if self.samples is not None:
                self.samples[i][m0:m1, lo:lo + g.shape[1]] = g.index_select(2, self.cols[i]).double()

    def estimates(self) -> list[dict[str, float]]:
        """Per model ``grad_sq<sfx>`` / ``trace<sfx>`` per weighting, as ``MicrobatchStats.estimates`` (the
        Adam forms once the model's AdamW has taken a step)."""
        mean_sq = [sum((t / self.k).square().sum(1) for t in self.total)]
        for w in self.weights.values():
            mean_sq.append(sum(((t / self.k).square() * q).sum(1) for t, q in zip(self.total, w)))
        g, tr = gns_from_moments(self.micro / self.k, torch.stack(mean_sq, 1), self.k, self.microbatch)
        g, tr = g.tolist(), tr.tolist()
        out = []
        for r, adam in enumerate(self.adam_rows):
            est = {}
            for j, sfx in enumerate(list(WEIGHTINGS.values())[:1 + len(self.weights) * adam]):
                est["grad_sq" + sfx], est["trace" + sfx] = g[r][j], tr[r][j]
            out.append(est)
        return out

    def alphas(self, seeds: list[int]) -> np.ndarray | None:
        """Per model its tensors' α̂ (n, L), the permutations drawn from ``seeds`` (one per model); None
        without the tail index."""
        if self.samples is None:
            return None
        keys = tail_keys(seeds, [(self.k // 2) * len(c) for c in self.cols], self.micro.device)
        return tail_alphas(self.samples, keys).cpu().numpy()
