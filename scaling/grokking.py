"""The training loop of one modular (grokking) configuration: a batch size that follows a schedule.

Reached through :func:`scaling.train.train` (a configuration with a task), so the runner, sweeps and
searches treat it like any other run: the same :class:`~scaling.train.Hooks`, :class:`~scaling.train.TrainResult`
and MLflow records. It never goes to the batched engine (``RunConfig.batchable`` is False).

What differs from the language-model loop:

* the batch size of step s is the schedule's (:mod:`scaling.schedules`), the LR in force
  ``lr_at(cfg, s) · lr_factor(rule, B(s), batch_size)``; both are logged (metrics ``batch_size``, ``lr``);
* step s trains on examples ``o(s) .. o(s) + B(s)`` of an endless stream of per-epoch shuffles of the
  training set, o(s) = B(0) + … + B(s − 1), each shuffle a pure function of (seed, epoch): every example
  once per epoch, and a resumed run draws what it would have drawn;
* loss and accuracy on the answer token only, in fp32 throughout (no autocast: float error in the softmax
  can stop grokking, Prieto et al. 2025);
* every evaluation covers the whole validation and training sets: ``val_loss``, ``val_acc``, ``train_acc``.

Summary metrics beyond the usual: ``final_train_acc``, ``final_val_acc``, ``max_val_acc``,
``step_val_acc_99`` (the first evaluation step with validation accuracy >= 0.99; the budget when a
finished run never got there), ``examples_seen``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scaling import schedules
from scaling.config import RunConfig
from scaling.data import Corpus
from scaling.model import NanoTransformer, build_model
from scaling.train import LOG_METRICS, Hooks, Pruned, TrainResult, clip_stats, due, final_window, lr_at, make_optimizer

ACC_THRESHOLD = 0.99
EVAL_CHUNK = 8192  # rows per forward pass of an evaluation
# Device-side running sums: the clip statistics row (train.clip_stats), then correct answers and examples.
SUM_KEYS = ("loss", "before", "after", "clipped", "scale", "correct", "examples")


class ExampleStream:
    """Training rows by position in an endless stream of per-epoch shuffles (each a pure function of
    (seed, epoch)); the two epochs last used are kept on the device."""

    def __init__(self, n: int, seed: int, device):
        self.n, self.seed, self.device = n, seed, device
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 11) % (2**63 - 1))
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g).to(self.device)
        return self._perms[epoch]

    def indices(self, start: int, size: int) -> torch.Tensor:
        parts = []
        while size > 0:
            epoch, offset = divmod(start, self.n)
            take = min(size, self.n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            start, size = start + take, size - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class GrokRun:
    """Everything one run carries from step to step (and into its checkpoints)."""

    cfg: RunConfig
    model: NanoTransformer
    opt: torch.optim.Optimizer
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    sizes: np.ndarray  # batch size of every step
    offsets: np.ndarray  # first stream position of every step (and the total after the last)
    stream: ExampleStream
    interval: torch.Tensor
    total: torch.Tensor
    final_losses: torch.Tensor
    n_interval: int = 0
    step: int = 0
    evals: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, val loss, val acc, train acc)

    def lr(self, step: int) -> float:
        return lr_at(self.cfg, step) * schedules.lr_factor(self.cfg.lr_rule, int(self.sizes[step]), self.cfg.batch_size)

    def state(self, step: int, device) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": step,
                "sums": {"interval": self.interval, "total": self.total, "final_losses": self.final_losses,
                         "n_interval": self.n_interval},
                "evals": list(self.evals), "config_hash": self.cfg.config_hash(),
                "rng_cpu": torch.random.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}

    def load(self, s: dict[str, Any], device) -> None:
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        sums = s["sums"]
        self.interval, self.total = sums["interval"].to(device), sums["total"].to(device)
        self.final_losses, self.n_interval = sums["final_losses"].to(device), sums["n_interval"]
        self.evals, self.step = [tuple(e) for e in s["evals"]], s["step"]
        torch.random.set_rng_state(s["rng_cpu"])
        if device.type == "cuda" and s.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(s["rng_cuda"])


def start(cfg: RunConfig, corpus: Corpus, device, resume_state: dict | None = None) -> GrokRun:
    model = build_model(cfg.phase.model, cfg.seed).to(device)
    sizes = schedules.batch_sizes(cfg.schedule, cfg.steps, cfg.batch_size)
    z = lambda n: torch.zeros(n, device=device, dtype=torch.float64)  # noqa: E731
    run = GrokRun(cfg=cfg, model=model, opt=make_optimizer(model, cfg, device), train_rows=corpus.train.to(device),
                  val_rows=corpus.val.to(device), sizes=sizes, offsets=np.concatenate([[0], np.cumsum(sizes)]),
                  stream=ExampleStream(len(corpus.train), cfg.seed, device), interval=z(len(SUM_KEYS)),
                  total=z(len(SUM_KEYS)), final_losses=z(final_window(cfg.steps)))
    if resume_state is not None:
        run.load(resume_state, device)
    return run


def answer_logits(model: NanoTransformer, rows: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the answer: the output at the ``=`` position of ``[x, op, y, =]``."""
    return model(rows[:, :4])[:, -1].float()


