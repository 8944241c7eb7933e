"""Batched multi-config training: K configurations of one architecture trained together in one pass.

Every configuration of a group shares the phase's model and optimizer settings (architecture, betas, eps,
weight decay, schedule) and may differ in batch size, LR, clip threshold, seed and number of steps.
The result of each configuration is the one :func:`scaling.train.train` gives it alone (same init from
``build_model(cfg, seed)``, same batches from ``BatchSampler``, same LR schedule, same AdamW and clip
formulas, same validation batches, same hooks, same ``TrainResult``), up to floating-point summation order.

How
  * Parameters live in one matrix ``P`` of shape (K, N), in the parameters' dtype: row k is model k's
    parameters, flattened in ``named_parameters`` order (:class:`RowLayout`). The forward pass sees them
    as per-name views (K, *shape); AdamW moments ``m``, ``v`` are (K, N) too, so the optimizer is a
    handful of elementwise ops over (K, N).
  * Each model's batch is split into slots of S sequences, S the same for every group of a phase
    (:func:`slot_size`). Each slot gathers its model's weights (``index_select`` along the model
    dimension) and all M slots run as one set of batched matmuls; a model's loss is the mean of its slots'
    means (= the mean over its B·T tokens).
  * The loss that is differentiated is the *sum* of the models' losses: each model's gradient is exactly
    its own loss's gradient (no 1/K).
  * Per model: global gradient norm over its own row, ``scale = clamp(clip / (norm + 1e-6), max=1)``,
    AdamW with its own lr (warmup/schedule from :func:`scaling.train.lr_at`) and its own step count,
    decoupled weight decay only on the ≥2-D parameters (:func:`scaling.model.decay_mask`). The scalars
    torch's AdamW computes in Python double (``1 - lr*wd``, ``lr / (1 - beta1**t)``,
    ``sqrt(1 - beta2**t)``) are computed the same way on the host, a chunk of steps at a time, and
    applied per row: the update is torch's own arithmetic, element by element.
  * Nothing is shared between models: no common norm, no mean over models, no shared optimizer scalar.
    A non-finite model only poisons its own row.

Per step there is no host sync: batch indices and the per-model optimizer scalars are precomputed for
``TABLE_CHUNK`` steps into tables on the device that the step reads by a device-side counter, running
statistics (the sums of train.py's :class:`~scaling.train.RunStats`, one row per model) are accumulated on
the device and copied to the host once per logging interval without waiting (handed to the hooks when they
have arrived, and always before an evaluation, a checkpoint or the end of a run).

Compiled (``compile``), the training pass, the optimizer step and the evaluation are each compiled once
per process: the slot count M and the model count K are dynamic dimensions, so a pass rebuilt after models
stopped, or the next group of a sweep (other batch sizes, another K), runs the same compiled code. On CUDA
the compiled step is recorded as one CUDA graph per pass and replayed every tick, and causal attention runs
as this project's Triton kernels (:mod:`scaling.attention`) where they apply.

Models that stop (finished, diverged, pruned) are frozen at once (lr 0, nothing more recorded) and the
pass is rebuilt without them, so their compute stops — except, compiled, when the rebuilt pass would hold
a single slot (a dimension of size 1 is compiled apart).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from scaling import attention
from scaling.config import RunConfig
from scaling.data import SAMPLER_CHUNK, Corpus, batch_starts, validation_batches, windows
from scaling.group_noise import CHUNK_BYTES, SEED_STRIDE, GroupSums, chunk_plan
from scaling.model import NanoTransformer, build_model, decay_mask
from scaling.noise import NoiseTracker
from scaling.train import (
    LOG_METRICS,
    Hooks,
    Pruned,
    RunStats,
    TrainResult,
    clip_stats,
    due,
    final_window,
    lr_at,
    make_optimizer,
    summarize,
)

TABLE_CHUNK = 256  # steps of batch indices / optimizer scalars prepared at a time
# the optimizer scalars of a model that must not move (stopped, or not in the tables): 1 - lr*wd = 1,
# -lr / (1 - beta1**t) = 0, and any non-zero sqrt(1 - beta2**t)
FROZEN_SCHED = (1.0, 0.0, 1.0)
WARM_TICKS = 3  # ticks timed (with a sync) after each (re)build of the pass, for compile-time accounting
# dynamo versions kept per compiled function (default 8): a size-1 dimension or another slot size is a
# version of its own, and past the limit dynamo would run the function eagerly without a word
RECOMPILE_LIMIT = 64
# the SDPA backends of the evaluation on CUDA: any but cuDNN, whose forward is the slowest at this shape
EVAL_SDPA = ("flash", "efficient", "math")
# inductor options added to a max-autotune mode: no tables of autotuning timings on stderr
QUIET_AUTOTUNE = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
BLOCK_PARAMS = ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight", "ln2.weight", "ln2.bias",
                "mlp.fc.weight", "mlp.proj.weight")


# ---------------------------------------------------------------------------------------------------
# The batched model: the NanoTransformer forward on stacked weights
#
# An attention function ``attend(qkv, T, H)`` takes a block's q/k/v projection, (M, S*T, 3C): q, k, v in
# columns [0, C), [C, 2C), [2C, 3C), head h in columns [h*D, (h+1)*D) of each; it returns the causal
# attention of every length-T sequence, the H heads side by side, (M, S*T, C).


def split_heads(qkv: torch.Tensor, T: int, H: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of (M, S*T, 3C) as (M*S, H, T, D) views, the layout of SDPA."""
    C = qkv.shape[-1] // 3
    return tuple(z.reshape(-1, T, H, C // H).transpose(1, 2) for z in qkv.split(C, dim=2))


def merge_heads(att: torch.Tensor, M: int) -> torch.Tensor:
    """(M*S, H, T, D) → (M, S*T, H*D)."""
    MS, H, T, D = att.shape
    return att.transpose(1, 2).reshape(M, MS // M * T, H * D)


def sdpa_causal(qkv: torch.Tensor, T: int, H: int) -> torch.Tensor:
    """Causal attention through ``F.scaled_dot_product_attention`` (any device and dtype); compiled, float64
    on a CPU through :func:`math_causal` (eager it stays SDPA's, as the one-model loop computes it)."""
    q, k, v = split_heads(qkv, T, H)
    if qkv.dtype == torch.float64 and not qkv.is_cuda and torch.compiler.is_compiling():
        return merge_heads(math_causal(q, k, v), qkv.shape[0])
    return merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True), qkv.shape[0])


def math_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of (..., T, D) q, k, v written out, in their dtype (SDPA's math kernel).

    The compiled float64 CPU pass (the tests' exact arithmetic) takes it because SDPA there picks the CPU
    flash kernel, whose float64 backward fails compiled on torch releases whose meta function gives its
    logsumexp float32 while the kernel makes it float64 ("expected scalar type Double but found Float",
    pytorch#185539, fixed by pytorch#185573 but present in 2.11)."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, -math.inf).softmax(-1) @ v


def fused_causal(qkv: torch.Tensor, T: int, H: int) -> torch.Tensor:
    """Causal attention through this project's Triton kernels (:mod:`scaling.attention`): they read q/k/v
    where the projection wrote them and write the heads side by side, forward and backward, with no
    transposes or concatenations around them. What they do not handle (a CPU tensor, fp32 or float64, a
    head dim not in ``HEAD_DIMS``, T not a multiple of their block) goes to :func:`sdpa_causal`. Under
    ``torch.compile`` call ``attention.operator()`` before the first trace (defining the kernels is not
    traceable)."""
    if qkv.is_cuda and attention.supports(T, qkv.shape[-1] // 3, H, qkv.dtype):
        return attention.causal_attention(qkv, T, H)
    return sdpa_causal(qkv, T, H)


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * w[:, None, :] + b[:, None, :]


def _block(h: torch.Tensor, ln1w: torch.Tensor, ln1b: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor,
           ln2w: torch.Tensor, ln2b: torch.Tensor, fc: torch.Tensor, fc_proj: torch.Tensor, S: int,
           n_heads: int, attend: Callable) -> torch.Tensor:
    """One pre-LN transformer block on M slots at once: h is (M, S*T, C), weights are (M, *shape)."""
    T, H = h.shape[1] // S, n_heads
    a = _layer_norm(h, ln1w, ln1b)
    att = attend(torch.bmm(a, qkv.transpose(1, 2)), T, H)
    h = h + torch.bmm(att, proj.transpose(1, 2))
    a = _layer_norm(h, ln2w, ln2b)
    a = F.gelu(torch.bmm(a, fc.transpose(1, 2)))
    return h + torch.bmm(a, fc_proj.transpose(1, 2))


def _embed(x: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """Token + position embeddings of M slots: x is (M, S, T) → (M, S*T, C)."""
    M, S, T = x.shape
    V, C = wte.shape[1:]
    offs = torch.arange(M, device=x.device).mul_(V).view(M, 1, 1)
    h = F.embedding(x + offs, wte.reshape(M * V, C)) + wpe[:, None, :T, :]
    return h.reshape(M, S * T, C)


def _head_losses(h: torch.Tensor, lnw: torch.Tensor, lnb: torch.Tensor, wte: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm, tied head, cross-entropy in at least fp32: the mean loss of each slot, (M,)."""
    M, ST, _ = h.shape
    logits = torch.bmm(_layer_norm(h, lnw, lnb), wte.transpose(1, 2))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as NanoTransformer.loss
    ce = F.cross_entropy(logits.reshape(M * ST, -1), y.reshape(-1), reduction="none")
    return ce.view(M, ST).mean(1)


def stacked_slot_losses(W: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, n_heads: int,
                        attend: Callable = sdpa_causal) -> torch.Tensor:
    """Mean cross-entropy of each slot: ``W[name]`` is (M, *shape), x and y are (M, S, T) → (M,).

    Slot j runs the NanoTransformer with weights ``W[name][j]`` on its S sequences: the same
    operations as ``NanoTransformer.loss`` (pre-LN blocks, causal attention, 4x GELU MLP, tied head,
    logits in at least fp32 for the cross-entropy), as batched matmuls over the slot dimension. The
    number of blocks is the number of ``blocks.{i}.*`` weights in ``W``.
    """
    S = x.shape[1]
    n_layers = sum(1 for name in W if name.startswith("blocks.") and name.endswith(".ln1.weight"))
    h = _embed(x, W["wte.weight"], W["wpe.weight"])
    for i in range(n_layers):
        h = _block(h, *[W[f"blocks.{i}.{n}"] for n in BLOCK_PARAMS], S, n_heads, attend)
    return _head_losses(h, W["ln_f.weight"], W["ln_f.bias"], W["wte.weight"], y)


def pass_losses(params: dict[str, torch.Tensor], slot_rows: torch.Tensor, slot_weight: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor, n_heads: int,
                attend: Callable = sdpa_causal) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pass: slot j runs model ``slot_rows[j]`` (its weights gathered from ``params[name]``,
    (K, *shape)) on x[j], y[j] (M, S, T). ``slot_weight[j]`` = 1 / (its model's slot count), so a model's
    loss is the mean of its slots' means. Returns the sum of the models' losses (what is differentiated)
    and each model's loss, (K,), detached (0 for a model not in the pass)."""
    W = {n: p.index_select(0, slot_rows) for n, p in params.items()}
    weighted = stacked_slot_losses(W, x, y, n_heads, attend) * slot_weight
    K = next(iter(params.values())).shape[0]
    model_loss = weighted.new_zeros(K).index_add_(0, slot_rows, weighted.detach())
    return weighted.sum(), model_loss


def slot_loss_sum(W: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, n_heads: int,
                  attend: Callable = sdpa_causal) -> torch.Tensor:
    """The noise measurement's pass: slot j runs weights ``W[name][j]`` (its own leaves) on x[j], y[j]; the
    sum of the slots' mean losses, whose gradient in ``W[name][j]`` is slot j's own (no other slot's)."""
    return stacked_slot_losses(W, x, y, n_heads, attend).sum()


def update_rows(P: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grads: list[torch.Tensor], decay: torch.Tensor,
                clip: torch.Tensor, sched: torch.Tensor, fpos: torch.Tensor, model_loss: torch.Tensor,
                interval: torch.Tensor, total: torch.Tensor, final: torch.Tensor,
                beta1: float, beta2: float, eps: float) -> None:
    """Per-model clip + AdamW on the (K, N) rows, and the per-model statistics rows (all in place).

    ``sched`` is (3, K): ``1 - lr*wd``, ``-lr / (1 - beta1**t)``, ``sqrt(1 - beta2**t)`` per model, computed
    in double on the host as torch's AdamW does; ``fpos`` (K,) the column of ``final`` each model's loss
    goes to. Row k only ever reads row k.
    """
    K = P.shape[0]
    G = torch.cat([g.reshape(K, -1) for g in grads], 1)
    norm = torch.linalg.vector_norm(G, dim=1)  # each model's own global norm
    scale, row = clip_stats(model_loss.detach(), norm, clip)
    G = G * scale[:, None]
    wdf, nss, bc2s = sched[0], sched[1], sched[2]
    P.mul_(torch.where(decay[None, :], wdf[:, None], torch.ones_like(wdf)[:, None]))
    m.lerp_(G, 1 - beta1)
    v.mul_(beta2).addcmul_(G, G, value=1 - beta2)
    denom = (v.sqrt() / bc2s[:, None]).add_(eps)
    P.add_((nss[:, None] * m) / denom)
    interval.add_(row)
    total.add_(row)
    final.scatter_(1, fpos[:, None], row[:, :1])


def eval_losses(W: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, n_heads: int,
                attend: Callable = sdpa_causal) -> torch.Tensor:
    """The evaluation's forward: model k on x[k], y[k] (a validation batch), its mean loss, (K,)."""
    return stacked_slot_losses(W, x, y, n_heads, attend)


# ---------------------------------------------------------------------------------------------------
# Compilation: one compiled version per function, its leading dimensions (slots, models) dynamic

_COMPILED: dict = {}  # (function name, compile argument) → compiled callable, reused by every group


def compile_kwargs(compile: bool | str | dict) -> dict:
    """``torch.compile`` keyword arguments of train_group's ``compile`` argument: a mode (True: the
    default), a max-autotune mode as its inductor options (quietened), or a dict of inductor options."""
    import torch._inductor as inductor
    import torch._inductor.config as inductor_config
    if isinstance(compile, dict):
        options = dict(compile)
    elif isinstance(compile, str) and compile.startswith("max-autotune"):
        options = inductor.list_mode_options(compile)
    else:
        return {"mode": None if compile is True else compile}
    if any(k.startswith("max_autotune") and v for k, v in options.items()):
        known = inductor_config.get_config_copy()
        options.update({k: v for k, v in QUIET_AUTOTUNE.items() if k in known})
    return {"options": options}


def _compile_key(compile) -> tuple:
    return tuple(sorted(compile.items())) if isinstance(compile, dict) else (compile,)


def compiled(fn: Callable, compile: bool | str | dict = True) -> Callable:
    """``fn`` compiled once per process with ``compile``'s mode, shapes static unless marked dynamic
    (:func:`call_dynamic`). The optimizer step and the evaluation take the default mode whatever the
    pass's: autotuning them costs compile time for no measurable gain."""
    mode = compile if fn is pass_losses else True
    key = (fn.__name__,) + _compile_key(mode)
    if key not in _COMPILED:
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
                break
        _COMPILED[key] = torch.compile(fn, dynamic=None, **compile_kwargs(mode))
    return _COMPILED[key]


def call_dynamic(fn: Callable, dims: Sequence[tuple[torch.Tensor, int]], *args):
    """``fn(*args)`` with each (tensor, dim) of ``dims`` marked dynamic, and sizes that happen to be equal
    kept apart (no duck sizing: M slots equal to K models now need not be equal in the next pass)."""
    import torch.fx.experimental._config as fx_config
    for t, d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)
    with fx_config.patch(use_duck_shape=False):
        return fn(*args)


def sdpa_backends(names: Sequence[str], device: torch.device):
    """A context restricting ``F.scaled_dot_product_attention`` to these backends on CUDA (none named: no
    restriction). It must surround the first call of a compiled pass: the backend is chosen at trace time."""
    if not names or device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    enum = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([enum[n] for n in names])


# ---------------------------------------------------------------------------------------------------
# State that travels between steps


@dataclass(frozen=True)
class RowLayout:
    """Where each parameter of one model lies in its row of the stacked matrix (``named_parameters``
    order), which ones decay, and torch AdamW's view of them (:func:`scaling.train.make_optimizer`'s
    parameter order and groups): a row converts to and from train.py's checkpoint format."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    decays: tuple[bool, ...]
    opt_order: tuple[int, ...]  # AdamW's parameter j is names[opt_order[j]]
    opt_groups: tuple[dict, ...]  # AdamW's param_groups as its state_dict gives them
    dtype: torch.dtype

    @classmethod
    def of(cls, template: NanoTransformer, cfg: RunConfig, device: torch.device) -> RowLayout:
        named = list(template.named_parameters())
        numels = [p.numel() for _, p in named]
        mask = decay_mask(template)
        opt = make_optimizer(template, cfg, device)
        index_of = {id(p): i for i, (_, p) in enumerate(named)}
        return cls(names=tuple(n for n, _ in named), shapes=tuple(tuple(p.shape) for _, p in named),
                   offsets=tuple(sum(numels[:i]) for i in range(len(numels))), numels=tuple(numels),
                   decays=tuple(mask[n] for n, _ in named),
                   opt_order=tuple(index_of[id(p)] for g in opt.param_groups for p in g["params"]),
                   opt_groups=tuple(opt.state_dict()["param_groups"]), dtype=named[0][1].dtype)

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-name views of one row (N,) → shape, or of stacked rows (K, N) → (K, *shape)."""
        lead = rows.shape[:-1]
        return {n: rows[..., a:a + k].view(*lead, *s)
                for n, a, k, s in zip(self.names, self.offsets, self.numels, self.shapes)}

    def decay_vector(self, device: torch.device) -> torch.Tensor:
        return torch.cat([torch.full((k,), d, dtype=torch.bool) for k, d in zip(self.numels, self.decays)]).to(device)

    def load_row(self, row: torch.Tensor, model_state: dict[str, torch.Tensor]) -> None:
        for n, view in self.views(row).items():
            view.copy_(model_state[n].detach().reshape(view.shape))

    def load_moments(self, m_row: torch.Tensor, v_row: torch.Tensor, opt_state: dict) -> None:
        """AdamW's exp_avg / exp_avg_sq (a torch AdamW state dict's "state") into rows of m and v."""
        m_views, v_views = list(self.views(m_row).values()), list(self.views(v_row).values())
        for j, i in enumerate(self.opt_order):
            if j in opt_state:
                m_views[i].copy_(opt_state[j]["exp_avg"].reshape(m_views[i].shape))
                v_views[i].copy_(opt_state[j]["exp_avg_sq"].reshape(v_views[i].shape))

    def optimizer_state(self, m_row: torch.Tensor, v_row: torch.Tensor, step: int, lr: float) -> dict:
        """torch AdamW's state_dict after ``step`` steps at (last) learning rate ``lr``: live views of m, v."""
        m_views, v_views = list(self.views(m_row).values()), list(self.views(v_row).values())
        # the step's dtype as torch's AdamW makes it: float64 beside float64 parameters, else float32
        step_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        state = {j: {"step": torch.tensor(float(step), dtype=step_dtype), "exp_avg": m_views[i],
                     "exp_avg_sq": v_views[i]}
                 for j, i in enumerate(self.opt_order)}
        groups = copy.deepcopy(list(self.opt_groups))
        for g in groups:
            g["lr"] = lr
        return {"state": state, "param_groups": groups}


@dataclass
class Stacked:
    """The group's training state on the device, one row per model: parameters ``P``, AdamW moments ``m``,
    ``v`` (K, N); ``params``, per-name leaf views of P (autograd's inputs: one gradient per name); the decay
    mask (N,) and clip thresholds (K,); the running statistics of train.py's :class:`RunStats` (float64:
    ``interval`` and ``total`` sums (K, 5), ``final`` the losses of each model's final window, its last
    column a sink for the steps outside it)."""

    P: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    params: dict[str, torch.Tensor]
    decay: torch.Tensor
    clip: torch.Tensor
    interval: torch.Tensor
    total: torch.Tensor
    final: torch.Tensor

    @classmethod
    def zeros(cls, layout: RowLayout, cfgs: Sequence[RunConfig], device: torch.device) -> Stacked:
        K, N, dt = len(cfgs), layout.n_params, layout.dtype
        P = torch.zeros(K, N, device=device, dtype=dt)
        params = {n: p.detach().requires_grad_() for n, p in layout.views(P).items()}
        window = max(final_window(c.steps) for c in cfgs)
        stats = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float64)  # noqa: E731
        clip = torch.tensor([math.inf if c.clip is None else c.clip for c in cfgs], device=device, dtype=dt)
        return cls(P=P, m=torch.zeros_like(P), v=torch.zeros_like(P), params=params,
                   decay=layout.decay_vector(device), clip=clip, interval=stats(K, 5), total=stats(K, 5),
                   final=stats(K, window + 1))

    @property
    def sink(self) -> int:
        """The column of ``final`` for a step outside the final window."""
        return self.final.shape[1] - 1

    def run_stats(self, row: int, window: int, n_interval: int) -> RunStats:
        """Row ``row``'s sums as train.py's RunStats, live on the device (no copy, no wait)."""
        stats = RunStats("cpu", window)  # its zeros replaced at once
        stats.interval, stats.total, stats.n_interval = self.interval[row], self.total[row], n_interval
        stats.final_losses = self.final[row, :window]
        return stats


@dataclass
class Member:
    """One configuration of the group, on the host: its row, hooks, progress and what it has recorded."""

    row: int
    cfg: RunConfig
    hooks: Hooks
    step: int = 0  # steps done (= the next step to run)
    val_history: list = field(default_factory=list)
    n_interval: int = 0
    t_last: float = 0.0
    tokens_last: int = 0
    running: bool = True
    result: TrainResult | None = None
    noise: NoiseTracker | None = None  # None: the run measures no gradient noise
    noise_logs: dict = field(default_factory=dict)  # step → the noise metrics its on_log gets
    _chunks: dict = field(default_factory=dict)

    @property
    def window(self) -> int:
        return final_window(self.cfg.steps)

    @property
    def window_start(self) -> int:
        return self.cfg.steps - self.window

    def starts(self, first: int, n: int, n_tokens: int, context: int) -> torch.Tensor:
        """Batch window starts of steps [first, first+n): exactly BatchSampler's, shape (n, B)."""
        out, s = [], first
        while s < first + n:
            c = s // SAMPLER_CHUNK
            if c not in self._chunks:
                if len(self._chunks) > 2:
                    self._chunks.pop(min(self._chunks))
                self._chunks[c] = batch_starts(self.cfg.seed, c, self.cfg.batch_size, n_tokens, context)
            lo = s - c * SAMPLER_CHUNK
            hi = min(SAMPLER_CHUNK, lo + first + n - s)
            out.append(self._chunks[c][lo:hi])
            s += hi - lo
        return torch.cat(out)

    def schedule(self, first: int, n: int, betas: tuple[float, float], weight_decay: float) -> list[tuple]:
        """AdamW's scalars of steps [first, first+n) in Python double, as torch computes them: ``1 - lr*wd``,
        ``-lr / (1 - beta1**t)``, ``sqrt(1 - beta2**t)`` (t = the step count after the step)."""
        rows = []
        for s in range(first, first + n):
            lr, t = lr_at(self.cfg, s), s + 1
            rows.append((1 - lr * weight_decay, -(lr / (1 - betas[0] ** t)), (1 - betas[1] ** t) ** 0.5))
        return rows


@dataclass
class Pass:
    """The models one training step runs, in what shape, and the device buffers the step reads: the tables
    of the next ``TABLE_CHUNK`` steps (batch window starts (CH, n_seqs) in the members' order, optimizer
    scalars (CH, 3, K), final-window columns (CH, K)) and the counter of the row to read. A CUDA graph
    records the step with these buffers' addresses: they are refilled in place, never replaced."""

    members: list[Member]
    S: int  # sequences per slot
    slot_rows: torch.Tensor  # (M,) the model row of each slot
    slot_weight: torch.Tensor  # (M,) 1 / its model's slot count
    starts: torch.Tensor
    sched: torch.Tensor
    fpos: torch.Tensor
    row: torch.Tensor
    tick: int = TABLE_CHUNK  # ticks since the tables were filled (full: fill them first)
    graph: Any = None  # the recorded step (CUDA)
    warm_left: int = WARM_TICKS

    @property
    def n_seqs(self) -> int:
        return sum(mb.cfg.batch_size for mb in self.members)

    def columns(self) -> list[tuple[Member, int]]:
        """(member, its first column in the step's sequences)."""
        out, c0 = [], 0
        for mb in self.members:
            out.append((mb, c0))
            c0 += mb.cfg.batch_size
        return out


@dataclass
class FetchedLogs:
    """Interval sums on their way to the host: ``sums`` (one row per entry) is filled once ``event`` (CUDA;
    None on CPU: already there) has completed; entries are (member, its step, steps in the interval)."""

    event: Any
    sums: torch.Tensor
    entries: list[tuple[Member, int, int]]


def slot_size(cfgs: Sequence[RunConfig]) -> int:
    """Sequences per slot: the gcd of the phase grid's batch sizes and the group's. Every group of a
    sweep of the phase gets the same S (one compiled pass serves them all), and S divides every batch
    size of the group."""
    return math.gcd(*cfgs[0].phase.grid.batch_sizes, *(c.batch_size for c in cfgs))


def noise_tracker(cfg: RunConfig) -> NoiseTracker | None:
    """The run's noise tracker, as train.py makes it (None: the run measures nothing)."""
    t = cfg.phase.train
    return NoiseTracker(t.noise_interval, t.noise_microbatch, t.tail_index) if cfg.measures_noise else None


def check_group(cfgs: Sequence[RunConfig]) -> None:
    """A group shares the architecture, the optimizer, the data and the validation set."""
    p0 = cfgs[0].phase
    for c in cfgs[1:]:
        p = c.phase
        for what in ("model", "optim", "data"):
            if getattr(p, what) != getattr(p0, what):
                raise ValueError(f"train_group: configs differ in phase.{what} ({getattr(p, what)} vs "
                                 f"{getattr(p0, what)}); a group shares the architecture and the optimizer")
        if p.train.eval_batches != p0.train.eval_batches:
            raise ValueError("train_group: configs differ in train.eval_batches (the validation set)")


# ---------------------------------------------------------------------------------------------------
# The trainer


class GroupTrainer:
    """Trains a group of configurations together (see the module docstring); :func:`train_group` runs it.

    :meth:`build` makes the pass of the running models (any slot size: a measurement pass over the same
    weights is another :class:`Pass`), :meth:`step` runs one training step of the pass and each model's
    ``on_step``, :meth:`after_step` does what the models do then (log, evaluate, checkpoint, finish),
    :meth:`evaluate` computes validation losses, :meth:`deliver_logs` hands the fetched statistics to
    ``on_log``, :meth:`stop` ends a model's run, and :meth:`run` loops until every model has stopped.
    """

    def __init__(self, cfgs: Sequence[RunConfig], corpus: Corpus, device: torch.device,
                 hooks: Sequence[Hooks] | None = None, resume_states: Sequence[dict | None] | None = None,
                 compile: bool | str | dict = False):
        self.t_start = time.perf_counter()
        cfgs = list(cfgs)
        hooks = list(hooks) if hooks is not None else [Hooks() for _ in cfgs]
        resume_states = list(resume_states) if resume_states is not None else [None] * len(cfgs)
        if len(hooks) != len(cfgs) or len(resume_states) != len(cfgs):
            raise ValueError("train_group: hooks and resume_states must have one entry per config")
        check_group(cfgs)
        phase = cfgs[0].phase
        self.corpus, self.device, self.compile = corpus, device, compile
        self.cuda = device.type == "cuda"
        self.n_heads, self.T = phase.model.n_heads, phase.model.context_length
        self.betas = (float(phase.optim.betas[0]), float(phase.optim.betas[1]))
        self.weight_decay, self.eps = phase.optim.weight_decay, float(phase.optim.eps)
        self.S = slot_size(cfgs)
        self.use_graph = self.cuda and bool(compile)  # the compiled step recorded once per pass, then replayed
        self.attend = sdpa_causal
        if self.use_graph and attention.available():
            attention.operator()  # the kernels are defined here, before the first trace
            self.attend = fused_causal
        template = build_model(phase.model, cfgs[0].seed).to(device)
        self.layout = RowLayout.of(template, cfgs[0], device)
        self.members = [Member(row=i, cfg=c, hooks=h, noise=noise_tracker(c))
                        for i, (c, h) in enumerate(zip(cfgs, hooks))]
        self.state = Stacked.zeros(self.layout, cfgs, device)
        inits = {cfgs[0].seed: template.state_dict()}
        for mb, st in zip(self.members, resume_states):
            self._load(mb, st, inits)
        self.offs = torch.arange(self.T + 1, device=corpus.train.device)
        self.val_set = validation_batches(corpus.val, phase.train.eval_batches, self.T)
        self.pending: list[FetchedLogs] = []
        self.row_index: dict[tuple[int, ...], torch.Tensor] = {}  # the device index of a set of rows
        self.ps: Pass | None = None
        self.timings: dict = {"configs": len(cfgs), "ticks": 0, "warm": [], "evals": [], "builds": 0, "noise": []}

    def _load(self, mb: Member, st: dict | None, inits: dict[int, dict]) -> None:
        """Row ``mb.row`` from a checkpoint state (train.py's format, from either path), or its seed's init."""
        s = self.state
        if st is None:
            if mb.cfg.seed not in inits:
                inits[mb.cfg.seed] = build_model(mb.cfg.phase.model, mb.cfg.seed).state_dict()
            self.layout.load_row(s.P[mb.row], inits[mb.cfg.seed])
        else:
            if st.get("config_hash") not in (None, mb.cfg.config_hash()):
                raise ValueError(f"resume state {mb.row} is for another configuration "
                                 f"({st.get('config_hash')} != {mb.cfg.config_hash()})")
            self.layout.load_row(s.P[mb.row], st["model"])
            self.layout.load_moments(s.m[mb.row], s.v[mb.row], st["optimizer"]["state"])
            mb.step, stats = int(st["step"]), st["stats"]
            s.interval[mb.row], s.total[mb.row] = stats["interval"].to(self.device), stats["total"].to(self.device)
            mb.n_interval = int(stats["n_interval"])
            s.final[mb.row, :len(stats["final_losses"])] = stats["final_losses"].to(self.device)
            mb.val_history = list(st["val_history"])
            if mb.noise is not None and st.get("noise"):  # a run trained without measurement has none
                mb.noise.load_state_dict(st["noise"])
        mb.tokens_last = mb.step
        if mb.step >= mb.cfg.steps:  # a state taken at the end: nothing left to train
            self.stop(mb, "FINISHED")

    # --- the pass ------------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast on CUDA, as train.py (float64 tensors stay float64); no cached casts under a CUDA
        graph: a cast cached while recording would be stale at the next replay."""
        if not self.cuda:
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.use_graph)

    def build(self, S: int | None = None) -> Pass:
        """A pass over the running models, in slots of ``S`` sequences (default: the group's slot size)."""
        S = S or self.S
        live = [mb for mb in self.members if mb.running]
        n_slots = [mb.cfg.batch_size // S for mb in live]
        dev, K, dt = self.device, len(self.members), self.layout.dtype
        slot_rows = torch.tensor([mb.row for mb, n in zip(live, n_slots) for _ in range(n)], device=dev)
        slot_weight = torch.tensor([1 / n for n in n_slots for _ in range(n)], device=dev, dtype=dt)
        n_seqs = sum(mb.cfg.batch_size for mb in live)
        return Pass(members=live, S=S, slot_rows=slot_rows, slot_weight=slot_weight,
                    starts=torch.zeros(TABLE_CHUNK, n_seqs, dtype=torch.long, device=self.corpus.train.device),
                    sched=torch.ones(TABLE_CHUNK, 3, K, device=dev, dtype=dt),
                    fpos=torch.full((TABLE_CHUNK, K), self.state.sink, dtype=torch.long, device=dev),
                    row=torch.zeros(1, dtype=torch.long, device=dev))

    def fill_tables(self, ps: Pass) -> None:
        """The pass's tables for its next TABLE_CHUNK steps (in place), the row counter back to 0."""
        CH, K, T = TABLE_CHUNK, len(self.members), self.T
        starts = torch.zeros(CH, ps.n_seqs, dtype=torch.long)
        sched = torch.empty(CH, 3, K, dtype=torch.float64)
        sched[:] = torch.tensor(FROZEN_SCHED, dtype=torch.float64)[:, None]
        fpos = torch.full((CH, K), self.state.sink, dtype=torch.long)
        for mb, c0 in ps.columns():
            starts[:, c0:c0 + mb.cfg.batch_size] = mb.starts(mb.step, CH, len(self.corpus.train), T)
        for mb in self.members:
            if not mb.running:
                continue
            sched[:, :, mb.row] = torch.tensor(mb.schedule(mb.step, CH, self.betas, self.weight_decay),
                                               dtype=torch.float64)
            for r in range(CH):
                if mb.window_start <= mb.step + r < mb.cfg.steps:
                    fpos[r, mb.row] = mb.step + r - mb.window_start
        tables = (starts, sched.to(self.layout.dtype), fpos)
        if self.cuda:
            tables = tuple(t.pin_memory() for t in tables)
        for dst, src in zip((ps.starts, ps.sched, ps.fpos), tables):
            dst.copy_(src, non_blocking=True)
        ps.row.zero_()
        ps.tick = 0

    def freeze(self, mb: Member, ps: Pass) -> None:
        """A stopped model in the pass's current tables: no more updates (lr 0), no more statistics."""
        for i, value in enumerate(FROZEN_SCHED):
            ps.sched[:, i, mb.row] = value
        ps.fpos[:, mb.row] = self.state.sink

    def pass_grads(self, ps: Pass, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The gradient of every model's loss on its sequences of x, y (n_seqs, T, in the pass's column
        order), per parameter name (K, *shape), and each model's loss (K,)."""
        params = self.state.params
        xs, ys = x.view(-1, ps.S, self.T), y.view(-1, ps.S, self.T)
        args = (params, ps.slot_rows, ps.slot_weight, xs, ys, self.n_heads, self.attend)
        with self.autocast():
            if self.compile:
                dims = [(p, 0) for p in params.values()] + [(t, 0) for t in (ps.slot_rows, ps.slot_weight, xs, ys)]
                loss, model_loss = call_dynamic(compiled(pass_losses, self.compile), dims, *args)
            else:
                loss, model_loss = pass_losses(*args)
        return torch.autograd.grad(loss, list(params.values())), model_loss

    def run_step(self, ps: Pass) -> None:
        """One training step of the pass, all on the device, reading only the pass's buffers (its tables,
        at the row ``ps.row`` says, then advanced): the work a CUDA graph records and replays."""
        s, r = self.state, ps.row
        x, y = windows(self.corpus.train, ps.starts.index_select(0, r)[0], self.offs)
        grads, model_loss = self.pass_grads(ps, x, y)
        sched, fpos = ps.sched.index_select(0, r)[0], ps.fpos.index_select(0, r)[0]
        args = (s.P, s.m, s.v, list(grads), s.decay, s.clip, sched, fpos, model_loss, s.interval, s.total, s.final,
                *self.betas, self.eps)
        with torch.no_grad():
            if self.compile:
                per_model = (s.P, s.m, s.v, *grads, s.clip, fpos, model_loss, s.interval, s.total, s.final)
                dims = [(t, 0) for t in per_model] + [(sched, 1), (s.final, 1)]
                call_dynamic(compiled(update_rows), dims, *args)
            else:
                update_rows(*args)
            r.add_(1)

    # --- gradient noise ------------------------------------------------------------------------------
    def measure_noise(self, ps: Pass) -> None:
        """Measure the gradient noise of the models whose next step is one of their measurements (a logging
        step at least noise_interval after the last, :meth:`NoiseTracker.due`), on that step's batch (the
        pass's table row of this tick) at the parameters before the update, as train.py does; the metrics
        wait in ``noise_logs`` for that step's on_log. Models of one micro-batch count are measured together.
        Outside the training step and its CUDA graph: the step's gradients and the RNG are left alone."""
        measuring = [mb for mb in ps.members if mb.running and mb.noise is not None
                     and mb.noise.due(mb.step + 1, due(mb.step + 1, mb.cfg.phase.train.log_interval, mb.cfg.steps))]
        if not measuring:
            return
        t0 = time.perf_counter()
        x, y = windows(self.corpus.train, ps.starts[ps.tick], self.offs)
        first = {mb.row: c0 for mb, c0 in ps.columns()}
        by_shape: dict[tuple[int, int], list[Member]] = {}
        for mb in measuring:
            by_shape.setdefault((mb.cfg.batch_size, mb.noise.microbatch), []).append(mb)
        for (B, b), members in by_shape.items():
            xs = torch.stack([x[first[mb.row]:first[mb.row] + B] for mb in members]).view(len(members), B // b, b, -1)
            ys = torch.stack([y[first[mb.row]:first[mb.row] + B] for mb in members]).view(xs.shape)
            self._measure_models(members, xs, ys)
        self.timings["noise"].append(time.perf_counter() - t0)

    def _measure_models(self, members: list[Member], xs: torch.Tensor, ys: torch.Tensor) -> None:
        """One measurement of ``members`` (same micro-batch count k) on their batches xs, ys (n, k, b, T),
        chunk by chunk (:func:`scaling.group_noise.chunk_plan`), into their trackers."""
        n, k, b = xs.shape[:3]
        rows = torch.tensor([mb.row for mb in members], device=self.device)
        v_views = list(self.layout.views(self.state.v.index_select(0, rows)).values())
        sums = GroupSums.start(v_views, [mb.step for mb in members], self.betas[1], self.eps, k, b,
                               members[0].noise.tail)
        per_slot = self.layout.n_params * self.state.P.element_size()
        for m0, m1, lo, hi in chunk_plan(n, k, CHUNK_BYTES // per_slot):
            sums.add(m0, m1, lo, self.microbatch_grads(rows[m0:m1], xs[m0:m1, lo:hi], ys[m0:m1, lo:hi]))
        alphas = sums.alphas([mb.cfg.seed * SEED_STRIDE + mb.step + 1 for mb in members])
        for i, (mb, est) in enumerate(zip(members, sums.estimates())):
            done = mb.step + 1
            mb.noise_logs[done] = mb.noise.update(done, est, None if alphas is None else alphas[i])

    def microbatch_grads(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of each micro-batch's mean loss, for models ``rows`` (n,) on x, y (n, kc, b, T):
        per parameter name (n·kc, *shape), model-major. Each slot gets its own copy of its model's weights
        as a leaf, so autograd gives per-slot gradients; compiled once (slots dynamic) beside the training
        pass, which it leaves as it is."""
        kc, b, T = x.shape[1:]
        slot_rows = rows.repeat_interleave(kc)
        W = {name: p.detach().index_select(0, slot_rows).requires_grad_() for name, p in self.state.params.items()}
        args = (W, x.reshape(-1, b, T), y.reshape(-1, b, T), self.n_heads, self.attend)
        with torch.enable_grad(), self.autocast():
            if self.compile:
                dims = [(w, 0) for w in W.values()] + [(args[1], 0), (args[2], 0)]
                loss = call_dynamic(compiled(slot_loss_sum), dims, *args)
            else:
                loss = slot_loss_sum(*args)
        return list(torch.autograd.grad(loss, list(W.values())))

    def _launch(self, ps: Pass) -> None:
        """Run the step: replayed once recorded; on CUDA graphs, the last warm tick runs on the side stream
        the graph is then recorded on (recording runs nothing: the graph's first replay is the next tick)."""
        if ps.graph is not None:
            ps.graph.replay()
        elif self.use_graph and ps.warm_left == 1:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.run_step(ps)
            torch.cuda.current_stream(self.device).wait_stream(side)
            ps.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(ps.graph, stream=side, capture_error_mode="thread_local"):
                self.run_step(ps)
        else:
            self.run_step(ps)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step(self) -> list[Member]:
        """One training step of the pass (built first if there is none) and each model's ``on_step``;
        returns the models a hook stopped."""
        if self.ps is None:
            self.ps = self.build()
            self.timings["builds"] += 1
        ps = self.ps
        if ps.tick >= TABLE_CHUNK:
            self.fill_tables(ps)
        self.measure_noise(ps)  # the step's batch at the parameters before its update
        t0 = time.perf_counter() if ps.warm_left else None
        self._launch(ps)
        ps.tick += 1
        self.timings["ticks"] += 1
        stopped: list[Member] = []
        for mb in ps.members:
            if not mb.running:
                continue
            mb.step += 1
            mb.n_interval += 1
            try:
                mb.hooks.on_step(mb.step)
            except Pruned:  # the sums its earlier steps logged reach its hooks first, as in train.py
                stopped += self.deliver_logs(wait=True)
                if mb.running:
                    stopped.append(self.stop(mb, "PRUNED"))
        if t0 is not None:
            self.sync()
            self.timings["warm"].append(time.perf_counter() - t0)
            ps.warm_left -= 1
        return stopped

    def after_step(self) -> list[Member]:
        """What the models of the pass do after a step, in train.py's order: their interval sums are
        fetched without waiting for the GPU and handed to on_log once they have arrived — at the latest
        before an evaluation, a checkpoint or the end of a run (on_step, a progress count, may run a few
        steps ahead of on_log) —, then evaluations (one batched pass), checkpoints, ends. Returns the
        models that stopped."""
        live = [mb for mb in self.ps.members if mb.running]
        logging = [mb for mb in live if due(mb.step, mb.cfg.phase.train.log_interval, mb.cfg.steps)]
        if logging:
            self.fetch_logs(logging)
        evals_now = [due(mb.step, mb.cfg.phase.train.eval_interval, mb.cfg.steps) for mb in live]
        ckpts_now = [due(mb.step, mb.cfg.phase.train.checkpoint_every, mb.cfg.steps) for mb in live]
        sync_point = not self.cuda or any(e or c or mb.step >= mb.cfg.steps
                                          for mb, e, c in zip(live, evals_now, ckpts_now))
        stopped = self.deliver_logs(wait=sync_point)  # a model it stops is no longer running
        stopped += self._evaluations([mb for mb, e in zip(live, evals_now) if e and mb.running])
        for mb, c in zip(live, ckpts_now):
            if c and mb.running:
                try:
                    mb.hooks.on_checkpoint(mb.step, self.state_of(mb))
                except Pruned:
                    stopped.append(self.stop(mb, "PRUNED"))
        return stopped + [self.stop(mb, "FINISHED") for mb in live if mb.running and mb.step >= mb.cfg.steps]

    def _evaluations(self, evaluating: list[Member]) -> list[Member]:
        if not evaluating:
            return []
        t0 = time.perf_counter()
        vals = self.evaluate(evaluating)
        self.timings["evals"].append(time.perf_counter() - t0)
        stopped = []
        for mb, val in zip(evaluating, vals):
            mb.val_history.append((mb.step, val))
            try:
                mb.hooks.on_eval(mb.step, val)
            except Pruned:
                stopped.append(self.stop(mb, "PRUNED"))
                continue
            if not math.isfinite(val):
                stopped.append(self.stop(mb, "DIVERGED"))
        return stopped

    @torch.no_grad()
    def evaluate(self, members: Sequence[Member]) -> list[float]:
        """The mean validation loss of each of these models. Compiled: one forward of all K models, whichever
        evaluate (one shape, one compile); eager: of these models only."""
        rows = [mb.row for mb in members]
        W = {n: p.detach() for n, p in self.state.params.items()}
        if not self.compile:
            idx = torch.tensor(rows, device=self.device)
            W = {n: p.index_select(0, idx) for n, p in W.items()}
        M = len(next(iter(W.values())))
        total = torch.zeros(M, device=self.device, dtype=self.layout.dtype)
        for x, y in self.val_set:
            args = (W, x.expand(M, *x.shape), y.expand(M, *y.shape), self.n_heads, self.attend)
            with self.autocast(), sdpa_backends(EVAL_SDPA, self.device):
                if self.compile:
                    dims = [(w, 0) for w in W.values()] + [(t, 0) for t in args[1:3]]
                    total += call_dynamic(compiled(eval_losses), dims, *args)
                else:
                    total += eval_losses(*args)
        vals = (total / len(self.val_set)).tolist()
        return [vals[r] for r in rows] if self.compile else vals

    def state_of(self, mb: Member) -> dict[str, Any]:
        """The model's checkpoint state in train.py's format. Its tensors are live views of the group's
        buffers (as train.py's state_dict() tensors are live): a hook copies what it keeps, with no wait
        for the GPU here."""
        s, r = self.state, mb.row
        return {"model": self.layout.views(s.P[r]),
                "optimizer": self.layout.optimizer_state(s.m[r], s.v[r], mb.step, lr_at(mb.cfg, mb.step - 1)),
                "step": mb.step, "stats": s.run_stats(r, mb.window, mb.n_interval).state(),
                "val_history": list(mb.val_history), "config_hash": mb.cfg.config_hash(),
                "noise": mb.noise.state_dict() if mb.noise is not None else None,
                "rng_cpu": torch.random.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if self.cuda else None}

    # --- logging without a sync ----------------------------------------------------------------------
    def fetch_logs(self, logging: list[Member]) -> None:
        """Queue the copy of these models' interval sums to the host and restart their intervals (both on
        the device, in stream order): no wait for the GPU here."""
        key = tuple(mb.row for mb in logging)
        if key not in self.row_index:
            self.row_index[key] = torch.tensor(key, device=self.device)
        idx, interval = self.row_index[key], self.state.interval
        host = torch.empty(len(key), interval.shape[1], dtype=interval.dtype, pin_memory=self.cuda)
        host.copy_(interval.index_select(0, idx), non_blocking=self.cuda)
        interval.index_fill_(0, idx, 0.0)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append(FetchedLogs(event, host, [(mb, mb.step, mb.n_interval) for mb in logging]))
        for mb in logging:
            mb.n_interval = 0

    def deliver_logs(self, wait: bool) -> list[Member]:
        """Hand the fetched sums that have arrived (all of them with ``wait``) to on_log, oldest first;
        stop the models whose means are not finite (DIVERGED, at the step they were logged) or whose hook
        prunes them. Returns the stopped models."""
        out: list[Member] = []
        while self.pending and (wait or self.pending[0].event is None or self.pending[0].event.query()):
            got = self.pending.pop(0)
            if got.event is not None:
                got.event.synchronize()
            now = time.perf_counter()
            for (mb, step, n), sums in zip(got.entries, got.sums):
                if not mb.running:
                    continue
                means = (sums / n).tolist()
                if not all(math.isfinite(x) for x in means[:2]):
                    mb.step = step
                    out.append(self.stop(mb, "DIVERGED"))
                    continue
                metrics = dict(zip(LOG_METRICS, means))
                metrics["lr"] = lr_at(mb.cfg, step - 1)
                metrics["tokens_per_s"] = (step - mb.tokens_last) * mb.cfg.tokens_per_step / max(now - mb.t_last, 1e-9)
                metrics.update(mb.noise_logs.pop(step, {}))
                mb.t_last, mb.tokens_last = now, step
                try:
                    mb.hooks.on_log(step, metrics)
                except Pruned:
                    mb.step = step
                    out.append(self.stop(mb, "PRUNED"))
        return out

    # --- stopping ------------------------------------------------------------------------------------
    def stop(self, mb: Member, status: str) -> Member:
        """End the model's run with ``status``: its TrainResult through train.py's own summary."""
        mb.running = False
        steps_done = mb.cfg.steps if status == "FINISHED" else mb.step
        stats = self.state.run_stats(mb.row, mb.window, mb.n_interval)
        stats.interval, stats.total = stats.interval.cpu(), stats.total.cpu()
        stats.final_losses = stats.final_losses.cpu()
        n_params = self.layout.n_params
        mb.result = TrainResult(status=status, steps_done=steps_done, n_params=n_params,
                                summary=summarize(mb.cfg, stats, mb.val_history, steps_done, status, n_params,
                                                  self.corpus, mb.noise),
                                val_history=list(mb.val_history))
        return mb

    def retire(self, stopped: list[Member]) -> None:
        """Freeze the stopped models in the pass and rebuild it without them, unless (compiled) it would
        be a single slot: a size-1 dimension is a compile of its own, their frozen compute is cheaper."""
        for mb in stopped:
            self.freeze(mb, self.ps)
        slots = sum(mb.cfg.batch_size for mb in self.members if mb.running) // self.ps.S
        if any(mb.running for mb in self.members) and (not self.compile or slots >= 2):
            self.ps = None

    def run(self) -> list[TrainResult]:
        """Train until every model has stopped; one result per config, in the group's order."""
        self.timings["setup_s"] = time.perf_counter() - self.t_start
        for mb in self.members:
            mb.t_last = time.perf_counter()
        try:
            while any(mb.running for mb in self.members):
                stopped = self.step()
                stopped += self.after_step()
                if stopped:
                    self.retire(stopped)
        except BaseException:  # Ctrl-C, SIGTERM, an error: the sums already fetched still reach their hooks
            try:
                self.deliver_logs(wait=True)
            except Exception:
                pass
            raise
        self.sync()
        self.timings["wall_s"] = time.perf_counter() - self.t_start
        self.timings["eval_s"] = sum(self.timings["evals"])
        return [mb.result for mb in self.members]


def train_group(cfgs: Sequence[RunConfig], corpus: Corpus, device: torch.device,
                hooks: Sequence[Hooks] | None = None, resume_states: Sequence[dict | None] | None = None,
                compile: bool | str | dict = False, *, timings: dict | None = None) -> list[TrainResult]:
    """Train every config of ``cfgs`` together on ``corpus`` (already on ``device``); one result per config.

    Per config i, exactly as ``train(cfgs[i], corpus, device, hooks[i], resume_states[i])``: the same
    hook calls at the same steps with the same metric names (``on_step`` every step, ``on_log`` every
    ``log_interval`` and at the end, ``on_eval`` every ``eval_interval`` and at the end — a ``Pruned``
    raised by one config's hook stops that config only — and ``on_checkpoint(step, state)`` every
    ``checkpoint_every`` and at the end), the same divergence rule, the same summaries. The checkpoint
    state has train.py's format (model state_dict, torch AdamW state_dict, step, stats, val_history,
    config_hash, rng states): a config can be resumed here or by ``train``, from a state made by either.
    ``tokens_per_s`` in ``on_log`` is that config's tokens per second of the group's wall time.
    Precision as train.py's: the parameters' dtype (the default dtype), bf16 autocast on CUDA.

    compile: False, True (``torch.compile``'s default mode), a mode name ("max-autotune-no-cudagraphs",
    ...) or a dict of inductor options (``config.COMPILE_MODES`` gives the ones ``--compile-mode`` names),
    for the training pass; the optimizer step and the evaluation are compiled in the default mode. On CUDA
    a compiled step is recorded as a CUDA graph after the first ticks of each pass and replayed every step,
    and causal attention runs as this project's Triton kernels where they apply (else SDPA, as always
    uncompiled). Evaluations use the SDPA backends other than cuDNN (``EVAL_SDPA``).
    timings: if a dict is given it is filled with ``wall_s``, ``setup_s`` (before the first step),
    ``ticks`` (steps of the group), ``warm`` (seconds of the first ticks after each build of the pass,
    synchronised: compile time lands there), ``eval_s``, ``evals`` (seconds of each evaluation; a compiled
    one's first holds its compile), ``builds`` (how many times the pass was built), ``configs`` (K),
    ``noise`` (seconds of each gradient-noise measurement, all measured models together);
    :func:`timing_metrics` sums them up.
    """
    cfgs = list(cfgs)
    if not cfgs:
        return []
    trainer = GroupTrainer(cfgs, corpus, device, hooks, resume_states, compile)
    results = trainer.run()
    if timings is not None:
        timings.update(trainer.timings)
    return results


def timing_metrics(tm: dict) -> dict[str, float]:
    """A group's ``timings`` (train_group's) as the metrics each of its MLflow runs gets: ``group_configs``
    (configs trained together), ``group_setup_s`` (before the first step), ``group_first_ticks_s`` (the
    first WARM_TICKS ticks after each build of the pass: its compile lands there), ``group_step_ms`` (every
    other tick: the wall time between the first ticks and the end, less the evaluations, per tick — logging
    and checkpoint hand-overs included, gradient-noise measurements too), ``group_eval_s`` (all evaluations; a
    compiled one's first holds its compile), ``group_wall_s`` and, when the group measured gradient noise,
    ``group_noise_s`` (all measurements; the first holds the measurement pass's compile). Nothing when the group
    did not train (no timings)."""
    if "wall_s" not in tm:
        return {}
    first = sum(tm["warm"])
    rest = tm["ticks"] - len(tm["warm"])
    out = {"group_configs": float(tm["configs"]), "group_setup_s": tm["setup_s"], "group_first_ticks_s": first,
           "group_eval_s": tm["eval_s"], "group_wall_s": tm["wall_s"]}
    if rest > 0:
        out["group_step_ms"] = 1000 * (tm["wall_s"] - tm["setup_s"] - first - tm["eval_s"]) / rest
    if tm.get("noise"):
        out["group_noise_s"] = sum(tm["noise"])
    return out
