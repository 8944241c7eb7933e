"""The training loop of one configuration: AdamW, warmup + schedule, global-norm clipping, honest clip metrics.

No MLflow here: the loop reports through :class:`Hooks` (metrics every ``log_interval`` steps, each
evaluation, checkpoints), so the same loop serves ``scaling train``, sweeps and Optuna trials. Running
statistics live on the device and are fetched once per logging interval: no per-step host sync.

Clip metrics per step, with ``g`` the global gradient norm before clipping and ``c`` the threshold:
``after = g * min(1, c / (g + 1e-6))`` — exactly the scale ``clip_grad_norm_`` applies — so
``after <= c`` whenever clipping fired; ``clipped = g > c``; ``scale = min(1, c / (g + 1e-6))``.
Without clipping: after = before, clipped = 0, scale = 1.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from scaling.config import RunConfig
from scaling.data import BatchSampler, Corpus, validation_batches
from scaling.model import NanoTransformer, build_model, decay_mask
from scaling.noise import NoiseTracker

FINAL_WINDOW_FRACTION = 0.1  # final_train_loss / train_loss_std are over the last 10% of steps
CLIP_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_
# The per-interval means logged through ``Hooks.on_log`` (in RunStats.KEYS order), plus "lr" and "tokens_per_s".
LOG_METRICS = ("train_loss", "grad_norm_before_clip", "grad_norm_after_clip", "clip_frequency", "effective_lr_scale")


def final_window(steps: int) -> int:
    """How many final steps ``final_train_loss`` / ``train_loss_std`` are taken over (at least one)."""
    return max(1, int(round(steps * FINAL_WINDOW_FRACTION)))


def due(done: int, every: int, steps: int) -> bool:
    """Whether a run that has done ``done`` of ``steps`` steps logs / evaluates / checkpoints now."""
    return done % every == 0 or done == steps


def clip_stats(loss: torch.Tensor, norm: torch.Tensor, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip scale and the statistics row(s) of a step, the one definition of the clip metrics.

    ``norm`` is the global gradient norm before clipping (a scalar, or one per model with ``clip`` one
    per model too); scale = min(1, clip / (norm + eps)), the factor the gradient was multiplied by.
    The row (last dimension, in ``RunStats.KEYS`` order, float64): loss, norm before, norm after
    (= norm · scale), clipped (norm > clip), scale.
    """
    scale = torch.clamp(clip / (norm + CLIP_EPS), max=1.0)
    row = torch.stack([loss.double(), norm.double(), (norm * scale).double(), (norm > clip).double(),
                       scale.double()], -1)
    return scale, row


class Pruned(Exception):
    """Raised by an ``on_eval`` hook to stop a run early (an Optuna pruner said so)."""


@dataclass
class Hooks:
    on_log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_eval: Callable[[int, float], None] = lambda step, val_loss: None
    on_checkpoint: Callable[[int, dict[str, Any]], None] = lambda step, state: None
    on_step: Callable[[int], None] = lambda step: None  # progress bars


