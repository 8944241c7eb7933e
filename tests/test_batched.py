"""The batched multi-config engine against the single-config loop, on CPU in float64 with a tiny model.

Configs trained together must give, step by step, what each gives alone (losses, clip metrics, val
losses, summaries, hook calls), must not leak into each other, must stop one by one (divergence,
pruning, different step counts), and must resume from a checkpoint as if never interrupted.

Why float64: the two paths sum in different orders (batched matmuls over slots against one model's
matmuls, a mean of slot means against one mean), and which order a CPU kernel takes depends on the
processor (AVX-512, AVX2, none). In fp32 the reassociation differs by ~1e-7 per sum, too close to any
tolerance a test could set. In float64 it differs by ~1e-16, and the configurations below are chosen
where training does not amplify it (a 1e-15 change of the initial weights moves no logged value by more
than ~1e-14 over 30 steps; at LR 1e-2 with clip 0.05 the same change grows to 4e-6, which no test can tell
from a bug). So ``REL`` = 1e-9 holds on any x86-64 CPU (observed ≤ 1e-14 with ATEN_CPU_CAPABILITY avx512,
avx2 and default), while a difference of arithmetic — a float32 rounding anywhere in one path — shows
at 1e-7 or more. Both paths take float64 from the default dtype (``build_model`` and the engine's
tensors follow it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager

import pytest
import torch
import yaml

from scaling.batched import (
    math_causal,
    sdpa_causal,
    slot_size,
    timing_metrics,
    train_group,
)
from scaling.config import _validated
from scaling.data import load_corpus
from scaling.train import Hooks, Pruned, train

PHASE = """
name: tiny_batched
data: {dataset: random, random_train_tokens: 20000, random_val_tokens: 4000}
model: {d_model: 32, n_layers: 2, n_heads: 2, context_length: 16, vocab_size: 32}
optim: {betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, warmup: 3, schedule: cosine, min_lr_ratio: 0.1}
train: {budget_kind: steps, budget: 30, eval_interval: 10, eval_batches: 2, log_interval: 1, checkpoint_every: 10}
grid: {batch_sizes: [4, 8, 12], lrs: [1.0e-3], clips: [1.0]}
"""
CPU = torch.device("cpu")
REL = 1e-9  # batched vs alone in float64: the same arithmetic up to summation order (module docstring)
METRICS = ("train_loss", "grad_norm_before_clip", "grad_norm_after_clip", "clip_frequency", "effective_lr_scale", "lr")


class Recorder:
    """Every hook call of one run, in order (checkpoint states deep-copied: they may hold live tensors)."""

    def __init__(self, prune_at: int | None = None, prune_step: int | None = None):
        self.logs, self.evals, self.ckpts, self.steps = [], [], [], []
        self.prune_at, self.prune_step = prune_at, prune_step  # Pruned from on_eval / on_step at that step

    def hooks(self) -> Hooks:
        def on_eval(step, val):
            self.evals.append((step, val))
            if self.prune_at is not None and step >= self.prune_at:
                raise Pruned()

        def on_step(step):
            self.steps.append(step)
            if step == self.prune_step:
                raise Pruned()

        return Hooks(on_log=lambda s, m: self.logs.append((s, m)), on_eval=on_eval,
                     on_checkpoint=lambda s, st: self.ckpts.append((s, copy.deepcopy(st))), on_step=on_step)


@pytest.fixture(scope="module", autouse=True)
def _float64():
    """Both paths in float64 (see the module docstring): the models, the optimizer state and the engine's
    tables take the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops: one intra-op thread is faster than two, and far faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    phase = _validated(yaml.safe_load(PHASE))
    corpus = load_corpus(phase, 0)
    cfgs = [phase.run_config(4, 3e-3, 1.0, 0),  # clips sometimes
            phase.run_config(8, 3e-3, 0.05, 1),  # clips at every step
            phase.run_config(12, 1e-3, None, 2)]  # no clipping
    return phase, corpus, cfgs


