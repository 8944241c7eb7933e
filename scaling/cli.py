"""The ``scaling`` command line: parses, then calls functions that tests call too.

Bad input — a :class:`~scaling.config.ConfigError`, or one of click's own usage errors (unknown
option, missing or malformed value) — is one line on stderr and exit code 2.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import os
import sys

import click

from scaling.config import COMPILE_MODES, ConfigError

# At exit the garbage collector would walk every object still alive (after a compiled run, millions: torch, its
# compiler, MLflow, SQLAlchemy) although everything is written by then: they are left out of those last collections.
atexit.register(gc.freeze)


def _comma_list(convert, what: str):
    """A click callback: "a,b,c" → [convert(a), ...] (None stays None), a bad item a usage error."""
    def parse(ctx, param, value):
        if value is None:
            return None
        items = value.split(",")
        if not all(x.strip() for x in items):
            raise click.BadParameter(f"expected comma-separated {what} with none empty, got {value!r}")
        try:
            return [convert(x) for x in items]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from None
    return parse


_floats = _comma_list(float, "numbers")
_ints = _comma_list(int, "integers")


def _clip_item(x: str) -> float | None:
    return None if x.strip().lower() in ("none", "null", "off") else float(x)


_clips = _comma_list(_clip_item, "numbers or 'none'")


def _clip_value(ctx, param, value):
    if value is None:
        return "phase"
    v = _clips(ctx, param, value)
    if len(v) != 1:
        raise click.BadParameter(f"expected one threshold or 'none', got {value!r}")
    return v[0]


COMPILE_MODE = click.option(
    "--compile-mode", type=click.Choice(list(COMPILE_MODES)), default="default", show_default=True,
    envvar="SCALING_COMPILE_MODE", help="torch.compile mode of the batched step (env SCALING_COMPILE_MODE): "
    "max-autotune-gemm autotunes the matmuls, max-autotune also the pointwise kernels; both compile for longer "
    "the first time a grid's shapes are seen (docs/performance.md).")


def _compile_arg(on: bool, mode: str, batched: bool = True):
    """train_group's ``compile`` argument: False, or the mode's (COMPILE_MODES). A mode other than the
    default that cannot apply (nothing compiled, or no batched pass) is said on stderr, not dropped silently."""
    if mode != "default" and not (on and batched):
        why = ("the step is not compiled (--no-compile, or a CPU without --compile)" if not on else
               "configurations train one at a time (--group-size 1 / --no-group)")
        click.echo(f"note: --compile-mode {mode} has no effect: {why}", err=True)
    return COMPILE_MODES[mode] if on else False


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


_names = _comma_list(str.strip, "names")


def variant_options(fn):
    """``--model-sizes``, ``--tasks``, ``--schedules``, ``--lr-rules``: keep only these entries of the phase's
    variant axes; they reach the command as one ``variants`` dict (Phase.with_overrides' keywords)."""
    keys = ("model_sizes", "tasks", "schedules", "lr_rules")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, variants={k: kwargs.pop(k) for k in keys}, **kwargs)

    opts = [click.option("--model-sizes", callback=_names, default=None,
                         help="Model sizes of a ladder phase to keep, e.g. m or s,m (names of grid.model_sizes)."),
            click.option("--tasks", callback=_names, default=None,
                         help="Tasks of a modular phase to keep, e.g. x_plus_y."),
            click.option("--schedules", callback=_names, default=None,
                         help="Batch-size schedules of a modular phase to keep, by name (e.g. linear_32_512)."),
            click.option("--lr-rules", callback=_names, default=None,
                         help="LR rules of a modular phase to keep: none, sqrt, linear.")]
    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


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


_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
# The commands that train: as a process of their own (`scaling ...`, `python -m scaling.cli ...`) they end with
# os._exit once their output is flushed (see _OneLineErrors.__call__).
FAST_EXIT_COMMANDS = ("train", "sweep", "search")


