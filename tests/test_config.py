"""Phase configs: built-ins load, grids are right, and every bad input is one clear ConfigError."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import TINY_RANDOM_PHASE, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.config import ConfigError, builtin_phase_names, load_phase, n_params_estimate

BUILTIN_25 = (Path(__file__).parents[1] / "scaling" / "phases" / "2_5.yaml").read_text()


def test_builtin_phases_match_the_study():
    assert set(builtin_phase_names()) >= {"2", "2_5", "3a", "3b", "2_5_tokens"}
    p2 = load_phase("2")
    assert p2.data.dataset == "random" and p2.model.vocab_size == 65 and p2.model.d_model == 64
    assert p2.grid.batch_sizes == (8, 16, 32, 64, 128, 256, 512) and len(p2.grid.lrs) == 7
    assert p2.train.budget == 5000
    p25 = load_phase("2_5")
    assert p25.grid.batch_sizes == (32, 64, 128, 256)
    assert p25.grid.lrs == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    assert p25.train.budget == 10000 and p25.optim.warmup == 200 and p25.grid.clips == (1.0,)
    assert len(p25.grid_points()) == 20
    p3a = load_phase("3a")
    assert p3a.grid.batch_sizes == (128, 256) and p3a.grid.lrs == (0.01, 0.02, 0.03, 0.05, 0.1)
    assert p3a.train.budget == 5000


def test_phase_3b_pairs_lr_with_batch_size_and_crosses_clips():
    pts = load_phase("3b").grid_points()
    assert len(pts) == 8
    assert {(b, lr) for b, lr, _, _ in pts} == {(32, 0.001), (256, 0.05)}
    assert {c for _, _, c, _ in pts} == {None, 10.0, 1.0, 0.1}


def test_token_budget_gives_equal_tokens():
    p = load_phase("2_5_tokens")
    cfgs = [p.run_config(b, 1e-3) for b in p.grid.batch_sizes]
    assert {c.steps * c.tokens_per_step for c in cfgs} == {81_920_000}
    assert [c.steps for c in cfgs] == [20000, 10000, 5000, 2500]
    assert [c.warmup_steps for c in cfgs] == [400, 200, 100, 50]


def test_param_estimates_match_the_phase_notes():
    assert 190_000 < n_params_estimate(load_phase("2").model) < 215_000
    assert 780_000 < n_params_estimate(load_phase("2_5").model) < 830_000


def test_config_hash_is_stable_and_sensitive():
    p = load_phase("2_5")
    a, b = p.run_config(64, 3e-3), p.run_config(64, 3e-3)
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != p.run_config(64, 1e-3).config_hash()
    assert a.config_hash() != p.run_config(64, 3e-3, clip=None).config_hash()
    assert a.config_hash() != p.run_config(64, 3e-3, splits=("valid", "test")).config_hash()
    # how often we log does not change what is trained
    assert a.config_hash() == p.with_overrides(log_interval=7).run_config(64, 3e-3).config_hash()


@pytest.mark.parametrize("yaml_text, needle", [
    ("name: x\nfoo: 1\n", "unknown key 'foo'"),
    ("name: x\nmodel: {d_modle: 3}\n", "unknown key model.'d_modle'"),
    ("name: x\ngrid: {batch_sizes: [0], lrs: [0.1]}\n", "batch_size must be an integer >= 1, got 0"),
    ("name: x\ngrid: {batch_sizes: [4], lrs: [-0.1]}\n", "lr must be a number > 0, got -0.1"),
    ("name: x\ngrid: {batch_sizes: [4], lrs: [0.1], clips: [0]}\n", "grad_clip must be a number > 0, got 0"),
    ("name: x\ntrain: {budget: 0}\ngrid: {batch_sizes: [4], lrs: [0.1]}\n", "train.budget (steps) must be an integer >= 1, got 0"),
    ("name: x\ntrain: {budget: 2.5e0}\ngrid: {batch_sizes: [4], lrs: [0.1]}\n", "train.budget (steps) must be an integer >= 1, got 2.5"),
    ("name: x\nmodel: {d_model: 10, n_heads: 3}\ngrid: {batch_sizes: [4], lrs: [0.1]}\n", "divisible"),
    ("[1, 2]\n", "expected a mapping"),
    ("name: x\nmodel: {dropout: 0.1}\ntrain: {noise_interval: 10}\ngrid: {batch_sizes: [4], lrs: [0.1]}\n",
     "train.noise_interval needs model.dropout 0"),
])
def test_bad_phase_files(tmp_path, yaml_text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_phase(phase_file=f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads ``1e-4`` (no dot) as a string; a phase file means the number. A whole float of an integer
    field (``budget: 1e4`` steps, ``batch_sizes: [3.2e1]``) is that integer, with the same config hash."""
    f = tmp_path / "p.yaml"
    f.write_text(BUILTIN_25.replace("budget: 10000", "budget: 1e4").replace("lrs: [1.0e-4, 3.0e-4", "lrs: [1e-4, 3E-4")
                 .replace("batch_sizes: [32,", "batch_sizes: [3.2e1,"))
    p, ref = load_phase(phase_file=f), load_phase("2_5")
    assert p.train.budget == 10000 and isinstance(p.train.budget, int) and p.grid.lrs[:2] == (1e-4, 3e-4)
    assert p.grid.batch_sizes[0] == 32 and isinstance(p.grid.batch_sizes[0], int)
    assert p.run_config(32, 1e-4).config_hash() == ref.run_config(32, 1e-4).config_hash()


