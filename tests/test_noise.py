"""The gradient-noise estimators on synthetic data with known answers: a quadratic model whose |G|² and
tr Σ are known in closed form, α-stable and Gaussian samples for the tail index, the running tracker."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import levy_stable
from torch import nn

from scaling import noise
from scaling.config import ConfigError, ModelConfig, load_phase
from scaling.model import build_model


class Quadratic(nn.Module):
    """loss_i(w) = ½|w − c_i|² per sample c_i (a row of x): its gradient is w − c_i, so with c ~ (μ, Σ)
    the true gradient is G = w − μ and the per-sample covariance is Σ. Two tensors (per-tensor columns)."""

    def __init__(self, w: torch.Tensor, split: int):
        super().__init__()
        self.a = nn.Parameter(w[:split].clone())
        self.b = nn.Parameter(w[split:].clone())

    def loss(self, x, y):
        w = torch.cat([self.a, self.b])
        return 0.5 * ((w - x) ** 2).sum(-1).mean()


def _quadratic_problem(d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    sd = torch.exp(torch.randn(d, generator=g, dtype=torch.float64))  # coordinates of different scales
    w = mu + torch.randn(d, generator=g, dtype=torch.float64) * 2.0
    return mu, sd, w


# ---------------------------------------------------------------------------------------------
# The estimator's algebra


def test_gns_estimates_are_the_unbiased_sample_moments_and_broadcast_over_models():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 8, 50)) + rng.normal(size=(3, 1, 50))  # 3 models, K = 8 micro-batches
    micro_sq = (g ** 2).sum(-1)
    mean_sq = (g.mean(1) ** 2).sum(-1)
    for b in (1, 4):
        grad_sq, trace = noise.gns_estimates(torch.tensor(micro_sq), torch.tensor(mean_sq), b)
        for m in range(3):
            cov_trace = np.trace(np.cov(g[m].T, ddof=1))  # per micro-batch; per sequence: × b
            assert float(trace[m]) == pytest.approx(b * cov_trace, rel=1e-10)
            assert float(grad_sq[m]) == pytest.approx(mean_sq[m] - cov_trace / 8, rel=1e-10)
    np_grad_sq, np_trace = noise.gns_estimates(micro_sq, mean_sq, 4)  # numpy arrays too
    assert np.allclose(np_grad_sq, grad_sq.numpy()) and np.allclose(np_trace, trace.numpy())


def test_one_micro_batch_is_refused():
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        noise.gns_estimates(torch.ones(3, 1), torch.ones(3), 1)


def test_squared_norms_weighted_and_stacked():
    a, b = torch.randn(5, 3, 4), torch.randn(5, 7)
    wa, wb = torch.rand(3, 4), torch.rand(7)
    out = noise.squared_norms([a, b], 1, [wa, wb])
    assert out.shape == (5, 2) and out.dtype == torch.float64
    assert torch.allclose(out[:, 0], (a * a * wa).sum((1, 2)).double())
    assert torch.allclose(noise.squared_norms([a, b], 0)[1], (b * b).sum().double())


# ---------------------------------------------------------------------------------------------
# A quadratic model: the estimates recover |G|² and tr Σ


def _simulate(w, mu, sd, batch, microbatch, reps, optimizer_weights=None, seed=1):
    model = Quadratic(w.float(), split=15)
    gen = torch.Generator().manual_seed(seed)
    est = []
    for _ in range(reps):
        x = (mu + sd * torch.randn(batch, len(mu), generator=gen, dtype=torch.float64)).float()
        s = noise.microbatch_stats(model, x, torch.zeros(batch), microbatch, optimizer_weights)
        est.append(s.estimates())
    return est


@pytest.mark.parametrize("microbatch", [1, 4])
def test_quadratic_model_recovers_gradient_norm_and_trace(microbatch):
    mu, sd, w = _quadratic_problem()
    true_g2, true_tr = float(((w - mu) ** 2).sum()), float((sd ** 2).sum())
    est = _simulate(w, mu, sd, batch=32, microbatch=microbatch, reps=300)
    for key, truth in (("grad_sq", true_g2), ("trace", true_tr)):
        v = np.array([e[key] for e in est])
        se = v.std(ddof=1) / math.sqrt(len(v))
        assert abs(v.mean() - truth) < 4 * se, (key, v.mean(), truth, se)
    # B_simple from the averaged estimates is the true one within a few percent
    ratio = np.mean([e["trace"] for e in est]) / np.mean([e["grad_sq"] for e in est])
    assert ratio == pytest.approx(true_tr / true_g2, rel=0.05)


def test_per_tensor_estimates_add_up_to_the_whole_model():
    mu, sd, w = _quadratic_problem()
    model = Quadratic(w.float(), split=15)
    x = (mu + sd * torch.randn(16, len(mu), dtype=torch.float64)).float()
    s = noise.microbatch_stats(model, x, torch.zeros(16), 2)
    g, t = s.layer_estimates()
    assert s.names == ("a", "b") and s.n_micro == 8 and g.shape == (2,)
    assert float(g.sum()) == pytest.approx(s.estimates()["grad_sq"], rel=1e-9)
    assert float(t.sum()) == pytest.approx(s.estimates()["trace"], rel=1e-9)


def test_adam_weighted_estimates_recover_tr_p_sigma_and_g_p_g():
    mu, sd, w = _quadratic_problem()
    model = Quadratic(w.float(), split=15)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: a step fills the state, w stays
    for _ in range(3):
        opt.zero_grad()
        model.loss((mu + sd * torch.randn(8, len(mu), dtype=torch.float64)).float(), None).backward()
        opt.step()
    p = torch.cat([noise.adam_preconditioner(opt.state[q]["exp_avg_sq"], float(opt.state[q]["step"]), 0.999, 1e-8)
                   for q in (model.a, model.b)]).double()
    truths = {"_adam": (float((p * (w - mu) ** 2).sum()), float((p * sd ** 2).sum())),
              "_adam_update": (float((p * p * (w - mu) ** 2).sum()), float((p * p * sd ** 2).sum()))}
    gen = torch.Generator().manual_seed(5)
    est = []
    for _ in range(300):
        x = (mu + sd * torch.randn(32, len(mu), generator=gen, dtype=torch.float64)).float()
        est.append(noise.microbatch_stats(model, x, torch.zeros(32), 1, opt).estimates())
    for sfx, (g2, tr) in truths.items():
        for key, truth in (("grad_sq" + sfx, g2), ("trace" + sfx, tr)):
            v = np.array([e[key] for e in est])
            assert abs(v.mean() - truth) < 4 * v.std(ddof=1) / math.sqrt(len(v)), (key, v.mean(), truth)


def test_no_adam_forms_before_the_optimizer_has_state():
    mu, _, w = _quadratic_problem()
    model = Quadratic(w.float(), split=15)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    s = noise.microbatch_stats(model, mu.float().expand(4, -1), torch.zeros(4), 1, opt)
    assert set(s.estimates()) == {"grad_sq", "trace"}


def test_microbatch_gradients_match_autograd_and_leave_grads_and_rng_alone():
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, context_length=8, vocab_size=32)
    model = build_model(cfg, 0)
    x, y = torch.randint(0, 32, (6, 8)), torch.randint(0, 32, (6, 8))
    model.loss(x, y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    rng = torch.random.get_rng_state()
    chunks = list(noise.microbatch_gradients(model, x, y, 2, max_chunk_bytes=1))  # one micro-batch a chunk
    assert len(chunks) == 3 and all(g[0].shape[0] == 1 for _, g in chunks)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    for k, (names, grads) in enumerate(chunks):
        ref = torch.autograd.grad(model.loss(x[2 * k:2 * k + 2], y[2 * k:2 * k + 2]), list(model.parameters()))
        for g, r in zip(grads, ref):
            assert torch.allclose(g[0], r, atol=1e-6, rtol=1e-4)


def _bf16_measurement_agrees_with_fp32_on_cpu(device: str):
    """The measurement of a transformer under bf16 autocast on ``device`` against fp32 on the CPU: the
    vmap-of-grad path differentiates through autocast's casts and SDPA's math kernel."""
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=32, vocab_size=128)
    x, y = torch.randint(0, 128, (32, 32)), torch.randint(0, 128, (32, 32))
    cpu = noise.microbatch_stats(build_model(cfg, 0), x, y, 1, tail=True)
    low = noise.microbatch_stats(build_model(cfg, 0).to(device), x.to(device), y.to(device), 1, tail=True,
                                 autocast=lambda: torch.autocast(device, dtype=torch.bfloat16))
    assert low.estimates()["trace"] == pytest.approx(cpu.estimates()["trace"], rel=0.1)
    assert low.estimates()["grad_sq"] == pytest.approx(cpu.estimates()["grad_sq"], rel=0.2)
    assert np.nanmedian(low.tail_alpha) == pytest.approx(np.nanmedian(cpu.tail_alpha), abs=0.15)


def test_measurement_under_cpu_bf16_autocast_agrees_with_fp32():
    _bf16_measurement_agrees_with_fp32_on_cpu("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measurement_on_cuda_under_bf16_autocast_agrees_with_fp32_on_cpu():
    _bf16_measurement_agrees_with_fp32_on_cpu("cuda")


# ---------------------------------------------------------------------------------------------
# Tail index


def test_tail_index_of_stable_and_gaussian_samples():
    rng = np.random.default_rng(0)
    stable = levy_stable.rvs(1.5, 0.0, size=100_000, random_state=1)
    assert noise.tail_index(stable, rng=rng) == pytest.approx(1.5, abs=0.1)
    assert noise.tail_index(rng.standard_normal(100_000), rng=rng) == pytest.approx(2.0, abs=0.1)


def test_pooling_coordinates_of_different_scales_reads_gaussian_noise_as_heavy_tailed():
    """The known bias the per-coordinate standardisation removes."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((32, 2048)) * np.exp(rng.normal(size=2048)) + rng.normal(size=2048)
    pooled = noise.tail_index((g - g.mean(0)).ravel(), rng=rng)
    assert pooled < 1.8
    assert noise.layer_tail_index(g, rng) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("k", [16, 64])