class _ValueCheckedCommand(click.Command):
    """An option followed by another of the command's options has no value: click would take the second
    option as the first one's value (``--storage --workers 2``: a storage URL '--workers'); this is the
    usage error it means."""

    def parse_args(self, ctx, args):
        options = {o for p in self.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
        wants_value = {o for p in self.params if isinstance(p, click.Option) and not p.is_flag and not p.count
                       for o in p.opts}
        for option, following in zip(args, args[1:]):
            if following == "--":
                break
            if option in wants_value and following in options:
                raise click.BadOptionUsage(option, f"Option '{option}' requires an argument (got the option "
                                                   f"'{following}').", ctx=ctx)
        return super().parse_args(ctx, args)


class _OneLineErrors(click.Group):
    """The one place bad input becomes one line and exit code 2: a ConfigError (and its TrackingError /
    DataError kin) raised by a command as ``error: <what>``, and click's usage errors (which click prints
    on four lines) as ``error: <what> (see 'scaling sweep --help')``."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ConfigError as e:  # exit 2; a store gone mid-run (StoreUnavailable) exits 3
            click.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        except _NO_ARGS_HELP as e:  # a bare `scaling`: the help, as click gives it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            # An option's missing value fails before its command has a context: name the command anyway.
            where = e.ctx.command_path if e.ctx is not None else " ".join(
                filter(None, [prog_name or "scaling", getattr(self, "command_run", None)]))
            click.echo(f"error: {e.format_message()} (see '{where} --help')", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort as e:
            if isinstance(e.__cause__, KeyboardInterrupt):  # Ctrl-C or SIGTERM: what stopped was said already
                sys.exit(130)  # as shells report a process ended by SIGINT
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    command_class = _ValueCheckedCommand

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        self.command_run = cmd.name if cmd is not None else name
        return name, cmd, rest

    def __call__(self, *args, **kwargs):
        """The ``scaling`` process itself (the console script, ``python -m scaling.cli``). A command that trains
        ends the process with ``os._exit`` once it has returned or failed cleanly (a ``SystemExit``) and its
        output is flushed, skipping the interpreter's shutdown: by then every result is written (runs
        ended, the metric and checkpoint threads drained and joined, worker processes joined, SQLite stores'
        write-ahead logs checkpointed into their files), and the shutdown would only wait for inductor's
        compile workers, which stop by themselves once this process is gone. Calls of ``main.main(...)``
        (tests, the MLproject entry points) return or raise as before; an unexpected error ends normally,
        with its traceback."""
        self.command_run = None
        try:
            self.main(*args, **kwargs)
            code = 0
        except SystemExit as e:
            code = e.code
        if self.command_run not in FAST_EXIT_COMMANDS:
            sys.exit(code)
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        if "scaling.tracking" in sys.modules:  # no connection is closed below: the stores' logs folded in now
            sys.modules["scaling.tracking"].checkpoint_sqlite_files()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="scaling")
def main():
    """Learning-rate x batch-size scaling studies, tracked in MLflow."""


@main.command()
def phases():
    """List the built-in phases with their grids."""
    from scaling.config import builtin_phase_names, clip_text, load_phase, n_params_estimate, n_params_nonembedding

    for name in builtin_phase_names():
        p = load_phase(name)
        g = p.grid
        lrs = (", ".join(f"B{b}:{lr:g}" for b, lr in g.lr_by_batch_size) if g.lr_by_batch_size
               else ", ".join(f"{lr:g}" for lr in g.lrs))
        clips = ", ".join(clip_text(c) for c in g.clips)
        click.echo(f"{name:<11} {p.data.dataset:<9} ~{n_params_estimate(p.model) / 1e3:.0f}K params  "
                   f"{p.train.budget_kind}={p.train.budget:g}  configs={len(p.run_configs())}")
        click.echo(f"{'':<11} batch sizes: {', '.join(map(str, g.batch_sizes))}")
        click.echo(f"{'':<11} lrs: {lrs}   clips: {clips}")
        # a ladder's N, as its fit counts it: non-embedding parameters of each size
        sizes = [f"{s.name} N={n_params_nonembedding(dataclasses.replace(p.model, d_model=s.d_model, n_layers=s.n_layers)):,}"
                 for s in g.model_sizes]
        for axis, values in (("model sizes", sizes), ("tasks", g.tasks),
                             ("schedules", [s.label for s in g.schedules]), ("lr rules", g.lr_rules)):
            if values:
                click.echo(f"{'':<11} {axis}: {', '.join(values)}")


@main.command()
@phase_options
@variant_options
@click.option("--batch-size", type=int, required=True)
@click.option("--lr", type=float, required=True)
@click.option("--clip", callback=_clip_value, default=None, help="Clip threshold or 'none' (default: the phase's).")
@click.option("--seed", type=int, default=None)
@click.option("--resume", "resume_run_id", default=None, help="Continue this MLflow run from its last checkpoint.")
def train(phase_name, phase_file, steps, tokens, warmup, eval_interval, eval_batches, log_interval,
          checkpoint_every, device, data_dir, splits, tracking_uri, quiet, batch_size, lr, clip, seed,
          resume_run_id, variants):
    """Train one configuration of a phase and record it in MLflow."""
    from scaling.runner import run_config

    phase = load_phase_with_overrides(phase_name, phase_file, steps=steps, tokens=tokens, warmup=warmup,
                                      eval_interval=eval_interval, eval_batches=eval_batches,
                                      log_interval=log_interval, checkpoint_every=checkpoint_every, **variants)
    cfg = phase.run_config(batch_size, lr, clip, seed, splits=parse_splits(splits))
    result = run_config(cfg, device=device, data_dir=data_dir, tracking_uri=tracking_uri,
                        resume_run_id=resume_run_id, progress=not quiet, source="train")
    click.echo(result.summary_line())


@main.command()
@click.option("--phases", required=True, help="Comma-separated phases, e.g. 2_5,3a.")
@click.option("--metric", default="final_val_loss", show_default=True,
              help="Objective: final_val_loss, min_val_loss, final_train_loss or (modular phases) step_val_acc_99.")
@click.option("--format", "fmt", default="table", show_default=True, help="What to print: table, json, csv, markdown.")
@click.option("--out", "out_dir", default=None, help="Write every format and the PNG plots into this directory.")
@click.option("--estimator", default="vertex", show_default=True,
              help="Optimum per batch size the beta fits use: vertex (quadratic in ln LR with seed offsets, the "
                   "argmin where there is none) or argmin (the grid's, the study's method).")
@click.option("--exclude-unlearned", is_flag=True, help="Drop runs whose val loss is above the unigram baseline.")
@click.option("--budget", default=None,
              help="Only the runs of this budget, KIND=VALUE or VALUE (e.g. steps=10000), in every phase.")
@click.option("--pool-budgets", is_flag=True,
              help="Fit a phase's runs of different budgets together, each (batch size, budget) its own optimum.")
@click.option("--bootstrap", type=int, default=0, show_default=True,
              help="Pairs-bootstrap resamples of beta (0: none); with a handful of batch sizes its interval "
                   "covers less than 95%.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and the law comparison.")
@click.option("--tracking-uri", default=None, help="MLflow store (env MLFLOW_TRACKING_URI).")
@click.option("--no-mlflow", is_flag=True, help="Do not record a comparison run in scaling-compare.")
@click.option("--batch-sizes", callback=_ints, default=None,
              help="Only the runs of these batch sizes, e.g. 16,32,64,128,256 (beta is local to them).")
def compare(phases, metric, fmt, out_dir, estimator, exclude_unlearned, budget, pool_budgets, bootstrap, seed,
            tracking_uri, no_mlflow, batch_sizes):
    """Fit LR_opt(B) per phase from its MLflow runs and put phases side by side against theory."""
    from scaling.report import compare as run_compare

    report = run_compare(phases, tracking_uri=tracking_uri, metric=metric, fmt=fmt, out_dir=out_dir,
                         exclude_unlearned=exclude_unlearned, pool_budgets=pool_budgets, budget=budget,
                         bootstrap=bootstrap, seed=seed, log_to_mlflow=not no_mlflow, estimator=estimator,
                         batch_sizes=batch_sizes)
    click.echo(report["rendered"], nl=False)
    if fmt == "table":
        if report["files"]:
            click.echo(f"wrote {len(report['files'])} files to {out_dir}")
        if report["comparison_run_id"]:
            click.echo(f"comparison run {report['comparison_run_id']} in experiment scaling-compare")


@main.command(name="import")
@click.argument("file")
@click.option("--phase", "phase_name", default=None, help="Built-in phase the table belongs to.")
@click.option("--phase-file", default=None, help="Or your own phase YAML.")
@click.option("--tracking-uri", default=None, help="MLflow store (env MLFLOW_TRACKING_URI).")
@click.option("--data-dir", type=click.Path(), default=None, envvar="SCALING_DATA_DIR",
              help="Local copy of the phase's dataset, for the loss baselines (env SCALING_DATA_DIR).")
@click.option("--splits", default=None, envvar="SCALING_SPLITS", help="TRAIN:VAL split mapping, e.g. valid:test.")
def import_(file, phase_name, phase_file, tracking_uri, data_dir, splits):
    """Turn a results table (CSV) into FINISHED MLflow runs of a phase; re-importing creates nothing."""
    from scaling.importing import import_table

    summary = import_table(file, phase_name, tracking_uri=tracking_uri, phase_file=phase_file,
                           data_dir=data_dir, splits=parse_splits(splits) if splits else None)
    click.echo(summary.line())


@main.command()
@phase_options
@variant_options
@click.option("--batch-sizes", callback=_ints, default=None, help="Override the grid's batch sizes, e.g. 32,64.")
@click.option("--lrs", callback=_floats, default=None, help="Override the grid's LRs, e.g. 1e-3,3e-3.")
@click.option("--clips", callback=_clips, default=None, help="Override the grid's clip thresholds (none = off).")
@click.option("--seeds", callback=_ints, default=None, help="Override the phase's seeds.")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes on this machine.")
@click.option("--devices", default=None, help="Devices the workers train on, round-robin, e.g. cuda:0,cuda:1 "
              "(default: every visible GPU, else --device). Each run records its own in the param `device`.")
@click.option("--storage", default=None, help="Claims database shared by all workers (SQLAlchemy URL; default "
              "sqlite beside the MLflow store, e.g. mlruns/sweeps.db; postgresql://... for many machines).")
@click.option("--retry-failed", is_flag=True, help="Rerun configs whose runs FAILED (not diverged).")
@click.option("--sweep-name", default=None, help="Name of the sweep's parent run (on creation).")
@click.option("--group-size", type=int, default=None,
              help="Train up to this many configs together in one batched pass (default on CUDA: the grid "
                   "shared evenly by the --workers, the whole grid for one; 1 on CPU).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the batched step (default: on CUDA).")
@COMPILE_MODE
def sweep(phase_name, phase_file, steps, tokens, warmup, eval_interval, eval_batches, log_interval,
          checkpoint_every, device, data_dir, splits, tracking_uri, quiet, batch_sizes, lrs, clips, seeds, workers,
          devices, storage, retry_failed, sweep_name, group_size, compile_, compile_mode, variants):
    """Run a phase's whole grid: one MLflow parent run, one child per config; resumable, parallel."""
    from scaling.devices import parse_devices
    from scaling.sweep import run_sweep
    from scaling.train import resolve_device

    devices = parse_devices(devices)
    on_cuda = resolve_device(devices[0] if devices else device).type == "cuda"

    phase = load_phase_with_overrides(phase_name, phase_file, steps=steps, tokens=tokens, warmup=warmup,
                                      eval_interval=eval_interval, eval_batches=eval_batches,
                                      log_interval=log_interval, checkpoint_every=checkpoint_every,
                                      batch_sizes=batch_sizes, lrs=lrs, clips=clips, seeds=seeds, **variants)
    if group_size is None:
        from scaling.sweep import default_group_size, plan
        group_size = default_group_size(plan(phase), workers, on_cuda)
    summary = run_sweep(phase, device=device, data_dir=data_dir, splits=parse_splits(splits),
                        tracking_uri=tracking_uri, storage=storage, workers=workers, retry_failed=retry_failed,
                        progress=not quiet, sweep_name=sweep_name, group_size=group_size, devices=devices,
                        compile=_compile_arg(on_cuda if compile_ is None else compile_, compile_mode,
                                             batched=group_size > 1))
    for line in summary.lines():
        click.echo(line)
    if summary.count("FAILED"):
        sys.exit(1)