@dataclass
class TrainResult:
    status: str  # FINISHED | DIVERGED | PRUNED
    steps_done: int
    n_params: int
    summary: dict[str, float] = field(default_factory=dict)
    val_history: list[tuple[int, float]] = field(default_factory=list)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Linear warmup to the peak LR, then constant or cosine down to ``min_lr_ratio * lr``."""
    o = cfg.phase.optim
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if o.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from scaling.config import ConfigError
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


def make_optimizer(model: NanoTransformer, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    o = cfg.phase.optim
    mask = decay_mask(model)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if mask[n]], "weight_decay": o.weight_decay},
        {"params": [p for n, p in named if not mask[n]], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(cfg, 0), betas=tuple(o.betas), eps=o.eps,
                             fused=device.type == "cuda")


def forward_backward(model: NanoTransformer, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig,
                     autocast) -> torch.Tensor:
    """Accumulate the batch's gradient in ``train.grad_accum`` equal micro-batches (the mean of their mean
    losses: the whole batch's gradient) with ``train.label_smoothing``; returns the batch's mean loss
    *without* smoothing (what is reported), detached."""
    t = cfg.phase.train
    if t.grad_accum == 1 and t.label_smoothing == 0:
        with autocast():
            loss = model.loss(x, y)
        loss.backward()
        return loss.detach()
    dtype = next(model.parameters()).dtype
    total = torch.zeros((), device=x.device, dtype=dtype)
    for xs, ys in zip(x.chunk(t.grad_accum), y.chunk(t.grad_accum)):
        with autocast():
            logits = model(xs)
        # at least fp32 as in NanoTransformer.loss (a float64 model's logits stay float64)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)
        targets = ys.reshape(-1)
        loss = F.cross_entropy(logits, targets, label_smoothing=t.label_smoothing)
        (loss / t.grad_accum).backward()
        plain = F.cross_entropy(logits.detach(), targets) if t.label_smoothing else loss.detach()
        total += plain / t.grad_accum
    return total


@torch.no_grad()
def evaluate(model: NanoTransformer, batches, autocast) -> torch.Tensor:
    """Mean validation loss over the fixed batches, as a device scalar."""
    model.eval()
    total = torch.zeros((), device=batches[0][0].device, dtype=next(model.parameters()).dtype)
    for x, y in batches:
        with autocast():
            total += model.loss(x, y)
    model.train()
    return total / len(batches)


class RunStats:
    """A run's running statistics, on its device: sums of the clip-metric rows (:func:`clip_stats`) per
    logging interval and over the whole run, the interval's step count, and the losses of the final window
    (``final_train_loss`` / ``train_loss_std``). The batched engine keeps one row of these per model and
    hands each model's rows to :func:`summarize` as a RunStats."""

    KEYS = ("loss", "before", "after", "clipped", "scale")

    def __init__(self, device, final_window: int):
        z = lambda: torch.zeros(5, device=device, dtype=torch.float64)  # noqa: E731
        self.interval, self.total = z(), z()
        self.n_interval = 0
        self.final_losses = torch.zeros(final_window, device=device, dtype=torch.float64)

    def state(self) -> dict:
        """The sums themselves, live like ``state_dict()``'s tensors (no copy, no wait for a GPU): a hook
        copies what it keeps, as the checkpoint writer does."""
        return {"interval": self.interval, "total": self.total, "n_interval": self.n_interval,
                "final_losses": self.final_losses}

    def load(self, s: dict, device) -> None:
        self.interval, self.total = s["interval"].to(device), s["total"].to(device)
        self.n_interval, self.final_losses = s["n_interval"], s["final_losses"].to(device)