def test_layer_tail_index_recovers_alpha_of_coordinates_with_different_scales_and_means(alpha, k):
    rng = np.random.default_rng(k)
    c = noise.TAIL_SAMPLES // (k // 2)
    scales, means = np.exp(rng.normal(size=c)), rng.normal(0, 3, size=c)
    if alpha == 2.0:
        z = rng.standard_normal((k, c))
    else:
        z = levy_stable.rvs(alpha, 0.0, size=(k, c), random_state=k)
    est = [noise.layer_tail_index(z * scales + means, np.random.default_rng(i)) for i in range(3)]
    assert np.median(est) == pytest.approx(alpha, abs=0.1)


def test_too_few_micro_batches_or_samples_give_no_tail_index():
    rng = np.random.default_rng(0)
    assert math.isnan(noise.layer_tail_index(rng.standard_normal((8, 4096)), rng))
    assert math.isnan(noise.layer_tail_index(rng.standard_normal((16, 10)), rng))
    assert math.isnan(noise.tail_index([1.0, 2.0, 3.0]))


def _keys_of_numpy_permutation(g: np.ndarray, seed) -> torch.Tensor:
    """Sort keys under which tail_alpha_rows permutes g's usable samples as layer_tail_index's rng does."""
    n = g.shape[0] // 2
    d = g[0:2 * n:2] - g[1:2 * n:2]
    usable = np.flatnonzero(np.broadcast_to((d != 0).all(0), d.shape).ravel())
    perm = np.random.default_rng(seed).permutation(len(usable))
    keys = np.full(d.size, np.inf)
    keys[usable[perm]] = np.arange(len(perm))
    return torch.tensor(keys)


