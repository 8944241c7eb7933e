"""Bad input, tried widely (hypothesis): command lines with one fault injected into a valid one, phase YAML
mutated at random, CSV tables of random cells. Whatever the input, bad input is ONE line on stderr
starting ``error: ``, exit code 2, no traceback, and nothing created: no store, no run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml
from click.testing import CliRunner
from conftest import TINY_RANDOM_PHASE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling.cli import main
from scaling.config import ConfigError, load_phase

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A valid command line per command (phase file and store filled in per example) and its typed options.
VALID = {
    "train": ["--batch-size", "4", "--lr", "1e-3"],
    "sweep": ["--workers", "1"],
    "search": ["--batch-sizes", "4", "--trials", "2"],
}
TYPED = {  # option -> values that must be refused
    "--batch-size": ["0", "-3", "1.5", "x", ""], "--lr": ["0", "-1e-3", "nan", "x", ""],
    "--steps": ["0", "-1", "2.5", "many"], "--workers": ["0", "-2", "two"], "--trials": ["0", "-1", "x"],
    "--batch-sizes": ["0", "4,x", "-8", ","], "--lrs": ["-1", "1e-3,abc", "0"], "--clips": ["0", "-1", "x"],
    "--device": ["tpu", "cuda:0:1", ""], "--devices": ["tpu", "cuda:99", "cpu,,x", "cuda:-1"],
    "--splits": ["train", "a:b:c", ":valid", "train:nowhere"], "--seed": ["x", "1.5"],
    "--compile-mode": ["fast", ""], "--sampler": ["grid"], "--pruner": ["always"], "--storage": ["nodb://x"],
    "--warmup": ["-5", "x"], "--eval-interval": ["0", "x"], "--checkpoint-every": ["0", "-1"],
}
APPLIES = {
    "train": {"--batch-size", "--lr", "--steps", "--device", "--splits", "--seed", "--warmup", "--eval-interval",
              "--checkpoint-every"},
    "sweep": {"--steps", "--workers", "--batch-sizes", "--lrs", "--clips", "--device", "--devices", "--splits",
              "--compile-mode", "--storage", "--warmup", "--eval-interval", "--checkpoint-every"},
    "search": {"--steps", "--batch-sizes", "--trials", "--device", "--splits", "--compile-mode", "--sampler",
               "--pruner", "--storage", "--warmup"},
}


@st.composite
def bad_command_lines(draw):
    """(command, argv) with one fault: a refused value, an option without its value (last, or followed by
    another option), an unknown option, a missing required option, or no phase."""
    cmd = draw(st.sampled_from(sorted(VALID)))
    args = list(VALID[cmd])
    fault = draw(st.sampled_from(["value", "no value", "no value before option", "unknown", "required", "phase"]))
    option = draw(st.sampled_from(sorted(APPLIES[cmd])))
    if fault == "value":
        args += [option, draw(st.sampled_from(TYPED[option]))]
    elif fault == "no value":
        args.append(option)
    elif fault == "no value before option":
        args = [option, "--quiet", *args]
    elif fault == "unknown":
        args.append("--" + draw(st.from_regex(r"[a-z]{3,10}-[a-z]{2,8}", fullmatch=True)))
    elif fault == "required":
        if cmd == "sweep":
            args += ["--phase", "2_5"]  # the phase twice: --phase and --phase-file
        else:
            args = args[2:]  # --batch-size / --batch-sizes dropped
    return cmd, args, fault


def _one_line_exit_2(r) -> str:
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return err[0]


@settings(max_examples=120, **SETTINGS)
@given(case=bad_command_lines())
def test_any_bad_command_line_is_one_line_exit_2_and_creates_nothing(case):
    cmd, args, fault = case
    with tempfile.TemporaryDirectory() as d:
        phase = Path(d) / "p.yaml"
        phase.write_text(TINY_RANDOM_PHASE)
        where = ["--tracking-uri", f"sqlite:///{d}/store/mlflow.db"]
        head = [] if fault == "phase" else ["--phase-file", str(phase)]
        cwd = os.getcwd()
        os.chdir(d)
        try:
            r = CliRunner().invoke(main, [cmd, *head, "--device", "cpu", *where, *args])
        finally:
            os.chdir(cwd)
        _one_line_exit_2(r)
        created = [p for p in Path(d).rglob("*") if p.is_file() and p.name != "p.yaml"]
        assert created == [], created


PHASE = yaml.safe_load(TINY_RANDOM_PHASE)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3))


@st.composite
def mutated_phases(draw) -> str:
    """The tiny phase with a few keys removed, replaced by random values, or added; or random text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=80))
    doc = yaml.safe_load(TINY_RANDOM_PHASE)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(doc)))
        what = draw(st.sampled_from(["drop", "replace", "add"]))
        target = doc[section] if isinstance(doc.get(section), dict) else None
        if target and what != "add" or target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target))) if what != "add" else draw(st.text(min_size=1, max_size=8))
            if what == "drop":
                target.pop(key, None)
            else:
                target[key] = draw(SCALARS)
        else:
            doc[section] = draw(SCALARS)
    return yaml.safe_dump(doc)