def train(cfg: RunConfig, corpus: Corpus, device: torch.device, hooks: Hooks | None = None,
          resume_state: dict | None = None) -> TrainResult:
    """Train ``cfg`` on ``corpus`` (already on ``device``); resume from a checkpoint state if given."""
    if cfg.task is not None:  # a modular (grokking) configuration: its own loop
        from scaling import grokking

        return grokking.train(cfg, corpus, device, hooks, resume_state)
    hooks = hooks or Hooks()
    t = cfg.phase.train
    model = build_model(cfg.phase.model, cfg.seed).to(device)
    opt = make_optimizer(model, cfg, device)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext)
    sampler = BatchSampler(corpus.train, cfg.seed, cfg.batch_size, cfg.phase.model.context_length)
    val_set = validation_batches(corpus.val, t.eval_batches, cfg.phase.model.context_length)
    params = list(model.parameters())
    clip = float("inf") if cfg.clip is None else cfg.clip
    window = final_window(cfg.steps)
    window_start = cfg.steps - window
    stats = RunStats(device, window)
    noise = NoiseTracker(t.noise_interval, t.noise_microbatch, t.tail_index) if cfg.measures_noise else None
    val_history: list[tuple[int, float]] = []
    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        stats.load(resume_state["stats"], device)
        val_history = list(resume_state["val_history"])
        start = resume_state["step"]
        if noise is not None and resume_state.get("noise"):  # a run trained without measurement has none
            noise.load_state_dict(resume_state["noise"])
        torch.random.set_rng_state(resume_state["rng_cpu"])
        if device.type == "cuda" and resume_state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(resume_state["rng_cuda"])
    n_params = model.n_params()

    def checkpoint_state(step: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "stats": stats.state(), "val_history": list(val_history), "config_hash": cfg.config_hash(),
                "noise": noise.state_dict() if noise is not None else None,
                "rng_cpu": torch.random.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}

    def do_eval(step: int) -> float:
        v = float(evaluate(model, val_set, autocast))
        val_history.append((step, v))
        hooks.on_eval(step, v)  # may raise Pruned
        return v

    t_last, tokens_last = time.perf_counter(), start
    status = "FINISHED"
    step = start
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = sampler.batch(step)
            # the step's own batch at the parameters it updates, before the update (leaves .grad and RNG alone)
            noise_metrics = (noise.measure(step + 1, model, opt, x, y, autocast, cfg.seed)
                             if noise is not None and noise.due(step + 1, due(step + 1, t.log_interval, cfg.steps))
                             else {})
            opt.zero_grad(set_to_none=True)
            loss = forward_backward(model, x, y, cfg, autocast)
            before = torch.nn.utils.clip_grad_norm_(params, clip)
            _, row = clip_stats(loss, before, clip)
            stats.interval += row
            stats.total += row
            stats.n_interval += 1
            if step >= window_start:
                stats.final_losses[step - window_start] = loss
            opt.step()
            hooks.on_step(step + 1)
            done = step + 1
            if due(done, t.log_interval, cfg.steps):
                means = (stats.interval / stats.n_interval).tolist()  # the one sync per interval
                if not all(math.isfinite(m) for m in means[:2]):
                    status = "DIVERGED"
                    break
                now = time.perf_counter()
                metrics = dict(zip(LOG_METRICS, means))
                metrics["lr"] = lr
                metrics["tokens_per_s"] = (done - tokens_last) * cfg.tokens_per_step / max(now - t_last, 1e-9)
                metrics.update(noise_metrics)
                t_last, tokens_last = now, done
                stats.interval.zero_()
                stats.n_interval = 0
                hooks.on_log(done, metrics)
            if due(done, t.eval_interval, cfg.steps):
                if not math.isfinite(do_eval(done)):
                    status = "DIVERGED"
                    break
            if due(done, t.checkpoint_every, cfg.steps):
                hooks.on_checkpoint(done, checkpoint_state(done))
    except Pruned:
        status = "PRUNED"
    steps_done = step + 1 if status != "FINISHED" else cfg.steps
    return TrainResult(status=status, steps_done=steps_done, n_params=n_params,
                       summary=summarize(cfg, stats, val_history, steps_done, status, n_params, corpus, noise),
                       val_history=val_history)


def summarize(cfg: RunConfig, stats: RunStats, val_history, steps_done: int, status: str, n_params: int,
              corpus: Corpus, noise: NoiseTracker | None = None) -> dict[str, float]:
    """A run's summary metrics: parameters, tokens seen, the corpus's baselines and, unless it diverged, the
    mean clip metrics over its steps, its validation-loss history's final / minimum / rise and, if it
    finished, the mean and spread of its final window's training losses."""
    total = (stats.total / max(steps_done, 1)).tolist()
    tokens = steps_done * cfg.tokens_per_step
    # epochs: passes over the training split; windows are drawn at random, so this is the expected count
    s: dict[str, float] = {"n_params": n_params, "tokens_seen": tokens, "epochs": tokens / len(corpus.train),
                           **corpus.baselines}
    if status == "DIVERGED":
        return s
    s.update(avg_grad_norm_before=total[1], avg_grad_norm_after=total[2], avg_clip_frequency=total[3],
             avg_effective_lr_scale=total[4])
    if val_history:
        vals = [v for _, v in val_history]
        i = min(range(len(vals)), key=vals.__getitem__)
        s.update(final_val_loss=vals[-1], min_val_loss=vals[i], min_val_loss_step=val_history[i][0],
                 val_loss_rise=vals[-1] - vals[i])
    if noise is not None:
        s.update(noise.summary(steps_done))
    if status == "FINISHED":
        fl = stats.final_losses
        s.update(final_train_loss=float(fl.mean()), train_loss_std=float(fl.std()) if len(fl) > 1 else 0.0)
    return s