@pytest.mark.parametrize("k, c, kind", [(16, 4096, "stable"), (32, 700, "scaled"), (64, 2000, "stable"),
                                        (16, 100, "scaled"), (8, 1000, "scaled")])
def test_device_tail_index_is_the_numpy_estimator(k, c, kind):
    """tail_alpha_rows (all tensors and models at once, on the device) gives layer_tail_index's α̂ when it
    permutes the samples the same way — also with a column dropped for a zero pair difference, and NaN
    where the reference is NaN (too few micro-batches, too few samples); rows are independent."""
    rng = np.random.default_rng(k + c)
    g = (levy_stable.rvs(1.5, 0.0, size=(k, c), random_state=k) if kind == "stable"
         else rng.standard_normal((k, c)) * np.exp(rng.normal(size=c)) + rng.normal(size=c))
    g[2, 5] = g[3, 5]
    ref = noise.layer_tail_index(g, np.random.default_rng([7, 1]))
    other = rng.standard_normal((k, c))
    keys = torch.stack([_keys_of_numpy_permutation(g, [7, 1]), torch.rand(k // 2 * c, dtype=torch.float64)])
    got = noise.tail_alpha_rows(torch.tensor(np.stack([g, other])), keys)
    assert got.shape == (2,)
    assert (math.isnan(ref) and math.isnan(got[0])) or got[0].item() == pytest.approx(ref, rel=1e-10)
    alone = noise.tail_alpha_rows(torch.tensor(other)[None], keys[1:])
    assert torch.equal(alone.isnan(), got[1:].isnan()) and torch.allclose(alone, got[1:], equal_nan=True)


def test_tail_keys_are_per_model_streams():
    """A model's keys depend on its seed only: the same measured alone or with others."""
    together = noise.tail_keys([5, 9], [3, 4], "cpu")
    alone = noise.tail_keys([9], [3, 4], "cpu")
    assert [t.shape for t in together] == [(2, 3), (2, 4)]
    assert all(torch.equal(a[0], t[1]) for a, t in zip(alone, together))
    assert not torch.equal(together[0][0], together[0][1])


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_injected_noise_through_the_model_pipeline(alpha):
    """Per-sample gradients w − c_i with c_i Gaussian or α-stable around a mean, coordinates of different
    scales: the measured per-tensor tail index is α."""
    d, batch = 4096, 32
    rng = np.random.default_rng(3)
    scales, means = np.exp(rng.normal(size=d)), rng.normal(size=d)
    z = (rng.standard_normal((batch, d)) if alpha == 2.0
         else levy_stable.rvs(alpha, 0.0, size=(batch, d), random_state=4))
    x = torch.tensor(z * scales + means, dtype=torch.float32)
    model = Quadratic(torch.zeros(d), split=d // 2)
    s = noise.microbatch_stats(model, x, torch.zeros(batch), 1, tail=True, seed=0)
    assert s.tail_alpha.shape == (2,)
    assert np.median(s.tail_alpha) == pytest.approx(alpha, abs=0.1)


# ---------------------------------------------------------------------------------------------
# The tracker


def test_tracker_averages_numerator_and_denominator_separately():
    tr = noise.NoiseTracker(interval=10, decay=0.5)
    m1 = tr.update(10, {"grad_sq": 1.0, "trace": 100.0})
    m2 = tr.update(20, {"grad_sq": 3.0, "trace": 100.0})
    assert m1["gns_b_simple"] == pytest.approx(100.0)
    # EMAs (bias-corrected, decay 0.5): grad_sq (0.25 + 1.5) / 0.75, trace 100 → ratio 100 · 0.75 / 1.75
    assert m2["gns_b_simple"] == pytest.approx(100.0 * 0.75 / 1.75)
    assert m2["gns_b_simple"] != pytest.approx((100 / 1 + 100 / 3) / 2)  # not the mean of ratios
    assert m2["gns_grad_sq"] == 3.0 and m2["gns_trace"] == 100.0


def test_tracker_skips_undefined_ratios_and_non_finite_measurements():
    tr = noise.NoiseTracker(interval=1)
    m = tr.update(1, {"grad_sq": -2.0, "trace": 5.0, "grad_sq_adam": math.nan, "trace_adam": 1.0})
    assert "gns_b_simple" not in m and "gns_grad_sq_adam" not in m and m["gns_grad_sq"] == -2.0
    assert tr.summary(1) == {"gns_measurements": 1.0, "gns_microbatch": 1.0, "gns_interval": 1.0}


def test_tracker_cadence_at_logging_steps_at_least_interval_apart():
    tr = noise.NoiseTracker(interval=50)
    measured = []
    for done in range(1, 201):
        if tr.due(done, logging=done % 30 == 0):
            tr.update(done, {})
            measured.append(done)
    assert measured == [60, 120, 180]


def test_tracker_summary_and_state_round_trip():
    tr = noise.NoiseTracker(interval=10, microbatch=2, tail=True)
    rng = np.random.default_rng(0)
    for step in range(10, 101, 10):
        tr.update(step, {"grad_sq": 1 + rng.random(), "trace": 50 + step, "grad_sq_adam": 2.0, "trace_adam": 4.0},
                  alphas=[1.8, 1.9, math.nan])
    copy = noise.NoiseTracker(interval=10, microbatch=2, tail=True)
    copy.load_state_dict(tr.state_dict())
    extra = {"grad_sq": 1.5, "trace": 70.0}
    assert copy.update(110, extra, [2.0]) == tr.update(110, extra, [2.0])
    s = tr.summary(110)
    assert s == copy.summary(110)
    late = [r for st_, r in zip(tr.steps, tr.ratios[""]) if st_ > 55]
    assert s["b_noise_median"] == pytest.approx(float(np.median(late)))
    assert s["b_noise"] == tr.ratios[""][-1] and s["b_noise_adam"] == pytest.approx(2.0)
    assert s["tail_index_alpha"] == pytest.approx(1.9) and s["tail_index_n"] == 21
    assert s["tail_index_alpha_q25"] <= s["tail_index_alpha"] <= s["tail_index_alpha_q75"]
    assert s["gns_measurements"] == 11 and s["gns_microbatch"] == 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1, max_size=20))
def test_tracker_ratio_is_the_ratio_of_the_emas_whatever_the_inputs(pairs):
    tr = noise.NoiseTracker(interval=1, decay=0.8)
    for i, (g, t) in enumerate(pairs):
        m = tr.update(i + 1, {"grad_sq": g, "trace": t})
    wts = [0.8 ** (len(pairs) - 1 - i) for i in range(len(pairs))]
    eg = sum(w * g for w, (g, _) in zip(wts, pairs))
    et = sum(w * t for w, (_, t) in zip(wts, pairs))
    if eg > 1e-9 * sum(wts) * max(1.0, max(abs(g) for g, _ in pairs)):
        assert m["gns_b_simple"] == pytest.approx(et / eg, rel=1e-6, abs=1e-9)
    elif eg <= 0:
        assert "gns_b_simple" not in m


# ---------------------------------------------------------------------------------------------
# Configuration


BASE = "name: x\ngrid: {{batch_sizes: [4, 8], lrs: [0.1]}}\ntrain: {{{}}}\n"


def _phase(tmp_path, train: str):
    p = tmp_path / "x.yaml"
    p.write_text(BASE.format(train))
    return load_phase(phase_file=p)


@pytest.mark.parametrize("train, message", [
    ("noise_interval: -1", "train.noise_interval must be an integer >= 0"),
    ("noise_interval: 2.5", "train.noise_interval must be an integer >= 0"),
    ("noise_interval: true", "train.noise_interval must be an integer >= 0"),
    ("noise_interval: 5, noise_microbatch: 0", "train.noise_microbatch must be an integer >= 1"),
    ("noise_interval: 5, tail_index: 'yes'", "train.tail_index must be true or false"),
    ("tail_index: true", "train.tail_index needs train.noise_interval > 0"),
    ("noise_interval: 5, noise_microbatch: 3", "must split batch_size 4 into at least 2"),
    ("noise_interval: 5, noise_microbatch: 4", "must split batch_size 4 into at least 2"),
])
def test_bad_noise_options_are_one_line_config_errors(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        _phase(tmp_path, train)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 64), micro=st.integers(1, 64))
def test_a_run_measures_exactly_when_its_micro_batches_split_it(tmp_path_factory, b, micro):
    """Any batch size resolves (``scaling train --batch-size 1`` of a study phase too); one outside the
    grid that the micro-batches do not split into at least two is trained without measurement."""
    phase = _phase(tmp_path_factory.mktemp("p"), "noise_interval: 10, noise_microbatch: 1")
    phase = dataclasses.replace(phase, train=dataclasses.replace(phase.train, noise_microbatch=micro))
    assert phase.run_config(b, 0.1).measures_noise == (b % micro == 0 and b // micro >= 2)
    off = dataclasses.replace(phase, train=dataclasses.replace(phase.train, noise_interval=0))
    assert not off.run_config(b, 0.1).measures_noise


def test_noise_options_leave_config_hash_alone_and_study_phases_measure(tmp_path):
    on = _phase(tmp_path, "noise_interval: 5, noise_microbatch: 2, tail_index: true")
    assert on.run_config(8, 0.1).config_hash() == _phase(tmp_path, "").run_config(8, 0.1).config_hash()
    for name in ("2", "2_5", "2_5_tokens", "3a", "3b"):
        t = load_phase(name).train
        assert (t.noise_interval, t.noise_microbatch, t.tail_index) == (50, 1, True)