def run_single(cfgs, corpus, recs=None, states=None):
    recs = recs or [Recorder() for _ in cfgs]
    states = states or [None] * len(cfgs)
    return [train(c, corpus, CPU, r.hooks(), s) for c, r, s in zip(cfgs, recs, states)], recs


def run_group(cfgs, corpus, recs=None, states=None, device=CPU, **kw):
    recs = recs or [Recorder() for _ in cfgs]
    return train_group(cfgs, corpus, device, [r.hooks() for r in recs], states, **kw), recs


@pytest.fixture(scope="module")
def single(setup):
    _, corpus, cfgs = setup
    return run_single(cfgs, corpus)


@pytest.fixture(scope="module")
def batched(setup):
    _, corpus, cfgs = setup
    return run_group(cfgs, corpus)


def close(a: float, b: float, rel: float, scale: float = 1e-12) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel * max(abs(a), abs(b), scale)


DIFFERENCES = {"val_loss_rise": 1.0, "train_loss_std": 1.0}  # differences of losses: compared on the loss scale


def assert_same_run(res_a, rec_a, res_b, rec_b, rel=REL, from_step=0):
    """Same status, hook calls at the same steps, same metrics/val losses/summary within ``rel``."""
    assert res_a.status == res_b.status and res_a.steps_done == res_b.steps_done
    logs_a = [(s, m) for s, m in rec_a.logs if s > from_step]
    logs_b = [(s, m) for s, m in rec_b.logs if s > from_step]
    assert [s for s, _ in logs_a] == [s for s, _ in logs_b]
    for (s, ma), (_, mb) in zip(logs_a, logs_b):
        assert set(ma) == set(mb)
        for k in METRICS:
            assert close(ma[k], mb[k], rel), (s, k, ma[k], mb[k])
    evals_a = [(s, v) for s, v in rec_a.evals if s > from_step]
    evals_b = [(s, v) for s, v in rec_b.evals if s > from_step]
    assert [s for s, _ in evals_a] == [s for s, _ in evals_b]
    assert all(close(va, vb, rel) for (_, va), (_, vb) in zip(evals_a, evals_b)), (evals_a, evals_b)
    assert [s for s, _ in rec_a.ckpts if s > from_step] == [s for s, _ in rec_b.ckpts if s > from_step]
    assert [s for s in rec_a.steps if s > from_step] == [s for s in rec_b.steps if s > from_step]
    assert set(res_a.summary) == set(res_b.summary)
    for k, va in res_a.summary.items():
        assert close(float(va), float(res_b.summary[k]), rel, DIFFERENCES.get(k, 1e-12)), (k, va, res_b.summary[k])
    assert [s for s, _ in res_a.val_history] == [s for s, _ in res_b.val_history]


