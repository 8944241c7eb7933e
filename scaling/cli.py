"""The ``scaling`` command line: parses, then calls functions that tests call too.

Bad input (a :class:`~scaling.config.ConfigError`) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys

import click

from scaling.config import ConfigError


def _friendly(fn):
    """Turn ConfigError (and its TrackingError / DataError kin) into one line + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _floats(name):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return [float(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    return parse


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _clips(ctx, param, value):
    if value is None:
        return None
    out = []
    for x in value.split(","):
        x = x.strip().lower()
        if x in ("none", "null", "off"):
            out.append(None)
        elif x:
            try:
                out.append(float(x))
            except ValueError:
                raise click.BadParameter(f"expected numbers or 'none', got {value!r}") from None
    return out


def _clip_value(ctx, param, value):
    if value is None:
        return "phase"
    v = _clips(ctx, param, value)
    if len(v) != 1:
        raise click.BadParameter(f"expected one threshold or 'none', got {value!r}")
    return v[0]


# Options shared by the commands that train.
def phase_options(fn):
    opts = [
        click.option("--phase", "phase_name", default=None, help="Built-in phase (see `scaling phases`)."),
        click.option("--phase-file", type=click.Path(dir_okay=False), default=None,
                     help="Your own phase YAML instead of a built-in one."),
        click.option("--steps", type=int, default=None, help="Fixed steps per run (overrides the phase budget)."),
        click.option("--tokens", type=float, default=None, help="Token budget per run (overrides the phase budget)."),
        click.option("--warmup", type=float, default=None, help="Warmup, in the budget's unit."),
        click.option("--eval-interval", type=int, default=None),
        click.option("--eval-batches", type=int, default=None),
        click.option("--log-interval", type=int, default=None),
        click.option("--checkpoint-every", type=int, default=None),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--data-dir", type=click.Path(), default=None, envvar="SCALING_DATA_DIR",
                     help="Local WikiText-2 copy (env SCALING_DATA_DIR)."),
        click.option("--splits", default=None, envvar="SCALING_SPLITS",
                     help="TRAIN:VAL split mapping, e.g. valid:test (env SCALING_SPLITS). Default train:valid."),
        click.option("--tracking-uri", default=None, help="MLflow store (env MLFLOW_TRACKING_URI; "
                     "default sqlite:///mlruns/mlflow.db)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def load_phase_with_overrides(phase_name, phase_file, **over):
    from scaling.config import load_phase

    if (phase_name is None) == (phase_file is None):
        raise ConfigError("give one of --phase NAME or --phase-file FILE")
    phase = load_phase(phase_name, phase_file)
    return phase.with_overrides(**{k: v for k, v in over.items() if v is not None})


def parse_splits(value: str | None) -> tuple[str, str]:
    if not value:
        return ("train", "valid")
    parts = value.split(":")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"splits must look like TRAIN:VAL (e.g. valid:test), got {value!r}")
    norm = {"validation": "valid"}
    return norm.get(parts[0], parts[0]), norm.get(parts[1], parts[1])


@click.group()
@click.version_option(package_name="scaling")
def main():
    """Learning-rate x batch-size scaling studies, tracked in MLflow."""


@main.command()
@_friendly
def phases():
    """List the built-in phases with their grids."""
    from scaling.config import builtin_phase_names, load_phase, n_params_estimate

    for name in builtin_phase_names():
        p = load_phase(name)
        g = p.grid
        lrs = (", ".join(f"B{b}:{lr:g}" for b, lr in g.lr_by_batch_size) if g.lr_by_batch_size
               else ", ".join(f"{lr:g}" for lr in g.lrs))
        clips = ", ".join("none" if c is None else f"{c:g}" for c in g.clips)
        click.echo(f"{name:<11} {p.data.dataset:<9} ~{n_params_estimate(p.model) / 1e3:.0f}K params  "
                   f"{p.train.budget_kind}={p.train.budget:g}  configs={len(p.grid_points())}")
        click.echo(f"{'':<11} batch sizes: {', '.join(map(str, g.batch_sizes))}")
        click.echo(f"{'':<11} lrs: {lrs}   clips: {clips}")


@main.command()
@phase_options
@click.option("--batch-size", type=int, required=True)
@click.option("--lr", type=float, required=True)
@click.option("--clip", callback=_clip_value, default=None, help="Clip threshold or 'none' (default: the phase's).")
@click.option("--seed", type=int, default=None)
@click.option("--resume", "resume_run_id", default=None, help="Continue this MLflow run from its last checkpoint.")
@_friendly
def train(phase_name, phase_file, steps, tokens, warmup, eval_interval, eval_batches, log_interval,
          checkpoint_every, device, data_dir, splits, tracking_uri, quiet, batch_size, lr, clip, seed,
          resume_run_id):
    """Train one configuration of a phase and record it in MLflow."""
    from scaling.runner import run_config

    phase = load_phase_with_overrides(phase_name, phase_file, steps=steps, tokens=tokens, warmup=warmup,
                                      eval_interval=eval_interval, eval_batches=eval_batches,
                                      log_interval=log_interval, checkpoint_every=checkpoint_every)
    cfg = phase.run_config(batch_size, lr, clip, seed, splits=parse_splits(splits))
    result = run_config(cfg, device=device, data_dir=data_dir, tracking_uri=tracking_uri,
                        resume_run_id=resume_run_id, progress=not quiet, source="train")
    click.echo(result.summary_line())


# --- commands added by later modules (sweep, search, compare, import) go below this line ---


if __name__ == "__main__":
    main()
