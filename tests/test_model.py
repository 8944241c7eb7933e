"""NanoTransformer: parameter counts as in the phase notes, causality, deterministic init."""

from __future__ import annotations

import torch

from scaling.config import load_phase, n_params_estimate
from scaling.model import build_model


def test_param_counts_match_phase_notes_and_estimate():
    for name, lo, hi in (("2", 190_000, 215_000), ("2_5", 780_000, 830_000)):
        cfg = load_phase(name).model
        n = build_model(cfg, 0).n_params()
        assert n == n_params_estimate(cfg)
        assert lo < n < hi, (name, n)


def test_causal_and_deterministic():
    cfg = load_phase("2_5").model
    a, b = build_model(cfg, 7), build_model(cfg, 7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    idx = torch.randint(128, (2, 20))
    out1 = a(idx)
    idx2 = idx.clone()
    idx2[:, 10:] = torch.randint(128, (2, 10))
    out2 = a(idx2)
    assert torch.allclose(out1[:, :10], out2[:, :10], atol=1e-6)  # the future does not leak
    assert out1.shape == (2, 20, 128)


def test_untrained_loss_is_near_uniform():
    cfg = load_phase("2_5").model
    m = build_model(cfg, 0)
    idx, targets = torch.randint(128, (4, 32)), torch.randint(128, (4, 32))
    with torch.no_grad():
        assert abs(float(m.loss(idx, targets)) - torch.log(torch.tensor(128.0)).item()) < 0.2