@contextmanager
def dynamo_compiles():
    """The compile ids of the frames dynamo compiles while the block runs (a recompile is one more)."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler
    ids: list[str] = []

    def on_start(args):
        if args.callback_trigger == CallbackTrigger.DYNAMO:
            ids.append(args.compile_id)

    callback_handler.register_start_callback(on_start)
    try:
        yield ids
    finally:
        callback_handler.remove_start_callback(on_start)


def test_compiled_equals_eager_and_compiles_once(setup):
    """``compile=True`` (the product's path on a GPU; the evaluations compiled too, all models at once, the
    evaluating ones picked out) trains the same runs as the eager pass, float64 on CPU — also after the
    first model is pruned at step 10 and the pass is rebuilt without it, when the rows that evaluate are the
    2nd and 3rd. The training pass, the optimizer step and the evaluation compile once each: neither the
    rebuilt pass (5 slots instead of 6) nor a second group (other batch sizes: 4 slots of 2 models, K=2,
    other step counts and final windows) compiles again. When the second group's B=12 model finishes, the
    B=4 model left would be a pass of one slot: compiled, the pass stays as it is (a size-1 dimension is
    a compile of its own); eager, it is rebuilt."""
    phase, corpus, cfgs = setup
    p = phase.with_overrides(tokens=24 * 4 * 16, warmup=3 * 4 * 16, eval_interval=4, checkpoint_every=6)
    cfgs2 = [p.run_config(4, 1e-3, 1.0, 0), p.run_config(12, 3e-3, None, 1)]
    assert [c.steps for c in cfgs2] == [24, 8] and slot_size(cfgs) == slot_size(cfgs2) == 4
    torch._dynamo.reset()  # what other tests compiled does not count
    tm, tm2, tm_e2 = {}, {}, {}
    with dynamo_compiles() as first:
        res_c, recs_c = run_group(cfgs, corpus, [Recorder(prune_at=10), Recorder(), Recorder()], compile=True,
                                  timings=tm)
    with dynamo_compiles() as second:
        res_c2, recs_c2 = run_group(cfgs2, corpus, compile=True, timings=tm2)
    assert len(first) == 3 and second == [], (first, second)
    assert res_c[0].status == "PRUNED" and [s for s, _ in recs_c[2].evals] == [10, 20, 30]
    res_e, recs_e = run_group(cfgs, corpus, [Recorder(prune_at=10), Recorder(), Recorder()])
    res_e2, recs_e2 = run_group(cfgs2, corpus, timings=tm_e2)
    assert (tm["builds"], tm2["builds"], tm_e2["builds"]) == (2, 1, 2)
    for re_, rce, rc, rcc in zip(res_e + res_e2, recs_e + recs_e2, res_c + res_c2, recs_c + recs_c2):
        assert_same_run(re_, rce, rc, rcc)


@pytest.fixture
def flash_meta_of_torch_2_11():
    """The CPU flash SDPA's meta function as torch 2.11 has it: logsumexp float32 whatever the input, while
    the kernel makes it float64 for float64 (pytorch#185539). Caches off, so compiled code is traced anew."""
    import torch._inductor.config as inductor_config
    from torch._C import DispatchKey

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    meta = op.py_kernels[DispatchKey.Meta]

    def float32_logsumexp(*args, **kwargs):
        out, lse = meta(*args, **kwargs)
        return out, lse.to(torch.float32)

    op.py_kernels[DispatchKey.Meta] = float32_logsumexp
    op._dispatch_cache.clear()
    torch._dynamo.reset()
    try:
        with inductor_config.patch(force_disable_caches=True):
            yield
    finally:
        op.py_kernels[DispatchKey.Meta] = meta
        op._dispatch_cache.clear()
        torch._dynamo.reset()


def test_float64_attention_compiles_with_torch_2_11s_flash_meta(flash_meta_of_torch_2_11):
    """The batched pass's attention in float64 on a CPU (the tests' arithmetic) differentiates compiled where
    torch 2.11's meta of the CPU flash kernel breaks SDPA's backward (compiled it is :func:`math_causal`),
    and gives eager's (SDPA's) output and gradient."""
    qkv = torch.randn(3, 2 * 8, 3 * 16, dtype=torch.float64, requires_grad=True)
    q, k, v = (z.detach().requires_grad_() for z in qkv.split(16, -1))
    with pytest.raises(RuntimeError, match="expected scalar type Double but found Float"):  # the fixture's bug
        torch.compile(lambda a: torch.nn.functional.scaled_dot_product_attention(a, a, a, is_causal=True))(
            q.view(3, 2, 8, 16)).sum().backward()
    (compiled,) = torch.autograd.grad(torch.compile(sdpa_causal)(qkv, 8, 2).square().sum(), [qkv])
    (eager,) = torch.autograd.grad(sdpa_causal(qkv, 8, 2).square().sum(), [qkv])
    assert torch.allclose(compiled, eager, rtol=1e-12, atol=1e-14)
    heads = [z.detach().view(6, 8, 2, 8).transpose(1, 2) for z in (q, k, v)]  # 3 slots of 2 sequences, 2 heads
    ref = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
    assert torch.allclose(math_causal(*heads), ref, rtol=1e-12, atol=1e-14)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (run on the device machine, docs/performance.md)")


@pytest.fixture
def on_cuda(setup):
    """The setup's corpus on the GPU for one test (moved back after)."""
    _, corpus, cfgs = setup
    corpus.to(torch.device("cuda"))
    yield corpus, cfgs
    corpus.to(CPU)


@pytest.fixture
def float32():
    """float32 the default dtype for one test: the product's precision on CUDA (bf16 autocast)."""
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float64)