@settings(max_examples=150, **SETTINGS)
@given(text=mutated_phases())
def test_any_phase_yaml_either_loads_or_is_one_config_error(text):
    """Whatever the YAML holds, loading and resolving its grid is a Phase or ONE ConfigError line, never
    another exception (a TypeError from a list where a number belongs, a KeyError, ...)."""
    from scaling.sweep import plan

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "phase.yaml"
        p.write_text(text)
        try:
            plan(load_phase(phase_file=p))
        except ConfigError as e:
            assert str(e).strip() and "\n" not in str(e), repr(e)


@settings(max_examples=25, **SETTINGS)
@given(text=mutated_phases())
def test_a_bad_phase_file_on_the_command_line_creates_nothing(text):
    from scaling.sweep import plan

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "phase.yaml"
        p.write_text(text)
        try:
            plan(load_phase(phase_file=p))
            return  # a valid phase: not this test's business
        except ConfigError:
            pass
        r = CliRunner().invoke(main, ["sweep", "--phase-file", str(p), "--device", "cpu", "--quiet",
                                      "--tracking-uri", f"sqlite:///{d}/store/mlflow.db"])
        _one_line_exit_2(r)
        assert not (Path(d) / "store").exists()


CELLS = st.one_of(st.sampled_from(["", "na", "nan", "inf", "-inf", "1e-3", "0", "-1", "32", "1.5", "True", "x",
                                   "none", '"', "1,2", " 7 "]),
                  st.text(alphabet="0123456789.-eE+xn ", max_size=6))
HEADERS = st.lists(st.sampled_from(["batch_size", "lr", "final_val_loss", "seed", "num_steps", "gradient_clip",
                                    "converged", "final_train_loss", "note", "lr", "Batch Size"]),
                   min_size=1, max_size=6)


@st.composite
def csv_tables(draw) -> str:
    header = draw(HEADERS)
    rows = draw(st.lists(st.lists(CELLS, min_size=len(header) - 1, max_size=len(header) + 1), max_size=3))
    sep = draw(st.sampled_from([",", ";", "\t"]))
    return "\n".join(sep.join(r) for r in [header, *rows]) + draw(st.sampled_from(["", "\n", "\n\n"]))


@settings(max_examples=60, **SETTINGS)
@given(text=csv_tables())
def test_any_csv_either_imports_or_is_one_line_exit_2_and_imports_nothing(text):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.csv"
        f.write_text(text)
        store = Path(d) / "store" / "mlflow.db"
        r = CliRunner().invoke(main, ["import", str(f), "--phase", "2_5", "--tracking-uri", f"sqlite:///{store}"])
        if r.exit_code == 0:
            assert r.stdout.startswith("imported "), r.output
            return
        _one_line_exit_2(r)
        assert not store.exists()