def train_step(run: GrokRun, step: int, clip: float) -> None:
    cfg = run.cfg
    for g in run.opt.param_groups:
        g["lr"] = run.lr(step)
    rows = run.train_rows[run.stream.indices(int(run.offsets[step]), int(run.sizes[step]))]
    logits = answer_logits(run.model, rows)
    loss = F.cross_entropy(logits, rows[:, 4], label_smoothing=cfg.phase.train.label_smoothing)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    before = torch.nn.utils.clip_grad_norm_(list(run.model.parameters()), clip)
    plain = F.cross_entropy(logits.detach(), rows[:, 4]) if cfg.phase.train.label_smoothing else loss.detach()
    _, row = clip_stats(plain, before, clip)
    correct = (logits.detach().argmax(-1) == rows[:, 4]).sum().double().reshape(1)
    count = torch.full((1,), float(len(rows)), device=row.device, dtype=torch.float64)  # a fill: no host copy
    row = torch.cat([row, correct, count])
    run.interval += row
    run.total += row
    run.n_interval += 1
    first = cfg.steps - len(run.final_losses)
    if step >= first:
        run.final_losses[step - first] = plain
    run.opt.step()


@torch.no_grad()
def evaluate_rows(model: NanoTransformer, rows: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) of the answer over all ``rows``, fp32."""
    model.eval()
    loss = torch.zeros((), device=rows.device, dtype=torch.float64)
    correct = torch.zeros((), device=rows.device, dtype=torch.float64)
    for chunk in rows.split(EVAL_CHUNK):
        logits = answer_logits(model, chunk)
        loss += F.cross_entropy(logits, chunk[:, 4], reduction="sum").double()
        correct += (logits.argmax(-1) == chunk[:, 4]).sum().double()
    model.train()
    return float(loss) / len(rows), float(correct) / len(rows)


def interval_metrics(run: GrokRun, step: int, seconds: float) -> dict[str, float]:
    """The logging interval's means (one host sync), the LR and batch size in force at its last step."""
    sums = run.interval.tolist()
    n = max(run.n_interval, 1)
    metrics = dict(zip(LOG_METRICS, [v / n for v in sums[:5]]))
    metrics.update(batch_acc=sums[5] / max(sums[6], 1.0), lr=run.lr(step - 1), batch_size=float(run.sizes[step - 1]),
                   examples_per_s=sums[6] / max(seconds, 1e-9))
    run.interval.zero_()
    run.n_interval = 0
    return metrics


def train(cfg: RunConfig, corpus: Corpus, device: torch.device, hooks: Hooks | None = None,
          resume_state: dict | None = None) -> TrainResult:
    """Train the modular configuration ``cfg`` on its split ``corpus``; resume from a checkpoint state."""
    hooks = hooks or Hooks()
    t = cfg.phase.train
    run = start(cfg, corpus, device, resume_state)
    clip = math.inf if cfg.clip is None else cfg.clip
    status, step, t_last = "FINISHED", run.step, time.perf_counter()
    try:
        for step in range(run.step, cfg.steps):
            train_step(run, step, clip)
            hooks.on_step(step + 1)
            done = step + 1
            evaluating = due(done, t.eval_interval, cfg.steps)
            if evaluating or due(done, t.log_interval, cfg.steps):
                now = time.perf_counter()
                metrics = interval_metrics(run, done, now - t_last)
                t_last = now
                if not all(math.isfinite(metrics[k]) for k in LOG_METRICS[:2]):
                    status = "DIVERGED"
                    break
                if evaluating:
                    val_loss, val_acc = evaluate_rows(run.model, run.val_rows)
                    _, train_acc = evaluate_rows(run.model, run.train_rows)
                    run.evals.append((done, val_loss, val_acc, train_acc))
                    metrics.update(val_acc=val_acc, train_acc=train_acc)
                hooks.on_log(done, metrics)
                if evaluating:
                    hooks.on_eval(done, val_loss)  # may raise Pruned
                    if not math.isfinite(val_loss):
                        status = "DIVERGED"
                        break
            if due(done, t.checkpoint_every, cfg.steps):
                hooks.on_checkpoint(done, run.state(done, device))
    except Pruned:
        status = "PRUNED"
    steps_done = step + 1 if status != "FINISHED" else cfg.steps
    return TrainResult(status=status, steps_done=steps_done, n_params=run.model.n_params(),
                       summary=summary(run, corpus, steps_done, status),
                       val_history=[(s, v) for s, v, _, _ in run.evals])


def summary(run: GrokRun, corpus: Corpus, steps_done: int, status: str) -> dict[str, float]:
    cfg = run.cfg
    examples = int(run.offsets[steps_done])
    s: dict[str, float] = {"n_params": run.model.n_params(), "examples_seen": examples,
                           "tokens_seen": examples * cfg.phase.model.context_length, **corpus.baselines}
    if status == "DIVERGED":
        return s
    total = run.total.tolist()
    s.update(avg_grad_norm_before=total[1] / max(steps_done, 1), avg_grad_norm_after=total[2] / max(steps_done, 1),
             avg_clip_frequency=total[3] / max(steps_done, 1), avg_effective_lr_scale=total[4] / max(steps_done, 1))
    if run.evals:
        steps, vals, accs, train_accs = (list(x) for x in zip(*run.evals))
        i = min(range(len(vals)), key=vals.__getitem__)
        s.update(final_val_loss=vals[-1], min_val_loss=vals[i], min_val_loss_step=steps[i],
                 val_loss_rise=vals[-1] - vals[i], final_val_acc=accs[-1], max_val_acc=max(accs),
                 final_train_acc=train_accs[-1])
        reached = [st for st, a in zip(steps, accs) if a >= ACC_THRESHOLD]
        if reached or status == "FINISHED":
            s["step_val_acc_99"] = reached[0] if reached else cfg.steps
    if status == "FINISHED":
        fl = run.final_losses
        s.update(final_train_loss=float(fl.mean()), train_loss_std=float(fl.std()) if len(fl) > 1 else 0.0)
    return s