@needs_cuda
def test_cuda_compiled_equals_eager(on_cuda):
    """On a GPU, compiled (the step recorded as a CUDA graph once per pass, then replayed) trains the same
    runs as the eager pass there, across a rebuild of the pass (the first model pruned at step 10). In
    float64, which autocast leaves alone and the fused attention hands to SDPA: only the generated kernels'
    summation order differs."""
    corpus, cfgs = on_cuda
    cuda = torch.device("cuda")
    res_e, recs_e = run_group(cfgs, corpus, [Recorder(prune_at=10), Recorder(), Recorder()], device=cuda)
    res_g, recs_g = run_group(cfgs, corpus, [Recorder(prune_at=10), Recorder(), Recorder()], device=cuda,
                              compile=True)
    assert res_g[0].status == "PRUNED"
    for re_, rce, rg, rcg in zip(res_e, recs_e, res_g, recs_g):
        assert_same_run(re_, rce, rg, rcg)


@needs_cuda
def test_cuda_logs_equal_train_alone(on_cuda, float32):
    """On a GPU the logged sums reach on_log once the GPU has made them (ticks later, no wait): the same
    hook calls at the same steps as train() alone on the same GPU — also for a model pruned at its step-10
    evaluation and for one pruned by on_step at step 15 while the sums of its step 14 are still on their
    way (the GPU held back by a sleep kernel): its logs of steps 1-14 all arrive (on_step, a progress
    count, may run ahead of on_log). Both in bf16 autocast, train()'s precision on CUDA: only the first
    step's values are compared, to bf16 tolerance (later ones drift apart with the rounding)."""
    corpus, cfgs = on_cuda
    cuda = torch.device("cuda")
    recs = [Recorder(), Recorder(prune_at=10), Recorder(prune_step=15)]
    hooks = [r.hooks() for r in recs]
    on_step = hooks[2].on_step

    def gpu_behind(step):  # the GPU falls behind: at step 15 the sums logged at step 14 are still on their way
        if step == 14:
            torch.cuda._sleep(500_000_000)
        on_step(step)

    hooks[2].on_step = gpu_behind
    res = train_group(cfgs, corpus, cuda, hooks)
    alone = [Recorder(), Recorder(prune_at=10), Recorder(prune_step=15)]
    res_a = [train(c, corpus, cuda, r.hooks()) for c, r in zip(cfgs, alone)]
    assert [r.status for r in res] == ["FINISHED", "PRUNED", "PRUNED"] and res[2].steps_done == 15
    assert [s for s, _ in recs[2].logs] == list(range(1, 15))
    for r, rec, ra, reca in zip(res, recs, res_a, alone):
        assert (r.status, r.steps_done) == (ra.status, ra.steps_done)
        for calls, calls_a in ((rec.logs, reca.logs), (rec.evals, reca.evals), (rec.ckpts, reca.ckpts)):
            assert [s for s, _ in calls] == [s for s, _ in calls_a]
        assert [s for s in rec.steps if s <= r.steps_done] == reca.steps
        (s, m), (_, ma) = rec.logs[0], reca.logs[0]
        assert s == 1 and all(close(m[k], ma[k], 2e-2) for k in METRICS), (m, ma)