@main.command()
@phase_options
@variant_options
@click.option("--batch-sizes", callback=_ints, required=True, help="Batch sizes to search, e.g. 128,256.")
@click.option("--trials", type=int, default=12, show_default=True, help="Evaluated trials per batch size (study).")
@click.option("--sampler", type=click.Choice(["tpe", "random", "cmaes"]), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(["none", "median", "hyperband"]), default="none", show_default=True)
@click.option("--storage", default=None, help="Optuna storage URL (default sqlite beside the MLflow store, "
              "e.g. mlruns/optuna.db; postgresql://... for many workers).")
@click.option("--study-name", default=None, help="Resume/name the studies (<name>-B<batch size>); default: "
              "derived from the phase's settings, so rerunning the same command resumes.")
@click.option("--extend-factor", type=float, default=3.0, show_default=True,
              help="An edge of the LR range moves out by this factor when the best LR is near it.")
@click.option("--margin", type=float, default=0.1, show_default=True,
              help="'Near the edge': within this fraction of the initial range's width (log scale).")
@click.option("--max-extensions", type=int, default=4, show_default=True, help="Hard limit on range extensions.")
@click.option("--batch", type=int, default=4, show_default=True, help="Trials between two range checks.")
@click.option("--sampler-seed", type=int, default=None, help="Seed of the Optuna sampler.")
@click.option("--group/--no-group", default=None,
              help="Train the --batch trials asked at a time together in one batched pass (default: on CUDA).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the batched step "
              "(default: on CUDA).")
