"""Gradient noise measured during training: the noise scale and the tail index, from one step's batch.

**Noise scale** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"). The step's batch of
B sequences is split into K = B / b micro-batches of b sequences; each micro-batch's gradient g_k (of its
mean loss, raw: before clipping, no weight decay) is taken at the same parameters. With S = mean_k |g_k|²
and ḡ = mean_k g_k (= the batch gradient):

    |G|²   ≈ (K·|ḡ|² − S) / (K − 1)             (unbiased: E|g_k|² = |G|² + tr Σ / b, E|ḡ|² = |G|² + tr Σ / (bK))
    tr Σ   ≈ b·K·(S − |ḡ|²) / (K − 1)

Σ is the covariance of one *sequence's* gradient, so B_simple = tr Σ / |G|² is in sequences, the unit of
the batch size the LR fit uses. Tokens of one sequence are not independent samples, so b >= 1 sequence is
the finest split. The two estimates are averaged over measurements *separately* (EMAs) before their ratio
is taken: the ratio of two noisy estimates is biased, and |G|² of one measurement can be negative.
Micro-batches of one step are independent samples at one point of parameter space; gradients of
consecutive optimizer steps are not (the parameters moved in between), so no estimate here uses them.

The same estimators with a diagonal weight P give the Adam forms: ``adam`` weights by P = 1/(√v̂ + ε)
(the noise scale tr(PΣ)/GᵀPG under the curvature model H ∝ P⁻¹ of an adaptive optimizer); ``adam_update``
by P², the noise scale of Adam's update direction Pg (AdaptDL's ``AdamGradientNoiseScale``: |g/(√v̂+ε)|²).

**Tail index** (Mohammadi et al. 2015 as used by Şimşekli et al. 2019): for i.i.d. symmetric α-stable X
and block sums Y of m of them, E ln|Y| − E ln|X| = (1/α) ln m exactly. Samples are taken per parameter
tensor, and made i.i.d. and scale-free first:

- noise samples are *pair differences* g_{2i} − g_{2i+1} of micro-batch gradients: they remove the mean
  gradient exactly, are independent of each other and symmetric, and keep the tail index of g (a difference
  of two i.i.d. α-stable variables is α-stable). Subtracting the step's mean gradient instead ties all K
  samples of a coordinate together (one outlier moves the mean and with it every other sample), which
  reads heavy tails as lighter ones at K <= 64 (``benchmarks/bench_tail_index.py``);
- each coordinate is divided by a leave-one-out geometric-mean scale (exp of the mean ln|x| of its other
  samples), so coordinates of different scales pool into one sample: pooled unstandardised, a Gaussian
  whose coordinates differ in scale reads as α < 2. The scale's own estimation noise makes the sample a
  scale mixture, which biases 1/α̂ up by ≈ α·v/(2 ln m) (v the variance of the log scale); that term is
  removed by solving 1/α + α·v/(2 ln m) = D for α;
- blocks of m = √N samples of a random permutation.

The estimate needs at least :data:`TAIL_MIN_MICROBATCHES` micro-batches (8 pair differences).
:func:`tail_index` / :func:`standardised_pairs` / :func:`layer_tail_index` are the reference (numpy, one
tensor); :func:`tail_alphas` computes the same on the device for many tensors and models at once, which is
what a measurement uses: a group of 72 models has ~2,600 tensors to estimate at every measurement.

Public API (all of it works on plain tensors, so the batched engine can call the estimators with a leading
model dimension): :func:`gns_estimates`, :func:`gns_from_moments`, :func:`squared_norms`,
:func:`adam_preconditioner`, :func:`tail_index`, :func:`standardised_pairs`, :func:`layer_tail_index`,
:func:`tail_columns`, :func:`tail_keys`, :func:`tail_alphas`; :func:`microbatch_gradients` and
:func:`microbatch_stats` for one ``nn.Module``; :class:`NoiseTracker` for the running averages, cadence,
metrics and summary of one run (state_dict-able for checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

#: Per-measurement decay of the EMAs of |G|² and tr Σ (≈ the last 10 measurements).
EMA_DECAY = 0.9
#: Fewest micro-batches a tail-index estimate is made from (8 pair differences; fewer bias it).
TAIL_MIN_MICROBATCHES = 16
#: Samples (pair differences × coordinates) per parameter tensor for its tail index.
TAIL_SAMPLES = 2 ** 16
#: A tensor with fewer usable samples gets no tail index.
TAIL_MIN_SAMPLES = 1024
#: Cap on the per-micro-batch gradients held at once (bytes); the micro-batches are taken in chunks.
MAX_CHUNK_BYTES = 2 ** 28
#: The weightings of the squared norms: metric suffix of each.
WEIGHTINGS = {"plain": "", "adam": "_adam", "adam_update": "_adam_update"}

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Noise-scale estimators (pure, broadcast over leading dimensions: models, tensors)


def gns_estimates(micro_sq, mean_sq, microbatch: int):
    """``(|G|², tr Σ)`` from the squared norms of K micro-batch gradients ``micro_sq`` (last dimension K)
    and the squared norm of their mean ``mean_sq`` (the same shape without K), for micro-batches of
    ``microbatch`` sequences. Any leading dimensions (models, parameter tensors) broadcast; torch tensors
    or numpy arrays. tr Σ is per sequence. Needs K >= 2."""
    return gns_from_moments(micro_sq.mean(-1), mean_sq, micro_sq.shape[-1], microbatch)


def gns_from_moments(micro_mean_sq, mean_sq, k: int, microbatch: int):
    """:func:`gns_estimates` from S = mean_k |g_k|² (``micro_mean_sq``) of k micro-batches instead of the k
    squared norms themselves: what a caller that sums over the micro-batches as they come has."""
    if k < 2:
        raise ValueError(f"the noise scale needs at least 2 micro-batches, got {k}")
    grad_sq = (k * mean_sq - micro_mean_sq) / (k - 1)
    trace = microbatch * k * (micro_mean_sq - mean_sq) / (k - 1)
    return grad_sq, trace


def squared_norms(tensors: Sequence[torch.Tensor], lead: int,
                  weights: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ w·t² of each tensor over all but its first ``lead`` dimensions, stacked on a new last dimension
    (one column per tensor), summed in float64. ``weights[i]`` broadcasts against ``tensors[i]`` (for
    per-micro-batch gradients ``(K_models, K, *shape)`` and a preconditioner ``(K_models, *shape)``, pass
    it unsqueezed at dimension 1)."""
    cols = []
    for i, t in enumerate(tensors):
        sq = t.square()
        if weights is not None:
            sq = sq.mul_(weights[i]) if sq.shape == torch.broadcast_shapes(sq.shape, weights[i].shape) \
                else sq * weights[i]
        cols.append(sq.flatten(lead).sum(-1, dtype=torch.float64))
    return torch.stack(cols, -1)