def test_batched_equals_one_by_one(setup, single, batched):
    """(a) 3 configs, different batch sizes / LRs / clips (one never clipped, one always): step by step equal."""
    _, corpus, cfgs = setup
    res_b, recs_b = batched
    res_s, recs_s = single
    for rs, rcs, rb, rcb in zip(res_s, recs_s, res_b, recs_b):
        assert rs.status == "FINISHED" and len(rcs.logs) == 30
        assert_same_run(rs, rcs, rb, rcb)
    # the clip regimes really are different: always / never / sometimes
    freq = [r.summary["avg_clip_frequency"] for r in res_b]
    assert freq[1] == 1.0 and freq[2] == 0.0 and 0.0 < freq[0] < 1.0
    assert all(m["grad_norm_after_clip"] <= 0.05 * (1 + 1e-6) for _, m in recs_b[1].logs)


def test_one_config_lr_does_not_leak(setup, batched):
    """(b) Change the middle config's LR: the other two trajectories stay the same (within REL)."""
    phase, corpus, cfgs = setup
    changed = [cfgs[0], phase.run_config(8, 1e-2, 0.05, 1), cfgs[2]]
    res, recs = run_group(changed, corpus)
    res_ref, recs_ref = batched
    assert recs[1].logs[-1][1]["train_loss"] != recs_ref[1].logs[-1][1]["train_loss"]  # it did change
    for i in (0, 2):
        assert_same_run(res_ref[i], recs_ref[i], res[i], recs[i])


def test_diverging_config_is_recorded_and_others_unchanged(setup, batched):
    """(c) A huge LR diverges (DIVERGED, as the single loop says), the others finish as if alone."""
    phase, corpus, cfgs = setup
    huge = phase.run_config(8, 1e30, None, 1)
    res, recs = run_group([cfgs[0], huge, cfgs[2]], corpus)
    alone, alone_rec = run_single([huge], corpus)
    assert res[1].status == "DIVERGED" == alone[0].status
    assert res[1].steps_done == alone[0].steps_done < 30
    assert "final_train_loss" not in res[1].summary and set(res[1].summary) == set(alone[0].summary)
    assert [s for s, _ in recs[1].logs] == [s for s, _ in alone_rec[0].logs]
    res_ref, recs_ref = batched
    for i in (0, 2):
        assert res[i].status == "FINISHED"
        assert_same_run(res_ref[i], recs_ref[i], res[i], recs[i])


def test_pruned_config_stops_alone(setup, batched):
    """A Pruned raised by one config's on_eval stops that config only, at that step."""
    _, corpus, cfgs = setup
    recs = [Recorder(), Recorder(prune_at=10), Recorder()]
    res, _ = run_group(cfgs, corpus, recs)
    assert res[1].status == "PRUNED" and res[1].steps_done == 10 and recs[1].steps[-1] == 10
    assert [s for s, _ in recs[1].ckpts] == []  # no checkpoint after the pruning eval, as in train.py
    res_ref, recs_ref = batched
    for i in (0, 2):
        assert_same_run(res_ref[i], recs_ref[i], res[i], recs[i])


def test_checkpoint_resume_equals_uninterrupted(setup, single, batched):
    """(d) Resume the group from its step-10 checkpoints: same as uninterrupted; train() resumes them too."""
    _, corpus, cfgs = setup
    res_ref, recs_ref = batched
    assert [s for s, _ in recs_ref[0].ckpts] == [10, 20, 30]
    states = [dict(r.ckpts[0][1]) for r in recs_ref]
    assert all(st["step"] == 10 for st in states)
    res, recs = run_group(cfgs, corpus, states=copy.deepcopy(states))
    for i in range(3):
        assert_same_run(res_ref[i], recs_ref[i], res[i], recs[i], rel=REL, from_step=10)
    # the state has train.py's format: the single loop resumes a batched checkpoint...
    res_s, recs_s = run_single(cfgs[:1], corpus, states=copy.deepcopy(states[:1]))
    single_res, single_recs = single
    assert_same_run(single_res[0], single_recs[0], res_s[0], recs_s[0], from_step=10)
    # ...and the group resumes a single-loop checkpoint
    res_g, recs_g = run_group(cfgs[:1], corpus, states=[copy.deepcopy(single_recs[0].ckpts[1][1])])
    assert_same_run(single_res[0], single_recs[0], res_g[0], recs_g[0], from_step=20)