def test_a_run_shorter_than_its_warmup_is_said():
    from scaling.config import warmup_note
    p = load_phase("2_5").with_overrides(steps=40)
    note = warmup_note([p.run_config(b, 3e-3) for b in (32, 64)])
    assert note.startswith("note:") and "\n" not in note
    assert "B=32: 40 steps, warmup 200 (LR reaches 20% of its peak)" in note and "B=64" in note
    assert warmup_note([load_phase("2_5").run_config(32, 3e-3)]) is None


def test_unknown_phase():
    with pytest.raises(ConfigError, match="unknown phase 'nope'"):
        load_phase("nope")


finite_bad = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan), st.just(math.inf))


@settings(max_examples=60, deadline=None)
@given(lr=finite_bad)
def test_any_non_positive_or_non_finite_lr_is_rejected(lr):
    with pytest.raises(ConfigError, match="lr must be a number > 0"):
        load_phase("2_5").run_config(32, lr)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(max_value=0))
def test_any_batch_size_below_one_is_rejected(b):
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        load_phase("2_5").run_config(b, 1e-3)


@settings(max_examples=60, deadline=None)
@given(clip=st.floats(max_value=0.0, allow_nan=False))
def test_any_non_positive_clip_is_rejected(clip):
    with pytest.raises(ConfigError, match="grad_clip must be a number > 0"):
        load_phase("2_5").run_config(32, 1e-3, clip=clip)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4096), lr=st.floats(1e-8, 10.0), steps=st.integers(1, 10**6))
def test_valid_values_resolve(b, lr, steps):
    cfg = load_phase("2_5").with_overrides(steps=steps).run_config(b, lr)
    assert cfg.steps == steps and cfg.batch_size == b and cfg.lr == lr


