"""Typed study-phase configs: loaded from YAML, validated once here, trusted everywhere else.

A *phase* (``scaling/phases/*.yaml`` or a user's ``--phase-file``) declares the model, the data,
the optimizer, the training budget and the grid. A *run config* (:class:`RunConfig`) is one point
of that grid (batch size, LR, clip threshold, seed) with everything resolved, e.g. a token budget
turned into a step count. Every error is a :class:`ConfigError` whose one-line message names the
field and the offending value; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2, nothing created."""


def cache_dir() -> Path:
    """Where derived files are cached (``SCALING_CACHE_DIR``, default ``~/.cache/scaling``): encoded
    splits, loss baselines, the migrated empty MLflow store that new SQLite stores start from."""
    d = Path(os.environ.get("SCALING_CACHE_DIR") or Path.home() / ".cache" / "scaling")
    d.mkdir(parents=True, exist_ok=True)
    return d


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message as one line for a one-line report: its first line, or its type's name when
    it has no message (``OSError()``)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def error_line(e: BaseException, limit: int = 200) -> str:
    """"Type: first line of the message", or the type alone when there is no message."""
    return type(e).__name__ + (f": {first_line(e, limit)}" if str(e).strip() else "")


DATASETS = ("wikitext2", "random")
SCHEDULES = ("constant", "cosine")
BUDGET_KINDS = ("steps", "tokens", "flops")
SPLITS = ("train", "valid", "test")
# `--compile-mode` of the batched engine → the ``compile`` argument of scaling.batched.train_group:
# "max-autotune-gemm" autotunes only the matmuls (Triton templates chosen at compile time and cached with
# the graph: nothing is benchmarked when a process starts); max-autotune without inductor's own CUDA graphs,
# since train_group records the whole step itself
COMPILE_MODES = {"default": True, "max-autotune-gemm": {"max_autotune_gemm": True},
                 "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "wikitext2"
    random_train_tokens: int = 2_000_000
    random_val_tokens: int = 200_000


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 128
    vocab_size: int = 128


@dataclass(frozen=True)
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup: float = 200  # in the unit of the budget (steps, tokens or FLOPs)
    schedule: str = "constant"
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak LR


@dataclass(frozen=True)
class TrainConfig:
    budget_kind: str = "steps"
    budget: float = 10_000
    eval_interval: int = 500
    eval_batches: int = 20
    log_interval: int = 50
    checkpoint_every: int = 1000
    seeds: tuple[int, ...] = (0,)
    # Gradient-noise measurement (scaling.noise): at logging steps at least noise_interval steps apart
    # (0: none), on the step's batch split into micro-batches of noise_microbatch sequences; tail_index
    # adds the noise's tail index. Measuring leaves training unchanged, so none of it is in config_hash.
    noise_interval: int = 0
    noise_microbatch: int = 1
    tail_index: bool = False


@dataclass(frozen=True)
class GridConfig:
    batch_sizes: tuple[int, ...] = ()
    lrs: tuple[float, ...] = ()
    lr_by_batch_size: tuple[tuple[int, float], ...] = ()  # paired LR per batch size (phase 3b)
    clips: tuple[float | None, ...] = (1.0,)  # None = no clipping


@dataclass(frozen=True)
class Phase:
    name: str
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def grid_points(self) -> list[tuple[int, float, float | None, int]]:
        """Every (batch_size, lr, clip, seed) of the phase's grid, in a stable order."""
        points = []
        lr_map = dict(self.grid.lr_by_batch_size)
        for b in self.grid.batch_sizes:
            lrs = (lr_map[b],) if lr_map else self.grid.lrs
            for lr, clip, seed in itertools.product(lrs, self.grid.clips, self.train.seeds):
                points.append((b, lr, clip, seed))
        return points

    def run_config(self, batch_size: int, lr: float, clip: float | None | str = "phase",
                   seed: int | None = None, splits: tuple[str, str] = ("train", "valid")) -> "RunConfig":
        """Resolve one configuration; ``clip="phase"`` takes the phase's (first) clip threshold."""
        if clip == "phase":
            clip = self.grid.clips[0] if self.grid.clips else None
        seed = self.train.seeds[0] if seed is None else seed
        _check_run_values(batch_size, lr, clip, seed)
        _check_splits(self, splits)
        steps, warmup_steps = _budget_to_steps(self, batch_size)
        return RunConfig(phase=self, batch_size=int(batch_size), lr=float(lr),
                         clip=None if clip is None else float(clip), seed=int(seed),
                         steps=steps, warmup_steps=warmup_steps,
                         train_split=splits[0], val_split=splits[1])

    def with_overrides(self, *, steps: int | None = None, tokens: float | None = None,
                       warmup: float | None = None, eval_interval: int | None = None,
                       eval_batches: int | None = None, log_interval: int | None = None,
                       checkpoint_every: int | None = None, batch_sizes=None, lrs=None,
                       clips=None, seeds=None) -> "Phase":
        """A copy with command-line overrides applied and validated (``--steps`` etc.)."""
        train, optim, grid = self.train, self.optim, self.grid
        if steps is not None and tokens is not None:
            raise ConfigError("give --steps or --tokens, not both")
        # The warmup is declared in the budget's unit: when an override changes the unit it is
        # dropped (0) unless --warmup gives it in the new unit.
        if steps is not None:
            positive_int("steps", steps)
            if train.budget_kind != "steps" and warmup is None:
                warmup = 0
            train = dataclasses.replace(train, budget_kind="steps", budget=steps)
        if tokens is not None:
            _positive("tokens", tokens)
            if train.budget_kind != "tokens" and warmup is None:
                warmup = 0
            train = dataclasses.replace(train, budget_kind="tokens", budget=tokens)
        if warmup is not None:
            optim = dataclasses.replace(optim, warmup=warmup)
        for name, value in (("eval_interval", eval_interval), ("eval_batches", eval_batches),
                            ("log_interval", log_interval), ("checkpoint_every", checkpoint_every)):
            if value is not None:
                train = dataclasses.replace(train, **{name: value})
        if seeds is not None:
            train = dataclasses.replace(train, seeds=tuple(seeds))
        if batch_sizes is not None:
            grid = dataclasses.replace(grid, batch_sizes=tuple(batch_sizes))
            if grid.lr_by_batch_size:
                missing = [b for b in grid.batch_sizes if b not in dict(grid.lr_by_batch_size)]
                if missing and lrs is None:
                    raise ConfigError(f"batch_size {missing[0]} has no paired LR in phase {self.name!r}")
        if lrs is not None:
            grid = dataclasses.replace(grid, lrs=tuple(lrs), lr_by_batch_size=())
        if clips is not None:
            grid = dataclasses.replace(grid, clips=tuple(clips))
        phase = dataclasses.replace(self, train=train, optim=optim, grid=grid)
        return _validated(_to_plain(phase))


@dataclass(frozen=True)
class RunConfig:
    """One fully resolved training configuration (a point of a phase's grid)."""

    phase: Phase
    batch_size: int
    lr: float
    clip: float | None
    seed: int
    steps: int
    warmup_steps: int
    train_split: str = "train"
    val_split: str = "valid"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.phase.model.context_length

    @property
    def measures_noise(self) -> bool:
        """Whether this run measures gradient noise: the phase asks for it and its batch splits into at least
        two micro-batches of ``noise_microbatch`` (every batch size of the grid does; one outside it may not)."""
        t = self.phase.train
        return t.noise_interval > 0 and self.batch_size % t.noise_microbatch == 0 \
            and self.batch_size // t.noise_microbatch >= 2

    def to_params(self) -> dict[str, Any]:
        """Flat, stable parameter names: the same for every run of every phase (MLflow params)."""
        p, m, o, t = self.phase, self.phase.model, self.phase.optim, self.phase.train
        return {
            "phase": p.name,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "grad_clip": "none" if self.clip is None else self.clip,
            "seed": self.seed,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "budget_kind": t.budget_kind,
            "budget": t.budget,
            "schedule": o.schedule,
            "min_lr_ratio": o.min_lr_ratio,
            "optimizer": "adamw",
            "beta1": o.betas[0],
            "beta2": o.betas[1],
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "context_length": m.context_length,
            "vocab_size": m.vocab_size,
            "dataset": p.data.dataset,
            "train_split": self.train_split,
            "val_split": self.val_split,
            "eval_interval": t.eval_interval,
            "eval_batches": t.eval_batches,
            "log_interval": t.log_interval,
            "checkpoint_every": t.checkpoint_every,
            "tokens_per_step": self.tokens_per_step,
        }

    def config_hash(self) -> str:
        """Stable hash of everything that determines the result (used to skip finished configs)."""
        params = self.to_params()
        for k in ("eval_interval", "eval_batches", "log_interval", "checkpoint_every"):
            params.pop(k)  # how often we look does not change what is trained... except eval:
        params["eval_batches"] = self.phase.train.eval_batches  # ...the val set does
        if self.phase.data.dataset == "random":
            params["random_train_tokens"] = self.phase.data.random_train_tokens
            params["random_val_tokens"] = self.phase.data.random_val_tokens
        blob = json.dumps(params, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading


def builtin_phase_names() -> list[str]:
    files = resources.files("scaling.phases").iterdir()
    return sorted(Path(str(f)).stem for f in files if str(f).endswith(".yaml"))


def load_phase(name: str | None = None, phase_file: str | Path | None = None) -> Phase:
    """Load a built-in phase by name, or a user's YAML file; validate it fully."""
    if phase_file is not None:
        path = Path(phase_file)
        if not path.is_file():
            raise ConfigError(f"phase file not found: {str(path)!r}")
        text = path.read_text()
        source = str(path)
    else:
        names = builtin_phase_names()
        if name not in names:
            raise ConfigError(f"unknown phase {name!r}; built-in phases: {', '.join(names)}")
        text = resources.files("scaling.phases").joinpath(f"{name}.yaml").read_text()
        source = f"built-in phase {name}"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({first_line(e, 10_000)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of phase fields, got {type(raw).__name__}")
    if phase_file is None:
        raw.setdefault("name", name)
    elif "name" not in raw:
        raw["name"] = Path(phase_file).stem
    return _validated(raw)


def _validated(raw: dict) -> Phase:
    sections = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                "train": TrainConfig, "grid": GridConfig}
    _no_unknown_keys("", raw, {"name", "description", *sections})
    kwargs: dict[str, Any] = {"name": str(raw["name"]), "description": str(raw.get("description") or "")}
    for key, cls in sections.items():
        sub = raw.get(key) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"{key} must be a mapping, got {sub!r}")
        _no_unknown_keys(key + ".", sub, {f.name for f in dataclasses.fields(cls)})
        kwargs[key] = cls(**{k: _coerce(f"{key}.{k}", cls, k, v) for k, v in sub.items()})
    phase = Phase(**kwargs)
    _check_phase(phase)
    return phase


def _to_plain(phase: Phase) -> dict:
    d = dataclasses.asdict(phase)
    d["grid"]["lr_by_batch_size"] = {b: lr for b, lr in phase.grid.lr_by_batch_size}
    return d


def _no_unknown_keys(prefix: str, d: dict, allowed: set[str]) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"unknown key {prefix}{k!r}; allowed: {', '.join(sorted(allowed))}")


def _coerce(path: str, cls, key: str, value):
    """Turn YAML values into the dataclass field types (lists → tuples), rejecting wrong types."""
    if key in ("betas", "seeds", "batch_sizes", "lrs", "clips"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(value)
    if key == "lr_by_batch_size":
        if isinstance(value, dict):
            return tuple(sorted(value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(tuple(x) for x in value)
        raise ConfigError(f"{path} must be a mapping batch_size: lr, got {value!r}")
    return value


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive_int(name: str, x) -> None:
    """ConfigError unless ``x`` is an int (not a bool) >= 1."""
    if not (isinstance(x, int) and not isinstance(x, bool)) or x < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {x!r}")


def clip_text(clip: float | None) -> str:
    """A clip threshold as run names, labels and parameters spell it: "none" or the number (``%g``)."""
    return "none" if clip is None else f"{clip:g}"


def compile_text(compile) -> str:
    """train_group's ``compile`` argument as the ``scaling.compile`` tag spells it: off, a COMPILE_MODES
    name, or the argument itself."""
    if compile is False:
        return "off"
    names = [k for k, v in COMPILE_MODES.items() if type(v) is type(compile) and v == compile]
    return names[0] if names else str(compile)


def _positive(name: str, x) -> None:
    if not _is_number(x) or x <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {x!r}")


def _check_run_values(batch_size, lr, clip, seed) -> None:
    positive_int("batch_size", batch_size)
    _positive("lr", lr)
    if clip is not None:
        _positive("grad_clip", clip)
    if not (isinstance(seed, int) and not isinstance(seed, bool)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")


def _check_splits(phase: Phase, splits) -> None:
    train, val = splits
    for name, s in (("train split", train), ("validation split", val)):
        if s not in SPLITS:
            raise ConfigError(f"{name} must be one of {', '.join(SPLITS)}, got {s!r}")
    if phase.data.dataset != "random" and train == val:
        raise ConfigError(f"train and validation splits must differ, got {train!r} for both")


def _check_phase(p: Phase) -> None:
    d, m, o, t, g = p.data, p.model, p.optim, p.train, p.grid
    if not p.name or any(c in p.name for c in "/\\ "):
        raise ConfigError(f"name must be a non-empty word, got {p.name!r}")
    if d.dataset not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)}, got {d.dataset!r}")
    positive_int("data.random_train_tokens", d.random_train_tokens)
    positive_int("data.random_val_tokens", d.random_val_tokens)
    for k in ("d_model", "n_layers", "n_heads", "context_length", "vocab_size"):
        positive_int(f"model.{k}", getattr(m, k))
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if d.dataset == "wikitext2" and m.vocab_size < 128:
        raise ConfigError(f"model.vocab_size must be >= 128 for character-level wikitext2, got {m.vocab_size}")
    if d.dataset == "random" and d.random_train_tokens <= m.context_length:
        raise ConfigError(f"data.random_train_tokens must exceed model.context_length, got {d.random_train_tokens}")
    if len(o.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)!r}")
    _positive("optim.eps", o.eps)
    if not _is_number(o.weight_decay) or o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be a number >= 0, got {o.weight_decay!r}")
    if not _is_number(o.warmup) or o.warmup < 0:
        raise ConfigError(f"optim.warmup must be a number >= 0, got {o.warmup!r}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if not _is_number(o.min_lr_ratio) or not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio!r}")
    if t.budget_kind not in BUDGET_KINDS:
        raise ConfigError(f"train.budget_kind must be one of {', '.join(BUDGET_KINDS)}, got {t.budget_kind!r}")
    if t.budget_kind == "steps":
        positive_int("steps", t.budget)
    else:
        _positive(f"train.budget ({t.budget_kind})", t.budget)
    for k in ("eval_interval", "eval_batches", "log_interval", "checkpoint_every"):
        positive_int(f"train.{k}", getattr(t, k))
    if not t.seeds:
        raise ConfigError("train.seeds must list at least one seed")
    for s in t.seeds:
        if not (isinstance(s, int) and not isinstance(s, bool)) or s < 0:
            raise ConfigError(f"train.seeds entries must be integers >= 0, got {s!r}")
    if not g.batch_sizes:
        raise ConfigError("grid.batch_sizes must list at least one batch size")
    for b in g.batch_sizes:
        positive_int("batch_size", b)
    if g.lrs and g.lr_by_batch_size:
        raise ConfigError("grid: give lrs or lr_by_batch_size, not both")
    if not g.lrs and not g.lr_by_batch_size:
        raise ConfigError("grid.lrs must list at least one learning rate")
    for lr in g.lrs:
        _positive("lr", lr)
    lr_map = dict(g.lr_by_batch_size)
    for b, lr in g.lr_by_batch_size:
        positive_int("batch_size", b)
        _positive("lr", lr)
    for b in g.batch_sizes if lr_map else ():
        if b not in lr_map:
            raise ConfigError(f"grid.lr_by_batch_size has no LR for batch_size {b}")
    if not g.clips:
        raise ConfigError("grid.clips must list at least one threshold (null = no clipping)")
    for c in g.clips:
        if c is not None:
            _positive("grad_clip", c)
    for b in g.batch_sizes:  # every grid point must resolve to >= 1 step
        _budget_to_steps(p, b)
    _check_noise(t)
    for b in g.batch_sizes:
        _check_noise(t, b)


def _check_noise(t: TrainConfig, batch_size: int | None = None) -> None:
    """The noise options alone, or whether they can measure the grid's ``batch_size``: its micro-batches
    must split it evenly, at least two of them (the noise scale compares micro-batches)."""
    if batch_size is None:
        if not (isinstance(t.noise_interval, int) and not isinstance(t.noise_interval, bool)) or t.noise_interval < 0:
            raise ConfigError(f"train.noise_interval must be an integer >= 0 (0: no noise measurement), "
                              f"got {t.noise_interval!r}")
        positive_int("train.noise_microbatch", t.noise_microbatch)
        if not isinstance(t.tail_index, bool):
            raise ConfigError(f"train.tail_index must be true or false, got {t.tail_index!r}")
        if t.tail_index and not t.noise_interval:
            raise ConfigError("train.tail_index needs train.noise_interval > 0 (it is measured with the noise scale)")
        return
    b = t.noise_microbatch
    if t.noise_interval and (batch_size % b or batch_size // b < 2):
        raise ConfigError(f"train.noise_microbatch ({b}) must split batch_size {batch_size} into at least 2 "
                          f"equal micro-batches; set train.noise_interval: 0 to measure no gradient noise")


def n_params_estimate(m: ModelConfig) -> int:
    """Parameter count of :class:`scaling.model.NanoTransformer` (checked against the model in tests)."""
    per_layer = 12 * m.d_model * m.d_model + 4 * m.d_model  # qkv, proj, mlp; two LayerNorms
    return m.n_layers * per_layer + m.vocab_size * m.d_model + m.context_length * m.d_model + 2 * m.d_model


def _budget_to_steps(p: Phase, batch_size: int) -> tuple[int, int]:
    """Turn the phase's budget (steps, tokens or FLOPs per configuration) into steps and warmup steps."""
    t, o = p.train, p.optim
    tokens_per_step = batch_size * p.model.context_length
    if t.budget_kind == "steps":
        per_step = 1.0
    elif t.budget_kind == "tokens":
        per_step = float(tokens_per_step)
    else:  # flops: the usual 6 N D estimate
        per_step = 6.0 * n_params_estimate(p.model) * tokens_per_step
    steps = int(round(t.budget / per_step))
    if steps < 1:
        raise ConfigError(f"steps must be >= 1: a {t.budget_kind} budget of {t.budget:g} gives "
                          f"{t.budget / per_step:.3g} steps at batch_size {batch_size}")
    return steps, int(round(o.warmup / per_step))