def test_different_step_counts(setup):
    """(e) A token budget: B=4 runs 30 steps, B=8 15, B=12 10; each equals its run alone."""
    phase, corpus, _ = setup
    p = phase.with_overrides(tokens=30 * 4 * 16, warmup=3 * 4 * 16, eval_interval=5, checkpoint_every=100)
    cfgs = [p.run_config(12, 1e-3, None, 2), p.run_config(4, 3e-3, 1.0, 0), p.run_config(8, 3e-3, 0.05, 1)]
    assert [c.steps for c in cfgs] == [10, 30, 15]
    res, recs = run_group(cfgs, corpus)
    res_s, recs_s = run_single(cfgs, corpus)
    for i in range(3):
        assert res[i].status == "FINISHED" and len(recs[i].steps) == cfgs[i].steps
        assert [s for s, _ in recs[i].ckpts] == [cfgs[i].steps]
        assert_same_run(res_s[i], recs_s[i], res[i], recs[i])


LONG_PHASE = """
name: tiny_long
data: {dataset: random, random_train_tokens: 5000, random_val_tokens: 1000}
model: {d_model: 16, n_layers: 1, n_heads: 2, context_length: 8, vocab_size: 16}
optim: {warmup: 3}
train: {budget_kind: steps, budget: 280, eval_interval: 140, eval_batches: 1, log_interval: 20, checkpoint_every: 100}
grid: {batch_sizes: [2], lrs: [1.0e-3], clips: [1.0]}
"""


def test_slot_size_is_the_phases():
    """Every group of a phase gets the gcd of the grid's batch sizes as its slot size (one compiled pass
    for a whole sweep), or less where a group's batch sizes need it."""
    phase = _validated(yaml.safe_load(PHASE))  # grid batch sizes 4, 8, 12
    assert slot_size([phase.run_config(8, 1e-3), phase.run_config(12, 1e-3)]) == 4
    assert slot_size([phase.run_config(8, 1e-3)]) == 4
    assert slot_size([phase.run_config(8, 1e-3), phase.run_config(6, 1e-3)]) == 2


def test_group_arguments_are_checked(setup):
    """Hooks or resume states that do not match the configs, or configs of another architecture, are an
    error before anything trains; a group that did not train has no timings to record."""
    phase, corpus, cfgs = setup
    with pytest.raises(ValueError, match="one entry per config"):
        train_group(cfgs, corpus, CPU, hooks=[Hooks()])
    other = _validated(yaml.safe_load(PHASE.replace("d_model: 32", "d_model: 16")))
    with pytest.raises(ValueError, match="phase.model"):
        train_group([cfgs[0], other.run_config(4, 1e-3)], corpus, CPU)
    assert train_group([], corpus, CPU) == [] and timing_metrics({}) == {}


def test_long_run_across_batch_chunks_and_unaligned_resume():
    """280 steps cross the 256-step chunks of batch indices / optimizer scalars; resumes at 100 and 200."""
    phase = _validated(yaml.safe_load(LONG_PHASE))
    corpus = load_corpus(phase, 0)
    cfgs = [phase.run_config(2, 3e-3, 1.0, 0), phase.run_config(4, 1e-3, 0.1, 1)]
    res_s, recs_s = run_single(cfgs, corpus)
    res, recs = run_group(cfgs, corpus)
    for i in range(2):
        assert_same_run(res_s[i], recs_s[i], res[i], recs[i])
    states = [copy.deepcopy(recs[0].ckpts[0][1]), copy.deepcopy(recs[1].ckpts[1][1])]
    assert [st["step"] for st in states] == [100, 200]
    res_r, recs_r = run_group(cfgs, corpus, states=states)
    assert_same_run(res[0], recs[0], res_r[0], recs_r[0], rel=REL, from_step=100)
    assert_same_run(res[1], recs[1], res_r[1], recs_r[1], rel=REL, from_step=200)