def adam_preconditioner(exp_avg_sq: torch.Tensor, step, beta2: float, eps: float) -> torch.Tensor:
    """P = 1 / (√v̂ + ε) with v̂ = exp_avg_sq / (1 − β₂^step), as AdamW divides by it (``step``: the
    optimizer steps taken, a number or a tensor that broadcasts, e.g. one per model)."""
    return 1.0 / ((exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps)


# ---------------------------------------------------------------------------------------------
# Tail index


def block_size(n: int) -> int:
    """Block length m for n samples: √n (as many blocks as samples per block)."""
    return max(2, round(math.sqrt(n)))


def tail_index(sample, block: int | None = None, scale_var: float = 0.0,
               rng: np.random.Generator | None = None) -> float:
    """α̂ of Mohammadi et al.'s estimator on a 1-D sample of i.i.d. symmetric values: with blocks of
    ``block`` (default √N) consecutive samples (after a permutation by ``rng``, if given),
    D = (mean ln|block sums| − mean ln|samples|) / ln m = 1/α for α-stable samples. ``scale_var`` > 0
    removes the bias of a sample standardised by noisy scales (see :func:`standardised_pairs`): α solves
    1/α + α·scale_var/(2 ln m) = D. NaN with fewer than 2 blocks or no solution."""
    x = np.asarray(sample, dtype=np.float64).ravel()
    x = x[np.isfinite(x) & (x != 0)]
    if rng is not None:
        x = rng.permutation(x)
    m = block or block_size(len(x))
    k = len(x) // m
    if k < 2:
        return math.nan
    x = x[:k * m]
    y = np.abs(x.reshape(k, m).sum(1))
    y = y[y > 0]
    d = (np.log(y).mean() - np.log(np.abs(x)).mean()) / math.log(m)
    c = scale_var / (2 * math.log(m))
    if c <= 0:
        return 1.0 / d if d > 0 else math.nan
    disc = d * d - 4 * c
    return float((d - math.sqrt(disc)) / (2 * c)) if disc > 0 and d > 0 else math.nan


def standardised_pairs(g) -> tuple[np.ndarray, float]:
    """Scale-free noise samples from K micro-batch gradients ``g`` of shape (K, C) (C coordinates of one
    tensor): the pair differences g_{2i} − g_{2i+1}, each coordinate divided by the geometric mean of its
    other pair differences' magnitudes (leave-one-out, so a sample does not shrink its own scale). Columns
    with a zero difference are dropped. Returns the flat sample and v, the variance of one log scale
    estimate (mean over columns of Var ln|x| / (n − 1)), for :func:`tail_index`'s ``scale_var``."""
    g = np.asarray(g, dtype=np.float64)
    n = g.shape[0] // 2
    if n < 2:
        return np.empty(0), math.nan
    d = g[0:2 * n:2] - g[1:2 * n:2]
    with np.errstate(divide="ignore"):
        logs = np.log(np.abs(d))
    keep = np.isfinite(logs).all(0)
    d, logs = d[:, keep], logs[:, keep]
    if d.shape[1] == 0:
        return np.empty(0), math.nan
    loo = (logs.sum(0) - logs) / (n - 1)
    v = float(logs.var(0, ddof=1).mean() / (n - 1))
    return (d / np.exp(loo)).ravel(), v


def layer_tail_index(g, rng: np.random.Generator) -> float:
    """The tail index of one tensor's gradient noise from K micro-batch gradients ``g`` (K, C): NaN with
    fewer than :data:`TAIL_MIN_MICROBATCHES` micro-batches or :data:`TAIL_MIN_SAMPLES` samples."""
    if np.shape(g)[0] < TAIL_MIN_MICROBATCHES:
        return math.nan
    z, v = standardised_pairs(g)
    if len(z) < TAIL_MIN_SAMPLES:
        return math.nan
    return tail_index(z, scale_var=v, rng=rng)


def tail_columns(numel: int, n_micro: int) -> torch.Tensor:
    """Which coordinates of a tensor of ``numel`` entries feed its tail index: evenly strided, enough for
    :data:`TAIL_SAMPLES` samples from ``n_micro`` micro-batches (no randomness: the RNG stream of training
    is left alone)."""
    c = min(numel, max(1, math.ceil(TAIL_SAMPLES / max(1, n_micro // 2))))
    return torch.linspace(0, numel - 1, c).round().long().unique()


def tail_keys(seeds: Sequence[int], sizes: Sequence[int], device) -> list[torch.Tensor]:
    """The random sort keys of :func:`tail_alpha_rows`'s permutations: per model (one seed each) one float64
    stream from its own generator on ``device``, cut into one piece per tensor (``sizes``: pair differences
    × columns). Returns per tensor (len(seeds), size). Its own generators: the RNG of training is left
    alone, and a model gets the same keys measured alone or in a group."""
    rows = []
    for seed in seeds:
        gen = torch.Generator(device=device).manual_seed(int(seed))
        rows.append(torch.rand(sum(sizes), generator=gen, device=device, dtype=torch.float64))
    return list(torch.stack(rows).split(list(sizes), dim=1))


def tail_alpha_rows(g: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """:func:`layer_tail_index` of R tensors at once, on their device: ``g`` (R, K, C) holds K micro-batch
    gradients of C coordinates per row, ``keys`` (R, K//2 · C) the sort keys that permute each row's
    samples (:func:`tail_keys`; the order of the usable samples by key is the permutation). The same
    arithmetic as :func:`standardised_pairs` + :func:`tail_index` (float64), vectorised over rows whose
    usable sample counts differ. Returns α̂ per row (NaN where the numpy path gives NaN)."""
    g = g.double()
    R, K = g.shape[:2]
    n = K // 2
    nan = torch.full((R,), math.nan, dtype=torch.float64, device=g.device)
    if K < TAIL_MIN_MICROBATCHES:
        return nan
    d = g[:, 0:2 * n:2] - g[:, 1:2 * n:2]  # (R, n, C) pair differences
    logs = d.abs().log()
    keep = logs.isfinite().all(1)  # (R, C): columns without a zero difference
    logs = logs.masked_fill(~keep[:, None], 0.0)
    loo = (logs.sum(1, keepdim=True) - logs) / (n - 1)
    cols = keep.sum(1)
    v = (logs.var(1, correction=1) * keep).sum(1) / cols / (n - 1)
    z = (d / loo.exp()).flatten(1)
    usable = (keep[:, None, :] & (d != 0)).flatten(1) & z.isfinite() & (z != 0)
    n_use = usable.sum(1)
    x = z.gather(1, keys.masked_fill(~usable, math.inf).argsort(dim=1, stable=True))  # usable ones first, permuted
    m = n_use.double().sqrt().round().clamp(min=2)
    blocks = torch.div(n_use, m, rounding_mode="floor")
    pos = torch.arange(x.shape[1], device=g.device, dtype=torch.float64)
    blk = torch.div(pos[None, :], m[:, None], rounding_mode="floor")
    sink = x.shape[1]  # the column of the samples past the last whole block
    blk = torch.where(blk < blocks[:, None], blk, float(sink)).long()
    y = torch.zeros(R, sink + 1, dtype=torch.float64, device=g.device).scatter_add_(1, blk, x)[:, :sink].abs()
    y_in = (torch.arange(sink, device=g.device)[None, :] < blocks[:, None]) & (y > 0)
    x_in = blk < sink
    mean_log_y = (y.clamp(min=1e-300).log() * y_in).sum(1) / y_in.sum(1)
    mean_log_x = (x.abs().clamp(min=1e-300).log() * x_in).sum(1) / x_in.sum(1)
    dd = (mean_log_y - mean_log_x) / m.log()
    c = v / (2 * m.log())
    disc = dd * dd - 4 * c
    plain = torch.where(dd > 0, 1 / dd, nan)
    corrected = torch.where((disc > 0) & (dd > 0), (dd - disc.clamp(min=0).sqrt()) / (2 * c), nan)
    alpha = torch.where(c <= 0, plain, corrected)
    return torch.where((n * cols >= TAIL_MIN_SAMPLES) & (blocks >= 2), alpha, nan)


def tail_alphas(samples: Sequence[torch.Tensor], keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each tensor's α̂ for any leading dimensions (models): ``samples[i]`` (..., K, C_i) the K micro-batch
    gradients of tensor i's tail columns (:func:`tail_columns`), ``keys[i]`` (..., K//2 · C_i) from
    :func:`tail_keys`. Returns (..., L) float64, on the samples' device."""
    out = []
    for g, k in zip(samples, keys):
        lead = g.shape[:-2]
        out.append(tail_alpha_rows(g.reshape(-1, *g.shape[-2:]), k.reshape(-1, k.shape[-1])).view(lead))
    return torch.stack(out, -1)


# ---------------------------------------------------------------------------------------------
# One nn.Module: per-micro-batch gradients and their statistics


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: ``model.loss(x, y)``, the mean over the micro-batch's tokens."""
    return model.loss(x, y)


class _Loss(nn.Module):
    """Wraps a model so that ``torch.func.functional_call`` reaches its loss (not its forward)."""

    def __init__(self, model: nn.Module, loss: LossFn, autocast):
        super().__init__()
        self.model, self.loss, self.autocast = model, loss, autocast

    def forward(self, x, y):
        with self.autocast():  # the forward only: the backward runs outside autocast, as it should
            return self.loss(self.model, x, y)


def microbatch_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, microbatch: int,
                         loss: LossFn = model_loss, autocast=nullcontext,
                         max_chunk_bytes: int = MAX_CHUNK_BYTES
                         ) -> Iterator[tuple[tuple[str, ...], tuple[torch.Tensor, ...]]]:
    """The gradients of K = len(x) // microbatch micro-batches' mean losses, in chunks of micro-batches:
    yields ``(names, grads)`` with ``grads[i]`` of shape (chunk, *param_i.shape). ``loss`` must be a mean
    over the micro-batch (a sum would scale each gradient by b). Computed by ``torch.func`` (vmap of
    grad), so the parameters' ``.grad`` and the RNG stream stay untouched; attention runs in SDPA's math
    kernel, which has batching rules. A chunk holds at most ``max_chunk_bytes`` of gradients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = tuple(n for n, _ in named)
    params = tuple(p.detach() for _, p in named)
    k = x.shape[0] // microbatch
    xs = x[:k * microbatch].reshape(k, microbatch, *x.shape[1:])
    ys = y[:k * microbatch].reshape(k, microbatch, *y.shape[1:])
    wrapped = _Loss(model, loss, autocast)

    def f(ps, xb, yb):
        return torch.func.functional_call(wrapped, {"model." + n: p for n, p in zip(names, ps)}, (xb, yb))

    per_micro = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))
    per_grad = sum(p.numel() * p.element_size() for p in params)
    chunk = max(1, min(k, max_chunk_bytes // max(per_grad, 1)))
    with sdpa_kernel(SDPBackend.MATH):
        for i in range(0, k, chunk):
            yield names, per_micro(params, xs[i:i + chunk], ys[i:i + chunk])


def adam_weights(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> dict[str, list]:
    """The weightings ``adam`` (P) and ``adam_update`` (P²) of ``params`` from an Adam(W) optimizer's
    second moments; empty before its first step (no state yet)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    ps = []
    for p in params:
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st or id(p) not in group_of:
            return {}
        g = group_of[id(p)]
        ps.append(adam_preconditioner(st["exp_avg_sq"], float(st["step"]), g["betas"][1], g["eps"]))
    return {"adam": ps, "adam_update": [q * q for q in ps]}


@dataclass
class MicrobatchStats:
    """One measurement: per weighting (:data:`WEIGHTINGS`), the squared norms of the K micro-batch
    gradients ``micro_sq[w]`` (K, L) and of their mean ``mean_sq[w]`` (L,), one column per parameter
    tensor ``names`` (float64, CPU); ``tail_alpha`` (L,) per tensor (NaN: too few samples), or None."""

    names: tuple[str, ...]
    microbatch: int
    micro_sq: dict[str, torch.Tensor]
    mean_sq: dict[str, torch.Tensor]
    tail_alpha: np.ndarray | None = None

    @property
    def n_micro(self) -> int:
        return int(self.micro_sq["plain"].shape[0])

    def estimates(self) -> dict[str, float]:
        """Whole-model ``grad_sq<sfx>`` and ``trace<sfx>`` per weighting (suffix from :data:`WEIGHTINGS`)."""
        out = {}
        for w, micro in self.micro_sq.items():
            g, t = gns_estimates(micro.sum(-1), self.mean_sq[w].sum(-1), self.microbatch)
            out["grad_sq" + WEIGHTINGS[w]], out["trace" + WEIGHTINGS[w]] = float(g), float(t)
        return out

    def layer_estimates(self, weighting: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``(|G|², tr Σ)``, each (L,)."""
        return gns_estimates(self.micro_sq[weighting].T, self.mean_sq[weighting], self.microbatch)


def microbatch_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, microbatch: int,
                     optimizer: torch.optim.Optimizer | None = None, tail: bool = False, *,
                     loss: LossFn = model_loss, autocast=nullcontext, seed: int = 0,
                     max_chunk_bytes: int = MAX_CHUNK_BYTES) -> MicrobatchStats:
    """Measure the gradient noise of ``model`` on the batch (x, y) split into micro-batches of
    ``microbatch`` sequences: squared norms (plain, and Adam-weighted when ``optimizer`` has state) and,
    with ``tail``, each tensor's tail index (:func:`tail_alphas`, its permutations drawn from ``seed``)."""
    k = x.shape[0] // microbatch
    if k < 2:
        raise ValueError(f"{x.shape[0]} sequences in micro-batches of {microbatch}: the noise scale needs at least 2")
    params = [p for p in model.parameters() if p.requires_grad]
    weights = adam_weights(optimizer, params) if optimizer is not None else {}
    micro: dict[str, list] = {w: [] for w in ("plain", *weights)}
    total: list[torch.Tensor] | None = None
    cols = [tail_columns(p.numel(), k).to(p.device) for p in params] if tail else []
    samples: list[list[torch.Tensor]] = [[] for _ in cols]
    names: tuple[str, ...] = ()
    for names, grads in microbatch_gradients(model, x, y, microbatch, loss, autocast, max_chunk_bytes):
        for w, norms in micro.items():
            norms.append(squared_norms(grads, 1, weights.get(w)))
        sums = [g.sum(0).double() for g in grads]
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
        for i, c in enumerate(cols):
            samples[i].append(grads[i].flatten(1)[:, c].double())
    mean = [t / k for t in total]
    mean_sq = {w: squared_norms(mean, 0, weights.get(w)).cpu() for w in micro}
    alphas = None
    if tail:
        gs = [torch.cat(s) for s in samples]
        keys = tail_keys([seed], [(k // 2) * g.shape[1] for g in gs], gs[0].device)
        alphas = tail_alphas(gs, [kk[0] for kk in keys]).cpu().numpy()
    return MicrobatchStats(names=names, microbatch=microbatch,
                           micro_sq={w: torch.cat(v).cpu() for w, v in micro.items()},
                           mean_sq=mean_sq, tail_alpha=alphas)


# ---------------------------------------------------------------------------------------------
# Over a run: EMAs, cadence, metrics, summary


@dataclass
class NoiseTracker:
    """The running state of one run's noise measurements.

    Measurements happen at logging steps, at least ``interval`` steps apart (:meth:`due`). Each one's
    estimates go into EMAs (decay ``decay`` per measurement, bias-corrected), |G|² and tr Σ separately;
    B_simple is the ratio of the two EMAs. :meth:`update` returns the step's metrics, :meth:`summary`
    the run's. Plain Python state (:meth:`state_dict`), so a checkpoint carries it and a resumed run
    reports what an uninterrupted one does."""

    interval: int
    microbatch: int = 1
    tail: bool = False
    decay: float = EMA_DECAY
    last: int = 0  # the step of the latest measurement
    ema: dict[str, float] = field(default_factory=dict)  # uncorrected EMA per estimate key
    weight: dict[str, float] = field(default_factory=dict)  # 1 − decay^n per key (bias correction)
    steps: list[int] = field(default_factory=list)
    ratios: dict[str, list[float]] = field(default_factory=dict)  # B_simple per weighting suffix
    alphas: list[float] = field(default_factory=list)  # every tensor's α̂ of every measurement

    def due(self, done: int, logging: bool) -> bool:
        """Whether the step that completes ``done`` steps is measured (``logging``: it is a log step)."""
        return logging and done - self.last >= self.interval

    def measure(self, done: int, model: nn.Module, optimizer, x, y, autocast=nullcontext,
                seed: int = 0) -> dict[str, float]:
        """Measure the step's batch before its update (:func:`microbatch_stats`) and :meth:`update`."""
        stats = microbatch_stats(model, x, y, self.microbatch, optimizer, self.tail, autocast=autocast,
                                 seed=seed * 1_000_003 + done)
        return self.update(done, stats.estimates(), stats.tail_alpha)

    def update(self, done: int, estimates: Mapping[str, float],
               alphas: Sequence[float] | None = None) -> dict[str, float]:
        """Fold one measurement in (``estimates``: ``grad_sq<sfx>`` / ``trace<sfx>``; non-finite pairs are
        skipped) and return its metrics: ``gns_<estimate>``, ``gns_b_simple<sfx>`` (while the |G|² EMA is
        positive), ``tail_alpha`` (median over tensors)."""
        self.last = done
        self.steps.append(done)
        metrics: dict[str, float] = {}
        for sfx in WEIGHTINGS.values():
            g, t = estimates.get("grad_sq" + sfx), estimates.get("trace" + sfx)
            ratio = math.nan
            if g is not None and t is not None and math.isfinite(g) and math.isfinite(t):
                for key, v in (("grad_sq" + sfx, g), ("trace" + sfx, t)):
                    self.ema[key] = self.decay * self.ema.get(key, 0.0) + (1 - self.decay) * v
                    self.weight[key] = self.decay * self.weight.get(key, 0.0) + (1 - self.decay)
                    metrics["gns_" + key] = float(v)
                ratio = self._ratio(sfx)
            self.ratios.setdefault(sfx, []).append(ratio)
            if math.isfinite(ratio):
                metrics["gns_b_simple" + sfx] = ratio
        finite = [float(a) for a in (alphas if alphas is not None else []) if math.isfinite(a)]
        self.alphas.extend(finite)
        if finite:
            metrics["tail_alpha"] = float(np.median(finite))
        return metrics

    def _ratio(self, sfx: str) -> float:
        g_key, t_key = "grad_sq" + sfx, "trace" + sfx
        if g_key not in self.ema:
            return math.nan
        g = self.ema[g_key] / self.weight[g_key]
        t = self.ema[t_key] / self.weight[t_key]
        return t / g if g > 0 else math.nan

    def summary(self, steps_done: int) -> dict[str, float]:
        """``b_noise<sfx>`` (the final EMA ratio), ``b_noise<sfx>_median`` (median of the EMA ratio over
        the measurements of the second half of training), ``tail_index_alpha`` (median over tensors and
        measurements) with ``tail_index_alpha_q25`` / ``_q75`` and ``tail_index_n``, and how it was measured:
        ``gns_measurements``, ``gns_microbatch``, ``gns_interval``. Undefined values are left out."""
        s: dict[str, float] = {"gns_measurements": float(len(self.steps)), "gns_microbatch": float(self.microbatch),
                               "gns_interval": float(self.interval)}
        late = [i for i, st in enumerate(self.steps) if st > steps_done / 2]
        for sfx, rs in self.ratios.items():
            final = self._ratio(sfx)
            if math.isfinite(final):
                s["b_noise" + sfx] = final
            vals = [rs[i] for i in late if math.isfinite(rs[i])]
            if vals:
                s["b_noise" + sfx + "_median"] = float(np.median(vals))
        if self.alphas:
            q25, q50, q75 = np.quantile(self.alphas, [0.25, 0.5, 0.75])
            s.update(tail_index_alpha=float(q50), tail_index_alpha_q25=float(q25),
                     tail_index_alpha_q75=float(q75), tail_index_n=float(len(self.alphas)))
        return s

    def state_dict(self) -> dict:
        """A copy of the running state (plain Python: safe to pickle while training goes on)."""
        return {"last": self.last, "ema": dict(self.ema), "weight": dict(self.weight), "steps": list(self.steps),
                "ratios": {k: list(v) for k, v in self.ratios.items()}, "alphas": list(self.alphas)}

    def load_state_dict(self, state: Mapping) -> None:
        self.last, self.ema, self.weight = int(state["last"]), dict(state["ema"]), dict(state["weight"])
        self.steps, self.alphas = list(state["steps"]), list(state["alphas"])
        self.ratios = {k: list(v) for k, v in state["ratios"].items()}