@COMPILE_MODE
def search(phase_name, phase_file, steps, tokens, warmup, eval_interval, eval_batches, log_interval,
           checkpoint_every, device, data_dir, splits, tracking_uri, quiet, batch_sizes, trials, sampler, pruner,
           storage, study_name, extend_factor, margin, max_extensions, batch, sampler_seed, group, compile_,
           compile_mode, variants):
    """Optuna search over log(LR) per batch size, extending past the grid's edge until bracketed; it
    minimises the phase's train.objective. A phase with several model sizes / tasks / schedules / LR rules
    is searched at one of each (--model-sizes, --tasks, --schedules, --lr-rules)."""
    from scaling.search import run_search
    from scaling.train import resolve_device

    on_cuda = resolve_device(device).type == "cuda"
    group = on_cuda if group is None else group

    phase = load_phase_with_overrides(phase_name, phase_file, steps=steps, tokens=tokens, warmup=warmup,
                                      eval_interval=eval_interval, eval_batches=eval_batches,
                                      log_interval=log_interval, checkpoint_every=checkpoint_every, **variants)
    summary = run_search(phase, batch_sizes, trials, sampler=sampler, pruner=pruner, storage=storage,
                         study_name=study_name, extend_factor=extend_factor, margin=margin,
                         max_extensions=max_extensions, batch=batch, device=device, data_dir=data_dir,
                         splits=parse_splits(splits), tracking_uri=tracking_uri, seed=sampler_seed,
                         progress=not quiet, group=group,
                         compile=_compile_arg(on_cuda if compile_ is None else compile_, compile_mode, batched=group))
    for line in summary.lines():
        click.echo(line)


if __name__ == "__main__":
    main()