# ---------------------------------------------------------------------------------------------------
# Gradient noise measured by the batched engine, as train() measures it

NOISE_METRICS = ("gns_grad_sq", "gns_trace", "gns_b_simple", "gns_grad_sq_adam", "gns_trace_adam",
                 "gns_b_simple_adam", "gns_grad_sq_adam_update", "gns_trace_adam_update",
                 "gns_b_simple_adam_update", "tail_alpha")


def with_noise(phase, interval=3, microbatch=1, tail=True):
    """The phase measuring noise at logging steps (every 2nd step) at least ``interval`` apart."""
    t = dataclasses.replace(phase.train, log_interval=2, noise_interval=interval, noise_microbatch=microbatch,
                            tail_index=tail)
    return dataclasses.replace(phase, train=t, grid=dataclasses.replace(phase.grid, batch_sizes=(4, 16)))


@pytest.fixture(scope="module")
def noise_setup(setup):
    """B=4 (4 micro-batches: no tail index) and two B=16 (16: a tail index for the tensors with enough
    samples); clip regimes as in setup."""
    phase, corpus, _ = setup
    p = with_noise(phase)
    return p, corpus, [p.run_config(4, 3e-3, 1.0, 0), p.run_config(16, 3e-3, 0.05, 1), p.run_config(16, 1e-3, None, 2)]


@pytest.fixture(scope="module")
def noise_runs(noise_setup):
    _, corpus, cfgs = noise_setup
    return run_single(cfgs, corpus), run_group(cfgs, corpus)


def assert_same_noise(rec_a, rec_b, rel=REL, from_step=0):
    """The same noise metrics (names and values) at the same logging steps."""
    logs_a = [(s, m) for s, m in rec_a.logs if s > from_step]
    logs_b = [(s, m) for s, m in rec_b.logs if s > from_step]
    assert [s for s, _ in logs_a] == [s for s, _ in logs_b]
    for (s, ma), (_, mb) in zip(logs_a, logs_b):
        assert {k for k in ma if k in NOISE_METRICS} == {k for k in mb if k in NOISE_METRICS}, s
        for k in NOISE_METRICS:
            if k in ma:
                assert close(ma[k], mb[k], rel), (s, k, ma[k], mb[k])


def test_noise_metrics_and_summaries_equal_train_alone(noise_runs):
    """Every run of a group logs train()'s noise metrics at train()'s steps (logging steps at least
    noise_interval apart: 4, 8, ..., 28) and gets its noise summary, tail index included (the same
    estimator and permutation keys; α̂ for B=16 only)."""
    (res_s, recs_s), (res_b, recs_b) = noise_runs
    for rs, rcs, rb, rcb in zip(res_s, recs_s, res_b, recs_b):
        assert_same_run(rs, rcs, rb, rcb)
        assert_same_noise(rcs, rcb)
        assert [s for s, m in rcb.logs if "gns_grad_sq" in m] == list(range(4, 30, 4))
        assert rb.summary["gns_measurements"] == 7 and any("gns_b_simple" in m for _, m in rcb.logs)
    assert "tail_index_alpha" not in res_b[0].summary and all("tail_alpha" not in m for _, m in recs_b[0].logs)
    assert all(res_b[i].summary["tail_index_n"] > 0 for i in (1, 2))


