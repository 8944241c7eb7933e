"""Phases with variant axes (model sizes, tasks, batch-size schedules, LR rules) and the new training options:
what they resolve to, what their hashes see, and every bad input as one ConfigError."""

from __future__ import annotations

import math

import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_grokking import PHASE as GROK_PHASE

from scaling.config import ConfigError, load_phase, n_params_nonembedding

# test_grokking's phase with the default objective (final_val_loss)
GROK = GROK_PHASE.replace("seeds: [0, 1],\n        objective: step_val_acc_99}", "seeds: [0, 1]}")


def _phase(tmp_path, text, name="p.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return load_phase(phase_file=f)


def test_classic_phases_keep_their_hashes():
    """The new options are out of the hash while off: every recorded run still matches its configuration."""
    assert load_phase("2_5").run_config(64, 3e-3).config_hash() == "e2773d93e484a2c1"
    assert load_phase("2").run_config(8, 1e-3, None, 0).config_hash() == "6ff1147c1cc0bdab"
    assert load_phase("2_5_tokens").run_config(32, 1e-3, splits=("valid", "test")).config_hash() == "b1e22f19e902384a"
    assert len(load_phase("2_5").run_configs()) == 20


def test_grokking_phase_crosses_its_axes_and_merges_what_an_lr_rule_cannot_change(tmp_path):
    p = _phase(tmp_path, GROK)
    cfgs = p.run_configs()
    # 2 tasks x 2 seeds x (constant once + linear and step under 2 rules each)
    assert len(cfgs) == 2 * 2 * (1 + 2 + 2) == len({c.config_hash() for c in cfgs})
    const = [c for c in cfgs if c.schedule.kind == "constant"]
    assert len(const) == 4 and {c.lr_rule for c in const} == {"none"}
    c = p.run_config(8, 3e-3, task="x_div_y", schedule="linear_2_8", lr_rule="sqrt")
    params = c.to_params()
    assert (params["task"], params["modulus"], params["batch_schedule"], params["lr_rule"]) == \
        ("x_div_y", 7, "linear:2->8", "sqrt")
    assert c.run_name() == "B8-lr0.003-clipnone-s0-x_div_y-linear_2_8-sqrt" and not c.batchable
    for other in (p.run_config(8, 3e-3, task="x_plus_y", schedule="linear_2_8", lr_rule="sqrt"),
                  p.run_config(8, 3e-3, task="x_div_y", schedule="step_2_8", lr_rule="sqrt"),
                  p.run_config(8, 3e-3, task="x_div_y", schedule="linear_2_8", lr_rule="none"),
                  p.run_config(8, 3e-3, 1.0, task="x_div_y", schedule="linear_2_8", lr_rule="sqrt")):
        assert other.config_hash() != c.config_hash()
    modulus11 = _phase(tmp_path, GROK.replace("modulus: 7", "modulus: 11").replace("132", "136"), "q.yaml")
    fraction = _phase(tmp_path, GROK.replace("train_fraction: 0.5", "train_fraction: 0.6"), "r.yaml")
    for q in (modulus11, fraction):
        assert q.run_config(8, 3e-3, task="x_div_y", schedule="linear_2_8", lr_rule="sqrt").config_hash() != \
            c.config_hash()


def test_one_configuration_needs_one_entry_of_each_axis(tmp_path):
    p = _phase(tmp_path, GROK)
    with pytest.raises(ConfigError, match="has 2 tasks \\(x_plus_y, x_div_y\\): choose one with --tasks"):
        p.run_config(8, 3e-3)
    with pytest.raises(ConfigError, match="task 'x_minus_y' is not in phase 'tiny_grok'"):
        p.run_config(8, 3e-3, task="x_minus_y", schedule="constant", lr_rule="none")
    one = p.with_overrides(tasks=["x_div_y"], schedules=["step_2_8"], lr_rules=["sqrt"])
    c = one.run_config(8, 3e-3)
    assert (c.task, c.schedule.label, c.lr_rule) == ("x_div_y", "step_2_8", "sqrt")
    assert len(one.run_configs()) == 2  # the two seeds
    with pytest.raises(ConfigError, match="schedules entry 'cosine' is not in phase"):
        p.with_overrides(schedules=["cosine"])


def test_ladder_sizes_are_separate_configurations_at_equal_tokens_per_parameter():
    p = load_phase("ladder")
    assert p.data.dataset == "text" and p.train.budget_kind == "tokens_per_param" and p.train.budget == 20
    cfgs = p.run_configs()
    assert len(cfgs) == 5 * 3 == len({c.config_hash() for c in cfgs})
    for c in cfgs:
        size = next(s for s in p.grid.model_sizes if s.name == c.model_size)
        assert (c.phase.model.d_model, c.phase.model.n_layers, c.phase.model.n_heads) == \
            (size.d_model, size.n_layers, size.n_heads)
        params = c.to_params()
        assert params["model_size"] == c.model_size and params["d_model"] == size.d_model
        n = n_params_nonembedding(c.phase.model)
        assert c.steps * c.tokens_per_step == pytest.approx(20 * n, rel=0.002)
        assert c.warmup_steps == round(c.steps / 20)
    keys = {(c.corpus_key(), c.phase.model) for c in cfgs}
    assert len(keys) == 5  # the sweep never groups two sizes (one architecture per batched group)
    with pytest.raises(ConfigError, match="has 5 model sizes .*choose one with --model-sizes"):
        p.run_config(16, 1e-3)
    assert p.with_overrides(model_sizes=["m"]).run_config(16, 1e-3).model_size == "m"


def test_new_training_options_are_hashed_only_when_on(tiny_random_phase):
    p = load_phase(phase_file=tiny_random_phase)
    base = p.run_config(8, 1e-3)
    assert base.batchable and "dropout" in base.to_params()
    import dataclasses
    for section, field, value in (("model", "dropout", 0.1), ("train", "label_smoothing", 0.1),
                                  ("train", "grad_accum", 2)):
        q = dataclasses.replace(p, **{section: dataclasses.replace(getattr(p, section), **{field: value})})
        c = q.run_config(8, 1e-3)
        assert c.config_hash() != base.config_hash() and not c.batchable, field
        assert c.to_params()[field] == value


BAD = [
    ("modulus: 7", "modulus: 8", "data.modulus must be a prime"),
    ("vocab_size: 132", "vocab_size: 128", "model.vocab_size must be 132 and model.context_length 4"),
    ("tasks: [x_plus_y, x_div_y]", "tasks: [x_times_y]", "grid.tasks entries must be among"),
    ("tasks: [x_plus_y, x_div_y]", "tasks: []", "grid.tasks must list at least one"),
    ("[[0, 2], [15, 8]]", "[[1, 2], [15, 8]]", "the first at step 0"),
    ("[[0, 2], [15, 8]]", "[[0, 2], [0, 8]]", "the steps must increase"),
    ("{kind: linear, start: 2, end: 8}", "{kind: linear, start: 2}", "needs start and end"),
    ("{kind: linear, start: 2, end: 8}", "{kind: linear, start: 2, end: 8, batch: 3}", "takes end, start, not batch"),
    ("{kind: linear, start: 2, end: 8}", "{kind: cubic, start: 2, end: 8}", "kind must be one of"),
    ("{kind: linear, start: 2, end: 8}", "{kind: linear, start: 2, end: 400}", "batch size 400 exceeds the 24"),
    ("lr_rules: [none, sqrt]", "lr_rules: [none, cube]", "grid.lr_rules entries must be among"),
    ("lr_rules: [none, sqrt]", "lr_rules: [sqrt, sqrt]", "grid.lr_rules entries must differ"),
    ("budget_kind: steps", "budget_kind: tokens", "train.budget_kind must be steps for data.dataset modular"),
    ("seeds: [0, 1]", "seeds: [0, 1], grad_accum: 2", "train.grad_accum must be 1 for data.dataset modular"),
    ("seeds: [0, 1]", "seeds: [0, 1], objective: final_val_acc", "train.objective must be one of"),
    ("train_fraction: 0.5", "train_fraction: 1.0", "data.train_fraction must be in (0, 1)"),
    ("{kind: constant}", "{kind: constant, name: 'a b'}", "name must be a word"),
]


@pytest.mark.parametrize("old, new, needle", BAD)
def test_bad_grokking_phases(tmp_path, old, new, needle):
    assert old in GROK
    with pytest.raises(ConfigError) as e:
        _phase(tmp_path, GROK.replace(old, new))
    assert needle in str(e.value) and "\n" not in str(e.value)


LM = """\
name: lm
data: {dataset: random, random_train_tokens: 20000, random_val_tokens: 4000}
model: {d_model: 16, n_layers: 1, n_heads: 2, context_length: 16, vocab_size: 32}
train: {budget_kind: steps, budget: 20, eval_interval: 10, eval_batches: 2, log_interval: 5, checkpoint_every: 10}
grid:
  batch_sizes: [4, 8]
  lrs: [1.0e-3]
  model_sizes: [{name: a, d_model: 16, n_layers: 1, n_heads: 2}, {name: b, d_model: 32, n_layers: 2, n_heads: 2}]
"""


@pytest.mark.parametrize("old, new, needle", [
    ("budget: 20,", "budget: 20, grad_accum: 3,", "batch_size 4 must be divisible by train.grad_accum (3)"),
    ("budget: 20,", "budget: 20, objective: step_val_acc_99,", "step_val_acc_99 needs data.dataset modular"),
    ("vocab_size: 32}", "vocab_size: 32, dropout: 1.0}", "model.dropout must be in [0, 1)"),
    ("{name: b,", "{name: a,", "grid.model_sizes names must differ"),
    ("{name: b, d_model: 32, n_layers: 2, n_heads: 2}", "{name: b, d_model: 32, n_layers: 2}", "must give"),
    ("{name: b, d_model: 32,", "{name: b, d_model: 33,", "d_model (33) must be divisible by n_heads (2)"),
    ("  lrs: [1.0e-3]\n", "  lrs: [1.0e-3]\n  tasks: [x_plus_y]\n", "need data.dataset modular"),
    ("budget_kind: steps, budget: 20", "budget_kind: tokens_per_param, budget: 0.001", "steps must be >= 1"),
])
def test_bad_size_and_option_phases(tmp_path, old, new, needle):
    assert old in LM
    with pytest.raises(ConfigError) as e:
        _phase(tmp_path, LM.replace(old, new))
    assert needle in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=40, deadline=None)
@given(x=st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1.0),
                   st.just(math.nan), st.just(math.inf)))
def test_any_label_smoothing_outside_zero_one_is_rejected(tmp_path_factory, x):
    f = tmp_path_factory.mktemp("ls") / "p.yaml"
    f.write_text(LM.replace("budget: 20,", f"budget: 20, label_smoothing: {x!r},".replace("nan", ".nan")
                            .replace("inf", ".inf")))
    with pytest.raises(ConfigError, match="train.label_smoothing must be in"):
        load_phase(phase_file=f)


def test_cli_asks_for_a_size_in_one_line(tmp_path):
    r = run_cli("train", "--phase", "ladder", "--batch-size", 16, "--lr", 1e-3, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: phase 'ladder' has 5 model sizes (xs, s, m, l, xl): choose one with --model-sizes"]
    r = run_cli("train", "--phase", "ladder", "--model-sizes", "huge", "--batch-size", 16, "--lr", 1e-3, cwd=tmp_path)
    assert r.returncode == 2 and "model_sizes entry 'huge' is not in phase 'ladder'" in r.stderr
    assert not (tmp_path / "mlruns").exists()