@pytest.mark.parametrize("args, needle", [
    (["--phase", "nope", "--batch-size", "4", "--lr", "0.1"], "unknown phase 'nope'"),
    (["--batch-size", "0", "--lr", "0.1"], "batch_size must be an integer >= 1, got 0"),
    (["--batch-size", "4", "--lr", "-1"], "lr must be a number > 0, got -1.0"),
    (["--batch-size", "4", "--lr", "0.1", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--batch-size", "4", "--lr", "0.1", "--clip", "0"], "grad_clip must be a number > 0, got 0.0"),
    (["--batch-size", "4", "--lr", "0.1", "--phase-file", "missing.yaml"], "phase file not found"),
])
def test_cli_rejects_bad_input_with_one_line_and_creates_nothing(tmp_path, tracking_uri, args, needle):
    phase = tmp_path / "p.yaml"
    phase.write_text(TINY_RANDOM_PHASE)
    if "--phase" not in args and "--phase-file" not in args:
        args = ["--phase-file", phase, *args]
    r = run_cli("train", *args, "--device", "cpu", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlruns").exists()  # not even the database was created


def test_cli_missing_data_source_is_one_line(tmp_path, tracking_uri):
    r = run_cli("train", "--phase", "2_5", "--batch-size", "4", "--lr", "0.1", "--steps", "1", "--device", "cpu",
                "--data-dir", tmp_path / "nowhere", "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert r.returncode == 2
    assert "data directory not found" in r.stderr and "--data-dir" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_phases_lists_the_grids():
    r = run_cli("phases")
    assert r.returncode == 0
    assert "2_5" in r.stdout and "32, 64, 128, 256" in r.stdout and "3b" in r.stdout
    # the ladder's sizes with the N its fit uses (12 n_layers d_model^2: xs 2 x 64, xl 6 x 192)
    assert "xs N=98,304" in r.stdout and "xl N=2,654,208" in r.stdout


# ---------------------------------------------------------------------------------------------
# click's own usage errors: one line too


def _usage_error_is_one_line(args):
    from click.testing import CliRunner

    from scaling.cli import main
    r = CliRunner().invoke(main, args)
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (args, r.output)
    assert len(err) == 1 and err[0].startswith("error: ") and "--help')" in err[0], (args, r.stderr)
    assert "Usage:" not in r.output and "Traceback" not in r.output
    return err[0]


@pytest.mark.parametrize("args, needle", [
    (["train", "--phase", "2_5", "--batch-size", "8", "--lr", "x"], "Invalid value for '--lr'"),
    (["train", "--phase", "2_5", "--batch-size", "1.5", "--lr", "0.1"], "Invalid value for '--batch-size'"),
    (["train", "--phase", "2_5", "--lr", "0.1"], "Missing option '--batch-size'"),
    (["sweep", "--device", "tpu"], "Invalid value for '--device'"),
    (["sweep", "--compile-mode", "fast"], "Invalid value for '--compile-mode'"),
    (["search", "--batch-sizes", "8", "--compile-mode", "max"], "Invalid value for '--compile-mode'"),
    (["compare", "--phases"], "'--phases' requires an argument"),
    (["sweep", "--phase", "2_5", "--lrs", "1e-3,,3e-3"], "none empty"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_click_usage_errors_are_one_line(args, needle):
    line = _usage_error_is_one_line(args)
    assert needle in line


def test_compile_mode_from_the_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("SCALING_COMPILE_MODE", "fastest")
    assert "Invalid value for '--compile-mode'" in _usage_error_is_one_line(["sweep", "--phase", "2_5"])


def test_compile_modes_are_valid_torch_compile_arguments():
    """Each --compile-mode gives train_group a compile argument torch.compile accepts (options are
    checked when the wrapper is made, before anything compiles), and the tag names it back."""
    import torch

    from scaling.batched import compile_kwargs
    from scaling.cli import _compile_arg
    from scaling.config import COMPILE_MODES, compile_text
    for mode in COMPILE_MODES:
        arg = _compile_arg(True, mode)
        torch.compile(lambda x: x + 1, dynamic=False, **compile_kwargs(arg))
        assert compile_text(arg) == mode
    assert _compile_arg(False, "max-autotune") is False and compile_text(False) == "off"
    assert compile_kwargs(_compile_arg(True, "max-autotune"))["options"]["max_autotune"] is True
    gemm = compile_kwargs(_compile_arg(True, "max-autotune-gemm"))["options"]
    assert gemm["max_autotune_gemm"] is True and not gemm.get("max_autotune") and "coordinate_descent_tuning" not in gemm
    assert gemm["autotune_num_choices_displayed"] == 0  # quiet, as max-autotune


def test_a_compile_mode_that_cannot_apply_is_said(capsys):
    from scaling.cli import _compile_arg
    assert _compile_arg(False, "max-autotune") is False
    assert "--compile-mode max-autotune has no effect: the step is not compiled" in capsys.readouterr().err
    assert _compile_arg(True, "max-autotune", batched=False) == "max-autotune-no-cudagraphs"
    assert "configurations train one at a time" in capsys.readouterr().err
    _compile_arg(True, "max-autotune"), _compile_arg(False, "default"), _compile_arg(True, "default", batched=False)
    assert capsys.readouterr().err == ""


COMMANDS = ("train", "sweep", "search", "compare", "import", "phases")


@settings(max_examples=40, deadline=None)
@given(cmd=st.sampled_from(COMMANDS), name=st.from_regex(r"[a-z][a-z-]{1,14}[a-z]", fullmatch=True))
def test_any_unknown_option_is_one_line(cmd, name):
    import click

    from scaling.cli import main
    command = main.commands[cmd]
    known = {o for p in command.get_params(click.Context(command)) for o in (*p.opts, *p.secondary_opts)}
    if f"--{name}" in known:
        return
    assert f"No such option '--{name}'" in _usage_error_is_one_line([cmd, f"--{name}"])


def test_usage_error_from_the_real_command_is_one_line(tmp_path):
    r = run_cli("sweep", "--phase", "2_5", "--no-such-option", cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: No such option '--no-such-option'") and err.endswith("sweep --help')")
    assert len(err.splitlines()) == 1 and r.stdout == ""


def test_help_and_version_still_work():
    from click.testing import CliRunner

    from scaling.cli import main
    r = CliRunner().invoke(main, ["sweep", "--help"])
    assert r.exit_code == 0 and r.output.startswith("Usage: ") and "--group-size" in r.output
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "version" in r.output


def test_cli_exit_leaves_objects_out_of_the_last_garbage_collections():
    """At exit a CLI process freezes what is alive (gc.freeze, registered when scaling.cli is imported):
    the interpreter's final collections no longer walk torch's, MLflow's and the compiler's objects."""
    import subprocess
    import sys

    code = ("import atexit, gc, torch, scaling.cli\n"
            "assert gc.get_freeze_count() == 0\n"
            "atexit._run_exitfuncs()\n"
            "print(gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 10_000  # torch alone holds far more objects than that
