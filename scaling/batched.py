"""Batched multi-config training: K configurations of one architecture trained together in one pass.

Every configuration of a group shares the phase's model and optimizer settings (architecture, betas, eps,
weight decay, schedule) and may differ in batch size, LR, clip threshold, seed and number of steps.
The result of each configuration is the one :func:`scaling.train.train` gives it alone (same init from
``build_model(cfg, seed)``, same batches from ``BatchSampler``, same LR schedule, same AdamW and clip
formulas, same validation batches, same hooks, same ``TrainResult``), up to floating-point summation order.

How (the layout)
  * Parameters live in one fp32 matrix ``P`` of shape (K, N): row k is model k's parameters, flattened in
    ``named_parameters`` order. The forward pass sees them as per-name views (K, *shape); AdamW moments
    ``m``, ``v`` are (K, N) too, so the optimizer is a handful of elementwise ops over (K, N).
  * ``layout="slots"`` (default): each model's batch is split into slots of S sequences, S = gcd of the
    batch sizes in the pass (the phase 2.5 grid: S = 32, B=256 → 8 slots). Each slot gathers its model's
    weights (``index_select`` along the model dimension) and all slots run as one set of batched matmuls;
    a model's loss is the mean of its slots' means (= the mean over its B·T tokens). One graph whatever
    the batch sizes, so ``torch.compile`` compiles once.
    ``layout="groups"``: models sorted by batch size, each run of consecutive models with equal B is one
    batched forward on slices of the weights (no gather, one graph per batch size).
  * The loss that is differentiated is the *sum* of the models' losses: each model's gradient is exactly
    its own loss's gradient (no 1/K).
  * Per model: global gradient norm over its own row, ``scale = clamp(clip / (norm + 1e-6), max=1)``,
    AdamW with its own lr (warmup/schedule from :func:`scaling.train.lr_at`) and its own step count,
    decoupled weight decay only on the ≥2-D parameters (:func:`scaling.model.decay_mask`). The scalars
    torch's AdamW computes in Python double (``1 - lr*wd``, ``lr / (1 - beta1**t)``,
    ``sqrt(1 - beta2**t)``) are computed the same way on the host, a chunk of steps at a time, and
    applied per row: on CPU in fp32 the update is torch's own arithmetic, element by element.
  * Nothing is shared between models: no common norm, no mean over models, no shared optimizer scalar.
    A non-finite model only poisons its own row.

Per step there is no host sync: batch indices and the per-model optimizer scalars are precomputed for
256 steps into tables on the device that the step reads by a device-side counter (so that, compiled on
CUDA, the whole step is one CUDA graph replayed every tick), running statistics (the same ``RunStats`` sums
as train.py, one row per model) are accumulated on the device and copied to the host once per logging
interval without waiting (handed to the hooks when they have arrived, and always before an evaluation,
a checkpoint or the end of a run).

Models that stop (finished, diverged, pruned) are frozen at once (lr 0, nothing more recorded) and are
dropped from the pass — their compute stops — immediately in eager mode; under ``torch.compile`` (a new
pass shape means a recompile) when at least a quarter of the pass's sequences belong to stopped models.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from scaling.config import ModelConfig, RunConfig
from scaling.data import SAMPLER_CHUNK, Corpus, batch_starts, validation_batches, windows
from scaling.model import build_model, decay_mask
from scaling.train import (LOG_METRICS, Hooks, Pruned, TrainResult, RunStats, summarize, clip_stats, due, final_window,
                           lr_at, make_optimizer)

TABLE_CHUNK = 256  # steps of batch indices / optimizer scalars prepared at a time
# the optimizer scalars of a model that must not move (stopped, or not in the tables): 1 - lr*wd = 1,
# -lr / (1 - beta1**t) = 0, and any non-zero sqrt(1 - beta2**t)
FROZEN_SCHED = (1.0, 0.0, 1.0)
REBUILD_DEAD_FRACTION = 0.25  # compiled mode: drop stopped models from the pass once they hold this share
LAYOUTS = ("slots", "groups")
PRECISIONS = ("auto", "fp32", "bf16")
RECOMPILE_LIMIT = 64  # dynamo versions kept per compiled function (default 8), see train_group
WARM_TICKS = 3  # ticks timed (with a sync) after each (re)build of the pass, for compile-time accounting
SCOPES = ("block", "graph")
ATTENTION = ("auto", "default", "flash", "efficient", "cudnn", "math", "flex", "fused")
CUDA_GRAPH = ("auto", "on", "off")


# ---------------------------------------------------------------------------------------------------
# The batched model: the NanoTransformer forward on stacked weights


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * w[:, None, :] + b[:, None, :]


# An attention function ``attend(qkv, T, H)`` takes a block's q/k/v projection, (M, S*T, 3C): q, k, v in
# columns [0, C), [C, 2C), [2C, 3C), head h in columns [h*D, (h+1)*D) of each; it returns the causal
# attention of every length-T sequence, the H heads side by side, (M, S*T, C).


def split_heads(qkv: torch.Tensor, T: int, H: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of (M, S*T, 3C) as (M*S, H, T, D) views, the layout of SDPA and FlexAttention."""
    C = qkv.shape[-1] // 3
    return tuple(z.reshape(-1, T, H, C // H).transpose(1, 2) for z in qkv.split(C, dim=2))


def merge_heads(att: torch.Tensor, M: int) -> torch.Tensor:
    """(M*S, H, T, D) → (M, S*T, H*D)."""
    MS, H, T, D = att.shape
    return att.transpose(1, 2).reshape(M, MS // M * T, H * D)


def _sdpa_causal(qkv: torch.Tensor, T: int, H: int) -> torch.Tensor:
    return merge_heads(F.scaled_dot_product_attention(*split_heads(qkv, T, H), is_causal=True), qkv.shape[0])


def flex_causal(T: int, device: torch.device, options: dict | None = None):
    """Causal attention through FlexAttention (``attention="flex"``): under ``torch.compile`` a Triton
    kernel generated for this shape (forward and backward), instead of one of the SDPA backends.
    ``options``: FlexAttention's ``kernel_options`` (tile sizes, stages, warps of its kernels, e.g.
    ``bwd_BLOCK_M1``) and ``BLOCK_SIZE``, the block mask's block size (default 128; at context 128 a
    smaller one lets the kernels skip the blocks above the diagonal); None: inductor's defaults."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    options = dict(options or {})
    block = options.pop("BLOCK_SIZE", None)
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device,
                             **({"BLOCK_SIZE": block} if block else {}))
    kernel_options = options or None

    def attend(qkv: torch.Tensor, T_: int, H: int) -> torch.Tensor:
        out = flex_attention(*split_heads(qkv, T_, H), block_mask=mask, kernel_options=kernel_options)
        return merge_heads(out, qkv.shape[0])
    return attend


def fused_available() -> bool:
    """Whether ``attention="fused"`` can run its own kernels here (Triton importable)."""
    from scaling.attention import available
    return available()


def fused_causal(fallback, options: tuple[int, int, int, int] | None = None):
    """Causal attention through this project's Triton kernels (``attention="fused"``,
    :mod:`scaling.attention`): they read q/k/v where the projection wrote them and write the heads side by
    side, forward and backward, with no transposes or concatenations around them. A shape, dtype or
    device they do not handle (fp32, a head dim not in ``HEAD_DIMS``, T not a multiple of their block) goes
    to ``fallback``, another attention function. ``options``: the kernels' launch options
    (:func:`scaling.attention.parse_options`; None: ``scaling.attention.OPTIONS``)."""
    from scaling import attention as fused

    opts = list(options or fused.OPTIONS)
    op = fused.operator() if fused.available() else None  # defined here: not traceable under torch.compile

    def attend(qkv: torch.Tensor, T: int, H: int) -> torch.Tensor:
        if op is not None and qkv.is_cuda and fused.supports(T, qkv.shape[-1] // 3, H, qkv.dtype, opts[0]):
            return op(qkv.contiguous(), T, H, opts)[0]
        return fallback(qkv, T, H)
    return attend


# FlexAttention options measured fastest per (CUDA capability, head dim): benchmarks/bench_flex.py, then the
# whole step (docs/performance.md, sixth round: sm90, measured on an H100, at head dim 32: 0.98 → 0.74 ms
# per layer forward and backward, 16.20 → 15.29 ms per step of the phase 2.5 grid). Elsewhere inductor's
# defaults.
FLEX_TUNED: dict[tuple[tuple[int, int], int], str] = {((9, 0), 32): "64/-/32.64.64.32.1.4"}


def tuned_flex_options(device: torch.device, head_dim: int) -> dict | None:
    """FlexAttention options of ``FLEX_TUNED`` for this device's GPU and head dim, or None (defaults)."""
    if device.type != "cuda":
        return None
    spec = FLEX_TUNED.get((torch.cuda.get_device_capability(device), head_dim))
    return flex_spec(spec) if spec else None


FLEX_FWD_KEYS = ("fwd_BLOCK_M", "fwd_BLOCK_N", "fwd_num_stages", "fwd_num_warps")
FLEX_BWD_KEYS = ("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2", "bwd_num_stages", "bwd_num_warps")


def flex_spec(spec: str) -> dict:
    """FlexAttention options (``train_group(flex_options=)``) from ``BLOCK/FWD/BWD``: the block mask's block
    size, the forward's ``M.N.STAGES.WARPS`` and the backward's ``M1.N1.M2.N2.STAGES.WARPS``, each part "-"
    (or empty) for inductor's default; a spec without "/" is the backward's alone. "64/-/32.64.64.32.3.4":
    blocks of 64, the default forward, backward tiles 32/64/64/32, 3 stages, 4 warps."""
    parts = spec.split("/") if "/" in spec else ["", "", spec]
    if len(parts) != 3:
        raise ValueError(f"flex spec {spec!r}: want BLOCK/FWD/BWD")
    out: dict = {}
    for text, keys, want in zip(parts, (("BLOCK_SIZE",), FLEX_FWD_KEYS, FLEX_BWD_KEYS),
                                ("BLOCK", "M.N.STAGES.WARPS", "M1.N1.M2.N2.STAGES.WARPS")):
        if text in ("", "-"):
            continue
        try:
            values = [int(x) for x in text.split(".")]
        except ValueError:
            values = []
        if len(values) != len(keys) or min(values) <= 0:
            raise ValueError(f"flex spec {spec!r}: {text!r} is not {want} (positive integers)")
        out.update(zip(keys, values))
    return out


def _block(h: torch.Tensor, ln1w: torch.Tensor, ln1b: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor,
           ln2w: torch.Tensor, ln2b: torch.Tensor, fc: torch.Tensor, fc_proj: torch.Tensor, S: int,
           n_heads: int, attend=_sdpa_causal) -> torch.Tensor:
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
    """Final LayerNorm, tied head, fp32 cross-entropy: the mean loss of each slot, (M,)."""
    M, ST, _ = h.shape
    logits = torch.bmm(_layer_norm(h, lnw, lnb), wte.transpose(1, 2))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32, as NanoTransformer.loss
    ce = F.cross_entropy(logits.reshape(M * ST, -1), y.reshape(-1), reduction="none")
    return ce.view(M, ST).mean(1)


BLOCK_PARAMS = ("ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.proj.weight", "ln2.weight", "ln2.bias",
                "mlp.fc.weight", "mlp.proj.weight")


@dataclass(frozen=True)
class Regions:
    """The functions a forward pass is made of: plain, or each one compiled once (``scope="block"``)."""
    embed: Any = _embed
    block: Any = _block
    head: Any = _head_losses


EAGER = Regions()


def stacked_slot_losses(W: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        mc: ModelConfig, regions: Regions = EAGER, attend=_sdpa_causal) -> torch.Tensor:
    """Mean cross-entropy of each slot: ``W[name]`` is (M, *shape), x and y are (M, S, T) → (M,).

    Slot j runs the NanoTransformer with weights ``W[name][j]`` on its S sequences: the same
    operations as ``NanoTransformer.loss`` (pre-LN blocks, causal SDPA, 4x GELU MLP, tied head,
    logits in fp32 for the cross-entropy), as batched matmuls over the slot dimension.
    ``regions`` are the three functions the pass is made of (embeddings, a block, the head):
    ``torch.compile`` can compile each once (``scope="block"``: the same compiled block serves every
    layer) instead of the whole unrolled pass. ``attend(qkv, T, H)`` is the causal attention.
    """
    S, H = x.shape[1], mc.n_heads
    h = regions.embed(x, W["wte.weight"], W["wpe.weight"])
    for i in range(mc.n_layers):
        h = regions.block(h, *[W[f"blocks.{i}.{n}"] for n in BLOCK_PARAMS], S, H, attend)
    return regions.head(h, W["ln_f.weight"], W["ln_f.bias"], W["wte.weight"], y)


def _make_slots_loss(names: list[str], mc: ModelConfig, K: int, segments: tuple[tuple[int, int, int], ...],
                     S: int, regions: Regions = EAGER, attend=_sdpa_causal):
    """Loss of the "slots" layout: every live model's batch as B/S slots of S sequences, one batched pass.

    ``segments`` are runs of consecutive rows [a, b) of equal batch size B: the slots' weights are
    ``p[a:b]`` repeated B/S times (an expand, so the backward is a sum over each model's slots).
    """
    def gather(p: torch.Tensor) -> torch.Tensor:
        pieces = []
        for a, b, B in segments:
            n = B // S
            pieces.append(p[a:b] if n == 1 else p[a:b].unsqueeze(1).expand(b - a, n, *p.shape[1:]).reshape(
                (b - a) * n, *p.shape[1:]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def loss(params: list[torch.Tensor], rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        W = {n: gather(p) for n, p in zip(names, params)}
        slot_loss = stacked_slot_losses(W, x, y, mc, regions, attend)
        per_model, off = [], 0
        for a, b, B in segments:
            n = B // S
            k = (b - a) * n
            per_model.append(slot_loss[off:off + k].view(b - a, n).mean(1))  # the mean over its B·T tokens
            off += k
        losses = torch.cat(per_model)
        model_loss = torch.zeros(K, device=losses.device, dtype=losses.dtype).index_copy(0, rows, losses.detach())
        return losses.sum(), model_loss

    return loss


def _make_groups_loss(names: list[str], mc: ModelConfig, K: int, segments: tuple[tuple[int, int, int], ...],
                      regions: Regions = EAGER, attend=_sdpa_causal):
    def loss(params: list[torch.Tensor], rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        T = x.shape[-1]
        out, off = [], 0
        for a, b, B in segments:
            n = (b - a) * B
            W = {nm: p[a:b] for nm, p in zip(names, params)}
            out.append(stacked_slot_losses(W, x[off:off + n].view(b - a, B, T), y[off:off + n].view(b - a, B, T), mc,
                                           regions, attend))
            off += n
        losses = torch.cat(out)
        model_loss = torch.zeros(K, device=losses.device, dtype=losses.dtype).index_copy(0, rows, losses.detach())
        return losses.sum(), model_loss

    return loss


def _update(P: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grads: list[torch.Tensor], decay: torch.Tensor,
            clip: torch.Tensor, sched: torch.Tensor, fpos: torch.Tensor, model_loss: torch.Tensor,
            interval: torch.Tensor, total: torch.Tensor, final: torch.Tensor,
            beta1: float, beta2: float, eps: float) -> None:
    """Per-model clip + AdamW on the (K, N) rows, and the per-model statistics rows (all in place).

    ``sched`` is (3, K): ``1 - lr*wd``, ``-lr / (1 - beta1**t)``, ``sqrt(1 - beta2**t)`` per model, computed
    in double on the host as torch's AdamW does. Row k only ever reads row k.
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


# ---------------------------------------------------------------------------------------------------
# Host-side bookkeeping


@dataclass
class _Member:
    index: int  # position in cfgs
    row: int  # row of P
    cfg: RunConfig
    hooks: Hooks
    step: int  # steps done (= the next step to run)
    window: int
    window_start: int
    val_history: list = field(default_factory=list)
    n_interval: int = 0
    t_last: float = 0.0
    tokens_last: int = 0
    running: bool = True
    result: TrainResult | None = None
    _chunks: dict = field(default_factory=dict)

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


def _check_group(cfgs: list[RunConfig]) -> None:
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
# Compilation and attention backends

_COMPILED: dict = {}  # (what, mode/options) -> compiled callables, reused by every train_group of the process


# inductor options added to a max-autotune mode: no tables of autotuning timings on stderr
QUIET_AUTOTUNE = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def _compile_kwargs(compile: bool | str | dict) -> dict:
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


def _allow_recompiles() -> None:
    """Every pass shape is a new dynamo version of the same code: keep more than the default 8."""
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
            break


def compiled_regions(compile: bool | str | dict) -> Regions:
    """The embedding, block and head functions compiled once per process (``scope="block"``).

    One compiled block serves all layers of every pass (dynamo keys its versions on shapes, not on
    which weights come in), so the compile costs one block, not the unrolled network.
    """
    key = ("regions",) + _compile_key(compile)
    if key not in _COMPILED:
        kw = _compile_kwargs(compile)
        _COMPILED[key] = Regions(*(torch.compile(f, dynamic=False, **kw) for f in (_embed, _block, _head_losses)))
    return _COMPILED[key]


def compiled_update():
    """The optimizer step, compiled once per process (default mode)."""
    if ("update",) not in _COMPILED:
        _COMPILED[("update",)] = torch.compile(_update, dynamic=False)
    return _COMPILED[("update",)]


# the SDPA backends of the evaluation pass on CUDA (eager, or compiled with an SDPA attention): any but cuDNN
EVAL_SDPA = ("flash", "efficient", "math")


def sdpa_backends(names: Sequence[str], device: torch.device):
    """A context restricting ``F.scaled_dot_product_attention`` to these backends on CUDA (none named: no
    restriction). It must surround the first call of a compiled pass: the backend is chosen at trace time."""
    if not names or device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    enum = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([enum[n] for n in names])


def attention_backend(name: str, device: torch.device):
    """The training pass's SDPA backend: ``name`` alone ("default", "flex", "fused": no restriction)."""
    return sdpa_backends(() if name in ("default", "flex", "fused") else (name,), device)


def train_group(cfgs: Sequence[RunConfig], corpus: Corpus, device: torch.device,
                hooks: Sequence[Hooks] | None = None, resume_states: Sequence[dict | None] | None = None,
                compile: bool | str | dict = False, *, layout: str = "slots", precision: str = "auto",
                scope: str = "graph", attention: str = "auto", cuda_graph: str = "auto",
                flex_options: dict | None = None, fused_options: tuple[int, int, int, int] | None = None,
                timings: dict | None = None) -> list[TrainResult]:
    """Train every config of ``cfgs`` together on ``corpus`` (already on ``device``); one result per config.

    Per config i, exactly as ``train(cfgs[i], corpus, device, hooks[i], resume_states[i])``: the same
    hook calls at the same steps with the same metric names (``on_step`` every step, ``on_log`` every
    ``log_interval`` and at the end, ``on_eval`` every ``eval_interval`` and at the end — a ``Pruned``
    raised by one config's hook stops that config only — and ``on_checkpoint(step, state)`` every
    ``checkpoint_every`` and at the end), the same divergence rule, the same summaries. The checkpoint
    state has train.py's format (model state_dict, torch AdamW state_dict, step, stats, val_history,
    config_hash, rng states): a config can be resumed here or by ``train``, from a state made by either.
    ``tokens_per_s`` in ``on_log`` is that config's tokens per second of the group's wall time.

    compile: False, True (``torch.compile`` default mode), a mode name ("max-autotune-no-cudagraphs", ...)
    or a dict of inductor options, for the forward/backward; the optimizer step is compiled in the default
    mode. scope: "graph" compiles each pass whole; "block" compiles the embeddings, one transformer block
    (reused for every layer) and the head, once per process — a third of the compile time, but the eager
    glue between the regions makes the step CPU-bound (docs/performance.md).
    attention: "fused" (this project's Triton kernels, :mod:`scaling.attention`: q/k/v read and the
    gradients written where the projection keeps them; shapes and dtypes they do not handle, such as fp32,
    go to FlexAttention when compiling, else to SDPA), "flex" (FlexAttention: under ``torch.compile`` a
    Triton kernel generated for the shape; it has no backward on CPU), an SDPA backend ("default": torch's
    choice — cuDNN on an H100 in bf16 —, "flash", "efficient", "cudnn", "math"), or "auto" (default):
    fused when compiling on CUDA with Triton importable — measured the fastest there (docs/performance.md)
    —, else "default".
    Evaluations use the SDPA backends other than cuDNN whatever ``attention`` says (the eager evaluation
    of 20 models took 560–611 ms with cuDNN, 212–266 ms without on an H100, docs/performance.md), or,
    with ``scope="graph"``, the pass's own attention (fused or FlexAttention) in the evaluation's forward,
    compiled too (default mode).
    cuda_graph: "on" records the whole training step (batch gather, forward, backward, clip, AdamW,
    statistics) as one CUDA graph after the first ticks of each pass and replays it every step: no
    kernel launches from Python, and the threads that log and checkpoint beside it slow the steps down
    less (measured, docs/performance.md); "auto" (default) = on when compiling on CUDA; "off".
    flex_options: FlexAttention's options when attention is flex (:func:`flex_causal`, :func:`flex_spec`: the
    block mask's block size, its kernels' tiles, stages, warps); None: those measured fastest on this GPU
    at this head dim (``FLEX_TUNED``) if any, else inductor's defaults; ``{}``: inductor's defaults.
    fused_options: the fused kernels' launch options when attention is fused (block, forward's warps,
    backward's warps, stages: :func:`scaling.attention.parse_options`); None: ``scaling.attention.OPTIONS``.
    layout: "slots" or "groups" (see the module docstring). precision: "auto" (bf16 autocast on CUDA,
    fp32 elsewhere, as train.py), "fp32" or "bf16". timings: if a dict is given it is filled with
    ``wall_s``, ``setup_s`` (before the first step), ``ticks`` (steps of the group), ``warm`` (seconds of
    the first ticks after each build of the pass, synchronised: compile time lands there), ``eval_s``,
    ``evals`` (seconds of each evaluation; a compiled one's first holds its compile), ``builds`` (how
    many times the pass was built), ``configs`` (K); :func:`timing_metrics` sums them up.
    """
    cfgs = list(cfgs)
    K = len(cfgs)
    if K == 0:
        return []
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if cuda_graph not in CUDA_GRAPH:
        raise ValueError(f"cuda_graph must be one of {CUDA_GRAPH}, got {cuda_graph!r}")
    if cuda_graph == "on" and device.type != "cuda":
        raise ValueError("cuda_graph='on' needs a CUDA device")
    hooks = list(hooks) if hooks is not None else [Hooks() for _ in cfgs]
    resume_states = list(resume_states) if resume_states is not None else [None] * K
    if len(hooks) != K or len(resume_states) != K:
        raise ValueError("train_group: hooks and resume_states must have one entry per config")
    _check_group(cfgs)
    t_start = time.perf_counter()
    phase = cfgs[0].phase
    mc, o = phase.model, phase.optim
    T = mc.context_length
    beta1, beta2 = (float(b) for b in o.betas)
    cuda = device.type == "cuda"
    use_graph = cuda_graph == "on" or (cuda_graph == "auto" and cuda and bool(compile))
    if attention == "auto":
        attention = (("fused" if fused_available() else "flex") if cuda and compile else "default")
    if flex_options and attention != "flex":
        raise ValueError(f"flex_options are FlexAttention's, but the attention is {attention!r}")
    if fused_options and attention != "fused":
        raise ValueError(f"fused_options are the fused kernels', but the attention is {attention!r}")
    if attention == "flex" and flex_options is None:
        flex_options = tuned_flex_options(device, mc.d_model // mc.n_heads)
    use_bf16 = precision == "bf16" or (precision == "auto" and cuda)
    # no autocast weight cache under a CUDA graph: a cached cast made while recording would be stale
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not use_graph))
                if use_bf16 else nullcontext)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # --- the layout of one model's parameters as a row of P ---------------------------------------------
    template = build_model(mc, cfgs[0].seed).to(device)
    named = list(template.named_parameters())
    names = [n for n, _ in named]
    shapes = [tuple(p.shape) for _, p in named]
    numels = [p.numel() for _, p in named]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    N = sum(numels)
    mask = decay_mask(template)
    dtype = next(template.parameters()).dtype  # the default dtype: float32, or float64 in the equivalence tests
    decay = torch.cat([torch.full((n,), mask[nm], dtype=torch.bool) for nm, n in zip(names, numels)]).to(device)
    # torch AdamW's parameter indices j, in make_optimizer's own order: the slice of a row each one is
    opt = make_optimizer(template, cfgs[0], device)
    opt_groups = opt.state_dict()["param_groups"]
    index_of = {id(p): i for i, (_, p) in enumerate(named)}
    opt_slices = [(offsets[i], numels[i], shapes[i])
                  for i in (index_of[id(p)] for g in opt.param_groups for p in g["params"])]
    inits: dict[int, dict] = {cfgs[0].seed: template.state_dict()}  # initial weights per seed
    del template, opt, named

    # rows sorted by batch size (stable): the "groups" layout needs equal-B models adjacent
    order = sorted(range(K), key=lambda i: cfgs[i].batch_size)
    members: list[_Member] = []
    for row, i in enumerate(order):
        c = cfgs[i]
        window = final_window(c.steps)
        members.append(_Member(index=i, row=row, cfg=c, hooks=hooks[i], step=0, window=window,
                               window_start=c.steps - window))
    Wmax = max(mb.window for mb in members)

    P = torch.empty(K, N, device=device, dtype=dtype)
    m = torch.zeros(K, N, device=device, dtype=dtype)
    v = torch.zeros(K, N, device=device, dtype=dtype)
    interval = torch.zeros(K, 5, device=device, dtype=torch.float64)
    total = torch.zeros(K, 5, device=device, dtype=torch.float64)
    final = torch.zeros(K, Wmax + 1, device=device, dtype=torch.float64)  # column Wmax: "not in the window"
    for mb in members:
        st = resume_states[mb.index]
        if st is None:
            if mb.cfg.seed not in inits:
                inits[mb.cfg.seed] = build_model(mc, mb.cfg.seed).state_dict()
            sd, ost = inits[mb.cfg.seed], {}
        else:
            if st.get("config_hash") not in (None, mb.cfg.config_hash()):
                raise ValueError(f"resume state {mb.index} is for another configuration "
                                 f"({st.get('config_hash')} != {mb.cfg.config_hash()})")
            sd, ost = st["model"], st["optimizer"]["state"]
            mb.step = int(st["step"])
            s = st["stats"]
            interval[mb.row] = s["interval"].to(device)
            total[mb.row] = s["total"].to(device)
            mb.n_interval = int(s["n_interval"])
            fl = s["final_losses"]
            final[mb.row, :len(fl)] = fl.to(device)
            mb.val_history = list(st["val_history"])
        for nm, a, n in zip(names, offsets, numels):
            P[mb.row, a:a + n] = sd[nm].detach().reshape(-1).to(device, dtype)
        for j, (a, n, _) in enumerate(opt_slices):
            if j in ost:
                m[mb.row, a:a + n] = ost[j]["exp_avg"].reshape(-1).to(device, dtype)
                v[mb.row, a:a + n] = ost[j]["exp_avg_sq"].reshape(-1).to(device, dtype)
        mb.tokens_last = mb.step
        mb.running = mb.step < mb.cfg.steps
        if not mb.running:  # a state taken at the end: nothing left to train
            mb.result = _result(mb, interval, total, final, "FINISHED", N, corpus)
    clip = torch.tensor([math.inf if members[r].cfg.clip is None else members[r].cfg.clip for r in range(K)],
                        device=device, dtype=dtype)
    # views of P's rows, one leaf per parameter name: autograd gives one gradient per name
    params = [P[:, a:a + n].view(K, *s).detach().requires_grad_() for a, n, s in zip(offsets, numels, shapes)]

    tokens = corpus.train
    offs = torch.arange(T + 1, device=tokens.device)
    val_set = validation_batches(corpus.val, phase.train.eval_batches, T)
    if compile:
        _allow_recompiles()
    update = compiled_update() if compile else _update
    regions = compiled_regions(compile) if compile and scope == "block" else EAGER
    whole = bool(compile) and scope == "graph"
    attend = flex_causal(T, device, flex_options) if attention == "flex" else _sdpa_causal
    if attention == "fused":
        attend = fused_causal(flex_causal(T, device, tuned_flex_options(device, mc.d_model // mc.n_heads))
                              if compile else _sdpa_causal, fused_options)

    # --- the pass: which models run, in what shape -----------------------------------------------------
    class Pass:
        pass

    def build_pass() -> Pass:
        ps = Pass()
        live = [mb for mb in members if mb.running]
        ps.members = live
        ps.n_seqs = sum(mb.cfg.batch_size for mb in live)
        ps.cols = []  # (member, first column in the step's sequence list)
        c0 = 0
        for mb in live:
            ps.cols.append((mb, c0))
            c0 += mb.cfg.batch_size
        segs, rows = [], []
        for mb in live:
            if segs and segs[-1][1] == mb.row and segs[-1][2] == mb.cfg.batch_size:
                segs[-1][1] += 1
            else:
                segs.append([mb.row, mb.row + 1, mb.cfg.batch_size])
            rows.append(mb.row)
        ps.segments = tuple(tuple(sg) for sg in segs)
        ps.rows = torch.tensor(rows, device=device)
        if layout == "slots":
            ps.S = math.gcd(*[mb.cfg.batch_size for mb in live])
            fn = _make_slots_loss(names, mc, K, ps.segments, ps.S, regions, attend)
        else:
            fn = _make_groups_loss(names, mc, K, ps.segments, regions, attend)
        ps.loss = torch.compile(fn, dynamic=False, **_compile_kwargs(compile)) if whole else fn
        # the tables of the next TABLE_CHUNK steps (refilled in place: a recorded graph reads these
        # addresses) and the device-side row counter the step reads them by and advances
        ps.starts = torch.zeros(TABLE_CHUNK, ps.n_seqs, dtype=torch.long, device=tokens.device)
        ps.sched = torch.ones(TABLE_CHUNK, 3, K, device=device, dtype=dtype)
        ps.fpos = torch.full((TABLE_CHUNK, K), Wmax, dtype=torch.long, device=device)
        ps.row = torch.zeros(1, dtype=torch.long, device=device)
        ps.tick = TABLE_CHUNK  # tables not filled yet
        ps.graph = None
        ps.warm_left = WARM_TICKS
        return ps

    def run_step(ps: Pass) -> None:
        """One training step of the pass, all on the device, reading only the pass's static buffers (its
        tables, at the row ``ps.row`` says, then advanced): the work a CUDA graph records and replays."""
        r = ps.row
        x, y = windows(tokens, ps.starts.index_select(0, r)[0], offs)
        with autocast(), attention_backend(attention, device):
            if layout == "slots":
                loss, model_loss = ps.loss(params, ps.rows, x.view(-1, ps.S, T), y.view(-1, ps.S, T))
            else:
                loss, model_loss = ps.loss(params, ps.rows, x, y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            update(P, m, v, list(grads), decay, clip, ps.sched.index_select(0, r)[0], ps.fpos.index_select(0, r)[0],
                   model_loss, interval, total, final, beta1, beta2, float(o.eps))
            r.add_(1)

    def capture(ps: Pass) -> None:
        """Record run_step as a CUDA graph (nothing runs while recording). The step before it ran on the
        same side stream, so every lazily created handle, plan and kernel exists already."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=ps.side, capture_error_mode="thread_local"):
            run_step(ps)
        ps.graph = g

    def build_tables(ps: Pass) -> None:
        """Fill the pass's tables for the next CH steps: batch starts (CH, n_seqs), optimizer scalars
        (CH, 3, K), final-window slots (CH, K); the step's row counter back to 0."""
        CH = TABLE_CHUNK
        starts = torch.zeros(CH, ps.n_seqs, dtype=torch.long)
        sched = torch.empty(CH, 3, K, dtype=dtype)
        sched[:, 0], sched[:, 1], sched[:, 2] = FROZEN_SCHED
        fpos = torch.full((CH, K), Wmax, dtype=torch.long)
        for mb, c0 in ps.cols:
            starts[:, c0:c0 + mb.cfg.batch_size] = mb.starts(mb.step, CH, len(tokens), T)
        for mb in members:
            if not mb.running:
                continue
            wd = o.weight_decay
            rows = []
            for r in range(CH):
                s = mb.step + r
                lr = lr_at(mb.cfg, s)
                t = s + 1  # AdamW's step count after this step
                rows.append((1 - lr * wd, -(lr / (1 - beta1 ** t)), (1 - beta2 ** t) ** 0.5))
                if mb.window_start <= s < mb.cfg.steps:
                    fpos[r, mb.row] = s - mb.window_start
            sched[:, :, mb.row] = torch.tensor(rows, dtype=torch.float64).to(dtype)
        if cuda:
            starts, sched, fpos = starts.pin_memory(), sched.pin_memory(), fpos.pin_memory()
        ps.starts.copy_(starts, non_blocking=True)
        ps.sched.copy_(sched, non_blocking=True)
        ps.fpos.copy_(fpos, non_blocking=True)
        ps.row.zero_()
        ps.tick = 0

    def freeze(mb: _Member, ps: Pass) -> None:
        """A stopped model: no more updates (lr 0), no more statistics (in the current tables)."""
        ps.sched[:, 0, mb.row], ps.sched[:, 1, mb.row], ps.sched[:, 2, mb.row] = FROZEN_SCHED
        ps.fpos[:, mb.row] = Wmax

    # --- evaluation ----------------------------------------------------------------------------------
    def eval_losses(W: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return stacked_slot_losses(W, x, y, mc, attend=attend if whole else _sdpa_causal)

    # with the whole pass compiled (scope "graph") the evaluation's forward is compiled too, in the default
    # mode (autotuning it cost a minute of compile for ~0.1 s per sweep), for all K models at once
    # whichever of them evaluate (one shape, one compile; eager it took 0.21-0.27 s per evaluation of 20
    # models on an H100, compiled ~0.1 s, docs/performance.md)
    eval_fn = torch.compile(eval_losses, dynamic=False) if whole else eval_losses

    @torch.no_grad()
    def evaluate_rows(rows: list[int]) -> list[float]:
        if whole:
            W = {n: p.detach() for n, p in zip(names, params)}
        else:
            idx = torch.tensor(rows, device=device)
            W = {n: p.detach().index_select(0, idx) for n, p in zip(names, params)}
        M = len(next(iter(W.values())))
        tot = torch.zeros(M, device=device, dtype=dtype)
        for x, y in val_set:
            xe, ye = x.expand(M, *x.shape), y.expand(M, *y.shape)
            with autocast(), sdpa_backends(EVAL_SDPA, device):
                tot += eval_fn(W, xe, ye)
        vals = (tot / len(val_set)).tolist()
        return [vals[r] for r in rows] if whole else vals

    def state_of(mb: _Member) -> dict[str, Any]:
        """Model k's checkpoint state in train.py's format. Its tensors are live views of the group's
        buffers (as train.py's state_dict() tensors are live): a hook copies what it keeps, with no
        wait for the GPU here."""
        r, done = mb.row, mb.step
        model = {nm: P[r, a:a + n].view(s) for nm, a, n, s in zip(names, offsets, numels, shapes)}
        ost = {j: {"step": torch.tensor(float(done)), "exp_avg": m[r, a:a + n].view(s),
                   "exp_avg_sq": v[r, a:a + n].view(s)} for j, (a, n, s) in enumerate(opt_slices)}
        groups = copy.deepcopy(opt_groups)
        for g in groups:
            g["lr"] = lr_at(mb.cfg, done - 1)
        stats = {"interval": interval[r], "total": total[r], "n_interval": mb.n_interval,
                 "final_losses": final[r, :mb.window]}
        return {"model": model, "optimizer": {"state": ost, "param_groups": groups}, "step": done,
                "stats": stats, "val_history": list(mb.val_history), "config_hash": mb.cfg.config_hash(),
                "rng_cpu": torch.random.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state() if cuda else None}

    def stop(mb: _Member, status: str) -> _Member:
        return _stop(mb, status, interval, total, final, N, corpus)

    # --- logging without a sync ------------------------------------------------------------------------
    pending: list[tuple[Any, torch.Tensor, list[tuple[_Member, int, int]]]] = []  # (event, host sums, members)
    row_index: dict[tuple[int, ...], torch.Tensor] = {}  # the device index of a set of rows (made once)

    def fetch_logs(logging: list[_Member]) -> None:
        """Queue the copy of these models' interval sums to the host and restart their intervals (both
        on the device, in stream order): no wait for the GPU here."""
        key = tuple(mb.row for mb in logging)
        if key not in row_index:
            row_index[key] = torch.tensor(key, device=device)
        idx = row_index[key]
        host = torch.empty(len(key), interval.shape[1], dtype=interval.dtype, pin_memory=cuda)
        host.copy_(interval.index_select(0, idx), non_blocking=cuda)
        interval.index_fill_(0, idx, 0.0)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        pending.append((event, host, [(mb, mb.step, mb.n_interval) for mb in logging]))
        for mb in logging:
            mb.n_interval = 0

    def deliver_logs(wait: bool) -> list[_Member]:
        """Hand the fetched sums that have arrived (all of them with ``wait``) to on_log, oldest first;
        stop the models whose means are not finite (DIVERGED, at the step they were logged) or whose
        hook prunes them. Returns the stopped models."""
        out: list[_Member] = []
        while pending and (wait or pending[0][0] is None or pending[0][0].query()):
            event, host, entries = pending.pop(0)
            if event is not None:
                event.synchronize()
            now = time.perf_counter()
            for (mb, step, n), srow in zip(entries, host):
                if not mb.running:
                    continue
                means = (srow / n).tolist()
                if not all(math.isfinite(x_) for x_ in means[:2]):
                    mb.step = step
                    out.append(stop(mb, "DIVERGED"))
                    continue
                metrics = dict(zip(LOG_METRICS, means))
                metrics["lr"] = lr_at(mb.cfg, step - 1)
                metrics["tokens_per_s"] = (step - mb.tokens_last) * mb.cfg.tokens_per_step / max(now - mb.t_last, 1e-9)
                mb.t_last, mb.tokens_last = now, step
                try:
                    mb.hooks.on_log(step, metrics)
                except Pruned:
                    mb.step = step
                    out.append(stop(mb, "PRUNED"))
        return out

    # --- the loop ------------------------------------------------------------------------------------
    tm = {"configs": K, "ticks": 0, "warm": [], "evals": [], "builds": 0, "setup_s": time.perf_counter() - t_start}
    ps: Pass | None = None
    for mb in members:
        mb.t_last = time.perf_counter()
    try:
        while any(mb.running for mb in members):
            if ps is None:
                ps = build_pass()
                tm["builds"] += 1
            if ps.tick >= TABLE_CHUNK:
                build_tables(ps)
            t0 = time.perf_counter() if ps.warm_left else None
            if ps.graph is not None:
                ps.graph.replay()
            elif use_graph and ps.warm_left == 1:
                # the last warm tick runs on the side stream the graph is then recorded on; the recording
                # runs nothing, so the graph's first replay is the next tick
                ps.side = torch.cuda.Stream(device)
                ps.side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(ps.side):
                    run_step(ps)
                torch.cuda.current_stream(device).wait_stream(ps.side)
                capture(ps)
            else:
                run_step(ps)
            ps.tick += 1
            tm["ticks"] += 1
            stopped: list[_Member] = []
            for mb in ps.members:
                if not mb.running:
                    continue
                mb.step += 1
                mb.n_interval += 1
                try:
                    mb.hooks.on_step(mb.step)
                except Pruned:  # the sums its earlier steps logged reach its hooks first, as in train.py
                    stopped += deliver_logs(wait=True)
                    if mb.running:
                        stopped.append(stop(mb, "PRUNED"))
            if t0 is not None:
                sync()
                tm["warm"].append(time.perf_counter() - t0)
                ps.warm_left -= 1

            # logging: the sums of every model that logs now are fetched without waiting for the GPU, and
            # handed to the hooks once they have arrived — at the latest before any evaluation, checkpoint or
            # end of a run, so on_log/on_eval/on_checkpoint come in train.py's order (on_step, a progress
            # count, may run a few steps ahead of on_log)
            live = [mb for mb in ps.members if mb.running]
            logging = [mb for mb in live if due(mb.step, mb.cfg.phase.train.log_interval, mb.cfg.steps)]
            if logging:
                fetch_logs(logging)
            # what each live model does at this step (a model that deliver_logs stops is no longer running)
            evals_now = [due(mb.step, mb.cfg.phase.train.eval_interval, mb.cfg.steps) for mb in live]
            ckpts_now = [due(mb.step, mb.cfg.phase.train.checkpoint_every, mb.cfg.steps) for mb in live]
            sync_point = not cuda or any(e or c or mb.step >= mb.cfg.steps
                                         for mb, e, c in zip(live, evals_now, ckpts_now))
            stopped += deliver_logs(wait=sync_point)
            # evaluation: one batched pass for every model that evaluates now
            evaluating = [mb for mb, e in zip(live, evals_now) if e and mb.running]
            if evaluating:
                te = time.perf_counter()
                vals = evaluate_rows([mb.row for mb in evaluating])
                tm["evals"].append(time.perf_counter() - te)
                for mb, val in zip(evaluating, vals):
                    mb.val_history.append((mb.step, val))
                    try:
                        mb.hooks.on_eval(mb.step, val)
                    except Pruned:
                        stopped.append(stop(mb, "PRUNED"))
                        continue
                    if not math.isfinite(val):
                        stopped.append(stop(mb, "DIVERGED"))
            for mb, c in zip(live, ckpts_now):
                if c and mb.running:
                    try:
                        mb.hooks.on_checkpoint(mb.step, state_of(mb))
                    except Pruned:
                        stopped.append(stop(mb, "PRUNED"))
            for mb in live:
                if mb.running and mb.step >= mb.cfg.steps:
                    stopped.append(stop(mb, "FINISHED"))
            if stopped:
                for mb in stopped:
                    freeze(mb, ps)
                dead = sum(mb.cfg.batch_size for mb in ps.members if not mb.running)
                if not any(mb.running for mb in members):
                    break
                if not compile or dead >= REBUILD_DEAD_FRACTION * ps.n_seqs:
                    ps = None
    except BaseException:  # Ctrl-C, SIGTERM, an error: the sums already fetched still reach their hooks
        try:
            deliver_logs(wait=True)
        except Exception:
            pass
        raise

    if timings is not None:
        sync()
        tm["wall_s"] = time.perf_counter() - t_start
        tm["eval_s"] = sum(tm["evals"])
        timings.update(tm)
    return [mb.result for mb in sorted(members, key=lambda mb: mb.index)]


def timing_metrics(tm: dict) -> dict[str, float]:
    """A group's ``timings`` (train_group's) as the metrics each of its MLflow runs gets: ``group_configs``
    (configs trained together), ``group_setup_s`` (before the first step), ``group_first_ticks_s`` (the
    first WARM_TICKS ticks after each build of the pass: its compile lands there), ``group_step_ms`` (every
    other tick: the wall time between the first ticks and the end, less the evaluations, per tick — logging
    and checkpoint hand-overs included), ``group_eval_s`` (all evaluations; a compiled one's first holds its
    compile) and ``group_wall_s``. Nothing when the group did not train (no timings)."""
    if "wall_s" not in tm:
        return {}
    first = sum(tm["warm"])
    rest = tm["ticks"] - len(tm["warm"])
    out = {"group_configs": float(tm["configs"]), "group_setup_s": tm["setup_s"], "group_first_ticks_s": first,
           "group_eval_s": tm["eval_s"], "group_wall_s": tm["wall_s"]}
    if rest > 0:
        out["group_step_ms"] = 1000 * (tm["wall_s"] - tm["setup_s"] - first - tm["eval_s"]) / rest
    return out


def _stop(mb: _Member, status: str, interval, total, final, n_params: int, corpus: Corpus) -> _Member:
    mb.running = False
    mb.result = _result(mb, interval, total, final, status, n_params, corpus)
    return mb


def _result(mb: _Member, interval, total, final, status: str, n_params: int, corpus: Corpus) -> TrainResult:
    """The member's TrainResult through train.py's own ``summarize`` (its rows as a ``RunStats``)."""
    stats = RunStats("cpu", mb.window)
    stats.interval, stats.total = interval[mb.row].cpu(), total[mb.row].cpu()
    stats.final_losses = final[mb.row, :mb.window].cpu()
    steps_done = mb.cfg.steps if status == "FINISHED" else mb.step
    return TrainResult(status=status, steps_done=steps_done, n_params=n_params,
                       summary=summarize(mb.cfg, stats, mb.val_history, steps_done, status, n_params, corpus),
                       val_history=list(mb.val_history))