def test_measuring_noise_leaves_training_unchanged(setup, noise_setup, noise_runs):
    """The same group without measurement trains bit for bit the same runs (the measurement touches neither
    the step's gradients nor any RNG)."""
    _, corpus, cfgs = noise_setup
    off = [dataclasses.replace(c, phase=with_noise(setup[0], interval=0, tail=False)) for c in cfgs]
    res, recs = run_group(off, corpus)
    _, (res_b, recs_b) = noise_runs
    for r, rec, rb, recb in zip(res, recs, res_b, recs_b):
        assert "gns_measurements" not in r.summary and r.status == rb.status == "FINISHED"
        assert [(s, [m[k] for k in METRICS]) for s, m in rec.logs] == [(s, [m[k] for k in METRICS]) for s, m in recb.logs]
        assert rec.evals == recb.evals


def test_noise_state_resumes_across_the_two_paths(noise_setup, noise_runs):
    """A group's step-10 checkpoint carries the noise state: train() resumes it and reports what it reports
    uninterrupted (metrics and summary); the group resumes train()'s checkpoint likewise."""
    _, corpus, cfgs = noise_setup
    (res_s, recs_s), (res_b, recs_b) = noise_runs
    states = [copy.deepcopy(r.ckpts[0][1]) for r in recs_b]
    assert all(st["step"] == 10 and st["noise"]["steps"] == [4, 8] for st in states)
    res, recs = run_single(cfgs, corpus, states=states)
    for i in range(3):
        assert_same_run(res_s[i], recs_s[i], res[i], recs[i], from_step=10)
        assert_same_noise(recs_s[i], recs[i], from_step=10)
    res_g, recs_g = run_group(cfgs, corpus, states=[copy.deepcopy(r.ckpts[0][1]) for r in recs_s])
    for i in range(3):
        assert_same_run(res_b[i], recs_b[i], res_g[i], recs_g[i], from_step=10)
        assert_same_noise(recs_b[i], recs_g[i], from_step=10)


def test_compiled_noise_equals_eager_and_compiles_once(noise_setup, noise_runs):
    """Compiled, the measurement runs its own compiled pass (slots dynamic) beside the training pass: the
    same noise metrics and summaries as eager; one more compile in all (training pass, optimizer step,
    evaluation, measurement), none for a second group of other shapes (three B=16 models: 48 micro-batches
    measured at once instead of 4 and 32)."""
    p, corpus, cfgs = noise_setup
    _, (res_e, recs_e) = noise_runs
    cfgs2 = [p.run_config(16, 2e-3, 1.0, 3), p.run_config(16, 1e-3, 0.05, 4), p.run_config(16, 3e-3, None, 5)]
    torch._dynamo.reset()
    with dynamo_compiles() as first:
        res_c, recs_c = run_group(cfgs, corpus, compile=True)
    with dynamo_compiles() as second:
        res_c2, recs_c2 = run_group(cfgs2, corpus, compile=True)
    assert len(first) == 4 and second == [], (first, second)
    res_e2, recs_e2 = run_group(cfgs2, corpus)
    for re_, rce, rc, rcc in zip(res_e + res_e2, recs_e + recs_e2, res_c + res_c2, recs_c + recs_c2):
        assert_same_run(re_, rce, rc, rcc)
        assert_same_noise(rce, rcc)


@needs_cuda
def test_cuda_compiled_noise_equals_eager(noise_setup):
    """On a GPU, compiled with the step recorded as a CUDA graph, the measurements between replays give the
    eager engine's noise metrics there (float64: only the generated kernels' summation order differs), and
    the training runs are the same."""
    _, corpus, cfgs = noise_setup
    cuda = torch.device("cuda")
    corpus.to(cuda)
    try:
        res_e, recs_e = run_group(cfgs, corpus, device=cuda)
        res_g, recs_g = run_group(cfgs, corpus, device=cuda, compile=True)
    finally:
        corpus.to(CPU)
    for re_, rce, rg, rcg in zip(res_e, recs_e, res_g, recs_g):
        assert_same_run(re_, rce, rg, rcg)
        assert_same_noise(rce, rcg)
