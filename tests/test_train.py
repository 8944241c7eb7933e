"""The training loop on a real tiny model: clip metrics by construction, divergence, resume equivalence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TINY_TEXT

from scaling.config import load_phase
from scaling.data import load_corpus
from scaling.train import Hooks, lr_at, train


@pytest.fixture
def corpus(tiny_text_phase):
    phase = load_phase(phase_file=tiny_text_phase)
    return phase, load_corpus(phase, 0, TINY_TEXT, ("valid", "test"))


def _run(phase, corpus, lr=3e-3, clip=1.0, steps=20, resume_state=None, batch_size=8, **over):
    cfg = phase.with_overrides(steps=steps, **over).run_config(batch_size, lr, clip, splits=("valid", "test"))
    logs, evals, ckpts = [], [], []
    hooks = Hooks(on_log=lambda s, m: logs.append((s, m)), on_eval=lambda s, v: evals.append((s, v)),
                  on_checkpoint=lambda s, st: ckpts.append((s, copy.deepcopy(st))))  # state holds live tensors
    return cfg, train(cfg, corpus, torch.device("cpu"), hooks, resume_state), logs, evals, ckpts


@pytest.mark.parametrize("clip", [0.05, 1.0, 1e6, None])
def test_clip_metric_invariants(corpus, clip):
    phase, c = corpus
    cfg, res, logs, _, _ = _run(phase, c, clip=clip, log_interval=1)
    assert res.status == "FINISHED"
    for _, m in logs:
        before, after, freq, scale = (m["grad_norm_before_clip"], m["grad_norm_after_clip"],
                                      m["clip_frequency"], m["effective_lr_scale"])
        assert after <= before + 1e-9 and 0 <= freq <= 1 and 0 < scale <= 1
        if clip is None:
            assert after == before and freq == 0 and scale == 1
        elif freq == 1:  # clipping fired: the applied norm is at most the threshold, never the raw norm
            assert after <= clip * (1 + 1e-6) and after < before
        elif freq == 0:
            assert after == pytest.approx(before) and scale == pytest.approx(1.0, abs=1e-6)
    s = res.summary
    if clip == 0.05:
        assert s["avg_clip_frequency"] == 1.0 and s["avg_grad_norm_after"] <= 0.05 * (1 + 1e-6)
        assert s["avg_grad_norm_before"] > s["avg_grad_norm_after"]
    if clip in (None, 1e6):
        assert s["avg_clip_frequency"] == 0 and s["avg_grad_norm_after"] == pytest.approx(s["avg_grad_norm_before"])


def test_applied_gradient_norm_really_is_the_reported_one(corpus):
    """Recompute the post-clip norm from the gradients themselves after one step."""
    phase, c = corpus
    from scaling.data import BatchSampler
    from scaling.model import build_model
    from scaling.train import clip_stats
    model = build_model(phase.model, 0)
    x, y = BatchSampler(c.train, 0, 8, phase.model.context_length).batch(0)
    loss = model.loss(x, y)
    loss.backward()
    before = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.1)  # what train.py applies
    _, row = clip_stats(loss.detach(), before, 0.1)  # what it reports: loss, before, after, clipped, scale
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(row[3]) == 1.0  # clipped at this threshold
    assert float(applied) == pytest.approx(float(row[2]), rel=1e-5)
    assert float(applied) <= 0.1 + 1e-6 and float(row[4]) == pytest.approx(0.1 / (float(before) + 1e-6))


def test_summaries(corpus):
    phase, c = corpus
    cfg, res, logs, evals, ckpts = _run(phase, c, steps=40)
    s = res.summary
    assert [st for st, _ in evals] == [10, 20, 30, 40]
    assert s["final_val_loss"] == evals[-1][1]
    assert s["min_val_loss"] == min(v for _, v in evals)
    assert s["val_loss_rise"] == pytest.approx(s["final_val_loss"] - s["min_val_loss"])
    assert s["tokens_seen"] == 40 * 8 * phase.model.context_length
    assert s["epochs"] == pytest.approx(s["tokens_seen"] / len(c.train))  # passes over the training split
    assert s["final_train_loss"] < math.log(128) and s["train_loss_std"] >= 0
    assert {"baseline_uniform_loss", "baseline_unigram_loss", "baseline_bigram_loss"} <= set(s)
    assert [st for st, _ in ckpts] == [10, 20, 30, 40]
    assert [st for st, _ in logs] == list(range(5, 41, 5))


def test_lr_schedule():
    phase = load_phase("2_5")
    cfg = phase.run_config(32, 1e-3)
    assert lr_at(cfg, 0) == pytest.approx(1e-3 / 200) and lr_at(cfg, 199) == 1e-3 and lr_at(cfg, 5000) == 1e-3
    cos = phase.with_overrides(steps=1000, warmup=0)
    import dataclasses
    cos = dataclasses.replace(cos, optim=dataclasses.replace(cos.optim, schedule="cosine")).run_config(32, 1e-3)
    assert lr_at(cos, 0) == pytest.approx(1e-3) and lr_at(cos, 1000) == pytest.approx(1e-4)


def test_divergence_stops_the_run_without_crashing(corpus):
    phase, c = corpus
    _, res, _, _, _ = _run(phase, c, lr=1e4, clip=None, steps=40, warmup=0)
    assert res.status == "DIVERGED" and res.steps_done < 40
    assert "final_val_loss" not in res.summary


def test_resume_from_checkpoint_is_identical_to_uninterrupted(corpus):
    phase, c = corpus
    _, full, full_logs, full_evals, ckpts = _run(phase, c, steps=30)
    mid = next(st for s, st in ckpts if s == 10)
    _, resumed, logs, evals, _ = _run(phase, c, steps=30, resume_state=mid)
    assert evals == full_evals[1:]
    strip = lambda rows: [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in rows if s > 10]
    assert strip(logs) == strip(full_logs)
    assert resumed.summary == full.summary


NOISE_KEYS = ("gns_", "tail_", "b_noise")


@pytest.fixture
def noisy_phase(tmp_path, corpus):
    """The tiny phase measuring gradient noise at every logging step (5), per sequence, with the tail index."""
    from conftest import TINY_TEXT_PHASE
    p = tmp_path / "noisy.yaml"
    p.write_text(TINY_TEXT_PHASE.replace("seeds: [0]}", "seeds: [0], noise_interval: 5, noise_microbatch: 1, "
                                                        "tail_index: true}"))
    return load_phase(phase_file=p), corpus[1]


def _without_noise(rows):
    return [(s, {k: v for k, v in m.items() if k != "tokens_per_s" and not k.startswith(NOISE_KEYS)}) for s, m in rows]


def test_noise_measurement_leaves_the_training_trajectory_unchanged(corpus, noisy_phase):
    phase, c = corpus
    noisy, _ = noisy_phase
    assert noisy.run_config(16, 3e-3).config_hash() == phase.run_config(16, 3e-3).config_hash()
    _, off, off_logs, off_evals, _ = _run(phase, c, batch_size=16)
    _, on, on_logs, on_evals, _ = _run(noisy, c, batch_size=16)
    assert _without_noise(on_logs) == _without_noise(off_logs) and on_evals == off_evals
    assert {k: v for k, v in on.summary.items() if not k.startswith(NOISE_KEYS)} == off.summary
    assert not any(k.startswith(NOISE_KEYS) for _, m in off_logs for k in m)
    for _, m in on_logs:  # every logging step measured: K = 16 micro-batches of one sequence
        assert {"gns_grad_sq", "gns_trace", "gns_grad_sq_adam", "gns_trace_adam", "tail_alpha"} <= set(m)
        assert m["gns_trace"] > 0 and 0.5 < m["tail_alpha"] < 2.5
    s = on.summary
    assert s["gns_measurements"] == 4 and s["gns_microbatch"] == 1 and s["b_noise"] > 0
    assert s["tail_index_alpha_q25"] <= s["tail_index_alpha"] <= s["tail_index_alpha_q75"]
    assert {"b_noise_median", "b_noise_adam", "b_noise_adam_update", "tail_index_n"} <= set(s)


def test_resume_with_noise_measurement_is_identical_to_uninterrupted(noisy_phase):
    phase, c = noisy_phase
    _, full, full_logs, _, ckpts = _run(phase, c, steps=20, batch_size=16)
    mid = next(st for s, st in ckpts if s == 10)
    assert mid["noise"]["steps"] == [5, 10]
    _, resumed, logs, _, _ = _run(phase, c, steps=20, batch_size=16, resume_state=mid)
    strip = lambda rows: [(s, {k: v for k, v in m.items() if k != "tokens_per_s"}) for s, m in rows if s > 10]
    assert strip(logs) == strip(full_logs)
    assert resumed.summary == full.summary
    no_noise = dict(mid, noise=None)  # a checkpoint without noise state (the batched engine's) resumes too
    _, again, _, _, _ = _run(phase, c, steps=20, batch_size=16, resume_state=no_noise)
    assert again.summary["gns_measurements"] == 2


def test_gradient_accumulation_keeps_a_float64_model_in_float64():
    """The accumulated micro-batches' gradient is the whole batch's to float64 precision (logits rounded to
    float32 anywhere would show at ~1e-8), and the reported loss is float64."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from scaling.config import ModelConfig
    from scaling.model import build_model
    from scaling.train import forward_backward

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, context_length=8, vocab_size=32), 0)
    finally:
        torch.set_default_dtype(old)
    x, y = torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))
    whole = torch.autograd.grad(model.loss(x, y), list(model.parameters()))
    cfg = SimpleNamespace(phase=SimpleNamespace(train=SimpleNamespace(grad_accum=2, label_smoothing=0.0)))
    loss = forward_backward(model, x, y, cfg, nullcontext)
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(float(model.loss(x, y)), rel=1e-13)
    for p, g in zip(model.parameters(), whole):
        assert p.grad.dtype == torch.float64
        assert torch.allclose(p.grad, g, rtol=1e-11, atol=1e-14)
