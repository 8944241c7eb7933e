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
256 steps and copied to the device, running statistics (the same ``_Stats`` sums as train.py, one row per
model) are accumulated on the device and fetched once per logging interval, evaluation or checkpoint.

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
from scaling.train import (LOG_METRICS, Hooks, Pruned, TrainResult, _Stats, _summary, clip_stats, due, final_window,
                           lr_at, make_optimizer)

TABLE_CHUNK = 256  # steps of batch indices / optimizer scalars prepared at a time
REBUILD_DEAD_FRACTION = 0.25  # compiled mode: drop stopped models from the pass once they hold this share
LAYOUTS = ("slots", "groups")
PRECISIONS = ("auto", "fp32", "bf16")
RECOMPILE_LIMIT = 64  # dynamo versions kept per compiled function (default 8), see train_group
WARM_TICKS = 3  # ticks timed (with a sync) after each (re)build of the pass, for compile-time accounting
SCOPES = ("block", "graph")
ATTENTION = ("default", "flash", "efficient", "cudnn", "math")


# ---------------------------------------------------------------------------------------------------
# The batched model: the NanoTransformer forward on stacked weights


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * w[:, None, :] + b[:, None, :]


def _block(h: torch.Tensor, ln1w: torch.Tensor, ln1b: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor,
           ln2w: torch.Tensor, ln2b: torch.Tensor, fc: torch.Tensor, fc_proj: torch.Tensor, S: int,
           n_heads: int) -> torch.Tensor:
    """One pre-LN transformer block on M slots at once: h is (M, S*T, C), weights are (M, *shape)."""
    M, ST, C = h.shape
    T, H = ST // S, n_heads
    a = _layer_norm(h, ln1w, ln1b)
    q, k, v = torch.bmm(a, qkv.transpose(1, 2)).split(C, dim=2)
    q, k, v = (z.reshape(M * S, T, H, C // H).transpose(1, 2) for z in (q, k, v))
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(M, ST, C)
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
    ce = F.cross_entropy(logits.float().reshape(M * ST, -1), y.reshape(-1), reduction="none")
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
                        mc: ModelConfig, regions: Regions = EAGER) -> torch.Tensor:
    """Mean cross-entropy of each slot: ``W[name]`` is (M, *shape), x and y are (M, S, T) → (M,).

    Slot j runs the NanoTransformer with weights ``W[name][j]`` on its S sequences: the same
    operations as ``NanoTransformer.loss`` (pre-LN blocks, causal SDPA, 4x GELU MLP, tied head,
    logits in fp32 for the cross-entropy), as batched matmuls over the slot dimension.
    ``regions`` are the three functions the pass is made of (embeddings, a block, the head):
    ``torch.compile`` can compile each once (``scope="block"``: the same compiled block serves every
    layer) instead of the whole unrolled pass.
    """
    S, H = x.shape[1], mc.n_heads
    h = regions.embed(x, W["wte.weight"], W["wpe.weight"])
    for i in range(mc.n_layers):
        h = regions.block(h, *[W[f"blocks.{i}.{n}"] for n in BLOCK_PARAMS], S, H)
    return regions.head(h, W["ln_f.weight"], W["ln_f.bias"], W["wte.weight"], y)


def _make_slots_loss(names: list[str], mc: ModelConfig, K: int, segments: tuple[tuple[int, int, int], ...],
                     S: int, regions: Regions = EAGER):
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
        slot_loss = stacked_slot_losses(W, x, y, mc, regions)
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
                      regions: Regions = EAGER):
    def loss(params: list[torch.Tensor], rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        T = x.shape[-1]
        out, off = [], 0
        for a, b, B in segments:
            n = (b - a) * B
            W = {nm: p[a:b] for nm, p in zip(names, params)}
            out.append(stacked_slot_losses(W, x[off:off + n].view(b - a, B, T), y[off:off + n].view(b - a, B, T), mc,
                                           regions))
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


def _compile_kwargs(compile: bool | str | dict) -> dict:
    if isinstance(compile, dict):
        return {"options": dict(compile)}
    return {"mode": None if compile is True else compile}


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


def attention_backend(name: str, device: torch.device):
    """A context restricting ``F.scaled_dot_product_attention`` to one backend on CUDA ("default": no
    restriction). It must surround the first call of a compiled pass: the backend is chosen at trace time."""
    if name == "default" or device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([b])


def train_group(cfgs: Sequence[RunConfig], corpus: Corpus, device: torch.device,
                hooks: Sequence[Hooks] | None = None, resume_states: Sequence[dict | None] | None = None,
                compile: bool | str | dict = False, *, layout: str = "slots", precision: str = "auto",
                scope: str = "graph", attention: str = "default",
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
    attention: the CUDA SDPA backend ("default": torch's choice — cuDNN on an H100 in bf16, measured the
    fastest of them here —, "flash", "efficient", "cudnn", "math").
    layout: "slots" or "groups" (see the module docstring). precision: "auto" (bf16 autocast on CUDA,
    fp32 elsewhere, as train.py), "fp32" or "bf16". timings: if a dict is given it is filled with
    ``wall_s``, ``setup_s`` (before the first step), ``ticks`` (steps of the group), ``warm`` (seconds of
    the first ticks after each build of the pass, synchronised: compile time lands there), ``eval_s``,
    ``builds`` (how many times the pass was built).
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
    use_bf16 = precision == "bf16" or (precision == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
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

    P = torch.empty(K, N, device=device)
    m = torch.zeros(K, N, device=device)
    v = torch.zeros(K, N, device=device)
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
            P[mb.row, a:a + n] = sd[nm].detach().reshape(-1).to(device, torch.float32)
        for j, (a, n, _) in enumerate(opt_slices):
            if j in ost:
                m[mb.row, a:a + n] = ost[j]["exp_avg"].reshape(-1).to(device)
                v[mb.row, a:a + n] = ost[j]["exp_avg_sq"].reshape(-1).to(device)
        mb.tokens_last = mb.step
        mb.running = mb.step < mb.cfg.steps
        if not mb.running:  # a state taken at the end: nothing left to train
            mb.result = _result(mb, interval, total, final, "FINISHED", N, corpus)
    clip = torch.tensor([math.inf if members[r].cfg.clip is None else members[r].cfg.clip for r in range(K)],
                        device=device, dtype=torch.float32)
    # views of P's rows, one leaf per parameter name: autograd gives one gradient per name
    params = [P[:, a:a + n].view(K, *s).detach().requires_grad_() for a, n, s in zip(offsets, numels, shapes)]

    tokens = corpus.train
    offs = torch.arange(T + 1, device=tokens.device)
    val_set = validation_batches(corpus.val, phase.train.eval_batches, T)
    sched_buf = torch.ones(3, K, device=device)
    fpos_buf = torch.full((K,), Wmax, device=device, dtype=torch.long)
    if compile:
        _allow_recompiles()
    update = compiled_update() if compile else _update
    regions = compiled_regions(compile) if compile and scope == "block" else EAGER
    whole = bool(compile) and scope == "graph"

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
            fn = _make_slots_loss(names, mc, K, ps.segments, ps.S, regions)
        else:
            fn = _make_groups_loss(names, mc, K, ps.segments, regions)
        ps.loss = torch.compile(fn, dynamic=False, **_compile_kwargs(compile)) if whole else fn
        ps.table = None
        ps.warm_left = WARM_TICKS
        return ps

    def build_tables(ps: Pass) -> None:
        """Batch starts (CH, n_seqs) and optimizer scalars (CH, 3, K) / final-window slots (CH, K)."""
        CH = TABLE_CHUNK
        starts = torch.zeros(CH, ps.n_seqs, dtype=torch.long)
        sched = torch.empty(CH, 3, K, dtype=torch.float32)
        sched[:, 0], sched[:, 1], sched[:, 2] = 1.0, 0.0, 1.0
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
            sched[:, :, mb.row] = torch.tensor(rows, dtype=torch.float64).to(torch.float32)
        if cuda:
            starts, sched, fpos = starts.pin_memory(), sched.pin_memory(), fpos.pin_memory()
        ps.table = (starts.to(tokens.device, non_blocking=True), sched.to(device, non_blocking=True),
                    fpos.to(device, non_blocking=True))

    def freeze(mb: _Member, ps: Pass) -> None:
        """A stopped model: no more updates (lr 0), no more statistics (in the current table)."""
        if ps.table is not None:
            _, sched, fpos = ps.table
            sched[:, 0, mb.row], sched[:, 1, mb.row], sched[:, 2, mb.row] = 1.0, 0.0, 1.0
            fpos[:, mb.row] = Wmax

    # --- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_rows(rows: list[int]) -> list[float]:
        idx = torch.tensor(rows, device=device)
        W = {n: p.detach().index_select(0, idx) for n, p in zip(names, params)}
        tot = torch.zeros(len(rows), device=device)
        for x, y in val_set:
            xe, ye = x.expand(len(rows), *x.shape), y.expand(len(rows), *y.shape)
            with autocast(), attention_backend(attention, device):
                tot += stacked_slot_losses(W, xe, ye, mc)
        return (tot / len(val_set)).tolist()

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

    # --- the loop ------------------------------------------------------------------------------------
    tm = {"ticks": 0, "warm": [], "eval_s": 0.0, "builds": 0, "setup_s": time.perf_counter() - t_start}
    ps: Pass | None = None
    for mb in members:
        mb.t_last = time.perf_counter()
    while any(mb.running for mb in members):
        if ps is None:
            ps = build_pass()
            tm["builds"] += 1
        if ps.table is None or ps.tick >= TABLE_CHUNK:
            build_tables(ps)
            ps.tick = 0
        t0 = time.perf_counter() if ps.warm_left else None
        starts, sched, fpos = ps.table
        r = ps.tick
        sched_buf.copy_(sched[r])
        fpos_buf.copy_(fpos[r])
        x, y = windows(tokens, starts[r], offs)
        with autocast(), attention_backend(attention, device):
            if layout == "slots":
                xs, ys = x.view(-1, ps.S, T), y.view(-1, ps.S, T)
                loss, model_loss = ps.loss(params, ps.rows, xs, ys)
            else:
                loss, model_loss = ps.loss(params, ps.rows, x, y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            update(P, m, v, list(grads), decay, clip, sched_buf, fpos_buf, model_loss, interval, total, final,
                   beta1, beta2, float(o.eps))
        del grads, loss, model_loss
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
            except Pruned:
                stopped.append(_stop(mb, "PRUNED", interval, total, final, N, corpus))
        if t0 is not None:
            sync()
            tm["warm"].append(time.perf_counter() - t0)
            ps.warm_left -= 1

        # logging: one fetch for every model that logs now
        live = [mb for mb in ps.members if mb.running]
        logging = [mb for mb in live if due(mb.step, mb.cfg.phase.train.log_interval, mb.cfg.steps)]
        if logging:
            idx = torch.tensor([mb.row for mb in logging], device=device)
            sums = interval.index_select(0, idx).cpu()
            now = time.perf_counter()
            for mb, srow in zip(logging, sums):
                means = (srow / mb.n_interval).tolist()
                if not all(math.isfinite(x_) for x_ in means[:2]):
                    stopped.append(_stop(mb, "DIVERGED", interval, total, final, N, corpus))
                    continue
                metrics = dict(zip(LOG_METRICS, means))
                metrics["lr"] = lr_at(mb.cfg, mb.step - 1)
                metrics["tokens_per_s"] = ((mb.step - mb.tokens_last) * mb.cfg.tokens_per_step
                                           / max(now - mb.t_last, 1e-9))
                mb.t_last, mb.tokens_last = now, mb.step
                interval[mb.row].zero_()
                mb.n_interval = 0
                try:
                    mb.hooks.on_log(mb.step, metrics)
                except Pruned:
                    stopped.append(_stop(mb, "PRUNED", interval, total, final, N, corpus))
        # evaluation: one batched pass for every model that evaluates now
        evaluating = [mb for mb in live if mb.running and due(mb.step, mb.cfg.phase.train.eval_interval,
                                                                mb.cfg.steps)]
        if evaluating:
            te = time.perf_counter()
            vals = evaluate_rows([mb.row for mb in evaluating])
            tm["eval_s"] += time.perf_counter() - te
            for mb, val in zip(evaluating, vals):
                mb.val_history.append((mb.step, val))
                try:
                    mb.hooks.on_eval(mb.step, val)
                except Pruned:
                    stopped.append(_stop(mb, "PRUNED", interval, total, final, N, corpus))
                    continue
                if not math.isfinite(val):
                    stopped.append(_stop(mb, "DIVERGED", interval, total, final, N, corpus))
        for mb in live:
            if mb.running and due(mb.step, mb.cfg.phase.train.checkpoint_every, mb.cfg.steps):
                try:
                    mb.hooks.on_checkpoint(mb.step, state_of(mb))
                except Pruned:
                    stopped.append(_stop(mb, "PRUNED", interval, total, final, N, corpus))
        for mb in live:
            if mb.running and mb.step >= mb.cfg.steps:
                stopped.append(_stop(mb, "FINISHED", interval, total, final, N, corpus))
        if stopped:
            for mb in stopped:
                freeze(mb, ps)
            dead = sum(mb.cfg.batch_size for mb in ps.members if not mb.running)
            if not any(mb.running for mb in members):
                break
            if not compile or dead >= REBUILD_DEAD_FRACTION * ps.n_seqs:
                ps = None
    if timings is not None:
        sync()
        tm["wall_s"] = time.perf_counter() - t_start
        timings.update(tm)
    return [mb.result for mb in sorted(members, key=lambda mb: mb.index)]


def _stop(mb: _Member, status: str, interval, total, final, n_params: int, corpus: Corpus) -> _Member:
    mb.running = False
    mb.result = _result(mb, interval, total, final, status, n_params, corpus)
    return mb


def _result(mb: _Member, interval, total, final, status: str, n_params: int, corpus: Corpus) -> TrainResult:
    """The member's TrainResult through train.py's own ``_summary`` (its rows as a ``_Stats``)."""
    stats = _Stats("cpu", mb.window)
    stats.interval, stats.total = interval[mb.row].cpu(), total[mb.row].cpu()
    stats.final_losses = final[mb.row, :mb.window].cpu()
    steps_done = mb.cfg.steps if status == "FINISHED" else mb.step
    return TrainResult(status=status, steps_done=steps_done, n_params=n_params,
                       summary=_summary(mb.cfg, stats, mb.val_history, steps_done, status, n_params, corpus),
                       val_history=list(mb.val_history))
